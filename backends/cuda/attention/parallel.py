"""B'MOJO attention in Triton over a whole sequence: one online softmax over in-context, fading and memory
keys (the decoding step is ``decode.py``).

Query t sees (docs/design.md, "The layer", step 5)
  - in-context keys k[s],  t - w < s <= t          (window=None: every s <= t),
  - fading keys kf[s],     t - w - m_f < s <= t - w,
  - memory keys km[c, j] of its chunk c = t // w whose slot j is valid.

Both key bands are "s + HI <= t < s + LO" with (HI, LO) = (0, w) and (w, w + m_f), so one band routine
serves both. The fading band may be scored with its own queries (``q_fading``, like q; ``SEP_QF``): the
forward and dq kernels then read q_fading's rows for that band (and write its gradient, dq_fading), and
the fading keys' dk/dv kernel reads q_fading where it reads q.

Each program owns a block of queries of one head and walks only the key blocks that some
query of the block can see (loop bounds from the block's first and last position), then the memory
slots of the chunks its queries belong to. The log-sum-exp (natural log, fp32) is kept for the backward.

Backward (FlashAttention-2 style, recomputing probabilities from the lse):
  - dq: one program per query block, the same three loops as the forward;
  - dk, dv (and dk_fading, dv_fading): one program per key block and kv head, looping over the query
    heads of its group and the query blocks that can see it (no atomics);
  - dk_memory, dv_memory: one program per (chunk, slot block, kv head), looping over every query block of
    the chunk and every query head of the group, accumulating in fp32 registers (a chunk's memory is read
    by several query blocks whenever the block is shorter than w).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import interpreting, next_pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. PREC "upcast": operands are converted to fp32 first (the Triton
    interpreter multiplies bf16 operands as raw integers; on a GPU PREC is "ieee" or "tf32")."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _online_update(acc, m_i, l_i, s, v, PREC: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_band(acc, m_i, l_i, q, k_base, v_base, sk_t, sv_t, offs_m, offs_d, mask_d, lo, hi, LO, HI, qk_scale,
              PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PREC) * qk_scale
        vis = ((offs_n[None, :] + HI) <= offs_m[:, None]) & ((offs_n[None, :] + LO) > offs_m[:, None]) & mask_n[None, :]
        s = tl.where(vis, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd_memory(acc, m_i, l_i, q, km_base, vm_base, MV, mv_off, skm_c, skm_e, svm_c, svm_e, smv_c,
                offs_m, offs_d, mask_d, c_lo, c_hi, window, m_e, qk_scale,
                HAS_VALID: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk_of_q = offs_m // window
    for c in range(c_lo, c_hi + 1):
        for e0 in range(0, m_e, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < m_e
            if HAS_VALID:
                mask_e = mask_e & (tl.load(MV + mv_off + c * smv_c + offs_e, mask=mask_e, other=0) != 0)
            me2 = mask_e[:, None] & mask_d[None, :]
            k = tl.load(km_base + c * skm_c + offs_e[:, None] * skm_e + offs_d[None, :], mask=me2, other=0.0)
            v = tl.load(vm_base + c * svm_c + offs_e[:, None] * svm_e + offs_d[None, :], mask=me2, other=0.0)
            s = _mm(q, tl.trans(k), PREC) * qk_scale
            vis = (chunk_of_q == c)[:, None] & mask_e[None, :]
            s = tl.where(vis, s, float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    return acc, m_i, l_i


@triton.jit
def _bmojo_attn_fwd_kernel(
    Q, K, V, KF, VF, KM, VM, MV, O, LSE, QF,
    sq_b, sq_t, sq_h, sqf_b, sqf_t, sqf_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    skf_b, skf_t, skf_h, svf_b, svf_t, svf_h,
    skm_b, skm_c, skm_e, skm_h, svm_b, svm_c, svm_e, svm_h, smv_b, smv_c,
    so_b, so_t, so_h,
    T, Hq, n_rep, D, window, ctx_lo, fad_lo, m_e, qk_scale,
    HAS_FADING: tl.constexpr, HAS_MEM: tl.constexpr, HAS_VALID: tl.constexpr, SEP_QF: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // n_rep
    m_first = pid_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, T) - 1
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # in-context band: s + 0 <= t < s + ctx_lo
    lo = tl.maximum(m_first - ctx_lo + 1, 0)
    hi = m_last + 1
    acc, m_i, l_i = _fwd_band(acc, m_i, l_i, q, K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h, sk_t, sv_t,
                              offs_m, offs_d, mask_d, lo, hi, ctx_lo, 0, qk_scale, PREC, BLOCK_N)
    if HAS_FADING:
        # fading band: s + w <= t < s + w + m_f, scored with the fading queries when given
        if SEP_QF:
            qf = tl.load(QF + b * sqf_b + h * sqf_h + offs_m[:, None] * sqf_t + offs_d[None, :],
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        else:
            qf = q
        lo = tl.maximum(m_first - fad_lo + 1, 0)
        hi = tl.maximum(m_last - window + 1, 0)
        acc, m_i, l_i = _fwd_band(acc, m_i, l_i, qf, KF + b * skf_b + hk * skf_h, VF + b * svf_b + hk * svf_h,
                                  skf_t, svf_t, offs_m, offs_d, mask_d, lo, hi, fad_lo, window, qk_scale, PREC, BLOCK_N)
    if HAS_MEM:
        acc, m_i, l_i = _fwd_memory(acc, m_i, l_i, q, KM + b * skm_b + hk * skm_h, VM + b * svm_b + hk * svm_h,
                                    MV, b * smv_b, skm_c, skm_e, svm_c, svm_e, smv_c, offs_m, offs_d, mask_d,
                                    m_first // window, m_last // window, window, m_e, qk_scale, HAS_VALID, PREC, BLOCK_E)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + (b * T + offs_m) * Hq + h, lse, mask=mask_m)


# ----------------------------------------------------------------------------------------------------
# backward: dq


@triton.jit
def _dq_update(dq, q, do, k, v, s, vis, lse2, delta, PREC: tl.constexpr):
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _mm(do, tl.trans(v), PREC)
    ds = p * (dp - delta[:, None])
    return dq + _mm(ds.to(k.dtype), k, PREC)


@triton.jit
def _dq_band(dq, q, do, lse2, delta, k_base, v_base, sk_t, sv_t, offs_m, offs_d, mask_d, lo, hi, LO, HI, qk_scale,
             PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PREC) * qk_scale
        vis = ((offs_n[None, :] + HI) <= offs_m[:, None]) & ((offs_n[None, :] + LO) > offs_m[:, None]) & mask_n[None, :]
        dq = _dq_update(dq, q, do, k, v, s, vis, lse2, delta, PREC)
    return dq


@triton.jit
def _bmojo_attn_bwd_dq_kernel(
    Q, K, V, KF, VF, KM, VM, MV, DO, LSE, DELTA, DQ, QF, DQF,
    sq_b, sq_t, sq_h, sqf_b, sqf_t, sqf_h, sdqf_b, sdqf_t, sdqf_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    skf_b, skf_t, skf_h, svf_b, svf_t, svf_h,
    skm_b, skm_c, skm_e, skm_h, svm_b, svm_c, svm_e, svm_h, smv_b, smv_c,
    sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h,
    T, Hq, n_rep, D, window, ctx_lo, fad_lo, m_e, qk_scale, scale,
    HAS_FADING: tl.constexpr, HAS_MEM: tl.constexpr, HAS_VALID: tl.constexpr, SEP_QF: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // n_rep
    m_first = pid_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, T) - 1
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=mask_md, other=0.0)
    lse2 = tl.load(LSE + (b * T + offs_m) * Hq + h, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (b * T + offs_m) * Hq + h, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum(m_first - ctx_lo + 1, 0)
    hi = m_last + 1
    dq = _dq_band(dq, q, do, lse2, delta, K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h, sk_t, sv_t,
                  offs_m, offs_d, mask_d, lo, hi, ctx_lo, 0, qk_scale, PREC, BLOCK_N)
    if HAS_FADING:
        lo = tl.maximum(m_first - fad_lo + 1, 0)
        hi = tl.maximum(m_last - window + 1, 0)
        if SEP_QF:  # the fading band's scores came from q_fading: its gradient goes to dq_fading
            qf = tl.load(QF + b * sqf_b + h * sqf_h + offs_m[:, None] * sqf_t + offs_d[None, :],
                         mask=mask_md, other=0.0)
            dqf = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dqf = _dq_band(dqf, qf, do, lse2, delta, KF + b * skf_b + hk * skf_h, VF + b * svf_b + hk * svf_h,
                           skf_t, svf_t, offs_m, offs_d, mask_d, lo, hi, fad_lo, window, qk_scale, PREC, BLOCK_N)
            tl.store(DQF + b * sdqf_b + h * sdqf_h + offs_m[:, None] * sdqf_t + offs_d[None, :],
                     (dqf * scale).to(DQF.dtype.element_ty), mask=mask_md)
        else:
            dq = _dq_band(dq, q, do, lse2, delta, KF + b * skf_b + hk * skf_h, VF + b * svf_b + hk * svf_h,
                          skf_t, svf_t, offs_m, offs_d, mask_d, lo, hi, fad_lo, window, qk_scale, PREC, BLOCK_N)
    if HAS_MEM:
        km_base = KM + b * skm_b + hk * skm_h
        vm_base = VM + b * svm_b + hk * svm_h
        chunk_of_q = offs_m // window
        for c in range(m_first // window, m_last // window + 1):
            for e0 in range(0, m_e, BLOCK_E):
                offs_e = e0 + tl.arange(0, BLOCK_E)
                mask_e = offs_e < m_e
                if HAS_VALID:
                    mask_e = mask_e & (tl.load(MV + b * smv_b + c * smv_c + offs_e, mask=mask_e, other=0) != 0)
                me2 = mask_e[:, None] & mask_d[None, :]
                k = tl.load(km_base + c * skm_c + offs_e[:, None] * skm_e + offs_d[None, :], mask=me2, other=0.0)
                v = tl.load(vm_base + c * svm_c + offs_e[:, None] * svm_e + offs_d[None, :], mask=me2, other=0.0)
                s = _mm(q, tl.trans(k), PREC) * qk_scale
                vis = (chunk_of_q == c)[:, None] & mask_e[None, :]
                dq = _dq_update(dq, q, do, k, v, s, vis, lse2, delta, PREC)
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=mask_md)


# ----------------------------------------------------------------------------------------------------
# backward: dk, dv


@triton.jit
def _kv_update(dk, dv, k, v, q, do, lse2, delta, vis, qk_scale, PREC: tl.constexpr):
    """Transposed tiles: k, v (BN, D); q, do (BM, D); returns dk, dv (BN, D) without the final scale."""
    sT = _mm(k, tl.trans(q), PREC) * qk_scale
    pT = tl.where(vis, tl.exp2(sT - lse2[None, :]), 0.0)
    dv += _mm(pT.to(do.dtype), do, PREC)
    dpT = _mm(v, tl.trans(do), PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += _mm(dsT.to(q.dtype), q, PREC)
    return dk, dv


@triton.jit
def _bmojo_attn_bwd_dkdv_band_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    T, Hq, Hkv, n_rep, D, LO, HI, qk_scale, scale,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Keys k[s] seen by queries t with s + HI <= t < s + LO; dk/dv are contiguous (b, T, Hkv, D)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv
    n_first = pid_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, T) - 1
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < T
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    t_lo = n_first + HI
    t_hi = tl.minimum(n_last + LO, T)
    for r in range(n_rep):
        h = hk * n_rep + r
        for start in range(t_lo, t_hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mask_m = offs_m < t_hi
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=mask_md, other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=mask_md, other=0.0)
            lse2 = tl.load(LSE + (b * T + offs_m) * Hq + h, mask=mask_m, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + (b * T + offs_m) * Hq + h, mask=mask_m, other=0.0)
            vis = ((offs_n[:, None] + HI) <= offs_m[None, :]) & ((offs_n[:, None] + LO) > offs_m[None, :]) \
                & mask_n[:, None] & mask_m[None, :]
            dk, dv = _kv_update(dk, dv, k, v, q, do, lse2, delta, vis, qk_scale, PREC)
    out = ((b * T + offs_n[:, None]) * Hkv + hk) * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _bmojo_attn_bwd_dkdv_memory_kernel(
    Q, KM, VM, MV, DO, LSE, DELTA, DKM, DVM,
    sq_b, sq_t, sq_h, skm_b, skm_c, skm_e, skm_h, svm_b, svm_c, svm_e, svm_h, smv_b, smv_c, sdo_b, sdo_t, sdo_h,
    T, Hq, Hkv, n_rep, D, window, n_chunks, m_e, qk_scale, scale,
    HAS_VALID: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Memory slots of chunk c are seen by every query of the chunk; dk/dv_memory are contiguous
    (b, chunks, m_e, Hkv, D) and accumulated in fp32 over all query blocks and heads of the group."""
    n_eb = tl.cdiv(m_e, BLOCK_E)
    pid_ce = tl.program_id(0)
    c = pid_ce // n_eb
    e0 = (pid_ce % n_eb) * BLOCK_E
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv
    offs_e = e0 + tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    mask_e = offs_e < m_e
    mask_d = offs_d < D
    mask_ed = mask_e[:, None] & mask_d[None, :]
    valid = mask_e
    if HAS_VALID:
        valid = valid & (tl.load(MV + b * smv_b + c * smv_c + offs_e, mask=mask_e, other=0) != 0)
    k = tl.load(KM + b * skm_b + c * skm_c + hk * skm_h + offs_e[:, None] * skm_e + offs_d[None, :], mask=mask_ed, other=0.0)
    v = tl.load(VM + b * svm_b + c * svm_c + hk * svm_h + offs_e[:, None] * svm_e + offs_d[None, :], mask=mask_ed, other=0.0)
    dk = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    t_lo = c * window
    t_hi = tl.minimum(t_lo + window, T)
    for r in range(n_rep):
        h = hk * n_rep + r
        for start in range(t_lo, t_hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mask_m = offs_m < t_hi
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=mask_md, other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=mask_md, other=0.0)
            lse2 = tl.load(LSE + (b * T + offs_m) * Hq + h, mask=mask_m, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + (b * T + offs_m) * Hq + h, mask=mask_m, other=0.0)
            vis = valid[:, None] & mask_m[None, :]
            dk, dv = _kv_update(dk, dv, k, v, q, do, lse2, delta, vis, qk_scale, PREC)
    out = (((b * n_chunks + c) * m_e + offs_e[:, None]) * Hkv + hk) * D + offs_d[None, :]
    tl.store(DKM + out, (dk * scale).to(DKM.dtype.element_ty), mask=mask_ed)
    tl.store(DVM + out, dv.to(DVM.dtype.element_ty), mask=mask_ed)


