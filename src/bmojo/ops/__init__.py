"""The op API the model calls (docs/design.md, "Op API and backends"): each op's contract, its shape
checks and its dispatch. Every op takes ``backend`` ("auto", "torch", "cuda", "neuron") and dispatches
through :mod:`bmojo.ops.registry` to ``bmojo.backends.<name>.OPS``. Layout is token-major: (batch, T, ...).

The naive oracles, one self-contained module per op in :mod:`bmojo.ops.reference`, are re-exported here
with a ``_ref`` suffix. The implementations live in ``bmojo.backends.<name>.<op>`` (repository folder
``backends/<name>/<op>/``).
"""
from __future__ import annotations

import torch

from .reference import (
    attention_decode_ref,
    attention_decode_weights_ref,
    bmojo_attention_ref,
    bmojo_attention_weights_ref,
    bmojo_visibility_masks,
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    innovation_scores_ref,
    innovation_select_ref,
    selective_scan_ref,
    selective_state_update_ref,
    ssd_scan_ref,
    ssd_state_update_ref,
)
from . import registry
from .registry import (
    BACKEND_NAMES,
    Kernels,
    OpTable,
    OP_NAMES,
    BackendUnavailableError,
    available_backends,
    register_backend,
    resolve,
    resolve_resuming,
)

