"""Training for the bmojo zoo: one process, or ``torchrun`` with DDP or FSDP2 (gloo on CPU, NCCL on GPU).

The task is MQAR (:mod:`bmojo.data.mqar`); the model is a zoo preset (:mod:`bmojo.presets`) or a
``config.json``. Everything the run needs is a :class:`TrainConfig`, given as a JSON file and/or
command-line flags (``bmojo train --help``).

Recipe
    AdamW; no weight decay on parameters flagged ``_no_weight_decay`` (Mamba's ``A_log``, ``D`` and
    ``dt_proj.bias``), on every 1-D parameter (norm weights, biases) and on the embeddings. Linear
    warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``.
    Gradient-norm clipping. fp32 or bf16 (``torch.autocast``; parameters and optimizer state stay fp32).
    Gradient accumulation over ``grad_accum`` micro-batches.

Batches and exact loss
    Step ``s`` consumes global examples ``s*B .. s*B + B - 1`` of an endless stream of per-epoch
    permutations (``torch.randperm`` seeded by ``seed`` and the epoch), so the data position is the
    step. Rank ``r`` of ``W`` takes the ``r``-th contiguous ``B/W`` of them, cut into ``grad_accum``
    micro-batches. Each micro-batch's loss is its summed token cross-entropy divided by the number of
    answer tokens in the whole global batch (HF's ``num_items_in_batch``), times ``W`` because DDP
    and FSDP average gradients over ranks. The gradient is therefore the same as one process
    computing the token-mean loss of the global batch, whatever ``W`` and ``grad_accum`` are.

Checkpoints
    ``output_dir/ckpt-<step>/`` holds ``model.safetensors`` + ``config.json`` (``save_pretrained``,
    loadable with ``from_pretrained``), ``trainer_state.pt`` (optimizer, scheduler, per-rank RNG
    states, step, data position, loss history: tensors and plain containers only, loaded with
    ``weights_only=True``), ``mqar.json`` and ``train_config.json``. A checkpoint is written into a
    temporary directory, flushed, then renamed into place (``os.replace``), and only then does the
    ``output_dir/latest`` pointer (itself replaced atomically) move to it. A run killed at any moment
    leaves ``latest`` naming a complete checkpoint. Rerunning the same command resumes from it and
    reproduces the uninterrupted run's losses exactly. Full (unsharded) model and optimizer state
    dicts are gathered with ``torch.distributed.checkpoint.state_dict`` so a checkpoint written under
    one mode (single process, DDP, FSDP2) resumes under another.

At the end, ``output_dir/final/`` receives the trained model (``save_pretrained``: safetensors,
config.json, import shims, generation_config.json), ``mqar.json`` (the training data), and
``eval.json`` (accuracy on the evaluation set, whose ``MQARConfig`` it records).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .data.mqar import MQARConfig, count_correct

TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """One training run. ``data`` holds :class:`MQARConfig` fields of the training set; ``eval_data``
    overrides them for the evaluation set (default: ``eval_examples`` examples, seed ``data seed +
    10007``)."""

    output_dir: str = "runs/mqar"
    # model: a zoo member ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo") or the path of
    # a config.json / a directory holding one; model_overrides are BMojoConfig fields
    model: str = "bmojo"
    size: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    # data
    data: dict = field(default_factory=dict)
    eval_data: dict = field(default_factory=dict)
    eval_examples: int = 500
    # optimisation
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    dtype: str = "float32"  # or "bfloat16" (autocast)
    seed: int = 0
    # loop
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batch_size: int = 64
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 1
    log_every: int = 10
    distributed: str = "auto"  # "none", "ddp", "fsdp"; auto: ddp when WORLD_SIZE > 1
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    progress: bool = True

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def bad(name, why):
            raise ValueError(f"TrainConfig: {name}={getattr(self, name)!r} is invalid: {why}")

        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "eval_examples", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive int")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be an int >= 0")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {sorted(DTYPES)}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            bad("distributed", "must be one of 'auto', 'none', 'ddp', 'fsdp'")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            bad("lr", f"needs lr > 0 and 0 <= min_lr_ratio <= 1 (min_lr_ratio={self.min_lr_ratio})")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_config(self) -> MQARConfig:
        return MQARConfig.from_dict(dict(self.data))

    def eval_data_config(self) -> MQARConfig:
        d = self.data_config().to_dict()
        d.update(seed=d["seed"] + 10007, num_examples=self.eval_examples)
        d.update(self.eval_data)
        return MQARConfig.from_dict(d)


# -- pieces -----------------------------------------------------------------------------------------

def build_model_config(cfg: TrainConfig, vocab_size: int):
    """The BMojoConfig of the run: a preset (or a config.json) with ``model_overrides``; the vocabulary
    follows the data unless overridden."""
    from .configuration_bmojo import BMojoConfig
    from .presets import MEMBERS, preset_config

    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", vocab_size)
    if cfg.model in MEMBERS:
        return preset_config(cfg.model, cfg.size, **overrides)
    if not os.path.exists(cfg.model):
        raise ValueError(f"TrainConfig: model={cfg.model!r} is neither a zoo member {MEMBERS} nor a path")
    base = BMojoConfig.from_pretrained(cfg.model).to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "model_type"):
        base.pop(key, None)
    base.update(overrides)
    return BMojoConfig(**base)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters AdamW must not decay: flagged ``_no_weight_decay`` (A_log, D, dt bias),
    1-D (norm weights, biases), or an embedding."""
    return bool(getattr(param, "_no_weight_decay", False)) or param.ndim < 2 or "embed" in name


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in no_decay_names else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup over ``warmup`` steps, cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def global_batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> torch.Tensor:
    """Example indices of step ``step``: positions ``step*B .. step*B+B-1`` of the stream made of
    one ``randperm(num_examples)`` per epoch (epoch e seeded with ``seed * 1_000_003 + e``)."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, num_examples)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_examples, generator=g)
        take = min(num_examples - offset, start + batch_size - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


class _Dist:
    """The process group, if any (``torchrun`` sets WORLD_SIZE / RANK / LOCAL_RANK)."""

    def __init__(self, mode: str):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if mode == "auto":
            mode = "ddp" if world > 1 else "none"
        if mode != "none" and world == 1 and not dist.is_initialized():
            # DDP / FSDP of one process still works (useful for checking a config): make a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
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

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- checkpoints ------------------------------------------------------------------------------------

def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_pretrained(raw_model, model_sd: dict, path: str) -> None:
    from transformers.utils import logging as hf_logging

    if raw_model.config.tie_word_embeddings:  # a gathered (FSDP) state dict holds tied copies twice
        tied = set(getattr(raw_model, "_tied_weights_keys", None) or {})
        model_sd = {k: v for k, v in model_sd.items() if k not in tied}
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for every checkpoint
    try:
        raw_model.save_pretrained(path, state_dict=model_sd)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _write_model(raw_model, model_sd: dict, path: str) -> None:
    _save_pretrained(raw_model, model_sd, path)


def _write_trainer_state(state: dict, path: str) -> None:
    torch.save(state, os.path.join(path, TRAINER_STATE))


def latest_checkpoint(output_dir: str) -> str | None:
    """The directory ``output_dir/latest`` names, or None."""
    pointer = os.path.join(output_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(output_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a directory")
    return path


def _point_latest(output_dir: str, name: str) -> None:
    tmp = os.path.join(output_dir, f".{LATEST}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(output_dir, LATEST))
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale(output_dir: str) -> None:
    """Remove temporary directories/files left by a run killed while saving."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if ".tmp-" in name:
            p = os.path.join(output_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def save_checkpoint(output_dir: str, step: int, raw_model, model_sd: dict, trainer_state: dict,
                    data_cfg: MQARConfig, cfg: TrainConfig) -> str:
    """Write ``ckpt-<step>`` atomically (main rank only) and move ``latest`` to it."""
    name = f"ckpt-{step:07d}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f".{name}.tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    _write_model(raw_model, model_sd, tmp)
    _write_trainer_state(trainer_state, tmp)
    data_cfg.save(os.path.join(tmp, "mqar.json"))
    with open(os.path.join(tmp, "train_config.json"), "w") as fh:
        json.dump(cfg.to_dict(), fh, indent=2)
    _fsync_tree(tmp)
    if os.path.exists(final):  # a complete checkpoint of this step that `latest` never named
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(output_dir, name)
    ckpts = sorted(n for n in os.listdir(output_dir) if n.startswith("ckpt-") and ".tmp-" not in n)
    for old in ckpts[: -cfg.keep_checkpoints]:
        if old != name:
            shutil.rmtree(os.path.join(output_dir, old), ignore_errors=True)
    return final


def load_trainer_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, TRAINER_STATE), weights_only=True, map_location="cpu")


