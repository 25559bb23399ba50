"""Innovation scores for the torch backend, every position at once (docs/design.md, "The layer", step 3).

The scores are computed in place in one buffer, with the reference's arithmetic in the reference's
order, so they are bitwise equal to ``innovation_scores_ref`` (and the decoder's): the parallel selection
and step-by-step decoding can never disagree on a near tie. With a symbolic T (``torch.export`` with a
dynamic T) the slice bounds of the in-place form would branch on T; :func:`innovation_scores_traceable`
runs the same arithmetic on a padded copy instead.
"""
from __future__ import annotations

import torch

from ..utils import traceable as _traceable


def innovation_scores_traceable(f: torch.Tensor, taps: int, f_history: torch.Tensor | None = None) -> torch.Tensor:
    """eps (b, T) fp32 with no Python control flow on T: f (b, T, d) after ``f_history`` (b, taps, d) (oldest
    first; zeros if None) in one padded fp32 copy, pred = ((0 + f[s-1]) + f[s-2] + ...) / taps, then the
    mean over channels of (f[s] - pred)^2: the reference's operations, in its order."""
    b, T, d = f.shape
    hist = f.new_zeros(b, taps, d) if f_history is None else f_history.to(f.dtype)
    fp = torch.cat([hist, f], dim=1).float()  # position s at index s + taps
    pred = sum(fp[:, taps - j : taps - j + T] for j in range(1, taps + 1)) / taps
    return ((fp[:, taps:] - pred) ** 2).mean(-1)


@torch.no_grad()
def innovation_scores_inplace(f: torch.Tensor, taps: int, f_history: torch.Tensor | None = None) -> torch.Tensor:
    """Bitwise the same as ``innovation_scores_ref`` (not differentiated), with one (b, T, d) fp32
    buffer instead of a padded copy and a temporary per operation: pred = ((f[s-1] + f[s-2]) + ...) /
    taps, then (f[s] - pred)^2, then the mean over channels, each op as the reference runs it."""
    if _traceable(f):  # the slice bounds below branch on T
        return innovation_scores_traceable(f, taps, f_history)
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
    pred.neg_().add_(fp)  # fp - pred exactly, in place (out= has no autograd, which tracing can need)
    return pred.mul_(pred).mean(-1)
