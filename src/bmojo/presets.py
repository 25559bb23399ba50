"""The zoo's presets (SPEC 1.2): one ``BMojoConfig`` recipe per member and size.

Members: ``transformer`` (all full attention, RoPE), ``swa`` (all sliding-window attention),
``mamba`` (Mamba-1 blocks, no MLP, like mamba-ssm), ``hybrid`` (alternating mamba /
sliding_attention), ``bmojo-f`` and ``bmojo``. Sizes: ``tiny`` (for tests and CPU demos) and the
paper's scales ``130m``, ``370m``, ``790m``, ``1.4b``.

How the paper-scale presets match their nominal size
----------------------------------------------------
The nominal sizes are Mamba's: d_model / depth 768/24, 1024/48, 1536/48, 2048/48, vocabulary 50280
(GPT-NeoX tokenizer padded to a multiple of 8), tied embeddings. Every member uses the same width,
vocabulary and embeddings, so members differ only in their blocks. Per layer (d = width, I = the
SwiGLU width, about 8d/3 rounded down to a multiple of 64, head_dim 64):

=============================== ============ ==========================================
layer                            parameters   depth at each size
=============================== ============ ==========================================
``mamba`` (no MLP)               ~6 d^2       Mamba's depth L
``attention`` + MLP              ~12 d^2      L / 2 (SPEC 1.2: "depth halved")
``mamba`` / ``sliding`` + MLP    ~13 d^2 avg  L / 2 (hybrid; SPEC 1.2)
``bmojo_f`` / ``bmojo`` + MLP    ~18 d^2      round(L * P(mamba layer) / P(bmojo layer)), ~L / 3
=============================== ============ ==========================================

A B'MOJO layer carries a Mamba mixer, the attention projections and an MLP, so at the halved depth
it would overshoot the nominal size by 30-40%. Its depth is instead the one that matches the
non-embedding parameters of the Mamba preset at that size (the model the nominal sizes come from),
computed from the exact per-layer counts of :func:`layer_param_count`: 8 layers at 130m and 17 at
370m, 790m and 1.4b. Applied to the other MLP-bearing members the same rule would give 13, 26, 25, 25
layers (transformer, swa) and 12, 23, 23, 23 (hybrid), within two layers of SPEC's halved depth
(12, 24, 24, 24), which those members keep. Every paper-scale preset lands within 10% of its nominal
size (tests/test_presets.py checks it; ``bmojo presets`` prints the counts).

Windowed members use ``sliding_window=512`` (the fading window defaults to the same); ``bmojo``
keeps 64 eidetic memory slots per layer. Only ``transformer`` uses RoPE (B'MOJO's default is no
positional encoding).

``python -m bmojo.presets --write checkpoints`` writes ``checkpoints/<member>-<size>/`` with the
config.json and a README.md model card of every paper-scale preset (no weights).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .cache import fading_keeps_ssm_outputs
from .configuration_bmojo import BMojoConfig

MEMBERS = ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo")
SIZES = {  # name: (hidden_size, mamba depth, vocab)
    "tiny": (64, 4, 512),
    "130m": (768, 24, 50280),
    "370m": (1024, 48, 50280),
    "790m": (1536, 48, 50280),
    "1.4b": (2048, 48, 50280),
}
PAPER_SIZES = ("130m", "370m", "790m", "1.4b")
NOMINAL_PARAMS = {"tiny": None, "130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9}
DESCRIPTIONS = {
    "transformer": "a Llama-style Transformer: full causal attention with RoPE, SwiGLU MLP",
    "swa": "a sliding-window Transformer: causal attention over the last w tokens, SwiGLU MLP, no RoPE",
    "mamba": "Mamba-1 as in mamba-ssm, selective-SSM mixers only, no MLP",
    "hybrid": "a Mamba / sliding-window-attention hybrid (Samba-style), alternating layers, SwiGLU MLP",
    "bmojo-f": "B'MOJO-F: attention over the last w tokens plus fading memory (keys/values projected "
               "from a Mamba mixer's outputs), SwiGLU MLP",
    "bmojo": "B'MOJO: B'MOJO-F plus eidetic memory (past tokens kept because they were hard to predict)",
}


def _layer_types(member: str, n: int) -> list[str]:
    if member == "hybrid":
        return ["mamba" if i % 2 == 0 else "sliding_attention" for i in range(n)]
    kind = {"transformer": "attention", "swa": "sliding_attention", "mamba": "mamba",
            "bmojo-f": "bmojo_f", "bmojo": "bmojo"}[member]
    return [kind] * n


# -- analytic sizes ------------------------------------------------------------------------------
def _mamba_mixer_params(c: BMojoConfig) -> int:
    d, di, n, r, k = c.hidden_size, c.d_inner, c.d_state, c.dt_rank, c.d_conv
    return (d * 2 * di + (2 * di if c.proj_bias else 0)  # in_proj
            + di * k + (di if c.conv_bias else 0)  # conv1d (depthwise)
            + di * (r + 2 * n)  # x_proj
            + r * di + di  # dt_proj (always with bias)
            + di * n + di  # A_log, D
            + di * d + (d if c.proj_bias else 0))  # out_proj


def layer_param_count(config: BMojoConfig, layer_type: str) -> int:
    """Parameters of one block of ``layer_type`` under ``config`` (norms, mixer, MLP), analytically."""
    c = config
    d = c.hidden_size
    n = d  # input_layernorm
    if layer_type == "mamba":
        n += _mamba_mixer_params(c)
    else:
        hq, hkv, hd, bias = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias
        n += d * hq * hd + 2 * d * hkv * hd + hq * hd * d
        if bias:
            n += hq * hd + 2 * hkv * hd + d
        if layer_type in ("bmojo_f", "bmojo"):
            n += _mamba_mixer_params(c)
            if not c.tie_fading_kv:
                n += 2 * (d * hkv * hd + (hkv * hd if bias else 0))
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
    """Decode-time state of one ``layer_type`` layer for one sequence (SPEC 1.3), as held by
    :class:`bmojo.BMojoCache` with the model in ``dtype``: ``(fixed_bytes, bytes_per_token)``.

    Only ``attention`` grows (its keys, values and a validity flag per token; the cache may reserve
    capacity ahead of the tokens held); every other type has ``bytes_per_token == 0``. The SSM state and the innovation scores are fp32, positions int64.
    """
    c = config
    a = torch.empty((), dtype=dtype).element_size()
    kv = c.num_key_value_heads * c.head_dim * a  # one key (or value), bytes
    if layer_type == "attention":
        return 0, 2 * kv + 1  # k, v and a bool validity flag per token
    fixed = 0
    if layer_type in ("mamba", "bmojo_f", "bmojo"):
        fixed += c.d_inner * (c.d_conv - 1) * a + c.d_inner * c.d_state * 4  # conv, ssm (fp32)
    if layer_type == "mamba":
        return fixed, 0
    w = c.sliding_window
    fixed += 2 * w * kv  # ring of the last w keys / values
    if layer_type in ("bmojo_f", "bmojo") and c.effective_fading_window > 0:
        # the window's SSM outputs, or their fading keys/values, whichever is smaller
        fixed += w * c.hidden_size * a if fading_keeps_ssm_outputs(c) else 2 * w * kv
        fixed += 2 * c.effective_fading_window * kv  # fading keys / values of the m_f positions before it
    if layer_type == "bmojo":
        m = c.memory_slots
        fixed += c.innovation_taps * c.hidden_size * a  # last k SSM outputs (the predictor's taps)
        fixed += w * 4  # fp32 innovation of the window's tokens (the next selection's candidates)
        fixed += 2 * (2 * m * kv + m * 8 + m * 4)  # this and the next chunk's slots: keys, values, int64 position, fp32 eps
    return fixed, 0


def state_nbytes(config: BMojoConfig, dtype: torch.dtype = torch.bfloat16, tokens: int = 0) -> int:
    """Decode-time state of the whole model for one sequence after ``tokens`` tokens (SPEC 1.3)."""
    total = 0
    for t in config.layer_types:
        fixed, per_token = layer_state_nbytes(config, t, dtype)
        total += fixed + per_token * tokens
    return total


def recall_memory_floats(config: BMojoConfig, seq_len: int) -> float:
    """The memory budget of the recall study (the x-axis of B'MOJO's Fig. 2): floats of recurrent state
    per layer that a decoder keeps for one sequence after ``seq_len`` tokens, averaged over layers.

    attention ``2 T Hkv Dh`` (KV cache); sliding_attention ``2 w Hkv Dh``; mamba ``d_inner N`` (SSM
    state); bmojo_f adds ``2 (w + m_f) Hkv Dh`` to the SSM state; bmojo adds ``2 m_e Hkv Dh`` (eidetic
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
            total += config.d_inner * config.d_state
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
        if lt in ("mamba", "bmojo_f", "bmojo"):
            di, n, r = c.d_inner, c.d_state, c.dt_rank
            out["linear"] += 2 * T * (d * 2 * di + di * c.d_conv + di * (r + 2 * n) + r * di + di * d)
            out["scan"] += 7 * T * di * n
        if lt != "mamba":
            out["linear"] += 2 * T * (2 * d * hq * hd + 2 * d * hkv * hd)  # q, o; k, v
            if lt == "attention":
                keys = t + 1
            else:
                w = c.sliding_window
                keys = torch.clamp(t + 1, max=w)
                if lt in ("bmojo_f", "bmojo"):
                    out["linear"] += 2 * T * 2 * d * hkv * hd  # fading keys / values
                    keys = keys + torch.clamp(t - w + 1, min=0, max=c.effective_fading_window)
                if lt == "bmojo":  # chunk c may hold the positions <= (c - 1) w
                    keys = keys + torch.clamp((t // w - 1) * w + 1, min=0, max=c.memory_slots)
            out["attention"] += int(2 * 2 * hq * hd * keys.sum().item())
        if c.intermediate_size > 0:
            out["linear"] += 2 * T * 3 * d * c.intermediate_size
    return out


# -- presets -------------------------------------------------------------------------------------
def preset_depth(member: str, size: str) -> int:
    """Number of layers of ``member`` at ``size`` (see the module docstring for the rule)."""
    d, depth, vocab = SIZES[size]
    if member == "mamba":
        return depth
    halved = max(depth // 2, 2)
    if member not in ("bmojo-f", "bmojo") or size == "tiny":
        return halved
    # Match the Mamba preset's non-embedding parameters with this member's per-layer count.
    ref = _base_config("mamba", size, depth)
    probe = _base_config(member, size, 1)
    budget = depth * layer_param_count(ref, "mamba")
    return max(1, round(budget / layer_param_count(probe, probe.layer_types[0])))


def _base_config(member: str, size: str, n_layers: int, **overrides) -> BMojoConfig:
    d, _, vocab = SIZES[size]
    tiny = size == "tiny"
    head_dim = 16 if tiny else 64
    kw = dict(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layers,
        layer_types=_layer_types(member, n_layers),
        intermediate_size=0 if member == "mamba" else (2 * d if tiny else 8 * d // 3 // 64 * 64),
        num_attention_heads=d // head_dim,
        sliding_window=16 if tiny else 512,
        memory_slots=(8 if tiny else 64) if member == "bmojo" else 0,
        rope_theta=10000.0 if member in ("transformer",) else None,
    )
    kw.update(overrides)
    return BMojoConfig(**kw)


def preset_config(member: str, size: str = "tiny", **overrides) -> BMojoConfig:
    """The config of zoo member ``member`` at ``size``; keyword overrides win."""
    if member not in MEMBERS:
        raise ValueError(f"preset member must be one of {MEMBERS}, got {member!r}")
    if size not in SIZES:
        raise ValueError(f"preset size must be one of {tuple(SIZES)}, got {size!r}")
    n_layers = overrides.pop("num_hidden_layers", None) or preset_depth(member, size)
    if "layer_types" not in overrides:
        overrides["layer_types"] = _layer_types(member, n_layers)
    return _base_config(member, size, n_layers, **overrides)


def preset_names(sizes=PAPER_SIZES) -> list[tuple[str, str, str]]:
    """``(name, member, size)`` of every preset at ``sizes``; names are ``<member>-<size>``."""
    return [(f"{m}-{s}", m, s) for s in sizes for m in MEMBERS]


def _human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _nbytes_human(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _layout(types: list[str]) -> str:
    if len(set(types)) == 1:
        return f"{len(types)} x {types[0]}"
    pattern = types[:2]
    if types == [pattern[i % 2] for i in range(len(types))]:
        return f"{len(types)} layers alternating {pattern[0]} / {pattern[1]}"
    return ", ".join(types)


def model_card(member: str, size: str, config: BMojoConfig | None = None) -> str:
    """The README.md of ``checkpoints/<member>-<size>/``."""
    c = config or preset_config(member, size)
    n = param_count(c)
    nominal = NOMINAL_PARAMS[size]
    per_type = {t: layer_param_count(c, t) for t in dict.fromkeys(c.layer_types)}
    layer_lines = "\n".join(f"  - `{t}`: {p:,} parameters per layer ({_nbytes_human(2 * p)} at bf16)"
                            for t, p in per_type.items())
    state = []
    for t in dict.fromkeys(c.layer_types):
        fixed, per_token = layer_state_nbytes(c, t)
        state.append(f"  - `{t}`: " + (f"grows by {per_token:,} bytes per token" if per_token
                                        else f"{_nbytes_human(fixed)}, fixed"))
    name = f"{member}-{size}"
    types = set(c.layer_types)
    lines = [
        f"- parameters: {n:,} ({_human(n)}; nominal {size.upper()}, {n / nominal - 1:+.1%}), "
        f"{'tied' if c.tie_word_embeddings else 'untied'} input/output embeddings",
        f"- layers: {_layout(c.layer_types)}; d_model {c.hidden_size}, MLP width {c.intermediate_size or 'none'}",
        layer_lines,
    ]
    if types - {"mamba"}:
        attn = f"- attention: {c.num_attention_heads} heads of {c.head_dim} (kv heads {c.num_key_value_heads})"
        if types & {"sliding_attention", "bmojo_f", "bmojo"}:
            attn += f", window {c.sliding_window}"
        if types & {"bmojo_f", "bmojo"}:
            attn += f", fading window {c.effective_fading_window}"
        if c.memory_slots:
            attn += f", {c.memory_slots} eidetic memory slots"
        attn += f", RoPE theta {c.rope_theta:g}" if c.rope_theta else ", no positional encoding"
        lines.append(attn)
    if types & {"mamba", "bmojo_f", "bmojo"}:
        lines.append(f"- SSM (Mamba-1): d_state {c.d_state}, d_conv {c.d_conv}, expand {c.expand}, dt_rank {c.dt_rank}")
    lines.append(f"- vocabulary: {c.vocab_size} (GPT-NeoX tokenizer padded to a multiple of 8, as Mamba)")
    lines.append("- decode-time state per sequence and layer at bf16:")
    lines.extend(state)
    body = "\n".join(lines)
    return f"""# bmojo `{name}`

The `{member}` member of the bmojo zoo at the {size.upper()} scale (SPEC 1.2): {DESCRIPTIONS[member]}.
This directory holds the architecture only (config.json, no weights): the model starts from random
initialization.

{body}

How the depth was chosen: see the docstring of `bmojo/presets.py`.

## Use

```python
import bmojo  # registers model_type "bmojo"
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained("checkpoints/{name}")
model = AutoModelForCausalLM.from_config(config)
```

Regenerate this directory with `python -m bmojo.presets --write checkpoints`; list every preset with
`bmojo presets`.

## Training

See the README's Training section (`bmojo train`).
"""


def preset_table(sizes=PAPER_SIZES, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per preset for ``bmojo presets``: parameters, decode-time state per sequence (fixed
    bytes, and bytes added per token by ``attention`` layers) and parameter bytes per layer, with
    activations and weights in ``dtype`` (the SSM state stays fp32)."""
    a = torch.empty((), dtype=dtype).element_size()
    rows = []
    for name, member, size in preset_names(sizes):
        c = preset_config(member, size)
        n = param_count(c)
        nominal = NOMINAL_PARAMS[size]
        fixed = sum(layer_state_nbytes(c, t, dtype)[0] for t in c.layer_types)
        per_token = sum(layer_state_nbytes(c, t, dtype)[1] for t in c.layer_types)
        per_layer = " / ".join(f"{t} {layer_param_count(c, t) * a / 2**20:.1f}" for t in dict.fromkeys(c.layer_types))
        rows.append({
            "preset": name,
            "layers": _layout(c.layer_types),
            "params": f"{_human(n)}" + (f" ({n / nominal - 1:+.1%})" if nominal else ""),
            "state/seq": (_nbytes_human(fixed) + " + grows") if per_token and fixed else
                         ("grows" if per_token else _nbytes_human(fixed) + " (fixed)"),
            "grows/token": _nbytes_human(per_token) if per_token else "0",
            "state @2k tokens": _nbytes_human(fixed + 2048 * per_token),
            "MiB/layer": per_layer,
        })
    return rows


def write_preset_configs(root: str, sizes=PAPER_SIZES) -> list[str]:
    """Write ``<root>/<member>-<size>/{config.json,README.md}`` for every preset; returns the dirs."""
    from .modeling_bmojo import AUTO_MAP, write_remote_code_shims
    out = []
    for name, member, size in preset_names(sizes):
        config = preset_config(member, size)
        config.auto_map = dict(AUTO_MAP)  # loadable with trust_remote_code=True, like saved models
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        config.save_pretrained(path)
        # Keep the directory free of run-dependent fields so regenerating it gives identical files.
        cfg_file = os.path.join(path, "config.json")
        with open(cfg_file) as fh:
            data = json.load(fh)
        data.pop("transformers_version", None)
        with open(cfg_file, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        write_remote_code_shims(path)
        with open(os.path.join(path, "README.md"), "w") as fh:
            fh.write(model_card(member, size, config))
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bmojo.presets", description=__doc__.split("\n")[0])
    p.add_argument("--write", metavar="ROOT", required=True,
                   help="write ROOT/<member>-<size>/{config.json,README.md} for every paper-scale preset")
    args = p.parse_args(argv)
    for path in write_preset_configs(args.write):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
