"""One decoding step of the SSD scan (Mamba-2) in Triton: the state (b, H, P, N) is updated in place (the
chunked scan is ``chunk.py``)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import NO_BACKWARD, needs_grad, next_pow2, torch_fallback
from .chunk import _sigmoid, _softplus


@triton.jit
def _ssd_step_kernel(
    S, X, DT, A, B, C, Dp, Z, BIAS, Y,
    H, P, N, R, lo, hi,
    ss_b, ss_h, ss_p, ss_n, sx_b, sx_h, sx_p, sdt_b, sdt_h, sz_b, sz_h, sz_p,
    sb_b, sb_g, sb_n, sc_b, sc_g, sc_n, sd_h, sd_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    bh = tl.program_id(1)
    bi = (bh // H).to(tl.int64)
    h = bh % H
    g = h // R
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < P, offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    s_ptr = S + bi * ss_b + h * ss_h + offs_p[:, None] * ss_p + offs_n[None, :] * ss_n
    st = tl.load(s_ptr, mask=mask_pn, other=0.0).to(tl.float32)
    x = tl.load(X + bi * sx_b + h * sx_h + offs_p * sx_p, mask=mask_p, other=0.0).to(tl.float32)
    v = tl.load(DT + bi * sdt_b + h * sdt_h).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(BIAS + h).to(tl.float32)
    if SOFTPLUS:
        v = _softplus(v)
    v = tl.minimum(tl.maximum(v, lo), hi)
    decay = tl.exp(v * tl.load(A + h).to(tl.float32))
    Bv = tl.load(B + bi * sb_b + g * sb_g + offs_n * sb_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C + bi * sc_b + g * sc_g + offs_n * sc_n, mask=mask_n, other=0.0).to(tl.float32)
    st = decay * st + (v * x)[:, None] * Bv[None, :]
    tl.store(s_ptr, st.to(S.dtype.element_ty), mask=mask_pn)
    y = tl.sum(st * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(Dp + h * sd_h + offs_p * sd_p, mask=mask_p, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(Z + bi * sz_b + h * sz_h + offs_p * sz_p, mask=mask_p, other=0.0).to(tl.float32)
        y = y * zz * _sigmoid(zz)
    tl.store(Y + (bi * H + h) * P + offs_p, y.to(Y.dtype.element_ty), mask=mask_p)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                     dt_limit=(0.0, math.inf)):
    """Same contract as :func:`bmojo.ops.ssd_state_update`: ``state`` (b, H, P, N) is updated in place and
    y (b, H, P) is returned. This is the decoding step and has no backward: when autograd needs gradients of
    the inputs it runs the torch backend's step instead, with a one-time warning."""
    if needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        return torch_fallback("ssd_state_update", x.device, NO_BACKWARD)(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    b, H, P = x.shape
    G, N = B.shape[1:]
    y = torch.empty(b, H, P, dtype=x.dtype, device=x.device)
    BLOCK_N = next_pow2(N)
    BLOCK_P = min(next_pow2(P), max(1, 4096 // BLOCK_N))
    zs = z.stride() if z is not None else (0, 0, 0)
    sd = (0, 0) if D is None else ((D.stride(0), 0) if D.dim() == 1 else D.stride())
    _ssd_step_kernel[(triton.cdiv(P, BLOCK_P), b * H)](
        state, x, dt, A, B, C, D, z, dt_bias, y,
        H, P, N, H // G, float(dt_limit[0]), float(dt_limit[1]),
        *state.stride(), *x.stride(), *dt.stride(), *zs, *B.stride(), *C.stride(), *sd,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return y
