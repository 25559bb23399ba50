"""bmojo's ``neuron`` backend: NKI kernels for AWS Trainium (trn1 / trn2), installed as ``bmojo_neuron``.

What is here
------------
* ``kernels/``: NKI kernels written against the standalone ``nki`` package (NKI 0.3+: ``nki.jit``,
  ``nki.language``, ``nki.isa``, destination-passing ISA calls): the selective scan forward and backward
  (``nisa.tensor_tensor_scan`` for the recurrence, the backward adjoint as a scan over reversed time),
  the one-token ``selective_state_update``, and B'MOJO attention forward and backward (flash-style
  online softmax over the window, the fading window and the memory slots, masks generated on chip).
* ``ops.py``: each kernel behind a ``torch.library`` custom op (``torch.ops.bmojo_neuron.*``) with a fake
  implementation and a registered autograd formula. On XLA tensors (NeuronCores under torch-neuronx)
  they call the kernels; on any other device they run bmojo's torch backend, so a model built with
  ``backend="neuron"`` still runs (and differentiates) on CPU.
* ``layout.py``: the layout glue (token-major in the op API, channel-major for the scan kernels; the
  time-reversed copies the scan backward reads; summing per-tile partial gradients).
* ``OPS``: the op table ``bmojo.ops.registry`` loads. Ops without an NKI kernel here
  (``causal_conv1d``, ``attention_decode``, ``innovation_select``) fall back to the torch backend with a
  one-time warning from the registry.

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
   ``NKI_SIMULATOR=1``) runs a kernel on CPU; the tests in ``tests/neuron`` use it when ``nki`` is
   installed and otherwise a NumPy emulator of the exact NKI subset the kernels use.

Limits: attention head dim <= 128; kernels are fully unrolled at trace time (loops over batch, heads,
channel tiles and time chunks), so compile time grows with those sizes.
"""
from .ops import OPS  # noqa: F401  (registers the torch.library ops)

__all__ = ["OPS"]
