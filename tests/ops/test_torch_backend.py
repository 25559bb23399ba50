"""The torch backend's fast ops against the naive references (the oracle): forward and every gradient.

Shapes are kept small because the references are slow (a Python loop over T, a (T, T) mask).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bmojo.ops as ops
from bmojo.ops import registry
from bmojo.ops.attention.blocksparse import bmojo_attention_blocksparse
from bmojo.ops.causal_conv1d.torch_conv import causal_conv1d_torch
from bmojo.ops.selective_scan.chunk import scan_inplace_, selective_scan_chunked

# fp32: both sides compute in fp32, so only summation order differs. Low precision: both compute in
# fp32 from the same inputs, so outputs and gradients differ by about one rounding of the dtype.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -6),
    torch.float16: dict(rtol=2 ** -9, atol=2 ** -9),
}


def _close(actual, expected, dtype, name, scale=1.0):
    """assert_close with the dtype's tolerance, the absolute part scaled by the reference's magnitude."""
    if expected is None:
        assert actual is None or torch.count_nonzero(actual) == 0, name
        return
    assert actual is not None, f"{name}: no gradient"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    tol = TOL[dtype]
    mag = max(expected.float().abs().amax().item() if expected.numel() else 0.0, 1.0) * scale
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * mag,
                               msg=lambda m: f"{name}: {m}")


def _fwd_bwd(fn, inputs, *args, **kw):
    """Outputs of fn and the gradients of a fixed random projection of them w.r.t. every input."""
    out = fn(*args, **kw)
    out = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1234)
    # torch.randn(shape), not randn_like: outputs may be non-contiguous views
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in out)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in out], list(grads)


# ----------------------------------------------------------------------------- the scan primitive

@pytest.mark.parametrize("reverse", [False, True])
def test_scan_inplace_matches_loop(reverse):
    for L in range(1, 19):
        m, u = torch.rand(2, max(L - 1, 0), 3), torch.randn(2, L, 3)
        want, h = [None] * L, torch.zeros(2, 3)
        order = reversed(range(L)) if reverse else range(L)
        for step, t in enumerate(order):
            h = u[:, t] + (0 if step == 0 else m[:, t if reverse else t - 1] * h)
            want[t] = h
        got = scan_inplace_(m.clone(), u.clone(), reverse=reverse)
        torch.testing.assert_close(got, torch.stack(want, 1), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- selective scan

def _scan_inputs(b, T, d, N, G, dtype, extras, dt_scale=None, seed=0):
    """Realistic Mamba-1 inputs: dt' = softplus(dt + dt_bias) in about [1e-3, 0.1], A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    dt_target = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt_target + torch.log(-torch.expm1(-dt_target))  # inverse softplus
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1)
    bc_shape = (b, T, N) if G is None else (b, T, G, N)
    t = dict(
        x=torch.randn(b, T, d, generator=g),
        dt=0.5 * torch.randn(b, T, d, generator=g),
        A=A,
        B=torch.randn(bc_shape, generator=g),
        C=torch.randn(bc_shape, generator=g),
    )
    if dt_scale is not None:  # huge decays: dt' = softplus(dt_scale) for every token
        t["dt"] = torch.full((b, T, d), float(dt_scale))
    if extras:
        t.update(D=torch.randn(d, generator=g), z=torch.randn(b, T, d, generator=g),
                 dt_bias=dt_bias if dt_scale is None else torch.zeros(d),
                 initial_state=torch.randn(b, d, N, generator=g))
    for k_ in ("x", "dt", "B", "C", "z"):
        if k_ in t:
            t[k_] = t[k_].to(dtype)
    return {k_: v.requires_grad_() for k_, v in t.items()}


def _run_scan(fn, t):
    names = list(t)
    y, h = fn(**t, return_final_state=True)
    return _fwd_bwd(lambda: (y, h), [t[n] for n in names]), names


