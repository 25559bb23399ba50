"""The NKI kernels against the naive references (forward and every gradient), run through ``nki.simulate``
when the Neuron SDK is installed and through the NumPy emulator otherwise (see ``neuron_harness``)."""
from __future__ import annotations

import pytest
import torch

import neuron_harness as H
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
from bmojo.ops import bmojo_attention_ref, selective_scan_ref, selective_state_update_ref
from bmojo_neuron import layout


def assert_close(actual, expected, rtol=1e-4, atol=1e-5, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float(), expected.float()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (uninitialised memory read?)"
    err = (a - e).abs().max().item()
    bound = atol + rtol * e.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


# ----------------------------------------------------------------------------------------------
# selective scan
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
# B'MOJO attention
# ----------------------------------------------------------------------------------------------
ATTN_CASES = [  # b, T, Hq, Hkv, D, window, fading, fading_window, memory, m_e
    pytest.param(1, 50, 2, 1, 16, None, False, None, False, 0, id="causal-gqa"),
    pytest.param(1, 200, 2, 2, 32, 48, False, None, False, 0, id="window48-T200"),
    pytest.param(2, 200, 4, 2, 16, 32, True, 20, True, 5, id="bmojo-w32-mf20-me5"),
    pytest.param(1, 300, 2, 2, 32, 16, True, None, True, 3, id="bmojo-w16-T300"),
    pytest.param(1, 160, 1, 1, 64, 100, True, 0, True, 130, id="memory-130-slots-no-fading"),
]


def _attn_inputs(b, T, Hq, Hkv, D, w, fading, memory, me, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    ins = dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D), k_fading=None, v_fading=None,
               k_memory=None, v_memory=None)
    mv = None
    if fading:
        ins.update(k_fading=r(b, T, Hkv, D), v_fading=r(b, T, Hkv, D))
    if memory:
        nc = -(-T // w)
        ins.update(k_memory=r(b, nc, me, Hkv, D), v_memory=r(b, nc, me, Hkv, D))
        mv = torch.rand(b, nc, me, generator=g) > 0.3
    return ins, mv


@pytest.mark.parametrize("b,T,Hq,Hkv,D,w,fading,mf,memory,me", ATTN_CASES)
def test_bmojo_attention_forward_and_gradients(b, T, Hq, Hkv, D, w, fading, mf, memory, me):
    ins, mv = _attn_inputs(b, T, Hq, Hkv, D, w, fading, memory, me)
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in ins.items()}
    kw = dict(window=w, fading_window=mf, memory_valid=mv)
    o_ref, lse_ref = bmojo_attention_ref(leaves["q"], leaves["k"], leaves["v"], k_fading=leaves["k_fading"],
                                         v_fading=leaves["v_fading"], k_memory=leaves["k_memory"],
                                         v_memory=leaves["v_memory"], return_lse=True, **kw)
    args = (ins["q"], ins["k"], ins["v"], w, ins["k_fading"], ins["v_fading"], mf, ins["k_memory"], ins["v_memory"], mv)
    o, lse = layout.bmojo_attention_impl(H.call, *args, None)
    assert_close(o, o_ref.detach(), name="o")
    assert_close(lse, lse_ref.detach(), name="lse")

    g = torch.Generator().manual_seed(1)
    do, dlse = torch.randn(o_ref.shape, generator=g), torch.randn(lse_ref.shape, generator=g)
    torch.autograd.backward([o_ref, lse_ref], [do, dlse])
    grads = layout.bmojo_attention_backward_impl(H.call, do, dlse, *args, None, o, lse)
    for name, got in zip(ins, grads):
        if ins[name] is None:
            assert got is None, name
        else:
            assert_close(got, leaves[name].grad, rtol=2e-4, name="d" + name)


def test_bmojo_attention_bf16():
    ins, mv = _attn_inputs(1, 150, 2, 1, 32, 40, True, True, 4, dtype=torch.bfloat16)
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in ins.items()}
    o_ref, lse_ref = bmojo_attention_ref(leaves["q"], leaves["k"], leaves["v"], window=40, k_fading=leaves["k_fading"],
                                         v_fading=leaves["v_fading"], k_memory=leaves["k_memory"],
                                         v_memory=leaves["v_memory"], memory_valid=mv, return_lse=True)
    args = (ins["q"], ins["k"], ins["v"], 40, ins["k_fading"], ins["v_fading"], None, ins["k_memory"], ins["v_memory"], mv)
    o, lse = layout.bmojo_attention_impl(H.call, *args, None)
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref.detach(), rtol=3e-2, atol=1e-2, name="o")
    assert_close(lse, lse_ref.detach(), rtol=1e-2, atol=1e-2, name="lse")
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    o_ref.backward(do)
    grads = layout.bmojo_attention_backward_impl(H.call, do, None, *args, None, o, lse)
    for name, got in zip(ins, grads):
        assert got.dtype == torch.bfloat16
        assert_close(got, leaves[name].grad, rtol=5e-2, atol=2e-2, name="d" + name)


def test_full_size_tiles_stay_within_on_chip_memory():
    """Head dim 128 and 128-query blocks: full 128x128 Tensor Engine tiles; the emulator's capacity checks
    (SBUF 192 KiB, PSUM 16 KiB per partition) hold, and the result is still exact."""
    ins, mv = _attn_inputs(1, 256, 1, 1, 128, 64, True, True, 8)
    args = (ins["q"], ins["k"], ins["v"], 64, ins["k_fading"], ins["v_fading"], None, ins["k_memory"], ins["v_memory"], mv)
    o, lse = layout.bmojo_attention_impl(H.call, *args, None)
    o_ref, lse_ref = bmojo_attention_ref(ins["q"], ins["k"], ins["v"], window=64, k_fading=ins["k_fading"],
                                         v_fading=ins["v_fading"], k_memory=ins["k_memory"],
                                         v_memory=ins["v_memory"], memory_valid=mv, return_lse=True)
    assert_close(o, o_ref, name="o")
    assert_close(lse, lse_ref, name="lse")
    if H.REAL_NKI is None:
        assert H.NKI.last_run["peak_psum_bytes"] <= 16 * 1024 and H.NKI.last_run["peak_sbuf_bytes"] <= 192 * 1024
