"""Oracle of the selective scan: a Python loop over time, readable, never fast (docs/design.md, "The
layer", step 1). Self-contained: it shares no code with any backend it checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(BC: torch.Tensor, d: int) -> torch.Tensor:
    """(b, T, N) or (b, T, G, N) -> (b, T, d, N), channel i reading group i // (d // G)."""
    if BC.dim() == 3:
        return BC.unsqueeze(2).expand(-1, -1, d, -1)
    G = BC.shape[2]
    return BC.repeat_interleave(d // G, dim=2)


def selective_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Selective scan, token-major.

    Shapes: x, dt, z (b, T, d); A (d, N); B, C (b, T, N) or (b, T, G, N); D, dt_bias (d,);
    initial_state (b, d, N). Returns y (b, T, d) in x's dtype, and the final state (b, d, N) fp32
    if ``return_final_state``.

        dt'_t = softplus(dt_t + dt_bias);  h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t
        y_t = <h_t, C_t> + D x_t;          y_t *= silu(z_t)
    """
    dtype_in = x.dtype
    b, T, d = x.shape
    N = A.shape[-1]
    xf, dtf, Af = x.float(), dt.float(), A.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bf, Cf = _expand_groups(B.float(), d), _expand_groups(C.float(), d)
    h = x.new_zeros(b, d, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(T):
        dA = torch.exp(dtf[:, t, :, None] * Af)  # (b, d, N)
        h = dA * h + (dtf[:, t] * xf[:, t])[..., None] * Bf[:, t]
        ys.append((h * Cf[:, t]).sum(-1))
    y = torch.stack(ys, dim=1) if T > 0 else xf.new_zeros(b, 0, d)
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_final_state else y


def selective_state_update_ref(
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
    """One decoding step. state (b, d, N) fp32 is updated in place; x, dt, z (b, d); B, C (b, N) or
    (b, G, N). Returns y (b, d) in x's dtype."""
    y, h = selective_scan_ref(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=state.clone(), return_final_state=True,  # a copy: state is overwritten below
    )
    state.copy_(h)
    return y[:, 0]