__all__ = [
    "selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update",
    "bmojo_attention", "attention_decode", "innovation_select", "innovation_scores", "merge_memory",
    "available_backends", "register_backend", "Kernels", "OpTable", "BackendUnavailableError", "BACKEND_NAMES", "OP_NAMES",
    "selective_scan_ref", "selective_state_update_ref", "causal_conv1d_ref", "causal_conv1d_update_ref",
    "bmojo_attention_ref", "attention_decode_ref", "innovation_select_ref", "innovation_scores_ref",
    "bmojo_attention_weights_ref", "attention_decode_weights_ref", "bmojo_visibility_masks",
    "ssd_scan", "ssd_state_update", "ssd_scan_ref", "ssd_state_update_ref",
]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias, token_axis: bool):
    lead = "(b, T, d)" if token_axis else "(b, d)"
    nd = 3 if token_axis else 2
    _check(x.dim() == nd, f"selective_scan: x must be {lead}, got shape {tuple(x.shape)}")
    _check(dt.shape == x.shape, f"selective_scan: dt must match x {tuple(x.shape)}, got {tuple(dt.shape)}")
    d = x.shape[-1]
    _check(A.dim() == 2 and A.shape[0] == d, f"selective_scan: A must be (d={d}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        _check(not (t.dim() == 2 and token_axis and tuple(t.shape) == (d, N)),
               f"selective_scan: {name} of shape {tuple(t.shape)} is a time-invariant (d, N) matrix (mamba-ssm's "
               f"non-selective form), which is not supported: pass it per token, {lead[:-2]}N)")
        _check(t.shape[: nd - 1] == x.shape[: nd - 1] and t.shape[-1] == N and t.dim() in (nd, nd + 1),
               f"selective_scan: {name} must be {lead[:-2]}N) or {lead[:-2]}G, N) with N={N}, got {tuple(t.shape)}")
        if t.dim() == nd + 1:
            _check(d % t.shape[-2] == 0, f"selective_scan: groups G={t.shape[-2]} of {name} must divide d={d}")
    _check(B.shape == C.shape, f"selective_scan: B and C must have the same shape (groups included), "
                               f"got B {tuple(B.shape)} and C {tuple(C.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        _check(t is None or t.shape == (d,), f"selective_scan: {name} must be (d={d},), got {None if t is None else tuple(t.shape)}")
    _check(z is None or z.shape == x.shape, f"selective_scan: z must match x {tuple(x.shape)}, got {None if z is None else tuple(z.shape)}")


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
                   return_final_state=False, backend=None):
    """Selective scan (Mamba-1). x, dt, z (b, T, d); A (d, N); B, C (b, T, N) or (b, T, G, N); D, dt_bias
    (d,); initial_state (b, d, N) fp32. Returns y (b, T, d) [and the final state (b, d, N) fp32]."""
    _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias, token_axis=True)
    if initial_state is not None:
        _check(initial_state.shape == (x.shape[0], x.shape[2], A.shape[1]),
               f"selective_scan: initial_state must be (b, d, N)={(x.shape[0], x.shape[2], A.shape[1])}, got {tuple(initial_state.shape)}")
    fn = resolve("selective_scan", backend, x.device)
    return fn(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
              initial_state=initial_state, return_final_state=return_final_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, backend=None):
    """One decoding step of the scan: state (b, d, N) fp32 updated in place; x, dt, z (b, d);
    B, C (b, N) or (b, G, N). Returns y (b, d)."""
    _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias, token_axis=False)
    _check(state.shape == (x.shape[0], x.shape[1], A.shape[1]),
           f"selective_state_update: state must be (b, d, N)={(x.shape[0], x.shape[1], A.shape[1])}, got {tuple(state.shape)}")
    fn = resolve("selective_state_update", backend, x.device)
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def _check_ssd(op, x, dt, A, B, C, D, z, dt_bias, dt_limit, token_axis: bool):
    """Shapes, groups and dtypes of the SSD scan's arguments (``token_axis``: the scan; else the step)."""
    lead, nd = ("(b, T, ", 4) if token_axis else ("(b, ", 3)
    _check(torch.is_tensor(x) and x.dim() == nd, f"{op}: x must be {lead}H, P), got "
                                                 f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    H, P = x.shape[-2:]
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias)):
        _check((t is None and name in ("D", "z", "dt_bias")) or (torch.is_tensor(t) and t.is_floating_point()),
               f"{op}: {name} must be a floating-point tensor, got "
               f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
    _check(dt.shape == x.shape[:-1], f"{op}: dt must be {lead}H) = {tuple(x.shape[:-1])}, got {tuple(dt.shape)}")
    _check(A.shape == (H,), f"{op}: A must be (H={H},) (one decay rate per head), got {tuple(A.shape)}")
    _check(B.dim() == nd and B.shape[: nd - 2] == x.shape[: nd - 2],
           f"{op}: B must be {lead}G, N) with the leading sizes of x {tuple(x.shape[: nd - 2])}, got {tuple(B.shape)}")
    _check(B.shape == C.shape, f"{op}: B and C must have the same shape (groups included), "
                               f"got B {tuple(B.shape)} and C {tuple(C.shape)}")
    G = B.shape[-2]
    _check(G >= 1 and H % G == 0, f"{op}: the groups G={G} of B and C must divide the heads H={H}")
    _check(D is None or D.shape in ((H,), (H, P)), f"{op}: D must be (H={H},) or (H, P)={(H, P)}, "
                                                   f"got {None if D is None else tuple(D.shape)}")
    _check(dt_bias is None or dt_bias.shape == (H,),
           f"{op}: dt_bias must be (H={H},), got {None if dt_bias is None else tuple(dt_bias.shape)}")
    _check(z is None or z.shape == x.shape, f"{op}: z must match x {tuple(x.shape)}, got {None if z is None else tuple(z.shape)}")
    ok = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
    if ok:
        try:
            lo, hi = float(dt_limit[0]), float(dt_limit[1])
        except (TypeError, ValueError):
            ok = False
        else:
            ok = lo == lo and hi == hi and lo <= hi  # no NaN, lo <= hi
    _check(ok, f"{op}: dt_limit must be a pair of numbers (lo, hi) with lo <= hi, got {dt_limit!r}")


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")),
             initial_state=None, return_final_state=False, backend=None):
    """SSD scan (Mamba-2). x, z (b, T, H, P); dt (b, T, H); A, dt_bias (H,); B, C (b, T, G, N) with G | H
    (head h reads group h // (H / G)); D (H,) or (H, P); initial_state (b, H, P, N) fp32.

    dt' = clamp(softplus(dt + dt_bias), *dt_limit) (no softplus if ``dt_softplus`` is False);
    h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T; y_t = h_t C_t + D x_t; y *= silu(z).
    Returns y (b, T, H, P) in x's dtype [and the final state (b, H, P, N) fp32]."""
    _check_ssd("ssd_scan", x, dt, A, B, C, D, z, dt_bias, dt_limit, token_axis=True)
    b, _, H, P = x.shape
    want = (b, H, P, B.shape[-1])
    _check(initial_state is None or (torch.is_tensor(initial_state) and initial_state.shape == want),
           f"ssd_scan: initial_state must be (b, H, P, N)={want}, got "
           f"{None if initial_state is None else tuple(initial_state.shape)}")
    _check(initial_state is None or initial_state.dtype == torch.float32,
           f"ssd_scan: initial_state must be float32 (the state is kept in fp32), got {getattr(initial_state, 'dtype', None)}")
    fn = resolve("ssd_scan", backend, x.device)
    return fn(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
              initial_state=initial_state, return_final_state=return_final_state)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                     dt_limit=(0.0, float("inf")), backend=None):
    """One decoding step of the SSD scan: state (b, H, P, N) fp32 updated in place; x, z (b, H, P);
    dt (b, H); B, C (b, G, N). Returns y (b, H, P)."""
    _check_ssd("ssd_state_update", x, dt, A, B, C, D, z, dt_bias, dt_limit, token_axis=False)
    b, H, P = x.shape
    want = (b, H, P, B.shape[-1])
    _check(torch.is_tensor(state) and state.shape == want,
           f"ssd_state_update: state must be (b, H, P, N)={want}, got "
           f"{tuple(state.shape) if torch.is_tensor(state) else type(state).__name__}")
    _check(state.dtype == torch.float32, f"ssd_state_update: state must be float32 (it is updated in place), got {state.dtype}")
    fn = resolve("ssd_state_update", backend, x.device)
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit))


