"""Hugging Face transformers' own models on a bmojo model's weights, as benchmark baselines:
``MambaForCausalLM`` (its torch path) for the ``mamba`` member and ``LlamaForCausalLM`` (sdpa) for
the ``transformer`` member. The weights are the same tensors under transformers' names."""
from __future__ import annotations

import re

import torch


def _renamed(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = tensor
                break
        else:
            raise ValueError(f"no transformers name for bmojo tensor {name!r}")
    return out


def hf_baseline(model):
    """The transformers twin of a bmojo ``mamba`` or ``transformer`` model, or None for other members."""
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    c = model.config
    types = set(c.layer_types)
    state = model.state_dict()
    if types == {"mamba"} and c.intermediate_size == 0:
        cfg = MambaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, state_size=c.d_state,
                          num_hidden_layers=c.num_hidden_layers, layer_norm_epsilon=c.rms_norm_eps, expand=c.expand,
                          conv_kernel=c.d_conv, use_bias=c.proj_bias, use_conv_bias=c.conv_bias,
                          time_step_rank=c.dt_rank, tie_word_embeddings=c.tie_word_embeddings,
                          residual_in_fp32=c.residual_in_fp32, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        rules = [(r"model\.embed_tokens\.(.*)", r"backbone.embeddings.\1"),
                 (r"model\.layers\.(\d+)\.input_layernorm\.(.*)", r"backbone.layers.\1.norm.\2"),
                 (r"model\.layers\.(\d+)\.mixer\.(.*)", r"backbone.layers.\1.mixer.\2"),
                 (r"model\.norm\.(.*)", r"backbone.norm_f.\1"), (r"lm_head\.(.*)", r"lm_head.\1")]
        hf = MambaForCausalLM(cfg)
    elif types == {"attention"} and c.rope_theta is not None:
        cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                          rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
                          attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, max_position_embeddings=1 << 17,
                          tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa",
                          pad_token_id=None, bos_token_id=None, eos_token_id=None)
        rules = [(r"model\.layers\.(\d+)\.mixer\.(.*)", r"model.layers.\1.self_attn.\2"),
                 (r"model\.layers\.(\d+)\.post_mixer_layernorm\.(.*)", r"model.layers.\1.post_attention_layernorm.\2"),
                 (r"(model\..*|lm_head\..*)", r"\1")]
        hf = LlamaForCausalLM(cfg)
    else:
        return None
    missing, unexpected = hf.load_state_dict(_renamed(state, rules), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not c.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"baseline weights do not line up: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(next(model.parameters()).dtype).eval()
