"""Attention of one new query per row over cached keys (the decoding step), in Triton (the whole-sequence
attention is ``parallel.py``)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import NO_BACKWARD, needs_grad, next_pow2, torch_fallback


@triton.jit
def _attn_decode_kernel(
    Q, K, V, VALID, O, S, Hq, n_rep, D, scale,
    sq_b, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sva_b, so_b, so_h,
    HAS_VALID: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    h = pid % Hq
    hk = h // n_rep
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_d, mask=mask_d, other=0.0).to(tl.float32) * (scale * 1.4426950408889634)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_i = tl.sum(acc, axis=0)  # fp32 scalars with the loop's types
    m_i = l_i - 1.0e30
    for start in range(0, S, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        if HAS_VALID:
            mask_s = mask_s & (tl.load(VALID + b * sva_b + offs_s, mask=mask_s, other=0) != 0)
        m2 = mask_s[:, None] & mask_d[None, :]
        k = tl.load(K + b * sk_b + hk * sk_h + offs_s[:, None] * sk_s + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(V + b * sv_b + hk * sv_h + offs_s[:, None] * sv_s + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.where(mask_s, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    # a row with no valid key gives NaN, like the reference's softmax over all -inf
    o = acc / l_i
    tl.store(O + b * so_b + h * so_h + offs_d, o.to(O.dtype.element_ty), mask=mask_d)


def attention_decode(q, k, v, valid=None, scale=None):
    """Same contract as :func:`bmojo.ops.attention_decode` (one cache, not segments, one query: calls with a
    query per segment go to the torch backend, ``segment_queries`` being unset). A decoding step
    without a backward: when autograd needs gradients of q, k or v it runs the torch backend's decode
    step instead, with a one-time warning."""
    if needs_grad(q, k, v):
        return torch_fallback("attention_decode", q.device, NO_BACKWARD)(q, k, v, valid, scale)
    b, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    va = None
    if valid is not None:
        va = valid.to(torch.int8) if valid.dtype == torch.bool else (valid != 0).to(torch.int8)
    o = torch.empty(b, Hq, D, dtype=q.dtype, device=q.device)
    BD = next_pow2(D)
    BS = min(128, max(16, next_pow2(S)), max(16, 8192 // BD))
    _attn_decode_kernel[(b * Hq,)](
        q, k, v, va, o, S, Hq, Hq // Hkv, D, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        va.stride(0) if va is not None else 0, o.stride(0), o.stride(1),
        HAS_VALID=va is not None, BLOCK_S=BS, BLOCK_D=BD, num_warps=4,
    )
    return o
