"""Emulated ``nki.language``: tensor creation, dtypes, memory regions, tile sizes and the operator
identifiers the kernels pass to ``nki.isa`` instructions. Only what the kernels use."""
from __future__ import annotations

import numpy as np

from . import _core
from ._core import MemoryRegion, NkiTensor  # noqa: F401  (NkiTensor is part of nki.language)

float32 = _core.float32
float16 = _core.float16
bfloat16 = _core.bfloat16
int32 = _core.int32
uint8 = _core.uint8

sbuf = MemoryRegion.sbuf
psum = MemoryRegion.psum
hbm = MemoryRegion.hbm
shared_hbm = MemoryRegion.shared_hbm


def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    """A new, uninitialised tensor (NaN-filled, like the NKI simulator)."""
    _core.check(address is None, "the emulator does not model manual allocation (address=...)")
    return _core.new_tensor(shape, dtype, buffer)


class _TileSize:
    pmax = _core.PMAX
    psum_bank_fmax = _core.PSUM_BANK_BYTES // 4
    gemm_stationary_fmax = _core.GEMM_STATIONARY_FMAX
    gemm_moving_fmax = _core.GEMM_MOVING_FMAX


tile_size = _TileSize()


class _Op:
    """An operator identifier (``nl.add``, ``nl.exp``...) as passed to ISA instructions."""

    def __init__(self, name: str, kind: str, fn):
        self.name, self.kind, self.fn = name, kind, fn

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"nl.{self.name}(...) as a tile-level call is outside the emulated subset; "
                                  "kernels here use it only as an operator of nki.isa instructions")

    def __repr__(self):
        return f"nl.{self.name}"


def _sigmoid(x):
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def _f32(fn):
    def wrapped(*a):
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            return np.asarray(fn(*a), dtype=np.float32)
    return wrapped


# Vector Engine ALU operators (arithmetic) and comparisons (result 1.0 / 0.0)
add = _Op("add", "alu", _f32(np.add))
subtract = _Op("subtract", "alu", _f32(np.subtract))
multiply = _Op("multiply", "alu", _f32(np.multiply))
maximum = _Op("maximum", "alu", _f32(np.maximum))
equal = _Op("equal", "cmp", _f32(lambda a, b: (a == b)))
greater_equal = _Op("greater_equal", "cmp", _f32(lambda a, b: (a >= b)))

# Scalar Engine activation functions
exp = _Op("exp", "act", _f32(np.exp))
log = _Op("log", "act", _f32(np.log))
copy = _Op("copy", "act", _f32(lambda x: x))
sigmoid = _Op("sigmoid", "act", _f32(_sigmoid))
softplus = _Op("softplus", "act", _f32(lambda x: np.logaddexp(np.float32(0), x)))
silu = _Op("silu", "act", _f32(lambda x: x * _sigmoid(x)))
silu_dx = _Op("silu_dx", "act", _f32(lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))))
