"""The torch backend's causal conv1d: ``parallel`` (every position at once), ``fused_recurrent`` (one step)."""
from .fused_recurrent import causal_conv1d_update_torch
from .parallel import causal_conv1d_torch

__all__ = ["causal_conv1d_torch", "causal_conv1d_update_torch"]
