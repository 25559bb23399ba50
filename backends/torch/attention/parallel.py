"""Block-sparse B'MOJO attention for the torch backend: O(T (w + m_f + m_e)) time and memory (the decoding
step over a cache is ``decode.py``).

Queries are cut into blocks of ``Bq`` positions (a divisor of the window when one is handy, so a block
lies in one memory chunk). Each block attends to what its queries can see:

* in-context keys: the ``nb = ceil((w-1)/Bq)`` key blocks before it and its own block;
* fading keys: the same band on ``k_fading`` shifted right by ``w`` (query t sees ``kf[s]`` for
  ``t-w-m_f < s <= t-w``, i.e. the band ``(t-m_f, t]`` of the shifted sequence);
* memory keys: the ``m_e`` slots of every chunk the block touches (one chunk when ``Bq | w``).

Keys are never gathered per block. Every (batch row, kv head) pair is a *segment*: its keys are laid
out block by block, segments back to back, in one (rows, D) fp32 buffer with ``P`` zero blocks in front
(fading keys likewise, shifted right by ``w`` inside each segment). The band of query block ``g`` is then
the contiguous row range ``[(g - nb) Bq, (g + 1) Bq)`` of that buffer, so ``unfold(0, (nb+1) Bq, Bq)``
is an overlapping *view* holding every block's band, and one ``bmm`` computes the band's scores of
all blocks with no copy (a band reaching before its segment's start reads the previous segment's keys,
which the visibility mask removes). Grouped-query heads share their kv head's keys: the ``Hq / Hkv``
query heads of a group are stacked as extra query rows.

Scores (window | fading | memory) go to one fp32 tensor per group of query blocks (at most
``SCORE_BUDGET`` bytes, so inference memory is O(T) with a small constant), then: an additive ``-inf``
bias on the partially visible edge column blocks of each band (the same for every block), ``-inf``
fills on the few blocks at a segment's start whose band reaches before position 0 (or before the
first fading key), the memory validity bias, one fp32 softmax over the union exactly like the
reference, and ``o = P_window V_window + P_fading V_fading + P_memory V_memory`` with ``bmm`` /
``baddbmm`` on views. When they hold enough work, the blocks at a segment's start that see no fading
key at all form groups without the fading band. With ``q_fading`` (the fading keys' own queries) the
fading band's scores come from its query blocks instead of q's; nothing else changes (every path).

Inference (no input requires grad) reuses one score buffer, writes ``bmm`` results straight into it,
masks in place, and runs the softmax as in-place ``amax`` / ``exp2`` (scores in log2 units) with the
normalisation applied to the output. Under autograd the scores are concatenated, the mask is one
added bias tensor and the softmax is ``torch.softmax`` (or ``logsumexp`` + ``exp`` for the lse), so
every gradient is autograd's through plain torch ops.

Full causal attention (``window=None``) goes to ``scaled_dot_product_attention(is_causal=True)``, or, when
the log-sum-exp is wanted, to a loop over query blocks with exact scores.

Two entry points, registered per device type in ``bmojo.backends.torch.OPS``:
:func:`bmojo_attention_blocksparse` runs the banded kernel above (CPU, CUDA: cheap overlapping views);
:func:`bmojo_attention_gathered` runs the gathering kernel (:func:`_gathered`: every query block copies
the key blocks it sees), for the other devices (XLA / Neuron run ``unfold`` on the host).

A symbolic T (``torch.export`` with a dynamic T, see :func:`_traceable`) takes
:func:`_traceable_attention` instead: the gathering kernel's form with every count static (band widths
without clamps, the chunks a block spans fixed at 1 or 2, padding instead of early exits), so nothing
branches or loops on T.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..utils import first_rows as _first
from ..utils import traceable as _traceable

DEFAULT_BLOCK = 64  # query block target: 64 and 128 within a few % at w=512 on CPU; 64 wastes less of the band
SCORE_BUDGET = 4 * 2**20  # bytes of fp32 scores per group of query blocks: 4 MiB measured best of 2..64 MiB (cache)
# full attention after a cache: query blocks of this many, each over the keys it can see (the masked corner
# past a block's last query is not computed); at 512 after 512, 256 ran ~10 % faster than one masked call
FULL_RESUME_BLOCK = 256
HEAD_SPLIT_WORK = 2**22  # multiply-adds of fading band in a segment's fading-free head worth its own groups
_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)


def _pick_block(window: int, target: int) -> int:
    """A query block size: the window itself when small, else a divisor of the window near ``target``
    (largest in [target/2, target], else smallest in (target, 2*target]), else ``target`` (blocks may
    then straddle two memory chunks, which the memory band handles)."""
    if window <= target:
        return window
    for cand in range(target, max(target // 2, 2) - 1, -1):
        if window % cand == 0:
            return cand
    for cand in range(target + 1, min(2 * target, window) + 1):
        if window % cand == 0:
            return cand
    return target


def _key_major(x: torch.Tensor) -> torch.Tensor:
    """x with its last two dims stored transposed (same values): a bias laid out like the key-major scores
    it is added to (see the inference path of :func:`_banded`)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _edge_biases(span: int, nbx: int, Bq: int, device: torch.device,
                 key_major: bool = False) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """The column blocks of a band that are only partly visible, with their additive bias (Bq, Bq).

    A band has ``Bq`` query rows and ``(nbx+1) Bq`` key columns; column c of query block j is position
    ``(j - nbx) Bq + c`` and row r is ``j Bq + r``, so whether key - query lies in ``(-span, 0]`` is the
    same for every block. Returns (first column, last column + 1, bias with 0 / -inf) per partial block.
    Which blocks are partial is decided in Python, so tracing sees constants, not a data-dependent branch;
    the biases are cached in eager mode only (a cache must not keep tensors created while tracing).
    ``key_major``: each bias stored transposed (same values), to be added to key-major scores.
    """
    if torch.compiler.is_compiling():
        return _make_edge_biases(span, nbx, Bq, device, key_major)
    return _cached_edge_biases(span, nbx, Bq, device, key_major)


def _make_edge_biases(span: int, nbx: int, Bq: int, device: torch.device, key_major: bool = False):
    out = []
    for kb in range(nbx + 1):
        # key - query over the block ranges over [(kb - nbx) Bq - (Bq - 1), (kb - nbx) Bq + (Bq - 1)]
        if (kb - nbx) * Bq - (Bq - 1) > -span and (kb - nbx) * Bq + (Bq - 1) <= 0:
            continue  # fully visible
        rel = torch.arange(kb * Bq, (kb + 1) * Bq, device=device)[None, :] - nbx * Bq - torch.arange(Bq, device=device)[:, None]
        visible = (rel <= 0) & (rel > -span)
        bias = torch.zeros(Bq, Bq, device=device).masked_fill_(~visible, float("-inf"))
        out.append((kb * Bq, (kb + 1) * Bq, _key_major(bias) if key_major else bias))
    return tuple(out)