def _check_scan(t, dtype, chunk_size=None):
    fast = (lambda **k: selective_scan_chunked(**k, chunk_size=chunk_size)) if chunk_size else \
        (lambda **k: ops.selective_scan(**k, backend="torch"))
    (out_f, g_f), names = _run_scan(fast, t)
    (out_r, g_r), _ = _run_scan(ops.selective_scan_ref, t)
    _close(out_f[0], out_r[0], dtype, "y")
    _close(out_f[1], out_r[1], torch.float32 if dtype == torch.float32 else dtype, "final_state")
    assert out_f[1].dtype == torch.float32 and out_f[0].dtype == dtype
    for n, a, e in zip(names, g_f, g_r):
        _close(a, e, dtype, f"d{n}")


@pytest.mark.parametrize("T", [1, 7, 64, 128, 130, 257])
@pytest.mark.parametrize("G", [None, 2])
@pytest.mark.parametrize("extras", [False, True])
def test_selective_scan_fp32(T, G, extras):
    """Through the API (default chunk 128): T < chunk, T == chunk, a ragged last chunk of 2, two
    boundaries and a last chunk of 1; grouped B/C."""
    from bmojo.ops.selective_scan.chunk import DEFAULT_CHUNK
    assert DEFAULT_CHUNK == 128, "update the lengths above to straddle the new chunk size"
    _check_scan(_scan_inputs(2, T, 8, 16, G, torch.float32, extras), torch.float32)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16])
