"""Oracle of the depthwise causal convolution of the Mamba mixer (docs/design.md, "The layer", step 1).
Self-contained: it shares no code with any backend it checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Depthwise causal conv. x (b, T, d); weight (d, K); bias (d,); initial_state (b, d, K-1), the
    K-1 inputs before position 0 (zeros if None). Returns y (b, T, d) and, if asked, the final
    state (b, d, K-1): the last K-1 inputs (zero-padded on the left when T < K-1)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    b, T, d = x.shape
    K = weight.shape[-1]
    prev = x.new_zeros(b, d, K - 1) if initial_state is None else initial_state.to(x.dtype)
    xp = torch.cat([prev, x.transpose(1, 2)], dim=-1)  # (b, d, K-1+T)
    y = torch.zeros(b, d, T, dtype=torch.float32, device=x.device)
    for j in range(K):  # tap j multiplies x[t - (K-1) + j]
        y = y + weight[:, j, None].float() * xp[:, :, j : j + T].float()
    if bias is not None:
        y = y + bias.float()[:, None]
    if activation is not None:  # silu (swish is its other name)
        y = F.silu(y)
    y = y.to(x.dtype).transpose(1, 2)
    if return_final_state:
        return y, xp[:, :, xp.shape[-1] - (K - 1):].contiguous()
    return y


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step. x (b, d); conv_state (b, d, K-1) is shifted in place. Returns y (b, d)."""
    y, new_state = causal_conv1d_ref(x[:, None], weight, bias, activation, conv_state, True)
    conv_state.copy_(new_state)
    return y[:, 0]
