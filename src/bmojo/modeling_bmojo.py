"""B'MOJO and the models it generalizes, as one Hugging Face model class (SPEC 1).

Each layer is ``h = h + mixer(RMSNorm(h))`` then, if ``intermediate_size > 0``,
``h = h + MLP(RMSNorm(h))``. The mixer is a Mamba-1 block (``mamba``) or a ``BMojoAttention``, whose
one softmax reads up to three memories: the last ``w`` keys (in-context), keys projected from the
Mamba outputs ``f`` for the ``m_f`` positions before the window (fading), and ``m_e`` past keys kept
because ``f`` was hard to predict there (eidetic). ``attention`` and ``sliding_attention`` are the
same class with the fading and eidetic memories switched off.

The model calls only :mod:`bmojo.ops`; the kernels behind it are picked by ``config.backend``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from . import ops
from .cache import BMojoCache, LayerState, fading_keeps_ssm_outputs, ring_positions
from .checkpoint import validate_checkpoint
from .configuration_bmojo import UNSUPPORTED_ROPE_TYPES, BMojoConfig
from .hf_compat import CACHE_NAME, output_cache, take_cache


def _inference() -> bool:
    """No autograd recording: in-place updates of fresh intermediates are safe (they save a large
    buffer each; on CPU a fresh multi-MB buffer also costs page faults)."""
    return not torch.is_grad_enabled()


def _residual_add(h: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``h + branch``; in inference, accumulated into ``branch`` (a fresh output of a projection) when
    that gives the same dtype. ``h`` itself is never written (callers may keep it, e.g. hidden states)."""
    if _inference() and branch.dtype == torch.result_type(h, branch) and branch.shape == h.shape:
        return branch.add_(h)
    return h + branch


class BMojoRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        rstd = torch.rsqrt((xf * xf).mean(-1, keepdim=True).add_(self.variance_epsilon))
        y = (xf * rstd).to(dtype)
        if _inference() and y.dtype == self.weight.dtype:
            return y.mul_(self.weight)  # same values as weight * y, one large buffer fewer
        return self.weight * y


class BMojoRotaryEmbedding(nn.Module):
    """RoPE at absolute positions (Llama's rotary, half-split layout) for ``config.rope_parameters``:
    ``default`` here, every scaling type (linear, llama3, yarn, ...) from transformers' own
    ``ROPE_INIT_FUNCTIONS``, with their attention scaling folded into cos and sin as Llama does."""

    def __init__(self, config: BMojoConfig):
        super().__init__()
        params = config.rope_parameters
        if params["rope_type"] in UNSUPPORTED_ROPE_TYPES:  # a config edited after it was checked
            raise ValueError(f"BMojoConfig: rope_parameters['rope_type']={params['rope_type']!r} is invalid: "
                             f"{UNSUPPORTED_ROPE_TYPES[params['rope_type']]}")
        if params["rope_type"] == "default":
            dim = config.head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As transformers' rotary modules: position_ids (T,) or (b, T) -> cos, sin (..., T, head_dim) in
        x's dtype (x gives only dtype and device), computed in fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(x.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, T, H, D), cos/sin (T, D) or (b, T, D) -> x rotated, in x's dtype.

    ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x2, x1]``, written as one product and two
    fused multiply-adds on the halves (no negated or concatenated copy of x)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    if cos.dim() == 3:
        cos, sin = cos[None], sin[None]
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = xf * cos
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out.to(x.dtype)


