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


# ----------------------------------------------------------------------------- the fading keys' own queries

QF_CASES = [
    # (b, T, Hq, Hkv, D, window, fading_window, m_e, invalid, block_size)
    (2, 37, 4, 2, 8, 8, 5, 3, True, 4),      # GQA, odd T, m_f < w, memory (blocks straddle nothing)
    (2, 61, 3, 1, 8, 7, 9, 2, True, 3),      # m_f > w, blocks straddle memory chunks, several groups
    (1, 7, 3, 1, 8, 16, 16, 2, False, 64),   # T < w: no query sees a fading key (q_fading unused)
    (2, 45, 2, 1, 8, 6, 13, 0, False, 4),    # m_f > 2w, no memory
    (1, 30, 2, 2, 8, 8, 0, 2, True, 4),      # m_f = 0: fading keys never visible
    (1, 1, 2, 1, 8, 4, 2, 2, True, 64),      # T = 1
]


def _qf_inputs(case, seed=None):
    b, T, Hq, Hkv, D, w, m_f, m_e, invalid, _ = case
    return _attn_inputs(b, T, Hq, Hkv, D, w, True, m_e, invalid, torch.float32, seed=T if seed is None else seed,
                        q_fading=True)


def test_q_fading_changes_what_the_reference_computes():
    """The oracle scores the fading keys with q_fading: a different q_fading changes the output exactly where a
    query sees a fading key, and q_fading = q is the single-query op."""
    t = _qf_inputs(QF_CASES[0])
    kw = dict(window=8, fading_window=5)
    base = {n: x for n, x in t.items() if n != "q_fading"}
    with torch.no_grad():
        o = ops.bmojo_attention_ref(**t, **kw)
        torch.testing.assert_close(ops.bmojo_attention_ref(**base, **kw, q_fading=t["q"]), ops.bmojo_attention_ref(**base, **kw))
        changed = (o - ops.bmojo_attention_ref(**base, **kw)).abs().amax((0, 2, 3)) > 1e-6  # per query position
    assert not changed[:8].any() and changed[8:].all()  # queries t >= w see fading keys


@pytest.mark.parametrize("case", QF_CASES)
@pytest.mark.parametrize("kernel", ["op", "banded", "banded_split", "gathered"])
def test_q_fading_forward_and_gradients(case, kernel, monkeypatch):
    """Autograd path of the fresh kernels with q_fading: o, lse and every gradient (d q_fading included)."""
    bs = case[-1]
    fast = {
        "op": lambda **a: ops.bmojo_attention(**a, backend="torch"),
        "banded": lambda **a: bmojo_attention_blocksparse(**a, block_size=bs, score_budget=3000),
        "banded_split": lambda **a: bmojo_attention_blocksparse(**a, block_size=bs, score_budget=1),
        "gathered": lambda **a: bmojo_attention_gathered(**a, block_size=bs),
    }[kernel]
    monkeypatch.setattr(parallel, "HEAD_SPLIT_WORK", 0 if kernel == "banded_split" else 2**62)
    t = _qf_inputs(case)
    _check_attention(t, dict(window=case[5], fading_window=case[6], return_lse=True), torch.float32, fast=fast)


@pytest.mark.parametrize("case", QF_CASES)
@pytest.mark.parametrize("budget", [1, None])
@pytest.mark.parametrize("return_lse", [False, True])
def test_q_fading_inference_path(case, budget, return_lse):
    """The banded kernel's no-grad path (in-place scores) with q_fading; no input is modified."""
    t = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in _qf_inputs(case).items()}
    before = {n: x.clone() for n, x in t.items() if isinstance(x, torch.Tensor)}
    kw = dict(window=case[5], fading_window=case[6], return_lse=return_lse)
    with torch.no_grad():
        got = bmojo_attention_blocksparse(**t, **kw, block_size=case[-1], score_budget=budget)
    want = ops.bmojo_attention_ref(**t, **kw)
    got, want = (got, want) if return_lse else ((got,), (want,))
    for name, a, e in zip(("o", "lse"), got, want):
        _close(a, e, torch.float32, name)
    for n, x in before.items():
        assert torch.equal(t[n], x), f"{n} was modified"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_q_fading_low_precision(dtype):
    t = _attn_inputs(2, 45, 4, 2, 16, 8, True, 3, True, dtype, q_fading=True)
    _check_attention(t, dict(window=8, fading_window=6, return_lse=True), dtype)


