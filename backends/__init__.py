"""bmojo's kernels, one package per backend, installed as ``bmojo.backends.<name>`` (this folder is the
``bmojo.backends`` package; see setup.py):

* ``torch``: plain PyTorch on any device, the default and the fallback; always installed.
* ``cuda``: Triton kernels (needs ``pip install 'bmojo[cuda]'``; importing it without Triton raises).
* ``neuron``: NKI kernels for AWS Trainium behind ``torch.library`` custom ops (the ``nki`` package is
  imported only when a kernel runs).

Every backend has the same layout: ``<name>/<op>/<form>.py`` with the op folders ``selective_scan``,
``ssd_scan``, ``causal_conv1d``, ``attention`` and ``innovation`` (where the backend has that op), and the forms
``chunk`` (chunked parallel over T), ``parallel`` (all T at once), ``fused_recurrent`` (one token) and
``decode`` (one query over a cache). Each backend's ``OPS`` maps op names to implementations (or to
tables by device type); ``bmojo.ops`` holds the contract of every op, its naive oracle
(``bmojo.ops.reference``) and the registry that resolves ``OPS``. Nothing here is imported by
``import bmojo.backends``: a backend loads when first resolved.
"""
NAMES = ("torch", "cuda", "neuron")
