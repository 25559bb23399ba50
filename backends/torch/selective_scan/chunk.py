"""Chunked selective scan (Mamba-1) for the torch backend: fast on CPU, exact in fp32 (the decoding
step is in ``fused_recurrent.py``; the contract and the oracle are ``bmojo.ops.selective_scan`` and
``bmojo.ops.reference.selective_scan``).

Mamba-1 decays every (channel, state) pair by its own factor ``exp(dt_t[d] * A[d, n])``, so the SSD
matrix trick (one scalar decay per head) does not apply. Instead, per chunk of ``chunk_size`` tokens:

* the decays ``a = exp2(dt * A log2 e)`` (exp2 is about twice as fast as exp on CPU; devices that do
  not lower exp2, e.g. XLA, which would run it on the host, get ``exp(dt A)``: the two entry points
  :func:`selective_scan_chunked` and :func:`selective_scan_chunked_exp`, registered per device type in
  ``bmojo.backends.torch.OPS``) and the inputs
  ``u = dt x B`` are built for the chunk only, state-major: (b, L, G, N, P), so the broadcasts and the
  contraction with C run along the long contiguous channel axis P;
* the chunk's initial state is folded into the first input (``u_0 += a_0 h0``);
* the recurrence ``h_t = a_t h_{t-1} + u_t`` is solved by an in-place odd/even (Blelloch-style)
  log-depth scan: O(L) work, ``log2 L`` levels of strided tensor ops, products of decays in [0, 1]
  only, so it stays finite for any dt >= 0 and A <= 0 (unlike ``exp(-cumsum)`` factorisations). The
  chunk buffers are reused, so the scan's strided views are built once per call and replayed;
* ``y_t = C_t h_t`` is one batched (1, N) x (N, P) product per token, written in place; the state is
  carried to the next chunk.

Why this shape: on CPU the scan is memory bound, and chunk-sized buffers (a few MB) stay in cache,
are reused across chunks, and make the Python loop run over chunks (and scan levels), never over tokens.

Inference (nothing records autograd): the dt transform (bias, softplus), the ``D`` skip and the ``z``
gate also run per chunk, on cache-resident slices, so no full-length temporaries are made.

The backward is hand-written (``_ChunkedScan``): it keeps only the chunk start states
(b, T/L, G, N, P) and recomputes each chunk's states, then runs the adjoint recurrence
``g_u_t = g_h_t + a_{t+1} g_u_{t+1}`` with the same scan, reversed. Memory stays O(b T d + b (T/L) d N)
instead of the O(b T d N) autograd would keep.

Symbolic sequence lengths (``torch.export`` with a dynamic T; see :func:`_traceable`)
take :func:`selective_scan_traceable` instead: the same recurrence with no Python control flow on T
(the loops above run over chunks and scan levels whose counts depend on T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import first_rows as _first
from ..utils import traceable as _traceable

DEFAULT_CHUNK = 128  # d=512, N=16, one thread, whole model: 64 and 128 within ~2%, 256 ~8% slower, 32 ~10% slower
LOG2E = 1.4426950408889634


def _decay_exponent(A: torch.Tensor, use_exp2: bool) -> torch.Tensor:
    """The factor of dt in the decays' exponent: ``A log2 e`` for ``exp2(dt A log2 e)``, else ``A`` for
    ``exp(dt A)`` (which one is the caller's, i.e. the registration's, choice)."""
    return A * LOG2E if use_exp2 else A


def _decays_(a: torch.Tensor, dtc: torch.Tensor, A_e: torch.Tensor, use_exp2: bool) -> None:
    """a <- exp(dt A) for one chunk, in place (a (b, L, G, N, P); dtc (b, L, G, P))."""
    torch.mul(dtc[:, :, :, None, :], A_e, out=a)
    if use_exp2:
        a.exp2_()
    else:
        a.exp_()


def _sl(start: int, count: int, n: int, reverse: bool) -> slice:
    """Physical slice of the logical positions start, start+2, ... (count of them) of a length-n axis;
    when ``reverse`` the logical axis runs backwards (logical j is physical n-1-j)."""
    if count <= 0:
        return slice(0, 0)
    if not reverse:
        return slice(start, start + 2 * (count - 1) + 1, 2)
    lo = n - 1 - (start + 2 * (count - 1))
    return slice(lo, n - start, 2)


def _scan_plan(m: torch.Tensor, u: torch.Tensor, reverse: bool = False, plan: list | None = None) -> list:
    """The in-place steps of :func:`scan_inplace_` on (m, u), as a list of ``(dst, mult, src)`` views:
    ``dst += mult * src``, or ``dst *= mult`` when ``src`` is None. Building the views costs more
    than running the small steps, so a chunked caller builds the plan once per buffer and replays it
    on every chunk (:func:`_run_plan`).

    Odd/even reduction: fold pairs (2i, 2i+1) into the odd element, solve the half-length problem on
    the odd elements (strided views, recursion), then finish the even elements from their left
    neighbours. 2-3 strided in-place steps per level, log2(L) levels, no allocation.
    """
    plan = [] if plan is None else plan
    L = u.shape[1]
    if L <= 1:
        return plan
    nm = L - 1
    npair = L // 2
    # u_{2i+1} += m_{2i} u_{2i}  (pairs)
    plan.append((u[:, _sl(1, npair, L, reverse)], m[:, _sl(0, npair, nm, reverse)], u[:, _sl(0, npair, L, reverse)]))
    # composite multiplier from h_{2i-1} to h_{2i+1}: m_{2i} m_{2i-1}, stored in m_{2i} (i >= 1)
    nsub = npair - 1
    if nsub > 0:
        plan.append((m[:, _sl(2, nsub, nm, reverse)], m[:, _sl(1, nsub, nm, reverse)], None))
    # half-length problem on the odd positions: multipliers m_2, m_4, ..., inputs u_1, u_3, ...
    _scan_plan(m[:, _sl(2, nsub, nm, reverse)], u[:, _sl(1, npair, L, reverse)], reverse, plan)
    # even positions 2i (i >= 1): h_{2i} = m_{2i-1} h_{2i-1} + u_{2i}
    neven = (L - 1) // 2
    if neven > 0:
        plan.append((u[:, _sl(2, neven, L, reverse)], m[:, _sl(1, neven, nm, reverse)], u[:, _sl(1, neven, L, reverse)]))
    return plan


def _run_plan(plan: list) -> None:
    for dst, mult, src in plan:
        if src is None:
            dst.mul_(mult)
        else:
            dst.addcmul_(mult, src)


def scan_inplace_(m: torch.Tensor, u: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Solve a first-order linear recurrence along dim 1, in place (u becomes the states; m is clobbered).

    u (b, L, ...); m (b, L-1, ...). Forward: ``h_0 = u_0``, ``h_{k+1} = m_k h_k + u_{k+1}``.
    Reverse: ``h_{L-1} = u_{L-1}``, ``h_k = m_k h_{k+1} + u_k``. Returns u. (See :func:`_scan_plan`.)
    """
    _run_plan(_scan_plan(m, u, reverse))
    return u


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """B or C as (b, T, G, N) (G = 1 for ungrouped (b, T, N))."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def _forward_chunks(x, dt, A, B, C, h0, chunk_size: int, use_exp2: bool, starts=None, dt_bias=None,
                    dt_softplus=False, D=None, z=None):
    """The forward recurrence, one chunk at a time, in the state-major layout of :class:`_ChunkedScan`.

    x, dt (b, T, G, P) (fp32, or any float dtype when the per-chunk transforms below are used);
    A (G, N, P) fp32; B, C (b, T, G, N) fp32; h0 (b, G, N, P) fp32. If ``starts`` (b, n_chunks, G, N, P)
    is given, each chunk's initial state is written there (for the backward). Inference fuses, per
    chunk and so on cache-resident slices: ``dt' = softplus(dt + dt_bias)``, the ``D`` skip (G, P) and
    the ``z`` gate (b, T, G, P). Returns y (b, T, G, P) fp32 and the final state (b, G, N, P).
    """
    b, T, G, P = x.shape
    N = A.shape[-2]
    L = min(chunk_size, T)
    n_chunks = -(-T // L)
    y = x.new_empty(b, T, G, P, dtype=torch.float32)
    a_buf = x.new_empty(b, L, G, N, P, dtype=torch.float32)
    u_buf = x.new_empty(b, L, G, N, P, dtype=torch.float32)
    A_e = _decay_exponent(A, use_exp2)
    full_plan = _scan_plan(a_buf[:, 1:], u_buf)  # the buffers are reused: build the views once
    h, carry = h0, x.new_empty(b, G, N, P, dtype=torch.float32)
    for c in range(n_chunks):
        s, e = c * L, min((c + 1) * L, T)
        n = e - s
        a, u = (a_buf, u_buf) if n == L else (a_buf[:, :n], u_buf[:, :n])
        if starts is not None:
            starts[:, c] = h
        xc, dtc = x[:, s:e].float(), dt[:, s:e].float()
        if dt_bias is not None:
            dtc = dtc + dt_bias
        if dt_softplus:
            dtc = F.softplus(dtc)
        _decays_(a, dtc, A_e, use_exp2)
        torch.mul((dtc * xc)[:, :, :, None, :], B[:, s:e, :, :, None], out=u)
        u[:, 0].addcmul_(a[:, 0], h)  # fold the carried state into the first input
        _run_plan(full_plan if n == L else _scan_plan(a[:, 1:], u))
        # y_t = C_t h_t, one (1, N) x (N, P) product per token, written in place
        yc = y[:, s:e]
        torch.matmul(C[:, s:e, :, None, :], u, out=yc[:, :, :, None, :])
        if D is not None:
            yc.addcmul_(xc, D)
        if z is not None:
            yc.mul_(F.silu(z[:, s:e].float()))
        if c + 1 < n_chunks:
            h = carry.copy_(u[:, -1])  # u is overwritten by the next chunk before the fold reads h
    return y, u[:, -1].clone()


class _ChunkedScan(torch.autograd.Function):
    """Core scan without D, z or the dt transform. All inputs fp32.

    The state is held state-major, (N, P) per group: then the broadcasts ``dt A`` and ``dt x B`` and
    the contraction with C run along the long contiguous channel axis P (about 1.3-1.9x faster than
    the (P, N) layout at N = 16).

    x, dt (b, T, G, P); A (G, N, P); B, C (b, T, G, N); h0 (b, G, N, P).
    Returns y (b, T, G, P), the final state (b, G, N, P) and, for the backward only, each chunk's
    initial state (non-differentiable). forward/setup_context are separate so torch.func can use it.
    """

    @staticmethod
    def forward(x, dt, A, B, C, h0, chunk_size: int, use_exp2: bool):
        b, T, G, P = x.shape
        starts = x.new_empty(b, -(-T // min(chunk_size, T)), G, A.shape[-2], P)  # for the backward
        y, h = _forward_chunks(x, dt, A, B, C, h0, chunk_size, use_exp2, starts=starts)
        return y, h, starts

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dt, A, B, C, _h0, chunk_size, use_exp2 = inputs
        starts = output[2]
        ctx.mark_non_differentiable(starts)
        ctx.save_for_backward(x, dt, A, B, C, starts)
        ctx.chunk = min(chunk_size, x.shape[1])
        ctx.use_exp2 = use_exp2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh_final, _g_starts):
        x, dt, A, B, C, starts = ctx.saved_tensors
        L = ctx.chunk
        b, T, G, P = x.shape
        N = A.shape[-2]
        n_chunks = starts.shape[1]
        need_x, need_dt, need_A, need_B, need_C, need_h0 = ctx.needs_input_grad[:6]
        gy = gy.float() if gy is not None else x.new_zeros(b, T, G, P)
        g_carry = gh_final.float() if gh_final is not None else x.new_zeros(b, G, N, P)
        gx = torch.empty_like(x)
        gdt = torch.empty_like(dt)
        gB = torch.empty_like(B)
        gC = torch.empty_like(C)
        gA = torch.zeros_like(A)
        use_exp2 = ctx.use_exp2
        A_e = _decay_exponent(A, use_exp2)
        a_buf, am_buf, h_buf, g_buf, u_buf = (x.new_empty(b, L, G, N, P) for _ in range(5))
        fwd_plan = _scan_plan(am_buf[:, 1:], h_buf)
        rev_plan = _scan_plan(a_buf[:, 1:], g_buf, reverse=True)
        for c in reversed(range(n_chunks)):
            s, e = c * L, min((c + 1) * L, T)
            n = e - s
            h0 = starts[:, c]
            a, am, h, g, u = a_buf[:, :n], am_buf[:, :n], h_buf[:, :n], g_buf[:, :n], u_buf[:, :n]
            dtc, xc, Bc, Cc, gyc = dt[:, s:e], x[:, s:e], B[:, s:e], C[:, s:e], gy[:, s:e]
            # recompute the chunk's states (the forward kept only h0), with the forward's exact ops
            _decays_(a, dtc, A_e, use_exp2)
            am.copy_(a)
            dtx = dtc * xc
            torch.mul(dtx[:, :, :, None, :], Bc[..., None], out=u)
            h.copy_(u)
            h[:, 0].addcmul_(a[:, 0], h0)
            _run_plan(fwd_plan if n == L else _scan_plan(am[:, 1:], h))
            # adjoint: g_h_t = C_t gy_t (+ the final-state gradient), then the reversed recurrence
            torch.mul(gyc[:, :, :, None, :], Cc[..., None], out=g)
            g[:, -1].add_(g_carry)
            _run_plan(rev_plan if n == L else _scan_plan(a[:, 1:], g, reverse=True))  # g is now dL/du
            if need_C:
                gC[:, s:e] = torch.einsum("blgp,blgnp->blgn", gyc, h)
            g_carry = g[:, 0] * a[:, 0]  # dL/dh0 (a[:, 0] is untouched by the scans)
            # dL/d(dt A)_t = g_t * a_t * h_{t-1} = g_t * (h_t - u_t)
            glog = h.sub_(u).mul_(g)
            if need_A:
                gA.add_((glog * dtc[:, :, :, None, :]).sum((0, 1)))
            gdtx = torch.matmul(Bc[:, :, :, None, :], g).squeeze(-2)  # dL/d(dt x), (b, n, G, P)
            if need_B:
                gB[:, s:e] = torch.einsum("blgp,blgnp->blgn", dtx, g)
            if need_dt:
                torch.addcmul((glog * A).sum(-2), gdtx, xc, out=gdt[:, s:e])
            if need_x:
                torch.mul(gdtx, dtc, out=gx[:, s:e])
        return (gx if need_x else None, gdt if need_dt else None, gA if need_A else None,
                gB if need_B else None, gC if need_C else None, g_carry if need_h0 else None, None, None)


def selective_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Selective scan, same contract as ``selective_scan_ref``, with ``exp2`` decays (registered for CPU
    tensors, where exp2 is about twice as fast as exp).

    x, dt, z (b, T, d); A (d, N); B, C (b, T, N) or (b, T, G, N) with G | d (channel i reads group
    i // (d / G)); D, dt_bias (d,); initial_state (b, d, N). Returns y (b, T, d) in x's dtype and, if
    ``return_final_state``, the final state (b, d, N) fp32. All arithmetic (and the state) is fp32.
    """
    return _selective_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state,
                           chunk_size, use_exp2=True)


