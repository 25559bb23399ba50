"""The cuda backend module: OPS, signatures matching the op API, dispatch, and its fallbacks (each warns
once, naming the op, the backend and the reason)."""
import inspect
import warnings

import pytest
import torch

from cuda_testutils import assert_close, no_bmojo_warnings, triton  # noqa: F401  (skips the module without triton)

import bmojo.backends.cuda as cuda_backend  # noqa: E402
import bmojo.ops as ops  # noqa: E402
from bmojo.ops import registry  # noqa: E402


def test_ops_cover_the_kernels_and_match_the_op_signatures():
    """Every op but the eidetic selection ones, called exactly like the naive reference (the op contract);
    backend-specific tuning keywords may follow, with defaults."""
    refs = {
        "selective_scan": ops.selective_scan_ref, "selective_state_update": ops.selective_state_update_ref,
        "causal_conv1d": ops.causal_conv1d_ref, "causal_conv1d_update": ops.causal_conv1d_update_ref,
        "bmojo_attention": ops.bmojo_attention_ref, "attention_decode": ops.attention_decode_ref,
        "ssd_scan": ops.ssd_scan_ref, "ssd_state_update": ops.ssd_state_update_ref,
    }
    assert set(cuda_backend.OPS) == set(registry.OP_NAMES) - {"innovation_select", "innovation_scores", "merge_memory"}
    for name, fn in cuda_backend.OPS.items():
        # q_start (keys before the queries) is an optional capability: kernels without it are routed to the
        # torch backend with a warning (registry.resolve_resuming)
        ref_params = [p for p in inspect.signature(refs[name]).parameters.values() if p.name != "q_start"]
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[: len(ref_params)]] == [p.name for p in ref_params], name
        assert [p.default for p in params[: len(ref_params)]] == [p.default for p in ref_params], name
        assert all(p.default is not inspect.Parameter.empty for p in params[len(ref_params):]), name


def test_dispatch_picks_the_kernels(device):
    assert registry.resolve("selective_scan", "cuda", device) is cuda_backend.OPS["selective_scan"]
    assert registry.resolve("bmojo_attention", "cuda", device) is cuda_backend.OPS["bmojo_attention"]
    if device.type == "cuda":
        assert registry.resolve("bmojo_attention", "auto", device) is cuda_backend.OPS["bmojo_attention"]


