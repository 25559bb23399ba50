"""Eidetic-memory selection in O(T * (w + m_e)): the memory is merged chunk by chunk, exactly as the
decoder updates it, instead of ranking all T positions for every chunk. The innovation scores are
computed in place in one buffer, with the reference's arithmetic in the reference's order, so they are
bitwise equal to ``innovation_scores_ref`` (the decoder's) and the selection cannot differ on near ties."""
from __future__ import annotations

import torch

from .naive import rank_candidates


def merge_memory(mem_eps, mem_pos, cand_eps, cand_pos, slots: int):
    """Keep the ``slots`` best of the current memory and new candidates.

    mem_* (b, slots) and cand_* (b, n); invalid entries carry eps = -inf. Returns (eps, pos, idx),
    idx indexing the concatenation [memory, candidates] so callers can gather keys and values.
    """
    eps = torch.cat([mem_eps, cand_eps], -1)
    pos = torch.cat([mem_pos, cand_pos], -1)
    idx = rank_candidates(eps, pos, slots)
    return torch.gather(eps, -1, idx), torch.gather(pos, -1, idx), idx


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


@torch.no_grad()
def innovation_scores_inplace(f: torch.Tensor, taps: int, f_history: torch.Tensor | None = None) -> torch.Tensor:
    """Bitwise the same as ``innovation_scores_ref`` (not differentiated), with one (b, T, d) fp32
    buffer instead of a padded copy and a temporary per operation: pred = ((f[s-1] + f[s-2]) + ...) /
    taps, then (f[s] - pred)^2, then the mean over channels, each op as the reference runs it."""
    b, T, d = f.shape
    fp = f.float()
    hist = None if f_history is None else f_history.to(f.dtype).float()  # (b, taps, d), oldest first
    pred = torch.empty_like(fp, memory_format=torch.contiguous_format)
    for j in range(1, taps + 1):  # term j: f[s - j], from the history for s < j
        n = min(j, T)
        if j == 1:
            pred[:, j:].copy_(fp[:, : T - j])
            if hist is None:
                pred[:, :n].zero_()
            else:
                pred[:, :n].copy_(hist[:, taps - j : taps - j + n])
            continue
        if j < T:
            pred[:, j:].add_(fp[:, : T - j])
        if hist is not None:
            pred[:, :n].add_(hist[:, taps - j : taps - j + n])
        # zero history: x + 0 == x (up to the sign of a zero, which squaring removes)
    pred.div_(taps)
    torch.sub(fp, pred, out=pred)
    return pred.mul_(pred).mean(-1)


def innovation_select_chunked(f: torch.Tensor, window: int, slots: int, taps: int):
    """f (b, T, d) -> memory positions (b, ceil(T/w), slots) and validity (SPEC 1.1 steps 3-4)."""
    return select_from_scores_chunked(innovation_scores_inplace(f, taps), window, slots)
