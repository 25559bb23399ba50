"""The cuda backend's attention: ``parallel`` (B'MOJO attention, forward and backward), ``decode`` (one
query over a cache)."""
from .decode import attention_decode
from .parallel import BMojoAttentionFn, bmojo_attention

__all__ = ["BMojoAttentionFn", "attention_decode", "bmojo_attention"]
