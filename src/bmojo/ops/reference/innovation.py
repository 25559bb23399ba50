"""Oracle of eidetic-memory selection by innovation (docs/design.md, "The layer", steps 3-4, and
"Eidetic memory"): every chunk ranks every eligible position from scratch. Self-contained: it shares no
code with any backend it checks."""
from __future__ import annotations

import torch


def innovation_scores_ref(f: torch.Tensor, taps: int, f_history: torch.Tensor | None = None) -> torch.Tensor:
    """eps_s = mean_c (f_s - mean(f_{s-1}, ..., f_{s-taps}))^2, with f before position 0 taken from
    ``f_history`` (b, taps, d), oldest first, or zeros. f (b, T, d) -> eps (b, T) fp32."""
    b, T, d = f.shape
    hist = f.new_zeros(b, taps, d) if f_history is None else f_history.to(f.dtype)
    fp = torch.cat([hist, f], dim=1).float()  # position s sits at index s + taps
    pred = sum(fp[:, taps - j : taps - j + T] for j in range(1, taps + 1)) / taps
    return ((fp[:, taps:] - pred) ** 2).mean(-1)


def select_from_scores_ref(eps: torch.Tensor, window: int, slots: int):
    """eps (b, T) -> positions (b, chunks, slots) int64 and valid (b, chunks, slots) bool.

    Chunk c (queries c*w .. c*w+w-1) remembers the ``slots`` positions s <= c*w - w with the largest
    eps, the earlier position winning ties. Slots with no eligible position are invalid and point at
    position 0."""
    b, T = eps.shape
    n_chunks = -(-T // window)
    s = torch.arange(T, device=eps.device)
    eligible = s[None, :] <= (torch.arange(n_chunks, device=eps.device)[:, None] * window - window)
    masked = eps.float()[:, None, :].masked_fill(~eligible[None], float("-inf"))  # (b, chunks, T)
    if T < slots:  # pad so that there are always `slots` candidates
        masked = torch.cat([masked, masked.new_full((b, n_chunks, slots - T), float("-inf"))], -1)
    # candidates are in position order, so a stable sort by eps (descending) puts the earlier one first on ties
    idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :slots]
    valid = torch.gather(masked, -1, idx) > float("-inf")
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def innovation_select_ref(f: torch.Tensor, window: int, slots: int, taps: int):
    """f (b, T, d) -> memory positions (b, ceil(T/w), slots) and validity (docs/design.md, "The layer",
    steps 3-4)."""
    return select_from_scores_ref(innovation_scores_ref(f, taps), window, slots)
