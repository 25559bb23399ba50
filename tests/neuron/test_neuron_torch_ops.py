"""The ``torch.library`` ops of the neuron backend: same signatures as the torch backend, forward and autograd
equal to the reference on CPU, ``opcheck`` clean, and the XLA-path glue exercised against the simulator."""
from __future__ import annotations

import inspect

import pytest
import torch

import neuron_harness as H
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
import bmojo_neuron
import bmojo.ops as bmojo_ops
from bmojo.ops import bmojo_attention_ref, registry, selective_scan_ref, selective_state_update_ref, torch_ops
from bmojo_neuron import ops


def _close(a, b, tol=2e-4, name=""):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 1e-5 + tol * b.float().abs().max().item(), f"{name}: max error {err:.3e}"


def test_op_table_matches_the_op_api_signatures():
    """What bmojo.ops passes to a backend (its own parameters minus ``backend``) is what OPS accepts."""
    assert set(bmojo_neuron.OPS) == {"selective_scan", "selective_state_update", "bmojo_attention"}
    for name, fn in bmojo_neuron.OPS.items():
        # q_start (keys before the queries) is optional: without it the registry routes those calls to torch
        want = [(p.name, p.default) for p in inspect.signature(getattr(bmojo_ops, name)).parameters.values()
                if p.name not in ("backend", "q_start")]
        got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == want, name
        assert name in torch_ops.OPS
    assert registry._BACKENDS["neuron"].ops() is bmojo_neuron.OPS


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


def test_selective_scan_op_autograd_matches_reference():
    args = _scan_args()
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    y, h = bmojo_neuron.OPS["selective_scan"](**leaves, return_final_state=True)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    y_ref, h_ref = selective_scan_ref(**ref_leaves, return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="h")
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward([y, h], [dy, dh])
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    for k in args:
        _close(leaves[k].grad, ref_leaves[k].grad, name="d" + k)


def test_bmojo_attention_op_autograd_matches_reference():
    args = _attn_args()
    tensors = ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory")
    leaves = {k: (v.clone().requires_grad_(True) if k in tensors else v) for k, v in args.items()}
    ref_leaves = {k: (v.clone().requires_grad_(True) if k in tensors else v) for k, v in args.items()}
    o, lse = bmojo_neuron.OPS["bmojo_attention"](**leaves, return_lse=True)
    o_ref, lse_ref = bmojo_attention_ref(**ref_leaves, return_lse=True)
    _close(o, o_ref, name="o")
    _close(lse, lse_ref, name="lse")
    do, dl = torch.randn_like(o), torch.randn_like(lse)
    torch.autograd.backward([o, lse], [do, dl])
    torch.autograd.backward([o_ref, lse_ref], [do, dl])
    for k in tensors:
        _close(leaves[k].grad, ref_leaves[k].grad, name="d" + k)


def test_selective_state_update_op_updates_state_in_place():
    a = _scan_args(G=1)
    state, ref_state = a["initial_state"].clone(), a["initial_state"].clone()
    step = dict(x=a["x"][:, 0], dt=a["dt"][:, 0], A=a["A"], B=a["B"][:, 0], C=a["C"][:, 0], D=a["D"], z=a["z"][:, 0],
                dt_bias=a["dt_bias"])
    y = bmojo_neuron.OPS["selective_state_update"](state, **step)
    y_ref = selective_state_update_ref(ref_state, **step)
    _close(y, y_ref, name="y")
    _close(state, ref_state, name="state")


def test_opcheck_selective_scan():
    a = _scan_args()
    args = tuple(a[k].requires_grad_(True) for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    torch.library.opcheck(torch.ops.bmojo_neuron.selective_scan.default,
                          args + (True, a["initial_state"].requires_grad_(True)))
    b = _scan_args(seed=1)
    torch.library.opcheck(torch.ops.bmojo_neuron.selective_scan.default,
                          (b["x"], b["dt"], b["A"], b["B"][:, :, 0], b["C"][:, :, 0], None, None, None, False, None))


def test_opcheck_bmojo_attention():
    a = _attn_args()
    for k in ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory"):
        a[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.bmojo_neuron.bmojo_attention.default, tuple(a.values()))
    torch.library.opcheck(torch.ops.bmojo_neuron.bmojo_attention.default,
                          (a["q"], a["k"], a["v"], None, None, None, None, None, None, None, 0.5))


def test_opcheck_selective_state_update():
    a = _scan_args(G=1)
    torch.library.opcheck(torch.ops.bmojo_neuron.selective_state_update.default,
                          (a["initial_state"].clone(), a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0],
                           a["D"], a["z"][:, 0], a["dt_bias"], True))


# ----------------------------------------------------------------------------------------------
# the XLA-device implementations, with the kernels on the simulator (NKI_SIMULATOR=1 makes a plain
# kernel call simulate, with the real package and with the emulator alike)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def simulated_device(monkeypatch):
    monkeypatch.setenv("NKI_SIMULATOR", "1")
    assert H.kernels("selective_scan") is not None


def test_xla_path_glue_runs_the_kernels(simulated_device):
    a = _scan_args(G=1)
    order = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    y, h = ops._scan_xla(*(a[k] for k in order), True, a["initial_state"])
    y_ref, h_ref = selective_scan_ref(**a, return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="h")
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = ops._scan_bwd_xla(dy, dh, *(a[k] for k in order), True, a["initial_state"])
    cpu_grads = ops.selective_scan_backward_op(dy, dh, *(a[k] for k in order), True, a["initial_state"])
    for name, g, c in zip(ops._SCAN_GRADS, grads, cpu_grads):
        _close(g, c, name=name)

    state, ref_state = a["initial_state"].clone(), a["initial_state"].clone()
    step = (a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0], a["D"], a["z"][:, 0], a["dt_bias"], True)
    y1 = ops._ssu_xla(state, *step)
    _close(y1, selective_state_update_ref(ref_state, *step), name="ssu y")
    _close(state, ref_state, name="ssu state")

    t = _attn_args()
    targs = tuple(t.values())
    o, lse = ops._attn_xla(*targs)
    o_ref, lse_ref = ops.bmojo_attention_op(*targs)
    _close(o, o_ref, name="o")
    _close(lse, lse_ref, name="lse")
    do, dl = torch.randn_like(o), torch.randn_like(lse)
    for g, c in zip(ops._attn_bwd_xla(do, dl, *targs, o, lse), ops.bmojo_attention_backward_op(do, dl, *targs, o, lse)):
        _close(g, c, name="attention grad")
