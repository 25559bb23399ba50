"""The torch backend's attention (``bmojo.backends.torch.attention``) against the oracle: B'MOJO / sliding-window /
full causal attention (forward, lse and every gradient), the banded kernel's paths small shapes do not reach on
their own (several query-block groups, groups crossing segments, batch rows, the fading-free head groups, the
inference path with its in-place ops), the gathering kernel registered for XLA / Neuron, and the decoding step.

Shapes are kept small because the reference is slow (a (T, T) mask).
"""
from __future__ import annotations

import math

import pytest
import torch

import bmojo.ops as ops
from bmojo.backends.torch.attention import parallel
from bmojo.backends.torch.attention.decode import attention_decode_torch
from bmojo.backends.torch.attention.parallel import bmojo_attention_blocksparse, bmojo_attention_gathered
from torch_testutils import _attn_inputs, _check_attention, _close


# ----------------------------------------------------------------------------- B'MOJO attention

ATTN_CASES = [
    # (b, T, Hq, Hkv, D, window, fading_window, fading, m_e, invalid)
    (2, 37, 4, 2, 8, 8, 5, True, 3, True),     # GQA, all memories, w does not divide T
    (1, 130, 2, 2, 16, 16, None, True, 4, True),  # m_f defaults to w, several blocks
    (1, 7, 3, 1, 8, 16, 16, True, 2, False),   # T < w, one chunk, memory_valid None
    (2, 63, 4, 1, 8, 12, 0, True, 2, True),    # fading_window 0: fading keys never visible
    (1, 40, 2, 1, 8, 8, 20, False, 0, False),  # k_fading None, k_memory None (sliding window)
    (1, 1, 2, 1, 8, 4, 2, True, 2, True),      # T = 1
    (2, 33, 4, 2, 8, None, None, False, 0, False),  # full causal
]


@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("return_lse", [False, True])
def test_bmojo_attention_fp32(case, return_lse):
    b, T, Hq, Hkv, D, w, m_f, fading, m_e, invalid = case
    t = _attn_inputs(b, T, Hq, Hkv, D, w, fading, m_e, invalid, torch.float32)
    _check_attention(t, dict(window=w, fading_window=m_f, return_lse=return_lse), torch.float32)


@pytest.mark.parametrize("block_size, window", [(3, 7), (4, 11), (2, 5), (4, 9), (64, 3)])
def test_bmojo_attention_block_shapes(block_size, window):
    """Query blocks that straddle memory chunks (no divisor of w near the target: 7, 11, 5), a divisor
    of w (9 -> 3) and a window smaller than the target (one block per window)."""
    t = _attn_inputs(2, 29, 4, 2, 8, window, True, 3, True, torch.float32, seed=block_size)
    _check_attention(t, dict(window=window, fading_window=4, return_lse=True), torch.float32,
                     fast=lambda **a: bmojo_attention_blocksparse(**a, block_size=block_size))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [8, None])
def test_bmojo_attention_low_precision(dtype, window):
    t = _attn_inputs(2, 45, 4, 2, 16, window or 8, window is not None, 3 if window else 0, True, dtype)
    _check_attention(t, dict(window=window, fading_window=6, return_lse=True), dtype)


def test_bmojo_attention_custom_scale():
    t = _attn_inputs(1, 20, 2, 1, 8, 6, True, 2, True, torch.float32)
    _check_attention(t, dict(window=6, scale=0.3, return_lse=True), torch.float32)


