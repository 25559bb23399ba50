"""Checkpoint IO of a run: crash-safe saves, resume, and the ``final`` export.

``output_dir/ckpt-<step>/`` holds ``model.safetensors`` + ``config.json`` (``save_pretrained``,
loadable with ``from_pretrained``), ``trainer_state.pt`` (optimizer, scheduler, per-rank RNG states,
step, data position, loss history: tensors and plain containers only, loaded with
``weights_only=True``), ``mqar.json`` and ``train_config.json``. A checkpoint is written into a
temporary directory, flushed, then renamed into place (``os.replace``), and only then does the
``output_dir/latest`` pointer (itself replaced atomically) move to it: a run killed at any moment
leaves ``latest`` naming a complete checkpoint.

``output_dir/final`` is the inference export. It is a symbolic link to a complete directory
``final.v<hex>``: a new export is written beside it, renamed to its own ``final.v<hex>``, and the link
is swapped with ``os.replace`` (atomic), so ``final`` always names a complete export, the old one
until the swap and the new one after; the old directory is deleted only after the swap. (Where
symbolic links are unavailable, and once for a ``final`` that is still a plain directory, the old
export is renamed aside before the new one is renamed in; a run killed between the two renames
leaves the old one aside, and the next run puts it back.)

Nothing non-finite is written: :func:`save_checkpoint` and :func:`export_final` refuse a state dict
holding NaN or inf, naming the tensor.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid

import torch

from ..data.mqar import MQARConfig

TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
FINAL = "final"


class NonFiniteStateError(FloatingPointError):
    """A state dict about to be written holds NaN or inf."""


# -- files ------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
    else:
        shutil.rmtree(path)


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _require_finite(model_sd: dict, path: str) -> None:
    bad = first_non_finite(model_sd)
    if bad is not None:
        raise NonFiniteStateError(f"refusing to write {path}: tensor {bad!r} holds NaN or inf")


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


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


# -- checkpoints ------------------------------------------------------------------------------------

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
    _fsync_dir(output_dir)


def clean_stale(output_dir: str) -> None:
    """Remove what a run killed while saving left behind (temporary directories, files and links), and
    repair an interrupted ``final`` swap (:func:`recover_export`)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if ".tmp-" in name:
            _remove(os.path.join(output_dir, name))
    recover_export(os.path.join(output_dir, FINAL))


def save_checkpoint(output_dir: str, step: int, raw_model, model_sd: dict, trainer_state: dict,
                    data_cfg: MQARConfig, cfg) -> str:
    """Write ``ckpt-<step>`` atomically (main rank only) and move ``latest`` to it."""
    name = f"ckpt-{step:07d}"
    final = os.path.join(output_dir, name)
    _require_finite(model_sd, final)
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


def check_loaded(raw, ckpt: str) -> None:
    """Every parameter except tied copies must have come from the checkpoint."""
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as fh:
        have = set(fh.keys())
    tied = set(getattr(raw, "_tied_weights_keys", None) or {}) if raw.config.tie_word_embeddings else set()
    missing = [n for n, _ in raw.named_parameters() if n not in have and n not in tied]
    if missing:
        raise ValueError(f"{ckpt}: model.safetensors lacks parameters {missing}")


# -- the final export -------------------------------------------------------------------------------

def _versions(parent: str, name: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(name)}\.v[0-9a-f]{{32}}$")
    return sorted(n for n in os.listdir(parent) if pattern.match(n))


def _asides(parent: str, name: str) -> list[str]:
    pattern = re.compile(rf"^\.{re.escape(name)}\.old-[0-9a-f]{{32}}$")
    return sorted((n for n in os.listdir(parent) if pattern.match(n)),
                  key=lambda n: os.path.getmtime(os.path.join(parent, n)))


def recover_export(path: str) -> None:
    """Repair what an interrupted :func:`publish_dir` left: put a renamed-aside export back where
    ``path`` is missing, and delete asides and ``<name>.v<hex>`` directories ``path`` does not name."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return
    asides = _asides(parent, name)
    if not os.path.lexists(path) and asides:
        os.rename(os.path.join(parent, asides.pop()), path)  # the last complete export
        _fsync_dir(parent)
    for aside in asides:
        _remove(os.path.join(parent, aside))
    current = os.readlink(path) if os.path.islink(path) else None
    for version in _versions(parent, name):
        if version != current:
            _remove(os.path.join(parent, version))


def _swap_link(link: str, path: str) -> None:
    """Replace ``path`` by the symbolic link ``link`` in one step (os.replace is atomic)."""
    os.replace(link, path)


def _rename_aside(path: str, aside: str) -> None:
    os.rename(path, aside)


def publish_dir(src: str, path: str) -> None:
    """Make ``path`` name the complete directory ``src``, replacing what it named: ``path`` becomes a
    symbolic link to ``<name>.v<hex>`` swapped with ``os.replace``, so it names either the old or the
    new directory at every moment. The old directory is deleted after the swap."""
    parent, name = os.path.split(os.path.abspath(path))
    version = f"{name}.v{uuid.uuid4().hex}"
    os.rename(src, os.path.join(parent, version))
    _fsync_dir(parent)
    link = os.path.join(parent, f".{name}.link.tmp-{uuid.uuid4().hex}")
    try:
        os.symlink(version, link, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symbolic links here: rename the old aside, the new in
        link = None
    if os.path.lexists(path) and (link is None or not os.path.islink(path)):
        aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
        _rename_aside(path, aside)  # the one moment without `path`; recover_export() undoes it
    if link is None:
        os.rename(os.path.join(parent, version), path)
    else:
        _swap_link(link, path)
    _fsync_dir(parent)
    _remove_replaced(path)


def _remove_replaced(path: str) -> None:
    """After a swap: delete the directory ``path`` named before (and any aside)."""
    recover_export(path)


def export_final(raw, model_sd: dict, path: str, data_cfg: MQARConfig, eval_cfg: MQARConfig, final_eval: dict,
                 cfg) -> None:
    """The inference export: save_pretrained files (config.json, model.safetensors,
    generation_config.json; no Python files), mqar.json (training data), eval.json (the evaluation
    set and its result; ``early_stop``, the reason, when the run stopped before its ``steps``) and
    train_config.json, published atomically at ``path``."""
    _require_finite(model_sd, path)
    parent, name = os.path.split(os.path.abspath(path))
    recover_export(path)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        _save_pretrained(raw, model_sd, tmp)
        data_cfg.save(os.path.join(tmp, "mqar.json"))
        _write_json(os.path.join(tmp, "eval.json"),
                    {"eval_data": eval_cfg.to_dict(),
                     **{k: final_eval[k] for k in ("accuracy", "correct", "total", "loss", "step")},
                     **({"early_stop": final_eval["early_stop"]} if "early_stop" in final_eval else {}),
                     "dtype": cfg.dtype})
        _write_json(os.path.join(tmp, "train_config.json"), cfg.to_dict())
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, path)


__all__ = ["TRAINER_STATE", "LATEST", "FINAL", "NonFiniteStateError", "first_non_finite", "latest_checkpoint",
           "clean_stale", "save_checkpoint", "load_trainer_state", "load_model_weights", "check_loaded",
           "recover_export", "publish_dir", "export_final"]