def test_q_fading_needs_fading_keys():
    """Full causal attention (and any call without fading keys) has no fading keys to score: refused by the
    op, the kernels and the oracle."""
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    for fn in (ops.bmojo_attention, bmojo_attention_blocksparse, bmojo_attention_gathered, ops.bmojo_attention_ref):
        for kw in (dict(window=None), dict(window=4)):
            with pytest.raises(ValueError, match="q_fading"):
                fn(q, k, v, q_fading=torch.randn(1, 9, 2, 8), **kw)
    with pytest.raises(ValueError, match="q_fading must be shaped like q"):
        ops.bmojo_attention(q, k, v, window=4, k_fading=k, v_fading=v, q_fading=q[:, :, :1])
    with pytest.raises(ValueError, match="q_fading must be shaped like q"):
        ops.bmojo_attention(q, k, v, window=4, k_fading=k, v_fading=v, q_fading=q.double())


# ----------------------------------------------------------------------------- keys before the queries (q_start)

RESUME_CASES = [
    # (b, T, Hq, Hkv, D, window, fading_window, m_e, starts, block_size[, (keys, fading keys) before the queries])
    (2, 13, 4, 2, 8, 8, 5, 3, (3, 21), 64),    # GQA, odd T, a short history (row 0: 3 earlier tokens)
    (2, 5, 2, 1, 8, 8, 12, 2, (0, 9), 64),     # T < w, m_f > w, row 0 from position 0 (every earlier key absent)
    (1, 1, 2, 2, 8, 4, 4, 2, (17,), 64),       # one token
    (2, 29, 3, 1, 8, 7, 9, 2, (5, 40), 3),     # several blocks, blocks straddle memory chunks, short history
    (2, 20, 2, 1, 8, 6, 0, 0, (11, 2), 4),     # m_f = 0, no memory
    (1, 17, 2, 1, 8, 4, 3, 1, (6,), 4),        # m_f < w, more memory chunks than needed
    (2, 5, 2, 1, 16, 4, 3, 0, (5, 30), 64, (2, 4)),  # fewer keys given than the bands reach back: the rest absent
    (1, 11, 2, 1, 8, 6, 9, 2, (20,), 4, (0, 3)),     # no earlier key, 3 earlier fading keys, several blocks
    (2, 19, 4, 2, 8, 8, 5, 2, (16, 40), 4),    # starts on block boundaries: no block crosses a memory chunk
    # m_f = w: window and fading row blocks interleaved in one group (unless q_fading scores the fading keys)
    (1, 24, 2, 2, 8, 8, 8, 0, (16,), 4, (8, 8)),     # a full window, the fading keys of its tokens only
    (2, 29, 4, 2, 8, 8, 8, 2, (5, 40), 4),     # GQA, T > w, memory, row 0 with keys at negative positions
    (2, 11, 2, 1, 8, 8, 8, 0, (3, 30), 4, (2, 13)),  # fading keys reach back further than the window's
    (1, 10, 2, 2, 8, 8, 8, 2, (20,), 4, (8, 2)),     # the window reaches back further than the fading keys
    (2, 13, 2, 1, 8, 12, 12, 1, (7, 19), 64, (12, 5)),  # one block of 12 (the window)
]


def _resume_inputs(case, q_fading, dtype=torch.float32):
    """A decoding state's window (w keys) and fading keys (m_f + w) before T new tokens (or as many as the
    case says), the memory of the chunks from the first query's (one spare chunk in one case); rows at
    their own positions."""
    b, T, Hq, Hkv, D, w, m_f, m_e, starts, bs = case[:10]
    Pk, Pf = case[10] if len(case) > 10 else (w, m_f + w)
    g = torch.Generator().manual_seed(T + w)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    t = dict(q=r(b, T, Hq, D), k=r(b, Pk + T, Hkv, D), v=r(b, Pk + T, Hkv, D),
             k_fading=r(b, Pf + T, Hkv, D), v_fading=r(b, Pf + T, Hkv, D))
    if q_fading:
        t["q_fading"] = r(b, T, Hq, D)
    if m_e:
        n = (T + w - 2) // w + 1 + (bs == 4 and b == 1 and T == 17)
        t.update(k_memory=r(b, n, m_e, Hkv, D), v_memory=r(b, n, m_e, Hkv, D))
        t["memory_valid"] = torch.rand(b, n, m_e, generator=g) > 0.3
    t["q_start"] = torch.tensor(starts)
    return t


