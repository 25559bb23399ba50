"""Backend registry and dispatch for ``bmojo.ops`` (docs/design.md, "Op API and backends").

A backend is a module (``bmojo.backends.<name>``) exposing ``OPS``, plus a check that says why it cannot
run here. ``OPS`` maps an op name to its implementation, either one callable for every device or a table
by device type: ``{"cpu": fn, "cuda": fn, "default": fn}`` (``torch.device.type`` keys; ``"default"``
for the device types not listed). Device-specific choices are registered there, and resolved here, never
branched on inside an implementation.

``backend="auto"`` picks by the tensors' device; naming a backend that cannot run raises; every fallback
(to the torch backend, or anything else a backend runs instead of its kernel) warns once, naming the op,
the backend and the reason (:func:`warn_once`).
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

OP_NAMES = (
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "bmojo_attention",
    "attention_decode",
    "innovation_select",
    "innovation_scores",
    "merge_memory",
    "ssd_scan",
    "ssd_state_update",
)
BACKEND_NAMES = ("auto", "torch", "cuda", "neuron")


OpEntry = Union[Callable, Mapping[str, Callable]]  # one implementation, or one per device type


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run here (missing toolchain or wrong device)."""


def _cuda_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); install the extra: pip install 'bmojo[cuda]'"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device is visible and TRITON_INTERPRET=1 is not set"
    return None


def _neuron_unavailable() -> str | None:
    try:
        import nki  # noqa: F401
    except ImportError:
        return "the Neuron SDK's `nki` package is not importable (it only exists on Trainium/Inferentia hosts)"
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return "torch-xla / torch-neuronx is not importable, so there is no Neuron device to run on"
    return None


@dataclass
class Backend:
    name: str
    module: str
    unavailable: Callable[[], str | None]
    devices: tuple[str, ...]
    _ops: dict | None = field(default=None, repr=False)

    def accepts(self, device: torch.device) -> bool:
        if device.type in self.devices:
            return True
        # The Triton interpreter runs the CUDA kernels on CPU tensors (how they are tested without a GPU).
        return self.name == "cuda" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def ops(self) -> dict[str, OpEntry]:
        if self._ops is None:
            self._ops = importlib.import_module(self.module).OPS
        return self._ops

    def implementation(self, op: str, device: torch.device) -> Callable | None:
        """This backend's implementation of ``op`` for tensors on ``device``, or None when it has none."""
        return for_device(self.ops().get(op), device)


def for_device(entry: OpEntry | None, device: torch.device) -> Callable | None:
    """An ``OPS`` entry resolved for ``device``: the callable itself, or the table's entry for
    ``device.type`` (else its ``"default"``); None when there is no entry for this device."""
    if entry is None or callable(entry):
        return entry
    if not isinstance(entry, Mapping):
        raise TypeError(f"an OPS entry must be a callable or a mapping from device type to callable, got {entry!r}")
    return entry.get(device.type, entry.get("default"))


_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "bmojo.backends.torch", lambda: None, ("cpu", "cuda", "mps", "xla", "meta", "neuron")),
    "cuda": Backend("cuda", "bmojo.backends.cuda", _cuda_unavailable, ("cuda",)),
    "neuron": Backend("neuron", "bmojo.backends.neuron", _neuron_unavailable, ("xla", "neuron")),
}
_AUTO_BY_DEVICE = {"cuda": "cuda", "xla": "neuron", "neuron": "neuron"}
_warned: set[tuple[str, ...]] = set()


def register_backend(name: str, module: str, unavailable: Callable[[], str | None], devices: tuple[str, ...]):
    """Register (or replace) a backend: ``module`` must expose ``OPS`` mapping op names to callables or to
    tables by device type (see the module docstring)."""
    _BACKENDS[name] = Backend(name, module, unavailable, devices)


def warn_once(key: tuple[str, ...], message: str, stacklevel: int = 3) -> None:
    """Warn (RuntimeWarning) the first time ``key`` is seen in this process: how every fallback is
    announced. The message names the op, the backend and the reason."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def _warn_once(key: tuple[str, ...], message: str) -> None:
    warn_once(key, message, stacklevel=5)  # warn_once, _warn_once, _resolve, resolve, the op: its caller


def torch_implementation(op: str, device: torch.device) -> Callable:
    """The torch backend's implementation of ``op`` for tensors on ``device`` (what every fallback runs)."""
    impl = _BACKENDS["torch"].implementation(op, device)
    if impl is None:  # every torch entry has a default
        raise RuntimeError(f"the torch backend has no {op} implementation for {device.type} tensors")
    return impl


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run ops on tensors of ``device`` here."""
    device = torch.device(device)
    return [n for n, b in _BACKENDS.items() if b.unavailable() is None and b.accepts(device)]


def resolve(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` on ``device`` (see module docstring)."""
    return _resolve(op, backend, device)[1]


