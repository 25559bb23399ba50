"""Triton causal conv1d (prefill fwd/bwd, decoding step) vs the naive references."""
import pytest
import torch

from cuda_testutils import assert_close, grads, leaf

import bmojo.ops as ops  # noqa: E402
from bmojo.ops import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402
from bmojo.backends.cuda.causal_conv1d import causal_conv1d, causal_conv1d_update  # noqa: E402


@pytest.mark.parametrize(
    "b,T,d,K,act,init,bias,dtype",
    [
        (2, 1, 5, 4, "silu", True, True, torch.float32),    # T < K-1: the final state keeps part of the initial one
        (2, 2, 3, 4, None, True, False, torch.float32),
        (2, 37, 16, 4, "silu", False, True, torch.float32),
        (1, 40, 12, 3, "swish", True, True, torch.float32),
        (1, 7, 8, 2, None, False, True, torch.float32),
        (2, 19, 8, 4, "silu", True, True, torch.float16),
        (2, 19, 8, 4, "silu", True, True, torch.bfloat16),
    ],
)
def test_conv(device, b, T, d, K, act, init, bias, dtype):
    x = leaf(torch.randn(b, T, d, device=device, dtype=dtype))
    w = leaf(torch.randn(d, K, device=device) * 0.5)
    bs = leaf(torch.randn(d, device=device)) if bias else None
    h0 = leaf(torch.randn(b, d, K - 1, device=device, dtype=dtype)) if init else None
    out = causal_conv1d(x, w, bs, act, h0, True)
    ref = causal_conv1d_ref(x, w, bs, act, h0, True)
    assert_close(out[0], ref[0], dtype, "y")
    assert_close(out[1], ref[1], dtype, "final_state")
    cot = [torch.randn(r.shape, device=device) for r in ref]
    names, ins = zip(*[(n, t) for n, t in (("x", x), ("weight", w), ("bias", bs), ("initial_state", h0)) if t is not None])
    for n, go, gr in zip(names, grads(out, cot, ins), grads(ref, cot, ins)):
        assert_close(go, gr, dtype, f"d{n}", factor=2.0)


def test_conv_only_y_and_dispatch(device):
    x = leaf(torch.randn(2, 9, 8, device=device))
    w = leaf(torch.randn(8, 4, device=device))
    y = ops.causal_conv1d(x, w, None, "silu", backend="cuda")
    y_ref = causal_conv1d_ref(x, w, None, "silu")
    assert_close(y, y_ref, torch.float32, "y")
    cot = [torch.randn_like(y_ref)]
    for go, gr in zip(grads([y], cot, [x, w]), grads([y_ref], cot, [x, w])):
        assert_close(go, gr, torch.float32, "grad")


def test_conv_bad_activation(device):
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 3, 4, device=device), torch.randn(4, 3, device=device), activation="relu")


@pytest.mark.parametrize("K,act,dtype", [(4, "silu", torch.float32), (3, None, torch.float32), (4, "silu", torch.bfloat16)])
def test_conv_update(device, K, act, dtype):
    b, d, steps = 2, 12, 3
    w = torch.randn(d, K, device=device)
    bias = torch.randn(d, device=device)
    xs = torch.randn(b, steps, d, device=device, dtype=dtype)
    state = torch.randn(b, d, K - 1, device=device, dtype=dtype)
    state_ref = state.clone()
    init = state.clone()
    with torch.no_grad():
        for s in range(steps):
            y = causal_conv1d_update(xs[:, s], state, w, bias, act)
            y_ref = causal_conv1d_update_ref(xs[:, s], state_ref, w, bias, act)
            assert_close(y, y_ref, dtype, f"y step {s}")
            assert_close(state, state_ref, dtype, f"state step {s}")
        # stepping reproduces the prefill
        y_pre, st_pre = causal_conv1d(xs, w, bias, act, init, True)
        assert_close(y, y_pre[:, -1], dtype, "y vs prefill")
        assert_close(state, st_pre, dtype, "state vs prefill")
        y2 = ops.causal_conv1d_update(xs[:, 0], state, w, bias, act, backend="cuda")
        assert y2.shape == (b, d)
