"""One decoding step of the depthwise causal conv1d for the torch backend (the whole-sequence conv is
``parallel.py``)."""
from __future__ import annotations

import torch

from .parallel import _activate


def causal_conv1d_update_torch(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step. x (b, d); conv_state (b, d, K-1) is shifted in place. Returns y (b, d)."""
    xp = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (b, d, K)
    y = torch.einsum("bdk,dk->bd", xp.float(), weight.float())
    if bias is not None:
        y = y + bias.float()
    y = _activate(y, activation).to(x.dtype)
    conv_state.copy_(xp[:, :, 1:])
    return y