def test_bmojo_attention_long_sequence_is_not_quadratic():
    """T = 16384 with w = 16: the reference's (T, 2T) scores would need ~2 GB per head; this needs MBs."""
    T, w = 16384, 16
    q, k, v, kf, vf = (torch.randn(1, T, 1, 8) for _ in range(5))
    o = ops.bmojo_attention(q, k, v, window=w, k_fading=kf, v_fading=vf, fading_window=w, backend="torch")
    # spot-check a late query against an explicit softmax over its 2w visible keys
    t = T - 3
    keys = torch.cat([k[0, t - w + 1 : t + 1, 0], kf[0, t - 2 * w + 1 : t - w + 1, 0]])
    vals = torch.cat([v[0, t - w + 1 : t + 1, 0], vf[0, t - 2 * w + 1 : t - w + 1, 0]])
    p = torch.softmax(keys @ q[0, t, 0] / math.sqrt(8), 0)
    torch.testing.assert_close(o[0, t, 0], p @ vals, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the banded kernel's groups, the gathering kernel

CASES = [
    # (b, T, Hq, Hkv, D, window, fading_window, fading, m_e, invalid, block_size)
    (3, 50, 4, 2, 8, 8, 6, True, 3, True, 4),     # batch rows, GQA, 13 blocks a segment, Bq does not divide T
    (2, 37, 2, 2, 8, 12, None, True, 2, True, 4),  # m_f = w, fading-free head of 3 blocks, 3 chunks
    (2, 61, 3, 1, 8, 7, 9, True, 2, True, 3),     # blocks straddle memory chunks (3 does not divide 7), m_f > w
    (1, 9, 2, 1, 8, 16, None, True, 2, False, 4),  # T < w: no block sees a fading key
    (2, 45, 2, 1, 8, 8, 0, True, 0, False, 4),    # m_f = 0 and no memory: the sliding window alone
]
# one block per group; a few blocks per group, crossing segment boundaries; everything in one group
BUDGETS = [1, 3000, None]


def _kernel(case, budget):
    bs = case[-1]
    return lambda **a: parallel.bmojo_attention_blocksparse(**a, block_size=bs, score_budget=budget)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("split_head", [False, True])
def test_groups_forward_and_gradients(case, budget, split_head, monkeypatch):
    """Autograd path: outputs, lse and every gradient, whatever the grouping."""
    monkeypatch.setattr(parallel, "HEAD_SPLIT_WORK", 0 if split_head else 2**62)
    b, T, Hq, Hkv, D, w, m_f, fading, m_e, invalid, _ = case
    t = _attn_inputs(b, T, Hq, Hkv, D, w, fading, m_e, invalid, torch.float32, seed=T)
    _check_attention(t, dict(window=w, fading_window=m_f, return_lse=True), torch.float32,
                     fast=_kernel(case, budget))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("split_head", [False, True])
@pytest.mark.parametrize("return_lse", [False, True])
def test_inference_path(case, budget, split_head, return_lse, monkeypatch):
    """No-grad path (scores written in place into one reused buffer, in-place softmax): same outputs,
    and the inputs are left untouched."""
    monkeypatch.setattr(parallel, "HEAD_SPLIT_WORK", 0 if split_head else 2**62)
    b, T, Hq, Hkv, D, w, m_f, fading, m_e, invalid, _ = case
    t = _attn_inputs(b, T, Hq, Hkv, D, w, fading, m_e, invalid, torch.float32, seed=T)
    t = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in t.items()}
    before = {n: x.clone() for n, x in t.items() if isinstance(x, torch.Tensor)}
    kw = dict(window=w, fading_window=m_f, return_lse=return_lse)
    with torch.no_grad():
        got = _kernel(case, budget)(**t, **kw)
    want = ops.bmojo_attention_ref(**t, **kw)
    got, want = (got, want) if return_lse else ((got,), (want,))
    for name, a, e in zip(("o", "lse"), got, want):
        _close(a, e, torch.float32, name)
    for n, x in before.items():
        assert torch.equal(t[n], x), f"{n} was modified"


def test_inference_path_single_head_layout_is_not_written():
    """b = 1, one head: the query relayout is a pure view of q, so pre-scaling must not be in place."""
    q, k, v = (torch.randn(1, 24, 1, 8) for _ in range(3))
    q0 = q.clone()
    with torch.no_grad():
        o = parallel.bmojo_attention_blocksparse(q, k, v, window=8, block_size=8)
    assert torch.equal(q, q0)
    _close(o, ops.bmojo_attention_ref(q, k, v, window=8), torch.float32, "o")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("return_lse", [False, True])
def test_gathering_kernel(case, return_lse):
    """The gathering kernel, registered for the devices without cheap overlapping views (XLA / Neuron)."""
    b, T, Hq, Hkv, D, w, m_f, fading, m_e, invalid, bs = case
    t = _attn_inputs(b, T, Hq, Hkv, D, w, fading, m_e, invalid, torch.float32, seed=T)
    _check_attention(t, dict(window=w, fading_window=m_f, return_lse=return_lse), torch.float32,
                     fast=lambda **a: bmojo_attention_gathered(**a, block_size=bs))


