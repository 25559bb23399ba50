"""A test-only NumPy emulator of the subset of the standalone ``nki`` package (NKI 0.3+) that the kernels
of the neuron backend (``backends/neuron/<op>/*.py``, ``nki_common.py``) use: ``nki.jit``,
``nki.simulate``, ``nki.language`` and ``nki.isa``.

The Neuron SDK only installs on Trainium/Inferentia hosts, so CI cannot run ``nki.simulate``. The kernels
import ``nki`` normally; :func:`installed` puts this package in ``sys.modules`` as ``nki`` /
``nki.language`` / ``nki.isa`` while they are imported, then takes it out again so nothing else in the
process mistakes it for the SDK. Semantics and limits follow the public NKI docs; see ``_core``.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from . import _core, isa, language
from ._core import NkiValidationError  # noqa: F401

__all__ = ["jit", "simulate", "installed", "NkiValidationError", "language", "isa", "last_run"]

last_run: dict = {}  # statistics of the latest simulate() call: instruction count, peak SBUF/PSUM bytes


class Kernel:
    """What ``@nki.jit`` returns. There is no device here: call it through :func:`simulate` (or set
    ``NKI_SIMULATOR=1``, as with the real package)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if os.environ.get("NKI_SIMULATOR") == "1":
            return simulate(self)(*args, **kwargs)
        raise RuntimeError("the NKI emulator has no Neuron device; run the kernel through nki.simulate(kernel)")


def jit(fn=None, **kwargs):
    if fn is None:
        return lambda f: Kernel(f)
    return Kernel(fn)


_TORCH_TO_NKI = {"float32": _core.float32, "float16": _core.float16, "bfloat16": _core.bfloat16,
                 "int32": _core.int32, "uint8": _core.uint8, "bool": _core.uint8}


def _to_hbm(x):
    """Host array -> HBM tensor; returns (tensor, how to convert back) or (x, None) for non-arrays."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        name = str(x.dtype).replace("torch.", "")
        _core.check(name in _TORCH_TO_NKI, f"simulate: unsupported tensor dtype {x.dtype}")
        dt = _TORCH_TO_NKI[name]
        arr = x.detach().cpu().float().numpy() if dt.is_float else x.detach().cpu().numpy()
        return _core.from_host(arr, dt, _core.MemoryRegion.hbm), "torch"
    if isinstance(x, np.ndarray):
        name = {"float32": "float32", "float16": "float16", "int32": "int32", "uint8": "uint8", "bool": "uint8"}.get(x.dtype.name)
        _core.check(name is not None, f"simulate: unsupported array dtype {x.dtype}")
        return _core.from_host(x, _core.DTYPES[name], _core.MemoryRegion.hbm), "numpy"
    return x, None


def _from_hbm(t, kind: str):
    _core.check(t.buffer is _core.MemoryRegion.shared_hbm,
                f"kernel outputs must be allocated in nl.shared_hbm, got {t.buffer.value}")
    arr = np.array(t._view)
    if kind == "torch":
        import torch
        out = torch.from_numpy(arr)
        if t.dtype is _core.bfloat16:
            out = out.to(torch.bfloat16)
        return out
    return arr


def simulate(kernel):
    """Run ``kernel`` (an ``@nki.jit`` function or a plain one) on the emulator. Arguments that are NumPy
    arrays or torch tensors become HBM tensors; results come back in the same kind."""
    fn = kernel.fn if isinstance(kernel, Kernel) else kernel

    def run(*args, **kwargs):
        m = _core.Machine()
        _core._current.append(m)
        try:
            conv = [_to_hbm(a) for a in args]
            kconv = {k: _to_hbm(v) for k, v in kwargs.items()}
            kinds = [k for _, k in conv if k] + [k for _, k in kconv.values() if k]
            kind = "torch" if "torch" in kinds else "numpy"
            out = fn(*[t for t, _ in conv], **{k: t for k, (t, _) in kconv.items()})
            if out is None:
                res = None
            elif isinstance(out, (tuple, list)):
                res = type(out)(_from_hbm(o, kind) for o in out)
            else:
                res = _from_hbm(out, kind)
            last_run.clear()
            last_run.update(instructions=m.instructions, peak_sbuf_bytes=m.peak[_core.MemoryRegion.sbuf],
                            peak_psum_bytes=m.peak[_core.MemoryRegion.psum])
            return res
        finally:
            _core._current.pop()

    return run


@contextlib.contextmanager
def installed():
    """Make ``import nki`` / ``nki.language`` / ``nki.isa`` resolve to this emulator inside the block."""
    names = ("nki", "nki.language", "nki.isa")
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update({"nki": sys.modules[__name__], "nki.language": language, "nki.isa": isa})
    try:
        yield sys.modules[__name__]
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