@pytest.mark.parametrize("case", RESUME_CASES)
@pytest.mark.parametrize("q_fading", [False, True])
@pytest.mark.parametrize("kernel", ["op", "banded", "gathered"])
def test_resumed_forward_and_gradients(case, q_fading, kernel):
    """q_start (tokens after a decoding state), with and without the fading keys' own queries: o, lse and
    every gradient against the oracle; both registered entry points take the same path."""
    bs = case[9]
    fast = {
        "op": lambda **a: ops.bmojo_attention(**a, backend="torch"),
        "banded": lambda **a: bmojo_attention_blocksparse(**a, block_size=bs, score_budget=2000),
        "gathered": lambda **a: bmojo_attention_gathered(**a, block_size=bs),
    }[kernel]
    t = _resume_inputs(case, q_fading)
    _check_attention(t, dict(window=case[5], fading_window=case[6], return_lse=True), torch.float32, fast=fast)


@pytest.mark.parametrize("host_starts", [True, False], ids=["host-starts", "device-starts"])
@pytest.mark.parametrize("case", RESUME_CASES)
@pytest.mark.parametrize("q_fading", [False, True])
@pytest.mark.parametrize("budget", [1, None])
def test_resumed_inference_path(case, q_fading, budget, host_starts, monkeypatch):
    """The inference path, with the rows' starts read on the host (CPU: key biases skipped where every
    row holds a key) or not (other devices: every band biased)."""
    if not host_starts:
        monkeypatch.setattr(parallel, "_host_min", lambda start: None)
        monkeypatch.setattr(parallel, "_chunks_per_block", lambda *a: 2)
    t = {n: x.detach() for n, x in _resume_inputs(case, q_fading).items()}
    before = {n: x.clone() for n, x in t.items()}
    kw = dict(window=case[5], fading_window=case[6], return_lse=True)
    with torch.no_grad():
        got = bmojo_attention_blocksparse(**t, **kw, block_size=case[9], score_budget=budget)
    want = ops.bmojo_attention_ref(**t, **kw)
    for name, a, e in zip(("o", "lse"), got, want):
        _close(a, e, torch.float32, name)
    for n, x in before.items():
        assert torch.equal(t[n], x), f"{n} was modified"


