"""Emulated ``nki.isa``: the instructions the kernels use, destination-passing style (``dst`` first),
with the documented semantics and hardware rules (see ``_core`` for the list)."""
from __future__ import annotations

import enum

import numpy as np

from . import _core
from ._core import HBM, ON_CHIP, PMAX, MemoryRegion, NkiTensor, check, machine
from .language import _Op, equal

SBUF, PSUM = MemoryRegion.sbuf, MemoryRegion.psum


class engine(enum.Enum):
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


class reduce_cmd(enum.Enum):
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


# ----------------------------------------------------------------------------------------------
# shared checks
# ----------------------------------------------------------------------------------------------
def _tensor(t, op: str, name: str) -> NkiTensor:
    check(isinstance(t, NkiTensor), f"{op}: {name} must be an NKI tensor, got {type(t).__name__}")
    return t


def _engine_operand(t, op: str, name: str, allowed=ON_CHIP) -> NkiTensor:
    """Compute engines read and write SBUF/PSUM only (never HBM)."""
    _tensor(t, op, name)
    check(t.buffer in allowed, f"{op}: {name} is in {t.buffer.value}; this engine accesses only "
                               f"{'/'.join(r.value for r in allowed)} (load HBM data into SBUF with dma_copy first)")
    check(t.partitions <= PMAX, f"{op}: {name} partition dimension {t.partitions} exceeds maximum {PMAX}")
    return t


def _same_layout(a: NkiTensor, b: NkiTensor, op: str, an: str, bn: str) -> None:
    check(a.partitions == b.partitions, f"{op}: {an} and {bn} partition sizes differ ({a.partitions} vs {b.partitions})")
    check(a.free_size == b.free_size, f"{op}: {an} and {bn} have different elements per partition ({a.free_size} vs {b.free_size})")


def _not_both_psum(a: NkiTensor, b: NkiTensor, op: str) -> None:
    check(not (a.buffer is PSUM and b.buffer is PSUM), f"{op}: both inputs in PSUM is not allowed")


def _as2d(t: NkiTensor) -> np.ndarray:
    return t.read().reshape(t.partitions, t.free_size)


def _write2d(dst: NkiTensor, values: np.ndarray) -> None:
    dst.write(values.reshape(dst.shape))


def _vector_operand(x, data: NkiTensor, op: str, name: str):
    """A compile-time scalar or a (P, 1) tile broadcast along the free dimension."""
    if isinstance(x, NkiTensor):
        _engine_operand(x, op, name)
        check(x.partitions == data.partitions and x.free_size == 1,
              f"{op}: {name} must be a scalar or a ({data.partitions}, 1) tile, got {x.shape}")
        return x.read().reshape(x.partitions, 1).astype(np.float32)
    check(isinstance(x, (int, float, np.floating, np.integer)), f"{op}: {name} must be a number or a tile, got {x!r}")
    return np.float32(x)


def _alu(op, kinds=("alu", "cmp"), where="") -> _Op:
    check(isinstance(op, _Op) and op.kind in kinds,
          f"{where}: {op!r} is not a supported {'/'.join(kinds)} operator")
    return op


def _apply(op: _Op, a, b, reverse: bool):
    return op.fn(b, a) if reverse else op.fn(a, b)


def _count(name: str) -> None:
    machine().instructions += 1


# ----------------------------------------------------------------------------------------------
# data movement
# ----------------------------------------------------------------------------------------------
def dma_copy(dst, src, priority=None, oob_mode=None, dge_mode=None, engine=engine.unknown, name=None):
    """dst = src between HBM and SBUF (PSUM is not a DMA endpoint). Element counts must match; values are
    copied in row-major order, converting dtypes through fp32."""
    _count("dma_copy")
    _tensor(dst, "dma_copy", "dst"), _tensor(src, "dma_copy", "src")
    for t, n in ((dst, "dst"), (src, "src")):
        check(t.buffer is not PSUM, f"dma_copy: {n} is in PSUM; DMA moves data between HBM and SBUF "
                                    "(copy PSUM to SBUF with tensor_copy first)")
    check(dst.size == src.size, f"dma_copy: dst has {dst.size} elements, src {src.size}")
    dst.write(src.read().reshape(dst.shape))


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """Copy within SBUF/PSUM (same partitions, same elements per partition), casting to dst.dtype."""
    _count("tensor_copy")
    _engine_operand(dst, "tensor_copy", "dst"), _engine_operand(src, "tensor_copy", "src")
    _same_layout(dst, src, "tensor_copy", "dst", "src")
    _write2d(dst, _as2d(src))


