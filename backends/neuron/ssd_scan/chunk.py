"""NKI kernel of the SSD scan (Mamba-2), chunked over time: the forward (the backward runs the torch backend,
see ``custom_ops.py``).

Layout (prepared by ``layout.py``): ``x, z`` token-major (b, T, H, P) as the op API has them; ``dt`` (b, H, T)
(time on the free axis); ``A, dt_bias`` (H, 1) fp32; ``B, C`` (b, T, G, N); ``D`` (H, P) fp32; states
(b, H, N, P) fp32 (state index on the partitions).

Per batch row, chunk of L <= 128 tokens (time on the partitions of every (L, .) tile) and group of B/C:

* ``(C B^T)^T`` (L, L) on the Tensor Engine, contracting N on the partitions (B and C are transposed on chip,
  N in tiles of 128, accumulated in PSUM), once for the heads of the group;
* per head: dt' = clamp(softplus(dt + dt_bias)) on a (1, L) row, the log-decays ``a = dt' A`` moved to a
  column (L, 1) by a transpose, then every decay quantity by matmuls against constant 0/1 masks (made on
  chip with ``affine_select``), each a sum of same-sign terms, never a difference of prefix sums:
  ``seg^T[j, i] = sum_{j < k <= i} a_k`` (stationary ``[k > j] a_k``, moving ``[k <= i]``), ``cs_i =
  sum_{k <= i} a_k``, ``sfx_j = sum_{k > j} a_k`` and the chunk total on the N partitions of the state;
* ``y = ((C B^T)^T * exp(seg^T) * dt'_j)^T-product with x`` (stationary the (L, L) kernel, moving x (L, P)),
  plus ``exp(cs_i) C_i h`` (stationary ``C^T`` (N, L), moving the state (N, P)), plus ``D x``, gated by
  silu(z), stored in x's dtype;
* the state: ``h <- exp(total) h + (B * exp(sfx) dt')^T x`` (stationary (L, N), moving x (L, P)).

Limits: the chunk is at most 128 tokens (the partitions); P is tiled by 512 (one PSUM bank of fp32), N by
128. Everything is fp32 on chip. The loops (batch, chunks, groups, heads, P and N tiles) are unrolled at trace
time.
"""
import nki
import nki.isa as nisa
import nki.language as nl

from ..nki_common import PMAX, fill, load

CHUNK = 128  # tokens per chunk: the partition dimension of the (L, L) kernels
P_TILE = 512  # the moving free size of a matmul (one 2 KiB PSUM bank of fp32)


def _copy(src, shape, dtype=nl.float32):
    out = nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=out, src=src)
    return out


def _mm(stationary, moving, M, F):
    """stationary[K, M]^T @ moving[K, F] -> SBUF (M, F) fp32."""
    ps = nl.ndarray((M, F), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=stationary, moving=moving, accumulate=False)
    return _copy(ps, (M, F))


