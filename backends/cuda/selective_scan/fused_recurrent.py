"""One decoding step of the selective scan in Triton: the state (b, d, N) is updated in place (the
chunked scan is ``chunk.py``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import NO_BACKWARD, needs_grad, next_pow2, torch_fallback
from .chunk import _sigmoid, _softplus


@triton.jit
def _state_update_kernel(
    S, X, DT, A, B, C, Dp, Z, BIAS, Y,
    dim, N, d_per_group,
    ss_b, ss_d, ss_n, sx_b, sx_d, sdt_b, sdt_d, sz_b, sz_d, sa_d, sa_n,
    sb_b, sb_g, sb_n, sc_b, sc_g, sc_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    grp = offs_d // d_per_group
    s_ptr = S + pid_b * ss_b + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n
    h = tl.load(s_ptr, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(X + pid_b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    dtv = tl.load(DT + pid_b * sdt_b + offs_d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dtv += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dtv = _softplus(dtv)
    A_ = tl.load(A + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B + pid_b * sb_b + grp[:, None] * sb_g + offs_n[None, :] * sb_n, mask=mask_dn, other=0.0).to(tl.float32)
    Cv = tl.load(C + pid_b * sc_b + grp[:, None] * sc_g + offs_n[None, :] * sc_n, mask=mask_dn, other=0.0).to(tl.float32)
    h = tl.exp(dtv[:, None] * A_) * h + (dtv * x)[:, None] * Bv
    tl.store(s_ptr, h.to(S.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(Dp + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(Z + pid_b * sz_b + offs_d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zz * _sigmoid(zz)
    tl.store(Y + pid_b * dim + offs_d, y.to(Y.dtype.element_ty), mask=mask_d)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """Same contract as :func:`bmojo.ops.selective_state_update`: ``state`` (b, d, N) is updated in place
    and y (b, d) is returned. This is the decoding step and has no backward: when autograd needs gradients
    of the inputs it runs the torch backend's step instead, with a one-time warning."""
    if needs_grad(x, dt, A, B, C, D, z, dt_bias):
        return torch_fallback("selective_state_update", x.device, NO_BACKWARD)(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    b, d = x.shape
    N = A.shape[1]
    B3 = B.unsqueeze(1) if B.dim() == 2 else B
    C3 = C.unsqueeze(1) if C.dim() == 2 else C
    G = B3.shape[1]
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    BLOCK_N = next_pow2(N)
    BLOCK_D = min(next_pow2(d), max(1, 2048 // BLOCK_N))
    zs = z.stride() if z is not None else (0, 0)
    _state_update_kernel[(triton.cdiv(d, BLOCK_D), b)](
        state, x, dt, A, B3, C3, D, z, dt_bias, y,
        d, N, d // G,
        *state.stride(), *x.stride(), *dt.stride(), *zs, *A.stride(),
        *B3.stride(), *C3.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return y
