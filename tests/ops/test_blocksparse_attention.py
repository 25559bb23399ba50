"""The torch backend's banded B'MOJO attention against the reference: the paths small shapes do not reach
on their own (several query-block groups, groups crossing segments, batch rows, the fading-free head
groups, the inference path with its in-place ops, the gathering kernel kept for XLA / Neuron)."""
from __future__ import annotations

import pytest
import torch

import bmojo.ops as ops
from bmojo.ops.attention import blocksparse
from test_torch_backend import _attn_inputs, _check_attention, _close

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
    return lambda **a: blocksparse.bmojo_attention_blocksparse(**a, block_size=bs, score_budget=budget)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("split_head", [False, True])
def test_groups_forward_and_gradients(case, budget, split_head, monkeypatch):
    """Autograd path: outputs, lse and every gradient, whatever the grouping."""
    monkeypatch.setattr(blocksparse, "HEAD_SPLIT_WORK", 0 if split_head else 2**62)
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
    monkeypatch.setattr(blocksparse, "HEAD_SPLIT_WORK", 0 if split_head else 2**62)
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
        o = blocksparse.bmojo_attention_blocksparse(q, k, v, window=8, block_size=8)
    assert torch.equal(q, q0)
    _close(o, ops.bmojo_attention_ref(q, k, v, window=8), torch.float32, "o")


@pytest.mark.parametrize("case", CASES)
def test_gathering_kernel(case):
    """The gathering kernel the XLA / Neuron devices still run."""
    b, T, Hq, Hkv, D, w, m_f, fading, m_e, invalid, bs = case
    t = _attn_inputs(b, T, Hq, Hkv, D, w, fading, m_e, invalid, torch.float32, seed=T)

    def gathered(q, k, v, window, fading_window=None, k_fading=None, v_fading=None, k_memory=None,
                 v_memory=None, memory_valid=None, return_lse=False):
        m = window if fading_window is None else fading_window
        return blocksparse._gathered(q, k, v, window, k_fading, v_fading, m, k_memory, v_memory, memory_valid,
                                     q.shape[-1] ** -0.5, return_lse, blocksparse._pick_block(window, bs))

    _check_attention(t, dict(window=w, fading_window=m_f, return_lse=True), torch.float32, fast=gathered)


def test_long_sequence_several_groups_spot_check():
    """T = 4096, w = 64 with the default budget: many groups; a late query against an explicit softmax
    over its window, fading and memory keys."""
    T, w, m_e = 4096, 64, 4
    g = torch.Generator().manual_seed(0)
    q, k, v, kf, vf = (torch.randn(2, T, 2, 16, generator=g) for _ in range(5))
    km, vm = (torch.randn(2, T // w, m_e, 2, 16, generator=g) for _ in range(2))
    with torch.no_grad():
        o = blocksparse.bmojo_attention_blocksparse(q, k, v, window=w, k_fading=kf, v_fading=vf, k_memory=km,
                                                    v_memory=vm, score_budget=2**16)
    for bi, t, h in ((1, T - 5, 1), (0, 3 * w + 7, 0)):
        keys = torch.cat([k[bi, t - w + 1 : t + 1, h], kf[bi, t - 2 * w + 1 : t - w + 1, h], km[bi, t // w, :, h]])
        vals = torch.cat([v[bi, t - w + 1 : t + 1, h], vf[bi, t - 2 * w + 1 : t - w + 1, h], vm[bi, t // w, :, h]])
        p = torch.softmax(keys @ q[bi, t, h] / 4.0, 0)
        torch.testing.assert_close(o[bi, t, h], p @ vals, rtol=1e-5, atol=1e-5)
