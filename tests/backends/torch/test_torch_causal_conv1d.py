"""The torch backend's causal conv1d (``bmojo.backends.torch.causal_conv1d``) against the oracle: forward, every
gradient, the inference path and the decoding step."""
from __future__ import annotations

import pytest
import torch

import bmojo.ops as ops
from torch_testutils import _close, _fwd_bwd


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


