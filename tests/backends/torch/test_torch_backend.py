"""The torch backend's op table: every op, the fast implementations on CPU, and the device-specific choices
registered per device type (resolved by the registry, never branched on inside an implementation)."""
from __future__ import annotations

import inspect

import pytest
import torch

import bmojo.backends.torch as torch_backend
import bmojo.ops as ops
from bmojo.backends.torch.attention.parallel import bmojo_attention_blocksparse, bmojo_attention_gathered
from bmojo.backends.torch.selective_scan.chunk import selective_scan_chunked, selective_scan_chunked_exp
from bmojo.ops import registry


def test_every_op_is_implemented_for_every_device():
    assert set(torch_backend.OPS) == set(registry.OP_NAMES)
    for op, entry in torch_backend.OPS.items():
        assert callable(entry) or "default" in entry, f"{op}: a device table needs a default"
        for dev in ("cpu", "cuda", "xla", "mps", "meta"):
            assert callable(registry.for_device(entry, torch.device(dev))), (op, dev)


def test_torch_backend_uses_fast_implementations():
    fast = {
        "selective_scan": "selective_scan_chunked",
        "selective_state_update": "selective_state_update_step",
        "causal_conv1d": "causal_conv1d_torch",
        "causal_conv1d_update": "causal_conv1d_update_torch",
        "bmojo_attention": "bmojo_attention_blocksparse",
        "attention_decode": "attention_decode_torch",
        "innovation_select": "innovation_select_chunked",
        "innovation_scores": "innovation_scores_inplace",
        "merge_memory": "merge_memory",
    }
    for op, name in fast.items():
        assert registry.resolve(op, "torch", torch.device("cpu")).__name__ == name


@pytest.mark.parametrize("device, scan, attention", [
    ("cpu", selective_scan_chunked, bmojo_attention_blocksparse),    # exp2 decays, banded kernel
    ("cuda", selective_scan_chunked_exp, bmojo_attention_blocksparse),
    ("xla", selective_scan_chunked_exp, bmojo_attention_gathered),   # no exp2 lowering, unfold on the host
    ("mps", selective_scan_chunked_exp, bmojo_attention_gathered),
])
def test_device_choices_are_registered_per_device_type(device, scan, attention):
    dev = torch.device(device)
    assert registry.resolve("selective_scan", "torch", dev) is scan
    assert registry.resolve("bmojo_attention", "torch", dev) is attention
    assert registry.torch_implementation("bmojo_attention", dev) is attention


def test_registered_entry_points_share_the_op_signature():
    """Each registered form is called like the op (bmojo.ops minus ``backend``); tuning keywords may follow."""
    for op, entry in torch_backend.OPS.items():
        want = [p.name for p in inspect.signature(getattr(ops, op)).parameters.values() if p.name != "backend"]
        for fn in ([entry] if callable(entry) else set(entry.values())):
            got = [p.name for p in inspect.signature(fn).parameters.values()]
            assert got[: len(want)] == want, (op, fn.__name__)
    assert bmojo_attention_blocksparse.resumes and bmojo_attention_gathered.resumes
    assert torch_backend.OPS["attention_decode"].segments


def test_gathered_kernel_through_the_registry_on_a_cpu_tensor_equals_the_banded_one():
    """What an XLA tensor would run, run here on CPU tensors: the same result as the CPU registration."""
    g = torch.Generator().manual_seed(0)
    q, k, v, kf, vf = (torch.randn(2, 21, 2, 8, generator=g) for _ in range(5))
    km, vm = (torch.randn(2, 3, 2, 2, 8, generator=g) for _ in range(2))
    kw = dict(window=8, k_fading=kf, v_fading=vf, k_memory=km, v_memory=vm, return_lse=True)
    gathered = registry.resolve("bmojo_attention", "torch", torch.device("xla"))
    banded = registry.resolve("bmojo_attention", "torch", torch.device("cpu"))
    for a, b in zip(gathered(q, k, v, **kw), banded(q, k, v, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
