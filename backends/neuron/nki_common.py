"""Helpers shared by the NKI kernels of every op (plain functions: the NKI compiler inlines them at the call
site). Imports ``nki``: only kernel modules import this.

Constant matrices are built on chip with ``nisa.memset`` + ``nisa.affine_select`` rather than loaded from
HBM: the group one-hot matrices that broadcast or reduce over the channels of a B/C group on the Tensor
Engine, and the exchange matrix that reverses the free axis of a tile.
"""
import nki.isa as nisa
import nki.language as nl

PMAX = 128
NEG = -1.0e30  # "minus infinity" that stays finite: exp(NEG - m) == 0 and NEG - NEG == 0 (no NaN)


def fill(shape, value, dtype):
    t = nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=t, value=value)
    return t


def group_onehot(c0, P, G, dg, dtype):
    """sel[g, p] = 1 if channel c0 + p belongs to group g (channels g*dg .. g*dg+dg-1), else 0. (G, P).

    As the stationary operand of ``nc_matmul`` it broadcasts a (G, L) row block of B or C to the (P, L)
    channel tile: out[p, t] = B[group(c0 + p), t]."""
    sel = fill((G, P), 1.0, dtype)
    # c0 + p - g*dg >= 0
    nisa.affine_select(dst=sel, pattern=[[1, P]], channel_multiplier=-dg, on_true_tile=sel,
                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=c0)
    # g*dg + dg - 1 - (c0 + p) >= 0
    nisa.affine_select(dst=sel, pattern=[[-1, P]], channel_multiplier=dg, on_true_tile=sel,
                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=dg - 1 - c0)
    return sel


def group_onehot_t(c0, P, G, dg, dtype):
    """The transpose of :func:`group_onehot`, (P, G): as the stationary operand it sums a (P, L) channel
    tile over the channels of each group, out[g, t] = sum_{p in g} x[p, t]."""
    selt = fill((P, G), 1.0, dtype)
    nisa.affine_select(dst=selt, pattern=[[-dg, G]], channel_multiplier=1, on_true_tile=selt,
                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=c0)
    nisa.affine_select(dst=selt, pattern=[[dg, G]], channel_multiplier=-1, on_true_tile=selt,
                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=dg - 1 - c0)
    return selt


def exchange(L, dtype):
    """J[i, j] = 1 if i + j == L - 1 (L, L). ``nc_matmul(dst, stationary=xT, moving=J)`` with xT the (L, P)
    transpose of a (P, L) tile gives x with its free axis reversed."""
    ones = fill((L, L), 1.0, dtype)
    j = nl.ndarray((L, L), dtype=dtype, buffer=nl.sbuf)
    nisa.affine_select(dst=j, pattern=[[1, L]], channel_multiplier=1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.equal, offset=-(L - 1))
    return j


def reverse_free(src, P, L, jmat):
    """(P, L) SBUF fp32 tile -> PSUM tile with the free axis reversed (two Tensor Engine passes:
    transpose, then multiply by the exchange matrix). L <= 128."""
    tp = nl.ndarray((L, P), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=tp, data=src)
    ts = nl.ndarray((L, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=ts, src=tp)
    out = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=out, stationary=ts, moving=jmat, is_moving_onezero=True, accumulate=False)
    return out


def load_transposed(src, rows, cols, dtype):
    """HBM (rows, cols) view -> SBUF (cols, rows) tile, through a Tensor Engine transpose. rows, cols <= 128."""
    t = nl.ndarray((rows, cols), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    tp = nl.ndarray((cols, rows), dtype=dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=tp, data=t)
    ts = nl.ndarray((cols, rows), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=ts, src=tp)
    return ts


def load(src, shape, dtype):
    t = nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    return t
