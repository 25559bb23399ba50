"""NKI kernels for the selective scan (Mamba-1), chunked over time: forward and backward (the one-token
decoding update is ``fused_recurrent.py``).

Layout (prepared by ``layout.py``): channel-major ``x, dt, z, dy`` (b, d, T); ``A`` (d, N) fp32;
``B, C`` (b, G, N, T); ``D, dt_bias`` (d, 1) fp32; states (b, d, N) fp32.

Channels go on the 128 partitions (tiles of 128, the last one partial), time on the free axis in chunks;
``nisa.tensor_tensor_scan`` runs the recurrence h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t] for one
state index n per instruction, carrying h between chunks through its ``initial`` operand. B and C are
shared by the channels of a group; the Tensor Engine broadcasts them to the channel tile with a one-hot
(G, P) matrix (and sums per-channel gradients back per group with its transpose). All math is fp32.

The backward pass per (batch, channel tile) first re-runs the forward recurrence to keep the state at
every chunk start (in SBUF), then walks the chunks from last to first. The adjoint
g[t] = C[t] dy[t] + exp(dt[t+1] A) g[t+1] runs as a ``tensor_tensor_scan`` over time-reversed inputs
(``dt_r``, ``dy_r``, ``z_r``, ``C_r`` are the same tensors flipped along T, and the dt window is shifted
by one step so that position s of the reversed chunk pairs exp(dt[t+1] A) with g[t+1]); the reversed
adjoint is flipped back on the Tensor Engine (transpose, then multiply by the exchange matrix) and
combined with the recomputed forward states.
"""
import nki
import nki.isa as nisa
import nki.language as nl

from ..nki_common import PMAX, exchange, fill, group_onehot, group_onehot_t, load, reverse_free

FWD_CHUNK = 512  # one PSUM bank of fp32 per partition: the moving free size of the B/C broadcast matmul
BWD_CHUNK = 128  # the reversal goes through a 128x128 Tensor Engine transpose


def _dt_tile(dt_src, P, L, bias_t, has_bias, dt_softplus):
    """softplus(dt + bias) (or dt + bias) of a (P, L) HBM view, fp32."""
    raw = load(dt_src, (P, L), dt_src.dtype)
    out = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
    _dt_apply(out, raw, bias_t, has_bias, dt_softplus)
    return raw, out


def _dt_apply(out, raw, bias_t, has_bias, dt_softplus):
    if dt_softplus:
        if has_bias:
            nisa.activation(dst=out, op=nl.softplus, data=raw, bias=bias_t)
        else:
            nisa.activation(dst=out, op=nl.softplus, data=raw)
    elif has_bias:
        nisa.activation(dst=out, op=nl.copy, data=raw, bias=bias_t)
    else:
        nisa.tensor_copy(dst=out, src=raw)


def _broadcast(sel, rows, P, L):
    """(G, L) SBUF rows -> (P, L) PSUM, each channel reading its group's row."""
    out = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=out, stationary=sel, moving=rows, is_stationary_onezero=True, accumulate=False)
    return out


def _tile_constants(A, D, dt_bias, c0, P, N, has_D, has_bias):
    A_t = load(A[c0:c0 + P, :], (P, N), nl.float32)
    D_t = load(D[c0:c0 + P, :], (P, 1), nl.float32) if has_D else None
    bias_t = load(dt_bias[c0:c0 + P, :], (P, 1), nl.float32) if has_bias else None
    return A_t, D_t, bias_t


def _silu_gate(z_src, P, L):
    z_t = load(z_src, (P, L), z_src.dtype)
    gate = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=gate, op=nl.silu, data=z_t)
    return z_t, gate


