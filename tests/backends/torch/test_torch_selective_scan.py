"""The torch backend's selective scan (``bmojo.backends.torch.selective_scan``) against the oracle: forward and
every gradient, both registered decay forms, the decoding step.

Shapes are kept small because the reference is slow (a Python loop over T).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bmojo.ops as ops
from bmojo.backends.torch.selective_scan.chunk import (
    DEFAULT_CHUNK,
    scan_inplace_,
    selective_scan_chunked,
    selective_scan_chunked_exp,
)
from torch_testutils import _close, _fwd_bwd


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


def _check_scan(t, dtype, chunk_size=None, impl=selective_scan_chunked):
    fast = (lambda **k: impl(**k, chunk_size=chunk_size)) if chunk_size else \
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


def test_selective_scan_exp_decays():
    """The exp-decay form (registered for every device but the CPU: torch-xla does not lower exp2) equals the
    reference forward and every gradient across chunk boundaries."""
    _check_scan(_scan_inputs(2, 37, 6, 4, 3, torch.float32, True), torch.float32, 16, impl=selective_scan_chunked_exp)


def test_selective_state_update_gradients():
    """The step is differentiable (what the cuda backend falls back to under autograd): values, the updated
    state and every input gradient equal the reference's."""
    t = {k: v.detach() for k, v in _scan_inputs(2, 1, 8, 4, 2, torch.float32, True).items()}
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    step = {k: (t[k][:, 0] if k in ("x", "dt", "B", "C", "z") else t[k]) for k in names}
    outs = []
    for fn in (lambda s, **k: ops.selective_state_update(s, **k, backend="torch"), ops.selective_state_update_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in step.items()}
        state = t["initial_state"].clone()
        y = fn(state, **leaves)
        grads = torch.autograd.grad((y * torch.arange(y.numel()).view(y.shape).sin()).sum(), list(leaves.values()))
        outs.append((y.detach(), state.detach(), grads))
    (y_f, s_f, g_f), (y_r, s_r, g_r) = outs
    torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_f, s_r, rtol=1e-5, atol=1e-5)
    for n, a, e in zip(names, g_f, g_r):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{n}: {m}")
