"""What a config costs, analytically: parameters, decode-time state, FLOPs and the recall study's
memory budget. Nothing here builds a model; the decode-time state is measured by allocating
:class:`bmojo.cache.LayerState` on the meta device (no memory is used)."""
from __future__ import annotations

import torch

from ..configuration_bmojo import BMojoConfig


def _mamba_mixer_params(c: BMojoConfig) -> int:
    d, di, n, r, k = c.hidden_size, c.d_inner, c.d_state, c.dt_rank, c.d_conv
    return (d * 2 * di + (2 * di if c.proj_bias else 0)  # in_proj
            + di * k + (di if c.conv_bias else 0)  # conv1d (depthwise)
            + di * (r + 2 * n)  # x_proj
            + r * di + di  # dt_proj (always with bias)
            + di * n + di  # A_log, D
            + di * d + (d if c.proj_bias else 0))  # out_proj


def _mamba2_mixer_params(c: BMojoConfig) -> int:
    d, H, P, N, G = c.hidden_size, c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size, c.mamba2_n_groups
    xb = c.mamba2_xb_heads or H
    conv_dim = xb * P + (c.mamba2_xb_heads or G) * N + G * N
    d_inner = H * P
    proj_bias = c.mamba2_use_bias
    return (d * (d_inner + conv_dim + H) + ((d_inner + conv_dim + H) if proj_bias else 0)  # in_proj
            + conv_dim * c.mamba2_conv_kernel + (conv_dim if c.mamba2_use_conv_bias else 0)  # conv1d
            + 2 * H + (d_inner if c.mamba2_D_has_hdim else H)  # dt_bias, A_log, D
            + d_inner  # gated RMSNorm
            + d_inner * d + (d if proj_bias else 0)  # out_proj
            + (2 * N if c.mamba2_bc_norm else 0))  # B, C norms


def _ssm_params(c: BMojoConfig, mixer: str) -> int:
    return _mamba2_mixer_params(c) if mixer == "mamba2" else _mamba_mixer_params(c)


def layer_param_count(config: BMojoConfig, layer_type: str) -> int:
    """Parameters of one block of ``layer_type`` under ``config`` (norms, mixer, MLP), analytically."""
    c = config
    d = c.hidden_size
    n = d  # input_layernorm
    if layer_type in ("mamba", "mamba2"):
        n += _ssm_params(c, layer_type)
    else:
        hq, hkv, hd, bias = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias
        n += d * hq * hd + 2 * d * hkv * hd + hq * hd * d
        if bias:
            n += hq * hd + 2 * hkv * hd + d
        if c.qk_norm:
            n += 2 * hd
        if layer_type in ("bmojo_f", "bmojo"):
            n += _ssm_params(c, c.fading_mixer)
            if not c.tie_fading_kv:
                n += 2 * (d * hkv * hd + (hkv * hd if bias else 0)) + (hd if c.qk_norm else 0)
            if c.fading_query:
                n += d * hq * hd + (hq * hd if bias else 0) + (hd if c.qk_norm else 0)
    if c.intermediate_size > 0:
        i = c.intermediate_size
        n += d + 3 * d * i + ((2 * i + d) if c.mlp_bias else 0)  # post_mixer_layernorm + SwiGLU
    return n


def param_count(config: BMojoConfig) -> int:
    """Parameters of a ``BMojoForCausalLM`` with ``config`` (tied embeddings counted once)."""
    emb = config.vocab_size * config.hidden_size
    return (emb * (1 if config.tie_word_embeddings else 2) + config.hidden_size
            + sum(layer_param_count(config, t) for t in config.layer_types))


def layer_state_nbytes(config: BMojoConfig, layer_type: str, dtype: torch.dtype = torch.bfloat16
                       ) -> tuple[int, int]:
    """Decode-time state of one ``layer_type`` layer for one sequence, as :class:`bmojo.BMojoCache`
    allocates it (on the meta device: nothing is allocated) with the model in ``dtype``:
    ``(fixed_bytes, bytes_per_token)``. Only ``attention`` grows (keys, values and a validity flag per
    token); every other type has ``bytes_per_token == 0``."""
    from ..cache import LayerState

    def nbytes(tokens: int) -> int:
        return LayerState.allocate(config, layer_type, 1, "meta", dtype, tokens=tokens, max_length=tokens).nbytes()

    if layer_type == "attention":
        per_token = nbytes(2) - nbytes(1)
        return nbytes(1) - per_token, per_token
    return nbytes((config.sliding_window or 0) + config.effective_fading_window + 1), 0


def state_nbytes(config: BMojoConfig, dtype: torch.dtype = torch.bfloat16, tokens: int = 0) -> int:
    """Decode-time state of the whole model for one sequence after ``tokens`` tokens (docs/design.md, "Decoding state")."""
    total = 0
    for t in config.layer_types:
        fixed, per_token = layer_state_nbytes(config, t, dtype)
        total += fixed + per_token * tokens
    return total


