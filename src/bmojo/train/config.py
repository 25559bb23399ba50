"""What a training run is: :class:`TrainConfig`, its checks, the model config it builds, and its
command-line parsing (``bmojo train`` flags, ``--config`` JSON, ``--model-override KEY=JSON``)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..data.mqar import MQARConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """One training run. ``data`` holds :class:`MQARConfig` fields of the training set; ``eval_data``
    overrides them for the evaluation set (default: ``eval_examples`` examples, seed ``data seed +
    10007``). Invalid settings raise ``ValueError`` naming the field when the config is made.

    Early stopping (``early_stop_patience > 0``, which needs ``eval_every > 0``): ``steps`` becomes a
    cap. After every periodic evaluation the run stops when the evaluation accuracy has not exceeded
    the best accuracy so far by more than ``early_stop_min_delta`` (a fraction: 0.005 is half a point)
    for ``early_stop_patience`` evaluations in a row, or as soon as the best accuracy is above
    ``1 - early_stop_min_delta`` (no improvement that large is left). The best accuracy that counts is
    the one of the last evaluation that improved on it by more than ``early_stop_min_delta``, so slow
    progress in small steps still resets the count once it adds up. The learning-rate schedule is still
    the one of ``steps``; the run ends with a checkpoint and the ``final`` export of the model at the
    step it stopped (not of the best evaluation; ``eval.json`` records ``early_stop``, the reason). No
    early stop happens before step ``early_stop_min_steps`` (MQAR often sits on a plateau before a
    sharp transition). The evaluations are kept in the checkpoints, so a resumed run takes the same
    decision as an uninterrupted one. See :func:`bmojo.train.loop.early_stop_decision`."""

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
    early_stop_patience: int = 0  # evaluations without improvement before stopping (0: train all `steps`)
    early_stop_min_delta: float = 0.005  # accuracy gain (fraction) that counts as an improvement
    early_stop_min_steps: int = 0  # never stop early before this step (a plateau before learning starts)
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

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "eval_examples", "keep_checkpoints"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "must be a positive int")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every", "threads", "seed",
                     "early_stop_patience", "early_stop_min_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be an int >= 0")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip",
                     "early_stop_min_delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        if not self.adam_eps > 0:
            bad("adam_eps", "must be > 0")
        if not 0 <= self.early_stop_min_delta < 1:
            bad("early_stop_min_delta", "must be in [0, 1) (an accuracy fraction)")
        if self.early_stop_patience and not self.eval_every:
            bad("early_stop_patience", "needs eval_every > 0 (early stopping reads the periodic evaluations)")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {sorted(DTYPES)}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            bad("distributed", "must be one of 'auto', 'none', 'ddp', 'fsdp'")
        for name in ("model_overrides", "data", "eval_data"):
            if not isinstance(getattr(self, name), dict):
                bad(name, "must be a dict (JSON object)")
        check_model_overrides(self.model_overrides)
        self.eval_data_config()  # the data settings, checked by MQARConfig (naming the field)
        try:  # the model settings, checked by BMojoConfig (naming the field)
            build_model_config(self, self.data_config().vocab_size)
        except ValueError as e:
            if str(e).startswith("TrainConfig"):
                raise
            raise ValueError(f"TrainConfig: model={self.model!r} (size {self.size!r}) with model_overrides "
                             f"{self.model_overrides}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig: expected a JSON object of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}{_suggest(unknown, names)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON TrainConfig ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_config(self) -> MQARConfig:
        return MQARConfig.from_dict(dict(self.data))

    def eval_data_config(self) -> MQARConfig:
        d = self.data_config().to_dict()
        d.update(seed=d["seed"] + 10007, num_examples=self.eval_examples)
        d.update(self.eval_data)
        return MQARConfig.from_dict(d)


# -- the model ---------------------------------------------------------------------------------------

def _suggest(unknown: list[str], known) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        if close:
            hints.append(f"{name!r}: did you mean {close[0]!r}?")
    return f" ({'; '.join(hints)})" if hints else ""


def bmojo_config_fields() -> dict[str, str]:
    """Every field a ``BMojoConfig`` takes, with its type annotation (text), plus the legacy
    ``rope_scaling`` it still reads."""
    from ..configuration_bmojo import BMojoConfig

    fields = {f.name: str(f.type) for f in dataclasses.fields(BMojoConfig)}
    fields.setdefault("rope_scaling", "dict | None")
    return fields


def _split_union(annotation: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in annotation:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def _matches(value, annotation: str) -> bool:
    """Whether a JSON value fits one alternative of a type annotation (unknown annotations accept)."""
    base, _, inner = annotation.partition("[")
    inner = inner[:-1] if inner.endswith("]") else inner
    if annotation in ("None", "NoneType"):
        return value is None
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation in ("str", "torch.dtype"):
        return isinstance(value, str)
    if base == "dict":
        return isinstance(value, dict)
    if base in ("list", "tuple"):
        return isinstance(value, list) and (not inner or all(any(_matches(v, a) for a in _split_union(inner))
                                                             for v in value))
    if base == "Literal":
        try:
            return value in ast.literal_eval(f"({inner},)")
        except (ValueError, SyntaxError):
            return True
    return True


def check_model_overrides(overrides: dict) -> None:
    """``model_overrides`` must name ``BMojoConfig`` fields with values of their types: raise
    ``ValueError`` naming an unknown field (and the closest known one) or a field, its value and the
    expected type."""
    fields = bmojo_config_fields()
    unknown = sorted(k for k in overrides if k not in fields)
    if unknown:
        raise ValueError(f"TrainConfig: model_overrides has unknown BMojoConfig field(s) {unknown}"
                         f"{_suggest(unknown, fields)}")
    for key, value in overrides.items():
        annotation = fields[key]
        if not any(_matches(value, alt) for alt in _split_union(annotation)):
            raise ValueError(f"TrainConfig: model_overrides[{key!r}]={value!r} has type {type(value).__name__}; "
                             f"BMojoConfig.{key} expects {annotation}")


def build_model_config(cfg: TrainConfig, vocab_size: int):
    """The BMojoConfig of the run: a preset (or a config.json) with ``model_overrides``; the vocabulary
    follows the data unless overridden."""
    from ..configuration_bmojo import BMojoConfig
    from ..presets import MEMBERS, preset_config

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


# -- command line ------------------------------------------------------------------------------------

_FLAGS = {  # flag -> TrainConfig field type
    "output_dir": str, "model": str, "size": str, "steps": int, "batch_size": int, "grad_accum": int,
    "lr": float, "min_lr_ratio": float, "warmup_steps": int, "weight_decay": float, "grad_clip": float,
    "dtype": str, "seed": int, "eval_every": int, "eval_batch_size": int, "eval_examples": int,
    "save_every": int, "log_every": int, "distributed": str, "threads": int, "early_stop_patience": int,
    "early_stop_min_delta": float, "early_stop_min_steps": int,
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
    """The TrainConfig of ``bmojo train`` flags (over ``--config``); raises ValueError naming the field."""
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
        if not sep or not key:
            raise ValueError(f"--model-override wants KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    d["model_overrides"] = overrides
    if args.no_progress:
        d["progress"] = False
    return TrainConfig.from_dict(d)


def cmd_train(args) -> int:
    """``bmojo train``: a bad setting or a diverged run ends with one line naming it (exit status 1)."""
    from .loop import TrainingDivergedError, train

    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except (ValueError, TrainingDivergedError, FileNotFoundError) as e:
        raise SystemExit(f"bmojo train: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result["final_eval"]
        print(f"bmojo train: {cfg.model} step {ev['step']}, eval accuracy {ev['accuracy']:.4f} "
              f"({ev['correct']}/{ev['total']}), {result['wall_s']:.1f} s; model in {result['final_dir']}")
    return 0


__all__ = ["DTYPES", "TrainConfig", "build_model_config", "check_model_overrides", "bmojo_config_fields",
           "add_train_arguments", "config_from_args", "cmd_train"]