def _resolve(op: str, backend: str | None, device: torch.device) -> tuple[str, Callable]:
    """(the backend that runs ``op``, its implementation), warning once for a fallback."""
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}; ops are {OP_NAMES}")
    name = backend or "auto"
    if name == "auto":
        name = _AUTO_BY_DEVICE.get(device.type, "torch")
        if name != "torch":
            reason = _BACKENDS[name].unavailable()
            if reason is not None:
                _warn_once(("auto", name), f"bmojo: backend='auto' on {device.type} tensors picks the {name!r} backend, "
                                           f"which cannot run here ({reason}); {op} and every other op fall back "
                                           "to the torch backend")
                name = "torch"
    elif name not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(set(BACKEND_NAMES) | set(_BACKENDS))}, got {backend!r}")
    else:
        be = _BACKENDS[name]
        reason = be.unavailable()
        if reason is not None:
            raise BackendUnavailableError(f"backend={name!r} cannot run here: {reason}")
        if not be.accepts(device):
            raise BackendUnavailableError(
                f"backend={name!r} does not run on {device.type} tensors (it takes {', '.join(be.devices)})"
            )
    entry = _BACKENDS[name].ops().get(op)
    impl = for_device(entry, device)
    if impl is None:
        if entry is None:
            _warn_once((name, op), f"bmojo: backend {name!r} has no {op} kernel; using the torch backend for it")
        else:
            _warn_once((name, op, device.type), f"bmojo: backend {name!r} has no {op} kernel for {device.type} "
                                                "tensors; using the torch backend for it")
        return "torch", torch_implementation(op, device)
    return name, impl


class OpTable:
    """The implementations of every op for one backend choice on one device, resolved once: the
    model's hot path calls these directly (no per-call dispatch or shape checks; the model checks its
    inputs once per call). Fallbacks warn once, when the table is built."""

    def __init__(self, backend: str | None, device: torch.device):
        for op in OP_NAMES:
            setattr(self, op, resolve(op, backend, device))
        self.bmojo_attention = resolve_resuming(backend, device)
        name, decode = _resolve("attention_decode", backend, device)
        if not getattr(decode, "segments", False):
            warn_concatenating_segments(name, device)
            self.attention_decode = _concatenating(decode)
        if not getattr(decode, "segment_queries", False):
            self.attention_decode = _segment_queries_to_torch(name, self.attention_decode, device)


def warn_concatenating_segments(backend: str, device: torch.device) -> None:
    """The one-time warning of a decode kernel that cannot read a cache held in segments."""
    _warn_once(("segments", backend, device.type),
               f"bmojo: the attention_decode kernel of the {backend!r} backend on {device.type} tensors does not read "
               "a cache held in segments; the window, fading and memory segments are concatenated at every call")


# optional capabilities of a bmojo_attention kernel: (attribute it sets to True, the argument it then
# takes, what a kernel without it cannot do). Calls passing such an argument to a kernel without the
# capability go to the torch backend (which has them all), announced once.
ATTENTION_CAPABILITIES = (
    ("resumes", "q_start", "cannot take keys before its queries (new tokens after a decoding state)"),
    ("fading_query", "q_fading", "cannot score the fading keys with their own queries (q_fading)"),
)


def resolve_resuming(backend: str | None, device: torch.device) -> Callable:
    """``bmojo_attention`` for ``backend`` on ``device``; when that kernel lacks an optional capability
    (:data:`ATTENTION_CAPABILITIES`: ``resumes = True`` takes ``q_start``, keys before the queries;
    ``fading_query = True`` takes ``q_fading``, the fading keys' own queries), the calls that need it go
    to the torch backend, with a one-time warning (naming op, backend and reason) at the first such call."""
    name, fn = _resolve("bmojo_attention", backend, device)
    lacking = [(arg, reason) for attr, arg, reason in ATTENTION_CAPABILITIES if not getattr(fn, attr, False)]
    if not lacking:
        return fn
    fallback = torch_implementation("bmojo_attention", device)
    module = getattr(fn, "__module__", "?")

    def bmojo_attention(q, k, v, *args, **kw):
        for arg, reason in lacking:
            if kw.get(arg) is None:
                kw.pop(arg, None)  # an absent capability's argument, passed as None: not for the kernel
                continue
            _warn_once((module, "bmojo_attention", arg),
                       f"bmojo: the bmojo_attention kernel of the {name!r} backend ({module}) on {device.type} "
                       f"tensors {reason}; those calls use the torch backend")
            return fallback(q, k, v, *args, **kw)
        return fn(q, k, v, *args, **kw)

    return bmojo_attention


def warn_segment_queries(backend: str, device: torch.device) -> None:
    """The one-time warning of a decode kernel that cannot score each segment with its own query."""
    _warn_once(("segment_queries", backend, device.type),
               f"bmojo: the attention_decode kernel of the {backend!r} backend on {device.type} tensors cannot score "
               "each cache segment with its own query (q given per segment: the fading ring read with the fading "
               "query); those calls use the torch backend")


def _segment_queries_to_torch(backend: str, fn, device: torch.device):
    """``fn`` (an attention_decode without ``segment_queries``), whose calls with one query per segment go
    to the torch backend, announced once at the first such call."""
    fallback = torch_implementation("attention_decode", device)

    def attention_decode(q, k, v, valid=None, scale=None):
        if isinstance(q, (tuple, list)):
            warn_segment_queries(backend, device)
            return fallback(q, k, v, valid, scale)
        return fn(q, k, v, valid, scale)

    return attention_decode


def _concatenating(fn):
    def attention_decode(q, k, v, valid=None, scale=None):
        if isinstance(k, (tuple, list)):
            k, v = torch.cat(tuple(k), 1), torch.cat(tuple(v), 1)
            valid = None if valid is None else torch.cat(tuple(valid), 1)
        return fn(q, k, v, valid, scale)

    return attention_decode


class Kernels:
    """A model's ops: ``kernels.on(device)`` is the :class:`OpTable` of ``config.backend`` on that
    device, built on first use and kept (one per backend and device)."""

    def __init__(self, config):
        self.config = config
        self._tables: dict[tuple, OpTable] = {}

    def on(self, device: torch.device) -> OpTable:
        key = (self.config.backend, device.type, device.index)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = OpTable(self.config.backend, device)
        return table
