"""The cuda backend's causal conv1d: ``parallel`` (prefill, forward and backward), ``fused_recurrent`` (one step)."""
from .fused_recurrent import causal_conv1d_update
from .parallel import CausalConv1dFn, causal_conv1d

__all__ = ["CausalConv1dFn", "causal_conv1d", "causal_conv1d_update"]
