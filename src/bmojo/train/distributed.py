"""The process group of a run: one process, or ``torchrun`` with DDP or FSDP2 (gloo on CPU, NCCL on
GPU), through ``torch.distributed`` only."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistContext:
    """The process group, if any (``torchrun`` sets WORLD_SIZE / RANK / LOCAL_RANK). ``mode`` is
    ``none``, ``ddp``, ``fsdp`` or ``auto`` (ddp when WORLD_SIZE > 1). Also what
    :func:`bmojo.data.evaluate` needs to split rows over ranks (rank, world, device, all_sum)."""

    def __init__(self, mode: str):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if mode == "auto":
            mode = "ddp" if world > 1 else "none"
        if mode != "none" and world == 1 and not dist.is_initialized():
            # DDP / FSDP of one process still works (useful for checking a config): make a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
        if mode == "none" and world > 1:
            raise ValueError("TrainConfig: distributed='none' but WORLD_SIZE > 1 (use 'ddp' or 'fsdp')")
        self.mode = mode
        self.owns_group = False
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if mode != "none" and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    rank=int(os.environ.get("RANK", "0")), world_size=world)
            self.owns_group = True
        self.rank = dist.get_rank() if mode != "none" else 0
        self.world = dist.get_world_size() if mode != "none" else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.mode == "none":
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        if self.mode == "none":
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(raw: torch.nn.Module, dd: DistContext) -> torch.nn.Module:
    """``raw`` as the loop drives it: itself, DDP, or FSDP2 (each decoder layer, then the whole) in place."""
    if dd.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(raw, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
    if dd.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if dd.device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
            raise RuntimeError(f"distributed='fsdp' on CPU needs torch >= 2.7 (FSDP2 records events on CPU streams, "
                               f"which torch {torch.__version__} lacks); use distributed='ddp' or a newer torch")

        for layer in raw.model.layers:
            fully_shard(layer)
        fully_shard(raw)
    return raw


__all__ = ["DistContext", "free_port", "wrap_model"]
