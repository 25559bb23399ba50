"""Shared checks for tests/backends/cuda (imported by the test modules)."""
import contextlib
import warnings

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="tests/backends/cuda need Triton (pip install 'bmojo[cuda]'); without it the cuda backend cannot run"
)

# max |a - b| / max(1, max |ref|): fp32 tight, half precisions scaled by their machine epsilon
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def assert_close(out, ref, dtype, name="", factor=1.0):
    assert out is not None and ref is not None, f"{name}: missing gradient ({out is None}, {ref is None})"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= TOL[dtype] * factor * scale, f"{name}: max err {err:.3e} (ref max {scale:.3e}, dtype {dtype})"


def grads(outputs, cotangents, inputs):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


@contextlib.contextmanager
def no_bmojo_warnings():
    """Fails if bmojo warns inside the block (a fallback that should not happen). Other libraries' warnings
    pass: Triton's interpreter turns a warning raised as an error into its own failure, and old NumPy
    releases warn from inside it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in caught if str(w.message).startswith("bmojo")]
    assert not ours, f"unexpected bmojo warnings: {ours}"
