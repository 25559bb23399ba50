"""B'MOJO attention of the neuron backend as ``torch.library`` custom ops (``bmojo_neuron::bmojo_attention``,
``::bmojo_attention_backward``): on XLA tensors the NKI kernels (``parallel``, through ``layout``), elsewhere
the torch backend (see ``..library``). Plus the op-table function with the op API's signature
(``bmojo_attention``, without ``q_start`` or ``q_fading``: the kernels do not take keys before the queries
nor score the fading keys with their own queries, so the registry sends such calls to the torch backend,
with a one-time warning; ``registry.ATTENTION_CAPABILITIES``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..library import NS, cpu_grads, direct_call, empty, fresh, register_xla, torch_on_this_device, vjp
from . import layout


# ----------------------------------------------------------------------------------------------
# B'MOJO attention
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::bmojo_attention", mutates_args=())
def bmojo_attention_op(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], k_fading: Optional[Tensor],
                       v_fading: Optional[Tensor], fading_window: Optional[int], k_memory: Optional[Tensor],
                       v_memory: Optional[Tensor], memory_valid: Optional[Tensor], scale: Optional[float]) -> tuple[Tensor, Tensor]:
    impl = torch_on_this_device("bmojo_attention", q.device)
    o, lse = impl(q, k, v, window=window, k_fading=k_fading, v_fading=v_fading, fading_window=fading_window,
                  k_memory=k_memory, v_memory=v_memory, memory_valid=memory_valid, scale=scale, return_lse=True)
    return fresh(o, q, k, v).contiguous(), lse.float().contiguous()


@bmojo_attention_op.register_fake
def _(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attn_xla(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale):
    o, lse = layout.bmojo_attention_impl(direct_call, q, k, v, window, k_fading, v_fading, fading_window,
                                         k_memory, v_memory, memory_valid, scale)
    return o.contiguous(), lse.contiguous()


register_xla(bmojo_attention_op, _attn_xla)


@torch.library.custom_op(f"{NS}::bmojo_attention_backward", mutates_args=())
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
        return vjp(fn, [given[k] for k in keys], (do.to(q.dtype), dlse.float()))

    grads = cpu_grads("bmojo_attention", q.device, run)
    out = dict(zip(keys, grads))
    return tuple(out[n].contiguous() if n in out else empty(q) for n in names)


@bmojo_attention_backward_op.register_fake
def _(do, dlse, q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale, o, lse):
    like = (q, k, v, k_fading, v_fading, k_memory, v_memory)
    return tuple(t.new_empty(t.shape) if t is not None else q.new_empty(0) for t in like)


def _attn_bwd_xla(do, dlse, q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid,
                  scale, o, lse):
    grads = layout.bmojo_attention_backward_impl(direct_call, do, dlse, q, k, v, window, k_fading, v_fading,
                                                 fading_window, k_memory, v_memory, memory_valid, scale, o, lse)
    return tuple(g.contiguous() if g is not None else q.new_empty(0) for g in grads)


register_xla(bmojo_attention_backward_op, _attn_bwd_xla)


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


torch.library.register_autograd(f"{NS}::bmojo_attention", _attn_backward, setup_context=_attn_setup)


# ----------------------------------------------------------------------------------------------
# the op-table functions (the op API's signatures)
# ----------------------------------------------------------------------------------------------
def bmojo_attention(q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                    v_memory=None, memory_valid=None, scale=None, return_lse=False):
    if window is None:  # fading / memory keys need a window (the op API checks this); none are visible
        k_fading = v_fading = k_memory = v_memory = memory_valid = None
    o, lse = bmojo_attention_op(q, k, v, None if window is None else int(window), k_fading, v_fading,
                                None if fading_window is None else int(fading_window), k_memory, v_memory,
                                memory_valid, None if scale is None else float(scale))
    return (o, lse) if return_lse else o