def _check_conv(b, d, weight, bias, activation, op: str) -> None:
    _check(weight.dim() == 2 and weight.shape[0] == d and weight.shape[1] >= 1,
           f"{op}: weight must be (d={d}, K) with K >= 1, got {tuple(weight.shape)}")
    _check(bias is None or tuple(bias.shape) == (d,), f"{op}: bias must be (d={d},), got {None if bias is None else tuple(bias.shape)}")
    _check(activation in (None, "silu", "swish"), f"{op}: activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False, backend=None):
    """Depthwise causal conv: x (b, T, d), weight (d, K), bias (d,), initial_state (b, d, K-1).
    Returns y (b, T, d) [and the final state (b, d, K-1)]."""
    _check(x.dim() == 3, f"causal_conv1d: x must be (b, T, d), got {tuple(x.shape)}")
    _check_conv(x.shape[0], x.shape[2], weight, bias, activation, "causal_conv1d")
    _check(initial_state is None or tuple(initial_state.shape) == (x.shape[0], x.shape[2], weight.shape[1] - 1),
           f"causal_conv1d: initial_state must be (b, d, K-1)={(x.shape[0], x.shape[2], weight.shape[1] - 1)}, "
           f"got {None if initial_state is None else tuple(initial_state.shape)}")
    fn = resolve("causal_conv1d", backend, x.device)
    return fn(x, weight, bias, activation, initial_state, return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """One decoding step: x (b, d), conv_state (b, d, K-1) shifted in place. Returns y (b, d)."""
    _check(x.dim() == 2, f"causal_conv1d_update: x must be (b, d), got {tuple(x.shape)}")
    _check_conv(x.shape[0], x.shape[1], weight, bias, activation, "causal_conv1d_update")
    _check(conv_state.shape == (x.shape[0], x.shape[1], weight.shape[1] - 1),
           f"causal_conv1d_update: conv_state must be (b, d, K-1)={(x.shape[0], x.shape[1], weight.shape[1] - 1)}, got {tuple(conv_state.shape)}")
    fn = resolve("causal_conv1d_update", backend, x.device)
    return fn(x, conv_state, weight, bias, activation)


def bmojo_attention(q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                    v_memory=None, memory_valid=None, scale=None, return_lse=False, q_start=None, backend=None,
                    q_fading=None):
    """One softmax over in-context, fading and memory keys (docs/design.md, "The layer").

    q (b, T, Hq, D); k, v (b, Tk, Hkv, D) and k_fading, v_fading (b, Tf, Hkv, D), Tk, Tf >= T;
    k_memory, v_memory (b, chunks, m_e, Hkv, D); memory_valid (b, chunks, m_e); q_start (b,) int64.
    Query j is at position q_start + j (default 0); the keys end with the queries' positions, so key i
    of k is at q_start - (Tk - T) + i (earlier ones: a decoding state's window) and likewise for the
    fading keys; keys at negative positions do not exist. Query t sees k at t-w < s <= t (s <= t when
    ``window`` is None: full causal attention), k_fading at t-w-m_f < s <= t-w, and the valid memory
    slots of its chunk t // w, memory chunk c being the chunk q_start // w + c (ceil(T / w) chunks from
    position 0; with a q_start, at least (T + w - 2) // w + 1, the most T queries can touch).
    q_fading (b, T, Hq, D) like q, when given, scores the fading keys instead of q (a separate query
    projection for the fading path); every other key is scored with q, all in one softmax. Kernels
    without it (``fading_query``) leave such calls to the torch backend, with a one-time warning.
    Returns o (b, T, Hq, D) [and the log-sum-exp (b, T, Hq) fp32]."""
    _check(q.dim() == 4, f"bmojo_attention: q must be (b, T, Hq, D), got {tuple(q.shape)}")
    b, T, Hq, D = q.shape
    _check(k.dim() == 4 and k.shape[0] == b and k.shape[1] >= T and k.shape[3] == D and v.shape == k.shape,
           f"bmojo_attention: k and v must be (b={b}, Tk >= T={T}, Hkv, D={D}), got {tuple(k.shape)} and {tuple(v.shape)}")
    _check(q_start is not None or k.shape[1] == T,
           f"bmojo_attention: {k.shape[1]} keys for {T} queries from position 0; pass q_start for keys before the queries")
    _check(q_start is None or (torch.is_tensor(q_start) and q_start.shape == (b,) and not q_start.is_floating_point()),
           f"bmojo_attention: q_start must be an integer tensor (b={b},), got {q_start if not torch.is_tensor(q_start) else (q_start.dtype, tuple(q_start.shape))}")
    _check(Hq % k.shape[2] == 0, f"bmojo_attention: query heads {Hq} must be a multiple of kv heads {k.shape[2]}")
    _check(window is None or (isinstance(window, int) and window > 0),
           f"bmojo_attention: window must be a positive int or None, got {window!r}")
    if k_fading is not None:
        _check(window is not None, "bmojo_attention: fading keys need a window")
        _check(k_fading.dim() == 4 and k_fading.shape[0] == b and k_fading.shape[1] >= T and k_fading.shape[2:] == k.shape[2:]
               and v_fading is not None and v_fading.shape == k_fading.shape,
               f"bmojo_attention: k_fading / v_fading must be (b={b}, Tf >= {T}, Hkv, D) like k, got {tuple(k_fading.shape)}")
        _check(q_start is not None or k_fading.shape[1] == T, "bmojo_attention: fading keys before the queries need q_start")
        _check(fading_window is None or (isinstance(fading_window, int) and fading_window >= 0),
               f"bmojo_attention: fading_window must be an int >= 0, got {fading_window!r}")
    if q_fading is not None:
        _check(k_fading is not None, "bmojo_attention: q_fading scores the fading keys; it needs k_fading (and a "
                                     "window: full causal attention has no fading keys)")
        _check(torch.is_tensor(q_fading) and q_fading.shape == q.shape and q_fading.dtype == q.dtype,
               f"bmojo_attention: q_fading must be shaped like q {tuple(q.shape)} ({q.dtype}), got "
               f"{(q_fading.dtype, tuple(q_fading.shape)) if torch.is_tensor(q_fading) else type(q_fading).__name__}")
    if k_memory is not None:
        _check(window is not None, "bmojo_attention: memory keys need a window (the chunk length)")
        n_chunks = -(-T // window) if q_start is None else (T + window - 2) // window + 1
        _check(k_memory.dim() == 5 and k_memory.shape[0] == b and k_memory.shape[3:] == k.shape[2:]
               and (k_memory.shape[1] == n_chunks if q_start is None else k_memory.shape[1] >= n_chunks)
               and v_memory is not None and v_memory.shape == k_memory.shape,
               f"bmojo_attention: k_memory / v_memory must be (b={b}, chunks={n_chunks}, m_e, Hkv={k.shape[2]}, D={D}), got {tuple(k_memory.shape)}")
        _check(memory_valid is None or memory_valid.shape == k_memory.shape[:3],
               f"bmojo_attention: memory_valid must be {tuple(k_memory.shape[:3])}, got {None if memory_valid is None else tuple(memory_valid.shape)}")
    fn = resolve_resuming(backend, q.device)
    kw = {} if q_start is None else {"q_start": q_start}
    if q_fading is not None:
        kw["q_fading"] = q_fading
    return fn(q, k, v, window=window, k_fading=k_fading, v_fading=v_fading, fading_window=fading_window,
              k_memory=k_memory, v_memory=v_memory, memory_valid=memory_valid, scale=scale, return_lse=return_lse, **kw)


def attention_decode(q, k, v, valid=None, scale=None, backend=None):
    """One query per row over cached keys: q (b, Hq, D); k, v (b, S, Hkv, D); valid (b, S). -> (b, Hq, D).

    k, v and valid may also be tuples of segments (b, S_i, ...) that together form the S keys, in order
    (a decoder's window ring, fading ring and memory slots): backends that read segments in place
    (``fn.segments``) get them as they are, the others get them concatenated (with a one-time warning).
    q may then be a tuple of queries, one per segment (b, Hq, D) each (the fading ring read with the fading
    query): each segment's keys are scored with its own query, in one softmax over all segments; kernels
    without it (``fn.segment_queries``) leave such calls to the torch backend (with a one-time warning).
    """
    segmented = isinstance(k, (tuple, list))
    ks, vs = (tuple(k), tuple(v)) if segmented else ((k,), (v,))
    n_valid = len(valid) if segmented and valid is not None else len(ks)
    _check(len(ks) > 0 and len(vs) == len(ks) == n_valid,
           f"attention_decode: k, v (and valid) must have the same number of segments, got {len(ks)}, {len(vs)}"
           f"{f', {n_valid}' if segmented and valid is not None else ''}")
    per_segment = isinstance(q, (tuple, list))
    qs = tuple(q) if per_segment else (q,)
    _check(not per_segment or len(qs) == len(ks),
           f"attention_decode: one query per key segment: got {len(qs)} queries for {len(ks)} segments")
    for qi in qs:
        _check(torch.is_tensor(qi) and qi.dim() == 3 and qi.shape == qs[0].shape and qi.dtype == qs[0].dtype,
               f"attention_decode: the queries must be (b, Hq, D), one shape and dtype, got "
               f"{[(x.dtype, tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__ for x in qs]}")
    q0 = qs[0]
    for ki, vi in zip(ks, vs):
        _check(q0.dim() == 3 and ki.dim() == 4 and ki.shape[0] == q0.shape[0] and ki.shape[3] == q0.shape[2]
               and vi.shape == ki.shape and ki.shape[2] == ks[0].shape[2],
               f"attention_decode: q must be (b, Hq, D) and k, v (b, S, Hkv, D), got {tuple(q0.shape)}, "
               f"{tuple(ki.shape)} and {tuple(vi.shape)}")
    _check(q0.shape[1] % ks[0].shape[2] == 0,
           f"attention_decode: query heads {q0.shape[1]} must be a multiple of kv heads {ks[0].shape[2]}")
    if valid is not None:
        for ki, mi in zip(ks, tuple(valid) if segmented else (valid,)):
            _check(torch.is_tensor(mi) and mi.dtype == torch.bool and tuple(mi.shape) == tuple(ki.shape[:2]),
                   f"attention_decode: valid must be a bool mask (b, S)={tuple(ki.shape[:2])} per segment, got "
                   f"{(mi.dtype, tuple(mi.shape)) if torch.is_tensor(mi) else type(mi).__name__}")
    name, fn = registry._resolve("attention_decode", backend, q0.device)
    if per_segment:
        if not getattr(fn, "segment_queries", False):
            registry.warn_segment_queries(name, q0.device)
            fn = registry.torch_implementation("attention_decode", q0.device)
        if not segmented:  # one segment: its query
            q = qs[0]
        else:
            return fn(qs, ks, vs, None if valid is None else tuple(valid), scale)
    if segmented and not getattr(fn, "segments", False):
        registry.warn_concatenating_segments(name, q0.device)
        k, v = torch.cat(ks, 1), torch.cat(vs, 1)
        valid = None if valid is None else torch.cat(tuple(valid), 1)
    return fn(q, k, v, valid, scale)


def innovation_select(f, window, slots, taps, backend=None):
    """Eidetic memory by innovation: f (b, T, d) -> positions (b, ceil(T/w), slots) int64 and valid (same, bool)."""
    _check(f.dim() == 3, f"innovation_select: f must be (b, T, d), got {tuple(f.shape)}")
    for name, value in (("window", window), ("slots", slots), ("taps", taps)):
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
               f"innovation_select: {name} must be a positive int, got {value!r}")
    if f.shape[1] == 0:  # no token, no chunk
        empty = torch.zeros(f.shape[0], 0, slots, dtype=torch.long, device=f.device)
        return empty, empty.bool()
    fn = resolve("innovation_select", backend, f.device)
    return fn(f, window, slots, taps)


def innovation_scores(f, taps, f_history=None, backend=None):
    """eps (b, T) fp32 of the fixed mean-of-last-``taps`` predictor; ``f_history`` (b, taps, d) precedes f.
    Not differentiated (selection is not). The decoder's scores and the parallel selection's must agree
    bitwise, so a backend implements both or neither."""
    _check(f.dim() == 3, f"innovation_scores: f must be (b, T, d), got {tuple(f.shape)}")
    _check(f_history is None or f_history.shape == (f.shape[0], taps, f.shape[2]),
           f"innovation_scores: f_history must be (b, taps, d)={(f.shape[0], taps, f.shape[2])}, "
           f"got {None if f_history is None else tuple(f_history.shape)}")
    return resolve("innovation_scores", backend, f.device)(f, taps, f_history)


def merge_memory(mem_eps, mem_pos, cand_eps, cand_pos, slots, backend=None):
    """The ``slots`` best of a memory (mem_eps, mem_pos (b, m)) and candidates (cand_eps, cand_pos
    (b, n)) by innovation, ties to the earlier position; -inf marks an empty entry. Returns eps, pos
    (b, slots) and idx (b, slots) into the concatenation [memory | candidates]."""
    _check(mem_eps.shape == mem_pos.shape and cand_eps.shape == cand_pos.shape and mem_eps.shape[0] == cand_eps.shape[0],
           f"merge_memory: eps and positions must pair up, got {tuple(mem_eps.shape)}, {tuple(mem_pos.shape)}, "
           f"{tuple(cand_eps.shape)}, {tuple(cand_pos.shape)}")
    return resolve("merge_memory", backend, mem_eps.device)(mem_eps, mem_pos, cand_eps, cand_pos, slots)
