"""Backend dispatch: clear errors for backends that cannot run, one warning per fallback."""
import warnings

import pytest
import torch

from bmojo import ops
from bmojo.ops import registry


def _scan_args(T=5, d=4, N=3):
    return (torch.randn(1, T, d), torch.randn(1, T, d), -torch.rand(d, N), torch.randn(1, T, N), torch.randn(1, T, N))


def test_unknown_backend_names_the_value():
    with pytest.raises(ValueError, match="'tpu'"):
        ops.selective_scan(*_scan_args(), backend="tpu")


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(ops.BackendUnavailableError, match="neuron"):
        ops.selective_scan(*_scan_args(), backend="neuron")


def test_auto_on_cpu_is_torch_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.selective_scan(*_scan_args(), backend="auto")
    assert y.shape == (1, 5, 4)
    assert "torch" in ops.available_backends("cpu")


def test_fallback_for_a_missing_kernel_warns_once(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "partial", registry.Backend(
        "partial", "bmojo.ops.torch_ops", lambda: None, ("cpu",), _ops={}))
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no selective_scan kernel"):
        ops.selective_scan(*_scan_args(), backend="partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.selective_scan(*_scan_args(), backend="partial")  # second call: silent


def test_bad_shapes_name_the_tensor():
    x, dt, A, B, C = _scan_args()
    with pytest.raises(ValueError, match="A must be"):
        ops.selective_scan(x, dt, A[:2], B, C)
    with pytest.raises(ValueError, match="k_memory"):
        q = torch.randn(1, 9, 2, 4)
        ops.bmojo_attention(q, q, q, window=4, k_memory=torch.randn(1, 2, 3, 2, 4), v_memory=torch.randn(1, 2, 3, 2, 4))
