"""The torch backend's SSD scan (``bmojo.backends.torch.ssd_scan``) against the oracle: forward, final state and
every gradient at odd lengths and across chunk boundaries, grouped B/C, low precision, strong decays, the
dt transform's options, and the decoding step (equal to the oracle's step and to the scan token by token).

Shapes are small: the oracle is a Python loop over T.
"""
from __future__ import annotations

import math

import pytest
import torch

import bmojo.ops as ops
from bmojo.backends.torch.ssd_scan.chunk import DEFAULT_CHUNK, ssd_scan_chunked
from torch_testutils import _close, _fwd_bwd

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def ssd_inputs(b, T, H, P, G, N, dtype=torch.float32, extras=True, D_per_channel=False, seed=0):
    """Mamba-2-like inputs: dt' = softplus(dt + dt_bias) in about [1e-3, 0.1] (wider with the noise on dt),
    A in [-16, -1] per head."""
    g = torch.Generator().manual_seed(seed)
    dt_target = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    t = dict(
        x=torch.randn(b, T, H, P, generator=g).to(dtype),
        dt=(0.5 * torch.randn(b, T, H, generator=g)).to(dtype),
        A=-torch.exp(torch.rand(H, generator=g) * math.log(16.0)),
        B=torch.randn(b, T, G, N, generator=g).to(dtype),
        C=torch.randn(b, T, G, N, generator=g).to(dtype),
    )
    if extras:
        t.update(D=torch.randn(*((H, P) if D_per_channel else (H,)), generator=g),
                 z=torch.randn(b, T, H, P, generator=g).to(dtype),
                 dt_bias=dt_target + torch.log(-torch.expm1(-dt_target)),  # inverse softplus
                 initial_state=torch.randn(b, H, P, N, generator=g))
    return {k: v.requires_grad_() for k, v in t.items()}


def check(t, dtype, fast=None, **kw):
    """Outputs, final state and every input gradient of ``fast`` (default: the op through the torch backend)
    against the oracle's, with the dtype's tolerance."""
    fast = fast or (lambda **a: ops.ssd_scan(**a, backend="torch"))
    names = [n for n in NAMES if n in t]
    out_f, g_f = _fwd_bwd(lambda: fast(**t, **kw, return_final_state=True), [t[n] for n in names])
    out_r, g_r = _fwd_bwd(lambda: ops.ssd_scan_ref(**t, **kw, return_final_state=True), [t[n] for n in names])
    assert out_f[0].dtype == dtype and out_f[1].dtype == torch.float32
    assert out_f[0].shape == out_r[0].shape and out_f[1].shape == out_r[1].shape
    _close(out_f[0], out_r[0], dtype, "y")
    _close(out_f[1], out_r[1], dtype, "final_state")
    for n, a, e in zip(names, g_f, g_r):
        _close(a, e, dtype, f"d{n}")


@pytest.mark.parametrize("T", [1, 7, 64, 65, 131])
@pytest.mark.parametrize("G", [1, 2])
def test_ssd_scan_fp32(T, G):
    """Through the API (default chunk 64): one token, T < chunk, T == chunk, a last chunk of 1, three chunks
    with a ragged last one; shared and grouped B/C (4 heads)."""
    assert DEFAULT_CHUNK == 64, "update the lengths above to straddle the new chunk size"
    check(ssd_inputs(2, T, 4, 3, G, 5), torch.float32)


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_ssd_scan_many_chunks(chunk_size):
    """Small chunks: many boundaries and a ragged last chunk; D per channel (H, P), G = H."""
    t = ssd_inputs(2, 37, 4, 3, 4, 4, D_per_channel=True)
    check(t, torch.float32, fast=lambda **a: ssd_scan_chunked(**a, chunk_size=chunk_size))


