"""MQAR evaluation: a model's recall accuracy on an MQAR data set (:mod:`bmojo.data.mqar`).

Used by the trainer (periodic and final evaluation, split over ranks), by ``bmojo bench`` (the
shipped checkpoints' accuracy) and by the tests; it needs nothing from :mod:`bmojo.train`.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from .mqar import count_correct


class RankGroup(Protocol):
    """What :func:`evaluate` needs of a process group (``bmojo.train.distributed.DistContext`` is one)."""

    rank: int
    world: int
    device: torch.device

    def all_sum(self, values: list[float]) -> list[float]: ...


def autocast_context(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, group: RankGroup | None = None,
             dtype: torch.dtype = torch.float32) -> dict:
    """MQAR accuracy at the answer positions (argmax, HF causal alignment). With ``group``, rows are split
    over its ranks (every rank runs the same number of forwards, as FSDP needs) and the counts are summed.
    Returns ``accuracy``, ``correct``, ``total`` and ``loss`` (token-mean cross-entropy)."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    device = group.device if group is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = inputs.shape[0]
    per_rank = -(-n // world)
    rows = torch.arange(rank * per_rank, min(n, (rank + 1) * per_rank))
    correct = total = 0
    loss_sum = 0.0
    for i in range(-(-per_rank // batch_size)):
        idx = rows[i * batch_size : (i + 1) * batch_size]
        dummy = idx.numel() == 0
        if dummy:
            idx = torch.zeros(1, dtype=torch.long)
        x, y = inputs[idx].to(device), labels[idx].to(device)
        with autocast_context(device, dtype):
            out = model(input_ids=x, labels=y, use_cache=False, num_items_in_batch=1)
        if not dummy:
            c, t = count_correct(out.logits.float(), y)
            correct, total, loss_sum = correct + c, total + t, loss_sum + float(out.loss)
    if group is not None:
        correct, total, loss_sum = group.all_sum([correct, total, loss_sum])
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "correct": int(correct), "total": int(total),
            "loss": loss_sum / max(total, 1)}


__all__ = ["evaluate", "autocast_context", "RankGroup"]
