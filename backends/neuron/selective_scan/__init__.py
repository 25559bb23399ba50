"""The neuron backend's selective scan: NKI kernels ``chunk`` (scan forward and backward) and
``fused_recurrent`` (one step), their argument ``layout`` and the ``custom_ops`` that run them (importing
this package does not import the kernels, which need ``nki``)."""