def test_ssd_scan_no_extras():
    """No D, z, dt_bias, initial state."""
    check(ssd_inputs(2, 70, 4, 3, 2, 4, extras=False), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_scan_low_precision(dtype):
    check(ssd_inputs(2, 70, 4, 4, 2, 4, dtype=dtype), dtype)


def test_ssd_scan_strong_decay_stays_accurate():
    """dt' up to ~20 and A down to -16: per-token decays down to exp(-320) (underflow to 0) next to tokens with
    tiny dt', so log-decays within a chunk differ by orders of magnitude: the masked cumulative sums keep
    every decay exact to fp32 (a difference of prefix sums would not)."""
    t = ssd_inputs(1, 90, 4, 3, 1, 4)
    with torch.no_grad():
        t["dt"][:, ::3] = 20.0
        t["dt"][:, 1::3] = -12.0
    check(t, torch.float32)


@pytest.mark.parametrize("softplus", [True, False])
def test_ssd_scan_dt_limit(softplus):
    """dt' clamped to (lo, hi), both ends active: values and gradients (zero where clamped) as the oracle's."""
    t = ssd_inputs(2, 40, 4, 3, 2, 4)
    if not softplus:
        with torch.no_grad():
            t["dt"].abs_()
    check(t, torch.float32, dt_softplus=softplus, dt_limit=(0.3, 0.9))


def test_ssd_scan_inference_matches_autograd_path():
    t = {k: v.detach() for k, v in ssd_inputs(2, 100, 4, 3, 2, 4).items()}
    want, h_want = ops.ssd_scan_ref(**t, return_final_state=True)
    with torch.no_grad():
        y, h = ops.ssd_scan(**t, return_final_state=True, backend="torch")
    _close(y, want, torch.float32, "y")
    _close(h, h_want, torch.float32, "final_state")
    assert h.shape == (2, 4, 3, 4) and h.is_contiguous()
    y_only = ops.ssd_scan(**t, backend="torch")
    assert torch.is_tensor(y_only) and torch.equal(y_only, y)


def test_ssd_scan_empty_sequence():
    t = {k: v.detach() for k, v in ssd_inputs(2, 0, 4, 3, 2, 4).items()}
    y, h = ops.ssd_scan(**t, return_final_state=True, backend="torch")
    assert y.shape == (2, 0, 4, 3) and torch.equal(h, t["initial_state"]) and h is not t["initial_state"]


def _step_args(t, s):
    return dict(x=t["x"][:, s], dt=t["dt"][:, s], A=t["A"], B=t["B"][:, s], C=t["C"][:, s], D=t["D"],
                z=t["z"][:, s], dt_bias=t["dt_bias"])


@pytest.mark.parametrize("G", [1, 2])
def test_ssd_state_update_equals_scan_token_by_token(G):
    t = {k: v.detach() for k, v in ssd_inputs(3, 9, 4, 3, G, 4, D_per_channel=G == 2).items()}
    y_scan, h_scan = ops.ssd_scan(**t, return_final_state=True, backend="torch")
    state, state_ref = t["initial_state"].clone(), t["initial_state"].clone()
    for s in range(9):
        y = ops.ssd_state_update(state, **_step_args(t, s), backend="torch")
        y_ref = ops.ssd_state_update_ref(state_ref, **_step_args(t, s))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, y_scan[:, s], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h_scan, rtol=1e-5, atol=1e-5)


def test_ssd_state_update_gradients():
    """The step is differentiable (what the cuda backend runs under autograd): values, the updated state and
    every input gradient (the old state's included) equal the oracle's."""
    t = {k: v.detach() for k, v in ssd_inputs(2, 1, 4, 3, 2, 4).items()}
    step = _step_args(t, 0)
    outs = []
    for fn in (lambda s, **k: ops.ssd_state_update(s, **k, backend="torch"), ops.ssd_state_update_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in step.items()}
        s0 = t["initial_state"].clone().requires_grad_()
        state = s0.clone()
        y = fn(state, **leaves, dt_limit=(0.0, 0.5))
        loss = (y * torch.arange(y.numel()).view(y.shape).sin()).sum() + (state * state.detach().cos()).sum()
        outs.append((y.detach(), state.detach(), torch.autograd.grad(loss, [*leaves.values(), s0])))
    (y_f, s_f, g_f), (y_r, s_r, g_r) = outs
    torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_f, s_r, rtol=1e-5, atol=1e-5)
    for n, a, e in zip([*step, "state"], g_f, g_r):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{n}: {m}")