_cached_edge_biases = functools.lru_cache(maxsize=64)(_make_edge_biases)


def _segment_layout(x: torch.Tensor, shift: int, front_rows: int, Tp: int) -> torch.Tensor:
    """x (b, T, H, D) -> (front_rows + b*H*Tp, D) fp32: ``front_rows`` zero rows, then one segment of
    ``Tp`` rows per (batch row, head) with ``x[s]`` at row ``shift + s`` (rows past ``Tp`` dropped, the
    rest zero). A copy of x, not of any band; differentiable (slice assignment)."""
    b, T, H, D = x.shape
    keep = min(T, Tp - shift)
    buf = torch.empty(front_rows + b * H * Tp, D, dtype=torch.float32, device=x.device)
    buf[:front_rows].zero_()
    seg = buf[front_rows:].view(b, H, Tp, D)
    if shift > 0:
        seg[:, :, :shift].zero_()
    if shift + keep < Tp:
        seg[:, :, shift + keep :].zero_()
    seg[:, :, shift : shift + keep] = x[:, :keep].transpose(1, 2)
    return buf


def _banded(q, k, v, w, k_fading, v_fading, m_f, k_memory, v_memory, memory_valid, scale, return_lse, Bq,
            budget, q_fading=None):
    """The kernel described in the module docstring (window is not None, T > 0); ``q_fading`` (like q)
    scores the fading band instead of q."""
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    RB = R * Bq
    device = q.device
    NEG = float("-inf")
    n_blk = -(-T // Bq)
    Tp = n_blk * Bq
    segs = b * Hkv
    Ntot = segs * n_blk
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, k_fading, v_fading, k_memory, v_memory, q_fading))

    nb = min(-(-(w - 1) // Bq), n_blk - 1)  # key blocks of the window band before the query's own
    Sw = (nb + 1) * Bq
    jf = min(n_blk, -(-(w - Bq + 1) // Bq))  # leading blocks of a segment that see no fading key
    fading = k_fading is not None and m_f > 0 and jf < n_blk  # some block sees a fading key
    if fading:
        nbf = min(-(-(m_f - 1) // Bq), n_blk - 1)
        Sf = (nbf + 1) * Bq
    else:
        nbf, Sf, jf = 0, 0, n_blk
    P = max(nb, nbf)  # zero blocks in front of the first segment

    # queries (Ntot, R*Bq, D), pre-scaled: segment (batch row, kv head), block, query head of the group, row
    def query_blocks(x):
        xf = x.float()
        if Tp != T:
            xf = F.pad(xf, (0, 0, 0, 0, 0, Tp - T))
        xb = xf.view(b, n_blk, Bq, Hkv, R, D).permute(0, 3, 1, 4, 2, 5)
        if grad:
            return (xb * scale).reshape(Ntot, RB, D)
        # scores in log2 units for exp2
        return torch.mul(xb, scale * _LOG2E, out=torch.empty(b, Hkv, n_blk, R, Bq, D, device=device)).view(Ntot, RB, D)

    qb = query_blocks(q)
    qbf = query_blocks(q_fading) if fading and q_fading is not None else qb  # the fading band's queries

    Kw = _segment_layout(k, 0, P * Bq, Tp)
    Vw = _segment_layout(v, 0, P * Bq, Tp)
    w_edges = _edge_biases(w, nb, Bq, device, key_major=not grad)
    if fading:
        Kf = _segment_layout(k_fading, w, P * Bq, Tp)
        Vf = _segment_layout(v_fading, w, P * Bq, Tp)
        f_edges = _edge_biases(m_f, nbf, Bq, device, key_major=not grad)

    def band(x, nbx, g0, g1):
        """(G, D, S) overlapping view: column c of block g is row (P - nbx + g) Bq + c of x."""
        S = (nbx + 1) * Bq
        r0 = (P - nbx + g0) * Bq
        return x[r0 : r0 + (g1 - g0 - 1) * Bq + S].unfold(0, S, Bq)

    Sm = 0
    if k_memory is not None:
        n_chunks, m_e = k_memory.shape[1], k_memory.shape[2]
        blk_start = torch.arange(n_blk) * Bq
        n_span = max((s + Bq - 1) // w - s // w for s in range(0, Tp, Bq)) + 1  # chunks one block touches
        cid = blk_start[:, None] // w + torch.arange(n_span)[None, :]  # (n_blk, n_span)
        cid_c = cid.clamp(max=n_chunks - 1).to(device)
        Sm = n_span * m_e
        # (Ntot, Sm, D): the slots of the chunks each block touches (a gather of T * m_e / Bq rows)
        Km = k_memory.float().permute(0, 3, 1, 2, 4)[:, :, cid_c].reshape(Ntot, Sm, D)
        Vm = v_memory.float().permute(0, 3, 1, 2, 4)[:, :, cid_c].reshape(Ntot, Sm, D)
        mem_bias = None
        if memory_valid is not None or n_span > 1:
            vis = (memory_valid.bool().to(device)[:, cid_c] if memory_valid is not None
                   else torch.ones(b, n_blk, n_span, m_e, dtype=torch.bool, device=device))
            vis = vis & (cid < n_chunks).to(device)[None, :, :, None]  # (b, n_blk, n_span, m_e)
            if n_span > 1:  # a block straddles chunks: row r sees the slots of its own chunk only
                t_chunk = (blk_start[:, None] + torch.arange(Bq)[None, :]) // w  # (n_blk, Bq)
                same = (t_chunk[:, :, None] == cid[:, None, :]).to(device)  # (n_blk, Bq, n_span)
                vis = (same[None, :, :, :, None] & vis[:, :, None]).reshape(b, n_blk, Bq, Sm)
            else:
                vis = vis.reshape(b, n_blk, 1, Sm)
            mem_bias = torch.zeros(vis.shape, device=device).masked_fill_(~vis, NEG)
            mem_bias = mem_bias[:, None].expand(b, Hkv, *vis.shape[1:])
            mem_bias = (mem_bias if grad else _key_major(mem_bias)).reshape(Ntot, 1, vis.shape[2], Sm)

    # groups of query blocks, each under the score budget. When a segment's leading fading-free blocks
    # hold enough work, they form groups without the fading band; else blocks are grouped as they come
    # (small problems: few groups, few ops).
    pieces = [[0, Ntot, fading]]
    if fading and jf * RB * Sf * D >= HEAD_SPLIT_WORK:
        pieces = []
        for s in range(segs):
            base = s * n_blk
            for lo, hi, fl in ((0, jf, False), (jf, n_blk, True)):
                if pieces and pieces[-1][2] == fl and pieces[-1][1] == base + lo:
                    pieces[-1][1] = base + hi
                else:
                    pieces.append([base + lo, base + hi, fl])
    groups = []
    for g0, g1, fl in pieces:
        S = Sw + (Sf if fl else 0) + Sm
        gmax = max(1, budget // (RB * S * 4))
        n = -(-(g1 - g0) // gmax)
        size = -(-(g1 - g0) // n)
        groups.extend((a, min(a + size, g1), fl, S) for a in range(g0, g1, size))
    # blocks j of a segment whose bands reach before its first key: window keys before position 0
    # (j < nb), fading keys before position 0, i.e. shifted positions < w (j < nbf + ceil(w / Bq))
    J = min(n_blk, max(nb, nbf + -(-w // Bq) if fading else 0))

    def mask_(x, g0, g1, has_f, S):
        """-inf where query rows may not see key columns; x (G, R or 1, Bq, S), in place."""
        mo = Sw + (Sf if has_f else 0)
        for c0, c1, bias in w_edges:
            x[..., c0:c1].add_(bias)
        if has_f:
            for c0, c1, bias in f_edges:
                x[..., Sw + c0 : Sw + c1].add_(bias)
        for j in range(J):  # block j of every segment in the group: one strided view
            s0, s1 = max(-(-(g0 - j) // n_blk), 0), (g1 - 1 - j) // n_blk
            if s1 < s0:
                continue
            rows = x[s0 * n_blk + j - g0 : s1 * n_blk + j - g0 + 1 : n_blk]
            if j < nb:
                rows[..., : (nb - j) * Bq].fill_(NEG)
            if has_f:
                L = min(Sf, w + (nbf - j) * Bq)
                if L > 0:
                    rows[..., Sw : Sw + L].fill_(NEG)
        if Sm and mem_bias is not None:
            x[..., mo:].add_(mem_bias[g0:g1])

    if not grad:
        sbuf = torch.empty(max((g1 - g0) * S for g0, g1, _, S in groups) * RB, device=device)
        o_all = torch.empty(Ntot, RB, D, device=device)
        lse_all = torch.empty(Ntot, RB, 1, device=device) if return_lse else None
    outs, lses = [], []
    for g0, g1, has_f, S in groups:
        G = g1 - g0
        Qg, Qfg = qb[g0:g1], qbf[g0:g1]
        mo = Sw + (Sf if has_f else 0)
        if grad:
            parts = [torch.bmm(Qg, band(Kw, nb, g0, g1))]
            if has_f:
                parts.append(torch.bmm(Qfg, band(Kf, nbf, g0, g1)))
            if Sm:
                parts.append(torch.bmm(Qg, Km[g0:g1].transpose(1, 2)))
            sc = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        else:
            # scores held key-major, (G, S, RB), and read through a (G, RB, S) view: each part's product
            # then fills whole rows of the buffer, where bmm writes directly; a column slice of a
            # (G, RB, S) buffer makes it compute into a temporary and copy (~1.5x slower on CPU)
            scT = sbuf[: G * RB * S].view(G, S, RB)
            QgT = Qg.transpose(1, 2)
            torch.bmm(band(Kw, nb, g0, g1).transpose(1, 2), QgT, out=scT[:, :Sw])
            if has_f:
                torch.bmm(band(Kf, nbf, g0, g1).transpose(1, 2), Qfg.transpose(1, 2), out=scT[:, Sw:mo])
            if Sm:
                torch.bmm(Km[g0:g1], QgT, out=scT[:, mo:])
            sc = scT.transpose(1, 2)
        # visibility: band edges (same for every block), segment starts, memory validity. Inference
        # masks the scores in place; autograd adds one bias tensor (in-place ops on views of the scores
        # would each cost a full copy of the gradient in backward)
        if grad:
            with torch.no_grad():
                bias = torch.zeros(G, 1, Bq, S, device=device)
                mask_(bias, g0, g1, has_f, S)
            sc = (sc.view(G, R, Bq, S) + bias).view(G, RB, S)
        else:
            mask_(sc.view(G, R, Bq, S), g0, g1, has_f, S)
        # one softmax over the union, in fp32. Inference: scores are in log2 units (q carries log2 e),
        # exp2 in place (about twice as fast as exp on CPU), and the normalisation divides the output
        if grad:
            if return_lse:
                lse = torch.logsumexp(sc, dim=-1)  # (G, RB)
                p = torch.exp(sc - lse[..., None])
                lses.append(lse)
            else:
                p = torch.softmax(sc, -1)
        else:
            mx = sc.amax(-1, keepdim=True)  # finite: every row sees its own key
            p = sc.sub_(mx).exp2_()
            denom = p.sum(-1, keepdim=True)  # (G, RB, 1)
            if return_lse:
                torch.mul(mx.add_(denom.log2()), _LN2, out=lse_all[g0:g1])
        Vwb = band(Vw, nb, g0, g1).transpose(1, 2)
        if grad:  # split, not slices: its backward is one cat, not a zero-filled copy per slice
            ps = torch.split(p, [Sw] + ([Sf] if has_f else []) + ([Sm] if Sm else []), -1)
            og = torch.bmm(ps[0], Vwb)
            if has_f:
                og = torch.baddbmm(og, ps[1], band(Vf, nbf, g0, g1).transpose(1, 2))
            if Sm:
                og = torch.baddbmm(og, ps[-1], Vm[g0:g1])
            outs.append(og)
        else:
            og = o_all[g0:g1]
            torch.bmm(p[:, :, :Sw], Vwb, out=og)
            if has_f:
                og.baddbmm_(p[:, :, Sw:mo], band(Vf, nbf, g0, g1).transpose(1, 2))
            if Sm:
                og.baddbmm_(p[:, :, mo:], Vm[g0:g1])
            og.div_(denom)

    if grad:
        o_all = torch.cat(outs) if len(outs) > 1 else outs[0]
        if return_lse:
            lse_all = torch.cat(lses) if len(lses) > 1 else lses[0]
    # contiguous like the reference, so callers may .view() it
    o = o_all.view(b, Hkv, n_blk, R, Bq, D).permute(0, 2, 4, 1, 3, 5).reshape(b, Tp, Hq, D)[:, :T]
    o = o.to(q.dtype).contiguous()
    if not return_lse:
        return o
    lse = lse_all.reshape(b, Hkv, n_blk, R, Bq).permute(0, 2, 4, 1, 3).reshape(b, Tp, Hq)[:, :T].contiguous()
    return o, lse



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


def _gathered(q, k, v, w, k_fading, v_fading, m_f, k_memory, v_memory, memory_valid, scale, return_lse, Bq,
              q_fading=None):
    """The gathering kernel: every query block copies the key blocks it sees (``(nb+1)`` copies of k
    and v). For devices without cheap overlapping views (XLA / Neuron run ``unfold`` on the host): the
    kernel of :func:`bmojo_attention_gathered`. ``q_fading`` (like q) scores the fading band."""
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    n_blk = -(-T // Bq)
    Tp = n_blk * Bq
    device = q.device

    # queries (b, Hkv, n_blk, R*Bq, D): the R query heads of a kv head are stacked as rows
    def query_blocks(x):
        xf = F.pad(x.float(), (0, 0, 0, 0, 0, Tp - T))
        return xf.view(b, n_blk, Bq, Hkv, R, D).permute(0, 3, 1, 4, 2, 5).reshape(b, Hkv, n_blk, R * Bq, D)

    qb = query_blocks(q)
    keys, values, masks, queries = [], [], [], []  # queries: which query scores each key set
    bands = [((k, v), w, 0, qb)]
    if k_fading is not None and m_f > 0:
        bands.append(((k_fading, v_fading), m_f, w, qb if q_fading is None else query_blocks(q_fading)))
    for (kk, vv), span, shift, qq in bands:
        got = _band((kk.float().transpose(1, 2), vv.float().transpose(1, 2)), span, shift, n_blk, Bq)
        if got is not None:
            keys.append(got[0])
            values.append(got[1])
            masks.append(got[2][None].expand(b, -1, -1, -1))
            queries.append(qq)

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
        queries.append(qb)

    V = torch.cat(values, 3) if len(values) > 1 else values[0]  # (b, Hkv, n_blk, S, D)
    mask = torch.cat(masks, -1) if len(masks) > 1 else masks[0]  # (b, n_blk, Bq, S)
    S = V.shape[3]
    scores = _scores_by_query(queries, keys).mul_(scale).view(b, Hkv, n_blk, R, Bq, S)
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


def _scores_by_query(queries: list, keys: list) -> torch.Tensor:
    """Unscaled scores (..., R*Bq, S) of key sets (..., S_i, D), each scored by its query blocks
    (..., R*Bq, D): one matmul over the concatenated keys of each run of key sets sharing a query (all of
    them unless the fading keys have their own queries)."""
    runs = []  # [query, [key sets]]
    for qq, kk in zip(queries, keys):
        if runs and runs[-1][0] is qq:
            runs[-1][1].append(kk)
        else:
            runs.append([qq, [kk]])
    parts = [torch.matmul(qq, (torch.cat(ks, -2) if len(ks) > 1 else ks[0]).transpose(-1, -2)) for qq, ks in runs]
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def _static_band(x: torch.Tensor, span: int, shift: int, n_blk, Bq: int):
    """:func:`_band` with no branch on T (``n_blk`` may be symbolic): x (b, H, T, D) fp32 -> K or V
    (b, H, n_blk, S, D) and the mask (n_blk, Bq, S) of the band of width ``span`` on x shifted right by
    ``shift``. The band always spans ``nb = ceil((span-1)/Bq)`` blocks before the query's own (zeros before
    the sequence, masked) and may be fully masked. x is padded to ``nb + n_blk + ceil(shift/Bq)`` blocks
    so that the padding amounts are non-negative and every slice ends a constant away from its axis' end
    (what ``torch.export`` can prove without a guard on T)."""
    b, H, T, D = x.shape
    nb = -(-(span - 1) // Bq)
    extra = -(-shift // Bq)
    Tp = n_blk * Bq
    # padded index j <-> shifted position j - nb*Bq; length (nb + n_blk + extra) Bq >= nb Bq + shift + T
    xp = F.pad(x, (0, 0, nb * Bq + shift, Tp - T + extra * Bq - shift))
    # block i sees padded blocks i..i+nb: nb+1 shifted copies, each viewed as blocks like the queries
    xb = torch.stack([xp[:, :, o * Bq : o * Bq + Tp].view(b, H, n_blk, Bq, D) for o in range(nb + 1)], dim=3)
    S = (nb + 1) * Bq
    j = torch.arange(S, device=x.device)
    rel = j[None, :] - nb * Bq - torch.arange(Bq, device=x.device)[:, None]  # key - query, every block
    band = (rel <= 0) & (rel > -span)  # (Bq, S)
    pos = torch.arange(n_blk, device=x.device)[:, None] * Bq + j[None, :] - nb * Bq  # shifted key position
    return xb.reshape(b, H, n_blk, S, D), band[None] & (pos >= shift)[:, None, :]


def _traceable_attention(q, k, v, w, k_fading, v_fading, m_f, k_memory, v_memory, memory_valid, scale, return_lse,
                         Bq, q_fading=None):
    """The op with no Python control flow on T (the path for a symbolic T; also correct eagerly).

    ``window=None``: SDPA, or exact (T, T) scores when the log-sum-exp is wanted. Else the gathering
    kernel's form: query blocks of ``Bq`` read copies of their window band, fading band and the memory
    slots of the 1 (``Bq | w``) or 2 chunks a block spans, one masked fp32 softmax over the union. T is
    padded to ``ceil(T/Bq) + 1`` blocks (one more than needed, so that no symbolic size is ever 1: under
    ``torch.export`` that would add a guard on T) and the memory with 2 invalid chunks (the padded blocks'
    chunks), so no index is clamped. Memory O(T (w + m_f + m_e)); differentiable by autograd. ``q_fading``
    (like q) scores the fading band."""
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    device = q.device
    if w is None:
        if not return_lse:
            return _full_causal(q, k, v, scale, False)
        qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))  # (b, H, T, D)
        sc = torch.matmul(qt.reshape(b, Hkv, R, T, D), kt[:, :, None].transpose(-1, -2)) * scale
        i = torch.arange(T, device=device)
        sc = sc.masked_fill(i[None, :] > i[:, None], float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)  # (b, Hkv, R, T)
        o = torch.matmul(torch.exp(sc - lse[..., None]), vt[:, :, None])
        return (o.reshape(b, Hq, T, D).transpose(1, 2).to(q.dtype).contiguous(),
                lse.reshape(b, Hq, T).transpose(1, 2).contiguous())

    n_blk = (T + 2 * Bq - 1) // Bq  # ceil(T / Bq) + 1 >= 2
    Tp = n_blk * Bq

    def query_blocks(x):
        xf = F.pad(x.float(), (0, 0, 0, 0, 0, Tp - T))
        return xf.view(b, n_blk, Bq, Hkv, R, D).permute(0, 3, 1, 4, 2, 5).reshape(b, Hkv, n_blk, R * Bq, D)

    qb = query_blocks(q)
    keys, values, masks, queries = [], [], [], []  # queries: which query scores each key set
    bands = [((k, v), w, 0, qb)]
    if k_fading is not None and m_f > 0:
        bands.append(((k_fading, v_fading), m_f, w, qb if q_fading is None else query_blocks(q_fading)))
    for (kk, vv), span, shift, qq in bands:
        K_, mask = _static_band(kk.float().transpose(1, 2), span, shift, n_blk, Bq)
        V_, _ = _static_band(vv.float().transpose(1, 2), span, shift, n_blk, Bq)
        keys.append(K_)
        values.append(V_)
        masks.append(mask[None].expand(b, -1, -1, -1))
        queries.append(qq)

    if k_memory is not None:
        n_chunks, m_e = k_memory.shape[1], k_memory.shape[2]
        n_span = 1 if w % Bq == 0 else 2  # chunks one block touches (Bq <= w)
        blk_start = torch.arange(n_blk, device=device) * Bq
        cid = blk_start[:, None] // w + torch.arange(n_span, device=device)[None, :]  # (n_blk, n_span) <= chunks + 1
        pad_c = (0, 0, 0, 0, 0, 0, 0, 2)
        km, vm = F.pad(k_memory, pad_c).float(), F.pad(v_memory, pad_c).float()  # (b, chunks + 2, m_e, Hkv, D)
        real = (torch.arange(n_chunks + 2, device=device) < n_chunks)[None, :, None].expand(b, -1, m_e)
        valid = real if memory_valid is None else F.pad(memory_valid.bool(), (0, 0, 0, 2)) & real
        keys.append(km[:, cid].permute(0, 4, 1, 2, 3, 5).reshape(b, Hkv, n_blk, n_span * m_e, D))
        values.append(vm[:, cid].permute(0, 4, 1, 2, 3, 5).reshape(b, Hkv, n_blk, n_span * m_e, D))
        t_chunk = (blk_start[:, None] + torch.arange(Bq, device=device)[None, :]) // w  # (n_blk, Bq)
        same = t_chunk[:, :, None] == cid[:, None, :]  # (n_blk, Bq, n_span)
        vis = same[None, :, :, :, None] & valid[:, cid][:, :, None]  # (b, n_blk, Bq, n_span, m_e)
        masks.append(vis.reshape(b, n_blk, Bq, n_span * m_e))
        queries.append(qb)

    V = torch.cat(values, 3) if len(values) > 1 else values[0]  # (b, Hkv, n_blk, S, D)
    mask = torch.cat(masks, -1) if len(masks) > 1 else masks[0]  # (b, n_blk, Bq, S)
    S = V.shape[3]
    scores = (_scores_by_query(queries, keys) * scale).view(b, Hkv, n_blk, R, Bq, S)
    scores = scores.masked_fill(~mask[:, None, :, None], float("-inf"))  # every row sees its own key
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)  # (b, Hkv, n_blk, R, Bq)
        p = torch.exp(scores - lse[..., None])
    else:
        p = torch.softmax(scores, dim=-1)
    o = torch.matmul(p.view(b, Hkv, n_blk, R * Bq, S), V)  # (b, Hkv, n_blk, R*Bq, D)
    o = _first(o.view(b, Hkv, n_blk, R, Bq, D).permute(0, 2, 4, 1, 3, 5).reshape(b, Tp, Hq, D), T).to(q.dtype)
    if not return_lse:
        return o
    return o, _first(lse.permute(0, 2, 4, 1, 3).reshape(b, Tp, Hq), T)


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


def _layout_blocks(out: torch.Tensor, x: torch.Tensor, row0: int, a0: int) -> None:
    """Write blocks a0, a0 + 1, ... of a layout holding x[i] at row ``row0 + i`` (zeros elsewhere) into
    ``out`` (b, H, n, Bq, D), any strides (a group's blocks may be interleaved with another kind's).
    x (b, T, H, D). One copy of x's rows (two where the blocks reach past x's ends: padded first)."""
    b, H, n, Bq, D = out.shape
    i0 = a0 * Bq - row0  # index into x of the first row written
    lo, hi = max(i0, 0), min(i0 + n * Bq, x.shape[1])
    if hi <= lo:
        out.zero_()
        return
    rows = x[:, lo:hi]
    if hi - lo < n * Bq:
        rows = F.pad(rows, (0, 0, 0, 0, lo - i0, i0 + n * Bq - hi))
    out.copy_(rows.view(b, n, Bq, H, D).permute(0, 3, 1, 2, 4))


def _host_min(start: torch.Tensor) -> int | None:
    """The smallest per-row start, when reading it costs nothing (a CPU tensor), else None."""
    return int(start.min()) if start.device.type == "cpu" and start.numel() else None


def _chunks_per_block(start: torch.Tensor, w: int, Bq: int, n_blk: int) -> int:
    """Memory chunks one query block may touch (Bq <= w): 1 when no block of any row crosses a chunk
    boundary, known on the host for CPU tensors only (elsewhere reading start would synchronise), else 2."""
    if start.device.type != "cpu":
        return 2
    phases = {s % w for s in start.tolist()}
    return 1 if all((p + j * Bq) % w + Bq <= w for p in phases for j in range(n_blk)) else 2


class _KeyKind(NamedTuple):
    """One kind of key a resumed query block reads (window or fading), in its segment layout."""

    keys: torch.Tensor  # (b, n, Hkv, D)
    values: torch.Tensor  # (b, n, Hkv, D)
    row0: int  # the row of keys[0]
    nb: int  # key blocks of the band before the query's own
    span: int  # the band's width in positions (w or m_f)
    row_p0: int  # the row of position 0


def _resumed(q, k, v, w, k_fading, v_fading, m_f, k_memory, v_memory, memory_valid, scale, return_lse, Bq,
             budget, q_start, q_fading=None):
    """Queries at positions q_start + j (per row) after keys that precede them: a decoding state's
    window (k: Pk = len(k) - T keys before the first query) and fading keys (Pf before it), the state's
    memory slots per chunk from the first query's (see ``bmojo_attention_ref``).

    The banded kernel's layout with a prefix: each (batch row, kv head) segment holds ``n_pre`` row
    blocks of ``Bq`` before its queries' keys, so query block j's window band is the row blocks
    [n_pre + j - nb, n_pre + j] of its segment, and its fading band the same row blocks (``nbf`` wide) of
    the fading keys' layout (shifted right by w). Row blocks before a kind's first given key are never
    computed (a history shorter than the band: the fading band right after the window fills, the window
    band after a short prompt).

    The row blocks are arranged in *groups*, each scored by one query. When q scores the fading keys too
    and both bands are equally wide, one group interleaves the kinds by row block: the blocks only one
    kind has, then (window a, fading a) pairs. Each query block's window and fading bands are then one
    contiguous run of that group, so one ``bmm`` scores both and one computes their output (fewer, wider
    products than one per band: the op ~12 % faster on CPU at 512 queries after 512). Otherwise (``q_fading``,
    or bands of different widths) each kind is its own group. The loop runs block-major (block j of a
    set of segments per step). Keys at negative positions (a shorter row's history) and the rest of the
    rows before the first given key are masked by a per-row key bias; memory chunks follow each row's own
    chunk phase (a block may straddle two). ``q_fading`` (like q) scores the fading band instead of q."""
    b, T, Hq, D = q.shape
    Hkv = k.shape[2]
    R = Hq // Hkv
    RB = R * Bq
    device = q.device
    NEG = float("-inf")
    n_blk = -(-T // Bq)
    Tp = n_blk * Bq
    segs = b * Hkv
    fading = k_fading is not None and m_f > 0
    Pk = k.shape[1] - T
    Pf = k_fading.shape[1] - T if fading else 0
    # key blocks of the window (fading) band before the query's own; a band never reaches before the keys
    nb = min(-(-(w - 1) // Bq), -(-Pk // Bq) + n_blk)
    nbf = min(-(-(m_f - 1) // Bq), -(-Pf // Bq) + n_blk) if fading else 0
    n_pre = max(nb, nbf, -(-Pk // Bq), -(-max(Pf - w, 0) // Bq))
    O = n_pre * Bq  # rows of each segment before its first query's key
    L = O + Tp
    NA = L // Bq  # row blocks of a segment
    start = q_start.to(device=device, dtype=torch.long)
    # rows at or after a kind's `clear` row hold keys at positions >= 0 for every batch row (key bias 0):
    # known on the host for CPU tensors only (elsewhere reading q_start would synchronise: every row is
    # then biased)
    lowest = _host_min(start)
    lowest = -L - w if lowest is None else lowest

    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, k_fading, v_fading, k_memory, v_memory, q_fading))

    def query_blocks(x):
        """(b, T, Hq, D) -> (n_blk, segs, R Bq, D) fp32, block-major: block j of every segment is one slice."""
        xf = F.pad(x.float(), (0, 0, 0, 0, 0, Tp - T)) if Tp != T else x.float()
        # inference: scores in log2 units (q carries log2 e) for an in-place exp2, as in _banded
        xb = (xf.view(b, n_blk, Bq, Hkv, R, D).permute(1, 0, 3, 4, 2, 5) * (scale if grad else scale * _LOG2E))
        return xb.reshape(n_blk, segs, RB, D)

    qb = query_blocks(q)
    # the two kinds of keys, "w" (window) and "f" (fading)
    kinds = {"w": _KeyKind(k, v, O - Pk, nb, w, O)}
    if fading:  # fading key i at row O + w - Pf + i: the band of the sequence shifted by w, as in _banded
        kinds["f"] = _KeyKind(k_fading, v_fading, O + w - Pf, nbf, m_f, O + w)
    first, clear = {}, {}
    for kind, kk in kinds.items():
        first[kind] = kk.row0 // Bq  # the first row block holding a given key
        clear[kind] = max(kk.row0, kk.row_p0 - lowest)  # rows from here hold keys at positions >= 0 in every batch row

    # the groups: the (kind, row block) items of each in order, the query that scores them, and for the
    # interleaved group (one kind's own blocks lo..hi-1, then pairs) that kind, lo and hi
    if fading and q_fading is None and nb == nbf:
        (one, lo), (_, hi) = sorted(first.items(), key=lambda kv: kv[1])
        groups = [([(one, a) for a in range(lo, hi)] + [(kind, a) for a in range(hi, NA) for kind in "wf"], qb,
                   (one, lo, hi))]
    else:
        groups = [([(kind, a) for a in range(first[kind], NA)],
                   query_blocks(q_fading) if kind == "f" and q_fading is not None else qb, None) for kind in kinds]

    def arrange(write, order: list, single, *shape) -> torch.Tensor:
        """A group's buffer (segs, len(order) Bq, *shape), filled by ``write(out, kind, first block)``
        with out (b, Hkv, n, Bq, *shape): the interleaved group in three calls (one kind's own blocks, then
        each half of the pairs), a one-kind group in one."""
        buf = torch.empty(b, Hkv, len(order), Bq, *shape, dtype=torch.float32, device=device)
        if single is None:
            write(buf, *order[0])
        else:
            one, lo, hi = single
            write(buf[:, :, : hi - lo], one, lo)
            pairs = buf[:, :, hi - lo :].unflatten(2, (NA - hi, 2))
            write(pairs[:, :, :, 0], "w", hi)
            write(pairs[:, :, :, 1], "f", hi)
        return buf.view(segs, len(order) * Bq, *shape)

    def writer(field: str):
        """Writes a kind's keys or values (``field``) into a group's buffer."""
        return lambda out, kind, a0: _layout_blocks(out, getattr(kinds[kind], field), kinds[kind].row0, a0)

    K_g, V_g = ([arrange(writer(field), order, single, D) for order, _, single in groups]
                for field in ("keys", "values"))
    edges = {kind: {c0 // Bq: e for c0, _, e in _edge_biases(kk.span, kk.nb, Bq, device, key_major=not grad)}
             for kind, kk in kinds.items()}

    # per query block j: the runs (group, first item, end item) it reads, in score-column order; the
    # partly visible blocks (column, edge bias); the runs needing the key bias (columns, group, items)
    index = [{item: p for p, item in enumerate(order)} for order, _, _ in groups]
    plans = []
    for j in range(n_blk):
        runs, edge_masks, bias_runs, c = [], [], [], 0
        for g, (order, _, _) in enumerate(groups):
            # the band of each kind in the group: row blocks max(first, n_pre + j - nbx) .. n_pre + j
            lows = {kind: max(first[kind], n_pre + j - kinds[kind].nb) for kind in kinds if (kind, NA - 1) in index[g]}
            lows = {kind: a for kind, a in lows.items() if a <= n_pre + j}
            if not lows:
                continue
            p0 = min(index[g][(kind, a)] for kind, a in lows.items())
            p1 = max(index[g][(kind, n_pre + j)] for kind in lows) + 1
            # both orders are built so that the bands are one run with nothing else in it
            assert p1 - p0 == sum(n_pre + j + 1 - a for a in lows.values()), "a band is not one run of its group"
            for p, (kind, a) in enumerate(order[p0:p1], p0):
                e = edges[kind].get(a - (n_pre + j - kinds[kind].nb))
                if e is not None:
                    edge_masks.append((c + (p - p0) * Bq, e))
            if any(a * Bq < clear[kind] for kind, a in order[p0:p1]):
                bias_runs.append((c, c + (p1 - p0) * Bq, g, p0, p1))
            runs.append((g, p0, p1))
            c += (p1 - p0) * Bq
        plans.append((runs, edge_masks, bias_runs, c))
    if any(plan[2] for plan in plans):
        rows = torch.arange(L, device=device)

        def key_bias(out, kind, a0):
            """-inf where the key's position is negative (before the row's first token) or no key is given."""
            row0, row_p0 = kinds[kind].row0, kinds[kind].row_p0
            r = rows[a0 * Bq : a0 * Bq + out.shape[2] * Bq].view(-1, Bq)
            out.copy_(torch.zeros(b, *r.shape, device=device).masked_fill_(
                (r - row_p0 + start[:, None, None] < 0) | (r < row0), NEG)[:, None])

        bias_g = [arrange(key_bias, order, single) for order, _, single in groups]

    Sm = 0
    if k_memory is not None:
        n_chunks, m_e = k_memory.shape[1], k_memory.shape[2]
        c0 = torch.div(start, w, rounding_mode="floor")
        t = start[:, None] + torch.arange(Tp, device=device)[None, :]  # (b, Tp) query positions
        t_chunk = (torch.div(t, w, rounding_mode="floor") - c0[:, None]).view(b, n_blk, Bq)
        n_span = _chunks_per_block(start, w, Bq, n_blk)
        cid = t_chunk[:, :, :1] + torch.arange(n_span, device=device)  # (b, n_blk, n_span): the chunks a block touches
        cid_c = cid.clamp(max=n_chunks - 1)
        Sm = n_span * m_e
        idx = torch.arange(b, device=device)[:, None, None]
        Km, Vm = (x.float()[idx, cid_c].permute(1, 0, 4, 2, 3, 5).reshape(n_blk, segs, Sm, D)
                  for x in (k_memory, v_memory))
        valid = (torch.ones(b, n_chunks, m_e, dtype=torch.bool, device=device) if memory_valid is None
                 else memory_valid.bool().to(device))[idx, cid_c] & (cid < n_chunks)[..., None]  # (b, n_blk, n_span, m_e)
        vis = (t_chunk[..., None] == cid[:, :, None, :])[..., None] & valid[:, :, None]  # (b, n_blk, Bq, n_span, m_e)
        mem_bias = torch.zeros(n_blk, b, Bq, Sm, device=device).masked_fill_(
            ~vis.reshape(b, n_blk, Bq, Sm).transpose(0, 1), NEG)
        mem_bias = mem_bias[:, :, None].expand(n_blk, b, Hkv, Bq, Sm)
        mem_bias = (mem_bias if grad else _key_major(mem_bias)).reshape(n_blk, segs, 1, Bq, Sm)

    S = max(plan[3] for plan in plans) + Sm
    per_group = max(1, min(segs, budget // (RB * S * 4)))  # segments per step: block j of each

    def mask_(x, j, s0, s1):
        """Add -inf where query rows may not see key columns; x (G, R or 1, Bq, S_j), in place."""
        _, edge_masks, bias_runs, Sk = plans[j]
        for c, e in edge_masks:
            x[..., c : c + Bq].add_(e)
        for c0_, c1_, g, p0, p1 in bias_runs:
            x[..., c0_:c1_].add_(bias_g[g][s0:s1, p0 * Bq : p1 * Bq][:, None, None, :])
        if Sm:
            x[..., Sk:].add_(mem_bias[j, s0:s1])

    if not grad:
        sbuf = torch.empty(per_group * RB * S, device=device)
        o_all = torch.empty(n_blk, segs, RB, D, device=device)
        lse_all = torch.empty(n_blk, segs, RB, 1, device=device) if return_lse else None
    outs, lses = [], []
    for j, (runs, _, _, Sk) in enumerate(plans):
        Sg = Sk + Sm
        widths = [(p1 - p0) * Bq for _, p0, p1 in runs] + ([Sm] if Sm else [])
        for s0 in range(0, segs, per_group):
            s1 = min(s0 + per_group, segs)
            G = s1 - s0
            keys = [K_g[g][s0:s1, p0 * Bq : p1 * Bq] for g, p0, p1 in runs]  # (G, S', D) views
            values = [V_g[g][s0:s1, p0 * Bq : p1 * Bq] for g, p0, p1 in runs]
            queries = [groups[g][1][j, s0:s1] for g, _, _ in runs]
            if Sm:
                keys.append(Km[j, s0:s1])
                values.append(Vm[j, s0:s1])
                queries.append(qb[j, s0:s1])
            if grad:  # autograd: plain ops, one added bias
                parts = [torch.bmm(qq, kk.transpose(1, 2)) for qq, kk in zip(queries, keys)]
                with torch.no_grad():
                    bias = torch.zeros(G, 1, Bq, Sg, device=device)
                    mask_(bias, j, s0, s1)
                sc = ((torch.cat(parts, -1) if len(parts) > 1 else parts[0]).view(G, R, Bq, Sg) + bias).view(G, RB, Sg)
                if return_lse:
                    lse = torch.logsumexp(sc, dim=-1)
                    p = torch.exp(sc - lse[..., None])
                    lses.append(lse)
                else:
                    p = torch.softmax(sc, -1)
                ps = torch.split(p, widths, -1)  # split, not slices: its backward is one cat
                og = torch.bmm(ps[0], values[0])
                for pp, vv in zip(ps[1:], values[1:]):
                    og = torch.baddbmm(og, pp, vv)
                outs.append(og)
                continue
            # inference: in place, in log2 units, held key-major as in _banded
            scT = sbuf[: G * RB * Sg].view(G, Sg, RB)
            c = 0
            for qq, kk, width in zip(queries, keys, widths):
                torch.bmm(kk, qq.transpose(1, 2), out=scT[:, c : c + width])
                c += width
            sc = scT.transpose(1, 2)
            mask_(sc.view(G, R, Bq, Sg), j, s0, s1)
            mx = sc.amax(-1, keepdim=True).clamp_(min=-1e30)  # padded query rows see nothing: keep them finite
            p = sc.sub_(mx).exp2_()
            denom = p.sum(-1, keepdim=True)
            if return_lse:
                torch.mul(mx.add_(denom.log2()), _LN2, out=lse_all[j, s0:s1])
            og = o_all[j, s0:s1]
            c = widths[0]
            torch.bmm(p[:, :, :c], values[0], out=og)
            for vv, width in zip(values[1:], widths[1:]):
                og.baddbmm_(p[:, :, c : c + width], vv)
                c += width
            og.div_(denom.clamp_(min=1e-30))
    if grad:
        o_all = torch.cat(outs)
        if return_lse:
            lse_all = torch.cat(lses)
    o = o_all.view(n_blk, b, Hkv, R, Bq, D).permute(1, 0, 4, 2, 3, 5).reshape(b, Tp, Hq, D)[:, :T]
    o = o.to(q.dtype).contiguous()
    if not return_lse:
        return o
    lse = lse_all.reshape(n_blk, b, Hkv, R, Bq).permute(1, 0, 4, 2, 3).reshape(b, Tp, Hq)[:, :T].contiguous()
    return o, lse


def _full_causal_resumed(q, k, v, scale, return_lse, q_start):
    """window=None after earlier keys: key i of k is at position q_start - (len(k) - T) + i; keys at
    negative positions (a shorter row's padding slots) do not exist. SDPA with an explicit mask."""
    b, T, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    start = q_start.to(device=q.device, dtype=torch.long)

    def visible():  # (b, T, Tk) bool
        t = start[:, None] + torch.arange(T, device=q.device)[None, :]  # (b, T)
        s = start[:, None] - (Tk - T) + torch.arange(Tk, device=q.device)[None, :]  # (b, Tk)
        return (s[:, None, :] <= t[:, :, None]) & (s[:, None, :] >= 0)

    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    if not return_lse:  # an additive mask: SDPA would convert a boolean one (twice on CPU), ~15 % slower
        lowest = _host_min(start)
        if lowest is not None and lowest >= Tk - T:  # every key exists: one causal mask, aligned lower right
            P = Tk - T
            bias = torch.full((T, Tk), float("-inf"), device=q.device).triu_(P + 1)
            o = q.new_empty(b, T, Hq, D)
            for s in range(0, T, FULL_RESUME_BLOCK):  # queries s..e-1 see keys up to P + e - 1
                e = min(s + FULL_RESUME_BLOCK, T)
                o[:, s:e] = F.scaled_dot_product_attention(
                    qt[:, :, s:e], kt[:, :, : P + e], vt[:, :, : P + e], attn_mask=bias[s:e, : P + e], scale=scale,
                    enable_gqa=Hq > Hkv).transpose(1, 2)
            return o
        bias = torch.zeros(b, 1, T, Tk, device=q.device).masked_fill_(~visible()[:, None], float("-inf"))
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale, enable_gqa=Hq > Hkv)
        return o.transpose(1, 2).to(q.dtype).contiguous()
    R = Hq // Hkv
    sc = torch.matmul(qt.reshape(b, Hkv, R, T, D), kt[:, :, None].transpose(-1, -2)) * scale
    sc = sc.masked_fill(~visible()[:, None, None], float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    o = torch.matmul(torch.exp(sc - lse[..., None]), vt[:, :, None]).reshape(b, Hq, T, D)
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse.reshape(b, Hq, T).transpose(1, 2).contiguous()


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
    q_start: torch.Tensor | None = None,
    q_fading: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
    score_budget: int | None = None,
):
    """Same contract as ``bmojo_attention_ref`` (with ``q_start``: keys before the queries, see
    :func:`_resumed`); the banded kernel (module docstring), registered for CPU and CUDA tensors.

    q (b, T, Hq, D); k, v, k_fading, v_fading (b, T, Hkv, D); k_memory, v_memory
    (b, ceil(T/w), m_e, Hkv, D); memory_valid (b, ceil(T/w), m_e) bool (None: all valid). Query t sees
    k[s] for t-w < s <= t, k_fading[s] for t-w-m_f < s <= t-w, and the valid slots of chunk t // w;
    q_fading (b, T, Hq, D), when given, scores the fading keys instead of q (every path takes it).
    Returns o (b, T, Hq, D) in q's dtype and, if asked, the natural-log lse (b, T, Hq) fp32.
    ``block_size`` is the query block target; ``score_budget`` (bytes, default ``SCORE_BUDGET``) bounds
    the fp32 scores of one group of query blocks.
    """
    return _attention(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid,
                      scale, return_lse, q_start, block_size, score_budget, banded=True, q_fading=q_fading)


def bmojo_attention_gathered(
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
    block_size: int = DEFAULT_BLOCK,
    score_budget: int | None = None,
):
    """:func:`bmojo_attention_blocksparse` with the gathering kernel (:func:`_gathered`) for a fresh
    sequence: registered for the devices without cheap overlapping views (XLA / Neuron, ...). Keys before
    the queries (``q_start``), a symbolic T and ``window=None`` take the same paths as there."""
    return _attention(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid,
                      scale, return_lse, q_start, block_size, score_budget, banded=False, q_fading=q_fading)


def _attention(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale,
               return_lse, q_start, block_size, score_budget, banded: bool, q_fading=None):
    b, T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if q_fading is not None and (window is None or k_fading is None):
        raise ValueError("bmojo_attention: q_fading scores the fading keys; it needs k_fading and a window "
                         "(full causal attention has no fading keys)")
    if q_start is not None:  # new tokens after a decoding state
        if window is None:
            return _full_causal_resumed(q, k, v, scale, return_lse, q_start)
        return _resumed(q, k, v, window, k_fading, v_fading, window if fading_window is None else fading_window,
                        k_memory, v_memory, memory_valid, scale, return_lse, _pick_block(window, block_size),
                        SCORE_BUDGET if score_budget is None else score_budget, q_start, q_fading)
    if _traceable(q):
        return _traceable_attention(q, k, v, window, k_fading, v_fading,
                                    window if fading_window is None else fading_window, k_memory, v_memory,
                                    memory_valid, scale, return_lse,
                                    None if window is None else _pick_block(window, block_size), q_fading)
    if T == 0:
        o = q.new_empty(b, 0, Hq, D)
        return (o, q.new_empty(b, 0, Hq, dtype=torch.float32)) if return_lse else o
    if window is None:
        return _full_causal(q, k, v, scale, return_lse)
    m_f = window if fading_window is None else fading_window
    Bq = _pick_block(window, block_size)
    if not banded:
        return _gathered(q, k, v, window, k_fading, v_fading, m_f, k_memory, v_memory, memory_valid, scale,
                         return_lse, Bq, q_fading)
    return _banded(q, k, v, window, k_fading, v_fading, m_f, k_memory, v_memory, memory_valid, scale, return_lse,
                   Bq, SCORE_BUDGET if score_budget is None else score_budget, q_fading)


# optional capabilities (bmojo.ops.registry.ATTENTION_CAPABILITIES), all paths above
bmojo_attention_blocksparse.resumes = True  # takes q_start: keys before the queries
bmojo_attention_gathered.resumes = True
bmojo_attention_blocksparse.fading_query = True  # takes q_fading: the fading keys' own queries
bmojo_attention_gathered.fading_query = True
