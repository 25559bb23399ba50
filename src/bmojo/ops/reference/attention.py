"""Oracle of B'MOJO attention: one softmax over in-context, fading and memory keys (docs/design.md, "The
layer", step 5), and of the decoding step's attention over a cache.

It materialises every score, so it is the oracle, not a kernel; it shares no code with any backend. Visibility is stated in positions:
query j is at position ``q_start + j``; key i of ``k`` at ``q_start - (len(k) - T) + i`` (keys may
precede the queries: a decoding state's window resumed with new tokens), fading key i at
``q_start - (len(k_fading) - T) + i``; keys at negative positions do not exist.

Fading keys may be scored with their own queries (``q_fading``, like q: the authors' B'MOJO-F checkpoints
project them with a separate ``q_proj_``); every other key is scored with q, all in one softmax.
"""
from __future__ import annotations

import math

import torch


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def bmojo_visibility_masks(
    T: int,
    window: int | None,
    fading_window: int | None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (T, T) masks [query t, key s] from position 0: in-context (t-w < s <= t, or s <= t when
    window is None) and fading (t-w-m_f < s <= t-w; all False when there is no window)."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(T, device=device)[None, :]
    causal = s <= t
    if window is None:
        return causal, torch.zeros_like(causal)
    in_context = causal & (s > t - window)
    m_f = window if fading_window is None else fading_window
    fading = (s <= t - window) & (s > t - window - m_f)
    return in_context, fading


def _scores_ref(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale,
                q_start=None, q_fading=None):
    """Masked scaled scores (b, Hq, T, S) fp32 over [in-context | fading | memory chunks * m_e] keys
    (the last two present only when given; the fading ones scored with ``q_fading`` when given, else q),
    and the matching values (b, S, Hq, D) fp32."""
    if q_fading is not None and (k_fading is None or window is None):
        raise ValueError("bmojo_attention_ref: q_fading scores the fading keys; it needs k_fading and a window")
    if q_fading is not None and q_fading.shape != q.shape:
        raise ValueError(f"bmojo_attention_ref: q_fading must be shaped like q {tuple(q.shape)}, got {tuple(q_fading.shape)}")
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    n_rep = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    device = q.device
    start = torch.zeros(b, dtype=torch.long, device=device) if q_start is None else q_start.to(device)
    t = start[:, None] + torch.arange(T, device=device)[None, :]  # (b, T) query positions

    def key_positions(n):  # (b, n)
        return start[:, None] - (n - T) + torch.arange(n, device=device)[None, :]

    s = key_positions(k.shape[1])[:, None, :]  # (b, 1, Tk)
    tq = t[:, :, None]
    in_ctx = (s <= tq) & (s >= 0)
    if window is not None:
        in_ctx &= s > tq - window
    keys, values, masks, queries = [k], [v], [in_ctx], [q]
    if k_fading is not None and window is not None:
        m_f = window if fading_window is None else fading_window
        sf = key_positions(k_fading.shape[1])[:, None, :]
        queries.append(q if q_fading is None else q_fading)
        keys.append(k_fading)
        values.append(v_fading)
        masks.append((sf <= tq - window) & (sf > tq - window - m_f) & (sf >= 0))
    if k_memory is not None and window is not None:
        n_chunks, m_e = k_memory.shape[1], k_memory.shape[2]
        # memory chunk c is the c-th from the first query's: query t sees chunk t // w - q_start // w
        chunk_of_query = torch.div(t, window, rounding_mode="floor") - torch.div(start, window, rounding_mode="floor")[:, None]
        mem_mask = chunk_of_query[:, :, None] == torch.arange(n_chunks, device=device)[None, None, :]  # (b, T, C)
        valid = torch.ones(b, n_chunks, m_e, dtype=torch.bool, device=device) if memory_valid is None else memory_valid
        mem_mask = mem_mask[..., None] & valid[:, None, :, :]
        queries.append(q)
        keys.append(k_memory.reshape(b, n_chunks * m_e, Hkv, D))
        values.append(v_memory.reshape(b, n_chunks * m_e, Hkv, D))
        masks.append(mem_mask.reshape(b, T, n_chunks * m_e))

    V = _repeat_kv(torch.cat(values, 1).float(), n_rep, 2)  # (b, S, Hq, D)
    mask = torch.cat(masks, -1)  # (b, T, S)
    # each key set scored with its own query (q, or q_fading for the fading keys)
    scores = torch.cat([torch.einsum("bthd,bshd->bhts", qi.float(), _repeat_kv(ki.float(), n_rep, 2))
                        for qi, ki in zip(queries, keys)], -1) * scale
    return scores.masked_fill(~mask[:, None], float("-inf")), V


def bmojo_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    k_fading: torch.Tensor | None = None,
    v_fading: torch.Tensor | None = None,
    fading_window: int | None = None,
    k_memory: torch.Tensor | None = None,
    v_memory: torch.Tensor | None = None,
    memory_valid: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    q_start: torch.Tensor | None = None,
    q_fading: torch.Tensor | None = None,
):
    """q (b, T, Hq, D); k, v (b, Tk, Hkv, D) and k_fading, v_fading (b, Tf, Hkv, D) with Tk, Tf >= T;
    k_memory, v_memory (b, chunks, m_e, Hkv, D) with memory_valid (b, chunks, m_e) bool; q_start (b,)
    int64 (default 0); q_fading (b, T, Hq, D) like q, the queries of the fading keys (default q; needs
    fading keys).

    Query t (position q_start + j) sees k[s] for t-w < s <= t, k_fading[s] for t-w-m_f < s <= t-w, and
    the valid memory slots of chunk t // w (positions as in the module docstring; memory chunk c is
    the chunk q_start // w + c). Returns o (b, T, Hq, D) in q's dtype and, if asked, the natural-log
    log-sum-exp of the scaled scores (b, T, Hq) in fp32.
    """
    scores, V = _scores_ref(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid,
                            scale, q_start, q_fading)
    lse = torch.logsumexp(scores, dim=-1)  # (b, Hq, T)
    p = torch.exp(scores - lse[..., None])
    o = torch.einsum("bhts,bshd->bthd", p, V).to(q.dtype)
    return (o, lse.transpose(1, 2).contiguous()) if return_lse else o


