"""Bridges between the ``bmojo.ops`` signatures and the NKI kernels: argument layout on the way in, gradient
reductions on the way out. Pure PyTorch, so it runs on XLA tensors (where it feeds the real kernels) and on
CPU tensors (where the tests feed it to ``nki.simulate`` or the emulator).

Each ``*_impl`` takes ``call(kernel, *args)``, which runs one kernel: on a Neuron device that is simply
``kernel(*args)``; in the tests it is a simulator call. The kernel modules are imported lazily (they need
the ``nki`` package).
"""
from __future__ import annotations

import math

import torch


def _kernels(name: str):
    import importlib

    return importlib.import_module(f"{__package__}.kernels.{name}")


def direct_call(kernel, *args):
    return kernel(*args)


# ----------------------------------------------------------------------------------------------
# selective scan
# ----------------------------------------------------------------------------------------------
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
    K = _kernels("selective_scan")
    a = _scan_common(x, dt, A, B, C, D, z, dt_bias, initial_state)
    y, hT = call(K.selective_scan_fwd, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"],
                 a["z"] if z is not None else a["x"], a["dt_bias"], a["h0"],
                 D is not None, z is not None, dt_bias is not None, bool(dt_softplus))
    return y.transpose(1, 2), hT


def selective_scan_backward_impl(call, dy, dh, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                                 initial_state=None):
    """-> dx, ddt, dA, dB, dC, dD, dz, d dt_bias, d initial_state (None where the input was None)."""
    K = _kernels("selective_scan")
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
    K = _kernels("selective_scan")
    d = x.shape[1]
    Bg = (B.unsqueeze(1) if B.dim() == 2 else B).contiguous()
    Cg = (C.unsqueeze(1) if C.dim() == 2 else C).contiguous()
    y, new_state = call(K.selective_state_update_fwd, state.float().contiguous(), x.contiguous(), dt.contiguous(),
                        A.float().contiguous(), Bg, Cg, _vec(D, d, x), (z if z is not None else x).contiguous(),
                        _vec(dt_bias, d, x), D is not None, z is not None, dt_bias is not None, bool(dt_softplus))
    return y, new_state


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _attn_common(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale):
    w = 0 if window is None else int(window)
    mf = (w if fading_window is None else int(fading_window)) if window is not None else 0
    has_fading = k_fading is not None and window is not None and mf > 0  # mf == 0: no fading key is visible
    mf = mf if has_fading else 0
    has_memory = k_memory is not None and window is not None
    mv = None
    if has_memory:
        mv = (memory_valid.float() if memory_valid is not None
              else q.new_ones(k_memory.shape[:3], dtype=torch.float32)).contiguous()
    sc = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return dict(q=c(q), k=c(k), v=c(v), kf=c(k_fading) if has_fading else None, vf=c(v_fading) if has_fading else None,
                km=c(k_memory) if has_memory else None, vm=c(v_memory) if has_memory else None, mv=mv,
                w=w, mf=mf, scale=sc, has_fading=has_fading, has_memory=has_memory)


def bmojo_attention_impl(call, q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                         v_memory=None, memory_valid=None, scale=None):
    """-> o (b, T, Hq, D) in q.dtype, lse (b, T, Hq) fp32."""
    K = _kernels("attention")
    a = _attn_common(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale)
    return call(K.bmojo_attention_fwd, a["q"], a["k"], a["v"], a["kf"], a["vf"], a["km"], a["vm"], a["mv"],
                a["w"], a["mf"], a["scale"], a["has_fading"], a["has_memory"])


def bmojo_attention_backward_impl(call, do, dlse, q, k, v, window, k_fading, v_fading, fading_window, k_memory,
                                  v_memory, memory_valid, scale, o, lse):
    """-> dq, dk, dv, dk_fading, dv_fading, dk_memory, dv_memory (None where the input was None or unused)."""
    K = _kernels("attention")
    a = _attn_common(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale)
    dlse = dlse.float().contiguous() if dlse is not None else lse.new_zeros(lse.shape, dtype=torch.float32)
    outs = list(call(K.bmojo_attention_bwd, a["q"], a["k"], a["v"], a["kf"], a["vf"], a["km"], a["vm"], a["mv"],
                     o.contiguous(), do.to(o.dtype).contiguous(), lse.float().contiguous(), dlse,
                     a["w"], a["mf"], a["scale"], a["has_fading"], a["has_memory"]))
    dq, dk, dv = outs[:3]
    rest = outs[3:]
    dkf = dvf = dkm = dvm = None
    if a["has_fading"]:
        dkf, dvf = rest[:2]
        rest = rest[2:]
    elif k_fading is not None:  # fading keys given but invisible (no window): zero gradient
        dkf, dvf = torch.zeros_like(k_fading), torch.zeros_like(v_fading)
    if a["has_memory"]:
        dkm, dvm = rest[:2]
    elif k_memory is not None:
        dkm, dvm = torch.zeros_like(k_memory), torch.zeros_like(v_memory)
    return dq, dk, dv, dkf, dvf, dkm, dvm
