"""The SSD scan (Mamba-2) of the neuron backend as ``torch.library`` custom ops (``bmojo_neuron::ssd_scan``,
``::ssd_scan_backward``): on XLA tensors the forward runs the NKI kernel (``chunk``, through ``layout``); the
backward has no NKI kernel yet and runs the torch backend's implementation differentiated by ``torch.func``
(announced once); off XLA both directions run the torch backend (see ``..library``). Plus the op-table
function with the op API's signature (``ssd_scan``). The decoding step (``ssd_state_update``) has no NKI kernel
here: the registry runs the torch backend's, announced once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..library import NS, cpu_grads, direct_call, empty, fresh, register_xla, torch_on_this_device, vjp
from . import layout


@torch.library.custom_op(f"{NS}::ssd_scan", mutates_args=())
def ssd_scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                dt_bias: Optional[Tensor], dt_softplus: bool, dt_lo: float, dt_hi: float,
                initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    impl = torch_on_this_device("ssd_scan", x.device)
    y, h = impl(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=(dt_lo, dt_hi),
                initial_state=initial_state, return_final_state=True)
    return fresh(y, x, z).contiguous(), fresh(h.float(), initial_state).contiguous()


@ssd_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_state):
    b, _, H, P = x.shape
    return x.new_empty(x.shape), x.new_empty((b, H, P, B.shape[-1]), dtype=torch.float32)


def _scan_xla(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_state):
    y, h = layout.ssd_scan_impl(direct_call, x, dt, A, B, C, D, z, dt_bias, dt_softplus, (dt_lo, dt_hi), initial_state)
    return y.contiguous(), h


register_xla(ssd_scan_op, _scan_xla)

_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _torch_vjp(impl, dy, dh, given, dt_softplus, dt_limit):
    """Gradients of the torch backend's (or any same-signature) ``impl`` for the given inputs, by torch.func."""
    keys = [n for n in _NAMES if given[n] is not None]

    def fn(*prims):
        kw = dict(given, **dict(zip(keys, prims)))
        y, h = impl(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                    dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=kw["initial_state"],
                    return_final_state=True)
        return y, h.float()

    out = dict(zip(keys, vjp(fn, [given[k] for k in keys], (dy.to(given["x"].dtype), dh.float()))))
    return tuple(out[n].contiguous() if n in out else empty(given["x"]) for n in _NAMES)


@torch.library.custom_op(f"{NS}::ssd_scan_backward", mutates_args=())
def ssd_scan_backward_op(dy: Tensor, dh: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                         dt_lo: float, dt_hi: float, initial_state: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    given = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    return cpu_grads("ssd_scan", x.device,
                     lambda impl: _torch_vjp(impl, dy, dh, given, dt_softplus, (dt_lo, dt_hi)))


@ssd_scan_backward_op.register_fake
def _(dy, dh, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_state):
    like = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in like)


def _scan_bwd_xla(dy, dh, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_state):
    """No NKI backward kernel yet: the torch backend's implementation for this device, differentiated by
    torch.func, announced once."""
    from bmojo.ops import registry

    registry.warn_once(("neuron", "ssd_scan", "backward"),
                       f"bmojo: the backward of ssd_scan on the neuron backend runs the torch backend on {x.device.type} "
                       "tensors (differentiated by torch.func): there is no NKI backward kernel for it yet")
    impl = registry.torch_implementation("ssd_scan", x.device)
    given = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    return _torch_vjp(impl, dy, dh, given, dt_softplus, (dt_lo, dt_hi))


register_xla(ssd_scan_backward_op, _scan_bwd_xla)


def _scan_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi, initial_state = inputs
    ctx.args = (dt_softplus, dt_lo, dt_hi)
    ctx.present = tuple(t is not None for t in (D, z, dt_bias, initial_state))
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state)


def _scan_backward(ctx, dy, dh):
    x, dt, A, B, C, D, z, dt_bias, initial_state = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dh is None:
        dh = x.new_zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), dtype=torch.float32)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = ssd_scan_backward_op(dy, dh, x, dt, A, B, C, D, z, dt_bias, *ctx.args,
                                                                   initial_state)
    hasD, hasz, hasb, hash0 = ctx.present
    return (dx, ddt, dA, dB, dC, dD if hasD else None, dz if hasz else None, dbias if hasb else None, None, None,
            None, dh0 if hash0 else None)


torch.library.register_autograd(f"{NS}::ssd_scan", _scan_backward, setup_context=_scan_setup)


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf),
             initial_state=None, return_final_state=False):
    """The op-table function (the op API's signature): the custom op, which runs the NKI forward on XLA tensors."""
    y, h = ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]),
                       initial_state)
    return (y, h) if return_final_state else y
