"""Checkpoint validation before loading: a bad checkpoint raises an error naming the file, the tensor
and the values, and no partially loaded model is ever returned. Nothing is unpickled unless asked."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint's files disagree with its config or with the model class."""


def check_directory(path: str) -> None:
    """A local checkpoint directory must exist and hold a config.json (else transformers would fall back
    to the model hub, or to default settings that contradict the weights)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with config.json and weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json; a bmojo checkpoint directory holds config.json and its weights")


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local path rather than a model-hub repository id (``name`` or ``org/name``)."""
    return (path.startswith(("/", "./", "../", "~", "\\")) or path.count("/") > 1 or os.sep in path.replace("/", "")
            or os.path.exists(path))


def weight_files(directory: str, allow_pickle: bool = False) -> list[str]:
    """The weight files of a checkpoint directory: safetensors, or pickled ``.bin``/``.pt`` files only
    with ``allow_pickle`` (read with ``weights_only=True``, checked like safetensors)."""
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, SAFE_WEIGHTS)
    if os.path.isfile(single):
        return [single]
    pickled = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickled and not allow_pickle:
        raise CheckpointError(
            f"{directory}: holds only pickled weights {pickled}; bmojo loads safetensors only because unpickling "
            "can run arbitrary code. Convert them, or pass allow_pickle=True to load them with weights_only=True."
        )
    if not pickled:
        raise CheckpointError(f"{directory}: no {SAFE_WEIGHTS} (or {SAFE_INDEX}) found")
    return [os.path.join(directory, f) for f in pickled]


def _read_pickle_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype string)} of a pickled state dict, read with ``weights_only=True`` (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises various types for a non-checkpoint or unsafe pickle
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return {name: (tuple(t.shape), "F32" if t.is_floating_point() else "I64") for name, t in state.items()}


def read_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype string)} of one safetensors file, checking that it is readable and
    that every tensor's bytes are inside the file (a truncated file fails here)."""
    try:
        with safe_open(path, framework="pt") as fh:
            names = list(fh.keys())
            info = {}
            for name in names:
                sl = fh.get_slice(name)
                info[name] = (tuple(sl.get_shape()), sl.get_dtype())
    except Exception as e:  # safetensors raises its own error types; re-raise naming the file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated: its header needs {8 + header_len + end} bytes, the file has {size}")
    return info


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def validate_checkpoint(directory: str, model_class, config, allow_pickle: bool = False) -> None:
    """Check every tensor of a checkpoint directory against ``model_class(config)`` built on the meta
    device: names (missing / unexpected), shapes and dtype kinds. Raises CheckpointError naming the
    file, the tensor and both values."""
    files = weight_files(directory, allow_pickle)
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for path in files:
        header = _read_pickle_header(path) if path.endswith(PICKLE_SUFFIXES) else read_header(path)
        for name, (shape, dtype) in header.items():
            found[name] = (path, shape, dtype)

    with torch.device("meta"):
        model = model_class(config)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    prefix = model_class.base_model_prefix + "."
    has_head = any(k.startswith(prefix) for k in expected)

    def to_model_name(name: str) -> str | None:
        if has_head and not name.startswith(prefix) and prefix + name in expected:
            return prefix + name  # a base-model checkpoint loaded into the LM
        if not has_head and name.startswith(prefix):
            return name[len(prefix):]  # an LM checkpoint loaded into the base model
        if not has_head and name not in expected and name.split(".")[0] in ("lm_head",):
            return None  # the head of an LM checkpoint: not part of the base model
        return name

    seen = set()
    for name, (path, shape, dtype) in found.items():
        target = to_model_name(name)
        if target is None:
            continue
        if target not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} {list(shape)} ({dtype}); "
                                  f"the config ({config.layer_types}) has no such parameter")
        want_shape, want_dtype = expected[target]
        if shape != want_shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)} but the config expects "
                                  f"{list(want_shape)}; the config contradicts the weights")
        if (dtype in _FLOAT_DTYPES) != want_dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype} but the model needs {want_dtype}")
        seen.add(target)
    missing = [k for k in expected if k not in seen and k not in tied]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all) that the config requires")
    if config.tie_word_embeddings:
        _check_tied_head(found, prefix if has_head else "")


def _load_tensor(path: str, name: str) -> torch.Tensor:
    if path.endswith(PICKLE_SUFFIXES):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[name]
    with safe_open(path, framework="pt") as fh:
        return fh.get_tensor(name)


def _check_tied_head(found: dict, prefix: str) -> None:
    """With tie_word_embeddings the head is the embedding: a different lm_head.weight in the file means
    the config contradicts the weights (loading would silently drop the head)."""
    head, embed = "lm_head.weight", prefix + "embed_tokens.weight"
    embed = embed if embed in found else next((n for n in found if n.endswith("embed_tokens.weight")), None)
    if head not in found or embed is None:
        return
    a, b = _load_tensor(found[head][0], head), _load_tensor(found[embed][0], embed)
    if a.shape != b.shape or not torch.equal(a, b):
        raise CheckpointError(f"{found[head][0]}: holds an lm_head.weight that differs from {embed}, but the config "
                              "says tie_word_embeddings=True; set tie_word_embeddings=False to load the separate head")


def check_finite(model, source: str) -> None:
    """Refuse parameters holding NaN or +-inf, naming the first (``allow_nonfinite=True`` skips this)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = "NaN" if bool(torch.isnan(p).any()) else "inf"
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} values; refusing to load it "
                                  "(pass allow_nonfinite=True to load it anyway)")
