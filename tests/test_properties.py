"""Property-based tests (hypothesis): every op of every backend that runs here equals the naive
reference on random shapes — batch, T, heads, window, fading window, memory slots (more slots than
eligible positions included) and chunk boundaries. Under pytest on a CPU machine the cuda backend
runs through the Triton interpreter (fewer examples: it is slow)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first Triton kernel definition

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bmojo import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("torch", "cuda") if b in ops.available_backends(DEVICE)]
EXAMPLES = {"torch": 25, "cuda": 6}


def _settings(backend):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


scan_shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "T": st.integers(1, 70), "d": st.integers(1, 9), "N": st.integers(1, 5),
    "groups": st.sampled_from([0, 1]), "use_D": st.booleans(), "use_z": st.booleans(),
    "use_bias": st.booleans(), "use_h0": st.booleans(),
})


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_property(backend):
    @_settings(backend)
    @given(scan_shapes)
    def check(p):
        b, T, d, N = p["b"], p["T"], p["d"], p["N"]
        x, dt = _randn(b, T, d), _randn(b, T, d) - 1
        A = -torch.rand(d, N, device=DEVICE) * 4 - 0.1
        BC_shape = (b, T, 1, N) if p["groups"] else (b, T, N)
        B, C = _randn(*BC_shape), _randn(*BC_shape)
        kw = dict(D=_randn(d) if p["use_D"] else None, z=_randn(b, T, d) if p["use_z"] else None,
                  dt_bias=_randn(d) if p["use_bias"] else None,
                  initial_state=_randn(b, d, N) if p["use_h0"] else None, return_final_state=True)
        y, h = ops.selective_scan(x, dt, A, B, C, backend=backend, **kw)
        y_ref, h_ref = ops.selective_scan_ref(x, dt, A, B, C, **kw)
        torch.testing.assert_close(y, y_ref, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(h, h_ref, atol=2e-4, rtol=2e-4)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_property(backend):
    @_settings(backend)
    @given(st.integers(1, 2), st.integers(1, 40), st.integers(1, 9), st.integers(2, 4), st.booleans(), st.booleans())
    def check(b, T, d, K, use_state, silu):
        x, w, bias = _randn(b, T, d), _randn(d, K), _randn(d)
        h0 = _randn(b, d, K - 1) if use_state else None
        act = "silu" if silu else None
        y, s = ops.causal_conv1d(x, w, bias, act, h0, True, backend=backend)
        y_ref, s_ref = ops.causal_conv1d_ref(x, w, bias, act, h0, True)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ref)

    check()


attention_shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "T": st.integers(1, 40), "Hkv": st.integers(1, 2), "rep": st.sampled_from([1, 2]),
    "D": st.sampled_from([4, 8, 16]), "window": st.one_of(st.none(), st.integers(1, 12)),
    "fading": st.one_of(st.none(), st.integers(0, 12)), "with_fading": st.booleans(),
    "slots": st.integers(0, 5), "invalid": st.floats(0, 1),
})


@pytest.mark.parametrize("backend", BACKENDS)
def test_bmojo_attention_property(backend):
    @_settings(backend)
    @given(attention_shapes)
    def check(p):
        b, T, Hkv, D, w = p["b"], p["T"], p["Hkv"], p["D"], p["window"]
        Hq = Hkv * p["rep"]
        q, k, v = _randn(b, T, Hq, D), _randn(b, T, Hkv, D), _randn(b, T, Hkv, D)
        kw = dict(window=w)
        if w is not None and p["with_fading"]:
            kw.update(k_fading=_randn(b, T, Hkv, D), v_fading=_randn(b, T, Hkv, D), fading_window=p["fading"])
        if w is not None and p["slots"]:
            n = -(-T // w)
            kw.update(k_memory=_randn(b, n, p["slots"], Hkv, D), v_memory=_randn(b, n, p["slots"], Hkv, D),
                      memory_valid=torch.rand(b, n, p["slots"], device=DEVICE) >= p["invalid"])
        o, lse = ops.bmojo_attention(q, k, v, return_lse=True, backend=backend, **kw)
        o_ref, lse_ref = ops.bmojo_attention_ref(q, k, v, return_lse=True, **kw)
        torch.testing.assert_close(o, o_ref, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(lse, lse_ref, atol=2e-4, rtol=2e-4)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_ops_property(backend):
    @_settings(backend)
    @given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.integers(2, 4), st.integers(1, 20),
           st.integers(1, 2), st.sampled_from([4, 8]))
    def check(b, d, N, K, S, Hkv, D):
        state, x, dt = _randn(b, d, N), _randn(b, d), _randn(b, d)
        A, B, C, Dp, z, bias = -torch.rand(d, N, device=DEVICE), _randn(b, N), _randn(b, N), _randn(d), _randn(b, d), _randn(d)
        s1, s2 = state.clone(), state.clone()
        y = ops.selective_state_update(s1, x, dt, A, B, C, Dp, z, bias, True, backend=backend)
        y_ref = ops.selective_state_update_ref(s2, x, dt, A, B, C, Dp, z, bias, True)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
        conv, w, cb = _randn(b, d, K - 1), _randn(d, K), _randn(d)
        c1, c2 = conv.clone(), conv.clone()
        torch.testing.assert_close(ops.causal_conv1d_update(x, c1, w, cb, "silu", backend=backend),
                                   ops.causal_conv1d_update_ref(x, c2, w, cb, "silu"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c1, c2)
        q, kk, vv = _randn(b, 2 * Hkv, D), _randn(b, S, Hkv, D), _randn(b, S, Hkv, D)
        valid = torch.rand(b, S, device=DEVICE) > 0.3
        valid[:, 0] = True
        torch.testing.assert_close(ops.attention_decode(q, kk, vv, valid, backend=backend),
                                   ops.attention_decode_ref(q, kk, vv, valid), atol=1e-5, rtol=1e-5)

    check()


@given(st.integers(1, 2), st.integers(1, 80), st.integers(1, 12), st.integers(1, 30), st.integers(1, 5))
@settings(max_examples=40, deadline=None, derandomize=True)
def test_innovation_select_property(b, T, w, slots, taps):
    f = _randn(b, T, 3)
    if T > 4:
        f[:, T // 2] = f[:, T // 2 - 1]  # plant ties in eps
    pos, valid = ops.innovation_select(f, w, slots, taps)
    pos_ref, valid_ref = ops.innovation_select_ref(f, w, slots, taps)
    assert torch.equal(valid, valid_ref) and torch.equal(pos[valid], pos_ref[valid_ref])
