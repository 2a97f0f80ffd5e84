"""Orbax save/restore of kernel-layout parameters, restorable straight onto sharded devices."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp

from jw4a16.checkpoint.safetensors_dir import CheckpointError
from jw4a16.qweight import QuantizedWeight

# 2: packing="fragment" weights in blocks of 64 columns, [ceil(N / 64), 8 K] (layout.to_fragment_packed).  Version 1
# stored them as [N, K // 8]; version-1 directories without fragment-packed weights read the same.
FORMAT_VERSION = 2
META_FILE = "jw4a16.json"
QW_FIELDS = ("qweight", "scales", "qzeros", "perm")


def _split(params, path=()):
  """params -> (plain tree of arrays, {dotted path: quantized-weight static metadata})."""
  if isinstance(params, QuantizedWeight):
    arrays = {f: getattr(params, f) for f in QW_FIELDS if getattr(params, f) is not None}
    return arrays, {".".join(path): dict(group_size=params.group_size, zp_bias=params.zp_bias,
                                         packing=params.packing)}
  if isinstance(params, dict):
    tree, meta = {}, {}
    for k, v in params.items():
      tree[k], m = _split(v, path + (str(k),))
      meta.update(m)
    return tree, meta
  return params, {}


def _join(tree, meta, path=()):
  key = ".".join(path)
  if key in meta:
    return QuantizedWeight(tree["qweight"], tree["scales"], tree.get("qzeros"), tree.get("perm"),
                           meta[key]["group_size"], meta[key]["zp_bias"], meta[key].get("packing", "gptq"))
  if isinstance(tree, dict):
    return {k: _join(v, meta, path + (str(k),)) for k, v in tree.items()}
  return tree


def save(params, directory, *, metadata: dict | None = None) -> pathlib.Path:
  """Writes params (nested dicts of arrays and QuantizedWeight) to `directory` with Orbax, plus jw4a16.json
  (format version, each quantized weight's group size, and `metadata`, e.g. source format and symmetry).

  Atomic: everything is written to a temporary sibling directory that is renamed into place at the end, so a
  failure leaves no partial output; an existing directory is refused.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory} exists; choose a new directory")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    tree, qmeta = _split(params)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp / "params", tree)
      ckpt.wait_until_finished()
    (tmp / META_FILE).write_text(json.dumps(dict(format_version=FORMAT_VERSION, quantized=qmeta,
                                                 metadata=metadata or {}), indent=1))
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_metadata(directory) -> dict:
  path = pathlib.Path(directory) / META_FILE
  if not path.exists():
    raise CheckpointError(f"{path}: missing; not a jw4a16 checkpoint")
  meta = json.loads(path.read_text())
  version = meta.get("format_version")
  if version == 1 and any(q.get("packing") == "fragment" for q in meta.get("quantized", {}).values()):
    raise CheckpointError(f"{path}: format_version 1 with packing='fragment' weights in the old [N, K // 8] layout; "
                          "convert the source checkpoint again (jw4a16 convert) or save it with packing='gptq'")
  if version not in (1, FORMAT_VERSION):
    raise CheckpointError(f"{path}: format_version {version}, this jw4a16 reads 1 and {FORMAT_VERSION}")
  return meta


def restore(directory, shardings=None):
  """Restores what `save` wrote.  `shardings`: None (arrays on the default device), or a pytree shaped like the
  params (QuantizedWeight leaves allowed) of jax.sharding.Sharding, so each device reads only its shards and no
  whole array is gathered on one device.  Returns (params, metadata)."""
  directory = pathlib.Path(directory).absolute()
  meta = read_metadata(directory)
  with ocp.StandardCheckpointer() as ckpt:
    md = ckpt.metadata(directory / "params")
    tree_md = md.item_metadata if hasattr(md, "item_metadata") else md
    tree_md = getattr(tree_md, "tree", tree_md)
    if shardings is None:
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree_md)
    else:
      sh_tree, _ = _split(shardings)
      target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree_md, sh_tree)
    tree = ckpt.restore(directory / "params", target)
  return _join(tree, meta["quantized"]), meta["metadata"]


__all__ = ["read_metadata", "restore", "save"]