def test_innovation_select_falls_back_with_one_warning(device):
    registry._warned.discard(("cuda", "innovation_select"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn = registry.resolve("innovation_select", "cuda", device)
        registry.resolve("innovation_select", "cuda", device)
    assert fn is registry.torch_implementation("innovation_select", device)
    msgs = [str(x.message) for x in w if "innovation_select" in str(x.message)]
    assert len(msgs) == 1 and "'cuda'" in msgs[0] and "no innovation_select kernel" in msgs[0]
    assert torch.is_tensor(fn(torch.randn(1, 8, 4, device=device), 4, 2, 2)[0])


def test_resuming_attention_falls_back_with_one_warning(device):
    """The Triton attention takes no keys before its queries: those calls run the torch backend, announced once."""
    fn = registry.resolve_resuming("cuda", device)
    q = torch.randn(1, 3, 2, 8, device=device)
    k, v = torch.randn(1, 7, 1, 8, device=device), torch.randn(1, 7, 1, 8, device=device)
    start = torch.tensor([4], device=device)
    registry._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = fn(q, k, v, window=4, q_start=start)
        fn(q, k, v, window=4, q_start=start)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "bmojo_attention" in msgs[0] and "'cuda'" in msgs[0] and "before its queries" in msgs[0]
    assert_close(o, ops.bmojo_attention_ref(q, k, v, window=4, q_start=start), torch.float32, "o")


def test_q_fading_runs_the_kernel_and_with_q_start_the_torch_backend(device):
    """The Triton attention takes the fading keys' own queries (``fading_query``): no fallback; with keys
    before the queries as well, the torch backend (announced once, for q_start) still honours q_fading."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    assert cuda_backend.OPS["bmojo_attention"].fading_query
    q, qf, k, v, kf, vf = r(1, 9, 2, 16), r(1, 9, 2, 16), r(1, 9, 1, 16), r(1, 9, 1, 16), r(1, 9, 1, 16), r(1, 9, 1, 16)
    kw = dict(window=4, k_fading=kf, v_fading=vf, fading_window=3)
    fn = registry.resolve_resuming("cuda", device)
    registry._warned.clear()
    with no_bmojo_warnings():
        o = ops.bmojo_attention(q, k, v, q_fading=qf, backend="cuda", **kw)
        o_table = fn(q, k, v, q_fading=qf, **kw)
    want = ops.bmojo_attention_ref(q, k, v, q_fading=qf, **kw)
    assert_close(o, want, torch.float32, "o")
    assert_close(o_table, want, torch.float32, "o (table)")
    start = torch.tensor([5], device=device)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = fn(q[:, 4:], k, v, q_start=start, q_fading=qf[:, 4:], **kw)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "'cuda'" in msgs[0] and "before its queries" in msgs[0]
    assert_close(o, ops.bmojo_attention_ref(q[:, 4:], k, v, q_start=start, q_fading=qf[:, 4:], **kw), torch.float32, "o")


def test_decode_with_per_segment_queries_falls_back_with_one_warning(device):
    """The Triton decode step scores every key with one query: per-segment queries run the torch backend."""
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    ks, vs = (r(2, 5, 2, 8), r(2, 3, 2, 8)), (r(2, 5, 2, 8), r(2, 3, 2, 8))
    qs = (r(2, 4, 8), r(2, 4, 8))
    registry._warned.clear()
    table = registry.OpTable("cuda", device)
    for call in (lambda: ops.attention_decode(qs, ks, vs, backend="cuda"), lambda: table.attention_decode(qs, ks, vs)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            o = call()
            call()
        msgs = [str(x.message) for x in w]
        assert len(msgs) == 1 and "attention_decode" in msgs[0] and "'cuda'" in msgs[0] and "own query" in msgs[0]
        assert_close(o, ops.attention_decode_ref(qs, ks, vs), torch.float32, "o")
        registry._warned.clear()


def _decode_step_args(device):
    g = torch.Generator().manual_seed(0)
    b, d, N, K, Hq, Hkv, S, D = 2, 8, 4, 4, 4, 2, 9, 8
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    scan = dict(x=r(b, d), dt=r(b, d), A=-torch.rand(d, N, generator=g).to(device), B=r(b, N), C=r(b, N), D=r(d),
                z=r(b, d), dt_bias=r(d))
    conv = dict(x=r(b, d), weight=r(d, K), bias=r(d))
    attn = dict(q=r(b, Hq, D), k=r(b, S, Hkv, D), v=r(b, S, Hkv, D))
    return (b, d, N, K), scan, conv, attn


@pytest.mark.parametrize("op", ["selective_state_update", "causal_conv1d_update", "attention_decode"])
def test_decoding_steps_under_autograd_fall_back_with_one_warning(device, op):
    """The decoding-step kernels have no backward: with inputs that need gradients they run the torch
    backend's step (not the naive reference), with a one-time warning; values and gradients equal the
    reference's."""
    (b, d, N, K), scan, conv, attn = _decode_step_args(device)
    fn = cuda_backend.OPS[op]
    if op == "selective_state_update":
        inputs, names = scan, ("x", "dt", "B", "C", "z")
        state0 = torch.randn(b, d, N, device=device)

        def call(f, t):
            s = state0.clone()
            return f(s, **t), s

        ref = ops.selective_state_update_ref
    elif op == "causal_conv1d_update":
        inputs, names = conv, ("x", "weight", "bias")
        state0 = torch.randn(b, d, K - 1, device=device)

        def call(f, t):
            s = state0.clone()
            return f(t["x"], s, t["weight"], t["bias"], "silu"), s

        ref = ops.causal_conv1d_update_ref
    else:
        inputs, names = attn, ("q", "k", "v")

        def call(f, t):
            return f(t["q"], t["k"], t["v"]), None

        ref = ops.attention_decode_ref
    leaves = {k: (v.clone().requires_grad_(k in names)) for k, v in inputs.items()}
    ref_leaves = {k: (v.clone().requires_grad_(k in names)) for k, v in inputs.items()}
    registry._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y, state = call(fn, leaves)
        call(fn, {k: v.clone().requires_grad_(k in names) for k, v in inputs.items()})
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1, msgs
    assert op in msgs[0] and "cuda backend" in msgs[0] and "torch backend" in msgs[0] and "no backward" in msgs[0]
    y_ref, state_ref = call(ref, ref_leaves)
    assert_close(y, y_ref, torch.float32, "y")
    if state is not None:
        assert_close(state.detach(), state_ref.detach(), torch.float32, "state")
    cot = torch.randn(y.shape, device=device)
    g = torch.autograd.grad((y * cot).sum(), [leaves[n] for n in names])
    g_ref = torch.autograd.grad((y_ref * cot).sum(), [ref_leaves[n] for n in names])
    for n, a, e in zip(names, g, g_ref):
        assert_close(a, e, torch.float32, f"d{n}")
    # without gradients the kernel runs, silently
    with no_bmojo_warnings(), torch.no_grad():
        call(fn, inputs)
