"""Helpers shared by the torch backend's implementations."""
from __future__ import annotations

import torch


def traceable(x: torch.Tensor) -> bool:
    """Whether the sequence length (dim 1) is symbolic: ``torch.export(..., strict=False)`` with a dynamic
    T (or ``make_fx`` symbolic tracing). Then an op takes its shape-polymorphic path: no Python branch
    or loop on T, no host read. Eager calls and static-shape tracing keep the fast path; so does dynamo
    (``torch.compile``, strict export), which shows sizes as ints and guards on them instead. (A shape
    choice, not a device choice: device choices are registered in ``bmojo.backends.torch.OPS``.)"""
    return isinstance(x.shape[1], torch.SymInt)


def first_rows(t: torch.Tensor, n) -> torch.Tensor:
    """The first ``n`` rows of dim 1, as a fresh tensor: a gather, since a slice ``[:, :n]`` of a padded
    length makes ``torch.export`` guard on the (unprovable) relation between n and that length."""
    return t.index_select(1, torch.arange(n, device=t.device))
