"""Core of the test-only NKI emulator: dtypes, memory regions, tensors, allocation tracking, checks.

This is a NumPy model of exactly the part of ``nki.language`` / ``nki.isa`` that the kernels in
``backends/neuron`` use, written from the public NKI documentation (ISA semantics, memory
hierarchy, simulator guide). It is *not* the Neuron SDK: it exists so the same kernel source can be
tested on a machine without the SDK. Where the real ``nki`` is importable, the tests use
``nki.simulate`` instead.

Hardware rules enforced (NeuronCore-v2/v3 numbers):

* on-chip tensors (SBUF, PSUM) have the partition dimension first and at most 128 partitions;
* SBUF holds 192 KiB per partition, PSUM 16 KiB per partition (8 banks of 2 KiB); live allocations
  are tracked (Python reference counting frees a tile when its last view dies) and overflow raises;
* compute instructions read and write SBUF/PSUM only; DMA moves between HBM and SBUF (not PSUM);
* ``nc_matmul`` reads SBUF, writes PSUM (fp32, one 2 KiB bank), contracts over the partition dim,
  stationary free size <= 128, moving free size <= 512;
* new tensors are filled with NaN (floats) or 4 (integers), as the NKI simulator does, so reading
  memory that was never written shows up as NaN.
"""
from __future__ import annotations

import enum
import math
import weakref

import numpy as np

PMAX = 128
SBUF_PARTITION_BYTES = 192 * 1024
PSUM_PARTITION_BYTES = 16 * 1024
PSUM_BANK_BYTES = 2 * 1024
GEMM_STATIONARY_FMAX = 128
GEMM_MOVING_FMAX = 512
INT_SENTINEL = 4