def _ssm_state_floats(c: BMojoConfig, mixer: str) -> int:
    """Elements of one sequence's SSM state (not the conv state): ``d_inner N`` (Mamba-1) or
    ``heads head_dim N`` (Mamba-2)."""
    if mixer == "mamba2":
        return c.mamba2_num_heads * c.mamba2_head_dim * c.mamba2_state_size
    return c.d_inner * c.d_state


def recall_memory_floats(config: BMojoConfig, seq_len: int) -> float:
    """The memory budget of the recall study (the x-axis of B'MOJO's Fig. 2): floats of recurrent state
    per layer that a decoder keeps for one sequence after ``seq_len`` tokens, averaged over layers.

    attention ``2 T Hkv Dh`` (KV cache); sliding_attention ``2 w Hkv Dh``; mamba ``d_inner N`` (SSM
    state; mamba2 ``H P N``, as a Mamba-2 fading mixer); bmojo_f adds ``2 (w + m_f) Hkv Dh`` to the SSM state; bmojo adds ``2 m_e Hkv Dh`` (eidetic
    slots). Like the paper's "SSM state + KV cache + memory" count it leaves out the conv state, the
    innovation taps and scores, the window's SSM outputs (kept to project fading keys as tokens leave
    the window), the next chunk's slots and slot positions/scores (:func:`state_nbytes` counts them).
    """
    kv = 2 * config.num_key_value_heads * config.head_dim
    total = 0
    for lt in config.layer_types:
        if lt == "attention":
            total += seq_len * kv
        elif lt == "sliding_attention":
            total += config.sliding_window * kv
        else:
            total += _ssm_state_floats(config, lt if lt in ("mamba", "mamba2") else config.fading_mixer)
            if lt in ("bmojo_f", "bmojo"):
                total += (config.sliding_window + config.effective_fading_window) * kv
            if lt == "bmojo":
                total += config.memory_slots * kv
    return total / len(config.layer_types)


def forward_flops(config: BMojoConfig, seq_len: int) -> dict[str, int]:
    """Analytic FLOPs of one forward over ``seq_len`` tokens, batch 1 (a multiply-add counts 2).

    ``linear``: every projection, the MLPs, the conv and the LM head. ``attention``: QK^T and PV over
    exactly the keys each query may see (causal, window, fading band, valid eidetic slots); block
    kernels compute some masked keys on top. ``scan``: the selective scan's ~7 FLOPs per state element
    and token (decay, dt x B, a h + u, C h), elementwise work that is memory bound on CPU.
    Used by benchmarks/cpu.py to state what a model can reach at a given FLOP rate.
    """
    c, T = config, seq_len
    d, hq, hkv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    t = torch.arange(T, dtype=torch.float64)
    out = {"linear": 2 * T * d * c.vocab_size, "attention": 0, "scan": 0}
    for lt in c.layer_types:
        mixer = lt if lt in ("mamba", "mamba2") else (c.fading_mixer if lt in ("bmojo_f", "bmojo") else None)
        if mixer == "mamba":
            di, n, r = c.d_inner, c.d_state, c.dt_rank
            out["linear"] += 2 * T * (d * 2 * di + di * c.d_conv + di * (r + 2 * n) + r * di + di * d)
            out["scan"] += 7 * T * di * n
        elif mixer == "mamba2":  # projections and conv; the scan as its recurrence (chunked forms trade FLOPs)
            H, P, N = c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size
            xb, G = c.mamba2_xb_heads or H, c.mamba2_n_groups
            conv_dim = xb * P + (c.mamba2_xb_heads or G) * N + G * N
            out["linear"] += 2 * T * (d * (H * P + conv_dim + H) + conv_dim * c.mamba2_conv_kernel + H * P * d)
            out["scan"] += 7 * T * H * P * N
        if lt not in ("mamba", "mamba2"):
            out["linear"] += 2 * T * (2 * d * hq * hd + 2 * d * hkv * hd)  # q, o; k, v
            if lt == "attention":
                keys = t + 1
            else:
                w = c.sliding_window
                keys = torch.clamp(t + 1, max=w)
                if lt in ("bmojo_f", "bmojo"):
                    # fading keys / values where a query reads them: a fading key is first read w positions after its own
                    out["linear"] += 2 * max(T - w, 0) * 2 * d * hkv * hd
                    keys = keys + torch.clamp(t - w + 1, min=0, max=c.effective_fading_window)
                if lt == "bmojo":  # chunk c may hold the positions <= (c - 1) w
                    keys = keys + torch.clamp((t // w - 1) * w + 1, min=0, max=c.memory_slots)
            out["attention"] += int(2 * 2 * hq * hd * keys.sum().item())
        if c.intermediate_size > 0:
            out["linear"] += 2 * T * 3 * d * c.intermediate_size
    return out


__all__ = ["layer_param_count", "param_count", "layer_state_nbytes", "state_nbytes", "recall_memory_floats",
           "forward_flops"]
