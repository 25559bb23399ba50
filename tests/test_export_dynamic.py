"""torch.export with a dynamic sequence length: every layer type exports once and the program gives the
eager model's logits at other lengths (shorter than, equal to and across the window and memory chunks).

A symbolic T sends each torch-backend op to its shape-polymorphic ("traceable") path (no Python branch or
loop on T); eager calls keep the fast paths. The traceable paths are also checked directly, eagerly,
against the naive references (forward, and gradients where the model trains through them), and each op
is exported alone, traced at a length below its chunk, to show it adds no guard on T.

Known limitation (torch 2.13): recording a tensor whose symbolic size may be 1 can add a guard on it
(contiguity and channels-last metadata of every graph node: dim 1 of any 4-D/5-D tensor, every dim of a
contiguous one; pytorch/pytorch#185084 fixes the contiguous case upstream), and a guard on T is an
export error. The ops avoid such tensors (one extra chunk or block of padding, gathers instead of
slices to T). The eidetic memory cannot: its keys are (b, ceil(T/w), m_e, Hkv, D) by the op's contract,
ceil(T/w) = 1 for T <= w, so the ``bmojo`` layer exports with
``torch.fx.experimental._config.backed_size_oblivious`` (no guard on sizes that may be 0 or 1).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import bmojo.ops as ops
from bmojo import BMojoForCausalLM
from bmojo.backends.torch.attention import parallel as blocksparse
from bmojo.backends.torch.causal_conv1d import parallel as torch_conv
from bmojo.backends.torch.innovation import chunk as innovation
from bmojo.backends.torch.selective_scan import chunk as scan
from bmojo_testing import lively, tiny_config

_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
pytestmark = pytest.mark.skipif(
    _TORCH < (2, 13), reason=f"dynamic-length export is verified on torch 2.13; torch 2.6's symbolic shapes add guards "
    f"on T that export rejects (installed: {torch.__version__})")

LENGTHS = [3, 8, 9, 21, 37]  # w = 8: shorter than, equal to and across the window and memory chunks
TRACE_T = 21
FORBIDDEN = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


def _no_host_reads(program):
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    bad = sorted(t for t in targets if t.startswith(FORBIDDEN))
    assert not bad, bad


def _size_oblivious(layer_types):
    """See the module docstring: the memory keys' chunk axis needs it on torch 2.13."""
    if "bmojo" not in layer_types:
        return contextlib.nullcontext()
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


# ----------------------------------------------------------------------------- the whole model

class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(ids, attention_mask=mask, use_cache=False).logits


def _inputs(T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : max(1, T // 3)] = 0  # row 1 left-padded
    return ids, mask


@pytest.mark.parametrize("layer_types", [
    ["attention"] * 2, ["sliding_attention"] * 2, ["mamba"] * 2, ["bmojo_f"] * 2, ["bmojo"] * 2,
    ["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"],
], ids=lambda lt: lt[0] if len(set(lt)) == 1 else "mixed")
def test_export_dynamic_length_reproduces_eager(layer_types):
    torch.manual_seed(0)
    model = lively(BMojoForCausalLM(tiny_config(layer_types))).eval()
    T = torch.export.Dim("T", min=2, max=4096)
    with _size_oblivious(layer_types):
        program = torch.export.export(_Logits(model), _inputs(TRACE_T, 0), dynamic_shapes=({1: T}, {1: T}),
                                      strict=False)
    _no_host_reads(program)
    exported = program.module()
    for t in LENGTHS:
        ids, mask = _inputs(t, t)
        with torch.no_grad():
            got, want = exported(ids, mask), model(ids, attention_mask=mask).logits
        assert got.shape == want.shape == (2, t, 64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"T={t}: {m}")


# ----------------------------------------------------------------------------- routing

def test_eager_calls_keep_the_fast_paths(monkeypatch):
    """Only a symbolic T takes the traceable paths: eager calls run exactly what they ran before."""
    def boom(*a, **k):
        raise AssertionError("traceable path taken eagerly")

    monkeypatch.setattr(scan, "selective_scan_traceable", boom)
    monkeypatch.setattr(torch_conv, "causal_conv1d_traceable", boom)
    monkeypatch.setattr(blocksparse, "_traceable_attention", boom)
    monkeypatch.setattr(innovation, "innovation_select_traceable", boom)
    model = BMojoForCausalLM(tiny_config(["bmojo", "mamba", "sliding_attention"])).eval()
    ids, mask = _inputs(21, 0)
    with torch.no_grad():
        model(ids, attention_mask=mask)


# ----------------------------------------------------------------------------- traceable paths vs references

def _grads(out, inputs):
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1234)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in out)
    return [o.detach() for o in out], torch.autograd.grad(loss, inputs, allow_unused=True)


