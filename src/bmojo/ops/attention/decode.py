"""One decoding step of attention for the torch backend: a query per row over its cached keys.

The reference repeats every kv head ``Hq / Hkv`` times (a copy of the whole cache per step, which
dominates decoding with a long full-attention cache). Here the ``R = Hq / Hkv`` query heads of a group
are stacked as rows of one matrix and multiplied with the kv head's keys read through a permuted
*view* of the cache: no repeat, and with batch 1 no copy of the cache at all.
"""
from __future__ import annotations

import math

import torch


def attention_decode_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as ``attention_decode_ref``: q (b, Hq, D); k, v (b, S, Hkv, D); valid (b, S) bool.
    Returns (b, Hq, D) in q's dtype; scores and softmax in fp32."""
    b, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.float().view(b, Hkv, R, D)
    scores = torch.matmul(qg, k.float().permute(0, 2, 3, 1))  # (b, Hkv, R, S)
    scores.mul_(scale)
    if valid is not None:
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.matmul(p, v.float().permute(0, 2, 1, 3))  # (b, Hkv, R, D)
    return o.reshape(b, Hq, D).to(q.dtype)
