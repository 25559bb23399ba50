"""bmojo's ``neuron`` backend, ``bmojo.backends.neuron``: NKI kernels for AWS Trainium (trn1 / trn2).

What is here (one folder per op, one file per form, as in every backend)
------------
* ``selective_scan/``: ``chunk.py`` (NKI scan forward and backward: ``nisa.tensor_tensor_scan`` for the
  recurrence, the backward adjoint as a scan over reversed time), ``fused_recurrent.py`` (NKI one-token
  ``selective_state_update``), ``layout.py`` (token-major op API <-> channel-major kernels, the
  time-reversed copies the backward reads, summing per-tile partial gradients), ``custom_ops.py`` (the
  ``torch.library`` ops ``bmojo_neuron::selective_scan``, ``::selective_scan_backward``,
  ``::selective_state_update``).
* ``ssd_scan/``: ``chunk.py`` (NKI forward of the Mamba-2 scan: chunks of 128 tokens on the partitions, the
  (L, L) decay kernels and every state product on the Tensor Engine), ``layout.py``, ``custom_ops.py``
  (``bmojo_neuron::ssd_scan``, ``::ssd_scan_backward``; the backward has no NKI kernel yet: it runs the torch
  backend's implementation through ``torch.func``, announced once; ``ssd_state_update`` runs the torch backend's
  step, announced once by the registry).
* ``attention/``: ``parallel.py`` (NKI B'MOJO attention forward and backward: flash-style online
  softmax over the window, the fading window and the memory slots, masks generated on chip),
  ``layout.py``, ``custom_ops.py`` (``bmojo_neuron::bmojo_attention``, ``::bmojo_attention_backward``).
* ``nki_common.py``: on-chip helpers shared by the kernels; ``library.py``: what the custom ops share.
  Each custom op has a fake implementation and a registered autograd formula. On XLA tensors (NeuronCores
  under torch-neuronx) they call the kernels; on any other device they run bmojo's torch backend, with a
  one-time warning (that is how the tests check the ops' autograd on CPU).
* ``OPS``: the op table ``bmojo.ops.registry`` loads. Ops without an NKI kernel here
  (``causal_conv1d``, ``attention_decode``, ``innovation_*``, ``merge_memory``) fall back to the torch
  backend with a one-time warning from the registry.

Only the kernel modules (``chunk``, ``fused_recurrent``, ``parallel``, ``nki_common``) import ``nki``, and
only when a kernel first runs: importing this package needs torch alone.

How users run it
----------------
``backend="auto"`` picks this backend for tensors on an XLA device when ``nki`` and ``torch_xla`` import.

1. Training, lazy XLA (torch-neuronx): move the model and batches to ``torch_xla.device()``, run
   forward / ``loss.backward()`` / ``optimizer.step()``, then ``torch_xla.sync()`` (``xm.mark_step()`` on
   older releases) once per step. The custom ops appear as NKI custom calls inside the step graph; keep
   shapes static (pad batches to fixed lengths) so the graph compiles once per shape, and avoid host
   syncs (``.item()``, printing tensors) inside the step. ``backends/neuron/check_xla.sh`` checks this on
   CPU-PJRT with a tiny model: the compile count stops growing after the first step and no
   ``aten::_local_scalar_dense`` appears.
2. Inference: ``torch_neuronx.trace(model, example_inputs)`` compiles a fixed-shape forward into a
   Neuron graph (the fake implementations give it shapes; the kernels are embedded as custom calls);
   save it with ``torch.jit.save`` and load it on the instance. Generation with the recurrent state uses
   ``selective_state_update`` per token.
3. Kernel development without hardware: ``nki.simulate(kernel)(*numpy_or_torch_arrays)`` (or
   ``NKI_SIMULATOR=1``) runs a kernel on CPU; the tests in ``tests/backends/neuron`` use it when ``nki`` is
   installed and otherwise a NumPy emulator of the exact NKI subset the kernels use.

Limits: attention head dim <= 128; kernels are fully unrolled at trace time (loops over batch, heads,
channel tiles and time chunks), so compile time grows with those sizes.
"""
from .attention.custom_ops import bmojo_attention  # registers the torch.library ops
from .selective_scan.custom_ops import selective_scan, selective_state_update
from .ssd_scan.custom_ops import ssd_scan

OPS = {
    "selective_scan": selective_scan,
    "selective_state_update": selective_state_update,
    "bmojo_attention": bmojo_attention,
    "ssd_scan": ssd_scan,
}

__all__ = ["OPS"]
