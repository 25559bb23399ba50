"""The neuron backend's SSD scan (Mamba-2) against the naive reference: the NKI forward kernel through
``nki.simulate`` when the Neuron SDK is installed and through the NumPy emulator otherwise (see
``neuron_harness``), at odd lengths and across chunk boundaries, with several N and P tiles; the
``torch.library`` ops on CPU (autograd = every gradient through the torch backend, ``opcheck``); the XLA-path
glue on the simulator (forward kernel, torch-backend backward announced once); the decoding step's routing."""
from __future__ import annotations

import importlib
import math
import sys
import warnings

import pytest
import torch

import neuron_harness as H
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
import bmojo.backends.neuron as neuron_backend
from bmojo.backends.neuron.ssd_scan import custom_ops as ssd_ops
from bmojo.backends.neuron.ssd_scan import layout
from bmojo.ops import registry, ssd_scan_ref, ssd_state_update_ref

KERNEL = "bmojo.backends.neuron.ssd_scan.chunk"
if H.REAL_NKI is None:  # import the kernel module against the emulator, as the harness does for the others
    with H.NKI.installed():
        sys.modules.pop(KERNEL, None)
        importlib.import_module(KERNEL)
else:
    importlib.import_module(KERNEL)

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _close(actual, expected, rtol=2e-5, atol=1e-6, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float(), expected.float()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (uninitialised memory read?)"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    bound = atol + rtol * (e.abs().max().item() if e.numel() else 0.0)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def ssd_inputs(b, T, Hh, P, G, N, *, D="head", z=True, bias=True, h0=True, softplus=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dt = r(b, T, Hh) * 0.5 - 1.0 if softplus else torch.rand(b, T, Hh, generator=g) * 0.3
    return dict(x=r(b, T, Hh, P).to(dtype), dt=dt.to(dtype), A=-(torch.rand(Hh, generator=g) * 4 + 0.5),
                B=r(b, T, G, N).to(dtype), C=r(b, T, G, N).to(dtype),
                D={"head": r(Hh), "channel": r(Hh, P), None: None}[D], z=r(b, T, Hh, P).to(dtype) if z else None,
                dt_bias=r(Hh) * 0.5 if bias else None, initial_state=r(b, Hh, P, N) if h0 else None)


# ----------------------------------------------------------------------------------------------
# the NKI kernel (forward)
# ----------------------------------------------------------------------------------------------
KERNEL_CASES = [  # b, T, H, P, G, N, chunk, D, options
    pytest.param(2, 300, 4, 16, 2, 8, None, "head", {}, id="T300-3chunks-G2"),
    pytest.param(1, 37, 4, 5, 4, 6, 16, "channel", {}, id="T37-chunk16-G=H"),
    pytest.param(1, 130, 2, 5, 1, 130, None, "head", dict(dt_limit=(0.0, 0.3)), id="N130-two-N-tiles-hi-limit"),
    pytest.param(1, 40, 2, 600, 2, 4, 16, "channel", dict(dt_limit=(0.05, 2.0)), id="P600-two-P-tiles-both-limits"),
    pytest.param(2, 33, 2, 3, 1, 4, 16, None, dict(dt_softplus=False, z=False, bias=False, h0=False), id="bare"),
]


@pytest.mark.parametrize("b,T,Hh,P,G,N,chunk,D,opts", KERNEL_CASES)
def test_ssd_scan_kernel_forward(b, T, Hh, P, G, N, chunk, D, opts):
    kw = dict(dt_softplus=opts.get("dt_softplus", True), dt_limit=opts.get("dt_limit", (0.0, math.inf)))
    t = ssd_inputs(b, T, Hh, P, G, N, D=D, softplus=kw["dt_softplus"],
                   **{k: v for k, v in opts.items() if k in ("z", "bias", "h0")})
    y, h = layout.ssd_scan_impl(H.call, **t, **kw, chunk=chunk)
    y_ref, h_ref = ssd_scan_ref(**t, **kw, return_final_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32 and h.shape == (b, Hh, P, N)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="final_state")


def test_ssd_scan_kernel_strong_decay():
    """dt' ~ 20 on every third token next to tiny ones: the decays come from sums of same-sign log-decays."""
    t = ssd_inputs(1, 50, 2, 4, 1, 4)
    t["dt"][:, ::3] = 20.0
    t["dt"][:, 1::3] = -12.0
    y, h = layout.ssd_scan_impl(H.call, **t, chunk=16)
    y_ref, h_ref = ssd_scan_ref(**t, return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="final_state")


def test_ssd_scan_kernel_bf16():
    t = ssd_inputs(1, 70, 2, 8, 1, 4, dtype=torch.bfloat16)
    y, h = layout.ssd_scan_impl(H.call, **t, chunk=32)
    y_ref, h_ref = ssd_scan_ref(**t, return_final_state=True)
    assert y.dtype == torch.bfloat16
    _close(y, y_ref, rtol=2e-2, atol=1e-2, name="y")
    _close(h, h_ref, rtol=1e-4, name="final_state")  # fp32 on both sides, from the same bf16 inputs


# ----------------------------------------------------------------------------------------------
# the torch.library ops (off XLA: the torch backend, both directions)
# ----------------------------------------------------------------------------------------------
def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


@pytest.mark.filterwarnings("ignore:bmojo. ssd_scan on the neuron backend runs the torch backend:RuntimeWarning")
@pytest.mark.parametrize("D", ["head", "channel"])
def test_ssd_scan_op_autograd_matches_reference(D):
    t = ssd_inputs(2, 24, 4, 3, 2, 4, D=D)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    y, h = neuron_backend.OPS["ssd_scan"](**leaves, dt_limit=(0.0, 0.4), return_final_state=True)
    y_ref, h_ref = ssd_scan_ref(**ref_leaves, dt_limit=(0.0, 0.4), return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="h")
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(y.shape, generator=g), torch.randn(h.shape, generator=g)
    torch.autograd.backward([y, h], [dy, dh])
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    for k in NAMES:
        _close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-4, name="d" + k)


