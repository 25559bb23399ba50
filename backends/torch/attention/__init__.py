"""The torch backend's attention: ``parallel`` (B'MOJO / sliding-window / full causal attention over a
sequence; banded kernel for CPU and CUDA, gathering kernel elsewhere), ``decode`` (one query per row over a
cache, read segment by segment)."""
from .decode import attention_decode_torch
from .parallel import bmojo_attention_blocksparse, bmojo_attention_gathered

__all__ = ["attention_decode_torch", "bmojo_attention_blocksparse", "bmojo_attention_gathered"]