class BMojoMLP(nn.Module):
    """SwiGLU, Llama names."""

    def __init__(self, config: BMojoConfig):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _inference():  # same values, two (T, intermediate) buffers fewer
            return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BMojoMambaMixer(nn.Module):
    """Mamba-1 mixer (mamba-ssm's ``Mamba`` block; parameter names as transformers' ``MambaMixer``).

    State (see :mod:`bmojo.cache`): ``conv`` (b, d_inner, d_conv - 1) and ``ssm`` (b, d_inner, N) fp32.
    """

    def __init__(self, config: BMojoConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, di, N, R = config.hidden_size, config.d_inner, config.d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank = di, N, R
        self.in_proj = nn.Linear(d, 2 * di, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(di, di, config.d_conv, groups=di, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        # A_log and D stay fp32 (see _keep_in_fp32_modules) and out of weight decay (_no_weight_decay).
        self.A_log = nn.Parameter(torch.empty(di, N))
        self.D = nn.Parameter(torch.empty(di))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_weight_decay = True
        self.out_proj = nn.Linear(di, d, bias=config.proj_bias)

    @torch.no_grad()
    def init_mamba_weights(self) -> None:
        """S4D-real A, unit D, and dt bias = softplus^-1 of dt log-uniform in [dt_min, dt_max] (mamba-ssm)."""
        c = self.config
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A).expand(self.d_inner, -1))
        init.ones_(self.D)
        std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=self.dt_proj.bias.device) * (math.log(c.dt_max) - math.log(c.dt_min))
            + math.log(c.dt_min)
        ).clamp(min=c.dt_init_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))

    def _ssm_inputs(self, x: torch.Tensor):
        """x (..., d_inner) after the conv -> dt (..., d_inner) with the dt bias already added (one
        ``addmm``, so the scan gets ``dt_bias=None``), B, C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt is a column slice of x_proj's output: a contiguous copy (dt_rank wide) makes the addmm ~1.6x faster
        return F.linear(dt.contiguous(), self.dt_proj.weight, self.dt_proj.bias), B, C

    def forward(self, u: torch.Tensor, state: LayerState | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """u (b, T, d) -> (b, T, d). With a fresh ``state``, also leaves the conv/SSM states after each
        row's last token in it. ``lengths`` (b,): row i's tokens are ``u[i, :lengths[i]]``, the rest
        padding that follows them (causal: it never reaches a real token; the SSM state is frozen over
        it, dt = 0, so the final state is the state after the row's last token)."""
        backend = self.config.backend
        x, z = self.in_proj(u).chunk(2, dim=-1)
        conv_w = self.conv1d.weight.squeeze(1)
        want_state = state is not None
        out = ops.causal_conv1d(x, conv_w, self.conv1d.bias, "silu",
                                return_final_state=want_state and lengths is None, backend=backend)
        x_conv, conv_state = out if want_state and lengths is None else (out, None)
        dt, B, C = self._ssm_inputs(x_conv)
        if lengths is not None:
            past_end = torch.arange(u.shape[1], device=u.device)[None, :] >= lengths[:, None]
            # softplus(-1e4) is exactly 0 in fp32: no decay and no input over the padding
            dt = dt.masked_fill(past_end[..., None], -1e4)
            if want_state:  # the conv inputs of each row's last d_conv - 1 tokens
                conv_state = _gather_rows(x, lengths - 1, self.conv1d.weight.shape[-1] - 1).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        out = ops.selective_scan(x_conv, dt, A, B, C, D=self.D, z=z, dt_bias=None, dt_softplus=True,
                                 return_final_state=want_state, backend=backend)
        y, ssm_state = out if want_state else (out, None)
        if want_state:
            state["conv"], state["ssm"] = conv_state.contiguous(), ssm_state
        return self.out_proj(y)

    def step(self, u: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token: u (b, d) -> (b, d); updates ``state['conv']`` and ``state['ssm']`` in place."""
        backend = self.config.backend
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = ops.causal_conv1d_update(x, state["conv"], self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu",
                                     backend=backend)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(state["ssm"], x, dt, A, B, C, D=self.D, z=z, dt_bias=None,
                                       dt_softplus=True, backend=backend)
        return self.out_proj(y)


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether decoding may branch on a tensor's value: on CPU it costs nothing; elsewhere it is a
    device-to-host sync (and a graph break under XLA), so the step stays tensor-ops only."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


class BMojoAttention(nn.Module):
    """Attention over in-context, fading and eidetic memory (SPEC 1.1 steps 2-5).

    ``attention``: full causal; ``sliding_attention``: window ``w``; ``bmojo_f``: window + fading keys
    ``Wk' f`` for the ``m_f`` positions before the window; ``bmojo``: + the ``m_e`` eidetic slots of
    each query's chunk, chosen by innovation. Parameter names follow Llama (q/k/v/o_proj).
    """

    def __init__(self, config: BMojoConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.window = None if self.layer_type == "attention" else config.sliding_window
        self.use_fading = self.layer_type in ("bmojo_f", "bmojo")
        self.use_memory = self.layer_type == "bmojo"
        self.fading_window = config.effective_fading_window if self.use_fading else 0
        # decoding keeps, for the window's tokens, their SSM outputs or their fading keys/values (the smaller)
        self.keeps_ssm_outputs = fading_keeps_ssm_outputs(config)
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        if self.use_fading:
            self.mamba = BMojoMambaMixer(config, layer_idx)
            if not config.tie_fading_kv:
                self.k_fading_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
                self.v_fading_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)

    # -- projections ---------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim)

    def _qkv(self, u, rope):
        q = self._heads(self.q_proj(u), self.num_heads)
        k = self._heads(self.k_proj(u), self.num_kv_heads)
        v = self._heads(self.v_proj(u), self.num_kv_heads)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def _fading_kv(self, f, rope):
        k_proj = self.k_proj if self.config.tie_fading_kv else self.k_fading_proj
        v_proj = self.v_proj if self.config.tie_fading_kv else self.v_fading_proj
        kf = self._heads(k_proj(f), self.num_kv_heads)
        vf = self._heads(v_proj(f), self.num_kv_heads)
        if rope is not None:
            kf = apply_rotary(kf, *rope)
        return kf, vf

    # -- parallel form -------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, rope=None, state: LayerState | None = None, lengths: torch.Tensor | None = None,
                output_attentions: bool = False):
        """u (b, T, d) at positions 0..T-1 -> (b, T, d) [, attention weights (b, Hq, T, T)]. A fresh
        ``state`` receives the recurrent state after each row's last token (SPEC 1.3); ``lengths`` (b,)
        marks rows whose last tokens are padding (see ``BMojoMambaMixer.forward``).

        ``output_attentions`` runs the reference attention and returns, per query, the probability
        mass on each source position (in-context, fading and memory keys of a position summed)."""
        b, T, _ = u.shape
        c = self.config
        q, k, v = self._qkv(u, rope)
        kw = dict(window=self.window)
        f = kf = vf = positions = None
        if self.use_fading:
            f = self.mamba(u, state, lengths)
            kf, vf = self._fading_kv(f, rope)
            kw.update(k_fading=kf, v_fading=vf, fading_window=self.fading_window)
        if self.use_memory:
            positions, valid = ops.innovation_select(f, self.window, c.memory_slots, c.innovation_taps,
                                                     backend=c.backend)
            kw.update(k_memory=self._gather(k, positions), v_memory=self._gather(v, positions), memory_valid=valid)
        weights = None
        if output_attentions:
            o, weights = ops.bmojo_attention_weights_ref(q, k, v, memory_positions=positions, **kw)
        else:
            o = ops.bmojo_attention(q, k, v, backend=c.backend, **kw)
        if state is not None:
            last = torch.full((b,), T - 1, device=u.device) if lengths is None else lengths - 1
            self._store_state(state, last, k, v, kf, vf, f, positions, kw)
        out = self.o_proj(o.reshape(b, T, -1))
        return (out, weights) if output_attentions else out

    @staticmethod
    def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (b, T, H, D), positions (b, C, m) -> (b, C, m, H, D). Not differentiated w.r.t. the choice."""
        b, C, m = positions.shape
        idx = positions.reshape(b, C * m, 1, 1).expand(-1, -1, x.shape[2], x.shape[3])
        return torch.gather(x, 1, idx).view(b, C, m, x.shape[2], x.shape[3])

    @torch.no_grad()
    def _store_state(self, state, last, k, v, kf, vf, f, positions, kw) -> None:
        """Rings, history and memory as the step-by-step decoder would hold them after position
        ``last`` (b,) of each row. Tensor ops only: no host synchronisation, no data-dependent shapes."""
        if self.window is None:  # growing cache, left-padded: row i's token p at index p + T - 1 - last_i
            T = k.shape[1]
            shift = T - 1 - last
            src = torch.arange(T, device=k.device)[None, :] - shift[:, None]  # (b, T): source index per slot
            state["k"], state["v"] = _gather_rows_at(k, src), _gather_rows_at(v, src)
            state["valid"] = src >= 0
            return

        w, m_f = self.window, self.fading_window
        state["k"], state["v"] = _ring(k, w, last), _ring(v, w, last)
        if self.use_fading and m_f > 0:
            if self.keeps_ssm_outputs:  # the window's SSM outputs, projected as they leave it
                state["f"] = _ring(f, w, last)
            else:  # the window's fading keys/values, projected on arrival
                state["kf_window"], state["vf_window"] = _ring(kf, w, last), _ring(vf, w, last)
            state["kf"], state["vf"] = _ring(kf, m_f, last - w), _ring(vf, m_f, last - w)
        if self.use_memory:
            taps = self.config.innovation_taps
            eps = ops.innovation_scores(f, taps)
            state["f_hist"] = _gather_rows(f, last, taps)
            state["eps"] = _ring(eps, w, last, fill=float("-inf"))
            # this chunk's memory (in use) ...
            rows = torch.arange(k.shape[0], device=k.device)
            chunk = torch.div(last, w, rounding_mode="floor")
            mem_pos, valid = positions[rows, chunk], kw["memory_valid"][rows, chunk]
            mem = dict(k=kw["k_memory"][rows, chunk], v=kw["v_memory"][rows, chunk], pos=mem_pos,
                       eps=torch.gather(eps, 1, mem_pos).masked_fill(~valid, float("-inf")))
            for name, x in mem.items():
                state["mem_" + name] = x
            # ... and the next chunk's, selected when this chunk began: + positions ((c-1)w, cw]
            cand_pos = (chunk - 1)[:, None] * w + 1 + torch.arange(w, device=k.device)[None, :]  # (b, w)
            cand_eps = torch.gather(eps, 1, cand_pos.clamp(min=0)).masked_fill(cand_pos < 0, float("-inf"))
            nxt = self._select_slots(mem, _gather_rows_at(k, cand_pos), _gather_rows_at(v, cand_pos), cand_eps,
                                     cand_pos.clamp(min=0))
            for name, x in nxt.items():
                state["next_" + name] = x

    # -- recurrent form ------------------------------------------------------------------------
    def step(self, u: torch.Tensor, t: torch.Tensor, rope, state: LayerState, rope_evicted=None,
             output_attentions: bool = False):
        """One token per row: u (b, d) at positions t (b,) -> (b, d), updating ``state`` in place.
        ``rope_evicted``: RoPE at positions t - w, for the fading key of the token leaving the window.

        Rows may sit at different positions (left-padded batches), so ring slots, validity and chunk
        boundaries are computed per row, with tensor ops only (no host synchronisation).
        ``output_attentions`` also returns the probabilities (b, Hq, S) over the S cached keys and the
        position each key was built from (b, S) (< 0: an empty slot)."""
        c = self.config
        b = u.shape[0]
        rows = torch.arange(b, device=u.device)
        q, k, v = self._qkv(u[:, None], rope)  # (b, 1, H, D)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if self.window is None:
            n = state.seen_tokens  # this token's index in the (left-padded) cache
            self._reserve(state, n + 1)
            state["k"][:, n], state["v"][:, n], state["valid"][:, n] = k, v, True
            keys, values, valid = state["k"][:, : n + 1], state["v"][:, : n + 1], state["valid"][:, : n + 1]
            if output_attentions:  # the cache is left-padded: slot j holds position j - (n - t)
                o, p = ops.attention_decode_weights_ref(q, keys, values, valid)
                sources = torch.arange(n + 1, device=t.device)[None, :] - (n - t)[:, None]
                return self.o_proj(o.reshape(b, -1)), (p, sources)
            o = ops.attention_decode(q, keys, values, valid, backend=c.backend)
            return self.o_proj(o.reshape(b, -1))

        w, m_f = self.window, self.fading_window
        slot = t % w
        state["k"][rows, slot], state["v"][rows, slot] = k, v
        sources = [ring_positions(t, w)]  # the position each cached key was built from; < 0: empty
        keys, values = [state["k"]], [state["v"]]
        if self.use_fading:
            f = self.mamba.step(u, state)
            if m_f > 0:
                # position t - w leaves the window and enters the fading ring: its fading key/value is
                # projected now from its kept SSM output, or was projected on arrival and kept
                evicted = t - w
                if self.keeps_ssm_outputs:
                    kf, vf = self._fading_kv(state["f"][rows, slot][:, None], rope_evicted)
                    kf, vf = kf[:, 0], vf[:, 0]
                    state["f"][rows, slot] = f
                else:
                    kf, vf = state["kf_window"][rows, slot], state["vf_window"][rows, slot]
                    kf_t, vf_t = self._fading_kv(f[:, None], rope)
                    state["kf_window"][rows, slot], state["vf_window"][rows, slot] = kf_t[:, 0], vf_t[:, 0]
                fslot = torch.remainder(evicted, m_f)  # a row still inside its first window writes a slot
                state["kf"][rows, fslot], state["vf"][rows, fslot] = kf, vf  # that stays invalid
                keys.append(state["kf"]), values.append(state["vf"])
                sources.append(ring_positions(evicted, m_f))
        if self.use_memory:
            self._step_memory(t, rows, f, state)
            keys.append(state["mem_k"]), values.append(state["mem_v"])
            sources.append(state["mem_pos"].masked_fill(state["mem_eps"] == float("-inf"), -1))
        valids = tuple(p >= 0 for p in sources)
        if output_attentions:
            o, p = ops.attention_decode_weights_ref(q, torch.cat(keys, 1), torch.cat(values, 1), torch.cat(valids, 1))
            return self.o_proj(o.reshape(b, -1)), (p, torch.cat(sources, 1))
        # the rings and slots are read in place as segments (no per-step copy of the cached keys)
        o = ops.attention_decode(q, tuple(keys), tuple(values), valids, backend=c.backend)
        return self.o_proj(o.reshape(b, -1))

    @staticmethod
    def _reserve(state: LayerState, length: int) -> None:
        """Grow the KV cache of a full-attention layer to hold ``length`` tokens, doubling its capacity
        (amortised O(1) appends). New slots are invalid until written."""
        cap = state["k"].shape[1]
        if length <= cap:
            return
        extra = max(cap, length - cap, 16)
        for name in ("k", "v", "valid"):
            x = state[name]
            state[name] = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], 1)

    def _select_slots(self, mem: dict, cand_k, cand_v, cand_eps, cand_pos) -> dict:
        """The ``m_e`` best of the slots ``mem`` (k, v, eps, pos) and candidates (b, n, ...) by innovation
        (SPEC 1.1 step 4), gathered without concatenating keys and values."""
        eps, pos, idx = ops.merge_memory(mem["eps"], mem["pos"], cand_eps, cand_pos, self.config.memory_slots)
        return dict(k=_pick_merged(mem["k"], cand_k, idx), v=_pick_merged(mem["v"], cand_v, idx), eps=eps, pos=pos)

    def _step_memory(self, t: torch.Tensor, rows: torch.Tensor, f: torch.Tensor, state: LayerState) -> None:
        """Eidetic memory at positions t (b,), after the window ring received the token at t.

        Chunk c's memory (positions <= (c-1)w) is selected when chunk c-1 begins, at t = (c-1)w, from
        chunk c-1's memory and the w positions then in the window ring, ((c-2)w, (c-1)w]; it waits in
        the ``next_*`` slots until t = cw. So no candidate is kept beyond the window ring (SPEC 1.3)."""
        w, taps = self.window, self.config.innovation_taps
        eps_t = ops.innovation_scores(f[:, None], taps, state["f_hist"])[:, 0]
        state["f_hist"] = torch.cat([state["f_hist"][:, 1:], f[:, None].to(state["f_hist"].dtype)], 1)
        state["eps"][rows, t % w] = eps_t
        at_boundary = t % w == 0
        # tensor ops only (no host sync) on accelerators; on CPU reading the flag is free and skips the
        # selection on the w - 1 steps of every w where no row starts a chunk
        if _host_reads_are_free(t.device) and not bool(at_boundary.any()):
            return
        names = ("k", "v", "eps", "pos")

        def where_start(new, old):  # rows starting a chunk take ``new``
            return torch.where(at_boundary.view(-1, *[1] * (old.dim() - 1)), new, old)

        for name in names:  # the chunk starting here takes the memory chosen for it
            state["mem_" + name] = where_start(state["next_" + name], state["mem_" + name])
        p = ring_positions(t, w)
        nxt = self._select_slots({name: state["mem_" + name] for name in names}, state["k"], state["v"],
                                 state["eps"].masked_fill(p < 0, float("-inf")), p.clamp(min=0))
        for name in names:
            state["next_" + name] = where_start(nxt[name], state["next_" + name])


