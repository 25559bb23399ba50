"""The neuron backend's B'MOJO attention against the naive reference: the NKI kernels (forward and every
gradient) run through ``nki.simulate`` when the Neuron SDK is installed and through the NumPy emulator
otherwise (see ``neuron_harness``); the ``torch.library`` op (autograd, ``opcheck``) on CPU, where it runs
the torch backend."""
from __future__ import annotations

import pytest
import torch

import neuron_harness as H
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
import bmojo.backends.neuron as neuron_backend
from bmojo.backends.neuron.attention import layout
from bmojo.ops import bmojo_attention_ref


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


# ----------------------------------------------------------------------------------------------
# the torch.library op
# ----------------------------------------------------------------------------------------------
def _attn_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, T, H, D, w, me = 1, 20, 2, 8, 6, 3
    nc = -(-T // w)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(b, T, H, D), k=r(b, T, 1, D), v=r(b, T, 1, D), window=w, k_fading=r(b, T, 1, D),
                v_fading=r(b, T, 1, D), fading_window=4, k_memory=r(b, nc, me, 1, D), v_memory=r(b, nc, me, 1, D),
                memory_valid=torch.rand(b, nc, me, generator=g) > 0.3, scale=None)


def test_bmojo_attention_op_autograd_matches_reference():
    args = _attn_args()
    tensors = ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory")
    leaves = {k: (v.clone().requires_grad_(True) if k in tensors else v) for k, v in args.items()}
    ref_leaves = {k: (v.clone().requires_grad_(True) if k in tensors else v) for k, v in args.items()}
    o, lse = neuron_backend.OPS["bmojo_attention"](**leaves, return_lse=True)
    o_ref, lse_ref = bmojo_attention_ref(**ref_leaves, return_lse=True)
    _close(o, o_ref, name="o")
    _close(lse, lse_ref, name="lse")
    do, dl = torch.randn_like(o), torch.randn_like(lse)
    torch.autograd.backward([o, lse], [do, dl])
    torch.autograd.backward([o_ref, lse_ref], [do, dl])
    for k in tensors:
        _close(leaves[k].grad, ref_leaves[k].grad, name="d" + k)


def test_opcheck_bmojo_attention():
    a = _attn_args()
    for k in ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory"):
        a[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.bmojo_neuron.bmojo_attention.default, tuple(a.values()))
    torch.library.opcheck(torch.ops.bmojo_neuron.bmojo_attention.default,
                          (a["q"], a["k"], a["v"], None, None, None, None, None, None, None, 0.5))