def memset(dst, value, engine=engine.unknown, name=None):
    _count("memset")
    _engine_operand(dst, "memset", "dst")
    if not dst.dtype.is_float:
        check(isinstance(value, (int, np.integer)), f"memset: value {value!r} must be an int for {dst.dtype}")
    dst.write(np.full(dst.shape, value, dtype=np.float32 if dst.dtype.is_float else np.int64))


# ----------------------------------------------------------------------------------------------
# Tensor Engine
# ----------------------------------------------------------------------------------------------
def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False,
              accumulate=None, tile_position=(), tile_size=(), perf_mode=None, name=None):
    """dst[M, N] (+)= stationary[K, M].T @ moving[K, N]: inputs in SBUF, output in one PSUM bank (fp32),
    K (partition, contracted) <= 128, M <= 128, N <= 512."""
    _count("nc_matmul")
    op = "nc_matmul"
    for t, n in ((stationary, "stationary"), (moving, "moving")):
        _engine_operand(t, op, n, allowed=(SBUF,))
    _engine_operand(dst, op, "dst", allowed=(PSUM,))
    check(not is_transpose and not tile_position and not tile_size and perf_mode is None,
          f"{op}: transpose/tiling/performance modes are outside the emulated subset")
    K, M, N = stationary.partitions, stationary.free_size, moving.free_size
    check(moving.partitions == K, f"{op}: stationary and moving partition (contraction) sizes differ ({K} vs {moving.partitions})")
    check(M <= _core.GEMM_STATIONARY_FMAX, f"{op}: stationary free size {M} exceeds maximum {_core.GEMM_STATIONARY_FMAX}")
    check(N <= _core.GEMM_MOVING_FMAX, f"{op}: moving free size {N} exceeds maximum {_core.GEMM_MOVING_FMAX}")
    check(dst.partitions == M and dst.free_size == N, f"{op}: dst must be ({M}, {N}), got {dst.shape}")
    check(dst.dtype is _core.float32, f"{op}: dst must be float32 (NeuronCore-v2/v3), got {dst.dtype}")
    check(N * 4 <= _core.PSUM_BANK_BYTES, f"{op}: output of {N * 4} bytes per partition does not fit one 2 KiB PSUM bank")
    f32 = (_core.float32,)
    check((stationary.dtype in f32) == (moving.dtype in f32), f"{op}: a float32 operand needs a float32 partner "
                                                                f"(got {stationary.dtype} and {moving.dtype})")
    res = (_as2d(stationary).astype(np.float64).T @ _as2d(moving).astype(np.float64)).astype(np.float32)
    view_flags = _flag_view(dst)
    old = _as2d(dst)
    acc = view_flags.reshape(M, N) if accumulate is None else np.full((M, N), bool(accumulate))
    out = np.where(acc, old + res, res)
    _write2d(dst, out)
    view_flags[...] = True


