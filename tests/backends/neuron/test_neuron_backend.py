"""The neuron backend module: its op table (the op API's signatures), the XLA-path glue against the kernels
on the simulator, and its fallbacks (each warns once, naming the op, the backend and the reason)."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import neuron_harness as H
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
import bmojo.backends.neuron as neuron_backend
import bmojo.ops as bmojo_ops
from bmojo.backends.neuron import library
from bmojo.backends.neuron.attention import custom_ops as attention_ops
from bmojo.backends.neuron.selective_scan import custom_ops as scan_ops
from bmojo.ops import registry, selective_scan_ref, selective_state_update_ref


def _close(a, b, tol=2e-4, name=""):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 1e-5 + tol * b.float().abs().max().item(), f"{name}: max error {err:.3e}"


def test_op_table_matches_the_op_api_signatures():
    """What bmojo.ops passes to a backend (its own parameters minus ``backend``) is what OPS accepts."""
    assert set(neuron_backend.OPS) == {"selective_scan", "selective_state_update", "bmojo_attention", "ssd_scan"}
    for name, fn in neuron_backend.OPS.items():
        # q_start (keys before the queries) and q_fading (the fading keys' own queries) are optional
        # capabilities: without them the registry routes those calls to torch
        want = [(p.name, p.default) for p in inspect.signature(getattr(bmojo_ops, name)).parameters.values()
                if p.name not in ("backend", "q_start", "q_fading")]
        got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == want, name
        assert registry.torch_implementation(name, torch.device("cpu")) is not None
    assert registry._BACKENDS["neuron"].ops() is neuron_backend.OPS


def _scan_args(G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, T, d, N = 2, 24, 12, 3
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(b, T, d), dt=r(b, T, d) * 0.5, A=-(torch.rand(d, N, generator=g) + 0.1), B=r(b, T, G, N),
                C=r(b, T, G, N), D=r(d), z=r(b, T, d), dt_bias=r(d) * 0.3, initial_state=r(b, d, N))


def _attn_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, T, H, D, w, me = 1, 20, 2, 8, 6, 3
    nc = -(-T // w)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(b, T, H, D), k=r(b, T, 1, D), v=r(b, T, 1, D), window=w, k_fading=r(b, T, 1, D),
                v_fading=r(b, T, 1, D), fading_window=4, k_memory=r(b, nc, me, 1, D), v_memory=r(b, nc, me, 1, D),
                memory_valid=torch.rand(b, nc, me, generator=g) > 0.3, scale=None)


# ----------------------------------------------------------------------------------------------
# the XLA-device implementations, with the kernels on the simulator (NKI_SIMULATOR=1 makes a plain
# kernel call simulate, with the real package and with the emulator alike)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def simulated_device(monkeypatch):
    monkeypatch.setenv("NKI_SIMULATOR", "1")
    assert H.kernels("selective_scan.chunk") is not None


def test_xla_path_glue_runs_the_kernels(simulated_device):
    a = _scan_args(G=1)
    order = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    y, h = scan_ops._scan_xla(*(a[k] for k in order), True, a["initial_state"])
    y_ref, h_ref = selective_scan_ref(**a, return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="h")
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = scan_ops._scan_bwd_xla(dy, dh, *(a[k] for k in order), True, a["initial_state"])
    cpu_grads = scan_ops.selective_scan_backward_op(dy, dh, *(a[k] for k in order), True, a["initial_state"])
    for name, g, c in zip(scan_ops._SCAN_GRADS, grads, cpu_grads):
        _close(g, c, name=name)

    state, ref_state = a["initial_state"].clone(), a["initial_state"].clone()
    step = (a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0], a["D"], a["z"][:, 0], a["dt_bias"], True)
    y1 = scan_ops._ssu_xla(state, *step)
    _close(y1, selective_state_update_ref(ref_state, *step), name="ssu y")
    _close(state, ref_state, name="ssu state")

    t = _attn_args()
    targs = tuple(t.values())
    o, lse = attention_ops._attn_xla(*targs)
    o_ref, lse_ref = attention_ops.bmojo_attention_op(*targs)
    _close(o, o_ref, name="o")
    _close(lse, lse_ref, name="lse")
    do, dl = torch.randn_like(o), torch.randn_like(lse)
    got = attention_ops._attn_bwd_xla(do, dl, *targs, o, lse)
    for g, c in zip(got, attention_ops.bmojo_attention_backward_op(do, dl, *targs, o, lse)):
        _close(g, c, name="attention grad")


# ----------------------------------------------------------------------------------------------
# fallbacks: each warns once, naming the op, the backend and the reason
# ----------------------------------------------------------------------------------------------
def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


@pytest.mark.parametrize("op", ["selective_scan", "selective_state_update", "bmojo_attention"])
def test_off_xla_the_ops_run_the_torch_backend_with_one_warning(op):
    registry._warned.clear()
    a = _scan_args(G=1) if op != "bmojo_attention" else _attn_args()
    if op == "selective_scan":
        call = lambda: neuron_backend.OPS[op](**a)  # noqa: E731
    elif op == "selective_state_update":
        step = dict(x=a["x"][:, 0], dt=a["dt"][:, 0], A=a["A"], B=a["B"][:, 0], C=a["C"][:, 0])
        call = lambda: neuron_backend.OPS[op](a["initial_state"].clone(), **step)  # noqa: E731
    else:
        call = lambda: neuron_backend.OPS[op](**a)  # noqa: E731
    _, first = _warnings_of(call)
    _, second = _warnings_of(call)
    assert len(first) == 1 and not second, (first, second)
    assert op in first[0] and "neuron backend" in first[0] and "torch backend" in first[0] and "XLA" in first[0]


def test_q_fading_goes_to_the_torch_backend_with_one_warning(monkeypatch):
    """The NKI attention scores every key with q (no ``fading_query``): calls with the fading keys' own
    queries run the torch backend (its kernel for XLA devices), announced once by op, backend and reason;
    the others still reach the neuron op."""
    monkeypatch.setattr(registry._BACKENDS["neuron"], "unavailable", lambda: None)  # as on a Neuron host
    monkeypatch.setattr(registry, "_warned", set())
    assert not getattr(neuron_backend.OPS["bmojo_attention"], "fading_query", False)
    fn = registry.resolve_resuming("neuron", torch.device("xla"))  # what the model's table holds there
    a = _attn_args()
    qf = torch.randn(a["q"].shape, generator=torch.Generator().manual_seed(7))
    o, msgs = _warnings_of(lambda: fn(**a, q_fading=qf))
    assert len(msgs) == 1 and "bmojo_attention" in msgs[0] and "'neuron'" in msgs[0] and "q_fading" in msgs[0]
    _close(o, bmojo_ops.bmojo_attention_ref(**a, q_fading=qf), name="o")
    assert not _warnings_of(lambda: fn(**a, q_fading=qf))[1]
    # without q_fading (None included) the neuron op runs: off XLA it says so itself
    o, msgs = _warnings_of(lambda: fn(**a, q_fading=None))
    assert len(msgs) == 1 and "neuron backend" in msgs[0] and "XLA" in msgs[0]
    _close(o, bmojo_ops.bmojo_attention_ref(**a), name="o")


class _NoSetupContext(torch.autograd.Function):
    """An autograd.Function torch.func refuses (no separate setup_context)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def test_cpu_backward_falls_back_to_the_reference_only_when_torch_func_refuses(monkeypatch):
    """When torch.func cannot differentiate the torch backend's implementation, the CPU backward op uses the
    naive reference, warning once; the gradients are still the reference's."""
    def scan_torch_func_refuses(op, device):
        impl = registry.torch_implementation(op, device)
        return lambda x, *args, **kw: impl(_NoSetupContext.apply(x), *args, **kw)

    monkeypatch.setattr(library, "torch_on_this_device", scan_torch_func_refuses)
    registry._warned.clear()
    args = _scan_args()
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    y, h = neuron_backend.OPS["selective_scan"](**leaves, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(**ref_leaves, return_final_state=True)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    _, msgs = _warnings_of(lambda: torch.autograd.backward([y, h], [dy, dh]))
    assert len(msgs) == 1, msgs
    assert "selective_scan" in msgs[0] and "neuron backend" in msgs[0] and "naive reference" in msgs[0]
    assert "setup_context" in msgs[0]
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    for k in args:
        _close(leaves[k].grad, ref_leaves[k].grad, name="d" + k)
    y2, h2 = neuron_backend.OPS["selective_scan"](**leaves, return_final_state=True)
    _, msgs = _warnings_of(lambda: torch.autograd.backward([y2, h2], [dy, dh]))
    assert not msgs  # once


def test_cpu_backward_propagates_any_other_error():
    def run(impl):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        library.cpu_grads("bmojo_attention", torch.device("cpu"), run)