@pytest.mark.parametrize("host_starts", [True, False], ids=["host-starts", "device-starts"])
@pytest.mark.parametrize("starts", [(7, 9), (3, 12), (0, 0)], ids=["all-keys", "some-absent", "none-before"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_full_causal_resumed(starts, return_lse, host_starts, monkeypatch):
    """window=None after a cache of 7 slots (a row starting before 7 has padding slots, whose keys do not
    exist): the mask built per row, or the one lower-right causal mask when every key exists (queries in
    blocks of 4 here, the last one partial, each over the keys up to its last query)."""
    monkeypatch.setattr(parallel, "FULL_RESUME_BLOCK", 4)
    if not host_starts:
        monkeypatch.setattr(parallel, "_host_min", lambda start: None)
    g = torch.Generator().manual_seed(3)
    P = 0 if starts == (0, 0) else 7
    q = torch.randn(2, 11, 4, 8, generator=g)
    k, v = (torch.randn(2, P + 11, 2, 8, generator=g) for _ in range(2))
    kw = dict(window=None, q_start=torch.tensor(starts), return_lse=return_lse)
    with torch.no_grad():
        got, want = bmojo_attention_blocksparse(q, k, v, **kw), ops.bmojo_attention_ref(q, k, v, **kw)
    got, want = (got, want) if return_lse else ((got,), (want,))
    for name, a, e in zip(("o", "lse"), got, want):
        _close(a, e, torch.float32, name)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_per_segment_queries(dtype):
    """One query per segment (window ring with q, fading ring with q_fading, slots with q): one softmax over
    all segments, each scored with its own query; against the oracle, and the oracle against an explicit
    softmax."""
    g = torch.Generator().manual_seed(5)
    b, Hq, Hkv, D = 2, 4, 2, 8
    sizes = (5, 3, 7)
    ks = tuple(torch.randn(b, n, Hkv, D, generator=g).to(dtype) for n in sizes)
    vs = tuple(torch.randn(b, n, Hkv, D, generator=g).to(dtype) for n in sizes)
    valids = tuple(torch.rand(b, n, generator=g) < 0.6 for n in sizes)
    valids[0][:, 0] = True
    q, qf = (torch.randn(b, Hq, D, generator=g).to(dtype) for _ in range(2))
    qs = (q, qf, q)
    want = ops.attention_decode_ref(qs, ks, vs, valids)
    # the oracle: scores of segment i with query i, masked, one softmax
    rep = lambda x: x.float().repeat_interleave(Hq // Hkv, 2)  # noqa: E731
    sc = torch.cat([torch.einsum("bhd,bshd->bhs", qi.float(), rep(ki)) for qi, ki in zip(qs, ks)], -1) / math.sqrt(D)
    sc = sc.masked_fill(~torch.cat(valids, 1)[:, None], float("-inf"))
    explicit = torch.einsum("bhs,bshd->bhd", torch.softmax(sc, -1), rep(torch.cat(vs, 1)))
    torch.testing.assert_close(want.float(), explicit.to(dtype).float(), atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got in (attention_decode_torch(qs, ks, vs, valids), ops.attention_decode(qs, ks, vs, valids, backend="torch"),
                ops.attention_decode(list(qs), list(ks), list(vs), list(valids), backend="torch")):
        assert got.dtype == dtype and got.shape == (b, Hq, D)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # no mask, custom scale; the same query for every segment is the single-query decode
    torch.testing.assert_close(ops.attention_decode(qs, ks, vs, None, scale=0.3, backend="torch").float(),
                               ops.attention_decode_ref(qs, ks, vs, None, scale=0.3).float(), atol=tol, rtol=tol)
    torch.testing.assert_close(ops.attention_decode((q, q, q), ks, vs, valids, backend="torch"),
                               ops.attention_decode(q, ks, vs, valids, backend="torch"))
    _, p = ops.attention_decode_weights_ref(qs, ks, vs, valids)
    torch.testing.assert_close(p.sum(-1), torch.ones(b, Hq))
    # one segment given as a tensor takes a 1-tuple of queries
    torch.testing.assert_close(ops.attention_decode((qf,), ks[0], vs[0], valids[0], backend="torch"),
                               ops.attention_decode(qf, ks[0], vs[0], valids[0], backend="torch"))


def test_attention_decode_per_segment_queries_gradients():
    """The decode step's gradients w.r.t. every query and segment (the torch backend is autograd's)."""
    g = torch.Generator().manual_seed(6)
    b, Hq, Hkv, D = 2, 4, 1, 8
    ks = [torch.randn(b, n, Hkv, D, generator=g).requires_grad_() for n in (4, 6)]
    vs = [torch.randn(b, n, Hkv, D, generator=g).requires_grad_() for n in (4, 6)]
    qs = [torch.randn(b, Hq, D, generator=g).requires_grad_() for _ in range(2)]
    cot = torch.randn(b, Hq, D, generator=g)
    ins = qs + ks + vs
    got = torch.autograd.grad((attention_decode_torch(tuple(qs), tuple(ks), tuple(vs)) * cot).sum(), ins)
    want = torch.autograd.grad((ops.attention_decode_ref(tuple(qs), tuple(ks), tuple(vs)) * cot).sum(), ins)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_attention_decode_per_segment_queries_are_checked():
    q = torch.randn(2, 4, 8)
    ks = (torch.randn(2, 3, 2, 8), torch.randn(2, 5, 2, 8))
    with pytest.raises(ValueError, match="one query per key segment"):
        ops.attention_decode((q, q, q), ks, ks, backend="torch")
    with pytest.raises(ValueError, match="one query per key segment"):
        ops.attention_decode((q, q), ks[0], ks[0], backend="torch")
    with pytest.raises(ValueError, match="one shape and dtype"):
        ops.attention_decode((q, q[:, :2]), ks, ks, backend="torch")
    with pytest.raises(ValueError, match="one shape and dtype"):
        ops.attention_decode((q, q.double()), ks, ks, backend="torch")