# ----------------------------------------------------------------------------------------------------
# launch


def _dot_precision(dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # exact fp32 products (no tf32), so fp32 results match the reference tightly
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"  # ignored for fp16 / bf16 operands


def _last_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _cfg_fwd(D: int):
    # (BLOCK_M, BLOCK_N, num_warps): untuned defaults, sized so the tiles fit registers / shared memory
    return (64, 64, 4) if D <= 64 else (64, 32, 4)


def _cfg_bwd(D: int):
    return (32, 64, 4) if D <= 64 else (32, 32, 4)


_TEST_BLOCKS: dict | None = None  # tests may force small blocks: {"M": 16, "N": 16, "E": 16}


def _blocks(D: int, m_e: int, bwd: bool):
    BM, BN, warps = _cfg_bwd(D) if bwd else _cfg_fwd(D)
    BE = min(64, max(16, next_pow2(m_e)))
    if _TEST_BLOCKS is not None:
        BM, BN, BE = _TEST_BLOCKS.get("M", BM), _TEST_BLOCKS.get("N", BN), _TEST_BLOCKS.get("E", BE)
    return BM, BN, BE, warps


def _mem_strides(km, vm, mv):
    if km is None:
        return (0,) * 10
    mvs = (mv.stride(0), mv.stride(1)) if mv is not None else (0, 0)
    return (km.stride(0), km.stride(1), km.stride(2), km.stride(3),
            vm.stride(0), vm.stride(1), vm.stride(2), vm.stride(3), *mvs)


def _kv_strides(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


class BMojoAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_fading, v_fading, k_memory, v_memory, memory_valid, window, fading_window, scale,
                q_fading=None):
        b, T, Hq, D = q.shape
        Hkv = k.shape[2]
        n_rep = Hq // Hkv
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        # keys given but never visible (fading_window=0, no memory slot) get zero gradients
        has_fading = k_fading is not None and window is not None and fading_window > 0
        has_mem = k_memory is not None and window is not None and k_memory.shape[2] > 0
        ctx.unused = [t if t is not None and not used else None
                      for t, used in ((k_fading, has_fading), (v_fading, has_fading), (k_memory, has_mem),
                                      (v_memory, has_mem), (q_fading, has_fading))]
        # the fading band's own queries (SEP_QF), or q's
        qf = _last_contig(q_fading) if has_fading and q_fading is not None else None
        kf = _last_contig(k_fading) if has_fading else None
        vf = _last_contig(v_fading) if has_fading else None
        km = _last_contig(k_memory) if has_mem else None
        vm = _last_contig(v_memory) if has_mem else None
        mv = None
        if has_mem and memory_valid is not None:
            mv = memory_valid.to(torch.int8) if memory_valid.dtype == torch.bool else (memory_valid != 0).to(torch.int8)
        m_e = km.shape[2] if has_mem else 0
        win = window if window is not None else T + 1
        ctx_lo = window if window is not None else T + 1
        fad_lo = (window + fading_window) if has_fading else 0
        BM, BN, BE, warps = _blocks(D, m_e, bwd=False)
        BD = max(16, next_pow2(D))
        prec = _dot_precision(q.dtype)
        o = torch.empty(b, T, Hq, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, T, Hq, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(T, BM), b * Hq)
        _bmojo_attn_fwd_kernel[grid](
            q, k, v, kf, vf, km, vm, mv, o, lse, qf,
            q.stride(0), q.stride(1), q.stride(2), *_kv_strides(qf), *_kv_strides(k), *_kv_strides(v),
            *_kv_strides(kf), *_kv_strides(vf), *_mem_strides(km, vm, mv),
            o.stride(0), o.stride(1), o.stride(2),
            T, Hq, n_rep, D, win, ctx_lo, fad_lo, m_e, scale * LOG2E,
            HAS_FADING=has_fading, HAS_MEM=has_mem, HAS_VALID=mv is not None, SEP_QF=qf is not None, PREC=prec,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, BLOCK_D=BD, num_warps=warps, num_stages=2,
        )
        ctx.save_for_backward(q, k, v, kf, vf, km, vm, mv, o, lse, qf)
        ctx.cfg = (window, win, ctx_lo, fad_lo, has_fading, has_mem, scale, m_e)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, kf, vf, km, vm, mv, o, lse, qf = ctx.saved_tensors
        window, win, ctx_lo, fad_lo, has_fading, has_mem, scale, m_e = ctx.cfg
        b, T, Hq, D = q.shape
        Hkv = k.shape[2]
        n_rep = Hq // Hkv
        if do is None:
            do = torch.zeros_like(o)
        do = _last_contig(do)
        delta = (o.float() * do.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()  # d lse / d score = p, folded into ds = p * (dp - delta)
        delta = delta.contiguous()
        BM, BN, BE, warps = _blocks(D, m_e, bwd=True)
        BD = max(16, next_pow2(D))
        prec = _dot_precision(q.dtype)
        qk_scale = scale * LOG2E
        need = ctx.needs_input_grad
        dq = dk = dv = dkf = dvf = dkm = dvm = dqf = None
        sep_qf = qf is not None
        if need[0] or (sep_qf and need[11]):
            # dq (and dq_fading): large query blocks, small key blocks (the transpose of the dk/dv tiling)
            dq = torch.empty_like(q)
            dqf = torch.empty_like(qf) if sep_qf else None
            _bmojo_attn_bwd_dq_kernel[(triton.cdiv(T, BN), b * Hq)](
                q, k, v, kf, vf, km, vm, mv, do, lse, delta, dq, qf, dqf,
                q.stride(0), q.stride(1), q.stride(2), *_kv_strides(qf), *_kv_strides(dqf),
                *_kv_strides(k), *_kv_strides(v), *_kv_strides(kf), *_kv_strides(vf), *_mem_strides(km, vm, mv),
                do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
                T, Hq, n_rep, D, win, ctx_lo, fad_lo, m_e, qk_scale, scale,
                HAS_FADING=has_fading, HAS_MEM=has_mem, HAS_VALID=mv is not None, SEP_QF=sep_qf, PREC=prec,
                BLOCK_M=BN, BLOCK_N=BM, BLOCK_E=BE, BLOCK_D=BD, num_warps=warps, num_stages=2,
            )
            dq = dq if need[0] else None

        def band(qq, kk, vv, LO, HI):
            dk = torch.empty(kk.shape, dtype=kk.dtype, device=kk.device)
            dv = torch.empty(vv.shape, dtype=vv.dtype, device=vv.device)
            _bmojo_attn_bwd_dkdv_band_kernel[(triton.cdiv(T, BN), b * Hkv)](
                qq, kk, vv, do, lse, delta, dk, dv,
                qq.stride(0), qq.stride(1), qq.stride(2), *_kv_strides(kk), *_kv_strides(vv),
                do.stride(0), do.stride(1), do.stride(2),
                T, Hq, Hkv, n_rep, D, LO, HI, qk_scale, scale,
                PREC=prec, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=2,
            )
            return dk, dv

        if need[1] or need[2]:
            dk, dv = band(q, k, v, ctx_lo, 0)
        if has_fading and (need[3] or need[4]):
            dkf, dvf = band(qf if sep_qf else q, kf, vf, fad_lo, window)
        if has_mem and (need[5] or need[6]):
            n_chunks = km.shape[1]
            dkm = torch.empty(km.shape, dtype=km.dtype, device=km.device)
            dvm = torch.empty(vm.shape, dtype=vm.dtype, device=vm.device)
            _bmojo_attn_bwd_dkdv_memory_kernel[(n_chunks * triton.cdiv(m_e, BE), b * Hkv)](
                q, km, vm, mv, do, lse, delta, dkm, dvm,
                q.stride(0), q.stride(1), q.stride(2), *_mem_strides(km, vm, mv), do.stride(0), do.stride(1), do.stride(2),
                T, Hq, Hkv, n_rep, D, win, n_chunks, m_e, qk_scale, scale,
                HAS_VALID=mv is not None, PREC=prec, BLOCK_M=BM, BLOCK_E=BE, BLOCK_D=BD, num_warps=warps, num_stages=2,
            )
        extra = [g if g is not None else (torch.zeros_like(u) if u is not None and need[i] else None)
                 for i, g, u in zip((3, 4, 5, 6, 11), (dkf, dvf, dkm, dvm, dqf), ctx.unused)]
        return (dq, dk, dv, *extra[:4], None, None, None, None, extra[4])


def bmojo_attention(q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                    v_memory=None, memory_valid=None, scale=None, return_lse=False, q_fading=None):
    """Same contract as :func:`bmojo.ops.bmojo_attention` without ``q_start`` (o in q's dtype, lse (b, T, Hq)
    fp32), with ``q_fading``: calls with keys before the queries go to the torch backend
    (``registry.resolve_resuming``)."""
    b, T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    m_f = None
    if window is not None and k_fading is not None:
        m_f = window if fading_window is None else int(fading_window)
    if T == 0:
        o = q.new_empty(b, 0, Hq, D)
        return (o, q.new_empty(b, 0, Hq, dtype=torch.float32)) if return_lse else o
    use_fading = m_f is not None
    if q_fading is not None and not use_fading:
        raise ValueError("bmojo_attention: q_fading scores the fading keys; it needs k_fading and a window "
                         "(full causal attention has no fading keys)")
    use_mem = k_memory is not None and window is not None
    o, lse = BMojoAttentionFn.apply(
        q, k, v,
        k_fading if use_fading else None, v_fading if use_fading else None,
        k_memory if use_mem else None, v_memory if use_mem else None, memory_valid if use_mem else None,
        window, m_f if use_fading else 0, scale, q_fading,
    )
    return (o, lse) if return_lse else o


bmojo_attention.fading_query = True  # takes q_fading (bmojo.ops.registry.ATTENTION_CAPABILITIES); not q_start
