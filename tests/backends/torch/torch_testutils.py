"""Shared checks for tests/backends/torch: tolerances, forward + backward against the oracle, attention inputs."""
from __future__ import annotations

import torch

import bmojo.ops as ops

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


def _attn_inputs(b, T, Hq, Hkv, D, w, fading, memory, invalid, dtype, seed=0, q_fading=False):
    """Leaf tensors for bmojo_attention from position 0; ``q_fading``: the fading keys' own queries too."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    t = dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D))
    if fading:
        t.update(k_fading=r(b, T, Hkv, D), v_fading=r(b, T, Hkv, D))
        if q_fading:
            t["q_fading"] = r(b, T, Hq, D)
    if memory:
        n_chunks = -(-T // w)
        m_e = memory
        t.update(k_memory=r(b, n_chunks, m_e, Hkv, D), v_memory=r(b, n_chunks, m_e, Hkv, D))
        valid = torch.rand(b, n_chunks, m_e, generator=g) > 0.35 if invalid else None
        if valid is not None:
            valid[:, 0] = False  # the first chunk has no eligible position, as in the model
        t["memory_valid"] = valid
    return t


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
