"""Backend dispatch: clear errors for backends that cannot run, implementations registered per device type,
one warning per fallback (naming the op, the backend and the reason)."""
import warnings

import pytest
import torch

from bmojo import ops
from bmojo.ops import registry


def _scan_args(T=5, d=4, N=3):
    return (torch.randn(1, T, d), torch.randn(1, T, d), -torch.rand(d, N), torch.randn(1, T, N), torch.randn(1, T, N))


def test_unknown_backend_names_the_value():
    with pytest.raises(ValueError, match="'tpu'"):
        ops.selective_scan(*_scan_args(), backend="tpu")


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(ops.BackendUnavailableError, match="neuron"):
        ops.selective_scan(*_scan_args(), backend="neuron")


def test_auto_on_cpu_is_torch_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.selective_scan(*_scan_args(), backend="auto")
    assert y.shape == (1, 5, 4)
    assert "torch" in ops.available_backends("cpu")


def test_fallback_for_a_missing_kernel_warns_once(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "partial", registry.Backend(
        "partial", "bmojo.backends.torch", lambda: None, ("cpu",), _ops={}))
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no selective_scan kernel"):
        ops.selective_scan(*_scan_args(), backend="partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.selective_scan(*_scan_args(), backend="partial")  # second call: silent


def test_bad_shapes_name_the_tensor():
    x, dt, A, B, C = _scan_args()
    with pytest.raises(ValueError, match="A must be"):
        ops.selective_scan(x, dt, A[:2], B, C)
    with pytest.raises(ValueError, match="k_memory"):
        q = torch.randn(1, 9, 2, 4)
        ops.bmojo_attention(q, q, q, window=4, k_memory=torch.randn(1, 2, 3, 2, 4), v_memory=torch.randn(1, 2, 3, 2, 4))


def _record(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


def test_implementations_resolve_per_device_type(monkeypatch):
    """An OPS entry may be a table by device type, with a default for the others."""
    def on_cpu(*a, **k):
        return "cpu"

    def elsewhere(*a, **k):
        return "default"

    monkeypatch.setitem(registry._BACKENDS, "tabled", registry.Backend(
        "tabled", "bmojo.backends.torch", lambda: None, ("cpu", "meta"),
        _ops={"selective_scan": {"cpu": on_cpu, "default": elsewhere}, "causal_conv1d": {"meta": elsewhere}}))
    monkeypatch.setattr(registry, "_warned", set())
    assert registry.resolve("selective_scan", "tabled", torch.device("cpu")) is on_cpu
    assert registry.resolve("selective_scan", "tabled", torch.device("meta")) is elsewhere
    assert registry.for_device(on_cpu, torch.device("xla")) is on_cpu
    assert registry.for_device({"cpu": on_cpu}, torch.device("xla")) is None
    # a table without this device type (and no default) is a missing kernel: the torch backend, announced once
    fn, msgs = _record(lambda: registry.resolve("causal_conv1d", "tabled", torch.device("cpu")))
    assert fn is registry.torch_implementation("causal_conv1d", torch.device("cpu"))
    assert len(msgs) == 1 and "'tabled'" in msgs[0] and "causal_conv1d" in msgs[0] and "for cpu tensors" in msgs[0]
    assert not _record(lambda: registry.resolve("causal_conv1d", "tabled", torch.device("cpu")))[1]


def test_auto_fallback_names_the_op_the_backend_and_the_reason(monkeypatch):
    monkeypatch.setattr(registry._BACKENDS["cuda"], "unavailable", lambda: "triton is not importable (test)")
    monkeypatch.setattr(registry, "_warned", set())
    dev = torch.device("cuda")  # no tensor is made: only the resolution is checked
    fn, msgs = _record(lambda: registry.resolve("selective_scan", "auto", dev))
    assert fn is registry.torch_implementation("selective_scan", dev)
    assert fn.__name__ == "selective_scan_chunked_exp"  # the torch backend's registration for CUDA tensors
    assert len(msgs) == 1 and "'cuda'" in msgs[0] and "selective_scan" in msgs[0] and "triton is not importable" in msgs[0]
    assert not _record(lambda: registry.resolve("bmojo_attention", "auto", dev))[1]  # once per backend


def _segments(seed=3):
    g = torch.Generator().manual_seed(seed)
    b, Hq, Hkv, D = 2, 4, 2, 8
    sizes = (5, 3, 7)
    ks = tuple(torch.randn(b, n, Hkv, D, generator=g) for n in sizes)
    vs = tuple(torch.randn(b, n, Hkv, D, generator=g) for n in sizes)
    valids = tuple(torch.rand(b, n, generator=g) < 0.6 for n in sizes)
    valids[0][:, 0] = True
    return torch.randn(b, Hq, D, generator=g), ks, vs, valids


def _no_segments_backend(monkeypatch):
    """A backend whose attention_decode reads one cache only (no ``segments`` attribute)."""
    def attention_decode(q, k, v, valid=None, scale=None):
        assert torch.is_tensor(k), "segments reached a kernel that cannot read them"
        return ops.attention_decode_ref(q, k, v, valid, scale)

    monkeypatch.setitem(registry._BACKENDS, "noseg", registry.Backend(
        "noseg", "bmojo.backends.torch", lambda: None, ("cpu",), _ops={"attention_decode": attention_decode}))
    monkeypatch.setattr(registry, "_warned", set())


def test_attention_decode_concatenates_segments_with_one_warning(monkeypatch):
    """The public op, for a backend that cannot read a cache held in segments: concatenated, announced once."""
    _no_segments_backend(monkeypatch)
    q, ks, vs, valids = _segments()
    want = ops.attention_decode_ref(q, torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(valids, 1))
    got, msgs = _record(lambda: ops.attention_decode(q, ks, vs, valids, backend="noseg"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(msgs) == 1 and "attention_decode" in msgs[0] and "'noseg'" in msgs[0] and "segments" in msgs[0]
    assert not _record(lambda: ops.attention_decode(q, ks, vs, valids, backend="noseg"))[1]
    # the model's resolved table says the same, once for both
    table, msgs = _record(lambda: registry.OpTable("noseg", torch.device("cpu")))
    assert not [m for m in msgs if "segments" in m]
    torch.testing.assert_close(table.attention_decode(q, ks, vs, valids), want, atol=1e-5, rtol=1e-5)
    # the torch backend reads them in place, silently
    got, msgs = _record(lambda: ops.attention_decode(q, ks, vs, valids, backend="torch"))
    assert not msgs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_op_table_warns_once_for_a_decode_kernel_without_segments(monkeypatch):
    _no_segments_backend(monkeypatch)
    _, msgs = _record(lambda: registry.OpTable("noseg", torch.device("cpu")))
    assert len([m for m in msgs if "segments" in m and "'noseg'" in m]) == 1
    _, msgs = _record(lambda: registry.OpTable("noseg", torch.device("cpu")))
    assert not [m for m in msgs if "segments" in m]


# ----------------------------------------------------------------------------- optional capabilities

def _attention_without_fading_queries(monkeypatch, resumes=True):
    """A backend whose bmojo_attention takes no q_fading (no ``fading_query``): it records its calls."""
    calls = []

    def bmojo_attention(q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                        v_memory=None, memory_valid=None, scale=None, return_lse=False, q_start=None):
        calls.append(q_start)
        return ops.bmojo_attention_ref(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory,
                                       memory_valid, scale, return_lse, q_start)

    bmojo_attention.resumes = resumes
    monkeypatch.setitem(registry._BACKENDS, "noqf", registry.Backend(
        "noqf", "bmojo.backends.torch", lambda: None, ("cpu",), _ops={"bmojo_attention": bmojo_attention}))
    monkeypatch.setattr(registry, "_warned", set())
    return calls


def test_q_fading_on_a_kernel_without_it_goes_to_torch_with_one_warning(monkeypatch):
    calls = _attention_without_fading_queries(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q, qf = torch.randn(1, 11, 2, 4, generator=g), torch.randn(1, 11, 2, 4, generator=g)
    k, v, kf, vf = (torch.randn(1, 11, 1, 4, generator=g) for _ in range(4))
    kw = dict(window=4, k_fading=kf, v_fading=vf)
    want = ops.bmojo_attention_ref(q, k, v, q_fading=qf, **kw)
    got, msgs = _record(lambda: ops.bmojo_attention(q, k, v, q_fading=qf, backend="noqf", **kw))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not calls  # the torch backend ran it
    assert len(msgs) == 1 and "bmojo_attention" in msgs[0] and "'noqf'" in msgs[0] and "q_fading" in msgs[0]
    assert not _record(lambda: ops.bmojo_attention(q, k, v, q_fading=qf, backend="noqf", **kw))[1]
    # without q_fading (or with q_fading=None, as a layer may pass it) the kernel runs, silently
    got, msgs = _record(lambda: ops.bmojo_attention(q, k, v, backend="noqf", **kw))
    assert not msgs and calls == [None]
    table, msgs = _record(lambda: registry.OpTable("noqf", torch.device("cpu")))
    torch.testing.assert_close(table.bmojo_attention(q, k, v, q_fading=None, **kw), ops.bmojo_attention_ref(q, k, v, **kw))
    assert calls == [None, None]
    # the model's table routes the same way, and q_start still reaches a kernel that resumes
    torch.testing.assert_close(table.bmojo_attention(q, k, v, q_fading=qf, **kw), want, atol=1e-5, rtol=1e-5)
    start = torch.tensor([5])
    table.bmojo_attention(q, k, v, q_start=start, **kw)
    assert calls == [None, None, start]
    assert not _record(lambda: table.bmojo_attention(q, k, v, q_fading=qf, **kw))[1]


def test_q_fading_and_q_start_on_a_kernel_with_neither(monkeypatch):
    """Both capabilities missing: each argument announced once, by name; the torch backend computes both."""
    calls = _attention_without_fading_queries(monkeypatch, resumes=False)
    g = torch.Generator().manual_seed(1)
    q, qf = torch.randn(2, 3, 2, 4, generator=g), torch.randn(2, 3, 2, 4, generator=g)
    k, v = torch.randn(2, 7, 1, 4, generator=g), torch.randn(2, 7, 1, 4, generator=g)
    kf, vf = torch.randn(2, 10, 1, 4, generator=g), torch.randn(2, 10, 1, 4, generator=g)
    start = torch.tensor([2, 9])
    kw = dict(window=4, k_fading=kf, v_fading=vf, fading_window=3, q_start=start)
    fn = registry.resolve_resuming("noqf", torch.device("cpu"))
    got, msgs = _record(lambda: fn(q, k, v, q_fading=qf, **kw))
    torch.testing.assert_close(got, ops.bmojo_attention_ref(q, k, v, q_fading=qf, **kw), atol=1e-5, rtol=1e-5)
    assert len(msgs) == 1 and "before its queries" in msgs[0]
    got, msgs = _record(lambda: fn(q[:, :1], k[:, :4], v[:, :4], window=4, k_fading=kf[:, :4], v_fading=vf[:, :4],
                                   q_start=start, q_fading=None))
    assert not msgs and not calls
    q0, k0, v0 = q[:, :3], k[:, :3], v[:, :3]
    got, msgs = _record(lambda: fn(q0, k0, v0, window=4, k_fading=kf[:, :3], v_fading=vf[:, :3], q_fading=qf))
    assert len(msgs) == 1 and "q_fading" in msgs[0] and "'noqf'" in msgs[0] and not calls


def test_per_segment_queries_on_a_decode_kernel_without_them_go_to_torch(monkeypatch):
    """attention_decode with one query per segment, on a kernel without ``segment_queries``: the torch
    backend reads the segments with their queries, announced once (public op and the model's table)."""
    _no_segments_backend(monkeypatch)
    q, ks, vs, valids = _segments()
    qf = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    qs = (q, qf, q)
    want = ops.attention_decode_ref(qs, ks, vs, valids)
    got, msgs = _record(lambda: ops.attention_decode(qs, ks, vs, valids, backend="noseg"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(msgs) == 1 and "attention_decode" in msgs[0] and "'noseg'" in msgs[0] and "own query" in msgs[0]
    assert not _record(lambda: ops.attention_decode(qs, ks, vs, valids, backend="noseg"))[1]
    monkeypatch.setattr(registry, "_warned", set())
    table, _ = _record(lambda: registry.OpTable("noseg", torch.device("cpu")))
    got, msgs = _record(lambda: table.attention_decode(qs, ks, vs, valids))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(msgs) == 1 and "own query" in msgs[0]
    assert not _record(lambda: table.attention_decode(qs, ks, vs, valids))[1]
    # one query for every segment still reaches the kernel (concatenated)
    torch.testing.assert_close(table.attention_decode(q, ks, vs, valids),
                               ops.attention_decode_ref(q, ks, vs, valids), atol=1e-5, rtol=1e-5)
    # the torch backend takes them itself, silently
    assert not _record(lambda: ops.attention_decode(qs, ks, vs, valids, backend="torch"))[1]
