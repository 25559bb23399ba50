"""The training loop: the optimizer recipe, the data order, the step, evaluation and saving.

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

Early stopping
    With ``early_stop_patience`` (see :class:`~bmojo.train.config.TrainConfig`), ``steps`` is a cap:
    after each periodic evaluation :func:`early_stop_decision` reads every evaluation so far and the
    run stops at that step (checkpoint, final export) when accuracy has stopped improving. The
    evaluations are saved in the checkpoints, so a resumed run decides as an uninterrupted one, and a
    run that had stopped stays stopped.

Divergence
    Before each optimizer step the global loss and gradient norm must be finite, and before each save
    every parameter: otherwise :class:`TrainingDivergedError` names the step and the value, on every
    rank, and nothing is written for that step (earlier checkpoints stay as they were).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from ..data.mqar_eval import autocast_context, evaluate
from .checkpoint_io import (FINAL, check_loaded, clean_stale, export_final, latest_checkpoint, load_model_weights,
                            load_trainer_state, save_checkpoint)
from .config import DTYPES, TrainConfig, build_model_config
from .distributed import DistContext, wrap_model


class TrainingDivergedError(FloatingPointError):
    """The loss, the gradient norm or a parameter stopped being finite; the message names the step."""


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


def early_stop_decision(accuracies: list[float], patience: int, min_delta: float) -> str | None:
    """Why a run whose evaluations so far scored ``accuracies`` (in order) should stop, or None.

    The reference is the best accuracy so far, updated only by an evaluation that beats it by more than
    ``min_delta``; the run stops after ``patience`` evaluations in a row that do not, or as soon as some
    accuracy exceeds ``1 - min_delta`` (no gain of more than ``min_delta`` is possible any more).
    ``patience`` 0 never stops."""
    if not patience or not accuracies:
        return None
    if max(accuracies) > 1 - min_delta:
        return f"accuracy {max(accuracies):.4f} > 1 - min_delta: no improvement of more than {min_delta:g} is left"
    best, since = accuracies[0], 0
    for a in accuracies[1:]:
        if a > best + min_delta:
            best, since = a, 0
        else:
            since += 1
    if since >= patience:
        return (f"no evaluation improved accuracy by more than {min_delta:g} over {best:.4f} in the last "
                f"{since} evaluation(s) (patience {patience})")
    return None


def _log(output_dir: str, rec: dict) -> None:
    with open(os.path.join(output_dir, "log.jsonl"), "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _non_finite_parameters(raw: torch.nn.Module, dd: DistContext) -> tuple[int, str | None]:
    """How many parameters hold NaN or inf over all ranks (every rank must call this), and the name of
    one this rank sees."""
    first, count = None, 0
    for name, p in raw.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 shards are DTensors
        if not bool(torch.isfinite(local.detach()).all()):
            count += 1
            first = first or name
    (total,) = dd.all_sum([count])
    return int(total), first


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) ``cfg``. Returns ``history`` (one dict per step run in this call: step, loss,
    lr, grad_norm, tokens_per_s), ``evals`` (the periodic evaluations of this call), ``eval_history``
    (all of the run's, resumed ones included), ``final_eval``, ``stopped_early`` (the reason, or None
    when the run trained all ``steps``), ``wall_s``, ``resumed_from`` and the path of the ``final``
    export. Raises :class:`TrainingDivergedError` at the first step whose loss or gradient norm is not
    finite."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )
    from tqdm.auto import tqdm

    from ..modeling_bmojo import BMojoForCausalLM

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = DistContext(cfg.distributed)
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
        model = wrap_model(raw, dd)
        opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay, nwd), lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)

        # resume
        step, history_all, evals_all, resumed_from = 0, [], [], None
        if dd.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            clean_stale(cfg.output_dir)
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
            check_loaded(raw, ckpt)
            set_optimizer_state_dict(raw, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
            sched.load_state_dict(state["scheduler"])
            rng = state["rng"]
            torch.set_rng_state(rng[dd.rank] if dd.rank < len(rng) else rng[0])
            step, history_all, resumed_from = state["step"], list(state["history"]), ckpt
            evals_all = list(state.get("evals", []))  # checkpoints written before early stopping have none

        def stop_reason(step_now: int) -> str | None:
            if not cfg.early_stop_patience or step_now < cfg.early_stop_min_steps:
                return None
            return early_stop_decision([e["accuracy"] for e in evals_all], cfg.early_stop_patience,
                                       cfg.early_stop_min_delta)

        def require_finite_parameters(step_now: int, what: str) -> None:
            bad, name = _non_finite_parameters(raw, dd)
            if bad:
                raise TrainingDivergedError(
                    f"training diverged: after step {step_now}, {bad} parameter tensor(s) hold NaN or inf "
                    f"(e.g. {name!r}); {what} was not written (lr={cfg.lr:g})")

        def checkpoint(step_now: int) -> None:
            require_finite_parameters(step_now, f"checkpoint ckpt-{step_now:07d}")
            model_sd = get_model_state_dict(raw, options=full)
            optim_sd = get_optimizer_state_dict(raw, opt, options=full)
            rng_states = dd.all_gather_object(torch.get_rng_state())
            if dd.main:
                trainer_state = {
                    "step": step_now, "data_position": step_now * B, "batch_size": B,
                    "optimizer": optim_sd, "scheduler": sched.state_dict(), "rng": rng_states,
                    "history": history_all, "evals": evals_all, "data": data_cfg.to_dict(), "world_size": dd.world,
                }
                save_checkpoint(cfg.output_dir, step_now, raw, model_sd, trainer_state, data_cfg, cfg)
            dd.barrier()

        history, evals = [], []
        n_global_tokens = B * data_cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step",
                   disable=not (dd.main and cfg.progress), dynamic_ncols=True)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
        stopped = stop_reason(step) if step < cfg.steps else None  # a resumed run that had stopped stays stopped
        while step < cfg.steps and stopped is None:
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
                    with autocast_context(dd.device, dtype):
                        out = model(input_ids=x, labels=y, use_cache=False, num_items_in_batch=n_items)
                    (out.loss * W).backward()
                loss_local += float(out.loss.detach())
            gn = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            (loss,) = dd.all_sum([loss_local])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                last = latest_checkpoint(cfg.output_dir)
                raise TrainingDivergedError(
                    f"training diverged at step {step + 1}: loss={loss!r}, grad_norm={grad_norm!r} "
                    f"(lr={cfg.lr:g}, this step's lr {opt.param_groups[0]['lr']:g}); stopped before the "
                    f"optimizer step, nothing was written for it; "
                    + (f"the last checkpoint is {last}" if last else "no checkpoint was written"))
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
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
                evals_all.append(ev)
                if dd.main:
                    bar.write(f"step {step}: eval accuracy {ev['accuracy']:.4f} loss {ev['loss']:.4f}")
                    _log(cfg.output_dir, {"eval": ev})
                stopped = stop_reason(step)
                if stopped is not None and dd.main:
                    bar.write(f"step {step}: early stop: {stopped}")
                    _log(cfg.output_dir, {"early_stop": {"step": step, "reason": stopped}})
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopped is not None:
                checkpoint(step)
        bar.close()

        if stopped is not None and evals_all and evals_all[-1]["step"] == step:
            final_eval = dict(evals_all[-1])  # the model has not changed since this evaluation
        else:
            final_eval = evaluate(model, evald.inputs, evald.labels, cfg.eval_batch_size, dd, dtype) | {"step": step}
        if stopped is not None:
            final_eval["early_stop"] = stopped
        final_dir = os.path.join(cfg.output_dir, FINAL)
        require_finite_parameters(step, f"the export {final_dir}")
        model_sd = get_model_state_dict(raw, options=full)
        if dd.main:
            _log(cfg.output_dir, {"final_eval": final_eval})
            export_final(raw, model_sd, final_dir, data_cfg, eval_cfg, final_eval, cfg)
        dd.barrier()
        return {"history": history, "evals": evals, "eval_history": evals_all, "stopped_early": stopped,
                "final_eval": final_eval, "resumed_from": resumed_from,
                "wall_s": time.perf_counter() - t_start, "final_dir": final_dir, "world_size": dd.world,
                "model_config": raw.config.to_dict(), "params": sum(p.numel() for p in model_sd.values())
                if dd.main else None}
    finally:
        dd.close()


__all__ = ["TrainingDivergedError", "train", "early_stop_decision", "no_weight_decay", "param_groups", "lr_lambda", "global_batch_indices"]
