"""Checkpoints: Hugging Face int4 directories (compressed-tensors, GPTQ, AWQ) in, Orbax kernel layout out."""

from jw4a16.checkpoint.formats import Scheme
from jw4a16.checkpoint.loaders import inspect, load, load_compressed_tensors, parse_scheme, repack_params
from jw4a16.checkpoint.orbax_io import read_metadata, restore, save
from jw4a16.checkpoint.safetensors_dir import CheckpointError, SafetensorsDir

__all__ = ["CheckpointError", "SafetensorsDir", "Scheme", "inspect", "load", "load_compressed_tensors",
           "parse_scheme", "read_metadata", "repack_params", "restore", "save"]
