"""The selective scan of the neuron backend as ``torch.library`` custom ops (``bmojo_neuron::selective_scan``,
``::selective_scan_backward``, ``::selective_state_update``): on XLA tensors the NKI kernels (``chunk``,
``fused_recurrent``, through ``layout``), elsewhere the torch backend (see ``..library``). Plus the op-table
functions with the op API's signatures (``selective_scan``, ``selective_state_update``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..library import NS, cpu_grads, direct_call, empty, fresh, register_xla, torch_on_this_device, vjp
from . import layout


# ----------------------------------------------------------------------------------------------
# selective scan
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::selective_scan", mutates_args=())
def selective_scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                      dt_bias: Optional[Tensor], dt_softplus: bool, initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    impl = torch_on_this_device("selective_scan", x.device)
    y, h = impl(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
                return_final_state=True)
    return fresh(y, x, dt, z).contiguous(), fresh(h.float(), initial_state).contiguous()


@selective_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[2], A.shape[1]), dtype=torch.float32)


def _scan_xla(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    y, h = layout.selective_scan_impl(direct_call, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
    return y.contiguous(), h


register_xla(selective_scan_op, _scan_xla)

_SCAN_GRADS = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinitial_state")


@torch.library.custom_op(f"{NS}::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(dy: Tensor, dh: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                               initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                         Tensor, Tensor, Tensor]:
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
    given = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    keys = [n for n in names if given[n] is not None]

    def run(impl):
        def fn(*prims):
            kw = dict(given, **dict(zip(keys, prims)))
            y, h = impl(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                        dt_softplus=dt_softplus, initial_state=kw["initial_state"], return_final_state=True)
            return y, h.float()
        return vjp(fn, [given[k] for k in keys], (dy.to(x.dtype), dh.float()))

    grads = cpu_grads("selective_scan", x.device, run)
    out = dict(zip(keys, grads))
    return tuple(out[n].contiguous() if n in out else empty(x) for n in names)


@selective_scan_backward_op.register_fake
def _(dy, dh, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    like = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in like)


def _scan_bwd_xla(dy, dh, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    grads = layout.selective_scan_backward_impl(direct_call, dy, dh, x, dt, A, B, C, D, z, dt_bias,
                                                dt_softplus, initial_state)
    return tuple(g.contiguous() if g is not None else x.new_empty(0) for g in grads)


register_xla(selective_scan_backward_op, _scan_bwd_xla)


def _scan_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state = inputs
    ctx.dt_softplus = dt_softplus
    ctx.present = tuple(t is not None for t in (D, z, dt_bias, initial_state))
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state)


def _scan_backward(ctx, dy, dh):
    x, dt, A, B, C, D, z, dt_bias, initial_state = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dh is None:
        dh = x.new_zeros((x.shape[0], x.shape[2], A.shape[1]), dtype=torch.float32)
    g = selective_scan_backward_op(dy, dh, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, initial_state)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = g
    hasD, hasz, hasb, hash0 = ctx.present
    return (dx, ddt, dA, dB, dC, dD if hasD else None, dz if hasz else None, dbias if hasb else None, None,
            dh0 if hash0 else None)


torch.library.register_autograd(f"{NS}::selective_scan", _scan_backward, setup_context=_scan_setup)


# ----------------------------------------------------------------------------------------------
# selective state update (decoding; no autograd)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::selective_state_update", mutates_args=("state",))
def selective_state_update_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                              dt_softplus: bool) -> Tensor:
    impl = torch_on_this_device("selective_state_update", x.device)
    y = impl(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return fresh(y, x, dt, z).contiguous()


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


def _ssu_xla(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    y, new_state = layout.selective_state_update_impl(direct_call, state, x, dt, A, B, C, D, z, dt_bias,
                                                      dt_softplus)
    state.copy_(new_state)
    return y.contiguous()


register_xla(selective_state_update_op, _ssu_xla)


# ----------------------------------------------------------------------------------------------
# the op-table functions (the op API's signatures)
# ----------------------------------------------------------------------------------------------
def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
                   return_final_state=False):
    y, h = selective_scan_op(x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), initial_state)
    return (y, h) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    return selective_state_update_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