def test_long_sequence_several_groups_spot_check():
    """T = 4096, w = 64 with the default budget: many groups; a late query against an explicit softmax
    over its window, fading and memory keys."""
    T, w, m_e = 4096, 64, 4
    g = torch.Generator().manual_seed(0)
    q, k, v, kf, vf = (torch.randn(2, T, 2, 16, generator=g) for _ in range(5))
    km, vm = (torch.randn(2, T // w, m_e, 2, 16, generator=g) for _ in range(2))
    with torch.no_grad():
        o = parallel.bmojo_attention_blocksparse(q, k, v, window=w, k_fading=kf, v_fading=vf, k_memory=km,
                                                    v_memory=vm, score_budget=2**16)
    for bi, t, h in ((1, T - 5, 1), (0, 3 * w + 7, 0)):
        keys = torch.cat([k[bi, t - w + 1 : t + 1, h], kf[bi, t - 2 * w + 1 : t - w + 1, h], km[bi, t // w, :, h]])
        vals = torch.cat([v[bi, t - w + 1 : t + 1, h], vf[bi, t - 2 * w + 1 : t - w + 1, h], vm[bi, t // w, :, h]])
        p = torch.softmax(keys @ q[bi, t, h] / 4.0, 0)
        torch.testing.assert_close(o[bi, t, h], p @ vals, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- decoding step

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, Hq, Hkv, S", [(1, 4, 1, 37), (3, 4, 2, 1), (2, 6, 3, 129), (2, 2, 2, 64)])
def test_attention_decode_matches_reference(dtype, b, Hq, Hkv, S):
    """GQA groups as stacked rows over a permuted view of the cache == the reference's repeated heads,
    with invalid slots (each row keeps at least one valid key) and a non-contiguous cache slice."""
    g = torch.Generator().manual_seed(S + Hq)
    D = 16
    q = torch.randn(b, Hq, D, generator=g).to(dtype)
    cache_k = torch.randn(b, S + 5, Hkv, D, generator=g).to(dtype)
    cache_v = torch.randn(b, S + 5, Hkv, D, generator=g).to(dtype)
    k, v = cache_k[:, :S], cache_v[:, :S]  # how the growing KV cache is read
    valid = torch.rand(b, S, generator=g) < 0.7
    valid[:, 0] = True
    for va, scale in ((valid, None), (None, 0.3)):
        want = ops.attention_decode_ref(q, k, v, va, scale=scale)
        got = attention_decode_torch(q, k, v, va, scale=scale)
        assert got.dtype == dtype and got.shape == (b, Hq, D)
        tol = 1e-5 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 2e-3)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_attention_decode_segments_equal_the_concatenated_cache():
    """A cache given as segments (window ring, fading ring, slots) reads like their concatenation, on the
    torch backend (read in place; a backend without segment support gets them concatenated, with a
    warning: tests/test_dispatch.py)."""
    g = torch.Generator().manual_seed(3)
    b, Hq, Hkv, D = 2, 4, 2, 8
    sizes = (5, 3, 7)
    ks = tuple(torch.randn(b, n, Hkv, D, generator=g) for n in sizes)
    vs = tuple(torch.randn(b, n, Hkv, D, generator=g) for n in sizes)
    valids = tuple(torch.rand(b, n, generator=g) < 0.6 for n in sizes)
    valids[0][:, 0] = True
    q = torch.randn(b, Hq, D, generator=g)
    want = ops.attention_decode_ref(q, torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(valids, 1))
    torch.testing.assert_close(ops.attention_decode(q, ks, vs, valids, backend="torch"), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.attention_decode(q, ks, vs, None, backend="torch"),
                               ops.attention_decode_ref(q, torch.cat(ks, 1), torch.cat(vs, 1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_decode_torch(q, ks, vs, valids), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number of segments"):
        ops.attention_decode(q, ks, vs[:2], valids, backend="torch")
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 8\)"):
        ops.attention_decode(q, ks, (vs[0], vs[1][:, :, :1].expand(-1, -1, 2, -1).contiguous()[:, :2], vs[2]),
                             backend="torch")