class NkiValidationError(AssertionError):
    """A kernel broke a hardware rule (shape limit, memory region, capacity)."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise NkiValidationError(msg)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------
class DType:
    """An NKI dtype. Floats narrower than fp32 without a NumPy type are stored as float32 and
    rounded to their precision on every write."""

    def __init__(self, name: str, itemsize: int, storage, is_float: bool, rounder=None):
        self.name, self.itemsize, self.storage, self.is_float, self._round = name, itemsize, np.dtype(storage), is_float, rounder

    def cast(self, values: np.ndarray) -> np.ndarray:
        if self.is_float:
            v = np.asarray(values, dtype=np.float32)
            if self._round is not None:
                v = self._round(v)
            return v.astype(self.storage, copy=False)
        v = np.asarray(values)
        if v.dtype.kind == "f":  # float -> int conversion rounds to nearest, saturates
            info = np.iinfo(self.storage)
            v = np.clip(np.rint(np.nan_to_num(v)), info.min, info.max)
        return v.astype(self.storage)

    def __repr__(self):
        return f"nl.{self.name}"


def _round_bf16(v: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    out = b.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(v), np.float32(np.nan), out).reshape(np.shape(v))


float32 = DType("float32", 4, np.float32, True)
float16 = DType("float16", 2, np.float16, True)
bfloat16 = DType("bfloat16", 2, np.float32, True, _round_bf16)
int32 = DType("int32", 4, np.int32, False)
uint8 = DType("uint8", 1, np.uint8, False)
DTYPES = {d.name: d for d in (float32, float16, bfloat16, int32, uint8)}


# ----------------------------------------------------------------------------------------------
# memory regions and the machine (capacity tracking for one simulated kernel run)
# ----------------------------------------------------------------------------------------------
class MemoryRegion(enum.Enum):
    sbuf = "sbuf"
    psum = "psum"
    hbm = "hbm"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"


ON_CHIP = (MemoryRegion.sbuf, MemoryRegion.psum)
HBM = (MemoryRegion.hbm, MemoryRegion.private_hbm, MemoryRegion.shared_hbm)


class Machine:
    """Per-run state: live on-chip bytes per partition, engine accumulator registers."""

    def __init__(self):
        self.live = {MemoryRegion.sbuf: 0, MemoryRegion.psum: 0}
        self.peak = dict(self.live)
        self.act_regs = np.zeros(PMAX, dtype=np.float32)  # Scalar Engine reduce registers
        self.instructions = 0

    def reserve(self, region: MemoryRegion, nbytes: int) -> None:
        cap = SBUF_PARTITION_BYTES if region is MemoryRegion.sbuf else PSUM_PARTITION_BYTES
        check(nbytes <= cap, f"{region.value} tile needs {nbytes} bytes per partition, more than the "
                             f"{cap} bytes a {region.value} partition holds")
        check(self.live[region] + nbytes <= cap,
              f"{region.value} overflow: {self.live[region]} bytes per partition already live, "
              f"{nbytes} more requested, capacity {cap}")
        self.live[region] += nbytes
        self.peak[region] = max(self.peak[region], self.live[region])

    def release(self, region: MemoryRegion, nbytes: int) -> None:
        self.live[region] -= nbytes


_current: list[Machine] = []


def machine() -> Machine:
    check(bool(_current), "NKI tensors and instructions only exist inside a kernel run (nki.simulate)")
    return _current[-1]


class Allocation:
    """Storage of one nl.ndarray; on-chip bytes are returned to the machine when it dies."""

    def __init__(self, shape, dtype: DType, region: MemoryRegion):
        self.region, self.dtype = region, dtype
        fill = np.nan if dtype.is_float else INT_SENTINEL
        self.array = np.full(shape, fill, dtype=dtype.storage)
        self.mm_written = None  # PSUM: which elements a matmul has written (accumulate=None)
        if region in ON_CHIP:
            nbytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            m = machine()
            m.reserve(region, nbytes)
            weakref.finalize(self, m.release, region, nbytes)
            if region is MemoryRegion.psum:
                self.mm_written = np.zeros(shape, dtype=bool)


# ----------------------------------------------------------------------------------------------
# tensors (views of an allocation)
# ----------------------------------------------------------------------------------------------
class NkiTensor:
    """A view (shape, strides, offset) of one allocation, as ``nki.language.NkiTensor``."""

    __slots__ = ("_alloc", "_view")

    def __init__(self, alloc: Allocation, view: np.ndarray):
        self._alloc, self._view = alloc, view

    # attributes ------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self._view.shape)

    @property
    def dtype(self) -> DType:
        return self._alloc.dtype

    @property
    def buffer(self) -> MemoryRegion:
        return self._alloc.region

    @property
    def ndim(self):
        return self._view.ndim

    @property
    def size(self):
        return int(self._view.size)

    def __repr__(self):
        return f"NkiTensor(shape={self.shape}, dtype={self.dtype}, buffer={self.buffer.value})"

    # views -----------------------------------------------------------------------------------
    def __getitem__(self, key) -> "NkiTensor":
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        check(len(key) <= self.ndim, f"too many indices ({len(key)}) for a {self.ndim}-d tensor")
        key = key + (slice(None),) * (self.ndim - len(key))
        on_chip = self.buffer in ON_CHIP
        norm = []
        for d, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, slice):
                start, stop, step = k.start, k.stop, k.step
                step = 1 if step is None else step
                check(step > 0, "negative steps are not supported in NKI views")
                start = 0 if start is None else (start + n if start < 0 else start)
                stop = n if stop is None else (stop + n if stop < 0 else stop)
                check(0 <= start <= stop <= n, f"slice {start}:{stop} out of bounds for dim {d} of size {n}")
                check(stop > start, f"empty slice {start}:{stop} on dim {d}")
                norm.append(slice(start, stop, step))
            else:
                check(isinstance(k, (int, np.integer)), f"unsupported index {k!r} (ints, slices, ... only)")
                k = int(k) + n if k < 0 else int(k)
                check(0 <= k < n, f"index {k} out of bounds for dim {d} of size {n}")
                norm.append(slice(k, k + 1) if (on_chip and d == 0) else k)
        if on_chip:  # SBUF/PSUM views stay at least 2-D: keep the last int-indexed free dim as size 1
            kept = sum(isinstance(k, slice) for k in norm)
            if kept < 2:
                last = max(i for i, k in enumerate(norm) if not isinstance(k, slice))
                norm[last] = slice(norm[last], norm[last] + 1)
        return NkiTensor(self._alloc, self._view[tuple(norm)])

    def reshape(self, shape) -> "NkiTensor":
        shape = tuple(int(s) for s in shape)
        check(int(np.prod(shape)) == self.size, f"reshape {self.shape} -> {shape} changes the element count")
        if self.buffer in ON_CHIP:
            check(shape[0] == self.shape[0], "reshape may not move data across partitions")
        v = self._view.view()
        try:
            v.shape = shape  # raises if it would need a copy (non-contiguous view)
        except AttributeError as e:
            raise NkiValidationError(f"reshape of a non-contiguous view: {e}") from None
        return NkiTensor(self._alloc, v)

    # helpers for the instruction implementations ---------------------------------------------
    def read(self) -> np.ndarray:
        """Values as float32 (or int for integer tensors), a copy."""
        v = self._view
        return v.astype(np.float32) if self.dtype.is_float else v.copy()

    def write(self, values) -> None:
        self._view[...] = self.dtype.cast(np.broadcast_to(values, self.shape))

    @property
    def partitions(self) -> int:
        return self.shape[0]

    @property
    def free_size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if self.ndim > 1 else 1


def new_tensor(shape, dtype: DType, region: MemoryRegion) -> NkiTensor:
    shape = tuple(int(s) for s in shape)
    check(all(s > 0 for s in shape), f"tensor shape {shape} must be positive")
    check(isinstance(dtype, DType), f"dtype must be an nki.language dtype, got {dtype!r}")
    check(isinstance(region, MemoryRegion), f"buffer must be an nki.language memory region (nl.sbuf, ...), got {region!r}")
    if region in ON_CHIP:
        check(len(shape) >= 2, f"{region.value} tensors are at least 2-D (partition, free...), got {shape}")
        check(shape[0] <= PMAX, f"{region.value} tensor partition dimension {shape[0]} exceeds maximum {PMAX}")
    a = Allocation(shape, dtype, region)
    return NkiTensor(a, a.array)


def from_host(array: np.ndarray, dtype: DType, region=MemoryRegion.shared_hbm) -> NkiTensor:
    a = Allocation(array.shape, dtype, region)
    a.array[...] = dtype.cast(array)
    return NkiTensor(a, a.array)


def prod(xs) -> int:
    return int(math.prod(xs))
