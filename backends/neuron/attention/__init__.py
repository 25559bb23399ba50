"""The neuron backend's attention: NKI kernels ``parallel`` (B'MOJO attention forward and backward), their
argument ``layout`` and the ``custom_ops`` that run them (importing this package does not import the
kernels, which need ``nki``)."""
