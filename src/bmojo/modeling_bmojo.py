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

from . import ops
from .cache import BMojoCache, LayerState, fading_keeps_ssm_outputs, ring_positions
from .checkpoint import validate_checkpoint
from .configuration_bmojo import BMojoConfig


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
    """RoPE at absolute positions (Llama's default rotary, half-split layout)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (b, T) -> cos, sin (..., T, head_dim) fp32."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


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

    def forward(self, u: torch.Tensor, state: LayerState | None = None) -> torch.Tensor:
        """u (b, T, d) -> (b, T, d). With a fresh ``state``, also leaves the final conv/SSM states in it."""
        backend = self.config.backend
        x, z = self.in_proj(u).chunk(2, dim=-1)
        conv_w = self.conv1d.weight.squeeze(1)
        want_state = state is not None
        out = ops.causal_conv1d(x, conv_w, self.conv1d.bias, "silu", return_final_state=want_state, backend=backend)
        x, conv_state = out if want_state else (out, None)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        out = ops.selective_scan(x, dt, A, B, C, D=self.D, z=z, dt_bias=None, dt_softplus=True,
                                 return_final_state=want_state, backend=backend)
        y, ssm_state = out if want_state else (out, None)
        if want_state:
            state["conv"], state["ssm"] = conv_state, ssm_state
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
    def forward(self, u: torch.Tensor, rope=None, state: LayerState | None = None) -> torch.Tensor:
        """u (b, T, d) at positions 0..T-1 -> (b, T, d). A fresh ``state`` receives the recurrent
        state after the last position (SPEC 1.3)."""
        b, T, _ = u.shape
        c = self.config
        q, k, v = self._qkv(u, rope)
        kw = dict(window=self.window)
        f = kf = vf = positions = None
        if self.use_fading:
            f = self.mamba(u, state)
            kf, vf = self._fading_kv(f, rope)
            kw.update(k_fading=kf, v_fading=vf, fading_window=self.fading_window)
        if self.use_memory:
            positions, valid = ops.innovation_select(f, self.window, c.memory_slots, c.innovation_taps,
                                                     backend=c.backend)
            kw.update(k_memory=self._gather(k, positions), v_memory=self._gather(v, positions), memory_valid=valid)
        o = ops.bmojo_attention(q, k, v, backend=c.backend, **kw)
        if state is not None:
            self._store_state(state, T, k, v, kf, vf, f, positions, kw)
        return self.o_proj(o.reshape(b, T, -1))

    @staticmethod
    def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (b, T, H, D), positions (b, C, m) -> (b, C, m, H, D). Not differentiated w.r.t. the choice."""
        b, C, m = positions.shape
        idx = positions.reshape(b, C * m, 1, 1).expand(-1, -1, x.shape[2], x.shape[3])
        return torch.gather(x, 1, idx).view(b, C, m, x.shape[2], x.shape[3])

    @torch.no_grad()
    def _store_state(self, state, T, k, v, kf, vf, f, positions, kw) -> None:
        """Rings, history and memory as the step-by-step decoder would hold them after position T-1."""
        if self.window is None:
            state["k"], state["v"] = k.detach().clone(), v.detach().clone()
            state["valid"] = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
            return

        def ring(x, size, last=T - 1, fill=0):
            """The ``size`` ring slots after position ``last``: x[p] in slot p % size, ``fill`` where p < 0.
            (Positions are known on the host; a where, not a boolean-mask write, so XLA needs no nonzero.)"""
            p = ring_positions(torch.tensor([last]), size)[0]
            out = x[:, p.clamp(min=0).to(x.device)]
            empty = (p < 0).to(x.device).view(1, size, *[1] * (x.dim() - 2))
            return torch.where(empty, torch.full((), fill, dtype=x.dtype, device=x.device), out)

        w, m_f = self.window, self.fading_window
        state["k"], state["v"] = ring(k, w), ring(v, w)
        if self.use_fading and m_f > 0:
            if self.keeps_ssm_outputs:  # the window's SSM outputs, projected as they leave it
                state["f"] = ring(f, w)
            else:  # the window's fading keys/values, projected on arrival
                state["kf_window"], state["vf_window"] = ring(kf, w), ring(vf, w)
            state["kf"], state["vf"] = ring(kf, m_f, last=T - 1 - w), ring(vf, m_f, last=T - 1 - w)
        if self.use_memory:
            taps = self.config.innovation_taps
            eps = ops.innovation_scores(f, taps)
            f_hist = torch.cat([f.new_zeros(f.shape[0], taps, f.shape[2]), f], dim=1)[:, -taps:]
            state["f_hist"] = f_hist.clone()
            state["eps"] = ring(eps, w, fill=float("-inf"))
            # this chunk's memory (in use) ...
            valid = kw["memory_valid"][:, -1]
            mem = dict(k=kw["k_memory"][:, -1].clone(), v=kw["v_memory"][:, -1].clone(), pos=positions[:, -1].clone(),
                       eps=torch.gather(eps, 1, positions[:, -1]).masked_fill(~valid, float("-inf")))
            for name, x in mem.items():
                state["mem_" + name] = x
            # ... and the next chunk's, selected when this chunk began: + positions ((c-1)w, cw]
            c = (T - 1) // w
            lo, hi = max((c - 1) * w + 1, 0), c * w
            cand_pos = torch.arange(lo, hi + 1, device=k.device).expand(k.shape[0], -1)
            nxt = self._select_slots(mem, k[:, lo : hi + 1], v[:, lo : hi + 1], eps[:, lo : hi + 1], cand_pos)
            for name, x in nxt.items():
                state["next_" + name] = x

    # -- recurrent form ------------------------------------------------------------------------
    def step(self, u: torch.Tensor, t: torch.Tensor, rope, state: LayerState, rope_evicted=None) -> torch.Tensor:
        """One token per row: u (b, d) at positions t (b,) -> (b, d), updating ``state`` in place.
        ``rope_evicted``: RoPE at positions t - w, for the fading key of the token leaving the window.

        Rows may sit at different positions (left-padded batches), so ring slots, validity and chunk
        boundaries are computed per row, with tensor ops only (no host synchronisation)."""
        c = self.config
        b = u.shape[0]
        rows = torch.arange(b, device=u.device)
        q, k, v = self._qkv(u[:, None], rope)  # (b, 1, H, D)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if self.window is None:
            n = state.seen_tokens  # this token's index in the (left-padded) cache
            self._reserve(state, n + 1)
            state["k"][:, n], state["v"][:, n], state["valid"][:, n] = k, v, True
            o = ops.attention_decode(q, state["k"][:, : n + 1], state["v"][:, : n + 1], state["valid"][:, : n + 1],
                                     backend=c.backend)
            return self.o_proj(o.reshape(b, -1))

        w, m_f = self.window, self.fading_window
        slot = t % w
        state["k"][rows, slot], state["v"][rows, slot] = k, v
        keys, values, valids = [state["k"]], [state["v"]], [ring_positions(t, w) >= 0]
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
                valids.append(ring_positions(evicted, m_f) >= 0)
        if self.use_memory:
            self._step_memory(t, rows, f, state)
            keys.append(state["mem_k"]), values.append(state["mem_v"])
            valids.append(state["mem_eps"] > float("-inf"))
        # the rings and slots are read in place as segments (no per-step copy of the cached keys)
        o = ops.attention_decode(q, tuple(keys), tuple(values), tuple(valids), backend=c.backend)
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

    def forward(self, h: torch.Tensor, rope=None, state: LayerState | None = None) -> torch.Tensor:
        """Parallel form: h (b, T, d) -> (b, T, d)."""
        u, h = self._branch_input(self.input_layernorm, h)
        mixed = self.mixer(u, state) if self.layer_type == "mamba" else self.mixer(u, rope, state)
        return self._mlp(_residual_add(h, mixed))

    def step(self, h: torch.Tensor, t: torch.Tensor, rope, state: LayerState, rope_evicted=None) -> torch.Tensor:
        """Recurrent form: one token per row, h (b, d) at positions t (b,) -> (b, d)."""
        u, h = self._branch_input(self.input_layernorm, h)
        if self.layer_type == "mamba":
            mixed = self.mixer.step(u, state)
        else:
            mixed = self.mixer.step(u, t, rope, state, rope_evicted)
        return self._mlp(_residual_add(h, mixed))


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
            init.copy_(module.inv_freq, BMojoRotaryEmbedding(self.config.head_dim, self.config.rope_theta).inv_freq)
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
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BMojoDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = (BMojoRotaryEmbedding(config.head_dim, config.rope_theta)
                           if config.rope_theta is not None else None)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope(self, positions: torch.Tensor):
        return None if self.rotary_emb is None else self.rotary_emb(positions)

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

    @staticmethod
    def _left_padding(attention_mask, start: int, T: int) -> torch.Tensor | None:
        """Pads per row (b,) of a left-padded prompt, or None when there is nothing to mask."""
        if attention_mask is None:
            return None
        mask = attention_mask.bool()
        if mask.dim() != 2 or mask.shape[1] != start + T:
            raise ValueError(f"BMojoModel: attention_mask must be (batch, {start + T}) (past + new tokens), "
                             f"got {tuple(attention_mask.shape)}")
        if bool(mask.all()):
            return None
        if start > 0 and not bool(mask[:, start:].all()):
            raise ValueError("BMojoModel: masked tokens after the prompt; only left padding of the prompt is supported")
        if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            rows = (mask[:, 1:] < mask[:, :-1]).any(1).nonzero().flatten().tolist()
            raise ValueError(f"BMojoModel: attention_mask rows {rows} are not left-padded (a 0 follows a 1); "
                             "right or inner padding is not supported: pad on the left (tokenizer.padding_side='left')")
        if not bool(mask.any(1).all()):
            raise ValueError("BMojoModel: an attention_mask row masks every token")
        return (~mask).sum(1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: BMojoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids (b, T) -> last_hidden_state (b, T, d).

        A fresh (or no) cache runs the parallel form and, if ``use_cache``, leaves the state after the
        last token; a cache that has seen tokens runs the recurrent form token by token. A left-padded
        ``attention_mask`` runs each row's prompt on its own (outputs at pads are zero), so every row
        gets exactly the result it would get alone."""
        self._check_inputs(input_ids, inputs_embeds)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = BMojoCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, BMojoCache):
            raise TypeError(f"BMojoModel: past_key_values must be a BMojoCache, got {type(past_key_values).__name__}")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, T, _ = h.shape
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        pad = self._left_padding(attention_mask, start, T)

        if start > 0:
            h, hidden = self._recurrent(h, past_key_values, output_hidden_states)
        elif pad is None:
            h, hidden = self._parallel(h, past_key_values, output_hidden_states)
        else:
            outs, hidden, rows = [], [], []
            for i in range(b):
                row_cache = BMojoCache(self.config) if past_key_values is not None else None
                out, hid = self._parallel(h[i:i + 1, int(pad[i]):], row_cache, output_hidden_states)
                zeros = out.new_zeros(1, int(pad[i]), out.shape[-1])
                outs.append(torch.cat([zeros, out], 1))
                hidden.append(None if hid is None else [torch.cat([zeros, x], 1) for x in hid])
                rows.append(row_cache)
            h = torch.cat(outs)
            hidden = None if hidden[0] is None else [torch.cat(xs) for xs in zip(*hidden)]
            if past_key_values is not None:
                merged = BMojoCache.stack_rows(self.config, rows)
                past_key_values.layers, past_key_values.positions = merged.layers, merged.positions
                for layer in past_key_values.layers:
                    layer.seen_tokens = T
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )

    def _parallel(self, h, cache, output_hidden_states):
        b, T, _ = h.shape
        rope = self._rope(torch.arange(T, device=h.device))
        hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            h = layer(h, rope, cache.layers[i] if cache is not None else None)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        if cache is not None:
            cache.positions = torch.full((b,), T, dtype=torch.long, device=h.device)
            for state in cache.layers:
                state.seen_tokens = T
        return h, hidden

    def _recurrent(self, h, cache, output_hidden_states):
        t = cache.positions
        fading_rope = self.rotary_emb is not None and any(lt in ("bmojo_f", "bmojo") for lt in self.config.layer_types)
        outs, per_token = [], []
        for j in range(h.shape[1]):
            x = h[:, j]
            rope = self._rope(t[:, None])
            rope_evicted = self._rope((t - self.config.sliding_window)[:, None]) if fading_rope else None
            hid = []
            for i, layer in enumerate(self.layers):
                hid.append(x)
                x = layer.step(x, t, rope, cache.layers[i], rope_evicted)
            x = self.norm(x)
            hid.append(x)
            outs.append(x)
            per_token.append(hid)
            t = t + 1
            for state in cache.layers:
                state.seen_tokens += 1
        cache.positions = t
        hidden = [torch.stack([p[i] for p in per_token], 1) for i in range(len(self.layers) + 1)] if output_hidden_states else None
        return torch.stack(outs, 1), hidden


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
        past_key_values: BMojoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (b, T) -> logits (b, T, vocab) (the last ``logits_to_keep`` positions if > 0);
        ``labels`` (b, T) give the shifted next-token cross-entropy, -100 ignored."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # transformers' DynamicCache knows attention layers only; every bmojo layer keeps a BMojoCache state.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = BMojoCache(self.config)


__all__ = ["BMojoPreTrainedModel", "BMojoModel", "BMojoForCausalLM"]