def _flag_strides(t: NkiTensor):
    """Strides into the allocation's bool flag array matching the view ``t`` of its data array."""
    item = t._alloc.array.itemsize
    return tuple(s // item for s in t._view.strides)


def _flag_view(t: NkiTensor) -> np.ndarray:
    base = t._alloc.array
    offset = (t._view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // base.itemsize
    flags = t._alloc.mm_written.reshape(-1)
    return np.lib.stride_tricks.as_strided(flags[offset:], shape=t.shape, strides=_flag_strides(t), writeable=True)


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """2-D transpose between the partition axis and the (flattened) free axis. Tensor Engine: SBUF -> PSUM,
    up to 128x128; Vector Engine: SBUF/PSUM, up to 32x32."""
    _count("nc_transpose")
    op = "nc_transpose"
    _tensor(dst, op, "dst"), _tensor(data, op, "data")
    use_pe = engine is globals()["engine"].tensor or (engine is globals()["engine"].unknown
                                                      and data.buffer is SBUF and dst.buffer is PSUM)
    if use_pe:
        _engine_operand(data, op, "data", allowed=(SBUF,))
        _engine_operand(dst, op, "dst", allowed=(PSUM,))
        lim = 128
    else:
        _engine_operand(data, op, "data"), _engine_operand(dst, op, "dst")
        lim = 32
    P, F = data.partitions, data.free_size
    check(P <= lim and F <= lim, f"{op}: input {P}x{F} exceeds the {lim}x{lim} limit of the "
                                 f"{'Tensor' if use_pe else 'Vector'} Engine")
    check(dst.dtype is data.dtype, f"{op}: dst dtype {dst.dtype} must equal data dtype {data.dtype}")
    check(dst.partitions == F and dst.free_size == P, f"{op}: dst must be ({F}, {P}), got {dst.shape}")
    _write2d(dst, _as2d(data).T)


# ----------------------------------------------------------------------------------------------
# Scalar Engine
# ----------------------------------------------------------------------------------------------
def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle, name=None):
    """dst = op(data * scale + bias), with optional add-reduction along the free axis into the engine's
    per-partition registers (read out into ``reduce_res``)."""
    _count("activation")
    where = "activation"
    _engine_operand(dst, where, "dst"), _engine_operand(data, where, "data")
    _same_layout(dst, data, where, "dst", "data")
    check(isinstance(op, _Op) and op.kind == "act", f"{where}: {op!r} is not a Scalar Engine activation function")
    x = _as2d(data)
    s = _vector_operand(scale, data, where, "scale")
    if isinstance(scale, NkiTensor):
        check(scale.dtype is _core.float32, f"{where}: scale must be float32")
    b = np.float32(0.0) if bias is None else _vector_operand(bias, data, where, "bias")
    out = op.fn(x * s + b)
    _write2d(dst, out)
    regs = machine().act_regs
    P = data.partitions
    if reduce_cmd in (globals()["reduce_cmd"].reset, globals()["reduce_cmd"].reset_reduce):
        regs[:] = 0
    if reduce_cmd in (globals()["reduce_cmd"].reduce, globals()["reduce_cmd"].reset_reduce):
        check(reduce_op is not None and reduce_op.name == "add", f"{where}: reduce_op must be nl.add")
        regs[:P] += out.sum(axis=1, dtype=np.float32)
    if reduce_res is not None:
        _engine_operand(reduce_res, where, "reduce_res")
        check(reduce_res.partitions == P and reduce_res.free_size == 1, f"{where}: reduce_res must be ({P}, 1)")
        reduce_res.write(regs[:P].reshape(reduce_res.shape))


# ----------------------------------------------------------------------------------------------
# Vector Engine
# ----------------------------------------------------------------------------------------------
def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    _count("tensor_tensor")
    where = "tensor_tensor"
    for t, n in ((dst, "dst"), (data1, "data1"), (data2, "data2")):
        _engine_operand(t, where, n)
    _same_layout(data1, data2, where, "data1", "data2")
    _same_layout(dst, data1, where, "dst", "data1")
    _not_both_psum(data1, data2, where)
    _write2d(dst, _alu(op, where=where).fn(_as2d(data1), _as2d(data2)))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """dst = (data op0 operand0) op1 operand1, operands scalars or (P, 1) tiles."""
    _count("tensor_scalar")
    where = "tensor_scalar"
    _engine_operand(dst, where, "dst"), _engine_operand(data, where, "data")
    _same_layout(dst, data, where, "dst", "data")
    out = _apply(_alu(op0, where=where), _as2d(data), _vector_operand(operand0, data, where, "operand0"), reverse0)
    if op1 is not None:
        out = _apply(_alu(op1, where=where), out, _vector_operand(operand1, data, where, "operand1"), reverse1)
    else:
        check(operand1 is None, f"{where}: operand1 given without op1")
    _write2d(dst, out)


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):
    """dst = (data op0 operand0) op1 operand1, operand0 a scalar or (P, 1) tile, operand1 a full tile."""
    _count("scalar_tensor_tensor")
    where = "scalar_tensor_tensor"
    for t, n in ((dst, "dst"), (data, "data"), (operand1, "operand1")):
        _engine_operand(t, where, n)
    _same_layout(dst, data, where, "dst", "data")
    _same_layout(data, operand1, where, "data", "operand1")
    _not_both_psum(data, operand1, where)
    tmp = _apply(_alu(op0, where=where), _as2d(data), _vector_operand(operand0, data, where, "operand0"), reverse0)
    _write2d(dst, _apply(_alu(op1, where=where), tmp, _as2d(operand1), reverse1))


