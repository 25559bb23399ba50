"""One decoding step of the SSD scan (Mamba-2) for the torch backend (the chunked scan is ``chunk.py``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ssd_state_update_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """One decoding step, vectorised over batch and heads. state (b, H, P, N) fp32 updated in place;
    x, z (b, H, P); dt (b, H); B, C (b, G, N). Returns y (b, H, P) in x's dtype. Differentiable."""
    b, H, P = x.shape
    G, N = B.shape[1:]
    R = H // G
    xf = x.float()
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    dtf = dtf.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))
    h = state.float().view(b, G, R, P, N)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (state, x, dt, A, B, C, D, z, dt_bias)):
        h = h.clone()  # autograd keeps the old state for the backward, and the state is overwritten below
    decay = torch.exp(dtf * A.float()).view(b, G, R, 1, 1)
    u = (dtf[..., None] * xf).view(b, G, R, P, 1)
    h = decay * h + u * B.float().view(b, G, 1, 1, N)
    state.copy_(h.view(b, H, P, N))
    y = torch.matmul(h, C.float().view(b, G, 1, N, 1)).view(b, H, P)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
