"""Eidetic-memory selection in O(T * (w + m_e)) for the torch backend (docs/design.md, "Eidetic memory"):
the memory is merged chunk by chunk (:func:`merge_memory`, ``fused_recurrent.py``), exactly as the decoder
updates it, instead of ranking all T positions for every chunk. The innovation scores
(``parallel.py``) are bitwise equal to ``innovation_scores_ref`` (the decoder's), so the selection cannot
differ on near ties.

With a symbolic T (``torch.export`` with a dynamic T, see :func:`_traceable`) the loop
over chunks cannot be traced; :func:`innovation_select_traceable` selects the same positions without it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import traceable as _traceable
from .fused_recurrent import merge_memory, rank_candidates
from .parallel import innovation_scores_inplace, innovation_scores_traceable


def select_from_scores_chunked(eps: torch.Tensor, window: int, slots: int):
    """Same result as ``select_from_scores_ref``: eps (b, T) -> positions, valid (b, chunks, slots)."""
    b, T = eps.shape
    n_chunks = -(-T // window)
    eps = eps.float()
    mem_eps = eps.new_full((b, slots), float("-inf"))
    mem_pos = torch.zeros(b, slots, dtype=torch.long, device=eps.device)
    positions, valid = [], []
    for c in range(n_chunks):
        # chunk c adds the positions ((c-2)w, (c-1)w] (for c = 1: position 0 alone)
        lo, hi = max((c - 2) * window + 1, 0), (c - 1) * window
        if hi >= lo:
            cand_pos = torch.arange(lo, hi + 1, device=eps.device).expand(b, -1)
            mem_eps, mem_pos, _ = merge_memory(mem_eps, mem_pos, eps[:, lo : hi + 1], cand_pos, slots)
        ok = mem_eps > float("-inf")
        positions.append(torch.where(ok, mem_pos, torch.zeros_like(mem_pos)))
        valid.append(ok)
    return torch.stack(positions, 1), torch.stack(valid, 1)


def select_from_scores_traceable(eps: torch.Tensor, window: int, slots: int):
    """Same result as ``select_from_scores_ref`` (and :func:`select_from_scores_chunked`) with no Python
    control flow on T: eps (b, T) -> positions, valid (b, chunks, slots).

    Chunk c sees the positions s <= (c-1) w, i.e. the groups g < c of ``((g-1) w, g w]`` (group 0 is
    position 0 alone). The best ``k = min(slots, w)`` of each group (largest eps, earlier position on
    ties; -inf outside the sequence) are the only candidates any chunk can keep; each chunk ranks those
    of its visible groups with :func:`rank_candidates` (largest eps first, the earlier position winning
    ties). Memory O(b (T/w)^2 k).

    Shapes under ``torch.export``: every tensor here has ``chunks + 1`` rows (never a size that may be 1,
    which would add a guard on T), and the outputs are (b, chunks, slots) views of (b, slots, chunks + 1)
    tensors, whose layout export can tell apart from a contiguous one without a guard on T.
    """
    b, T = eps.shape
    w = window
    n_chunks = -(-T // w)
    G = n_chunks + 1  # groups 0..chunks (the last only pads); rows of chunks 0..chunks (the last dropped)
    NEG = float("-inf")
    k = min(slots, w)
    # group g, entry i <-> position (g-1) w + 1 + i, read from eps padded with w-1 entries in front
    ep = F.pad(eps.float(), (w - 1, 2 * w), value=NEG)
    gi = torch.arange(G, device=eps.device)
    grp = ep[:, gi[:, None] * w + torch.arange(w, device=eps.device)[None, :]]  # (b, G, w); index < T + 2w - 1
    best = torch.sort(grp, dim=-1, descending=True, stable=True).indices[..., :k]  # (b, G, k)
    # candidates (b, k G), rank-major (the k-th best of every group, then the next): cat, not a reshape
    # (merging a symbolic dim into another adds a guard under export); ties go by position below
    cand_eps = torch.cat([torch.gather(grp, -1, best[:, :, r : r + 1])[..., 0] for r in range(k)], 1)
    cand_pos = torch.cat([gi * w - (w - 1) + best[:, :, r] for r in range(k)], 1)
    cand_grp = torch.cat([gi] * k)  # (k G,)
    masked = cand_eps[:, None, :].masked_fill(cand_grp[None, None, :] >= gi[None, :, None], NEG)  # row c: groups < c
    masked = torch.cat([masked, masked.new_full((b, G, slots), NEG)], -1)  # at least `slots` candidates
    cand_pos = F.pad(cand_pos, (0, slots))[:, None, :].expand(b, G, -1)
    idx = rank_candidates(masked, cand_pos, slots)  # (b, rows, slots): eps descending, earlier position first
    valid = torch.gather(masked, -1, idx) > NEG
    pos = torch.gather(cand_pos, -1, idx)
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    # drop the last row: transposed (slot-major) first, so no intermediate is a contiguous (.., chunks, ..)
    return (pos.transpose(1, 2).contiguous().transpose(1, 2)[:, :n_chunks],
            valid.transpose(1, 2).contiguous().transpose(1, 2)[:, :n_chunks])


def innovation_select_traceable(f: torch.Tensor, window: int, slots: int, taps: int):
    """:func:`innovation_select_chunked` with no Python control flow on T (the path for a symbolic T; also
    correct eagerly). The scores are bitwise equal to :func:`innovation_scores_inplace`'s."""
    with torch.no_grad():
        eps = innovation_scores_traceable(f, taps)
    return select_from_scores_traceable(eps, window, slots)


def innovation_select_chunked(f: torch.Tensor, window: int, slots: int, taps: int):
    """f (b, T, d) -> memory positions (b, ceil(T/w), slots) and validity (docs/design.md, "The layer",
    steps 3-4)."""
    if _traceable(f):
        return innovation_select_traceable(f, window, slots, taps)
    return select_from_scores_chunked(innovation_scores_inplace(f, taps), window, slots)