def _close(a, e, name, tol=1e-4):
    assert a is not None and torch.isfinite(a).all(), name
    mag = max(e.abs().amax().item(), 1.0) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * mag, msg=lambda m: f"{name}: {m}")


def _scan_inputs(b, T, d, N, G, extras, dt_scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt_target = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    t = dict(x=torch.randn(b, T, d, generator=g), dt=0.5 * torch.randn(b, T, d, generator=g),
             A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1),
             B=torch.randn((b, T, N) if G is None else (b, T, G, N), generator=g),
             C=torch.randn((b, T, N) if G is None else (b, T, G, N), generator=g))
    if dt_scale is not None:
        t["dt"] = torch.full((b, T, d), float(dt_scale))
    if extras:
        t.update(D=torch.randn(d, generator=g), z=torch.randn(b, T, d, generator=g),
                 dt_bias=dt_target + torch.log(-torch.expm1(-dt_target)),  # inverse softplus
                 initial_state=torch.randn(b, d, N, generator=g))
    return {k: v.requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("T, chunk, G, extras", [
    (1, 4, None, True), (7, 4, None, True), (8, 4, 2, False), (37, 5, 3, True), (37, 16, None, True),
    (130, 128, 2, True), (3, 128, None, False),
])
def test_traceable_scan_matches_reference(T, chunk, G, extras):
    """Odd lengths, lengths across chunk boundaries, a non-power-of-two chunk; outputs, final state and
    every gradient."""
    t = _scan_inputs(2, T, 6, 4, G, extras)
    names = list(t)
    got, g_got = _grads(scan.selective_scan_traceable(**t, return_final_state=True, chunk_size=chunk),
                        [t[n] for n in names])
    want, g_want = _grads(ops.selective_scan_ref(**t, return_final_state=True), [t[n] for n in names])
    assert got[1].dtype == torch.float32 and got[1].shape == want[1].shape
    _close(got[0], want[0], "y")
    _close(got[1], want[1], "final_state")
    for n, a, e in zip(names, g_got, g_want):
        _close(a, e, f"d{n}")


def test_traceable_scan_large_decays_stay_finite():
    t = _scan_inputs(1, 50, 4, 4, None, True, dt_scale=30.0)
    names = list(t)
    got, g_got = _grads(scan.selective_scan_traceable(**t, return_final_state=True, chunk_size=8),
                        [t[n] for n in names])
    want, g_want = _grads(ops.selective_scan_ref(**t, return_final_state=True), [t[n] for n in names])
    _close(got[0], want[0], "y")
    for n, a, e in zip(names, g_got, g_want):
        _close(a, e, f"d{n}")


@pytest.mark.parametrize("T", [1, 2, 3, 9])
@pytest.mark.parametrize("K, with_state", [(2, False), (4, False), (4, True)])
def test_traceable_conv_matches_reference_and_fast_path(T, K, with_state):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 6, generator=g, requires_grad=True)
    w = torch.randn(6, K, generator=g, requires_grad=True)
    bias = torch.randn(6, generator=g)
    state = torch.randn(2, 6, K - 1, generator=g) if with_state else None
    got, g_got = _grads(torch_conv.causal_conv1d_traceable(x, w, bias, "silu", state, True), [x, w])
    want, g_want = _grads(ops.causal_conv1d_ref(x, w, bias, "silu", state, True), [x, w])
    fast = torch_conv.causal_conv1d_torch(x, w, bias, "silu", state, True)
    assert torch.equal(got[0], fast[0].detach()) and torch.equal(got[1], fast[1])  # same arithmetic
    _close(got[0], want[0], "y", 1e-5)
    assert torch.equal(got[1], want[1])
    for n, a, e in zip("xw", g_got, g_want):
        _close(a, e, f"d{n}", 1e-5)