def selective_scan_chunked_exp(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """:func:`selective_scan_chunked` with ``exp`` decays: registered for every device but the CPU
    (torch-xla 2.9 does not lower exp2: on XLA it would run on the host)."""
    return _selective_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state,
                           chunk_size, use_exp2=False)


def _selective_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state, chunk_size,
                    use_exp2: bool):
    if _traceable(x):
        return selective_scan_traceable(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state,
                                        return_final_state, chunk_size)
    dtype_in = x.dtype
    b, T, d = x.shape
    N = A.shape[-1]
    Bg, Cg = _grouped(B.float()), _grouped(C.float())
    G = Bg.shape[2]
    P = d // G
    h0 = x.new_zeros(b, d, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        y = x.new_zeros(b, 0, d)
        return (y, h0.clone()) if return_final_state else y
    # state-major (N, P) layout inside the scan (see _ChunkedScan); only (d, N)-sized transposes here
    A_np = A.float().reshape(G, P, N).transpose(1, 2).contiguous()
    h0_np = h0.reshape(b, G, P, N).transpose(2, 3).contiguous()
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # inference: no autograd record, so the dt transform, D skip and z gate run per chunk, on
        # cache-resident slices, with no full-length temporaries
        y, h = _forward_chunks(
            x.reshape(b, T, G, P), dt.reshape(b, T, G, P), A_np, Bg, Cg, h0_np, int(chunk_size), use_exp2,
            dt_bias=None if dt_bias is None else dt_bias.float().reshape(G, P), dt_softplus=dt_softplus,
            D=None if D is None else D.float().reshape(G, P), z=None if z is None else z.reshape(b, T, G, P))
        y = y.view(b, T, d).to(dtype_in)
        return (y, h.transpose(2, 3).reshape(b, d, N)) if return_final_state else y
    xf = x.float()
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    y, h, _ = _ChunkedScan.apply(xf.reshape(b, T, G, P), dtf.reshape(b, T, G, P), A_np, Bg, Cg, h0_np,
                                 int(chunk_size), bool(use_exp2))
    y = y.view(b, T, d)
    if D is not None:
        y = torch.addcmul(y, xf, D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h.transpose(2, 3).reshape(b, d, N)) if return_final_state else y


def _shift_right(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """t (b, nC, L, ...) shifted right by ``k`` along the chunk axis (dim 2), ``fill`` entering on the left."""
    pad = [0, 0] * (t.dim() - 3) + [k, 0]
    return F.pad(t[:, :, : t.shape[2] - k], pad, value=fill)


def selective_scan_traceable(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Selective scan with no Python control flow on T (same contract as ``selective_scan_ref``): the path
    taken when T is symbolic (:func:`_traceable`); also correct, and differentiable by autograd through
    plain torch ops, when called eagerly.

    T is padded with dt' = 0 (decay 1, no input: the state passes through the padding unchanged, so the
    last padded state is the final state) to ``nC = ceil(T / L) + 1`` chunks of ``L = chunk_size``: one
    chunk more than needed, so that no size is ever 1 (under ``torch.export``, recording a tensor whose
    symbolic size may be 1 adds a guard on it, and a guard on T is an export error).

    * inside each chunk, a log-depth (Hillis-Steele) scan with a static ``ceil(log2 L)`` levels of
      ``(a, u) <- (a a_{<-k}, u + a u_{<-k})`` on (b, nC, L, d, N): ``u`` becomes the chunk's states from a
      zero start and ``a`` the decay from the chunk start (products of factors in [0, 1]: finite);
    * across chunks, a closed form over the chunk ends, with the initial state as an extra chunk -1
      whose local state is ``h0``: ``H_c = sum_{c' <= c} exp(sum_{c' < c'' <= c} l_c'') u_end_c'``, ``l``
      each chunk's total log-decay. The exponent is a cumulative sum over ``c''`` of ``l`` masked to
      ``c'' > c'`` (zero below, so it is accumulated from zero at ``c'``, never as a difference of two
      large prefix sums), ``-inf`` where ``c' > c``: every weight is in [0, 1]. An (nC+1, nC+1) weight
      per (b, d, N): memory O(b (T/L)^2 d N) beside the states, O(b T d N) (what autograd keeps anyway;
      the fast path keeps O(b T d) by looping over chunks, which a symbolic T cannot).
    * ``h_t = u_t + a_t H_{c-1}``, ``y_t = C_t h_t``, then the D skip and the z gate.
    """
    dtype_in = x.dtype
    b, T, d = x.shape
    N = A.shape[-1]
    L = int(chunk_size)
    nC = (T + 2 * L - 1) // L  # ceil(T / L) + 1 >= 2
    Tp = nC * L
    xf, dtf = x.float(), dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bg, Cg = _grouped(B.float()), _grouped(C.float())
    G = Bg.shape[2]
    P = d // G
    pad_t = (0, 0, 0, 0, 0, Tp - T)  # (b, T, d, N): pad T at the end
    log_a = F.pad(dtf[..., None] * A.float(), pad_t).view(b, nC, L, d, N)  # dt' A <= 0; 0 over the padding
    u = (dtf * xf).view(b, T, G, P, 1) * Bg[:, :, :, None, :]
    u = F.pad(u.reshape(b, T, d, N), pad_t).view(b, nC, L, d, N)
    a = torch.exp(log_a)
    k = 1
    while k < L:  # static: log2(L) levels
        u = u + a * _shift_right(u, k, 0.0)
        a = a * _shift_right(a, k, 1.0)
        k *= 2
    # chunk ends, with h0 as chunk -1 (total log-decay 0)
    h0 = x.new_zeros(b, d, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    ends = torch.cat([h0[:, None], u[:, :, L - 1]], 1)  # (b, nC+1, d, N)
    l_tot = F.pad(log_a.sum(2), (0, 0, 0, 0, 1, 0))  # (b, nC+1, d, N)
    ci = torch.arange(nC + 1, device=x.device)
    later = ci[:, None] > ci[None, :]  # [c'', c']: c'' > c'
    expo = torch.where(later[None, :, :, None, None], l_tot[:, :, None], 0.0).cumsum(1)  # [b, c, c', d, N]
    expo = torch.where((ci[:, None] >= ci[None, :])[None, :, :, None, None], expo, float("-inf"))
    H = (torch.exp(expo) * ends[:, None]).sum(2)  # (b, nC+1, d, N): state after chunk c (index c+1)
    h = u + a * H[:, :nC, None]  # every padded position's state (b, nC, L, d, N)
    Cp = F.pad(Cg, (0, 0, 0, 0, 0, Tp - T)).view(b, nC, L, G, N, 1)
    y = torch.matmul(h.view(b, nC, L, G, P, N), Cp)
    y = _first(y.reshape(b, Tp, d), T)
    if D is not None:
        y = torch.addcmul(y, xf, D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, H[:, nC]) if return_final_state else y
