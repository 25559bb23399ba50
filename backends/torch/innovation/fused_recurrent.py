"""One update of the eidetic memory for the torch backend: the ``slots`` best of the memory and new
candidates (what the decoder runs when a chunk begins, and what the chunked selection runs per chunk)."""
from __future__ import annotations

import torch


def rank_candidates(eps: torch.Tensor, pos: torch.Tensor, slots: int) -> torch.Tensor:
    """Indices of the ``slots`` best candidates along the last dim: largest eps first, the earlier
    position winning ties (two stable sorts). eps, pos (..., n). Invalid candidates carry -inf."""
    by_pos = torch.sort(pos, dim=-1, stable=True).indices
    eps_sorted = torch.gather(eps, -1, by_pos)
    by_eps = torch.sort(eps_sorted, dim=-1, descending=True, stable=True).indices
    return torch.gather(by_pos, -1, by_eps)[..., :slots]


def merge_memory(mem_eps, mem_pos, cand_eps, cand_pos, slots: int):
    """Keep the ``slots`` best of the current memory and new candidates.

    mem_* (b, slots) and cand_* (b, n); invalid entries carry eps = -inf. Returns (eps, pos, idx),
    idx indexing the concatenation [memory, candidates] so callers can gather keys and values.
    """
    eps = torch.cat([mem_eps, cand_eps], -1)
    pos = torch.cat([mem_pos, cand_pos], -1)
    idx = rank_candidates(eps, pos, slots)
    return torch.gather(eps, -1, idx), torch.gather(pos, -1, idx), idx