def _transpose(src, rows, cols):
    """SBUF (rows, cols) fp32 -> SBUF (cols, rows) fp32 (Tensor Engine, rows, cols <= 128)."""
    ps = nl.ndarray((cols, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=ps, data=src)
    return _copy(ps, (cols, rows))


def _mask(L, lower, dtype=nl.float32):
    """(L, L) 0/1 matrix over (partition k, free i): [k <= i] (``lower=False``) or [k > i] (``lower=True``)."""
    ones = fill((L, L), 1.0, dtype)
    m = nl.ndarray((L, L), dtype=dtype, buffer=nl.sbuf)
    if lower:  # k - i - 1 >= 0
        nisa.affine_select(dst=m, pattern=[[-1, L]], channel_multiplier=1, on_true_tile=ones,
                           on_false_value=0.0, cmp_op=nl.greater_equal, offset=-1)
    else:  # i - k >= 0
        nisa.affine_select(dst=m, pattern=[[1, L]], channel_multiplier=-1, on_true_tile=ones,
                           on_false_value=0.0, cmp_op=nl.greater_equal, offset=0)
    return m


def _dt_row(dt_src, L, A_t, bias_t, has_bias, dt_softplus, lo, hi, has_hi):
    """dt' = clamp(softplus(dt + bias), lo, hi) and a = dt' A of a (1, L) HBM view, fp32 rows."""
    raw = load(dt_src, (1, L), dt_src.dtype)
    dtp = nl.ndarray((1, L), dtype=nl.float32, buffer=nl.sbuf)
    if dt_softplus:
        if has_bias:
            nisa.activation(dst=dtp, op=nl.softplus, data=raw, bias=bias_t)
        else:
            nisa.activation(dst=dtp, op=nl.softplus, data=raw)
    elif has_bias:
        nisa.activation(dst=dtp, op=nl.copy, data=raw, bias=bias_t)
    else:
        nisa.tensor_copy(dst=dtp, src=raw)
    if has_hi:  # min(v, hi) = -max(-v, -hi), then max(., lo)
        neg = nl.ndarray((1, L), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=neg, data=dtp, op0=nl.multiply, operand0=-1.0, op1=nl.maximum, operand1=-hi)
        nisa.tensor_scalar(dst=dtp, data=neg, op0=nl.multiply, operand0=-1.0, op1=nl.maximum, operand1=lo)
    else:
        nisa.tensor_scalar(dst=dtp, data=dtp, op0=nl.maximum, operand0=lo)
    a = nl.ndarray((1, L), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=a, data=dtp, op0=nl.multiply, operand0=A_t)
    return dtp, a


@nki.jit
def ssd_scan_fwd(x, dt, A, B, C, D, z, dt_bias, h0, has_D, has_z, has_bias, dt_softplus, lo, hi, has_hi,
                 chunk=CHUNK):
    """y (b, T, H, P) in x.dtype and the final state (b, H, N, P) fp32."""
    nb, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Lmax = min(chunk, T)
    assert Lmax <= PMAX
    n_tiles = [(n0, min(PMAX, N - n0)) for n0 in range(0, N, PMAX)]
    p_tiles = [(p0, min(P_TILE, P - p0)) for p0 in range(0, P, P_TILE)]
    Nt0 = n_tiles[0][1]
    y = nl.ndarray((nb, T, H, P), dtype=x.dtype, buffer=nl.shared_hbm)
    h_out = nl.ndarray((nb, H, N, P), dtype=nl.float32, buffer=nl.shared_hbm)

    upper = _mask(Lmax, lower=False)  # [k <= i]
    later = _mask(Lmax, lower=True)  # [k > j]
    ones_ln = fill((Lmax, Nt0), 1.0, nl.float32)
    ones_1l = fill((1, Lmax), 1.0, nl.float32)
    # per-head constants: A, dt_bias (1, 1) and D broadcast to the chunk's rows (Lmax, P)
    A_h, bias_h, D_h = [], [], []
    for h in range(H):
        A_h.append(load(A[h:h + 1, :], (1, 1), nl.float32))
        bias_h.append(load(dt_bias[h:h + 1, :], (1, 1), nl.float32) if has_bias else None)
        if has_D:
            Dbc = nl.ndarray((Lmax, P), dtype=nl.float32, buffer=nl.sbuf)
            for p0, Pt in p_tiles:
                row = load(D[h:h + 1, p0:p0 + Pt], (1, Pt), nl.float32)
                ps = nl.ndarray((Lmax, Pt), dtype=nl.float32, buffer=nl.psum)
                nisa.nc_matmul(dst=ps, stationary=ones_1l, moving=row, accumulate=False)
                nisa.tensor_copy(dst=Dbc[:, p0:p0 + Pt], src=ps)
            D_h.append(Dbc)
        else:
            D_h.append(None)

    for ib in range(nb):
        state = [[load(h0[ib, h, n0:n0 + Nt, :], (Nt, P), nl.float32) for n0, Nt in n_tiles] for h in range(H)]
        for t0 in range(0, T, Lmax):
            L = min(Lmax, T - t0)
            up, lt = upper[0:L, 0:L], later[0:L, 0:L]
            for g in range(G):
                Bf = _copy(load(B[ib, t0:t0 + L, g, :], (L, N), B.dtype), (L, N))
                Cf = _copy(load(C[ib, t0:t0 + L, g, :], (L, N), C.dtype), (L, N))
                BT = [_transpose(Bf[:, n0:n0 + Nt], L, Nt) for n0, Nt in n_tiles]
                CT = [_transpose(Cf[:, n0:n0 + Nt], L, Nt) for n0, Nt in n_tiles]
                # (C B^T)^T [j, i] = B_j . C_i, contracting N on the partitions
                cb_ps = nl.ndarray((L, L), dtype=nl.float32, buffer=nl.psum)
                for k in range(len(n_tiles)):
                    nisa.nc_matmul(dst=cb_ps, stationary=BT[k], moving=CT[k], accumulate=k > 0)
                CBT = _copy(cb_ps, (L, L))
                for h in range(g * R, (g + 1) * R):
                    dtp_row, a_row = _dt_row(dt[ib, h:h + 1, t0:t0 + L], L, A_h[h], bias_h[h], has_bias,
                                             dt_softplus, lo, hi, has_hi)
                    a_col = _transpose(a_row, 1, L)
                    dt_col = _transpose(dtp_row, 1, L)
                    # seg^T[j, i] = sum_{j < k <= i} a_k; decays exp(seg^T), masked to i >= j
                    la = nl.ndarray((L, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=la, data=lt, op0=nl.multiply, operand0=a_col)
                    seg_ps = nl.ndarray((L, L), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=seg_ps, stationary=la, moving=up, accumulate=False)
                    dec = nl.ndarray((L, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.activation(dst=dec, op=nl.exp, data=seg_ps)
                    nisa.affine_select(dst=dec, pattern=[[1, L]], channel_multiplier=-1, on_true_tile=dec,
                                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=0)
                    WT = nl.ndarray((L, L), dtype=nl.float32, buffer=nl.sbuf)  # [j, i]
                    nisa.scalar_tensor_tensor(dst=WT, data=dec, op0=nl.multiply, operand0=dt_col,
                                              op1=nl.multiply, operand1=CBT)
                    # exp(cs_i) (L, 1); exp(sfx_j) dt'_j (L, 1); exp(chunk total) on the state's partitions
                    ecs = nl.ndarray((L, 1), dtype=nl.float32, buffer=nl.sbuf)
                    cs_ps = nl.ndarray((L, 1), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=cs_ps, stationary=up, moving=a_col, accumulate=False)
                    nisa.activation(dst=ecs, op=nl.exp, data=cs_ps)
                    w = nl.ndarray((L, 1), dtype=nl.float32, buffer=nl.sbuf)
                    sfx_ps = nl.ndarray((L, 1), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=sfx_ps, stationary=lt, moving=a_col, accumulate=False)
                    nisa.activation(dst=w, op=nl.exp, data=sfx_ps)
                    nisa.tensor_tensor(dst=w, data1=w, data2=dt_col, op=nl.multiply)
                    etot = nl.ndarray((Nt0, 1), dtype=nl.float32, buffer=nl.sbuf)
                    tot_ps = nl.ndarray((Nt0, 1), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=tot_ps, stationary=ones_ln[0:L, :], moving=a_col, accumulate=False)
                    nisa.activation(dst=etot, op=nl.exp, data=tot_ps)
                    Bw = nl.ndarray((L, N), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=Bw, data=Bf, op0=nl.multiply, operand0=w)
                    for p0, Pt in p_tiles:
                        xf = _copy(load(x[ib, t0:t0 + L, h, p0:p0 + Pt], (L, Pt), x.dtype), (L, Pt))
                        yi_ps = nl.ndarray((L, Pt), dtype=nl.float32, buffer=nl.psum)
                        nisa.nc_matmul(dst=yi_ps, stationary=WT, moving=xf, accumulate=False)
                        yo_ps = nl.ndarray((L, Pt), dtype=nl.float32, buffer=nl.psum)
                        for k, (n0, Nt) in enumerate(n_tiles):
                            nisa.nc_matmul(dst=yo_ps, stationary=CT[k], moving=state[h][k][:, p0:p0 + Pt],
                                           accumulate=k > 0)
                        acc = nl.ndarray((L, Pt), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.tensor_scalar(dst=acc, data=yo_ps, op0=nl.multiply, operand0=ecs)
                        nisa.tensor_tensor(dst=acc, data1=acc, data2=yi_ps, op=nl.add)
                        if has_D:
                            skip = nl.ndarray((L, Pt), dtype=nl.float32, buffer=nl.sbuf)
                            nisa.tensor_tensor(dst=skip, data1=xf, data2=D_h[h][0:L, p0:p0 + Pt], op=nl.multiply)
                            nisa.tensor_tensor(dst=acc, data1=acc, data2=skip, op=nl.add)
                        y_t = nl.ndarray((L, Pt), dtype=x.dtype, buffer=nl.sbuf)
                        if has_z:
                            z_t = load(z[ib, t0:t0 + L, h, p0:p0 + Pt], (L, Pt), z.dtype)
                            gate = nl.ndarray((L, Pt), dtype=nl.float32, buffer=nl.sbuf)
                            nisa.activation(dst=gate, op=nl.silu, data=z_t)
                            nisa.tensor_tensor(dst=y_t, data1=acc, data2=gate, op=nl.multiply)
                        else:
                            nisa.tensor_copy(dst=y_t, src=acc)
                        nisa.dma_copy(dst=y[ib, t0:t0 + L, h, p0:p0 + Pt], src=y_t)
                        # the state after this chunk (these columns of it): exp(total) h + (B w)^T x
                        for k, (n0, Nt) in enumerate(n_tiles):
                            su_ps = nl.ndarray((Nt, Pt), dtype=nl.float32, buffer=nl.psum)
                            nisa.nc_matmul(dst=su_ps, stationary=Bw[:, n0:n0 + Nt], moving=xf, accumulate=False)
                            cols = state[h][k][:, p0:p0 + Pt]
                            nisa.scalar_tensor_tensor(dst=cols, data=cols, op0=nl.multiply, operand0=etot[0:Nt, :],
                                                      op1=nl.add, operand1=su_ps)
        for h in range(H):
            for k, (n0, Nt) in enumerate(n_tiles):
                nisa.dma_copy(dst=h_out[ib, h, n0:n0 + Nt, :], src=state[h][k])
    return y, h_out
