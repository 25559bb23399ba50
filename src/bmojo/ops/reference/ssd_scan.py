"""Oracle of the Mamba-2 (SSD) scan: a Python loop over time, readable, never fast. Self-contained: it
shares no code with any backend it checks (nor with the Mamba-1 oracle, ``selective_scan.py``).

One scalar decay per head (A is (H,)), a (P, N) state per head, B and C shared by the heads of a group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _heads(BC: torch.Tensor, H: int) -> torch.Tensor:
    """(b, T, G, N) -> (b, T, H, N): head h reads group h // (H // G)."""
    return BC.repeat_interleave(H // BC.shape[2], dim=2)


def _dt_transform(dt, dt_bias, dt_softplus, dt_limit):
    """dt' = softplus(dt + dt_bias) (or dt + dt_bias), clamped to dt_limit; fp32."""
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    lo, hi = dt_limit
    return dtf.clamp(min=float(lo), max=float(hi))


def ssd_scan_ref(
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
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan (Mamba-2), token-major.

    Shapes: x, z (b, T, H, P); dt (b, T, H); A, dt_bias (H,); B, C (b, T, G, N) with G | H; D (H,) or
    (H, P); initial_state (b, H, P, N). Returns y (b, T, H, P) in x's dtype, and the final state
    (b, H, P, N) fp32 if ``return_final_state``.

        dt'_t = clamp(softplus(dt_t + dt_bias), *dt_limit)
        h_t   = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T      (per head: h (P, N), x_t (P,), B_t (N,))
        y_t   = h_t C_t + D x_t;   y_t *= silu(z_t)
    """
    b, T, H, P = x.shape
    N = B.shape[-1]
    xf, Af = x.float(), A.float()
    dtf = _dt_transform(dt, dt_bias, dt_softplus, dt_limit)  # (b, T, H)
    Bh, Ch = _heads(B.float(), H), _heads(C.float(), H)  # (b, T, H, N)
    h = x.new_zeros(b, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(T):
        decay = torch.exp(dtf[:, t] * Af)  # (b, H): one scalar per head
        inp = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, H, P, N)
        h = decay[..., None, None] * h + inp
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))  # (b, H, P)
    y = torch.stack(ys, dim=1) if T > 0 else xf.new_zeros(b, 0, H, P)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def ssd_state_update_ref(
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
    """One decoding step. state (b, H, P, N) fp32 is updated in place; x, z (b, H, P); dt (b, H);
    B, C (b, G, N). Returns y (b, H, P) in x's dtype."""
    y, h = ssd_scan_ref(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D, z=None if z is None else z[:, None],
        dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_state=state.clone(), return_final_state=True,  # a copy: state is overwritten below
    )
    state.copy_(h)
    return y[:, 0]
