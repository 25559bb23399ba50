"""One decoding step of the selective scan for the torch backend (the chunked scan is ``chunk.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_step(
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
) -> torch.Tensor:
    """One decoding step, vectorised. state (b, d, N) fp32 updated in place; x, dt, z (b, d);
    B, C (b, N) or (b, G, N). Returns y (b, d) in x's dtype."""
    b, d = x.shape
    N = A.shape[-1]
    Bg = B.float().unsqueeze(1) if B.dim() == 2 else B.float()  # (b, G, N)
    Cg = C.float().unsqueeze(1) if C.dim() == 2 else C.float()
    G = Bg.shape[1]
    P = d // G
    xf = x.float()
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    dtg = dtf.view(b, G, P, 1)
    h = state.float().view(b, G, P, N)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias)):
        h = h.clone()  # autograd keeps h for the backward, and the state is overwritten below
    h = torch.exp(dtg * A.float().view(G, P, N)) * h + (dtg * xf.view(b, G, P, 1)) * Bg[:, :, None, :]
    state.copy_(h.view(b, d, N))
    y = torch.matmul(h, Cg[..., None]).view(b, d)
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
