"""The zoo's shipped folders: model cards, the ``bmojo presets`` table and the writer of
``checkpoints/<member>-<size>/`` (config.json and a README.md model card; no weights, no Python)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..configuration_bmojo import BMojoConfig
from .accounting import layer_param_count, layer_state_nbytes, param_count
from .recipes import MEMBERS, NOMINAL_PARAMS, PAPER_SIZES, preset_config, preset_names

DESCRIPTIONS = {
    "transformer": "a Llama-style Transformer: full causal attention with RoPE, SwiGLU MLP",
    "swa": "a sliding-window Transformer: causal attention over the last w tokens, SwiGLU MLP, no RoPE",
    "mamba": "Mamba-1 as in mamba-ssm, selective-SSM mixers only, no MLP",
    "hybrid": "a Mamba / sliding-window-attention hybrid (Samba-style), alternating layers, SwiGLU MLP",
    "bmojo-f": "B'MOJO-F: attention over the last w tokens plus fading memory (keys/values projected "
               "from a Mamba mixer's outputs), SwiGLU MLP",
    "bmojo": "B'MOJO: B'MOJO-F plus eidetic memory (past tokens kept because they were hard to predict)",
    "mamba2": "Mamba-2 as in mamba-ssm (its Mamba2 block's defaults), SSD mixers only, no MLP",
    "bmojo-f-mamba2": "B'MOJO-F with the authors' Mamba-2 fading mixer (as in their released B'MOJO-F "
                      "checkpoints: one SSM head per attention head, B/C RMSNorm), SwiGLU MLP",
    "bmojo-mamba2": "B'MOJO with the authors' Mamba-2 fading mixer: bmojo-f-mamba2 plus eidetic memory",
}
assert set(DESCRIPTIONS) == set(MEMBERS)
PRESET_FILES = ("README.md", "config.json")  # all a preset folder holds
# Python files older writers put beside the config (trust_remote_code shims); the writer removes them.
_STALE_SHIMS = ("configuration_bmojo.py", "modeling_bmojo.py")


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
        f"- parameters: {n:,} ({_human(n)}" + (f"; nominal {size.upper()}, {n / nominal - 1:+.1%}" if nominal else "")
        + f"), "
        f"{'tied' if c.tie_word_embeddings else 'untied'} input/output embeddings",
        f"- layers: {_layout(c.layer_types)}; d_model {c.hidden_size}, MLP width {c.intermediate_size or 'none'}",
        layer_lines,
    ]
    if types - {"mamba", "mamba2"}:
        attn = f"- attention: {c.num_attention_heads} heads of {c.head_dim} (kv heads {c.num_key_value_heads})"
        if types & {"sliding_attention", "bmojo_f", "bmojo"}:
            attn += f", window {c.sliding_window}"
        if types & {"bmojo_f", "bmojo"}:
            attn += f", fading window {c.effective_fading_window}"
        if c.memory_slots:
            attn += f", {c.memory_slots} eidetic memory slots"
        attn += f", RoPE theta {c.rope_theta:g}" if c.rope_theta else ", no positional encoding"
        lines.append(attn)
    fading = types & {"bmojo_f", "bmojo"}
    if "mamba" in types or (fading and c.fading_mixer == "mamba"):
        lines.append(f"- SSM (Mamba-1): d_state {c.d_state}, d_conv {c.d_conv}, expand {c.expand}, dt_rank {c.dt_rank}")
    if "mamba2" in types or (fading and c.fading_mixer == "mamba2"):
        line = (f"- SSM (Mamba-2): {c.mamba2_num_heads} heads of {c.mamba2_head_dim}, d_state {c.mamba2_state_size}, "
                f"{c.mamba2_n_groups} B/C group{'s' if c.mamba2_n_groups > 1 else ''}, "
                f"d_conv {c.mamba2_conv_kernel}")
        if c.mamba2_xb_heads is not None and c.mamba2_xb_heads != c.mamba2_num_heads:
            line += f", x and B for {c.mamba2_xb_heads} heads"
        if c.mamba2_bc_norm:
            line += ", RMSNorm on B and C"
        lines.append(line)
    lines.append(f"- vocabulary: {c.vocab_size} (GPT-NeoX tokenizer padded to a multiple of 8, as Mamba)")
    lines.append("- decode-time state per sequence and layer at bf16:")
    lines.extend(state)
    body = "\n".join(lines)
    return f"""# bmojo `{name}`

The `{member}` member of the bmojo zoo at the {size.upper()} scale (docs/design.md, "The model family"): {DESCRIPTIONS[member]}.
This directory holds the architecture only (config.json, no weights, no code): the model starts from
random initialization, and the installed `bmojo` package provides the model class.

{body}

How the depth was chosen: see the docstring of `bmojo/presets/recipes.py`.

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


def preset_config_json(config: BMojoConfig) -> str:
    """config.json of a preset folder: the config's own JSON without run-dependent fields
    (``transformers_version``) or remote-code fields (``auto_map``), keys sorted, so regenerating a
    folder gives identical bytes."""
    data = json.loads(config.to_json_string(use_diff=True))
    for key in ("transformers_version", "auto_map"):
        data.pop(key, None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_preset_configs(root: str, sizes=PAPER_SIZES) -> list[str]:
    """Write ``<root>/<member>-<size>/{config.json,README.md}`` for every preset (nothing else: no
    weights and no Python files; remote-code shims an older writer left there are removed). Returns
    the directories."""
    out = []
    for name, member, size in preset_names(sizes):
        config = preset_config(member, size)
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as fh:
            fh.write(preset_config_json(config))
        with open(os.path.join(path, "README.md"), "w") as fh:
            fh.write(model_card(member, size, config))
        for stale in _STALE_SHIMS:
            if os.path.isfile(os.path.join(path, stale)):
                os.remove(os.path.join(path, stale))
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bmojo.presets",
                                description="Write the zoo's preset folders (config.json and a model card each).")
    p.add_argument("--write", metavar="ROOT", required=True,
                   help="write ROOT/<member>-<size>/{config.json,README.md} for every paper-scale preset")
    args = p.parse_args(argv)
    for path in write_preset_configs(args.write):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
