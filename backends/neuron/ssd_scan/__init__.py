"""The neuron backend's SSD scan (Mamba-2): the NKI kernel ``chunk`` (forward), its argument ``layout`` and the
``custom_ops`` that run it (importing this package does not import the kernel, which needs ``nki``)."""
