"""One decoding step of attention for the torch backend: a query per row over its cached keys (the
whole-sequence attention is ``parallel.py``).

The reference repeats every kv head ``Hq / Hkv`` times (a copy of the whole cache per step, which
dominates decoding with a long full-attention cache). Here the ``R = Hq / Hkv`` query heads of a group
are stacked as rows of one matrix and multiplied with the kv head's keys read through a permuted
*view* of the cache: no repeat, and with batch 1 no copy of the cache at all. A cache held in segments
(window ring, fading ring, memory slots) is read segment by segment, never concatenated: only the small
score rows are. Each segment may come with its own query (the fading ring read with the fading query).
"""
from __future__ import annotations

import math

import torch


def attention_decode_torch(
    q: torch.Tensor | tuple[torch.Tensor, ...],
    k: torch.Tensor | tuple[torch.Tensor, ...],
    v: torch.Tensor | tuple[torch.Tensor, ...],
    valid: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as ``attention_decode_ref``: q (b, Hq, D); k, v (b, S, Hkv, D); valid (b, S) bool,
    or tuples of segments (b, S_i, ...) forming the S keys in order, with q then possibly a tuple of one
    query (b, Hq, D) per segment. Returns (b, Hq, D) in q's dtype; scores and softmax in fp32."""
    ks, vs = (k, v) if isinstance(k, (tuple, list)) else ((k,), (v,))
    qs = tuple(q) if isinstance(q, (tuple, list)) else (q,)
    b, Hq, D = qs[0].shape
    Hkv = ks[0].shape[2]
    R = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # compiled on CPU, a product with one query row (R = 1) becomes inductor's mul + sum loop: faster than BLAS
    # over a 512-key window and over a 16K cache alike (11 vs 28 ms a transformer step at 16K), as long as the
    # query is a buffer, not recomputed per key (see layers.common.as_buffer)
    qg = [qi.float().reshape(b, Hkv, R, D) for qi in qs]
    if len(qg) == 1:
        qg = qg * len(ks)
    parts = [torch.matmul(qi, ki.float().permute(0, 2, 3, 1)) for qi, ki in zip(qg, ks)]  # (b, Hkv, R, S_i)
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    scores.mul_(scale)
    if valid is not None:
        mask = valid if torch.is_tensor(valid) else (valid[0] if len(valid) == 1 else torch.cat(tuple(valid), 1))
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o, start = None, 0
    for vi in vs:
        n = vi.shape[1]
        term = torch.matmul(p[..., start : start + n], vi.float().permute(0, 2, 1, 3))  # (b, Hkv, R, D)
        o = term if o is None else o.add_(term)
        start += n
    return o.reshape(b, Hq, D).to(qs[0].dtype)


attention_decode_torch.segments = True  # reads a cache held in segments in place
attention_decode_torch.segment_queries = True  # takes one query per segment
