"""``torch.library`` custom ops of the neuron backend (namespace ``bmojo_neuron``).

Each op has a fake (meta) implementation, so it traces under ``torch.compile`` / ``torch.export`` and
``torch_neuronx.trace``, and a registered autograd formula whose backward is itself a custom op. On XLA
(Neuron) tensors both directions run the NKI kernels; on any other device they run the torch backend
(``bmojo.ops.torch_ops``), the backward as a ``torch.func.vjp`` of it (or of the naive reference, with a
one-time warning, when torch.func cannot differentiate the torch backend's implementation).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import layout

_NS = "bmojo_neuron"
_XLA_DEVICE_TYPES = ("xla",)  # torch-neuronx 2.x exposes NeuronCores as XLA devices


def _torch_ops():
    from bmojo.ops import torch_ops

    return torch_ops.OPS


def _reference(name):
    from bmojo.ops import bmojo_attention_ref, selective_scan_ref  # the naive oracles

    return {"selective_scan": selective_scan_ref, "bmojo_attention": bmojo_attention_ref}[name]


_warned: set[str] = set()


def _cpu_grads(name, run):
    """``run(impl)`` with the torch backend's implementation of ``name``; if torch.func cannot differentiate it
    (an autograd.Function without ``setup_context``), with the naive reference instead, warning once."""
    try:
        return run(_torch_ops()[name])
    except RuntimeError as e:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"bmojo_neuron: the CPU backward of {name} uses the naive reference because torch.func "
                          f"cannot differentiate the torch backend's implementation ({str(e).splitlines()[0]})",
                          RuntimeWarning, stacklevel=2)
        return run(_reference(name))


def _vjp(fn, primals, cotangents):
    """Gradients of ``fn(*primals)`` (a tuple of tensors) against ``cotangents``; used inside the CPU
    implementation of a backward op, where the autograd tape is not available (torch.func is)."""
    _, pullback = torch.func.vjp(fn, *primals)
    return pullback(cotangents)


def _register_xla(op, fn):
    for dev in _XLA_DEVICE_TYPES:
        try:
            op.register_kernel(dev)(fn)
        except Exception as e:  # pragma: no cover - device type unknown to this torch build
            warnings.warn(f"bmojo_neuron: could not register the NKI kernel of {op._qualname} for {dev} tensors "
                          f"({e}); on that device the op runs the torch backend", RuntimeWarning, stacklevel=2)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _fresh(t: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """Custom-op outputs may not alias inputs: clone when the torch backend returned an input itself."""
    for i in inputs:
        if i is not None and t.data_ptr() == i.data_ptr() and t.numel() > 0:
            return t.clone()
    return t


# ----------------------------------------------------------------------------------------------
# selective scan
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::selective_scan", mutates_args=())
def selective_scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                      dt_bias: Optional[Tensor], dt_softplus: bool, initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    y, h = _torch_ops()["selective_scan"](x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                          initial_state=initial_state, return_final_state=True)
    return _fresh(y, x, dt, z).contiguous(), _fresh(h.float(), initial_state).contiguous()


@selective_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[2], A.shape[1]), dtype=torch.float32)


def _scan_xla(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    y, h = layout.selective_scan_impl(layout.direct_call, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
    return y.contiguous(), h


_register_xla(selective_scan_op, _scan_xla)

_SCAN_GRADS = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinitial_state")


@torch.library.custom_op(f"{_NS}::selective_scan_backward", mutates_args=())
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
        return _vjp(fn, [given[k] for k in keys], (dy.to(x.dtype), dh.float()))

    grads = _cpu_grads("selective_scan", run)
    out = dict(zip(keys, grads))
    return tuple(out[n].contiguous() if n in out else _empty(x) for n in names)


@selective_scan_backward_op.register_fake
def _(dy, dh, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    like = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in like)


def _scan_bwd_xla(dy, dh, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    grads = layout.selective_scan_backward_impl(layout.direct_call, dy, dh, x, dt, A, B, C, D, z, dt_bias,
                                                dt_softplus, initial_state)
    return tuple(g.contiguous() if g is not None else x.new_empty(0) for g in grads)


_register_xla(selective_scan_backward_op, _scan_bwd_xla)


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


torch.library.register_autograd(f"{_NS}::selective_scan", _scan_backward, setup_context=_scan_setup)


# ----------------------------------------------------------------------------------------------
# selective state update (decoding; no autograd)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::selective_state_update", mutates_args=("state",))
def selective_state_update_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                              dt_softplus: bool) -> Tensor:
    y = _torch_ops()["selective_state_update"](state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return _fresh(y, x, dt, z).contiguous()


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


def _ssu_xla(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    y, new_state = layout.selective_state_update_impl(layout.direct_call, state, x, dt, A, B, C, D, z, dt_bias,
                                                      dt_softplus)
    state.copy_(new_state)
    return y.contiguous()


_register_xla(selective_state_update_op, _ssu_xla)


# ----------------------------------------------------------------------------------------------
# B'MOJO attention
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::bmojo_attention", mutates_args=())
def bmojo_attention_op(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], k_fading: Optional[Tensor],
                       v_fading: Optional[Tensor], fading_window: Optional[int], k_memory: Optional[Tensor],
                       v_memory: Optional[Tensor], memory_valid: Optional[Tensor], scale: Optional[float]) -> tuple[Tensor, Tensor]:
    o, lse = _torch_ops()["bmojo_attention"](q, k, v, window=window, k_fading=k_fading, v_fading=v_fading,
                                             fading_window=fading_window, k_memory=k_memory, v_memory=v_memory,
                                             memory_valid=memory_valid, scale=scale, return_lse=True)
    return _fresh(o, q, k, v).contiguous(), lse.float().contiguous()


@bmojo_attention_op.register_fake
def _(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attn_xla(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale):
    o, lse = layout.bmojo_attention_impl(layout.direct_call, q, k, v, window, k_fading, v_fading, fading_window,
                                         k_memory, v_memory, memory_valid, scale)
    return o.contiguous(), lse.contiguous()


_register_xla(bmojo_attention_op, _attn_xla)


@torch.library.custom_op(f"{_NS}::bmojo_attention_backward", mutates_args=())
def bmojo_attention_backward_op(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, window: Optional[int],
                                k_fading: Optional[Tensor], v_fading: Optional[Tensor], fading_window: Optional[int],
                                k_memory: Optional[Tensor], v_memory: Optional[Tensor], memory_valid: Optional[Tensor],
                                scale: Optional[float], o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                       Tensor, Tensor, Tensor]:
    names = ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory")
    given = dict(q=q, k=k, v=v, k_fading=k_fading, v_fading=v_fading, k_memory=k_memory, v_memory=v_memory)
    keys = [n for n in names if given[n] is not None]

    def run(impl):
        def fn(*prims):
            kw = dict(given, **dict(zip(keys, prims)))
            o2, lse2 = impl(kw["q"], kw["k"], kw["v"], window=window, k_fading=kw["k_fading"], v_fading=kw["v_fading"],
                            fading_window=fading_window, k_memory=kw["k_memory"], v_memory=kw["v_memory"],
                            memory_valid=memory_valid, scale=scale, return_lse=True)
            return o2, lse2.float()
        return _vjp(fn, [given[k] for k in keys], (do.to(q.dtype), dlse.float()))

    grads = _cpu_grads("bmojo_attention", run)
    out = dict(zip(keys, grads))
    return tuple(out[n].contiguous() if n in out else _empty(q) for n in names)


@bmojo_attention_backward_op.register_fake
def _(do, dlse, q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale, o, lse):
    like = (q, k, v, k_fading, v_fading, k_memory, v_memory)
    return tuple(t.new_empty(t.shape) if t is not None else q.new_empty(0) for t in like)


def _attn_bwd_xla(do, dlse, q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid,
                  scale, o, lse):
    grads = layout.bmojo_attention_backward_impl(layout.direct_call, do, dlse, q, k, v, window, k_fading, v_fading,
                                                 fading_window, k_memory, v_memory, memory_valid, scale, o, lse)
    return tuple(g.contiguous() if g is not None else q.new_empty(0) for g in grads)


_register_xla(bmojo_attention_backward_op, _attn_bwd_xla)


def _attn_setup(ctx, inputs, output):
    q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale = inputs
    o, lse = output
    ctx.args = (window, fading_window, scale)
    ctx.present = (k_fading is not None, k_memory is not None)
    ctx.save_for_backward(q, k, v, k_fading, v_fading, k_memory, v_memory, memory_valid, o, lse)


def _attn_backward(ctx, do, dlse):
    q, k, v, k_fading, v_fading, k_memory, v_memory, memory_valid, o, lse = ctx.saved_tensors
    window, fading_window, scale = ctx.args
    if do is None:
        do = torch.zeros_like(o)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, dkf, dvf, dkm, dvm = bmojo_attention_backward_op(do, dlse, q, k, v, window, k_fading, v_fading,
                                                                 fading_window, k_memory, v_memory, memory_valid,
                                                                 scale, o, lse)
    has_f, has_m = ctx.present
    return (dq, dk, dv, None, dkf if has_f else None, dvf if has_f else None, None, dkm if has_m else None,
            dvm if has_m else None, None, None)


torch.library.register_autograd(f"{_NS}::bmojo_attention", _attn_backward, setup_context=_attn_setup)


# ----------------------------------------------------------------------------------------------
# the backend's op table (same signatures as bmojo.ops.torch_ops.OPS)
# ----------------------------------------------------------------------------------------------
def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
                   return_final_state=False):
    y, h = selective_scan_op(x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), initial_state)
    return (y, h) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    return selective_state_update_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))


def bmojo_attention(q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                    v_memory=None, memory_valid=None, scale=None, return_lse=False):
    if window is None:  # fading / memory keys need a window (the op API checks this); none are visible
        k_fading = v_fading = k_memory = v_memory = memory_valid = None
    o, lse = bmojo_attention_op(q, k, v, None if window is None else int(window), k_fading, v_fading,
                                None if fading_window is None else int(fading_window), k_memory, v_memory,
                                memory_valid, None if scale is None else float(scale))
    return (o, lse) if return_lse else o


OPS = {
    "selective_scan": selective_scan,
    "selective_state_update": selective_state_update,
    "bmojo_attention": bmojo_attention,
}

