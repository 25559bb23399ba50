"""Triton B'MOJO attention vs the naive reference: o, lse and the gradients of q, k, v, the fading
keys/values and the memory keys/values; plus the decoding-step attention."""
import pytest
import torch

from cuda_testutils import assert_close, grads, leaf

import bmojo.ops as ops  # noqa: E402
from bmojo.ops import attention_decode_ref, bmojo_attention_ref  # noqa: E402
from bmojo.backends.cuda.attention import attention_decode, bmojo_attention  # noqa: E402


def make(device, b, T, Hq, Hkv, D, window, fading, m_f, m_e, dtype, valid_p=0.7, invalid_chunk=None, q_fading=False):
    def r(*shape):
        return leaf(torch.randn(*shape, device=device, dtype=dtype))

    t = dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D))
    kw = dict(window=window)
    if fading:
        kw.update(k_fading=r(b, T, Hkv, D), v_fading=r(b, T, Hkv, D), fading_window=m_f)
        if q_fading:  # the fading keys' own queries
            kw["q_fading"] = r(b, T, Hq, D)
    if m_e:
        nc = -(-T // window)
        valid = torch.rand(b, nc, m_e, device=device) < valid_p
        if invalid_chunk is not None:
            valid[:, invalid_chunk] = False
        kw.update(k_memory=r(b, nc, m_e, Hkv, D), v_memory=r(b, nc, m_e, Hkv, D), memory_valid=valid)
    return t, kw


DIFF = ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory", "q_fading")


def check(device, *args, lse_grad=True, **kwargs):
    t, kw = make(device, *args, **kwargs)
    dtype = t["q"].dtype
    out = bmojo_attention(**t, **kw, return_lse=True)
    ref = bmojo_attention_ref(**t, **kw, return_lse=True)
    assert_close(out[0], ref[0], dtype, "o")
    assert_close(out[1], ref[1], torch.float32 if dtype == torch.float32 else dtype, "lse")
    cot = [torch.randn(r.shape, device=device) for r in ref]
    if not lse_grad:
        out, ref, cot = out[:1], ref[:1], cot[:1]
    names = [n for n in DIFF if n in t or n in kw]
    ins = [t[n] if n in t else kw[n] for n in names]
    factor = 1.0 if dtype == torch.float32 else 2.0
    for n, go, gr in zip(names, grads(out, cot, ins), grads(ref, cot, ins)):
        assert_close(go, gr, dtype, f"d{n}", factor=factor)


# b, T, Hq, Hkv, D, window, fading, m_f, m_e
CASES = {
    "gqa_all_memories": (2, 37, 4, 2, 16, 10, True, None, 3),
    "w_not_dividing_T_blocks_shorter_than_w": (1, 37, 2, 1, 16, 20, True, 5, 2),
    "T_below_w": (1, 7, 2, 2, 16, 20, True, None, 2),
    "full_causal_mqa": (1, 33, 4, 1, 16, None, False, None, 0),
    "two_slot_blocks_long_fading": (1, 33, 2, 1, 16, 8, True, 12, 20),
    "head_dim_12_no_memory": (2, 19, 2, 2, 12, 5, True, None, 0),
    "memory_without_fading": (1, 26, 2, 2, 16, 6, False, None, 4),
    "sliding_window_only_T1": (1, 1, 2, 1, 16, 4, False, None, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_fp32(device, small_attention_blocks, case):
    check(device, *CASES[case], torch.float32)


QF_CASES = ["gqa_all_memories", "w_not_dividing_T_blocks_shorter_than_w", "T_below_w", "two_slot_blocks_long_fading",
            "head_dim_12_no_memory"]


@pytest.mark.parametrize("case", QF_CASES)
def test_attention_q_fading_fp32(device, small_attention_blocks, case):
    """The fading band scored with its own queries: o, lse and every gradient, d q_fading included."""
    check(device, *CASES[case], torch.float32, q_fading=True)


def test_attention_q_fading_fading_window_zero_and_half(device, small_attention_blocks):
    """fading_window=0: q_fading is never used (zero gradient); bf16 with q_fading."""
    check(device, 2, 29, 2, 1, 16, 8, True, 0, 3, torch.float32, q_fading=True)
    check(device, 2, 29, 4, 2, 16, 8, True, 6, 2, torch.bfloat16, q_fading=True)


def test_attention_q_fading_some_gradients_only(device, small_attention_blocks):
    """Only q_fading (then only q) needs a gradient: the dq kernel still writes the one asked for."""
    t, kw = make(device, 1, 21, 2, 1, 16, 8, True, None, 2, torch.float32, q_fading=True)
    for name in ("k", "v", "q"):
        t[name] = t[name].detach()
    for wanted in ("q_fading", "q"):
        if wanted == "q":
            t["q"], kw["q_fading"] = leaf(t["q"]), kw["q_fading"].detach()
        x = t["q"] if wanted == "q" else kw["q_fading"]
        o, o_ref = bmojo_attention(**t, **kw), bmojo_attention_ref(**t, **kw)
        cot = [torch.randn_like(o_ref)]
        assert_close(grads([o], cot, [x])[0], grads([o_ref], cot, [x])[0], torch.float32, "d" + wanted)
    with pytest.raises(ValueError, match="q_fading"):
        bmojo_attention(t["q"], t["k"], t["v"], q_fading=kw["q_fading"])  # full causal: no fading keys


def test_attention_memory_valid_none(device, small_attention_blocks):
    t, kw = make(device, 1, 21, 2, 1, 16, 8, True, None, 2, torch.float32)
    kw["memory_valid"] = None  # every slot valid
    o = bmojo_attention(**t, **kw)
    o_ref = bmojo_attention_ref(**t, **kw)
    assert_close(o, o_ref, torch.float32, "o")
    cot = [torch.randn_like(o_ref)]
    ins = [t["q"], kw["k_memory"], kw["v_memory"]]
    for n, go, gr in zip(("q", "k_memory", "v_memory"), grads([o], cot, ins), grads([o_ref], cot, ins)):
        assert_close(go, gr, torch.float32, f"d{n}")


def test_attention_invalid_memory_chunk_and_fading_window_zero(device, small_attention_blocks):
    # chunk 1 has no valid slot at all; fading_window=0 turns the fading keys off
    check(device, 2, 29, 2, 1, 16, 8, True, 0, 3, torch.float32, invalid_chunk=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half(device, small_attention_blocks, dtype):
    check(device, 2, 29, 4, 2, 16, 8, True, None, 2, dtype)


def test_attention_default_blocks_and_dispatch(device):
    """The production block sizes (one query block covers several chunks) through bmojo.ops."""
    t, kw = make(device, 1, 40, 2, 1, 16, 6, True, 4, 2, torch.float32)
    o = ops.bmojo_attention(**t, **kw, backend="cuda")
    o_ref = bmojo_attention_ref(**t, **kw)
    assert_close(o, o_ref, torch.float32, "o")
    cot = [torch.randn_like(o_ref)]
    ins = [t["q"], kw["k_memory"], kw["v_fading"]]
    for go, gr in zip(grads([o], cot, ins), grads([o_ref], cot, ins)):
        assert_close(go, gr, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,S,D", [(4, 2, 37, 16), (2, 2, 5, 12)])
def test_attention_decode(device, dtype, Hq, Hkv, S, D):
    b = 2
    q = torch.randn(b, Hq, D, device=device, dtype=dtype)
    k = torch.randn(b, S, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(b, S, Hkv, D, device=device, dtype=dtype)
    valid = torch.rand(b, S, device=device) < 0.6
    valid[:, 0] = True
    for va in (None, valid):
        out = attention_decode(q, k, v, va)
        assert_close(out, attention_decode_ref(q, k, v, va), dtype, "o")
    out = ops.attention_decode(q, k, v, valid, scale=0.3, backend="cuda")
    assert_close(out, attention_decode_ref(q, k, v, valid, scale=0.3), dtype, "o (dispatch)")


def test_attention_grad_of_some_inputs_only(device, small_attention_blocks):
    t, kw = make(device, 1, 21, 2, 1, 16, 8, True, None, 2, torch.float32)
    for name in ("k", "v"):
        t[name] = t[name].detach()
    for name in ("k_fading", "v_fading", "k_memory"):
        kw[name] = kw[name].detach()
    o = bmojo_attention(**t, **kw)
    o_ref = bmojo_attention_ref(**t, **kw)
    cot = [torch.randn_like(o_ref)]
    ins = [t["q"], kw["v_memory"]]
    for n, go, gr in zip(("q", "v_memory"), grads([o], cot, ins), grads([o_ref], cot, ins)):
        assert_close(go, gr, torch.float32, f"d{n}")
