"""Quantize a small Flax MLP's Dense layers to int4 and compare float and W4A16 outputs side by side.

  python examples/quantize_mlp.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import jw4a16


class MLP(nn.Module):
  hidden: int = 1024
  out: int = 256
  dense: type = nn.Dense  # W4A16Dense for the quantized model

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(self.dense(self.hidden, name="up")(x))
    return self.dense(self.out, name="down")(x)


def main():
  x = jax.random.normal(jax.random.key(0), (4, 256))
  params = MLP().init(jax.random.key(1), x)["params"]
  y_float = MLP().apply({"params": params}, x)
  for group_size in (32, 128):
    qparams = jw4a16.quantize_dense_params(params, group_size=group_size)
    qmodel = MLP(dense=lambda f, name: jw4a16.W4A16Dense(f, group_size=group_size, name=name))
    y_int4 = jax.jit(qmodel.apply)({"params": qparams}, x.astype(jnp.bfloat16)).astype(jnp.float32)
    rel = jnp.linalg.norm(y_int4 - y_float) / jnp.linalg.norm(y_float)
    fbytes = sum(a.nbytes for a in jax.tree.leaves(params))
    qbytes = sum(a.nbytes for a in jax.tree.leaves(qparams))
    print(f"group {group_size:3d}: relative error {float(rel):.3f}, params {fbytes / 1e6:.2f} MB float32 -> "
          f"{qbytes / 1e6:.2f} MB int4 ({jw4a16.resolve_backend()} path)")
  print("first outputs, float vs int4 (group 128):")
  for a, b in zip(y_float[0, :6].tolist(), y_int4[0, :6].tolist()):
    print(f"  {a:+.4f}  {b:+.4f}")


if __name__ == "__main__":
  main()