def test_selective_scan_many_chunks(chunk_size):
    """Small chunks: many boundaries, a ragged last chunk, every scan level length odd and even."""
    _check_scan(_scan_inputs(2, 37, 6, 4, 3, torch.float32, True), torch.float32, chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_scan_low_precision(dtype):
    _check_scan(_scan_inputs(2, 70, 8, 4, None, dtype, True), dtype)


def test_selective_scan_large_decay_stays_finite():
    """dt' = 10, A down to -16: per-step decay exp(-160) underflows to 0, the state is just the input."""
    t = _scan_inputs(1, 130, 4, 16, None, torch.float32, True, dt_scale=10.0)
    _check_scan(t, torch.float32)


def test_selective_scan_no_grad_inputs_and_defaults():
    """No extras, nothing requires grad, dt_softplus=False: plain forward, y only."""
    g = torch.Generator().manual_seed(0)
    x, B, C = torch.randn(1, 20, 4, generator=g), torch.randn(1, 20, 3, generator=g), torch.randn(1, 20, 3, generator=g)
    dt, A = torch.rand(1, 20, 4, generator=g) * 0.1, -torch.rand(4, 3, generator=g)
    y = ops.selective_scan(x, dt, A, B, C, dt_softplus=False, backend="torch")
    torch.testing.assert_close(y, ops.selective_scan_ref(x, dt, A, B, C, dt_softplus=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,dtype,softplus", [(150, torch.float32, True), (257, torch.float32, True),
                                              (257, torch.float32, False), (70, torch.bfloat16, True)])
def test_selective_scan_inference_path(T, dtype, softplus):
    """Under no_grad the scan skips autograd and fuses the dt transform, D skip and z gate per chunk:
    same values and final state as the reference (chunk boundaries, a ragged last chunk, bf16 inputs)."""
    t = {k: v.detach() for k, v in _scan_inputs(2, T, 8, 4, 2, dtype, True).items()}
    if not softplus:  # the caller passes dt' itself (positive)
        t["dt"] = F.softplus(t["dt"].float() + t.pop("dt_bias")).to(dtype)
    want, h_want = ops.selective_scan_ref(**t, dt_softplus=softplus, return_final_state=True)
    with torch.no_grad():
        got, h = ops.selective_scan(**t, dt_softplus=softplus, return_final_state=True, backend="torch")
    assert got.dtype == dtype and h.dtype == torch.float32
    _close(got, want, dtype, "y")
    _close(h, h_want, torch.float32 if dtype == torch.float32 else dtype, "final_state")
    assert h.is_contiguous() and h.shape == (2, 8, 4)


@pytest.mark.parametrize("G", [None, 2])
def test_selective_state_update(G):
    t = {k: v.detach() for k, v in _scan_inputs(3, 6, 8, 4, G, torch.float32, True).items()}
    state_f = t["initial_state"].clone()
    state_r = t["initial_state"].clone()
    for s in range(6):
        step = dict(x=t["x"][:, s], dt=t["dt"][:, s], A=t["A"], B=t["B"][:, s], C=t["C"][:, s], D=t["D"],
                    z=t["z"][:, s], dt_bias=t["dt_bias"])
        y_f = ops.selective_state_update(state_f, **step, backend="torch")
        y_r = ops.selective_state_update_ref(state_r, **step)
        torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state_f, state_r, rtol=1e-5, atol=1e-5)
    # stepping reproduces the parallel scan
    y, h = ops.selective_scan(**t, return_final_state=True, backend="torch")
    torch.testing.assert_close(state_f, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_f, y[:, -1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- causal conv1d

@pytest.mark.parametrize("T", [1, 2, 7, 130])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d(T, K, with_state, dtype):
    b, d = 2, 6
    g = torch.Generator().manual_seed(T * 10 + K)
    x = torch.randn(b, T, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(d, K, generator=g).requires_grad_()
    bias = torch.randn(d, generator=g).requires_grad_()
    h0 = torch.randn(b, d, K - 1, generator=g).to(dtype).requires_grad_() if with_state else None
    inputs = [x, w, bias] + ([h0] if with_state else [])
    act = "silu" if with_state else None
    out_f, g_f = _fwd_bwd(ops.causal_conv1d, inputs, x, w, bias, act, h0, True, backend="torch")
    out_r, g_r = _fwd_bwd(ops.causal_conv1d_ref, inputs, x, w, bias, act, h0, True)
    assert out_f[0].dtype == dtype and out_f[1].shape == (b, d, K - 1)
    _close(out_f[0], out_r[0], dtype, "y")
    torch.testing.assert_close(out_f[1], out_r[1], rtol=0, atol=0)  # the state is a copy of inputs
    for n, a, e in zip(["dx", "dweight", "dbias", "dinitial_state"], g_f, g_r):
        _close(a, e, dtype, n)


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_inference(T, with_state):
    """Under no_grad the activation runs in place on the fresh output: same values and state."""
    g = torch.Generator().manual_seed(T)
    b, d, K = 2, 6, 4
    x, w, bias = torch.randn(b, T, d, generator=g), torch.randn(d, K, generator=g), torch.randn(d, generator=g)
    h0 = torch.randn(b, d, K - 1, generator=g) if with_state else None
    want = ops.causal_conv1d_ref(x, w, bias, "silu", h0, True)
    with torch.no_grad():
        got = ops.causal_conv1d(x, w, bias, "silu", h0, True, backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("K", [1, 4])
def test_causal_conv1d_update(K):
    g = torch.Generator().manual_seed(K)
    b, d, T = 2, 5, 9
    x = torch.randn(b, T, d, generator=g)
    w, bias = torch.randn(d, K, generator=g), torch.randn(d, generator=g)
    st_f = torch.randn(b, d, K - 1, generator=g)
    st_r = st_f.clone()
    y_par, st_par = ops.causal_conv1d(x, w, bias, "silu", st_f.clone(), True, backend="torch")
    for t in range(T):
        y_f = ops.causal_conv1d_update(x[:, t], st_f, w, bias, "silu", backend="torch")
        y_r = ops.causal_conv1d_update_ref(x[:, t], st_r, w, bias, "silu")
        torch.testing.assert_close(y_f, y_r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y_f, y_par[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_f, st_r, rtol=0, atol=0)
    torch.testing.assert_close(st_f, st_par, rtol=0, atol=0)


# ----------------------------------------------------------------------------- B'MOJO attention

def _attn_inputs(b, T, Hq, Hkv, D, w, fading, memory, invalid, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    t = dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D))
    if fading:
        t.update(k_fading=r(b, T, Hkv, D), v_fading=r(b, T, Hkv, D))
    if memory:
        n_chunks = -(-T // w)
        m_e = memory
        t.update(k_memory=r(b, n_chunks, m_e, Hkv, D), v_memory=r(b, n_chunks, m_e, Hkv, D))
        valid = torch.rand(b, n_chunks, m_e, generator=g) > 0.35 if invalid else None
        if valid is not None:
            valid[:, 0] = False  # the first chunk has no eligible position, as in the model
        t["memory_valid"] = valid
    return t


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


def _check_attention(t, kw, dtype, fast=None):
    fast = fast or (lambda **a: ops.bmojo_attention(**a, backend="torch"))
    names = [n for n, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    out_f, g_f = _fwd_bwd(lambda: fast(**t, **kw), [t[n] for n in names])
    out_r, g_r = _fwd_bwd(lambda: ops.bmojo_attention_ref(**t, **kw), [t[n] for n in names])
    assert out_f[0].dtype == dtype and len(out_f) == len(out_r)
    _close(out_f[0], out_r[0], dtype, "o")
    if kw.get("return_lse"):
        assert out_f[1].dtype == torch.float32 and out_f[1].shape == out_r[1].shape
        _close(out_f[1], out_r[1], torch.float32 if dtype == torch.float32 else dtype, "lse")
    for n, a, e in zip(names, g_f, g_r):
        if e is not None and torch.count_nonzero(e) == 0:
            e = None  # a key set that is never visible: the reference's zero gradient may be None here
        _close(a, e, dtype, f"d{n}")


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


# ----------------------------------------------------------------------------- dispatch

def test_torch_backend_uses_fast_implementations():
    fast = {
        "selective_scan": "selective_scan_chunked",
        "selective_state_update": "selective_state_update_step",
        "causal_conv1d": "causal_conv1d_torch",
        "causal_conv1d_update": "causal_conv1d_update_torch",
        "bmojo_attention": "bmojo_attention_blocksparse",
        "attention_decode": "attention_decode_torch",
    }
    for op, name in fast.items():
        assert registry.resolve(op, "torch", torch.device("cpu")).__name__ == name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, Hq, Hkv, S", [(1, 4, 1, 37), (3, 4, 2, 1), (2, 6, 3, 129), (2, 2, 2, 64)])
def test_attention_decode_matches_reference(dtype, b, Hq, Hkv, S):
    """GQA groups as stacked rows over a permuted view of the cache == the reference's repeated heads,
    with invalid slots (each row keeps at least one valid key) and a non-contiguous cache slice."""
    from bmojo.ops.attention.decode import attention_decode_torch

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


def test_selective_scan_exp_decays_off_cpu(monkeypatch):
    """Off CPU the decays are exp(dt A), not exp2 (torch-xla does not lower exp2): that branch, forced
    here, equals the reference forward and every gradient across chunk boundaries."""
    from bmojo.ops.selective_scan import chunk

    monkeypatch.setattr(chunk, "_decay_exponent", lambda A: (A, False))
    _check_scan(_scan_inputs(2, 37, 6, 4, 3, torch.float32, True), torch.float32, 16)


def test_attention_decode_segments_equal_the_concatenated_cache():
    """A cache given as segments (window ring, fading ring, slots) reads like their concatenation, on
    the torch backend (read in place) and on a backend without segment support (concatenated for it)."""
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
    ref_backend = lambda q, k, v, valid, scale: ops.attention_decode_ref(q, k, v, valid, scale)  # noqa: E731
    from unittest import mock
    with mock.patch.object(ops, "resolve", lambda *a: ref_backend):
        torch.testing.assert_close(ops.attention_decode(q, ks, vs, valids), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number of segments"):
        ops.attention_decode(q, ks, vs[:2], valids, backend="torch")
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 8\)"):
        ops.attention_decode(q, ks, (vs[0], vs[1][:, :, :1].expand(-1, -1, 2, -1).contiguous()[:, :2], vs[2]),
                             backend="torch")
