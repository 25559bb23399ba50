"""The cuda backend module: OPS, signatures matching the torch backend, and dispatch."""
import inspect
import warnings

import torch

from cuda_testutils import triton  # noqa: F401  (skips the module without triton)

import bmojo_cuda  # noqa: E402
import bmojo.ops as ops  # noqa: E402
from bmojo.ops import registry, torch_ops  # noqa: E402


def test_ops_cover_the_kernels_and_match_the_op_signatures():
    """Every op but innovation_select, called exactly like the naive reference (the op contract);
    backend-specific tuning keywords may follow, with defaults."""
    refs = {
        "selective_scan": ops.selective_scan_ref, "selective_state_update": ops.selective_state_update_ref,
        "causal_conv1d": ops.causal_conv1d_ref, "causal_conv1d_update": ops.causal_conv1d_update_ref,
        "bmojo_attention": ops.bmojo_attention_ref, "attention_decode": ops.attention_decode_ref,
    }
    assert set(bmojo_cuda.OPS) == set(registry.OP_NAMES) - {"innovation_select", "innovation_scores", "merge_memory"}
    for name, fn in bmojo_cuda.OPS.items():
        # q_start (keys before the queries) is an optional capability: kernels without it are routed to the
        # torch backend with a warning (registry.resolve_resuming)
        ref_params = [p for p in inspect.signature(refs[name]).parameters.values() if p.name != "q_start"]
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[: len(ref_params)]] == [p.name for p in ref_params], name
        assert [p.default for p in params[: len(ref_params)]] == [p.default for p in ref_params], name
        assert all(p.default is not inspect.Parameter.empty for p in params[len(ref_params):]), name


def test_dispatch_picks_the_kernels(device):
    assert registry.resolve("selective_scan", "cuda", device) is bmojo_cuda.OPS["selective_scan"]
    assert registry.resolve("bmojo_attention", "cuda", device) is bmojo_cuda.OPS["bmojo_attention"]
    if device.type == "cuda":
        assert registry.resolve("bmojo_attention", "auto", device) is bmojo_cuda.OPS["bmojo_attention"]


def test_innovation_select_falls_back_with_one_warning(device):
    registry._warned.discard(("cuda", "innovation_select"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn = registry.resolve("innovation_select", "cuda", device)
        registry.resolve("innovation_select", "cuda", device)
    assert fn is torch_ops.OPS["innovation_select"]
    assert sum("innovation_select" in str(x.message) for x in w) == 1
    assert torch.is_tensor(fn(torch.randn(1, 8, 4, device=device), 4, 2, 2)[0])
