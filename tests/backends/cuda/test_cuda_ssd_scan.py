"""Triton SSD scan (Mamba-2) and its decoding step vs the naive references: forward, final state and every
gradient (x, dt, A, B, C, D, z, dt_bias, initial_state), fp32 / fp16 / bf16, odd T across several chunks,
G < H, the dt transform's options; through ``TRITON_INTERPRET=1`` on CPU (see conftest.py)."""
import math
import warnings

import pytest
import torch

from cuda_testutils import assert_close, grads, leaf

import bmojo.ops as ops  # noqa: E402
from bmojo.ops import registry, ssd_scan_ref, ssd_state_update_ref  # noqa: E402
from bmojo.backends.cuda.ssd_scan import ssd_scan, ssd_state_update  # noqa: E402

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(device, b, T, H, P, G, N, dtype, *, D="head", z=True, bias=True, h0=True, softplus=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lo = dict(dtype=dtype, device=device)
    dt = r(b, T, H) * 0.5 - 1.0 if softplus else torch.rand(b, T, H, generator=g) * 0.3 + 0.01
    t = dict(
        x=r(b, T, H, P).to(**lo),
        dt=dt.to(**lo),
        A=-(torch.rand(H, generator=g) * 4.0 + 0.5).to(device),
        B=r(b, T, G, N).to(**lo),
        C=r(b, T, G, N).to(**lo),
        D={"head": r(H), "channel": r(H, P), None: None}[D],
        z=r(b, T, H, P).to(**lo) if z else None,
        dt_bias=r(H) * 0.5 if bias else None,
        initial_state=r(b, H, P, N) if h0 else None,
    )
    return {k: (leaf(v.to(device)) if v is not None else None) for k, v in t.items()}


def check_scan(device, b, T, H, P, G, N, dtype, chunk, softplus=True, final=True, dt_limit=(0.0, math.inf),
               t=None, **flags):
    t = t or make_inputs(device, b, T, H, P, G, N, dtype, softplus=softplus, **flags)
    kw = dict(dt_softplus=softplus, dt_limit=dt_limit, return_final_state=final)
    out = ssd_scan(**t, chunk_size=chunk, **kw)
    ref = ssd_scan_ref(**t, **kw)
    out, ref = (out, ref) if final else ((out,), (ref,))
    assert_close(out[0], ref[0], dtype, "y")
    if final:
        assert out[1].dtype == torch.float32 and out[1].shape == (b, H, P, N)
        assert_close(out[1], ref[1], torch.float32, "final_state", factor=1.0 if dtype == torch.float32 else 500.0)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g).to(device) for o in ref]
    names = [n for n in GRAD_NAMES if t[n] is not None]
    g_out = grads(out, cot, [t[n] for n in names])
    g_ref = grads(ref, cot, [t[n] for n in names])
    for n, go, gr in zip(names, g_out, g_ref):
        assert_close(go, gr, gr.dtype if gr.dtype != torch.float32 else dtype, f"d{n}",
                     factor=4.0 if dtype != torch.float32 else 1.0)


@pytest.mark.parametrize(
    "b,T,H,P,G,N,chunk",
    [
        (1, 1, 2, 4, 1, 4, 16),      # a single token
        (2, 37, 4, 3, 2, 5, 16),     # odd T, three chunks with a tail of 5; G < H; P, N not powers of two
        (1, 32, 4, 8, 4, 8, 16),     # T a multiple of the chunk; one head per group
        (2, 23, 6, 5, 3, 4, 16),     # 3 groups of 2 heads, two chunks
    ],
)
def test_scan_fp32(device, b, T, H, P, G, N, chunk):
    check_scan(device, b, T, H, P, G, N, torch.float32, chunk)


def test_scan_wide_head_and_state(device):
    """P = 70 (two P blocks in every kernel) and N = 70 (two N blocks in the chunk-state kernels); D per channel."""
    check_scan(device, 1, 20, 2, 70, 1, 70, torch.float32, 16, D="channel")


def test_scan_minimal_options(device):
    """No D, no z, no dt bias, no softplus, no initial state, no final state."""
    check_scan(device, 2, 21, 4, 3, 1, 4, torch.float32, 16, softplus=False, final=False,
               D=None, z=False, bias=False, h0=False)


@pytest.mark.parametrize("softplus", [True, False])
def test_scan_dt_limit(device, softplus):
    """Both ends of dt_limit active: values, and gradients that vanish where dt' is clamped."""
    check_scan(device, 2, 19, 4, 3, 2, 4, torch.float32, 16, softplus=softplus, dt_limit=(0.2, 0.45))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_half(device, dtype):
    check_scan(device, 2, 35, 4, 4, 2, 4, dtype, 16, D="channel")


def test_scan_strong_decay(device):
    """dt' ~ 20 on every third token, A down to -4.5: chunk log-decays of several hundred next to tokens with
    tiny dt'; the masked cumulative sums keep every decay exact."""
    t = make_inputs(device, 1, 40, 2, 3, 1, 4, torch.float32)
    with torch.no_grad():
        t["dt"][:, ::3] = 20.0
        t["dt"][:, 1::3] = -12.0
    check_scan(device, 1, 40, 2, 3, 1, 4, torch.float32, 16, t=t)