@nki.jit
def selective_scan_fwd(x, dt, A, B, C, D, z, dt_bias, h0, has_D, has_z, has_bias, dt_softplus, chunk=FWD_CHUNK):
    """y (b, d, T) in x.dtype and the final state (b, d, N) fp32."""
    nb, d, T = x.shape
    N = A.shape[1]
    G = B.shape[1]
    dg = d // G
    assert chunk <= nl.tile_size.gemm_moving_fmax
    y = nl.ndarray((nb, d, T), dtype=x.dtype, buffer=nl.shared_hbm)
    h_out = nl.ndarray((nb, d, N), dtype=nl.float32, buffer=nl.shared_hbm)
    for c0 in range(0, d, PMAX):
        P = min(PMAX, d - c0)
        A_t, D_t, bias_t = _tile_constants(A, D, dt_bias, c0, P, N, has_D, has_bias)
        sel = group_onehot(c0, P, G, dg, B.dtype)
        for ib in range(nb):
            h = load(h0[ib, c0:c0 + P, :], (P, N), nl.float32)
            for t0 in range(0, T, chunk):
                L = min(chunk, T - t0)
                x_t = load(x[ib, c0:c0 + P, t0:t0 + L], (P, L), x.dtype)
                dt_raw, dtp = _dt_tile(dt[ib, c0:c0 + P, t0:t0 + L], P, L, bias_t, has_bias, dt_softplus)
                dtx = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=dtx, data1=dtp, data2=x_t, op=nl.multiply)
                B_t = load(B[ib, :, :, t0:t0 + L], (G, N, L), B.dtype)
                C_t = load(C[ib, :, :, t0:t0 + L], (G, N, L), C.dtype)
                acc = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                if has_D:
                    nisa.tensor_scalar(dst=acc, data=x_t, op0=nl.multiply, operand0=D_t)
                else:
                    nisa.memset(dst=acc, value=0.0)
                for n in range(N):
                    dA = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.activation(dst=dA, op=nl.exp, data=dtp, scale=A_t[:, n:n + 1])
                    Bb = _broadcast(sel, B_t[:, n, :], P, L)
                    u = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=u, data1=dtx, data2=Bb, op=nl.multiply)
                    hs = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor_scan(dst=hs, data0=dA, data1=u, initial=h[:, n:n + 1],
                                            op0=nl.multiply, op1=nl.add)
                    nisa.tensor_copy(dst=h[:, n:n + 1], src=hs[:, L - 1:L])
                    Cb = _broadcast(sel, C_t[:, n, :], P, L)
                    hc = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=hc, data1=hs, data2=Cb, op=nl.multiply)
                    nisa.tensor_tensor(dst=acc, data1=acc, data2=hc, op=nl.add)
                y_t = nl.ndarray((P, L), dtype=x.dtype, buffer=nl.sbuf)
                if has_z:
                    z_t, gate = _silu_gate(z[ib, c0:c0 + P, t0:t0 + L], P, L)
                    nisa.tensor_tensor(dst=y_t, data1=acc, data2=gate, op=nl.multiply)
                else:
                    nisa.tensor_copy(dst=y_t, src=acc)
                nisa.dma_copy(dst=y[ib, c0:c0 + P, t0:t0 + L], src=y_t)
            nisa.dma_copy(dst=h_out[ib, c0:c0 + P, :], src=h)
    return y, h_out