def load_model_weights(ckpt: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, "model.safetensors"))


# -- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, dd: _Dist | None = None,
             dtype: torch.dtype = torch.float32) -> dict:
    """MQAR accuracy at the answer positions. Rows are split over ranks (every rank runs the same number
    of forwards, as FSDP needs); counts are summed. Returns accuracy, correct, total, loss."""
    rank, world = (dd.rank, dd.world) if dd is not None else (0, 1)
    device = dd.device if dd is not None else next(model.parameters()).device
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
        with _autocast(device, dtype):
            out = model(input_ids=x, labels=y, use_cache=False, num_items_in_batch=1)
        if not dummy:
            c, t = count_correct(out.logits.float(), y)
            correct, total, loss_sum = correct + c, total + t, loss_sum + float(out.loss)
    if dd is not None:
        correct, total, loss_sum = dd.all_sum([correct, total, loss_sum])
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "correct": int(correct), "total": int(total),
            "loss": loss_sum / max(total, 1)}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- the loop ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) ``cfg``. Returns ``history`` (one dict per step run in this call: step, loss,
    lr, grad_norm, tokens_per_s), ``evals``, ``final_eval``, ``wall_s``, ``resumed_from`` and the
    path of the ``final`` export."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )
    from tqdm.auto import tqdm

    from .modeling_bmojo import BMojoForCausalLM

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = _Dist(cfg.distributed)
    try:
        data_cfg, eval_cfg = cfg.data_config(), cfg.eval_data_config()
        B, W, A = cfg.batch_size, dd.world, cfg.grad_accum
        if B % (W * A):
            raise ValueError(f"TrainConfig: batch_size={B} must be divisible by world size {W} x grad_accum {A}")
        micro = B // (W * A)
        data = data_cfg.generate()
        evald = eval_cfg.generate()
        dtype = DTYPES[cfg.dtype]

        # identical initialisation on every rank
        torch.manual_seed(cfg.seed)
        raw = BMojoForCausalLM(build_model_config(cfg, data_cfg.vocab_size)).to(dd.device)
        raw.train()
        nwd = {n for n, p in raw.named_parameters() if no_weight_decay(n, p)}
        model = raw
        if dd.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(raw, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
        elif dd.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in raw.model.layers:
                fully_shard(layer)
            fully_shard(raw)
        opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay, nwd), lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)

        # resume
        step, history_all, resumed_from = 0, [], None
        if dd.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            _clean_stale(cfg.output_dir)
        dd.barrier()
        ckpt = latest_checkpoint(cfg.output_dir)
        if ckpt is not None:
            state = load_trainer_state(ckpt)
            if state["batch_size"] != B or state["data_position"] != state["step"] * B:
                raise ValueError(f"{ckpt}: saved with batch_size={state['batch_size']}, data position "
                                 f"{state['data_position']}; this run has batch_size={B}")
            if state["data"] != data_cfg.to_dict():
                raise ValueError(f"{ckpt}: trained on data {state['data']}, this run asks for {data_cfg.to_dict()}")
            set_model_state_dict(raw, load_model_weights(ckpt),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
            _check_loaded(raw, ckpt)
            set_optimizer_state_dict(raw, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
            sched.load_state_dict(state["scheduler"])
            rng = state["rng"]
            torch.set_rng_state(rng[dd.rank] if dd.rank < len(rng) else rng[0])
            step, history_all, resumed_from = state["step"], list(state["history"]), ckpt

        def checkpoint(step_now: int) -> None:
            model_sd = get_model_state_dict(raw, options=full)
            optim_sd = get_optimizer_state_dict(raw, opt, options=full)
            rng_states = [torch.get_rng_state()]
            if dd.mode != "none":
                gathered = [None] * dd.world
                dist.all_gather_object(gathered, torch.get_rng_state())
                rng_states = gathered
            if dd.main:
                trainer_state = {
                    "step": step_now, "data_position": step_now * B, "batch_size": B,
                    "optimizer": optim_sd, "scheduler": sched.state_dict(), "rng": rng_states,
                    "history": history_all, "data": data_cfg.to_dict(), "world_size": dd.world,
                }
                save_checkpoint(cfg.output_dir, step_now, raw, model_sd, trainer_state, data_cfg, cfg)
            dd.barrier()

        history, evals = [], []
        n_global_tokens = B * data_cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step",
                   disable=not (dd.main and cfg.progress), dynamic_ncols=True)
        while step < cfg.steps:
            t0 = time.perf_counter()
            idx = global_batch_indices(step, B, len(data), cfg.seed)
            n_items = int((data.labels[idx, 1:] != -100).sum())
            mine = idx[dd.rank * (B // W) : (dd.rank + 1) * (B // W)]
            loss_local = 0.0
            for a in range(A):
                rows = mine[a * micro : (a + 1) * micro]
                x, y = data.inputs[rows].to(dd.device), data.labels[rows].to(dd.device)
                last = a == A - 1
                sync = contextlib.nullcontext()
                if dd.mode == "ddp" and not last:
                    sync = model.no_sync()
                elif dd.mode == "fsdp":
                    raw.set_requires_gradient_sync(last)
                with sync:
                    with _autocast(dd.device, dtype):
                        out = model(input_ids=x, labels=y, use_cache=False, num_items_in_batch=n_items)
                    (out.loss * W).backward()
                loss_local += float(out.loss.detach())
            grad_norm = float("nan")
            if cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            (loss,) = dd.all_sum([loss_local])
            step += 1
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": loss, "lr": lr_now, "grad_norm": grad_norm,
                   "tokens_per_s": n_global_tokens / dt}
            history.append(rec)
            history_all.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if dd.main and cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                _log(cfg.output_dir, rec)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                ev = evaluate(model, evald.inputs, evald.labels, cfg.eval_batch_size, dd, dtype) | {"step": step}
                evals.append(ev)
                if dd.main:
                    bar.write(f"step {step}: eval accuracy {ev['accuracy']:.4f} loss {ev['loss']:.4f}")
                    _log(cfg.output_dir, {"eval": ev})
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                checkpoint(step)
        bar.close()

        final_eval = evaluate(model, evald.inputs, evald.labels, cfg.eval_batch_size, dd, dtype) | {"step": step}
        final_dir = os.path.join(cfg.output_dir, "final")
        model_sd = get_model_state_dict(raw, options=full)
        if dd.main:
            _log(cfg.output_dir, {"final_eval": final_eval})
            export_final(raw, model_sd, final_dir, data_cfg, eval_cfg, final_eval, cfg)
        dd.barrier()
        return {"history": history, "evals": evals, "final_eval": final_eval, "resumed_from": resumed_from,
                "wall_s": time.perf_counter() - t_start, "final_dir": final_dir, "world_size": dd.world,
                "model_config": raw.config.to_dict(), "params": sum(p.numel() for p in model_sd.values())
                if dd.main else None}
    finally:
        dd.close()


def _check_loaded(raw, ckpt: str) -> None:
    """Every parameter except tied copies must have come from the checkpoint."""
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as fh:
        have = set(fh.keys())
    tied = set(getattr(raw, "_tied_weights_keys", None) or {}) if raw.config.tie_word_embeddings else set()
    missing = [n for n, _ in raw.named_parameters() if n not in have and n not in tied]
    if missing:
        raise ValueError(f"{ckpt}: model.safetensors lacks parameters {missing}")


def _log(output_dir: str, rec: dict) -> None:
    with open(os.path.join(output_dir, "log.jsonl"), "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def export_final(raw, model_sd: dict, path: str, data_cfg: MQARConfig, eval_cfg: MQARConfig, final_eval: dict,
                 cfg: TrainConfig) -> None:
    """The inference export: save_pretrained files, mqar.json (training data), eval.json."""
    tmp = path.rstrip("/") + f".tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    _save_pretrained(raw, model_sd, tmp)
    data_cfg.save(os.path.join(tmp, "mqar.json"))
    with open(os.path.join(tmp, "eval.json"), "w") as fh:
        json.dump({"eval_data": eval_cfg.to_dict(), **{k: final_eval[k] for k in ("accuracy", "correct", "total",
                   "loss", "step")}, "dtype": cfg.dtype}, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(tmp, "train_config.json"), "w") as fh:
        json.dump(cfg.to_dict(), fh, indent=2)
        fh.write("\n")
    _fsync_tree(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


# -- command line -----------------------------------------------------------------------------------

_FLAGS = {  # flag -> (TrainConfig field or data field, type)
    "output_dir": str, "model": str, "size": str, "steps": int, "batch_size": int, "grad_accum": int,
    "lr": float, "min_lr_ratio": float, "warmup_steps": int, "weight_decay": float, "grad_clip": float,
    "dtype": str, "seed": int, "eval_every": int, "eval_batch_size": int, "eval_examples": int,
    "save_every": int, "log_every": int, "distributed": str, "threads": int,
}
_DATA_FLAGS = {"vocab_size": int, "seq_len": int, "num_kv_pairs": int, "power_a": float, "num_examples": int,
               "data_seed": int}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bmojo train`` flags; each overrides the same field of ``--config``."""
    p.add_argument("--config", help="TrainConfig as JSON (fields of bmojo.train.TrainConfig)")
    for name, typ in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, dest=name)
    for name, typ in _DATA_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, dest=name,
                       help="MQAR data setting" if name != "data_seed" else "MQAR data seed")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=JSON",
                   help="a BMojoConfig field, e.g. --model-override hidden_size=64 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=cmd_train)


def config_from_args(args) -> TrainConfig:
    d = TrainConfig.load(args.config).to_dict() if args.config else {}
    for name in _FLAGS:
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    data = dict(d.get("data", {}))
    for name in _DATA_FLAGS:
        v = getattr(args, name)
        if v is not None:
            data["seed" if name == "data_seed" else name] = v
    d["data"] = data
    overrides = dict(d.get("model_overrides", {}))
    for item in args.model_override:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bmojo train: --model-override wants KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    d["model_overrides"] = overrides
    if args.no_progress:
        d["progress"] = False
    return TrainConfig.from_dict(d)


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result["final_eval"]
        print(f"bmojo train: {cfg.model} step {ev['step']}, eval accuracy {ev['accuracy']:.4f} "
              f"({ev['correct']}/{ev['total']}), {result['wall_s']:.1f} s; model in {result['final_dir']}")
    return 0


__all__ = ["TrainConfig", "train", "evaluate", "save_checkpoint", "latest_checkpoint", "load_trainer_state",
           "global_batch_indices", "lr_lambda", "no_weight_decay", "param_groups", "build_model_config",
           "add_train_arguments", "cmd_train"]