def bmojo_attention_weights_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    k_fading: torch.Tensor | None = None,
    v_fading: torch.Tensor | None = None,
    fading_window: int | None = None,
    k_memory: torch.Tensor | None = None,
    v_memory: torch.Tensor | None = None,
    memory_valid: torch.Tensor | None = None,
    memory_positions: torch.Tensor | None = None,
    scale: float | None = None,
    q_fading: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``bmojo_attention_ref``'s output and its attention weights per source position (from position 0;
    ``q_fading`` as there).

    weights[b, h, t, s] (b, Hq, T, T) fp32 is the probability mass query t puts on keys built from
    position s: its in-context key, its fading key and any memory slot holding it
    (``memory_positions`` (b, chunks, m_e), needed with memory keys). Each row sums to 1."""
    b, T, Hq, _ = q.shape
    scores, V = _scores_ref(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid,
                            scale, q_fading=q_fading)
    p = torch.softmax(scores, dim=-1)  # (b, Hq, T, S)
    o = torch.einsum("bhts,bshd->bthd", p, V).to(q.dtype)
    weights = p[..., :T].clone()
    n = T
    if k_fading is not None and window is not None:
        weights += p[..., T : 2 * T]
        n = 2 * T
    if k_memory is not None and window is not None:
        if memory_positions is None:
            raise ValueError("bmojo_attention_weights_ref: memory keys need memory_positions to map slots to positions")
        m_e = k_memory.shape[2]
        chunk_of_query = torch.arange(T, device=q.device) // window
        # query t reads the slots of its chunk: index[b, t, j] = position held by slot j of chunk t // w
        index = memory_positions[:, chunk_of_query].reshape(b, 1, T, m_e).expand(b, Hq, T, m_e)
        slot_p = p[..., n:].reshape(b, Hq, T, -1, m_e)  # (b, Hq, T, chunks, m_e): only chunk t // w is nonzero
        weights.scatter_add_(-1, index, slot_p.sum(3))
    return o, weights


def attention_decode_ref(
    q: torch.Tensor | tuple[torch.Tensor, ...],
    k: torch.Tensor | tuple[torch.Tensor, ...],
    v: torch.Tensor | tuple[torch.Tensor, ...],
    valid: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new query per row over a set of cached keys (the decoding step).

    q (b, Hq, D); k, v (b, S, Hkv, D); valid (b, S) bool. k, v and valid may be tuples of segments
    (b, S_i, ...) forming the S keys in order, and q then a tuple of one query per segment (each segment's
    keys scored with its own query; one softmax over all). Returns (b, Hq, D) in the query's dtype.
    """
    return attention_decode_weights_ref(q, k, v, valid, scale)[0]


def attention_decode_weights_ref(
    q: torch.Tensor | tuple[torch.Tensor, ...],
    k: torch.Tensor | tuple[torch.Tensor, ...],
    v: torch.Tensor | tuple[torch.Tensor, ...],
    valid: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_decode_ref``'s output (b, Hq, D) and its probabilities over the S keys (b, Hq, S) fp32."""
    ks = tuple(k) if isinstance(k, (tuple, list)) else (k,)
    vs = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    qs = tuple(q) if isinstance(q, (tuple, list)) else (q,) * len(ks)
    if len(qs) != len(ks):
        raise ValueError(f"attention_decode_ref: {len(qs)} queries for {len(ks)} key segments")
    b, Hq, D = qs[0].shape
    n_rep = Hq // ks[0].shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    V = _repeat_kv(torch.cat(vs, 1).float(), n_rep, 2)
    scores = torch.cat([torch.einsum("bhd,bshd->bhs", qi.float(), _repeat_kv(ki.float(), n_rep, 2))
                        for qi, ki in zip(qs, ks)], -1) * scale
    if valid is not None:
        mask = torch.cat(tuple(valid), 1) if isinstance(valid, (tuple, list)) else valid
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhs,bshd->bhd", p, V).to(qs[0].dtype), p