@nki.jit
def selective_scan_bwd(x, dt, A, B, C, D, z, dt_bias, h0, dy, dhT, dt_r, dy_r, z_r, C_r,
                       has_D, has_z, has_bias, dt_softplus, chunk=BWD_CHUNK):
    """Gradients of ``selective_scan_fwd``. ``dt_r, dy_r, z_r, C_r``: dt, dy, z, C flipped along T.

    Returns dx, ddt (b, d, T); dz (b, d, T) if has_z; per-batch partial sums dA (b, d, N), dD (b, d, 1),
    d dt_bias (b, d, 1); d initial state (b, d, N); per-channel-tile partial sums dB, dC
    (b, n_tiles, G, N, T) fp32 (the wrapper adds the partials)."""
    nb, d, T = x.shape
    N = A.shape[1]
    G = B.shape[1]
    dg = d // G
    n_tiles = (d + PMAX - 1) // PMAX
    nck = (T + chunk - 1) // chunk
    assert chunk <= PMAX
    dx = nl.ndarray((nb, d, T), dtype=x.dtype, buffer=nl.shared_hbm)
    ddt = nl.ndarray((nb, d, T), dtype=dt.dtype, buffer=nl.shared_hbm)
    dA_out = nl.ndarray((nb, d, N), dtype=nl.float32, buffer=nl.shared_hbm)
    dD_out = nl.ndarray((nb, d, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    dbias_out = nl.ndarray((nb, d, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    dh0_out = nl.ndarray((nb, d, N), dtype=nl.float32, buffer=nl.shared_hbm)
    dB_out = nl.ndarray((nb, n_tiles, G, N, T), dtype=nl.float32, buffer=nl.shared_hbm)
    dC_out = nl.ndarray((nb, n_tiles, G, N, T), dtype=nl.float32, buffer=nl.shared_hbm)
    dz = nl.ndarray((nb, d, T), dtype=z.dtype, buffer=nl.shared_hbm) if has_z else None

    J_full = exchange(min(chunk, T), nl.float32)
    J_last = exchange(T - (nck - 1) * chunk, nl.float32) if T % chunk != 0 and nck > 1 else J_full

    for ct in range(n_tiles):
        c0 = ct * PMAX
        P = min(PMAX, d - c0)
        A_t, D_t, bias_t = _tile_constants(A, D, dt_bias, c0, P, N, has_D, has_bias)
        sel = group_onehot(c0, P, G, dg, B.dtype)
        sel_r = group_onehot(c0, P, G, dg, C_r.dtype)
        selt = group_onehot_t(c0, P, G, dg, nl.float32)
        for ib in range(nb):
            # ---- phase 1: forward recurrence, keeping the state at every chunk start ----------------
            ckpt = nl.ndarray((P, N, nck), dtype=nl.float32, buffer=nl.sbuf)
            h = load(h0[ib, c0:c0 + P, :], (P, N), nl.float32)
            for k in range(nck):
                nisa.tensor_copy(dst=ckpt[:, :, k], src=h)
                if k < nck - 1:
                    t0 = k * chunk
                    L = min(chunk, T - t0)
                    x_t = load(x[ib, c0:c0 + P, t0:t0 + L], (P, L), x.dtype)
                    dt_raw, dtp = _dt_tile(dt[ib, c0:c0 + P, t0:t0 + L], P, L, bias_t, has_bias, dt_softplus)
                    dtx = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=dtx, data1=dtp, data2=x_t, op=nl.multiply)
                    B_t = load(B[ib, :, :, t0:t0 + L], (G, N, L), B.dtype)
                    for n in range(N):
                        dA = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.activation(dst=dA, op=nl.exp, data=dtp, scale=A_t[:, n:n + 1])
                        Bb = _broadcast(sel, B_t[:, n, :], P, L)
                        u = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.tensor_tensor(dst=u, data1=dtx, data2=Bb, op=nl.multiply)
                        hs = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.tensor_tensor_scan(dst=hs, data0=dA, data1=u, initial=h[:, n:n + 1],
                                                op0=nl.multiply, op1=nl.add)
                        nisa.tensor_copy(dst=h[:, n:n + 1], src=hs[:, L - 1:L])

            # ---- phase 2: chunks from last to first ------------------------------------------------
            g_carry = load(dhT[ib, c0:c0 + P, :], (P, N), nl.float32)
            dA_acc = fill((P, N), 0.0, nl.float32)
            dD_acc = fill((P, 1), 0.0, nl.float32)
            dbias_acc = fill((P, 1), 0.0, nl.float32)
            dh0_t = nl.ndarray((P, N), dtype=nl.float32, buffer=nl.sbuf)
            for kk in range(nck):
                k = nck - 1 - kk
                t0 = k * chunk
                L = min(chunk, T - t0)
                s0 = T - t0 - L  # start of this chunk in reversed time
                jmat = J_last if L != min(chunk, T) else J_full
                # forward-order inputs
                x_t = load(x[ib, c0:c0 + P, t0:t0 + L], (P, L), x.dtype)
                dt_raw, dtp = _dt_tile(dt[ib, c0:c0 + P, t0:t0 + L], P, L, bias_t, has_bias, dt_softplus)
                dtx = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=dtx, data1=dtp, data2=x_t, op=nl.multiply)
                dy_t = load(dy[ib, c0:c0 + P, t0:t0 + L], (P, L), dy.dtype)
                B_t = load(B[ib, :, :, t0:t0 + L], (G, N, L), B.dtype)
                C_t = load(C[ib, :, :, t0:t0 + L], (G, N, L), C.dtype)
                dys = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)  # dL/d(pre-gate output)
                if has_z:
                    z_t, gate = _silu_gate(z[ib, c0:c0 + P, t0:t0 + L], P, L)
                    nisa.tensor_tensor(dst=dys, data1=dy_t, data2=gate, op=nl.multiply)
                else:
                    nisa.tensor_copy(dst=dys, src=dy_t)
                # time-reversed inputs; the dt window starts one step earlier (exp(dt[t+1] A) pairs with g[t+1])
                dtr_raw = nl.ndarray((P, L), dtype=dt_r.dtype, buffer=nl.sbuf)
                if s0 > 0:
                    nisa.dma_copy(dst=dtr_raw, src=dt_r[ib, c0:c0 + P, s0 - 1:s0 - 1 + L])
                else:
                    nisa.memset(dst=dtr_raw[:, 0:1], value=0.0)
                    if L > 1:
                        nisa.dma_copy(dst=dtr_raw[:, 1:L], src=dt_r[ib, c0:c0 + P, 0:L - 1])
                dtrp = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                _dt_apply(dtrp, dtr_raw, bias_t, has_bias, dt_softplus)
                if s0 == 0:
                    nisa.memset(dst=dtrp[:, 0:1], value=0.0)  # exp(0 * A) = 1 carries dL/dh_final in
                dyr_t = load(dy_r[ib, c0:c0 + P, s0:s0 + L], (P, L), dy_r.dtype)
                dysr = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                if has_z:
                    zr_t, gate_r = _silu_gate(z_r[ib, c0:c0 + P, s0:s0 + L], P, L)
                    nisa.tensor_tensor(dst=dysr, data1=dyr_t, data2=gate_r, op=nl.multiply)
                else:
                    nisa.tensor_copy(dst=dysr, src=dyr_t)
                Cr_t = load(C_r[ib, :, :, s0:s0 + L], (G, N, L), C_r.dtype)

                du = fill((P, L), 0.0, nl.float32)     # dL/d(dt * x)
                ddtA = fill((P, L), 0.0, nl.float32)   # dL/d(dt) through exp(dt A)
                ys = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)  # recomputed pre-gate output
                if has_D:
                    nisa.tensor_scalar(dst=ys, data=x_t, op0=nl.multiply, operand0=D_t)
                else:
                    nisa.memset(dst=ys, value=0.0)
                dB_t = nl.ndarray((G, N, L), dtype=nl.float32, buffer=nl.sbuf)
                dC_t = nl.ndarray((G, N, L), dtype=nl.float32, buffer=nl.sbuf)
                for n in range(N):
                    A_n = A_t[:, n:n + 1]
                    # forward states of this chunk
                    dA = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.activation(dst=dA, op=nl.exp, data=dtp, scale=A_n)
                    Bb = _broadcast(sel, B_t[:, n, :], P, L)
                    u = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=u, data1=dtx, data2=Bb, op=nl.multiply)
                    hs = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor_scan(dst=hs, data0=dA, data1=u, initial=ckpt[:, n, k],
                                            op0=nl.multiply, op1=nl.add)
                    Cb = _broadcast(sel, C_t[:, n, :], P, L)
                    hc = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=hc, data1=hs, data2=Cb, op=nl.multiply)
                    nisa.tensor_tensor(dst=ys, data1=ys, data2=hc, op=nl.add)
                    # dC[n, t] = sum over the group's channels of dys * h
                    dyh = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=dyh, data1=dys, data2=hs, op=nl.multiply)
                    red = nl.ndarray((G, L), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=red, stationary=selt, moving=dyh, is_stationary_onezero=True, accumulate=False)
                    nisa.tensor_copy(dst=dC_t[:, n, :], src=red)
                    # adjoint, reversed time: g'[s] = exp(dt'[s-1] A) g'[s-1] + dys'[s] C'[s]
                    dAr = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.activation(dst=dAr, op=nl.exp, data=dtrp, scale=A_n)
                    Cbr = _broadcast(sel_r, Cr_t[:, n, :], P, L)
                    e = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=e, data1=dysr, data2=Cbr, op=nl.multiply)
                    gr = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor_scan(dst=gr, data0=dAr, data1=e, initial=g_carry[:, n:n + 1],
                                            op0=nl.multiply, op1=nl.add)
                    nisa.tensor_copy(dst=g_carry[:, n:n + 1], src=gr[:, L - 1:L])
                    g_ps = reverse_free(gr, P, L, jmat)
                    g = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_copy(dst=g, src=g_ps)
                    # dB[n, t] = sum over the group's channels of g * dt * x
                    gx = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=gx, data1=g, data2=dtx, op=nl.multiply)
                    red2 = nl.ndarray((G, L), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=red2, stationary=selt, moving=gx, is_stationary_onezero=True, accumulate=False)
                    nisa.tensor_copy(dst=dB_t[:, n, :], src=red2)
                    # d(dt x) += g B
                    gB = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=gB, data1=g, data2=Bb, op=nl.multiply)
                    nisa.tensor_tensor(dst=du, data1=du, data2=gB, op=nl.add)
                    # through exp(dt A): g * h[t-1] * exp(dt A) = g * (h[t] - dt x B)
                    hm = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=hm, data1=hs, data2=u, op=nl.subtract)
                    ghm = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=ghm, data1=g, data2=hm, op=nl.multiply)
                    nisa.scalar_tensor_tensor(dst=ddtA, data=ghm, op0=nl.multiply, operand0=A_n,
                                              op1=nl.add, operand1=ddtA)
                    gdt = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=gdt, data1=ghm, data2=dtp, op=nl.multiply)
                    colsum = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_reduce(dst=colsum, op=nl.add, data=gdt, axis=1, keepdims=True)
                    nisa.tensor_tensor(dst=dA_acc[:, n:n + 1], data1=dA_acc[:, n:n + 1], data2=colsum, op=nl.add)
                    if k == 0:  # dL/dh_init = exp(dt[0] A) g[0]
                        nisa.tensor_tensor(dst=dh0_t[:, n:n + 1], data1=g[:, 0:1], data2=dA[:, 0:1], op=nl.multiply)
                # per-channel gradients of this chunk
                dudt = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=dudt, data1=du, data2=dtp, op=nl.multiply)
                dx_t = nl.ndarray((P, L), dtype=x.dtype, buffer=nl.sbuf)
                if has_D:
                    nisa.scalar_tensor_tensor(dst=dx_t, data=dys, op0=nl.multiply, operand0=D_t, op1=nl.add, operand1=dudt)
                    dysx = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=dysx, data1=dys, data2=x_t, op=nl.multiply)
                    colsum = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_reduce(dst=colsum, op=nl.add, data=dysx, axis=1, keepdims=True)
                    nisa.tensor_tensor(dst=dD_acc, data1=dD_acc, data2=colsum, op=nl.add)
                else:
                    nisa.tensor_copy(dst=dx_t, src=dudt)
                nisa.dma_copy(dst=dx[ib, c0:c0 + P, t0:t0 + L], src=dx_t)
                ddtp = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=ddtp, data1=du, data2=x_t, op=nl.multiply)
                nisa.tensor_tensor(dst=ddtp, data1=ddtp, data2=ddtA, op=nl.add)
                ddt_t = nl.ndarray((P, L), dtype=dt.dtype, buffer=nl.sbuf)
                if dt_softplus:  # d softplus(v) / dv = sigmoid(v)
                    sig = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    if has_bias:
                        nisa.activation(dst=sig, op=nl.sigmoid, data=dt_raw, bias=bias_t)
                    else:
                        nisa.activation(dst=sig, op=nl.sigmoid, data=dt_raw)
                    nisa.tensor_tensor(dst=ddtp, data1=ddtp, data2=sig, op=nl.multiply)
                nisa.tensor_copy(dst=ddt_t, src=ddtp)
                nisa.dma_copy(dst=ddt[ib, c0:c0 + P, t0:t0 + L], src=ddt_t)
                if has_bias:
                    colsum = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_reduce(dst=colsum, op=nl.add, data=ddtp, axis=1, keepdims=True)
                    nisa.tensor_tensor(dst=dbias_acc, data1=dbias_acc, data2=colsum, op=nl.add)
                if has_z:  # y = ys * silu(z)
                    sdx = nl.ndarray((P, L), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.activation(dst=sdx, op=nl.silu_dx, data=z_t)
                    nisa.tensor_tensor(dst=sdx, data1=sdx, data2=ys, op=nl.multiply)
                    dz_t = nl.ndarray((P, L), dtype=z.dtype, buffer=nl.sbuf)
                    nisa.tensor_tensor(dst=dz_t, data1=sdx, data2=dy_t, op=nl.multiply)
                    nisa.dma_copy(dst=dz[ib, c0:c0 + P, t0:t0 + L], src=dz_t)
                nisa.dma_copy(dst=dB_out[ib, ct, :, :, t0:t0 + L], src=dB_t)
                nisa.dma_copy(dst=dC_out[ib, ct, :, :, t0:t0 + L], src=dC_t)
            nisa.dma_copy(dst=dA_out[ib, c0:c0 + P, :], src=dA_acc)
            nisa.dma_copy(dst=dD_out[ib, c0:c0 + P, :], src=dD_acc)
            nisa.dma_copy(dst=dbias_out[ib, c0:c0 + P, :], src=dbias_acc)
            nisa.dma_copy(dst=dh0_out[ib, c0:c0 + P, :], src=dh0_t)
    if has_z:
        return dx, ddt, dz, dA_out, dD_out, dbias_out, dh0_out, dB_out, dC_out
    return dx, ddt, dA_out, dD_out, dbias_out, dh0_out, dB_out, dC_out
