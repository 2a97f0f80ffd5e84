"""A Hugging Face model directory's safetensors, read tensor by tensor as numpy (BF16 through ml_dtypes)."""

from __future__ import annotations

import json
import pathlib

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or converted; the message names the file and tensor."""


class SafetensorsDir:
  """Maps tensor names to shard files (model.safetensors, or the shards model.safetensors.index.json names).

  Tensors are read one at a time (`get`), so peak host memory stays near the largest tensor.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    if not self.path.is_dir():
      raise CheckpointError(f"{self.path}: not a directory")
    index = self.path / "model.safetensors.index.json"
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
      missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
      if missing:
        raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
      self.files = {name: self.path / f for name, f in weight_map.items()}
    else:
      single = self.path / "model.safetensors"
      shards = [single] if single.exists() else sorted(self.path.glob("*.safetensors"))
      if not shards:
        raise CheckpointError(f"{self.path}: no model.safetensors and no model.safetensors.index.json")
      self.files = {}
      for shard in shards:
        for name in self._keys(shard):
          if name in self.files:
            raise CheckpointError(f"tensor {name!r} is in both {self.files[name]} and {shard}")
          self.files[name] = shard
    self._open = {}

  @staticmethod
  def _keys(file):
    try:
      with safe_open(file, framework="numpy") as f:
        return list(f.keys())
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or corrupt headers
      raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from e

  def keys(self):
    return self.files.keys()

  def __contains__(self, name):
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
    file = self.files[name]
    try:
      with safe_open(file, framework="numpy") as f:
        return f.get_tensor(name)
    except Exception as e:  # truncated data, a dtype numpy lacks
      raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e

  def nbytes(self, name: str) -> int:
    with safe_open(self.files[name], framework="numpy") as f:
      sl = f.get_slice(name)
      shape = sl.get_shape()
      dtype = sl.get_dtype()
    size = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "F64": 8, "BOOL": 1}.get(dtype, 4)
    return int(np.prod(shape)) * size

  def shape(self, name: str) -> tuple[int, ...]:
    with safe_open(self.files[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())


def read_config(path) -> dict:
  cfg = pathlib.Path(path) / "config.json"
  if not cfg.exists():
    raise CheckpointError(f"{cfg}: missing (a Hugging Face model directory has a config.json)")
  try:
    return json.loads(cfg.read_text())
  except ValueError as e:
    raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e


def set_path(tree: dict, dotted: str, value) -> None:
  """tree['a']['b']['c'] = value for 'a.b.c'."""
  *parents, leaf = dotted.split(".")
  node = tree
  for p in parents:
    node = node.setdefault(p, {})
  node[leaf] = value
