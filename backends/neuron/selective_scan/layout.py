"""Bridges between the ``bmojo.ops`` signatures of the scan and its NKI kernels: argument layout on the way
in (token-major in the op API, channel-major for the kernels; the time-reversed copies the backward reads),
gradient reductions on the way out. Pure PyTorch, so it runs on XLA tensors (where it feeds the real
kernels) and on CPU tensors (where the tests feed it to ``nki.simulate`` or the emulator).

Each ``*_impl`` takes ``call(kernel, *args)``, which runs one kernel: on a Neuron device that is simply
``kernel(*args)`` (``bmojo.backends.neuron.library.direct_call``); in the tests it is a simulator call. The
kernel modules (``chunk``, ``fused_recurrent``) are imported lazily: they need the ``nki`` package.
"""
from __future__ import annotations

import importlib

import torch


def _kernels(form: str):
    return importlib.import_module(f"{__package__}.{form}")


def _groups(BC: torch.Tensor) -> torch.Tensor:
    """(b, T, N) or (b, T, G, N) -> (b, T, G, N)."""
    return BC.unsqueeze(2) if BC.dim() == 3 else BC


def _chan(t: torch.Tensor) -> torch.Tensor:
    """(b, T, d) -> (b, d, T) contiguous."""
    return t.transpose(1, 2).contiguous()


def _bc(t: torch.Tensor) -> torch.Tensor:
    """(b, T, [G,] N) -> (b, G, N, T) contiguous."""
    return _groups(t).permute(0, 2, 3, 1).contiguous()


def _vec(t, d, like):
    return (t.float() if t is not None else like.new_zeros(d, dtype=torch.float32)).reshape(d, 1).contiguous()


def _scan_common(x, dt, A, B, C, D, z, dt_bias, initial_state):
    b, T, d = x.shape
    N = A.shape[1]
    h0 = (initial_state.float().contiguous() if initial_state is not None
          else x.new_zeros(b, d, N, dtype=torch.float32))
    return dict(x=_chan(x), dt=_chan(dt), A=A.float().contiguous(), B=_bc(B), C=_bc(C), D=_vec(D, d, x),
                z=_chan(z) if z is not None else None, dt_bias=_vec(dt_bias, d, x), h0=h0)


def selective_scan_impl(call, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None):
    """-> y (b, T, d) in x.dtype, final state (b, d, N) fp32."""
    K = _kernels("chunk")
    a = _scan_common(x, dt, A, B, C, D, z, dt_bias, initial_state)
    y, hT = call(K.selective_scan_fwd, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"],
                 a["z"] if z is not None else a["x"], a["dt_bias"], a["h0"],
                 D is not None, z is not None, dt_bias is not None, bool(dt_softplus))
    return y.transpose(1, 2), hT


def selective_scan_backward_impl(call, dy, dh, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                                 initial_state=None):
    """-> dx, ddt, dA, dB, dC, dD, dz, d dt_bias, d initial_state (None where the input was None)."""
    K = _kernels("chunk")
    b, T, d = x.shape
    a = _scan_common(x, dt, A, B, C, D, z, dt_bias, initial_state)
    dyc = _chan(dy.to(x.dtype))
    flip = lambda t: t.flip(-1).contiguous()  # noqa: E731  (time is the last axis in kernel layout)
    dh = dh.float().contiguous() if dh is not None else x.new_zeros(a["h0"].shape, dtype=torch.float32)
    zc = a["z"] if z is not None else a["x"]
    outs = call(K.selective_scan_bwd, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], zc, a["dt_bias"], a["h0"],
                dyc, dh, flip(a["dt"]), flip(dyc), flip(zc), flip(a["C"]),
                D is not None, z is not None, dt_bias is not None, bool(dt_softplus))
    outs = list(outs)
    dx, ddt = outs.pop(0), outs.pop(0)
    dz = outs.pop(0) if z is not None else None
    dA, dD, dbias, dh0, dB, dC = outs

    def group_grad(g, like):  # (b, tiles, G, N, T) partial sums -> like's layout
        g = g.sum(1).permute(0, 3, 1, 2)  # (b, T, G, N)
        return (g[:, :, 0] if like.dim() == 3 else g).to(like.dtype)

    return (dx.transpose(1, 2), ddt.transpose(1, 2), dA.sum(0).to(A.dtype), group_grad(dB, B), group_grad(dC, C),
            dD.sum(0).reshape(d).to(D.dtype) if D is not None else None,
            dz.transpose(1, 2) if z is not None else None,
            dbias.sum(0).reshape(d).to(dt_bias.dtype) if dt_bias is not None else None,
            dh0.to(initial_state.dtype) if initial_state is not None else None)


def selective_state_update_impl(call, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """-> y (b, d) and the new state (b, d, N) fp32 (the caller copies it into ``state``)."""
    K = _kernels("fused_recurrent")
    d = x.shape[1]
    Bg = (B.unsqueeze(1) if B.dim() == 2 else B).contiguous()
    Cg = (C.unsqueeze(1) if C.dim() == 2 else C).contiguous()
    y, new_state = call(K.selective_state_update_fwd, state.float().contiguous(), x.contiguous(), dt.contiguous(),
                        A.float().contiguous(), Bg, Cg, _vec(D, d, x), (z if z is not None else x).contiguous(),
                        _vec(dt_bias, d, x), D is not None, z is not None, dt_bias is not None, bool(dt_softplus))
    return y, new_state
