"""SSD scan (Mamba-2) in Triton, chunked, forward and backward (the decoding step is ``fused_recurrent.py``).

Layout is token-major: x, z (b, T, H, P); dt (b, T, H); A, dt_bias (H,); B, C (b, T, G, N) (head h reads
group h // (H / G)); D (H,) or (H, P); states (b, H, P, N) fp32. Within a chunk of L tokens the per-head
log-decays are ``a_t = dt'_t A_h``; ``seg[i, j] = a_{j+1} + ... + a_i`` is built in each program as a
masked cumulative sum of ``a`` (sums of same-sign terms, never a difference of prefix sums), so every
decay ``exp(seg)`` is in [0, 1] and keeps full precision however strongly a chunk decays.

Forward (four kernels, one launch each):

1. ``_dt_kernel`` (chunk, batch x head): dt' = clamp(softplus(dt + dt_bias)) (0 past T), and per chunk the
   inclusive prefix sums ``cs_i = a_0 + ... + a_i`` and exclusive suffix sums ``sfx_j = a_{j+1} + ... +
   a_{L-1}``, fp32 (b, H, n_chunks, L).
2. ``_chunk_state_kernel`` (P x N block, batch x chunk, head): each chunk's end state from a zero start,
   ``S = sum_j exp(sfx_j) dt'_j x_j B_j^T`` (one (P, L) x (L, N) product).
3. ``_state_passing_kernel`` (P*N block, batch x head): the sequential pass over chunks,
   ``h_{c+1} = exp(cs_{L-1}) h_c + S_c``; the state entering each chunk overwrites S_c in place, the last
   is the final state.
4. ``_chunk_scan_kernel`` (P block, batch x chunk, head): ``y = ((C B^T) * exp(seg) * dt') @ x
   + exp(cs) * (C @ h_c^T) + D x``, gated by silu(z).

Backward: kernels 1-3 are re-run (the forward keeps nothing but its inputs), then

5. ``_dstates_kernel``: the gradient of each chunk's initial state through its outputs,
   ``sum_i exp(cs_i) g_i^T C_i`` (g = dL/dy before the gate);
6. ``_state_passing_bwd_kernel``: the reverse pass over chunks gives the gradient of each chunk's end state
   (in place) and of the initial state;
7. ``_chunk_bwd_kernel`` (batch x chunk, head): everything else from those, per chunk and head, looping
   over P blocks: dx, dz, dD, the per-head dB, dC (summed over the heads of a group in torch), and
   d(dt') through both ``dt' x`` and the decays. The decays' gradient is assembled per position as
   ``d a_k`` from the terms a_k enters: the intra-chunk terms ``T_ij = (C_i . B_j) exp(seg_ij) (g_i . u_j)``
   with j < k <= i (a masked (L, L) product), the initial state's terms at i >= k, the end-state terms of
   tokens j < k and the chunk's total decay. Each carries the decay through a_k, so nothing large
   cancels (a row-minus-column form would lose the gradient of strongly decaying tokens to rounding).
   Then ``d dt'_k = A d a_k + x_k . du_k``, through the clamp and softplus. dA, dD and d dt_bias are per
   (batch, chunk) partial sums, added in torch.

Every product takes fp32 operands (converted first, which also keeps the Triton interpreter exact for bf16):
3xTF32 on the tensor cores for fp32 inputs (about fp32 accuracy), TF32 for fp16 / bf16 inputs, exact in the
interpreter. Outputs and gradients are stored in their inputs' dtypes. All kernels compile for sm_90 without
local-memory spills; the one-kernel backward (``_chunk_bwd_kernel``) still keeps a few KB of stack per thread
at N = 128 (splitting it, as mamba-ssm does, is the next step for speed; not measured here, no GPU).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import interpreting, next_pow2

DEFAULT_CHUNK = 64


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with an accurate log1p (Kahan's trick; no libdevice needed).
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    one = v == 1.0
    l1p = tl.where(one, u, tl.log(v) * (u / tl.where(one, 1.0, v - 1.0)))  # no 0/0 in the unused branch
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _segsum(a, L: tl.constexpr):
    """seg[i, j] = a_{j+1} + ... + a_i for i >= j (0 on the diagonal; garbage above it: mask it)."""
    offs = tl.arange(0, L)
    return tl.cumsum(tl.where(offs[:, None] > offs[None, :], a[:, None], 0.0), axis=0)


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _dt_kernel(DT, A, BIAS, DTP, CS, SFX, T, H, n_chunks, sdt_b, sdt_t, sdt_h, lo, hi,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, L: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bi = (bh // H).to(tl.int64)
    h = bh % H
    offs = tl.arange(0, L)
    t = c * L + offs
    mask = t < T
    v = tl.load(DT + bi * sdt_b + t * sdt_t + h * sdt_h, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(BIAS + h).to(tl.float32)
    if SOFTPLUS:
        v = _softplus(v)
    v = tl.minimum(tl.maximum(v, lo), hi)
    v = tl.where(mask, v, 0.0)  # past T: no input, decay 1
    a = v * tl.load(A + h).to(tl.float32)
    cs = tl.cumsum(a, 0)
    sfx = tl.sum(tl.where(offs[:, None] > offs[None, :], a[:, None], 0.0), axis=0)  # [j] = sum_{k > j} a_k
    base = (bh.to(tl.int64) * n_chunks + c) * L + offs
    tl.store(DTP + base, v)
    tl.store(CS + base, cs)
    tl.store(SFX + base, sfx)


@triton.jit
def _chunk_state_kernel(X, B, DTP, SFX, STATES, T, H, P, N, R, n_chunks, n_pb,
                        sx_b, sx_t, sx_h, sx_p, sb_b, sb_t, sb_g, sb_n,
                        L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid_pn = tl.program_id(0)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    bi = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // R
    offs_l = tl.arange(0, L)
    offs_p = (pid_pn % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pb) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = c * L + offs_l
    mask_t, mask_p, mask_n = t < T, offs_p < P, offs_n < N
    vec = ((bi * H + h) * n_chunks + c) * L + offs_l
    w = tl.exp(tl.load(SFX + vec)) * tl.load(DTP + vec)  # exp(cs_end - cs_j) dt'_j
    x = tl.load(X + bi * sx_b + t[:, None] * sx_t + h * sx_h + offs_p[None, :] * sx_p,
                mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
    Bt = tl.load(B + bi * sb_b + t[:, None] * sb_t + g * sb_g + offs_n[None, :] * sb_n,
                 mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    s = _dot(tl.trans(x * w[:, None]), Bt, PREC)  # (P, N)
    out = (((bi * n_chunks + c) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(STATES + out, s, mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _state_passing_kernel(STATES, CS, H0, FINAL, H, PN, n_chunks,
                          HAS_H0: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bi = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_H0:
        st = tl.load(H0 + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        st = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(n_chunks):
        ptr = STATES + ((bi * n_chunks + c) * H + h) * PN + offs
        s = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, st, mask=mask)  # the state entering chunk c replaces the chunk's own end state
        decay = tl.exp(tl.load(CS + (bh * n_chunks + c) * L + L - 1))
        st = decay * st + s
    tl.store(FINAL + bh * PN + offs, st, mask=mask)


@triton.jit
def _chunk_scan_kernel(X, B, C, Dp, Z, Y, DTP, CS, A, STATES, T, H, P, N, R, n_chunks,
                       sx_b, sx_t, sx_h, sx_p, sb_b, sb_t, sb_g, sb_n, sc_b, sc_t, sc_g, sc_n,
                       sz_b, sz_t, sz_h, sz_p, sd_h, sd_p,
                       HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                       L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    bi = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // R
    offs_l = tl.arange(0, L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t = c * L + offs_l
    mask_t, mask_p, mask_n = t < T, offs_p < P, offs_n < N
    mask_tp = mask_t[:, None] & mask_p[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    vec = ((bi * H + h) * n_chunks + c) * L + offs_l
    dtp = tl.load(DTP + vec)
    cs = tl.load(CS + vec)
    a = dtp * tl.load(A + h).to(tl.float32)
    decay = tl.where(offs_l[:, None] >= offs_l[None, :], tl.exp(_segsum(a, L)), 0.0)
    Ct = tl.load(C + bi * sc_b + t[:, None] * sc_t + g * sc_g + offs_n[None, :] * sc_n, mask=mask_tn, other=0.0).to(tl.float32)
    Bt = tl.load(B + bi * sb_b + t[:, None] * sb_t + g * sb_g + offs_n[None, :] * sb_n, mask=mask_tn, other=0.0).to(tl.float32)
    W = _dot(Ct, tl.trans(Bt), PREC) * decay * dtp[None, :]
    x = tl.load(X + bi * sx_b + t[:, None] * sx_t + h * sx_h + offs_p[None, :] * sx_p, mask=mask_tp, other=0.0).to(tl.float32)
    y = _dot(W, x, PREC)
    h0 = tl.load(STATES + (((bi * n_chunks + c) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :],
                 mask=mask_p[:, None] & mask_n[None, :], other=0.0)
    y += tl.exp(cs)[:, None] * _dot(Ct, tl.trans(h0), PREC)
    if HAS_D:
        y += tl.load(Dp + h * sd_h + offs_p * sd_p, mask=mask_p, other=0.0).to(tl.float32)[None, :] * x
    if HAS_Z:
        zz = tl.load(Z + bi * sz_b + t[:, None] * sz_t + h * sz_h + offs_p[None, :] * sz_p, mask=mask_tp, other=0.0).to(tl.float32)
        y = y * zz * _sigmoid(zz)
    out = ((bi * T + t[:, None]) * H + h) * P + offs_p[None, :]  # y is contiguous (b, T, H, P)
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask_tp)


# ----------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dstates_kernel(DY, Z, C, CS, DSTATES, T, H, P, N, R, n_chunks, n_pb,
                    so_b, so_t, so_h, so_p, sz_b, sz_t, sz_h, sz_p, sc_b, sc_t, sc_g, sc_n,
                    HAS_Z: tl.constexpr, L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    PREC: tl.constexpr):
    pid_pn = tl.program_id(0)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    bi = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // R
    offs_l = tl.arange(0, L)
    offs_p = (pid_pn % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pb) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = c * L + offs_l
    mask_t, mask_p, mask_n = t < T, offs_p < P, offs_n < N
    mask_tp = mask_t[:, None] & mask_p[None, :]
    gy = tl.load(DY + bi * so_b + t[:, None] * so_t + h * so_h + offs_p[None, :] * so_p, mask=mask_tp, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(Z + bi * sz_b + t[:, None] * sz_t + h * sz_h + offs_p[None, :] * sz_p, mask=mask_tp, other=0.0).to(tl.float32)
        gy = gy * zz * _sigmoid(zz)
    ecs = tl.exp(tl.load(CS + ((bi * H + h) * n_chunks + c) * L + offs_l))
    Ct = tl.load(C + bi * sc_b + t[:, None] * sc_t + g * sc_g + offs_n[None, :] * sc_n,
                 mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    d = _dot(tl.trans(gy * ecs[:, None]), Ct, PREC)  # (P, N)
    out = (((bi * n_chunks + c) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(DSTATES + out, d, mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _state_passing_bwd_kernel(DSTATES, CS, DFINAL, DH0, H, PN, n_chunks,
                              HAS_DFINAL: tl.constexpr, STORE_DH0: tl.constexpr, L: tl.constexpr,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bi = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DFINAL:
        d = tl.load(DFINAL + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        d = tl.zeros([BLOCK], dtype=tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        ptr = DSTATES + ((bi * n_chunks + c) * H + h) * PN + offs
        dy_part = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, d, mask=mask)  # dL/d(the state at the end of chunk c)
        d = dy_part + tl.exp(tl.load(CS + (bh * n_chunks + c) * L + L - 1)) * d
    if STORE_DH0:
        tl.store(DH0 + bh * PN + offs, d, mask=mask)


@triton.jit
def _chunk_bwd_kernel(X, DT, A, BIAS, B, C, Dp, Z, DY, DTP, CS, SFX, STATES, DSTATES,
                      DX, DZ, DDT, DBH, DCH, DA_PART, DD_PART, DBIAS_PART,
                      T, H, P, N, R, n_chunks, lo, hi,
                      sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sb_b, sb_t, sb_g, sb_n,
                      sc_b, sc_t, sc_g, sc_n, sz_b, sz_t, sz_h, sz_p, so_b, so_t, so_h, so_p, sd_h, sd_p,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    bi = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // R
    offs_l = tl.arange(0, L)
    offs_n = tl.arange(0, BLOCK_N)
    t = c * L + offs_l
    mask_t, mask_n = t < T, offs_n < N
    mask_tn = mask_t[:, None] & mask_n[None, :]
    vec = ((bi * H + h) * n_chunks + c) * L + offs_l
    dtp = tl.load(DTP + vec)
    cs = tl.load(CS + vec)
    A_h = tl.load(A + h).to(tl.float32)
    causal = offs_l[:, None] >= offs_l[None, :]
    decay = tl.where(causal, tl.exp(_segsum(dtp * A_h, L)), 0.0)  # [i, j]
    ecs = tl.exp(cs)  # [i]: decay from the chunk start through token i
    eend = tl.exp(tl.load(SFX + vec))  # [j]: decay from token j to the chunk end
    Ct = tl.load(C + bi * sc_b + t[:, None] * sc_t + g * sc_g + offs_n[None, :] * sc_n, mask=mask_tn, other=0.0).to(tl.float32)
    Bt = tl.load(B + bi * sb_b + t[:, None] * sb_t + g * sb_g + offs_n[None, :] * sb_n, mask=mask_tn, other=0.0).to(tl.float32)
    CB = _dot(Ct, tl.trans(Bt), PREC)
    M = CB * decay  # y_intra = (M * dt'_j) @ x
    GU = tl.zeros([L, L], dtype=tl.float32)  # [i, j] = g_i . u_j
    dC_off = tl.zeros([L, BLOCK_N], dtype=tl.float32)  # exp(cs_i) g_i h0
    dB_end = tl.zeros([L, BLOCK_N], dtype=tl.float32)  # exp(sfx_j) dE^T u_j
    ddt_u = tl.zeros([L], dtype=tl.float32)  # x_j . du_j
    x_end = tl.zeros([BLOCK_N], dtype=tl.float32)  # <dE, h0>, summed over P below
    st_base = ((bi * n_chunks + c) * H + h) * P
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_pn = mask_p[:, None] & mask_n[None, :]
        x = tl.load(X + bi * sx_b + t[:, None] * sx_t + h * sx_h + offs_p[None, :] * sx_p, mask=mask_tp, other=0.0).to(tl.float32)
        gy = tl.load(DY + bi * so_b + t[:, None] * so_t + h * so_h + offs_p[None, :] * so_p, mask=mask_tp, other=0.0).to(tl.float32)
        st = (st_base + offs_p[:, None]) * N + offs_n[None, :]
        h0 = tl.load(STATES + st, mask=mask_pn, other=0.0)
        dE = tl.load(DSTATES + st, mask=mask_pn, other=0.0)
        if HAS_D:
            Dv = tl.load(Dp + h * sd_h + offs_p * sd_p, mask=mask_p, other=0.0).to(tl.float32)
        out = ((bi * T + t[:, None]) * H + h) * P + offs_p[None, :]  # dx, dz are contiguous (b, T, H, P)
        if HAS_Z:
            zz = tl.load(Z + bi * sz_b + t[:, None] * sz_t + h * sz_h + offs_p[None, :] * sz_p, mask=mask_tp, other=0.0).to(tl.float32)
            sig = _sigmoid(zz)
            y_pre = _dot(M * dtp[None, :], x, PREC) + ecs[:, None] * _dot(Ct, tl.trans(h0), PREC)
            if HAS_D:
                y_pre += Dv[None, :] * x
            tl.store(DZ + out, (gy * y_pre * sig * (1.0 + zz * (1.0 - sig))).to(DZ.dtype.element_ty), mask=mask_tp)
            gy = gy * zz * sig
        u = x * dtp[:, None]
        du = _dot(tl.trans(M), gy, PREC) + eend[:, None] * _dot(Bt, tl.trans(dE), PREC)  # dL/d(dt' x)
        dx = du * dtp[:, None]
        if HAS_D:
            dx += Dv[None, :] * gy
            tl.store(DD_PART + (bi * n_chunks + c) * H * P + h * P + offs_p, tl.sum(gy * x, axis=0), mask=mask_p)
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask_tp)
        ddt_u += tl.sum(du * x, axis=1)
        GU += _dot(gy, tl.trans(u), PREC)
        dC_off += _dot(gy * ecs[:, None], h0, PREC)
        dB_end += _dot(u * eend[:, None], dE, PREC)
        x_end += tl.sum(dE * h0, axis=0)
    Mg = GU * decay
    dC = _dot(Mg, Bt, PREC) + dC_off
    dB = _dot(tl.trans(Mg), Ct, PREC) + dB_end
    bc = ((bi * T + t[:, None]) * H + h) * N + offs_n[None, :]  # per-head (b, T, H, N)
    tl.store(DCH + bc, dC, mask=mask_tn)
    tl.store(DBH + bc, dB, mask=mask_tn)
    # gradient of the log-decays: a_k enters seg[i, j] for j < k <= i, cs_i for i >= k, the decay to the chunk
    # end of tokens j < k, and the whole chunk's decay. Every term below carries the decay through a_k, so
    # nothing large cancels (a strongly decaying token gets a tiny gradient, as it should)
    later = offs_l[:, None] < offs_l[None, :]  # [j, k]: j < k
    cross = _dot(Mg * CB, later.to(tl.float32), PREC)  # [i, k] = sum_{j < k} T_ij
    da = tl.sum(tl.where(causal, cross, 0.0), axis=0)  # sum over i >= k
    da += tl.cumsum(tl.sum(dC_off * Ct, axis=1), 0, reverse=True)  # initial state's term, i >= k
    da += tl.sum(tl.where(later, tl.sum(dB_end * Bt, axis=1)[:, None], 0.0), axis=0)  # end-state terms, j < k
    cs_end = tl.sum(tl.where(offs_l == L - 1, cs, 0.0), axis=0)
    da += tl.exp(cs_end) * tl.sum(x_end, axis=0)
    ddtp = da * A_h + ddt_u
    tl.store(DA_PART + (bi * n_chunks + c) * H + h, tl.sum(tl.where(mask_t, da * dtp, 0.0), axis=0))
    # through dt' = clamp(softplus(dt + bias), lo, hi)
    v = tl.load(DT + bi * sdt_b + t * sdt_t + h * sdt_h, mask=mask_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(BIAS + h).to(tl.float32)
    if SOFTPLUS:
        s = _softplus(v)
        ddtp = ddtp * _sigmoid(v)
    else:
        s = v
    ddt = tl.where(mask_t & (s >= lo) & (s <= hi), ddtp, 0.0)
    tl.store(DDT + (bi * T + t) * H + h, ddt.to(DDT.dtype.element_ty), mask=mask_t)
    if HAS_BIAS:
        tl.store(DBIAS_PART + (bi * n_chunks + c) * H + h, tl.sum(ddt, axis=0))


# ----------------------------------------------------------------------------------------------------
# launchers


def _dot_precision(dtype) -> str:
    """fp32 inputs: 3xTF32 on the tensor cores (about fp32 accuracy); fp16 / bf16 inputs: TF32; the interpreter
    computes every product exactly in any case."""
    if interpreting():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _pow2_at_least_16(n: int) -> int:
    return max(16, next_pow2(n))


class _Cfg:
    """Sizes shared by the forward and the backward of one call."""

    def __init__(self, x, B, chunk_size):
        self.b, self.T, self.H, self.P = x.shape
        self.G, self.N = B.shape[2:]
        self.R = self.H // self.G
        self.L = _pow2_at_least_16(min(int(chunk_size), self.T))  # dot tiles are at least 16 wide
        self.nc = triton.cdiv(self.T, self.L)
        self.BN = _pow2_at_least_16(self.N)
        self.BP = min(64, _pow2_at_least_16(self.P))
        self.n_pb = triton.cdiv(self.P, self.BP)
        self.BP_BWD = min(32, _pow2_at_least_16(self.P))  # the backward's P loop: smaller live tiles
        self.BLOCK = min(1024, next_pow2(self.P * self.N))
        self.prec = _dot_precision(x.dtype)


def _d_strides(D):
    if D is None:
        return None, (0, 0)
    return D, ((D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1)))


def _dt_and_states(cfg, x, dt, A, B, dt_bias, dt_softplus, lo, hi, initial_state):
    """Kernels 1-3: dt', the prefix / suffix sums of the log-decays, each chunk's initial state and the
    final state."""
    b, T, H, P, N, L, nc = cfg.b, cfg.T, cfg.H, cfg.P, cfg.N, cfg.L, cfg.nc
    dev = x.device
    dtp, cs, sfx = (torch.empty(b, H, nc, L, dtype=torch.float32, device=dev) for _ in range(3))
    _dt_kernel[(nc, b * H)](
        dt, A, dt_bias, dtp, cs, sfx, T, H, nc, *dt.stride(), lo, hi,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), L=L, num_warps=4)
    states = torch.empty(b, nc, H, P, N, dtype=torch.float32, device=dev)
    BNs = min(cfg.BN, 64)
    n_nb = triton.cdiv(N, BNs)
    _chunk_state_kernel[(cfg.n_pb * n_nb, b * nc, H)](
        x, B, dtp, sfx, states, T, H, P, N, cfg.R, nc, cfg.n_pb, *x.stride(), *B.stride(),
        L=L, BLOCK_P=cfg.BP, BLOCK_N=BNs, PREC=cfg.prec, num_warps=4)
    final = torch.empty(b, H, P, N, dtype=torch.float32, device=dev)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    _state_passing_kernel[(triton.cdiv(P * N, cfg.BLOCK), b * H)](
        states, cs, h0, final, H, P * N, nc, HAS_H0=h0 is not None, L=L, BLOCK=cfg.BLOCK, num_warps=4)
    return dtp, cs, sfx, states, final


def ssd_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state, chunk_size):
    cfg = _Cfg(x, B, chunk_size)
    dtp, cs, sfx, states, final = _dt_and_states(cfg, x, dt, A, B, dt_bias, dt_softplus, lo, hi, initial_state)
    y = torch.empty(cfg.b, cfg.T, cfg.H, cfg.P, dtype=x.dtype, device=x.device)
    Dp, sd = _d_strides(D)
    zs = z.stride() if z is not None else (0, 0, 0, 0)
    _chunk_scan_kernel[(cfg.n_pb, cfg.b * cfg.nc, cfg.H)](
        x, B, C, Dp, z, y, dtp, cs, A, states, cfg.T, cfg.H, cfg.P, cfg.N, cfg.R, cfg.nc,
        *x.stride(), *B.stride(), *C.stride(), *zs, *sd,
        HAS_D=D is not None, HAS_Z=z is not None, L=cfg.L, BLOCK_P=cfg.BP, BLOCK_N=cfg.BN, PREC=cfg.prec,
        num_warps=8 if cfg.BN * cfg.BP >= 4096 else 4)
    return y, final


def ssd_bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state, want_dh0, chunk_size):
    cfg = _Cfg(x, B, chunk_size)
    b, T, H, P, N, L, nc = cfg.b, cfg.T, cfg.H, cfg.P, cfg.N, cfg.L, cfg.nc
    dev = x.device
    dtp, cs, sfx, states, _ = _dt_and_states(cfg, x, dt, A, B, dt_bias, dt_softplus, lo, hi, initial_state)
    Dp, sd = _d_strides(D)
    zs = z.stride() if z is not None else (0, 0, 0, 0)
    dstates = torch.empty(b, nc, H, P, N, dtype=torch.float32, device=dev)
    BNs = min(cfg.BN, 64)
    n_nb = triton.cdiv(N, BNs)
    _dstates_kernel[(cfg.n_pb * n_nb, b * nc, H)](
        dy, z, C, cs, dstates, T, H, P, N, cfg.R, nc, cfg.n_pb, *dy.stride(), *zs, *C.stride(),
        HAS_Z=z is not None, L=L, BLOCK_P=cfg.BP, BLOCK_N=BNs, PREC=cfg.prec, num_warps=4)
    dh0 = torch.empty(b, H, P, N, dtype=torch.float32, device=dev) if want_dh0 else None
    dfin = None if dfinal is None else dfinal.float().contiguous()
    _state_passing_bwd_kernel[(triton.cdiv(P * N, cfg.BLOCK), b * H)](
        dstates, cs, dfin, dh0, H, P * N, nc, HAS_DFINAL=dfin is not None, STORE_DH0=want_dh0,
        L=L, BLOCK=cfg.BLOCK, num_warps=4)
    dx = torch.empty(b, T, H, P, dtype=x.dtype, device=dev)
    dz = torch.empty(b, T, H, P, dtype=z.dtype, device=dev) if z is not None else None
    ddt = torch.empty(b, T, H, dtype=dt.dtype, device=dev)
    dBh = torch.empty(b, T, H, N, dtype=torch.float32, device=dev)
    dCh = torch.empty(b, T, H, N, dtype=torch.float32, device=dev)
    dA_part = torch.empty(b, nc, H, dtype=torch.float32, device=dev)
    dD_part = torch.empty(b, nc, H, P, dtype=torch.float32, device=dev) if D is not None else None
    dbias_part = torch.empty(b, nc, H, dtype=torch.float32, device=dev) if dt_bias is not None else None
    _chunk_bwd_kernel[(b * nc, H)](
        x, dt, A, dt_bias, B, C, Dp, z, dy, dtp, cs, sfx, states, dstates,
        dx, dz, ddt, dBh, dCh, dA_part, dD_part, dbias_part,
        T, H, P, N, cfg.R, nc, lo, hi,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zs, *dy.stride(), *sd,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        L=L, BLOCK_P=cfg.BP_BWD, BLOCK_N=cfg.BN, PREC=cfg.prec, num_warps=8)
    G, R = cfg.G, cfg.R
    dB = dBh.view(b, T, G, R, N).sum(3).to(B.dtype)
    dC = dCh.view(b, T, G, R, N).sum(3).to(C.dtype)
    dA = dA_part.sum((0, 1)).to(A.dtype)
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1))
        dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)
    dbias = dbias_part.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


class SSDScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, lo, hi, chunk_size):
        y, final = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state, chunk_size)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state)
        ctx.cfg = (dt_softplus, lo, hi, chunk_size)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, dt_bias, initial_state = ctx.saved_tensors
        dt_softplus, lo, hi, chunk_size = ctx.cfg
        if dy is None:
            dy = torch.zeros_like(x)
        grads = ssd_bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi, initial_state,
                        want_dh0=initial_state is not None and ctx.needs_input_grad[8], chunk_size=chunk_size)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = grads
        return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0, None, None, None, None


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf),
             initial_state=None, return_final_state=False, chunk_size=None):
    """Triton SSD scan; same contract as :func:`bmojo.ops.ssd_scan` (y in x's dtype, final state
    (b, H, P, N) fp32), forward and every gradient. ``chunk_size`` is the chunk length (rounded up to a
    power of two, at least 16, no longer than T needs)."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    if T == 0:
        y = x.new_empty(b, 0, H, P)
        h = (initial_state.float().clone() if initial_state is not None
             else torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device))
        return (y, h) if return_final_state else y
    chunk_size = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    y, final = SSDScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, bool(dt_softplus), lo, hi, chunk_size)
    return (y, final) if return_final_state else y
