"""Block-sparse B'MOJO attention for the torch backend: O(T (w + m_f + m_e)) time and memory.

Queries are cut into blocks of ``Bq`` positions (a divisor of the window when one is handy, so a block
lies in one memory chunk). Each block gathers only what its queries can see:

* in-context keys: the ``ceil((w-1)/Bq)`` key blocks before it and its own block (``unfold`` on the
  block axis, then one copy);
* fading keys: the same band on ``k_fading`` shifted right by ``w`` (query t sees ``kf[s]`` for
  ``t-w-m_f < s <= t-w``, i.e. the band ``(t-m_f, t]`` of the shifted sequence);
* memory keys: the ``m_e`` slots of every chunk the block touches (one chunk when ``Bq | w``).

A small boolean mask (blocks, Bq, keys) carves out the exact visibility, and one fp32 softmax runs over
the union, exactly like the reference. Grouped-query heads share their kv head's gathered keys: the
``Hq / Hkv`` query heads of a group are stacked as extra query rows, so keys are never repeated.
Full causal attention (``window=None``) goes to ``scaled_dot_product_attention(is_causal=True)``, or, when
the log-sum-exp is wanted, to a loop over query blocks with exact scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_BLOCK = 64  # query block target: 32..128 measured within ~20% at w=128 on CPU


def _pick_block(window: int, target: int) -> int:
    """A query block size: the window itself when small, else a divisor of the window near ``target``
    (largest in [target/2, target], else smallest in (target, 2*target]), else ``target`` (blocks may
    then straddle two memory chunks, which the gather handles)."""
    if window <= target:
        return window
    for cand in range(target, max(target // 2, 2) - 1, -1):
        if window % cand == 0:
            return cand
    for cand in range(target + 1, min(2 * target, window) + 1):
        if window % cand == 0:
            return cand
    return target


def _band(kv: tuple[torch.Tensor, torch.Tensor], span: int, shift: int, n_blk: int, Bq: int):
    """Gather, for every query block, the keys of a causal band of width ``span`` on a sequence
    shifted right by ``shift``.

    kv: k, v (b, Hkv, T, D) fp32. Query t sees position p of the shifted sequence (``x_s[p] =
    x[p - shift]``) iff ``t - span < p <= t`` and ``p >= shift``. Returns K, V (b, Hkv, n_blk, S, D)
    and the mask (n_blk, Bq, S) bool, or None when nothing can be visible.
    """
    T = kv[0].shape[2]
    device = kv[0].device
    nb = min(-(-(span - 1) // Bq), n_blk - 1)  # key blocks before the query's own block
    total = (nb + n_blk) * Bq  # padded index j <-> shifted position j - nb*Bq
    front = nb * Bq + shift
    if front >= total:
        return None
    keep = min(T, total - front)
    out = []
    for x in kv:
        xp = F.pad(x[:, :, :keep], (0, 0, front, total - front - keep))  # (b, H, total, D)
        xb = xp.view(x.shape[0], x.shape[1], nb + n_blk, Bq, x.shape[3])
        # block i sees padded blocks i..i+nb; static slices (not Tensor.unfold, which XLA runs on the host)
        xb = torch.stack([xb[:, :, o : o + n_blk] for o in range(nb + 1)], dim=3)  # (b, H, n_blk, nb+1, Bq, D)
        out.append(xb.reshape(x.shape[0], x.shape[1], n_blk, (nb + 1) * Bq, x.shape[3]))
    S = (nb + 1) * Bq
    j = torch.arange(S, device=device)
    r = torch.arange(Bq, device=device)
    rel = j[None, :] - nb * Bq - r[:, None]  # key position minus query position, same for every block
    band = (rel <= 0) & (rel > -span)  # (Bq, S)
    pos = torch.arange(n_blk, device=device)[:, None] * Bq + j[None, :] - nb * Bq  # shifted key position
    mask = band[None] & (pos >= shift)[:, None, :]
    return out[0], out[1], mask


def _full_causal(q, k, v, scale, return_lse, block: int = 128):
    """window=None: plain causal attention in fp32. q (b, T, Hq, D); k, v (b, T, Hkv, D)."""
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))  # (b, H, T, D)
    if not return_lse:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=R > 1)
        return o.transpose(1, 2).to(q.dtype).contiguous()
    # lse wanted: exact scores, one query block at a time (memory O(block * T) per step)
    qg = qt.reshape(b, Hkv, R, T, D)
    outs, lses = [], []
    for s in range(0, T, block):
        e = min(s + block, T)
        sc = torch.matmul(qg[:, :, :, s:e], kt[:, :, None, :e].transpose(-1, -2)) * scale  # (b, Hkv, R, n, e)
        causal = torch.arange(e, device=q.device)[None, :] <= torch.arange(s, e, device=q.device)[:, None]
        sc = sc.masked_fill(~causal, float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)
        outs.append(torch.matmul(torch.exp(sc - lse[..., None]), vt[:, :, None, :e]))
        lses.append(lse)
    o = torch.cat(outs, 3).reshape(b, Hq, T, D).transpose(1, 2).to(q.dtype).contiguous()
    return o, torch.cat(lses, 3).reshape(b, Hq, T).transpose(1, 2).contiguous()


def bmojo_attention_blocksparse(
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
    block_size: int = DEFAULT_BLOCK,
):
    """Same contract as ``bmojo_attention_ref``.

    q (b, T, Hq, D); k, v, k_fading, v_fading (b, T, Hkv, D); k_memory, v_memory
    (b, ceil(T/w), m_e, Hkv, D); memory_valid (b, ceil(T/w), m_e) bool (None: all valid). Query t sees
    k[s] for t-w < s <= t, k_fading[s] for t-w-m_f < s <= t-w, and the valid slots of chunk t // w.
    Returns o (b, T, Hq, D) in q's dtype and, if asked, the natural-log lse (b, T, Hq) fp32.
    """
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if T == 0:
        o = q.new_empty(b, 0, Hq, D)
        return (o, q.new_empty(b, 0, Hq, dtype=torch.float32)) if return_lse else o
    if window is None:
        return _full_causal(q, k, v, scale, return_lse)

    w = window
    m_f = w if fading_window is None else fading_window
    Bq = _pick_block(w, block_size)
    n_blk = -(-T // Bq)
    Tp = n_blk * Bq
    device = q.device

    # queries (b, Hkv, n_blk, R*Bq, D): the R query heads of a kv head are stacked as rows
    qf = F.pad(q.float(), (0, 0, 0, 0, 0, Tp - T))
    qb = qf.view(b, n_blk, Bq, Hkv, R, D).permute(0, 3, 1, 4, 2, 5).reshape(b, Hkv, n_blk, R * Bq, D)

    keys, values, masks = [], [], []
    bands = [((k, v), w, 0)]
    if k_fading is not None and m_f > 0:
        bands.append(((k_fading, v_fading), m_f, w))
    for (kk, vv), span, shift in bands:
        got = _band((kk.float().transpose(1, 2), vv.float().transpose(1, 2)), span, shift, n_blk, Bq)
        if got is not None:
            keys.append(got[0])
            values.append(got[1])
            masks.append(got[2][None].expand(b, -1, -1, -1))

    if k_memory is not None:
        n_chunks, m_e = k_memory.shape[1], k_memory.shape[2]
        blk_start = torch.arange(n_blk, device=device) * Bq
        c_lo = blk_start // w
        n_span = max((s + Bq - 1) // w - s // w for s in range(0, Tp, Bq)) + 1  # chunks one block touches
        cid = c_lo[:, None] + torch.arange(n_span, device=device)[None, :]  # (n_blk, n_span)
        cid_c = cid.clamp(max=n_chunks - 1)
        km = k_memory.float()[:, cid_c]  # (b, n_blk, n_span, m_e, Hkv, D)
        vm = v_memory.float()[:, cid_c]
        keys.append(km.permute(0, 4, 1, 2, 3, 5).reshape(b, Hkv, n_blk, n_span * m_e, D))
        values.append(vm.permute(0, 4, 1, 2, 3, 5).reshape(b, Hkv, n_blk, n_span * m_e, D))
        t_chunk = (blk_start[:, None] + torch.arange(Bq, device=device)[None, :]) // w  # (n_blk, Bq)
        same = t_chunk[:, :, None] == cid[:, None, :]  # (n_blk, Bq, n_span)
        valid = (torch.ones(b, n_chunks, m_e, dtype=torch.bool, device=device) if memory_valid is None
                 else memory_valid.bool())[:, cid_c] & (cid < n_chunks)[None, :, :, None]  # (b, n_blk, n_span, m_e)
        masks.append((same[None, :, :, :, None] & valid[:, :, None]).reshape(b, n_blk, Bq, n_span * m_e))

    K = torch.cat(keys, 3) if len(keys) > 1 else keys[0]  # (b, Hkv, n_blk, S, D)
    V = torch.cat(values, 3) if len(values) > 1 else values[0]
    mask = torch.cat(masks, -1) if len(masks) > 1 else masks[0]  # (b, n_blk, Bq, S)
    S = K.shape[3]

    scores = torch.matmul(qb, K.transpose(-1, -2)).mul_(scale).view(b, Hkv, n_blk, R, Bq, S)
    scores = scores.masked_fill(~mask[:, None, :, None], float("-inf"))
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)  # (b, Hkv, n_blk, R, Bq)
        p = torch.exp(scores - lse[..., None])
    else:
        p = torch.softmax(scores, dim=-1)
    o = torch.matmul(p.view(b, Hkv, n_blk, R * Bq, S), V)  # (b, Hkv, n_blk, R*Bq, D)
    # contiguous like the reference, so callers may .view() it
    o = o.view(b, Hkv, n_blk, R, Bq, D).permute(0, 2, 4, 1, 3, 5).reshape(b, Tp, Hq, D)[:, :T].to(q.dtype).contiguous()
    if not return_lse:
        return o
    lse = lse.permute(0, 2, 4, 1, 3).reshape(b, Tp, Hq)[:, :T].contiguous()
    return o, lse