_REDUCE = {"add": np.add.reduce, "maximum": np.maximum.reduce, "multiply": np.multiply.reduce}


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """Reduce the last free axes of ``data`` (never the partition axis)."""
    _count("tensor_reduce")
    where = "tensor_reduce"
    _engine_operand(dst, where, "dst"), _engine_operand(data, where, "data")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    nd = data.ndim
    axes = tuple(sorted(a + nd if a < 0 else a for a in axes))
    check(0 not in axes, f"{where}: the partition axis cannot be reduced")
    check(axes == tuple(range(nd - len(axes), nd)), f"{where}: axes {axes} must be the last contiguous free axes")
    check(isinstance(op, _Op) and op.name in _REDUCE, f"{where}: {op!r} is not a reduction operator")
    res = _REDUCE[op.name](data.read(), axis=axes, keepdims=keepdims).astype(np.float32)
    if negate:
        res = -res
    check(dst.partitions == data.partitions and dst.size == res.size, f"{where}: dst {dst.shape} does not match the reduced shape {res.shape}")
    dst.write(res.reshape(dst.shape))


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """Per partition: r[0] = op1(op0(data0[0], initial), data1[0]); r[i] = op1(op0(data0[i], r[i-1]), data1[i]),
    in fp32, along the (flattened) free axis."""
    _count("tensor_tensor_scan")
    where = "tensor_tensor_scan"
    for t, n in ((dst, "dst"), (data0, "data0"), (data1, "data1")):
        _engine_operand(t, where, n)
    _same_layout(data0, data1, where, "data0", "data1")
    _same_layout(dst, data0, where, "dst", "data0")
    _not_both_psum(data0, data1, where)
    o0, o1 = _alu(op0, where=where), _alu(op1, where=where)
    a, b = _as2d(data0), _as2d(data1)
    prev = _vector_operand(initial, data0, where, "initial")
    prev = np.broadcast_to(prev, (a.shape[0], 1)).reshape(-1).astype(np.float32)
    out = np.empty_like(a)
    for i in range(a.shape[1]):  # the recurrence is sequential along the free axis
        prev = _apply(o1, _apply(o0, a[:, i], prev, reverse0), b[:, i], reverse1)
        out[:, i] = prev
    _write2d(dst, out)


def reciprocal(dst, data, name=None):
    _count("reciprocal")
    _engine_operand(dst, "reciprocal", "dst"), _engine_operand(data, "reciprocal", "data")
    _same_layout(dst, data, "reciprocal", "dst", "data")
    with np.errstate(divide="ignore"):
        _write2d(dst, (np.float32(1.0) / _as2d(data)).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# GpSimd Engine: generated patterns
# ----------------------------------------------------------------------------------------------
def _affine_values(dst: NkiTensor, pattern, offset: int, channel_multiplier: int, where: str) -> np.ndarray:
    """offset + p * channel_multiplier + sum(i_k * step_k) over a pattern of up to 4 [step, num] pairs."""
    check(isinstance(pattern, (list, tuple)) and 1 <= len(pattern) <= 4 and all(len(p) == 2 for p in pattern),
          f"{where}: pattern must be a list of up to 4 [step, num] pairs, got {pattern!r}")
    nums = [int(n) for _, n in pattern]
    check(_core.prod(nums) == dst.free_size, f"{where}: pattern covers {_core.prod(nums)} elements, dst has {dst.free_size} per partition")
    vals = np.full((dst.partitions, *nums), int(offset), dtype=np.int64)
    vals += (np.arange(dst.partitions) * int(channel_multiplier)).reshape(-1, *([1] * len(nums)))
    for d, (step, n) in enumerate(pattern):
        shape = [1] * (len(nums) + 1)
        shape[d + 1] = int(n)
        vals += (np.arange(int(n)) * int(step)).reshape(shape)
    check(np.all(np.abs(vals) < 2 ** 31), f"{where}: affine values overflow int32")
    return vals.reshape(dst.partitions, dst.free_size)


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=equal, offset=0, name=None):
    """dst = where(cmp_op(affine_value, 0), on_true_tile, on_false_value), the predicate generated from the
    partition index and the free-axis pattern (int32 arithmetic)."""
    _count("affine_select")
    where = "affine_select"
    _engine_operand(dst, where, "dst", allowed=(SBUF,))
    _engine_operand(on_true_tile, where, "on_true_tile", allowed=(SBUF,))
    _same_layout(dst, on_true_tile, where, "dst", "on_true_tile")
    check(isinstance(cmp_op, _Op) and cmp_op.kind == "cmp", f"{where}: {cmp_op!r} is not a comparison operator")
    vals = _affine_values(dst, pattern, offset, channel_multiplier, where)
    pred = cmp_op.fn(vals, 0) != 0
    _write2d(dst, np.where(pred, _as2d(on_true_tile), np.float32(on_false_value)))