ATTN_CASES = [
    # (b, T, Hq, Hkv, D, window, fading_window, fading, m_e, invalid, block target)
    (2, 37, 4, 2, 8, 8, 5, True, 3, True, 64),     # GQA, every memory, w does not divide T
    (1, 7, 3, 1, 8, 16, 16, True, 2, False, 64),   # T < w, memory_valid None
    (2, 63, 4, 1, 8, 12, 0, True, 2, True, 64),    # fading window 0
    (1, 40, 2, 1, 8, 8, 20, False, 0, False, 64),  # the sliding window alone
    (1, 1, 2, 1, 8, 4, 2, True, 2, True, 64),      # T = 1
    (2, 61, 3, 1, 8, 7, 9, True, 2, True, 3),      # blocks straddle memory chunks, m_f > w
    (2, 23, 2, 2, 8, 11, 4, True, 2, True, 4),     # Bq = 4 straddles chunks of 11
    (2, 33, 4, 2, 8, None, None, False, 0, False, 64),  # full causal
]


@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("q_fading", [False, True])
def test_traceable_attention_matches_reference(case, return_lse, q_fading):
    """With and without the fading keys' own queries (q_fading: cases with fading keys)."""
    b, T, Hq, Hkv, D, w, m_f, fading, m_e, invalid, target = case
    if q_fading and not fading:
        pytest.skip("q_fading needs fading keys")
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    t = dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D))
    if fading:
        t.update(k_fading=r(b, T, Hkv, D), v_fading=r(b, T, Hkv, D))
        if q_fading:
            t["q_fading"] = r(b, T, Hq, D)
    valid = None
    if m_e:
        n_chunks = -(-T // w)
        t.update(k_memory=r(b, n_chunks, m_e, Hkv, D), v_memory=r(b, n_chunks, m_e, Hkv, D))
        if invalid:
            valid = torch.rand(b, n_chunks, m_e, generator=g) > 0.35
            valid[:, 0] = False
    names = list(t)
    kw = dict(window=w, fading_window=m_f, memory_valid=valid, return_lse=return_lse)
    full = {**dict(k_fading=None, v_fading=None, k_memory=None, v_memory=None, q_fading=None), **t}
    Bq = None if w is None else blocksparse._pick_block(w, target)
    got, g_got = _grads(blocksparse._traceable_attention(
        full["q"], full["k"], full["v"], w, full["k_fading"], full["v_fading"], w if m_f is None else m_f,
        full["k_memory"], full["v_memory"], valid, D ** -0.5, return_lse, Bq, full["q_fading"]), [t[n] for n in names])
    want, g_want = _grads(ops.bmojo_attention_ref(**t, **kw), [t[n] for n in names])
    _close(got[0], want[0], "o")
    if return_lse:
        _close(got[1], want[1], "lse")
    for n, a, e in zip(names, g_got, g_want):
        if a is None or e is None:  # keys never visible (fading window 0): no gradient, or zeros
            assert all(x is None or torch.count_nonzero(x) == 0 for x in (a, e)), n
            continue
        _close(a, e, f"d{n}")


@pytest.mark.parametrize("w, slots", [(1, 3), (3, 2), (8, 3), (8, 20), (16, 5)])
def test_traceable_selection_equals_chunked_and_reference(w, slots):
    """Exactly the same positions and validity, ties (runs of equal f) going to the earlier position."""
    for T in [1, 2, 3, 8, 9, 17, 21, 37, 100]:
        for tie in (False, True):
            g = torch.Generator().manual_seed(T)
            f = torch.randn(2, T, 4, generator=g)
            if tie:
                f = torch.randn(2, (T + 3) // 4, 4, generator=g).repeat_interleave(4, 1)[:, :T]
                f[:, ::3] = 0
            got = innovation.innovation_select_traceable(f, w, slots, 2)
            fast = innovation.innovation_select_chunked(f, w, slots, 2)
            ref = ops.innovation_select_ref(f, w, slots, 2)
            for a, b_, r in zip(got, fast, ref):
                assert a.shape == r.shape and torch.equal(a, b_) and torch.equal(a, r), (T, tie)


# ----------------------------------------------------------------------------- each op exported alone

class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _export_op(fn, make, dims, trace_T, lengths):
    """Export fn(*make(T)) with the dims in ``dims`` dynamic, traced at ``trace_T`` (below the op's chunk
    or block), then compare with the eager op at other lengths."""
    T = torch.export.Dim("T", min=2, max=4096)
    program = torch.export.export(_Op(fn), make(trace_T), strict=False,
                                  dynamic_shapes=(tuple({1: T} if d else None for d in dims),))
    _no_host_reads(program)
    for t in lengths:
        args = make(t)
        with torch.no_grad():
            got, want = program.module()(*args), fn(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for a, e in zip(got, want):
            assert a.shape == e.shape, (t, a.shape, e.shape)
            torch.testing.assert_close(a, e, atol=1e-5, rtol=0, msg=lambda m: f"T={t}: {m}")


def test_scan_exports_alone():
    d, N = 6, 4
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1)

    def fn(x, dt, B, C, z, h0):
        return scan.selective_scan_chunked(x, dt, A, B, C, D=torch.ones(d), z=z, dt_bias=torch.zeros(d),
                                           initial_state=h0, return_final_state=True, chunk_size=8)

    def make(T):
        g = torch.Generator().manual_seed(T)
        return (*(torch.randn(2, T, s, generator=g) for s in (d, d, N, N, d)), torch.randn(2, d, N, generator=g))

    _export_op(fn, make, (1, 1, 1, 1, 1, 0), 3, [2, 7, 8, 9, 37])


def test_conv_exports_alone():
    w, bias = torch.randn(6, 4), torch.randn(6)
    _export_op(lambda x, s: torch_conv.causal_conv1d_torch(x, w, bias, "silu", s, True),
               lambda T: (torch.randn(2, T, 6), torch.randn(2, 6, 3)), (1, 0), 2, [3, 9])


def test_scores_export_alone():
    hist = torch.randn(2, 4, 5)
    _export_op(lambda f: (innovation.innovation_scores_inplace(f, 4), innovation.innovation_scores_inplace(f, 4, hist)),
               lambda T: (torch.randn(2, T, 5),), (1,), 2, [3, 9])


def test_selection_exports_alone():
    _export_op(lambda f: innovation.innovation_select_chunked(f, 8, 3, 4), lambda T: (torch.randn(2, T, 5),), (1,),
               3, [2, 8, 9, 21, 37])


@pytest.mark.parametrize("window, target, lse", [(8, 64, False), (7, 3, True), (None, 64, True)])
def test_attention_exports_alone(window, target, lse):
    """Window and fading bands (memory keys come with a chunk axis, see the module docstring), and full
    causal attention with the log-sum-exp."""
    def fn(q, k, v, kf, vf):
        if window is None:
            return blocksparse.bmojo_attention_blocksparse(q, k, v, return_lse=lse)
        return blocksparse.bmojo_attention_blocksparse(q, k, v, window, kf, vf, 5, return_lse=lse, block_size=target)

    def make(T):
        g = torch.Generator().manual_seed(T)
        return (torch.randn(2, T, 4, 8, generator=g), *(torch.randn(2, T, 2, 8, generator=g) for _ in range(4)))

    _export_op(fn, make, (1,) * 5, 3, [2, 8, 9, 21, 37])


def test_attention_with_fading_queries_exports_alone():
    """The fading keys scored with their own queries (q_fading) add no guard on T either."""
    def fn(q, k, v, kf, vf, qf):
        return blocksparse.bmojo_attention_blocksparse(q, k, v, 7, kf, vf, 5, return_lse=True, block_size=3,
                                                       q_fading=qf)

    def make(T):
        g = torch.Generator().manual_seed(T)
        return (torch.randn(2, T, 4, 8, generator=g), *(torch.randn(2, T, 2, 8, generator=g) for _ in range(4)),
                torch.randn(2, T, 4, 8, generator=g))

    _export_op(fn, make, (1,) * 6, 3, [2, 8, 9, 21, 37])


def test_attention_with_memory_exports_alone():
    """Memory keys have ceil(T/w) chunks: exported with T = w * chunks, chunks traced at 3."""
    w = 7  # block target 3: blocks of 3 straddle chunks of 7

    def fn(q, k, v, kf, vf, km, vm, valid):
        return blocksparse.bmojo_attention_blocksparse(q, k, v, w, kf, vf, 5, km, vm, valid, return_lse=True,
                                                       block_size=3)

    def make(n):
        g = torch.Generator().manual_seed(n)
        T = w * n
        return (torch.randn(2, T, 4, 8, generator=g), *(torch.randn(2, T, 2, 8, generator=g) for _ in range(4)),
                torch.randn(2, n, 3, 2, 8, generator=g), torch.randn(2, n, 3, 2, 8, generator=g),
                torch.rand(2, n, 3, generator=g) > 0.3)

    C = torch.export.Dim("C", min=2, max=512)
    program = torch.export.export(_Op(fn), make(3), dynamic_shapes=(({1: w * C},) * 5 + ({1: C},) * 3,), strict=False)
    _no_host_reads(program)
    for n in (2, 5):
        args = make(n)
        with torch.no_grad():
            for a, e in zip(program.module()(*args), fn(*args)):
                torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
