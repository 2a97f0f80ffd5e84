"""jw4a16: fused int4-weight x 16-bit-activation matmuls for JAX, on NVIDIA and AMD GPUs through Triton."""

from jw4a16.layout import pack_int4, unpack_int4
from jw4a16.ops import preferred_packing, quantized_matmul, resolve_backend, w4a16_matmul
from jw4a16.qweight import QuantizedWeight
from jw4a16.reference import dequantize, w4a16_matmul_reference
from jw4a16.tuning import KernelConfig

__version__ = "0.1.0"

__all__ = [
    "KernelConfig", "QuantizedWeight", "dequantize", "pack_int4", "preferred_packing", "quantized_matmul",
    "resolve_backend",
    "unpack_int4", "w4a16_matmul", "w4a16_matmul_reference",
]

from jw4a16.linen import W4A16Dense  # noqa: E402
from jw4a16.quantize import quantize, quantize_dense_params  # noqa: E402

__all__ += ["W4A16Dense", "quantize", "quantize_dense_params"]
