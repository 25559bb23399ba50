"""The neuron backend's selective scan against the naive references: the NKI kernels (forward and every
gradient, and the decoding step) run through ``nki.simulate`` when the Neuron SDK is installed and through
the NumPy emulator otherwise (see ``neuron_harness``); the ``torch.library`` ops (autograd, ``opcheck``) on
CPU, where they run the torch backend."""
from __future__ import annotations

import pytest
import torch

import neuron_harness as H
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
import bmojo.backends.neuron as neuron_backend
from bmojo.backends.neuron.selective_scan import layout
from bmojo.ops import selective_scan_ref, selective_state_update_ref


def assert_close(actual, expected, rtol=1e-4, atol=1e-5, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float(), expected.float()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (uninitialised memory read?)"
    err = (a - e).abs().max().item()
    bound = atol + rtol * e.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _close(a, b, tol=2e-4, name=""):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 1e-5 + tol * b.float().abs().max().item(), f"{name}: max error {err:.3e}"


# ----------------------------------------------------------------------------------------------
# the NKI kernels
# ----------------------------------------------------------------------------------------------
def _scan_call(ins, softplus=True):
    return layout.selective_scan_impl(H.call, ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], ins["D"], ins["z"],
                                      ins["dt_bias"], softplus, ins["initial_state"])


def _scan_inputs(b, T, d, N, G, has_D, has_z, has_bias, has_h0, softplus, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(b, T, d)
    dt = r(b, T, d) * 0.5 if softplus else torch.rand(b, T, d, generator=g) * 0.2  # positive dt without softplus
    A = -(torch.rand(d, N, generator=g) + 0.1)
    shp = (b, T, N) if G is None else (b, T, G, N)
    B, C = r(*shp), r(*shp)
    ins = dict(x=x.to(dtype), dt=dt.to(dtype), A=A, B=B.to(dtype), C=C.to(dtype),
               D=r(d) if has_D else None, z=r(b, T, d).to(dtype) if has_z else None,
               dt_bias=r(d) * 0.3 if has_bias else None, initial_state=r(b, d, N) if has_h0 else None)
    return ins


SCAN_CASES = [  # b, T, d, N, G, has_D, has_z, has_bias, has_h0, softplus
    pytest.param(2, 50, 20, 4, None, True, True, True, True, True, id="small"),
    pytest.param(1, 300, 200, 3, 2, True, True, True, True, True, id="d200-groups2-T300"),
    pytest.param(2, 130, 130, 2, None, False, False, False, False, False, id="d130-bare-no-softplus"),
    pytest.param(1, 260, 256, 2, 4, True, False, True, False, True, id="d256-groups4"),
]


@pytest.mark.parametrize("b,T,d,N,G,has_D,has_z,has_bias,has_h0,softplus", SCAN_CASES)
def test_selective_scan_forward_and_gradients(b, T, d, N, G, has_D, has_z, has_bias, has_h0, softplus):
    ins = _scan_inputs(b, T, d, N, G, has_D, has_z, has_bias, has_h0, softplus)
    names = list(ins)
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in ins.items()}
    y_ref, h_ref = selective_scan_ref(**leaves, dt_softplus=softplus, return_final_state=True)

    y, h = _scan_call(ins, softplus)
    assert_close(y, y_ref.detach(), name="y")
    assert_close(h, h_ref.detach(), name="final_state")

    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(y_ref.shape, generator=g), torch.randn(h_ref.shape, generator=g)
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    grads = layout.selective_scan_backward_impl(H.call, dy, dh, ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"],
                                                ins["D"], ins["z"], ins["dt_bias"], softplus, ins["initial_state"])
    for name, got in zip(names, grads):
        if ins[name] is None:
            assert got is None, name
        else:
            assert_close(got, leaves[name].grad, rtol=2e-4, name="d" + name)


def test_selective_scan_forward_two_chunks():
    """T = 700 > the forward chunk of 512: the state is carried between chunks (and the last is partial)."""
    ins = _scan_inputs(1, 700, 130, 2, None, True, True, True, True, True)
    y_ref, h_ref = selective_scan_ref(**ins, return_final_state=True)
    y, h = _scan_call(ins)
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, name="final_state")


def test_selective_scan_forward_bf16():
    ins = _scan_inputs(1, 64, 40, 4, None, True, True, True, False, True, dtype=torch.bfloat16)
    y_ref = selective_scan_ref(**ins)
    y, _ = _scan_call(ins)
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, rtol=2e-2, atol=1e-2, name="y")


@pytest.mark.parametrize("d,G,has_D,has_z,has_bias", [(20, None, True, True, True), (200, 4, False, False, False)])
def test_selective_state_update(d, G, has_D, has_z, has_bias):
    ins = _scan_inputs(3, 1, d, 5, G, has_D, has_z, has_bias, True, True)
    state = ins.pop("initial_state")
    step = {k: (v[:, 0] if k in ("x", "dt", "z", "B", "C") and v is not None else v) for k, v in ins.items()}
    ref_state = state.clone()
    y_ref = selective_state_update_ref(ref_state, **step)
    y, new_state = layout.selective_state_update_impl(H.call, state, *step.values())
    assert_close(y, y_ref, name="y")
    assert_close(new_state, ref_state, name="state")


# ----------------------------------------------------------------------------------------------
# the torch.library ops
# ----------------------------------------------------------------------------------------------
def _scan_args(G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, T, d, N = 2, 24, 12, 3
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(b, T, d), dt=r(b, T, d) * 0.5, A=-(torch.rand(d, N, generator=g) + 0.1), B=r(b, T, G, N),
                C=r(b, T, G, N), D=r(d), z=r(b, T, d), dt_bias=r(d) * 0.3, initial_state=r(b, d, N))


def test_selective_scan_op_autograd_matches_reference():
    args = _scan_args()
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    y, h = neuron_backend.OPS["selective_scan"](**leaves, return_final_state=True)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    y_ref, h_ref = selective_scan_ref(**ref_leaves, return_final_state=True)
    _close(y, y_ref, name="y")
    _close(h, h_ref, name="h")
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward([y, h], [dy, dh])
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    for k in args:
        _close(leaves[k].grad, ref_leaves[k].grad, name="d" + k)


def test_selective_state_update_op_updates_state_in_place():
    a = _scan_args(G=1)
    state, ref_state = a["initial_state"].clone(), a["initial_state"].clone()
    step = dict(x=a["x"][:, 0], dt=a["dt"][:, 0], A=a["A"], B=a["B"][:, 0], C=a["C"][:, 0], D=a["D"], z=a["z"][:, 0],
                dt_bias=a["dt_bias"])
    y = neuron_backend.OPS["selective_state_update"](state, **step)
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


def test_opcheck_selective_state_update():
    a = _scan_args(G=1)
    torch.library.opcheck(torch.ops.bmojo_neuron.selective_state_update.default,
                          (a["initial_state"].clone(), a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0],
                           a["D"], a["z"][:, 0], a["dt_bias"], True))