def test_scan_chunk_size_does_not_change_results(device):
    t = {k: (v.detach() if v is not None else None) for k, v in make_inputs(device, 1, 40, 2, 3, 1, 4, torch.float32).items()}
    outs = [ssd_scan(**t, chunk_size=c, return_final_state=True) for c in (16, 32, 64)]
    for y, h in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, outs[0][1], atol=1e-5, rtol=1e-5)


def test_scan_through_dispatch_and_empty(device):
    t = make_inputs(device, 2, 11, 4, 3, 2, 4, torch.float32)
    y = ops.ssd_scan(**t, backend="cuda")
    assert registry.resolve("ssd_scan", "cuda", device) is ssd_scan
    assert_close(y, ssd_scan_ref(**t), torch.float32, "y")
    e = make_inputs(device, 2, 0, 4, 3, 2, 4, torch.float32)
    y0, h0 = ops.ssd_scan(**e, return_final_state=True, backend="cuda")
    assert y0.shape == (2, 0, 4, 3) and torch.equal(h0, e["initial_state"].detach())


def test_scan_strided_inputs(device):
    """x and z split from one projection, B and C from another (non-contiguous), as in a Mamba-2 mixer."""
    b, T, H, P, G, N = 2, 18, 4, 3, 2, 4
    xz = leaf(torch.randn(b, T, 2 * H * P, device=device))
    bc = leaf(torch.randn(b, T, 2 * G * N, device=device))
    x, z = xz[..., : H * P].view(b, T, H, P), xz[..., H * P:].view(b, T, H, P)
    B, C = bc[..., : G * N].view(b, T, G, N), bc[..., G * N:].view(b, T, G, N)
    t = make_inputs(device, b, T, H, P, G, N, torch.float32)
    for k in ("x", "z", "B", "C"):
        t.pop(k)
    out = ssd_scan(x, B=B, C=C, z=z, **t, chunk_size=16)
    ref = ssd_scan_ref(x, B=B, C=C, z=z, **t)
    assert_close(out, ref, torch.float32, "y")
    cot = [torch.randn_like(ref)]
    for n, go, gr in zip(("xz", "bc"), grads([out], cot, [xz, bc]), grads([ref], cot, [xz, bc])):
        assert_close(go, gr, torch.float32, f"d{n}")


def _step(t, s):
    return dict(x=t["x"][:, s], dt=t["dt"][:, s], A=t["A"], B=t["B"][:, s], C=t["C"][:, s], D=t["D"],
                z=t["z"][:, s], dt_bias=t["dt_bias"])


@pytest.mark.parametrize("G,D", [(1, "head"), (2, "channel")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_equals_scan_token_by_token(device, G, D, dtype):
    t = make_inputs(device, 2, 5, 4, 6, G, 4, dtype, D=D)
    with torch.no_grad():
        state = t["initial_state"].detach().clone()
        state_ref = state.clone()
        y_scan, h_scan = ssd_scan(**t, return_final_state=True, chunk_size=16)
        for s in range(5):
            y = ssd_state_update(state, **_step(t, s))
            y_ref = ssd_state_update_ref(state_ref, **_step(t, s))
            assert_close(y, y_ref, dtype, f"y step {s}")
            assert_close(state, state_ref, torch.float32, f"state step {s}")
            assert_close(y, y_scan[:, s], dtype, f"y step {s} vs scan")
        assert_close(state, h_scan, torch.float32, "state vs scan")


def test_state_update_dt_limit_through_dispatch(device):
    t = make_inputs(device, 2, 1, 4, 3, 2, 4, torch.float32)
    with torch.no_grad():
        state = t["initial_state"].detach().clone()
        state_ref = state.clone()
        y = ops.ssd_state_update(state, **_step(t, 0), dt_limit=(0.3, 0.6), backend="cuda")
        y_ref = ssd_state_update_ref(state_ref, **_step(t, 0), dt_limit=(0.3, 0.6))
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(state, state_ref, torch.float32, "state")


def test_state_update_under_autograd_falls_back_with_one_warning(device):
    """The Triton step has no backward: with gradients required it runs the torch backend's step, announced once."""
    t = make_inputs(device, 2, 1, 4, 3, 2, 4, torch.float32)
    registry._warned.discard(("cuda", "ssd_state_update", "the Triton decoding-step kernel has no backward and "
                              "autograd needs gradients of its inputs"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(2):
            state = t["initial_state"].detach().clone()
            y = ssd_state_update(state, **_step(t, 0))
    msgs = [str(m.message) for m in w if "ssd_state_update" in str(m.message)]
    assert len(msgs) == 1 and "cuda backend falls back to the torch backend" in msgs[0], msgs
    state_ref = t["initial_state"].detach().clone()
    y_ref = ssd_state_update_ref(state_ref, **_step(t, 0))
    assert_close(y, y_ref, torch.float32, "y")
    assert y.requires_grad
    gx, gx_ref = (torch.autograd.grad(v.sum(), t["x"])[0] for v in (y, y_ref))
    assert_close(gx, gx_ref, torch.float32, "dx")
