"""How the neuron tests run the NKI kernels without Trainium hardware.

If the real ``nki`` package (Neuron SDK, NKI 0.3+) is importable, kernels run under ``nki.simulate``.
Otherwise the NumPy emulator in ``nki_emulator`` stands in for ``nki`` / ``nki.language`` / ``nki.isa``
while the kernel modules are imported (and only then), and runs them with its own ``simulate``.
"""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

# the modules that import ``nki``: the NKI kernels of every op and their shared helpers
KERNEL_MODULES = ("bmojo.backends.neuron.nki_common", "bmojo.backends.neuron.selective_scan.chunk",
                  "bmojo.backends.neuron.selective_scan.fused_recurrent", "bmojo.backends.neuron.attention.parallel")


def _real_nki():
    try:
        import nki
        import nki.isa  # noqa: F401
        import nki.language  # noqa: F401
    except Exception:
        return None
    return nki if hasattr(nki, "simulate") and hasattr(nki, "jit") else None


REAL_NKI = _real_nki()
if REAL_NKI is not None:
    NKI = REAL_NKI
    for _m in KERNEL_MODULES:
        importlib.import_module(_m)
else:
    import nki_emulator as NKI  # noqa: N812

    with NKI.installed():
        for _m in KERNEL_MODULES:
            sys.modules.pop(_m, None)
        for _m in KERNEL_MODULES:
            importlib.import_module(_m)

BACKEND = "nki.simulate (Neuron SDK)" if REAL_NKI is not None else "NumPy emulator (tests/backends/neuron/nki_emulator)"


def call(kernel, *args):
    """Run one kernel on the simulator: what ``layout.*_impl`` calls instead of the device."""
    return NKI.simulate(kernel)(*args)


def kernels(module: str):
    """A kernel module, e.g. ``kernels("selective_scan.chunk")``, as imported above."""
    return sys.modules[f"bmojo.backends.neuron.{module}"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The reference loops run many tiny ops: one intra-op thread is much faster than two competing ones on
    a shared 2-core machine. Restored after each test. (Test modules import this fixture; a conftest.py
    here would shadow tests/conftest.py for the modules that ``from conftest import ...``.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