def _pick_merged(mem: torch.Tensor, cand: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of [mem | cand] at idx (b, m), without concatenating: mem (b, m, H, D), cand (b, n, H, D)."""
    slots = mem.shape[1]
    expand = (-1, -1, *mem.shape[2:])
    g_mem = torch.gather(mem, 1, idx.clamp(max=slots - 1)[:, :, None, None].expand(*expand))
    g_cand = torch.gather(cand, 1, (idx - slots).clamp(min=0)[:, :, None, None].expand(*expand))
    return torch.where((idx < slots)[:, :, None, None], g_mem, g_cand)


def _weights_by_slot(p: torch.Tensor, sources: torch.Tensor, t: torch.Tensor, prompt, n: int) -> torch.Tensor:
    """A decoding step's probabilities p (b, H, S) over keys built from row positions ``sources`` (b, S)
    (< 0: an empty slot) -> weights (b, H, 1, n + 1) over the caller's n + 1 token slots. A padded
    prompt (``prompt`` = first token and token count per row) holds positions p < length at slot
    first + p; later positions follow the whole prompt, at slot p + (n - t)."""
    if prompt is None:
        slots = sources
    else:
        first, length = prompt
        slots = sources + torch.where(sources < length[:, None], first[:, None], (n - t)[:, None])
    slots = slots.clamp(min=0)  # empty keys carry probability 0
    weights = p.new_zeros(*p.shape[:2], n + 1).scatter_add_(-1, slots[:, None].expand_as(p), p)
    return weights[:, :, None]


def _gather_rows_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, T, ...) at per-row token indices (b, n) -> (b, n, ...); zeros where an index is < 0."""
    idx = index.clamp(min=0).view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
    out = torch.gather(x, 1, idx)
    return torch.where((index >= 0).view(*idx.shape[:2], *[1] * (x.dim() - 2)), out, out.new_zeros(()))


def _gather_rows(x: torch.Tensor, last: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` tokens of each row ending at ``last`` (b,), oldest first: (b, n, ...); zeros before 0."""
    return _gather_rows_at(x, last[:, None] - n + 1 + torch.arange(n, device=x.device)[None, :])


def _ring(x: torch.Tensor, size: int, last: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """The ``size`` ring slots after position ``last`` (b,): x[p] in slot p % size, ``fill`` where p < 0."""
    p = ring_positions(last, size)
    out = _gather_rows_at(x, p)
    if fill == 0:
        return out
    empty = (p < 0).view(*p.shape, *[1] * (x.dim() - 2))
    return torch.where(empty, torch.full((), fill, dtype=x.dtype, device=x.device), out)


class BMojoDecoderLayer(nn.Module):
    """``h + mixer(RMSNorm(h))`` then ``h + MLP(RMSNorm(h))``. With ``residual_in_fp32`` the residual
    stream stays fp32 and each branch reads it cast to the weights' dtype (HF Mamba / mamba-ssm order)."""

    def __init__(self, config: BMojoConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.input_layernorm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == "mamba":
            self.mixer = BMojoMambaMixer(config, layer_idx)
        else:
            self.mixer = BMojoAttention(config, layer_idx)
        self.mlp = None
        if config.intermediate_size > 0:
            self.post_mixer_layernorm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = BMojoMLP(config)

    def _branch_input(self, norm: BMojoRMSNorm, h: torch.Tensor):
        u = norm(h.to(norm.weight.dtype))
        return u, (h.float() if self.residual_in_fp32 else h)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return h
        u, h = self._branch_input(self.post_mixer_layernorm, h)
        return _residual_add(h, self.mlp(u))

    def forward(self, h: torch.Tensor, rope=None, state: LayerState | None = None, lengths: torch.Tensor | None = None,
                output_attentions: bool = False):
        """Parallel form: h (b, T, d) -> (b, T, d), and the mixer's attention weights (None for mamba)."""
        u, h = self._branch_input(self.input_layernorm, h)
        weights = None
        if self.layer_type == "mamba":
            mixed = self.mixer(u, state, lengths)
        else:
            mixed = self.mixer(u, rope, state, lengths, output_attentions)
            if output_attentions:
                mixed, weights = mixed
        return self._mlp(_residual_add(h, mixed)), weights

    def step(self, h: torch.Tensor, t: torch.Tensor, rope, state: LayerState, rope_evicted=None,
             output_attentions: bool = False):
        """Recurrent form: one token per row, h (b, d) at positions t (b,) -> (b, d), and the mixer's
        attention weights (None for mamba)."""
        u, h = self._branch_input(self.input_layernorm, h)
        weights = None
        if self.layer_type == "mamba":
            mixed = self.mixer.step(u, state)
        else:
            mixed = self.mixer.step(u, t, rope, state, rope_evicted, output_attentions)
            if output_attentions:
                mixed, weights = mixed
        return self._mlp(_residual_add(h, mixed)), weights


AUTO_MAP = {
    "AutoConfig": "configuration_bmojo.BMojoConfig",
    "AutoModel": "modeling_bmojo.BMojoModel",
    "AutoModelForCausalLM": "modeling_bmojo.BMojoForCausalLM",
}
# Written beside config.json so `trust_remote_code=True` loads without `import bmojo` first. They
# only import the installed package: loading never runs code that came with a checkpoint's weights.
REMOTE_CODE_SHIMS = {
    "configuration_bmojo.py": "from bmojo.configuration_bmojo import BMojoConfig  # noqa: F401\n",
    "modeling_bmojo.py": "from bmojo.modeling_bmojo import BMojoForCausalLM, BMojoModel  # noqa: F401\n",
}


def write_remote_code_shims(directory: str) -> None:
    """The files ``AUTO_MAP`` names, so ``trust_remote_code=True`` works without ``import bmojo``."""
    for name, text in REMOTE_CODE_SHIMS.items():
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(text)


class BMojoPreTrainedModel(PreTrainedModel):
    config_class = BMojoConfig
    config: BMojoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BMojoDecoderLayer"]
    _keep_in_fp32_modules = ["A_log", "D"]
    _is_stateful = True
    _supports_sdpa = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """transformers' ``from_pretrained``, after a full check of a local checkpoint (see
        :func:`bmojo.checkpoint.validate_checkpoint`). Safetensors only unless ``allow_pickle``."""
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            config = kwargs.get("config")
            if not isinstance(config, BMojoConfig):
                config = BMojoConfig.from_pretrained(path)
            validate_checkpoint(path, cls, config, allow_pickle=allow_pickle)
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Safetensors weights, config.json with an ``auto_map``, and the two import shims it names."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("bmojo saves safetensors only (safe_serialization=False was asked for)")
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code_shims(save_directory)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BMojoRotaryEmbedding):  # non-persistent buffer: from_pretrained leaves it uninitialized
            init.copy_(module.inv_freq, BMojoRotaryEmbedding(self.config).inv_freq)
        if isinstance(module, BMojoMambaMixer):
            module.init_mamba_weights()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
        if self.config.rescale_prenorm_residual:
            # GPT-2 / mamba-ssm: scale the projections that write into the residual stream by 1/sqrt(2L).
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            for name in ("out_proj", "o_proj", "down_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, nn.Linear):
                    init.normal_(proj.weight, mean=0.0, std=std)


class BMojoModel(BMojoPreTrainedModel):
    """The backbone: embeddings, ``num_hidden_layers`` blocks of ``config.layer_types``, final norm."""

    def __init__(self, config: BMojoConfig):
        config.check()  # again: a config may have been edited since it was built
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BMojoDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BMojoRotaryEmbedding(config) if config.rope_parameters is not None else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope(self, h: torch.Tensor, positions: torch.Tensor):
        return None if self.rotary_emb is None else self.rotary_emb(h, positions)

    def _check_inputs(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BMojoModel: pass exactly one of input_ids and inputs_embeds")
        device = self.embed_tokens.weight.device
        x = input_ids if input_ids is not None else inputs_embeds
        if x.device != device:
            raise ValueError(f"BMojoModel: inputs are on {x.device} but the model is on {device}; move them with .to({str(device)!r})")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"BMojoModel: input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise ValueError(f"BMojoModel: input_ids must be integer token ids, got dtype {input_ids.dtype}")
            # A host-side range check: skipped under compilation/export and on lazy devices (XLA), where
            # reading the values back would force a host synchronisation every step.
            if input_ids.numel() and not torch.compiler.is_compiling() and device.type in ("cpu", "cuda", "mps"):
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"BMojoModel: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"BMojoModel: inputs_embeds must be (batch, T, {self.config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        if x.shape[1] == 0:
            raise ValueError("BMojoModel: got an empty sequence (T = 0)")

    def _token_spans(self, attention_mask, T: int, position_ids=None):
        """(first token, number of tokens) per row (b,) of a padded prompt, or None when nothing is masked.

        Each row's tokens must be one contiguous run: left padding, right padding or both. The mask is
        checked here, once per prompt (a few host reads); under ``torch.compile`` / ``torch.export`` it
        is trusted (no value-dependent branch) and always applied."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[1] != T:
            raise ValueError(f"BMojoModel: attention_mask must be (batch, {T}) for a prompt of {T} tokens, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        first = mask.long().argmax(1)  # the first 1 of each row
        length = mask.sum(1)
        if torch.compiler.is_compiling():
            return first, length
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(f"BMojoModel: attention_mask holds {bad!r}; it must hold only 0 (padding) and 1 (token)")
        if not bool(mask.any(1).all()):
            rows = (~mask.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"BMojoModel: attention_mask masks every token of rows {rows}")
        j = torch.arange(T, device=mask.device)[None, :]
        inside = (j >= first[:, None]) & (j < (first + length)[:, None])
        if not bool((inside == mask).all()):
            rows = (inside != mask).any(1).nonzero().flatten().tolist()
            raise ValueError(f"BMojoModel: attention_mask rows {rows} have padding between tokens; only left or "
                             "right padding (each row's tokens in one run) is supported")
        if position_ids is not None:
            if position_ids.shape != mask.shape or not bool(((position_ids == j - first[:, None]) | ~mask).all()):
                raise ValueError("BMojoModel: position_ids differ from the positions bmojo derives from the "
                                 "attention_mask (0, 1, ... from each row's first token); custom positions are "
                                 "not supported")
        return None if bool(mask.all()) else (first, length)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BMojoCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (b, T) -> last_hidden_state (b, T, d).

        A fresh (or no) cache runs the parallel form and, if ``use_cache``, leaves the state after the
        last token; a cache that has seen tokens runs the recurrent form token by token. A left-padded
        ``attention_mask`` is honoured in the same single pass (each row gets exactly the result it
        gets alone; outputs at pads are zero). The cache may be passed as ``cache`` (transformers >= 5.24)
        or ``past_key_values``; the output carries it under the installed release's name.

        ``output_attentions``: per attention-bearing layer, weights (b, Hq, T, start + T) over source
        positions (None for ``mamba`` layers); ``output_hidden_states``: the embeddings and each
        layer's output, the last one normed. Both default to the config's, as does ``return_dict``."""
        cache = take_cache(cache, past_key_values, "BMojoModel")
        _reject_unknown_kwargs("BMojoModel", kwargs)
        c = self.config
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.return_dict if return_dict is None else return_dict
        self._check_inputs(input_ids, inputs_embeds)
        use_cache = use_cache if use_cache is not None else (c.use_cache and not self.training)
        if use_cache and cache is None:
            cache = BMojoCache(c)
        if cache is not None and not isinstance(cache, BMojoCache):
            raise TypeError(f"BMojoModel: the cache must be a BMojoCache, got {type(cache).__name__}")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, T, _ = h.shape
        start = cache.get_seq_length() if cache is not None else 0
        if start > 0:
            if attention_mask is not None and tuple(attention_mask.shape) != (b, start + T):
                raise ValueError(f"BMojoModel: attention_mask must be (batch, {start + T}) (past + new tokens), "
                                 f"got {tuple(attention_mask.shape)}")
            h, hidden, attentions = self._recurrent(h, cache, output_hidden_states, output_attentions)
        else:
            spans = self._token_spans(attention_mask, T, position_ids)
            h, hidden, attentions = self._parallel(h, cache, spans, output_hidden_states, output_attentions)
        out = BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            **{CACHE_NAME: cache if use_cache else None},
        )
        return out if return_dict else out.to_tuple()

    def _parallel(self, h, cache, spans, output_hidden_states, output_attentions):
        """The parallel form over h (b, T, d). Padded rows (``spans``: first token and number of tokens
        per row) are rolled so that their tokens come first and their padding last, where causality hides
        it; outputs are rolled back, zero at pads."""
        b, T, _ = h.shape
        first = lengths = None
        if spans is not None:
            first, lengths = spans
            h = _roll_rows(h, first)
        rope = self._rope(h, torch.arange(T, device=h.device))
        hidden = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            h, weights = layer(h, rope, cache.layers[i] if cache is not None else None, lengths, output_attentions)
            if weights is not None:
                attentions.append(weights)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        if spans is not None:  # back to the caller's layout, zeros at pads
            h = _unroll_rows(h, first, lengths)
            hidden = None if hidden is None else [_unroll_rows(x, first, lengths) for x in hidden]
            attentions = None if attentions is None else [_unroll_weights(w, first, lengths) for w in attentions]
        if cache is not None:
            cache.positions = torch.full((b,), T, dtype=torch.long, device=h.device) if lengths is None else lengths
            cache.prompt = spans
            for state in cache.layers:
                state.seen_tokens = T
        return h, hidden, attentions

    def _recurrent(self, h, cache, output_hidden_states, output_attentions):
        t = cache.positions
        fading_rope = self.rotary_emb is not None and any(lt in ("bmojo_f", "bmojo") for lt in self.config.layer_types)
        start, T = cache.get_seq_length(), h.shape[1]
        outs, per_token, per_token_attn = [], [], []
        for j in range(T):
            x = h[:, j]
            rope = self._rope(x, t[:, None])
            rope_evicted = self._rope(x, (t - self.config.sliding_window)[:, None]) if fading_rope else None
            hid, attn = [], []
            for i, layer in enumerate(self.layers):
                hid.append(x)
                x, weights = layer.step(x, t, rope, cache.layers[i], rope_evicted, output_attentions)
                if weights is not None:  # (b, Hq, 1, start + j + 1), padded to the call's start + T key slots
                    weights = F.pad(_weights_by_slot(*weights, t, cache.prompt, start + j), (0, T - 1 - j))
                attn.append(weights)
            x = self.norm(x)
            hid.append(x)
            outs.append(x)
            per_token.append(hid)
            per_token_attn.append(attn)
            t = t + 1
            for state in cache.layers:
                state.seen_tokens += 1
        cache.positions = t
        hidden = [torch.stack([p[i] for p in per_token], 1) for i in range(len(self.layers) + 1)] if output_hidden_states else None
        attentions = None
        if output_attentions:
            attentions = [torch.cat([a[i] for a in per_token_attn], 2) for i in range(len(self.layers))
                          if per_token_attn[0][i] is not None]
        return torch.stack(outs, 1), hidden, attentions


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x (b, T, ...) with row i rolled left by shift[i]: out[i, j] = x[i, (j + shift[i]) % T]."""
    T = x.shape[1]
    src = torch.remainder(torch.arange(T, device=x.device)[None, :] + shift[:, None], T)
    return torch.gather(x, 1, src.view(*src.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def _unroll_rows(x: torch.Tensor, shift: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_roll_rows`, with zeros outside each row's tokens [shift, shift + length)."""
    T = x.shape[1]
    j = torch.arange(T, device=x.device)[None, :]
    src = torch.remainder(j - shift[:, None], T)
    out = torch.gather(x, 1, src.view(*src.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
    keep = ((j >= shift[:, None]) & (j < (shift + lengths)[:, None])).view(*src.shape, *[1] * (x.dim() - 2))
    return torch.where(keep, out, out.new_zeros(()))


def _unroll_weights(w: torch.Tensor, shift: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Attention weights (b, H, T, T) of rolled rows back to the caller's layout, in queries and keys."""
    w = _unroll_rows(w.transpose(1, 2), shift, lengths)  # (b, Tq, H, Tk)
    w = _unroll_rows(w.transpose(1, 3), shift, lengths)  # (b, Tk, H, Tq)
    return w.permute(0, 2, 3, 1)


# Keywords of transformers' causal-LM loss (ForCausalLMLoss) that Trainer and users pass to forward.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Keywords that transformers or tokenizers may pass and that a causal LM without them rightly ignores.
_IGNORED_KWARGS = ("cache_position", "token_type_ids")


def _reject_unknown_kwargs(who: str, kwargs: dict) -> None:
    """A misspelled or unsupported keyword must not be swallowed (a renamed cache argument once was)."""
    unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"{who}.forward() got unexpected keyword arguments {unknown}")


class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.model = BMojoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BMojoCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (b, T) -> logits (b, T, vocab) (the last ``logits_to_keep`` positions if > 0);
        ``labels`` (b, T) give the shifted next-token cross-entropy, -100 ignored. Other arguments as
        :meth:`BMojoModel.forward`."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=take_cache(cache, past_key_values,
                         "BMojoForCausalLM"), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, position_ids=position_ids, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions, **{CACHE_NAME: output_cache(out)})
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # transformers' DynamicCache knows attention layers only; every bmojo layer keeps a BMojoCache state.
        # The cache goes under the name the installed transformers passes to forward (CACHE_NAME).
        other = "past_key_values" if CACHE_NAME == "cache" else "cache"
        if model_kwargs.get(other) is not None and model_kwargs.get(CACHE_NAME) is None:
            model_kwargs[CACHE_NAME] = model_kwargs.pop(other)
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = BMojoCache(self.config)


__all__ = ["BMojoPreTrainedModel", "BMojoModel", "BMojoForCausalLM"]
