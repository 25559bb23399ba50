"""NKI kernel of one decoding step of the selective scan: the state (b, d, N) advanced by one token (the
chunked scan is ``chunk.py``, whose per-tile helpers this kernel shares). Layout prepared by ``layout.py``."""
import nki
import nki.isa as nisa
import nki.language as nl

from ..nki_common import PMAX, group_onehot, load
from .chunk import _broadcast, _dt_tile, _silu_gate, _tile_constants


@nki.jit
def selective_state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, has_D, has_z, has_bias, dt_softplus):
    """One decoding step. state (b, d, N) fp32; x, dt, z (b, d); B, C (b, G, N); D, dt_bias (d, 1).
    Returns y (b, d) in x.dtype and the new state (b, d, N) fp32 (the caller writes it back)."""
    nb, d, N = state.shape
    G = B.shape[1]
    dg = d // G
    assert N <= nl.tile_size.gemm_moving_fmax
    y = nl.ndarray((nb, d), dtype=x.dtype, buffer=nl.shared_hbm)
    new_state = nl.ndarray((nb, d, N), dtype=nl.float32, buffer=nl.shared_hbm)
    for c0 in range(0, d, PMAX):
        P = min(PMAX, d - c0)
        A_t, D_t, bias_t = _tile_constants(A, D, dt_bias, c0, P, N, has_D, has_bias)
        sel = group_onehot(c0, P, G, dg, B.dtype)
        for ib in range(nb):
            h = load(state[ib, c0:c0 + P, :], (P, N), nl.float32)
            x_t = load(x[ib, c0:c0 + P], (P, 1), x.dtype)
            dt_raw, dtp = _dt_tile(dt[ib, c0:c0 + P], P, 1, bias_t, has_bias, dt_softplus)
            B_t = load(B[ib], (G, N), B.dtype)
            C_t = load(C[ib], (G, N), C.dtype)
            dA = nl.ndarray((P, N), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=dA, op=nl.exp, data=A_t, scale=dtp)  # exp(A * dt), dt per partition
            dtx = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=dtx, data1=dtp, data2=x_t, op=nl.multiply)
            nisa.tensor_tensor(dst=h, data1=h, data2=dA, op=nl.multiply)
            Bb = _broadcast(sel, B_t, P, N)
            nisa.scalar_tensor_tensor(dst=h, data=Bb, op0=nl.multiply, operand0=dtx, op1=nl.add, operand1=h)
            Cb = _broadcast(sel, C_t, P, N)
            hc = nl.ndarray((P, N), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=hc, data1=h, data2=Cb, op=nl.multiply)
            acc = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_reduce(dst=acc, op=nl.add, data=hc, axis=1, keepdims=True)
            if has_D:
                nisa.scalar_tensor_tensor(dst=acc, data=x_t, op0=nl.multiply, operand0=D_t, op1=nl.add, operand1=acc)
            y_t = nl.ndarray((P, 1), dtype=x.dtype, buffer=nl.sbuf)
            if has_z:
                z_t, gate = _silu_gate(z[ib, c0:c0 + P], P, 1)
                nisa.tensor_tensor(dst=y_t, data1=acc, data2=gate, op=nl.multiply)
            else:
                nisa.tensor_copy(dst=y_t, src=acc)
            nisa.dma_copy(dst=y[ib, c0:c0 + P], src=y_t)
            nisa.dma_copy(dst=new_state[ib, c0:c0 + P, :], src=h)
    return y, new_state
