"""Triton selective scan and decoding step vs the naive references: forward and every gradient."""
import pytest
import torch

from cuda_testutils import assert_close, grads, leaf

import bmojo.ops as ops  # noqa: E402
from bmojo.ops import selective_scan_ref, selective_state_update_ref  # noqa: E402
from bmojo.backends.cuda.selective_scan import selective_scan, selective_state_update  # noqa: E402

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(device, b, T, d, N, G, dtype, *, D=True, z=True, bias=True, h0=True, softplus=True):
    lo = dict(dtype=dtype, device=device)
    bc_shape = (b, T, N) if G is None else (b, T, G, N)
    dt = torch.randn(b, T, d, **lo) * 0.5 - (0.5 if softplus else 0.0)
    if not softplus:
        dt = dt.abs() * 0.3 + 0.01
    t = dict(
        x=torch.randn(b, T, d, **lo),
        dt=dt,
        A=-(torch.rand(d, N, device=device) * 2.5 + 0.1),
        B=torch.randn(*bc_shape, **lo),
        C=torch.randn(*bc_shape, **lo),
        D=torch.randn(d, device=device) if D else None,
        z=torch.randn(b, T, d, **lo) if z else None,
        dt_bias=(torch.randn(d, device=device) * 0.5) if bias else None,
        initial_state=torch.randn(b, d, N, device=device) if h0 else None,
    )
    return {k: (leaf(v) if v is not None else None) for k, v in t.items()}


def check_scan(device, b, T, d, N, G, dtype, chunk, softplus=True, final=True, **flags):
    t = make_inputs(device, b, T, d, N, G, dtype, softplus=softplus, **flags)
    kw = dict(dt_softplus=softplus, return_final_state=final)
    out = selective_scan(**t, chunk_size=chunk, **kw)
    ref = selective_scan_ref(**t, **kw)
    out, ref = (out, ref) if final else ((out,), (ref,))
    assert_close(out[0], ref[0], dtype, "y")
    if final:
        assert_close(out[1], ref[1], dtype, "final_state")
    cot = [torch.randn(o.shape, device=device) for o in ref]
    names = [n for n in GRAD_NAMES if t[n] is not None]
    g_out = grads(out, cot, [t[n] for n in names])
    g_ref = grads(ref, cot, [t[n] for n in names])
    for n, go, gr in zip(names, g_out, g_ref):
        assert_close(go, gr, dtype, f"d{n}", factor=4.0 if dtype != torch.float32 else 1.0)


@pytest.mark.parametrize(
    "b,T,d,N,G,chunk",
    [
        (1, 1, 4, 4, None, 4),     # a single step
        (2, 7, 8, 4, None, 4),     # shared B/C, odd T, two chunks with a tail
        (2, 37, 16, 8, 2, 8),      # grouped B/C, five chunks
        (1, 16, 8, 4, 4, 4),       # T a multiple of the chunk; 4 groups of 2 channels
        (2, 23, 12, 4, 3, 8),      # d not a power of two, 3 groups of 4 channels
    ],
)
def test_scan_fp32(device, b, T, d, N, G, chunk):
    check_scan(device, b, T, d, N, G, torch.float32, chunk)


def test_scan_minimal_options(device):
    """No D, no z, no dt bias, no softplus, no initial state, no final state."""
    check_scan(device, 2, 13, 8, 4, None, torch.float32, 4, softplus=False, final=False,
               D=False, z=False, bias=False, h0=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_half(device, dtype):
    check_scan(device, 2, 19, 8, 4, 2, dtype, 8)


def test_scan_checkpoint_spacing_does_not_change_results(device):
    t = make_inputs(device, 1, 29, 8, 4, None, torch.float32)
    ys = [selective_scan(**t, chunk_size=c, return_final_state=True) for c in (2, 8, 32)]
    for y, h in ys[1:]:
        torch.testing.assert_close(y, ys[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, ys[0][1], atol=1e-5, rtol=1e-5)


def test_scan_through_dispatch(device):
    t = make_inputs(device, 2, 11, 8, 4, None, torch.float32)
    y = ops.selective_scan(**t, backend="cuda")
    assert_close(y, selective_scan_ref(**t), torch.float32, "y")


def test_scan_strided_inputs(device):
    """x and z split from one projection (non-contiguous), as in the Mamba mixer."""
    b, T, d, N = 2, 9, 8, 4
    xz = leaf(torch.randn(b, T, 2 * d, device=device))
    x, z = xz[..., :d], xz[..., d:]
    t = make_inputs(device, b, T, d, N, None, torch.float32, z=False)
    t.pop("x")
    t.pop("z")
    out = selective_scan(x, **t, z=z, chunk_size=4)
    ref = selective_scan_ref(x, **t, z=z)
    assert_close(out, ref, torch.float32, "y")
    cot = [torch.randn_like(ref)]
    assert_close(grads([out], cot, [xz])[0], grads([ref], cot, [xz])[0], torch.float32, "dxz")


@pytest.mark.parametrize("G", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update(device, G, dtype):
    b, d, N = 2, 12, 4
    t = make_inputs(device, b, 3, d, N, G, dtype)
    with torch.no_grad():
        state = t["initial_state"].detach().clone()
        state_ref = state.clone()
        for s in range(3):
            step = dict(x=t["x"][:, s], dt=t["dt"][:, s], A=t["A"], B=t["B"][:, s], C=t["C"][:, s], D=t["D"],
                        z=t["z"][:, s], dt_bias=t["dt_bias"])
            y = selective_state_update(state, **step)
            y_ref = selective_state_update_ref(state_ref, **step)
            assert_close(y, y_ref, dtype, f"y step {s}")
            assert_close(state, state_ref, dtype, f"state step {s}")
        # the decoding steps reproduce the scan's last output and final state
        y_scan, h_scan = selective_scan(**{k: v for k, v in t.items()}, return_final_state=True, chunk_size=2)
        assert_close(y, y_scan[:, -1], dtype, "y vs scan")
        assert_close(state, h_scan, dtype, "state vs scan")


def test_state_update_through_dispatch(device):
    t = make_inputs(device, 2, 1, 8, 4, None, torch.float32)
    with torch.no_grad():
        state = t["initial_state"].detach().clone()
        state_ref = state.clone()
        args = (t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0])
        y = ops.selective_state_update(state, *args, D=t["D"], backend="cuda")
        y_ref = selective_state_update_ref(state_ref, *args, D=t["D"])
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(state, state_ref, torch.float32, "state")