@pytest.mark.filterwarnings("ignore:bmojo. ssd_scan on the neuron backend runs the torch backend:RuntimeWarning")
def test_opcheck_ssd_scan():
    t = ssd_inputs(2, 20, 4, 3, 2, 4)
    args = tuple(t[k].requires_grad_(True) for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    torch.library.opcheck(torch.ops.bmojo_neuron.ssd_scan.default,
                          args + (True, 0.0, math.inf, t["initial_state"].requires_grad_(True)))
    u = ssd_inputs(1, 9, 2, 3, 1, 4, seed=1)
    torch.library.opcheck(torch.ops.bmojo_neuron.ssd_scan.default,
                          (u["x"], u["dt"], u["A"], u["B"], u["C"], None, None, None, False, 0.0, 1.0, None))


def test_off_xla_ssd_scan_runs_the_torch_backend_with_one_warning():
    registry._warned.clear()
    t = ssd_inputs(1, 10, 2, 3, 1, 4)
    _, first = _warnings_of(lambda: neuron_backend.OPS["ssd_scan"](**t))
    _, second = _warnings_of(lambda: neuron_backend.OPS["ssd_scan"](**t))
    assert len(first) == 1 and not second, (first, second)
    assert "ssd_scan" in first[0] and "neuron backend" in first[0] and "torch backend" in first[0]


def test_ssd_state_update_has_no_nki_kernel_and_runs_the_torch_step_with_one_warning(monkeypatch):
    monkeypatch.setattr(registry._BACKENDS["neuron"], "unavailable", lambda: None)  # as on a Neuron host
    monkeypatch.setattr(registry, "_warned", set())
    assert "ssd_state_update" not in neuron_backend.OPS
    fn, msgs = _warnings_of(lambda: registry.resolve("ssd_state_update", "neuron", torch.device("xla")))
    assert len(msgs) == 1 and "'neuron'" in msgs[0] and "ssd_state_update" in msgs[0] and "torch backend" in msgs[0]
    t = ssd_inputs(2, 1, 4, 3, 2, 4)
    step = dict(x=t["x"][:, 0], dt=t["dt"][:, 0], A=t["A"], B=t["B"][:, 0], C=t["C"][:, 0], D=t["D"],
                z=t["z"][:, 0], dt_bias=t["dt_bias"])
    state, ref_state = t["initial_state"].clone(), t["initial_state"].clone()
    _close(fn(state, **step), ssd_state_update_ref(ref_state, **step), name="y")
    _close(state, ref_state, name="state")


# ----------------------------------------------------------------------------------------------
# the XLA-device implementations, with the kernel on the simulator
# ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:bmojo. ssd_scan on the neuron backend runs the torch backend:RuntimeWarning")
def test_xla_path_glue(monkeypatch):
    """The forward registered for XLA tensors runs the NKI kernel (simulated here); the backward registered for
    XLA tensors runs the torch backend through torch.func, announced once, and equals the CPU backward op."""
    monkeypatch.setenv("NKI_SIMULATOR", "1")
    monkeypatch.setattr(registry, "_warned", set())
    t = ssd_inputs(2, 40, 4, 3, 2, 5, D="channel")
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, 0.0, math.inf)
    y, h = ssd_ops._scan_xla(*args, t["initial_state"])
    y_ref, h_ref = ssd_scan_ref(**t, return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="h")
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads, msgs = _warnings_of(lambda: ssd_ops._scan_bwd_xla(dy, dh, *args, t["initial_state"]))
    assert len(msgs) == 1 and "backward of ssd_scan" in msgs[0] and "no NKI backward kernel" in msgs[0], msgs
    assert not _warnings_of(lambda: ssd_ops._scan_bwd_xla(dy, dh, *args, t["initial_state"]))[1]
    cpu = ssd_ops.ssd_scan_backward_op(dy, dh, *args, t["initial_state"])
    for name, g, c in zip(NAMES, grads, cpu):
        _close(g, c, name="d" + name)
