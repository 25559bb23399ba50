"""Attention over in-context, fading and eidetic memory: the ``attention``, ``sliding_attention``,
``bmojo_f`` and ``bmojo`` layer types (docs/design.md, "The layer")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as op_api
from ..cache import LayerState, fading_keeps_ssm_outputs, gather_positions
from ..configuration_bmojo import BMojoConfig
from .common import BMojoRMSNorm, apply_rotary, as_buffer
from .eidetic import ChunkMemory, EideticMemory
from .mamba import BMojoMambaMixer
from .mamba2 import BMojoMamba2Mixer


class BMojoAttention(nn.Module):
    """One softmax over what each query may see (Llama names: q/k/v/o_proj).

    ``attention``: full causal; ``sliding_attention``: the last ``w`` keys; ``bmojo_f``: + fading keys
    ``Wk' f`` of the ``m_f`` positions before the window, ``f`` the output of a Mamba mixer over the
    layer input; ``bmojo``: + the ``m_e`` eidetic slots of each query's chunk (:mod:`.eidetic`).

    Three ways to run: :meth:`forward` (a fresh sequence from position 0), :meth:`resume` (T tokens
    after a decoding state, in parallel: keys are the state's window, fading ring and slots plus the
    new ones) and :meth:`step` (one token). The state is the layer's :class:`bmojo.cache.LayerState`.
    """

    def __init__(self, config: BMojoConfig, layer_idx: int, kernels):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kernels = kernels
        self.layer_type = config.layer_types[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.window = None if self.layer_type == "attention" else config.sliding_window
        self.use_fading = self.layer_type in ("bmojo_f", "bmojo")
        self.fading_window = config.effective_fading_window if self.use_fading else 0
        # decoding keeps, for the window's tokens, their SSM outputs or their fading keys/values (the smaller)
        self.keeps_ssm_outputs = fading_keeps_ssm_outputs(config)
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        # Qwen3's QK-norm: per-head RMSNorm on queries and keys before RoPE (fading keys too)
        self.q_norm = BMojoRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = BMojoRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.fading_query = self.use_fading and config.fading_query
        if self.use_fading:
            mixer = BMojoMamba2Mixer if config.fading_mixer == "mamba2" else BMojoMambaMixer
            self.mamba = mixer(config, layer_idx, kernels)
            if not config.tie_fading_kv:  # untied: the fading keys/values (and norm) have their own weights
                self.k_fading_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
                self.v_fading_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
                self.k_fading_norm = BMojoRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
            if self.fading_query:  # ... and so does the query that scores them (the authors' untied B'MOJO-F)
                self.q_fading_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
                self.q_fading_norm = BMojoRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.eidetic = EideticMemory(config, kernels) if self.layer_type == "bmojo" else None

    # -- projections ---------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim)

    def _project(self, proj, norm, x, heads, rope):
        """x (..., d) -> heads (..., heads, D): projection, optional per-head norm, then RoPE."""
        y = self._heads(proj(x), heads)
        if norm is not None:
            y = norm(y)
        return apply_rotary(y, *rope) if rope is not None else y

    def _qkv(self, u, rope):
        q = self._project(self.q_proj, self.q_norm, u, self.num_heads, rope)
        k = self._project(self.k_proj, self.k_norm, u, self.num_kv_heads, rope)
        v = self._heads(self.v_proj(u), self.num_kv_heads)
        return q, k, v

    def _fading_q(self, u, rope):
        """The query that scores the fading keys when it has its own projection (else None: q does)."""
        if not self.fading_query:
            return None
        return self._project(self.q_fading_proj, self.q_fading_norm, u, self.num_heads, rope)

    def _fading_kv(self, f, rope):
        tied = self.config.tie_fading_kv
        k_proj, k_norm = (self.k_proj, self.k_norm) if tied else (self.k_fading_proj, self.k_fading_norm)
        kf = self._project(k_proj, k_norm, f, self.num_kv_heads, rope)
        vf = self._heads((self.v_proj if tied else self.v_fading_proj)(f), self.num_kv_heads)
        return kf, vf

    def _fading_kv_head(self, f, rope, n: int):
        """Fading keys/values of f's first ``n`` positions, zeros after them: a fading key becomes
        visible w positions after its own, so the last w of a call are read by no query of it (nor by a
        state that keeps SSM outputs), and are not projected. f (b, T, d) -> two (b, T, Hkv, D)."""
        T = f.shape[1]
        if torch.compiler.is_compiling() or n >= T:  # traced: every position (a branch on n would specialise T)
            return self._fading_kv(f, rope)
        n = max(n, 0)
        shape = (f.shape[0], T, self.num_kv_heads, self.head_dim)
        if n == 0:
            return f.new_zeros(shape), f.new_zeros(shape)
        kf, vf = self._fading_kv(f[:, :n], None if rope is None else tuple(x[..., :n, :] for x in rope))
        return tuple(torch.cat([x, x.new_zeros(shape[0], T - n, *shape[2:])], 1) for x in (kf, vf))

    def _attend(self, q, k, v, kw: dict, memory: ChunkMemory | None, output_attentions: bool):
        """o (b, T, Hq*D) and, if asked, the reference's weights per source position.

        Causality holds for non-finite values too: a key or value holding NaN or inf (from a NaN in the
        input at its position) must not reach earlier queries, but a masked key still enters a blocked
        kernel's products as 0 * NaN. So such keys are zeroed before the kernel, and every query that
        does see one gets NaN, as it would from the exact product."""
        b, T = q.shape[:2]
        keys = {name: x for name, x in dict(k=k, v=v, k_fading=kw.get("k_fading"), v_fading=kw.get("v_fading")).items()
                if x is not None}
        slots = () if memory is None else (memory.k, memory.v)
        on_cpu = not torch.compiler.is_compiling() and q.device.type == "cpu"  # host reads are free there
        bad, bad_memory, poisoned = {}, None, None
        # on CPU, one sum per tensor: finite when every element is (a sum that merely overflows only sends
        # clean tensors through the exact row check below, which then finds nothing)
        if not (on_cpu and all(bool(torch.isfinite(x.sum(dtype=torch.float32))) for x in (*keys.values(), *slots))):
            bad = {name: _nonfinite_rows(x) for name, x in keys.items()}
            if memory is not None:
                bad_memory = _nonfinite_rows(memory.k.flatten(1, 2)).view(memory.valid.shape) \
                    | _nonfinite_rows(memory.v.flatten(1, 2)).view(memory.valid.shape)
            if on_cpu and not any(bool(x.any()) for x in bad.values()) and (memory is None or not bool(bad_memory.any())):
                bad = {}
        if bad:
            poisoned = self._sees_nonfinite(T, bad, kw, memory, bad_memory)
            k = k.masked_fill(bad["k"].view(b, -1, 1, 1), 0).masked_fill(bad["v"].view(b, -1, 1, 1), 0)
            v = v.masked_fill(bad["k"].view(b, -1, 1, 1), 0).masked_fill(bad["v"].view(b, -1, 1, 1), 0)
            if "k_fading" in bad:
                either = (bad["k_fading"] | bad["v_fading"]).view(b, -1, 1, 1)
                kw.update(k_fading=kw["k_fading"].masked_fill(either, 0), v_fading=kw["v_fading"].masked_fill(either, 0))
            if memory is not None:
                slots = bad_memory[..., None, None]
                memory = ChunkMemory(k=memory.k.masked_fill(slots, 0), v=memory.v.masked_fill(slots, 0),
                                     valid=memory.valid, pos=memory.pos, eps=memory.eps)
        if memory is not None:
            kw.update(k_memory=memory.k, v_memory=memory.v, memory_valid=memory.valid)
        if output_attentions:
            o, weights = op_api.bmojo_attention_weights_ref(
                q, k, v, memory_positions=None if memory is None else memory.pos, **kw)
        else:
            o, weights = self.kernels.on(q.device).bmojo_attention(q, k, v, **kw), None
        if poisoned is not None:
            o = o.masked_fill(poisoned[..., None, None], float("nan"))
        return o.reshape(b, T, -1), weights

    def _sees_nonfinite(self, T: int, bad: dict, kw: dict, memory, bad_memory) -> torch.Tensor:
        """(b, T) bool: which queries see a non-finite key or value (window, fading band or memory slot).
        Positions as in ``ops.bmojo_attention``: query j at q_start + j, key sequences ending with the queries."""
        w, start = kw["window"], kw.get("q_start")
        b = next(iter(bad.values())).shape[0]
        device = next(iter(bad.values())).device
        j = torch.arange(T, device=device)[None, :]

        def count(flags: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            """Bad keys at sequence indices in (lo, hi] per query (indices clamped to the sequence)."""
            c = F.pad(flags.long().cumsum(1), (1, 0))  # c[i] = bad keys among indices < i
            n = flags.shape[1]
            take = lambda i: torch.gather(c, 1, (i + 1).clamp(0, n).expand(b, -1))  # noqa: E731
            return take(hi) - take(lo)

        ctx = bad["k"] | bad["v"]
        offset = ctx.shape[1] - T  # index of query j's own key: offset + j
        if w is None:
            seen = count(ctx, torch.full_like(j, -1), offset + j)  # every key up to the query's own
        else:
            seen = count(ctx, offset + j - w, offset + j)
        if "k_fading" in bad:
            fad = bad["k_fading"] | bad["v_fading"]
            f_off = fad.shape[1] - T
            m_f = kw.get("fading_window") if kw.get("fading_window") is not None else w
            seen = seen + count(fad, f_off + j - w - m_f, f_off + j - w)
        out = seen > 0
        if memory is not None:
            slot_bad = (bad_memory & memory.valid).any(-1)  # (b, chunks)
            s = torch.zeros(b, dtype=torch.long, device=device) if start is None else start
            chunk = torch.div(s[:, None] + j, w, rounding_mode="floor") - torch.div(s, w, rounding_mode="floor")[:, None]
            out = out | torch.gather(slot_bad, 1, chunk.clamp(max=slot_bad.shape[1] - 1))
        return out

    # -- a fresh sequence ---------------------------------------------------------------------
    def forward(self, u: torch.Tensor, rope=None, state: LayerState | None = None, lengths: torch.Tensor | None = None,
                output_attentions: bool = False):
        """u (b, T, d) at positions 0..T-1 -> (b, T, d) and, if asked, weights (b, Hq, T, T) (the
        probability mass each query puts on each source position's in-context, fading and memory keys).
        ``state`` receives the decoding state after each row's last token; ``lengths`` (b,) marks rows
        whose last tokens are padding (see ``BMojoMambaMixer.forward``)."""
        b, T, _ = u.shape
        q, k, v = self._qkv(u, rope)
        kw = dict(window=self.window)
        f = kf = vf = memory = eps = None
        if self.use_fading:
            f = self.mamba(u, state.mamba if state is not None else None, lengths, rope)
            if self.fading_window > 0:  # a state keeping fading keys (not SSM outputs) needs every one
                used = T if state is not None and not self.keeps_ssm_outputs else T - self.window
                kf, vf = self._fading_kv_head(f, rope, used)
                kw.update(k_fading=kf, v_fading=vf, fading_window=self.fading_window)
                if self.fading_query:
                    kw.update(q_fading=self._fading_q(u, rope))
        if self.eidetic is not None:
            memory, eps = self.eidetic.select(f, k, v)
        o, weights = self._attend(q, k, v, kw, memory, output_attentions)
        if state is not None:
            last = torch.full((b,), T - 1, device=u.device) if lengths is None else lengths - 1
            with torch.no_grad():
                self._hand_off(state, last, (k, v, 0), (kf, vf, 0), (f, 0), memory, eps, 0,
                               host_last=T - 1 if lengths is None else None)
        return self.o_proj(o), weights

    # -- new tokens after a state ---------------------------------------------------------------
    def resume(self, u: torch.Tensor, rope, rope_window, state: LayerState, start: torch.Tensor, seen: int,
               host_start: int | None = None):
        """u (b, T, d): T tokens at positions start (b,) .. start + T - 1 after ``state`` (``seen``
        tokens consumed, padding included) -> (b, T, d), in parallel; advances the state past them.
        ``rope``: RoPE of the new positions; ``rope_window``: of the w positions before them;
        ``host_start``: the start when every row shares it (rings are then read with slices, not gathers)."""
        b, T, _ = u.shape
        q, k, v = self._qkv(u, rope)
        if self.window is None:
            kv = state.kv  # slot j holds position j - (seen - start): keys before position 0 are empty
            kv.k[:, seen : seen + T], kv.v[:, seen : seen + T], kv.valid[:, seen : seen + T] = k, v, True
            # the cache's first seen + T slots, read in place (views, not a copy of the cache)
            o, _ = self._attend(q, kv.k[:, : seen + T], kv.v[:, : seen + T], dict(window=None, q_start=start), None,
                                False)  # NaN-safe, as fresh
            return self.o_proj(o)

        w, m_f = self.window, self.fading_window
        at = start if host_start is None else host_start  # the first new position, per row or shared
        before = at - 1  # the state's last position
        # the window ring's keys then the new ones: index i is position start - n + i. A ring still growing
        # toward a huge w (n < w) holds every position so far; there is nothing before it.
        n = state.window.capacity
        k_seq = torch.cat([state.window.ordered("k", before, n), k.to(state.window.k.dtype)], 1)
        v_seq = torch.cat([state.window.ordered("v", before, n), v.to(state.window.v.dtype)], 1)
        kw = dict(window=w, q_start=start)
        f = f_seq = kf_seq = vf_seq = memory = eps_seq = None
        if self.use_fading:
            f = self.mamba.resume(u, state.mamba, rope)
            if m_f > 0:
                fading = state.fading
                if self.fading_query:
                    kw.update(q_fading=self._fading_q(u, rope))
                if self.keeps_ssm_outputs:  # the window's tokens' fading keys, projected now at their positions
                    f_window = fading.window_f.ordered("f", before, n)  # with the new ones: one projection
                    f_seq = torch.cat([f_window, f.to(f_window.dtype)], 1)
                    rope_seq = None if rope is None else tuple(
                        torch.cat([xw[..., -n:, :], x], -2) for xw, x in zip(rope_window, rope))
                    kf_wn, vf_wn = self._fading_kv_head(f_seq.to(f.dtype), rope_seq, n + T - w)
                else:
                    kf, vf = self._fading_kv(f, rope)
                    kf_wn = torch.cat([fading.window_kv.ordered("k", before, n).to(kf.dtype), kf], 1)
                    vf_wn = torch.cat([fading.window_kv.ordered("v", before, n).to(vf.dtype), vf], 1)
                # fading keys: the ring's m_f (none while the window ring grows: they would precede
                # position 0), the window's n, the new T: index i is position start - n - n_f + i
                n_f = fading.ring.capacity if n == w else 0
                if host_start is not None:  # leave out the ring's slots before position 0 (nothing sees them)
                    n_f = min(n_f, max(host_start - w, 0))
                kf_seq, vf_seq = kf_wn, vf_wn
                if n_f:
                    kf_seq = torch.cat([fading.ring.ordered("k", before - w, n_f).to(kf_wn.dtype), kf_wn], 1)
                    vf_seq = torch.cat([fading.ring.ordered("v", before - w, n_f).to(vf_wn.dtype), vf_wn], 1)
                kw.update(k_fading=kf_seq, v_fading=vf_seq, fading_window=m_f)
        if self.eidetic is not None:
            memory, eps_seq = self.eidetic.resume(state.eidetic, f, k_seq, v_seq, start, host_start)
        o, _ = self._attend(q, k_seq, v_seq, kw, memory, False)
        with torch.no_grad():
            f_hist = None
            if self.eidetic is not None:  # the predictor's taps then the new outputs
                f_hist = (torch.cat([state.eidetic.history, f.to(state.eidetic.history.dtype)], 1),
                          at - self.config.innovation_taps)
            n_f = 0 if kf_seq is None else kf_seq.shape[1] - T - n
            self._hand_off(state, start + T - 1, (k_seq, v_seq, at - n), (kf_seq, vf_seq, at - n - n_f),
                           (f_seq, at - n), memory, eps_seq, torch.div(start, w, rounding_mode="floor"), f_hist,
                           host_last=None if host_start is None else host_start + T - 1)
        return self.o_proj(o)

    @torch.no_grad()
    def _hand_off(self, state: LayerState, last, kv, fading_kv, f_window, memory, eps, first_chunk, f_hist=None,
                  host_last: int | None = None):
        """Rings, history and memory as the step-by-step decoder holds them after position ``last`` (b,)
        (``host_last``: the same, when every row shares it). Each sequence comes with the position of its
        index 0 (per row, or an int shared by every row): (k, v, first), (kf, vf, first), (f, first)."""
        if self.window is None:  # the growing cache, left-aligned: row position p at slot p + T - 1 - last
            k, v, _ = kv
            T = k.shape[1]
            src = torch.arange(T, device=k.device)[None, :] - (T - 1 - last)[:, None]
            state.kv.k[:, :T], state.kv.v[:, :T] = gather_positions(k, src), gather_positions(v, src)
            state.kv.valid[:, :T] = src >= 0
            return
        k, v, kv_first = kv
        w = self.window
        at = last if host_last is None else host_last
        state.window.load(at, first=kv_first, k=k, v=v)
        if state.fading is not None:
            kf, vf, f_first = fading_kv
            state.fading.ring.load(at - w, first=f_first, k=kf, v=vf)
            if state.fading.window_f is not None:
                f, first = f_window
                state.fading.window_f.load(at, first=first, f=f)
            else:
                state.fading.window_kv.load(at, first=f_first, k=kf, v=vf)
        if self.eidetic is not None:
            f, first = f_hist if f_hist is not None else f_window
            self.eidetic.hand_off(state.eidetic, memory, f, first, eps, (k, v), kv_first, first_chunk, last,
                                  next_in_memory=f_hist is not None, host_last=host_last)

    # -- one token ------------------------------------------------------------------------------
    def step(self, u: torch.Tensor, t: torch.Tensor, rope, state: LayerState, seen: int, rope_evicted=None,
             boundary: bool | None = None, output_attentions: bool = False):
        """One token per row: u (b, d) at positions t (b,) -> (b, d), updating ``state`` in place
        (``seen``: tokens consumed so far, padding included; a 0-d tensor in compiled decoding).
        ``rope_evicted``: RoPE at positions t - w,
        for the fading key of the token leaving the window. ``boundary``: whether all rows start a chunk
        here (None when rows differ). Tensor ops only (no host synchronisation).

        ``output_attentions`` also returns the probabilities (b, Hq, S) over the S cached keys and the
        position each key was built from (b, S) (< 0: an empty slot)."""
        b = u.shape[0]
        ops = self.kernels.on(u.device)
        q, k, v = self._qkv(u[:, None], rope)  # (b, 1, H, D)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if rope is not None:  # compiled: rotated once, not once per cached key
            q = as_buffer(q)
        if self.window is None:
            kv, n = state.kv, seen  # this token's slot in the (left-aligned) cache
            if torch.is_tensor(n):  # compiled decoding: a preallocated cache, read whole under its validity
                slot = n.view(1)
                kv.k.index_copy_(1, slot, k[:, None].to(kv.k.dtype))
                kv.v.index_copy_(1, slot, v[:, None].to(kv.v.dtype))
                kv.valid.index_fill_(1, slot, True)
                return self.o_proj(ops.attention_decode(q, kv.k, kv.v, kv.valid).reshape(b, -1))
            kv.k[:, n], kv.v[:, n], kv.valid[:, n] = k, v, True
            keys, values, valid = kv.k[:, : n + 1], kv.v[:, : n + 1], kv.valid[:, : n + 1]
            if output_attentions:  # slot j holds position j - (n - t)
                o, p = op_api.attention_decode_weights_ref(q, keys, values, valid)
                sources = torch.arange(n + 1, device=t.device)[None, :] - (n - t)[:, None]
                return self.o_proj(o.reshape(b, -1)), (p, sources)
            return self.o_proj(ops.attention_decode(q, keys, values, valid).reshape(b, -1))

        w, m_f = self.window, self.fading_window
        state.window.write(t, k=k, v=v)
        sources = [state.window.positions(t)]  # the position each cached key was built from; < 0: empty
        keys, values = [state.window.k], [state.window.v]
        f = None
        if self.use_fading:
            f = self.mamba.step(u, state.mamba, rope)
            if m_f > 0:
                # position t - w leaves the window and enters the fading ring: its fading key/value is
                # projected now from its kept SSM output, or was projected on arrival and kept
                fading, evicted = state.fading, t - w
                if self.keeps_ssm_outputs:
                    kf, vf = self._fading_kv(fading.window_f.read_slot("f", t)[:, None], rope_evicted)
                    kf, vf = kf[:, 0], vf[:, 0]
                    fading.window_f.write(t, f=f)
                else:
                    kf, vf = fading.window_kv.read_slot("k", t), fading.window_kv.read_slot("v", t)
                    kf_t, vf_t = self._fading_kv(f[:, None], rope)
                    fading.window_kv.write(t, k=kf_t[:, 0], v=vf_t[:, 0])
                fading.ring.write(evicted, k=kf, v=vf)  # a row still in its first window writes a slot that stays empty
                keys.append(fading.ring.k), values.append(fading.ring.v)
                sources.append(fading.ring.positions(evicted))
                if self.fading_query:
                    q_fading = self._fading_q(u[:, None], rope)[:, 0]
                    if rope is not None:  # as q
                        q_fading = as_buffer(q_fading)
        if self.eidetic is not None:
            memory = state.eidetic
            self.eidetic.step(memory, state.window, f, t, boundary)
            keys.append(memory.current.k), values.append(memory.current.v)
            sources.append(memory.current.pos.masked_fill(~memory.current.valid, -1))
        valids = tuple(p >= 0 for p in sources)
        # one query per segment when the fading keys have their own (window, fading ring, memory slots)
        queries = q if not self.fading_query or len(keys) < 2 else \
            tuple(q_fading if i == 1 else q for i in range(len(keys)))
        if output_attentions:
            o, p = op_api.attention_decode_weights_ref(queries, tuple(keys), tuple(values), valids)
            return self.o_proj(o.reshape(b, -1)), (p, torch.cat(sources, 1))
        # the rings and slots are read in place as segments (no per-step copy of the cached keys)
        o = ops.attention_decode(queries, tuple(keys), tuple(values), valids)
        return self.o_proj(o.reshape(b, -1))


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, n, ...) -> (b, n) bool: rows holding NaN or inf."""
    return ~torch.isfinite(x).flatten(2).all(-1)
