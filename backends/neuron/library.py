"""What the neuron backend's ``torch.library`` custom ops share (namespace ``bmojo_neuron``).

Each op has a fake (meta) implementation, so it traces under ``torch.compile`` / ``torch.export`` and
``torch_neuronx.trace``, and a registered autograd formula whose backward is itself a custom op. On XLA
(Neuron) tensors both directions run the NKI kernels. On any other device they run the torch backend
(``bmojo.backends.torch``), announced once per op (:func:`torch_on_this_device`), the backward as a
``torch.func.vjp`` of it (:func:`cpu_grads`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NS = "bmojo_neuron"  # the custom ops' namespace: torch.ops.bmojo_neuron.<op>
XLA_DEVICE_TYPES = ("xla",)  # torch-neuronx 2.x exposes NeuronCores as XLA devices
# torch.func refuses an autograd.Function without a separate setup_context with a RuntimeError naming it
_FUNCTORCH_REFUSAL = "setup_context"


def _registry():
    from bmojo.ops import registry

    return registry


def direct_call(kernel, *args):
    """Run one NKI kernel on the device (the tests pass a simulator call instead)."""
    return kernel(*args)


def torch_on_this_device(op: str, device: torch.device):
    """The torch backend's ``op`` for ``device``: what the custom op runs off XLA, with a one-time warning
    (naming the op, this backend and why)."""
    registry = _registry()
    registry.warn_once(("neuron", op, "not xla"),
                       f"bmojo: {op} on the neuron backend runs the torch backend for {device.type} tensors: the NKI "
                       "kernels run on XLA (Neuron) devices only")
    return registry.torch_implementation(op, device)


def cpu_grads(op: str, device: torch.device, run):
    """``run(impl)`` with the torch backend's implementation of ``op``. If torch.func refuses to differentiate
    it (an autograd.Function without ``setup_context``: the only failure expected here, recognised by its
    message), ``run`` is retried with the op's naive reference, with a one-time warning; any other error
    propagates."""
    try:
        return run(torch_on_this_device(op, device))
    except RuntimeError as e:
        if _FUNCTORCH_REFUSAL not in str(e):
            raise
        reason = str(e).splitlines()[0]
    _registry().warn_once(("neuron", op, "vjp"),
                          f"bmojo: the backward of {op} on the neuron backend ({device.type} tensors) falls back to "
                          f"the naive reference: torch.func cannot differentiate the torch backend's implementation "
                          f"({reason})")
    from bmojo import ops

    return run(getattr(ops, f"{op}_ref"))


def vjp(fn, primals, cotangents):
    """Gradients of ``fn(*primals)`` (a tuple of tensors) against ``cotangents``; used inside the CPU
    implementation of a backward op, where the autograd tape is not available (torch.func is)."""
    _, pullback = torch.func.vjp(fn, *primals)
    return pullback(cotangents)


def register_xla(op, fn):
    """Register ``fn`` (the NKI path) as ``op``'s kernel on XLA tensors; warn if this torch build refuses."""
    for dev in XLA_DEVICE_TYPES:
        try:
            op.register_kernel(dev)(fn)
        except Exception as e:  # pragma: no cover - device type unknown to this torch build
            _registry().warn_once(("neuron", op._qualname, "register"),
                                  f"bmojo: {op._qualname} on the neuron backend: could not register the NKI kernel for "
                                  f"{dev} tensors ({e}); on that device the op runs the torch backend")


def empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def fresh(t: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """Custom-op outputs may not alias inputs: clone when the torch backend returned an input itself."""
    for i in inputs:
        if i is not None and t.data_ptr() == i.data_ptr() and t.numel() > 0:
            return t.clone()
    return t
