"""Selective scan (Mamba-1) in Triton, forward and backward, with checkpointed chunk states (the decoding
step is ``fused_recurrent.py``).

Layout is token-major: x, dt, z (b, T, d); A (d, N); B, C (b, T, G, N) (G = 1 for shared B/C).

Forward: one program per (channel block, batch row). It walks over time in chunks of ``BLOCK_T``
steps; inside a chunk the linear recurrence ``h_t = a_t h_{t-1} + bx_t`` (a_t = exp(dt_t A),
bx_t = dt_t x_t B_t) is solved for the whole (BLOCK_T, BLOCK_D, N) tile at once by a parallel
associative scan, then carried into the next chunk. The state entering every chunk is written out
(``states``, (b, nchunks, d, N) fp32): the backward needs only these, never all T states.

Backward: the same programs walk the chunks in reverse. Each chunk's states are recomputed from its
checkpoint, then the adjoint ``g_t = dL/dh_t`` solves ``g_t = dy_t C_t + a_{t+1} g_{t+1}`` with a
reverse associative scan; the gradient flowing into the previous chunk is ``a_{t0} g_{t0}``.
Per-channel gradients (dx, ddt, dz) are written directly; dB and dC (shared by a group of channels)
are accumulated with fp32 atomics, dA / dD / d dt_bias as fp32 per-batch partials summed in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import next_pow2, pow2_divisor

DEFAULT_CHUNK = 32


@triton.jit
def _lin_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with an accurate log1p (Kahan's trick; no libdevice needed).
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    l1p = tl.where(v == 1.0, u, tl.log(v) * (u / (v - 1.0)))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _scan_fwd_kernel(
    X, DT, A, B, C, Dp, Z, BIAS, H0, Y, STATES, HT,
    T, dim, N, d_per_group, n_chunks,
    sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d, sz_b, sz_t, sz_d, sy_b, sy_t, sy_d,
    sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n, sa_d, sa_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, STORE_FINAL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A_ = tl.load(A + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=mask_dn, other=0.0).to(tl.float32)
    grp = (pid_d * BLOCK_D) // d_per_group  # a channel block never straddles two groups
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(Dp + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    if HAS_H0:
        h = tl.load(H0 + pid_b * dim * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    last = (offs_t == BLOCK_T - 1)[:, None, None]
    for c in range(n_chunks):
        if STORE_STATES:
            tl.store(STATES + (pid_b * n_chunks + c) * dim * N + state_offs, h, mask=mask_dn)
        t = c * BLOCK_T + offs_t
        mask_t = t < T
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(X + pid_b * sx_b + t[:, None] * sx_t + offs_d[None, :] * sx_d, mask=mask_td, other=0.0).to(tl.float32)
        dtv = tl.load(DT + pid_b * sdt_b + t[:, None] * sdt_t + offs_d[None, :] * sdt_d, mask=mask_td, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dtv += bias[None, :]
        if SOFTPLUS:
            dtv = _softplus(dtv)
        dtv = tl.where(mask_td, dtv, 0.0)  # padded steps: a = 1, bx = 0 (the state passes through)
        Bt = tl.load(B + pid_b * sb_b + t[:, None] * sb_t + grp * sb_g + offs_n[None, :] * sb_n, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C + pid_b * sc_b + t[:, None] * sc_t + grp * sc_g + offs_n[None, :] * sc_n, mask=mask_tn, other=0.0).to(tl.float32)
        a = tl.exp(dtv[:, :, None] * A_[None, :, :])
        bx = (dtv * x)[:, :, None] * Bt[:, None, :]
        acum, hs = tl.associative_scan((a, bx), 0, _lin_combine)
        hs = hs + acum * h[None, :, :]
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        if HAS_D:
            y += Dv[None, :] * x
        if HAS_Z:
            zz = tl.load(Z + pid_b * sz_b + t[:, None] * sz_t + offs_d[None, :] * sz_d, mask=mask_td, other=0.0).to(tl.float32)
            y = y * zz * _sigmoid(zz)
        tl.store(Y + pid_b * sy_b + t[:, None] * sy_t + offs_d[None, :] * sy_d, y.to(Y.dtype.element_ty), mask=mask_td)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)
    if STORE_FINAL:
        tl.store(HT + pid_b * dim * N + state_offs, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    X, DT, A, B, C, Dp, Z, BIAS, STATES, DOUT, DHT,
    DX, DDT, DZ, DB, DC, DA_part, DD_part, DBIAS_part, DH0,
    T, dim, N, G, d_per_group, n_chunks,
    sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d, sz_b, sz_t, sz_d, so_b, so_t, so_d,
    sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n, sa_d, sa_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A_ = tl.load(A + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=mask_dn, other=0.0).to(tl.float32)
    grp = (pid_d * BLOCK_D) // d_per_group
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(Dp + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    if HAS_DHT:
        R = tl.load(DHT + pid_b * dim * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        R = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = (offs_t == 0)[:, None, None]
    last = (offs_t == BLOCK_T - 1)[:, None, None]
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        h0 = tl.load(STATES + (pid_b * n_chunks + c) * dim * N + state_offs, mask=mask_dn, other=0.0)
        t = c * BLOCK_T + offs_t
        mask_t = t < T
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(X + pid_b * sx_b + t[:, None] * sx_t + offs_d[None, :] * sx_d, mask=mask_td, other=0.0).to(tl.float32)
        dt_in = tl.load(DT + pid_b * sdt_b + t[:, None] * sdt_t + offs_d[None, :] * sdt_d, mask=mask_td, other=0.0).to(tl.float32)
        # dt of the next step: a_{t+1} carries the adjoint from t+1 back to t
        mask_next = (t + 1 < T)[:, None] & mask_d[None, :]
        dtn = tl.load(DT + pid_b * sdt_b + (t + 1)[:, None] * sdt_t + offs_d[None, :] * sdt_d, mask=mask_next, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_in += bias[None, :]
            dtn += bias[None, :]
        if SOFTPLUS:
            dtv = _softplus(dt_in)
            dtn = _softplus(dtn)
        else:
            dtv = dt_in
        dtv = tl.where(mask_td, dtv, 0.0)
        dtn = tl.where(mask_next, dtn, 0.0)
        Bt = tl.load(B + pid_b * sb_b + t[:, None] * sb_t + grp * sb_g + offs_n[None, :] * sb_n, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C + pid_b * sc_b + t[:, None] * sc_t + grp * sc_g + offs_n[None, :] * sc_n, mask=mask_tn, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + pid_b * so_b + t[:, None] * so_t + offs_d[None, :] * so_d, mask=mask_td, other=0.0).to(tl.float32)
        # recompute this chunk's states from its checkpoint
        a = tl.exp(dtv[:, :, None] * A_[None, :, :])
        xdt = dtv * x
        bx = xdt[:, :, None] * Bt[:, None, :]
        acum, hs = tl.associative_scan((a, bx), 0, _lin_combine)
        hs = hs + acum * h0[None, :, :]
        out_offs = pid_b * T * dim + t[:, None] * dim + offs_d[None, :]  # grads are contiguous (b, T, d)
        if HAS_Z:
            zz = tl.load(Z + pid_b * sz_b + t[:, None] * sz_t + offs_d[None, :] * sz_d, mask=mask_td, other=0.0).to(tl.float32)
            y_pre = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y_pre += Dv[None, :] * x
            sig = _sigmoid(zz)
            dy = dout * zz * sig
            dz = dout * y_pre * sig * (1.0 + zz * (1.0 - sig))
            tl.store(DZ + out_offs, dz.to(DZ.dtype.element_ty), mask=mask_td)
        else:
            dy = dout
        # adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}; the chunk's last row also receives R
        cg = dy[:, :, None] * Ct[:, None, :] + tl.where(last, R[None, :, :], 0.0)
        alpha = tl.exp(dtn[:, :, None] * A_[None, :, :])
        _, gs = tl.associative_scan((alpha, cg), 0, _lin_combine, reverse=True)
        ah = hs - bx  # a_t * h_{t-1}
        gB = tl.sum(gs * Bt[:, None, :], axis=2)
        ddt = x * gB + tl.sum(gs * ah * A_[None, :, :], axis=2)
        dx = dtv * gB
        if HAS_D:
            dx += dy * Dv[None, :]
            dD_acc += tl.sum(dy * x, axis=0)
        dB_t = tl.sum(gs * xdt[:, :, None], axis=1)
        dC_t = tl.sum(hs * dy[:, :, None], axis=1)
        bc_offs = ((pid_b * T + t[:, None]) * G + grp) * N + offs_n[None, :]
        tl.atomic_add(DB + bc_offs, dB_t, mask=mask_tn)
        tl.atomic_add(DC + bc_offs, dC_t, mask=mask_tn)
        dA_acc += tl.sum(gs * ah * dtv[:, :, None], axis=0)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(dt_in)
        ddt = tl.where(mask_td, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=0)
        tl.store(DX + out_offs, dx.to(DX.dtype.element_ty), mask=mask_td)
        tl.store(DDT + out_offs, ddt.to(DDT.dtype.element_ty), mask=mask_td)
        R = tl.sum(tl.where(first, a * gs, 0.0), axis=0)
    if STORE_DH0:
        tl.store(DH0 + pid_b * dim * N + state_offs, R, mask=mask_dn)
    tl.store(DA_part + pid_b * dim * N + state_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(DD_part + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(DBIAS_part + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


def _block_d(d: int, G: int, cap: int) -> int:
    """Channel block: a power of two; when B/C are grouped it divides d // G (no block straddles groups)."""
    if G == 1:
        return min(cap, next_pow2(d))
    return pow2_divisor(d // G, cap)


def _block_t(chunk_size: int, T: int) -> int:
    """The time tile (= checkpoint spacing): the chunk size rounded up to a power of two, no longer than T needs."""
    return min(next_pow2(chunk_size), next_pow2(T))


def _as_groups(BC: torch.Tensor) -> torch.Tensor:
    return BC.unsqueeze(2) if BC.dim() == 3 else BC


def _fwd_config(N: int, chunk: int) -> tuple[int, int]:
    # keep the (chunk, channels, N) tile around 4K fp32 values per program
    cap = max(1, 4096 // (chunk * next_pow2(N)))
    return min(cap, 64), 4


def _bwd_config(N: int, chunk: int) -> tuple[int, int]:
    cap = max(1, 2048 // (chunk * next_pow2(N)))
    return min(cap, 32), 4


def scan_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, store_states, store_final, chunk_size):
    b, T, d = x.shape
    N = A.shape[1]
    B4, C4 = _as_groups(B), _as_groups(C)
    G = B4.shape[2]
    if C4.shape[2] != G:
        raise ValueError(f"selective_scan (cuda): B and C must have the same number of groups, got {B4.shape[2]} and {C4.shape[2]}")
    BLOCK_T = _block_t(chunk_size, T)
    n_chunks = triton.cdiv(T, BLOCK_T)
    cap, warps = _fwd_config(N, BLOCK_T)
    BLOCK_D = _block_d(d, G, cap)
    y = torch.empty(b, T, d, dtype=x.dtype, device=x.device)
    states = torch.empty(b, n_chunks, d, N, dtype=torch.float32, device=x.device) if store_states else None
    final = torch.empty(b, d, N, dtype=torch.float32, device=x.device) if store_final else None
    h0 = None if initial_state is None else initial_state.float().contiguous()
    zs = z.stride() if z is not None else (0, 0, 0)
    grid = (triton.cdiv(d, BLOCK_D), b)
    _scan_fwd_kernel[grid](
        x, dt, A, B4, C4, D, z, dt_bias, h0, y, states, final,
        T, d, N, d // G, n_chunks,
        *x.stride(), *dt.stride(), *zs, *y.stride(),
        *B4.stride(), *C4.stride(), *A.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_H0=h0 is not None, STORE_STATES=store_states, STORE_FINAL=store_final,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, BLOCK_N=next_pow2(N), num_warps=warps,
    )
    return y, final, states


def scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, states, want_dh0, chunk_size):
    b, T, d = x.shape
    N = A.shape[1]
    B4, C4 = _as_groups(B), _as_groups(C)
    G = B4.shape[2]
    BLOCK_T = _block_t(chunk_size, T)
    n_chunks = states.shape[1]
    cap, warps = _bwd_config(N, BLOCK_T)
    BLOCK_D = _block_d(d, G, cap)
    dev = x.device
    dx = torch.empty(b, T, d, dtype=x.dtype, device=dev)
    ddt = torch.empty(b, T, d, dtype=dt.dtype, device=dev)
    dz = torch.empty(b, T, d, dtype=z.dtype, device=dev) if z is not None else None
    dB = torch.zeros(b, T, G, N, dtype=torch.float32, device=dev)
    dC = torch.zeros(b, T, G, N, dtype=torch.float32, device=dev)
    dA_part = torch.empty(b, d, N, dtype=torch.float32, device=dev)
    dD_part = torch.empty(b, d, dtype=torch.float32, device=dev) if D is not None else None
    dbias_part = torch.empty(b, d, dtype=torch.float32, device=dev) if dt_bias is not None else None
    dh0 = torch.empty(b, d, N, dtype=torch.float32, device=dev) if want_dh0 else None
    dht = None if dfinal is None else dfinal.float().contiguous()
    zs = z.stride() if z is not None else (0, 0, 0)
    grid = (triton.cdiv(d, BLOCK_D), b)
    _scan_bwd_kernel[grid](
        x, dt, A, B4, C4, D, z, dt_bias, states, dout, dht,
        dx, ddt, dz, dB, dC, dA_part, dD_part, dbias_part, dh0,
        T, d, N, G, d // G, n_chunks,
        *x.stride(), *dt.stride(), *zs, *dout.stride(),
        *B4.stride(), *C4.stride(), *A.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_DHT=dht is not None, STORE_DH0=want_dh0,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, BLOCK_N=next_pow2(N), num_warps=warps,
    )
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None
    dB = dB.to(B.dtype).reshape(B.shape)
    dC = dC.to(C.dtype).reshape(C.shape)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk_size):
        grad = any(ctx.needs_input_grad)
        y, final, states = scan_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state,
                                    store_states=grad, store_final=True, chunk_size=chunk_size)
        if grad:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, states)
        ctx.dt_softplus = dt_softplus
        ctx.chunk_size = chunk_size
        ctx.has_h0 = initial_state is not None
        return y, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, dt_bias, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = scan_bwd(
            dout, dfinal, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, states,
            want_dh0=ctx.has_h0 and ctx.needs_input_grad[8], chunk_size=ctx.chunk_size)
        return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0, None, None


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
                   return_final_state=False, chunk_size=None):
    """Triton selective scan; same contract as :func:`bmojo.ops.selective_scan` (y in x's dtype,
    final state (b, d, N) fp32). ``chunk_size`` is the time tile (rounded up to a power of two) and the
    spacing of the states checkpointed for the backward."""
    b, T, d = x.shape
    N = A.shape[1]
    if T == 0:
        y = x.new_empty(b, 0, d)
        h = (initial_state.float().clone() if initial_state is not None
             else torch.zeros(b, d, N, dtype=torch.float32, device=x.device))
        return (y, h) if return_final_state else y
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    y, final = SelectiveScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, bool(dt_softplus), chunk_size)
    return (y, final) if return_final_state else y
