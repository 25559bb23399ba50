from .conv import CausalConv1dFn, causal_conv1d, causal_conv1d_update

__all__ = ["CausalConv1dFn", "causal_conv1d", "causal_conv1d_update"]
