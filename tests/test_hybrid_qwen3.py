"""The authors' B'MOJO-F checkpoints (hybrid-model-factory's ``hybrid_qwen3``) -> bmojo (bmojo.convert).

The source checkpoints here are built from the documented format only (config.json + safetensors with
their tensor names and shapes, random values), never from their code, which needs CUDA kernels. What the
numbers must be was checked separately against their modeling code (README, "The authors' B'MOJO-F
checkpoints"). These tests check that every tensor lands in the right bmojo parameter, that the
converted model decodes as it runs in parallel, and that what bmojo cannot reproduce is refused by name
with nothing written.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import bmojo  # noqa: F401  (registers model_type "bmojo")
from bmojo import BMojoCache
from bmojo.cli import main as cli_main
from bmojo.convert import convert, detect_format, load_converted

D, H, HKV, HD, FF, V, W = 32, 4, 2, 8, 48, 64, 6
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MAMBA = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


def _attention_tensors(prefix, g, bias=False, untied=False):
    t = {}
    shapes = {"q_proj": (H * HD, D), "k_proj": (HKV * HD, D), "v_proj": (HKV * HD, D), "o_proj": (D, H * HD)}
    for name, shape in shapes.items():
        t[f"{prefix}{name}.weight"] = torch.randn(shape, generator=g) * shape[1] ** -0.5
        if bias:
            t[f"{prefix}{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    for name in ("q_norm", "k_norm"):
        t[f"{prefix}{name}.weight"] = 1 + 0.2 * torch.randn(HD, generator=g)
    if untied:  # their separate projections and norms for the fading stream
        for name in ("q_proj_", "k_proj_", "v_proj_"):
            shape = shapes[name[:-1]]
            t[f"{prefix}{name}.weight"] = torch.randn(shape, generator=g) * D ** -0.5
            if bias:
                t[f"{prefix}{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
        for name in ("q_norm_", "k_norm_"):
            t[f"{prefix}{name}.weight"] = 1 + 0.2 * torch.randn(HD, generator=g)
    return t


def _mamba_tensors(prefix, g, bc_norm=True):
    """Their Mamba-2: heads = attention heads, head_dim = d_state = HD, x and B for the KV heads."""
    conv = H * HD + 2 * HKV * HD
    t = {
        f"{prefix}in_proj.weight": torch.randn(2 * H * HD + 2 * HKV * HD + H, D, generator=g) * D ** -0.5,
        f"{prefix}conv1d.weight": torch.randn(conv, 1, 4, generator=g) * 0.5,
        f"{prefix}conv1d.bias": torch.randn(conv, generator=g) * 0.1,
        f"{prefix}dt_bias": torch.randn(H, generator=g) * 0.5 - 1.0,
        f"{prefix}A_log": torch.log(1 + 7 * torch.rand(H, generator=g)),
        f"{prefix}D": 1 + 0.2 * torch.randn(H, generator=g),
        f"{prefix}norm.weight": 1 + 0.2 * torch.randn(H * HD, generator=g),
        f"{prefix}out_proj.weight": torch.randn(D, H * HD, generator=g) * (H * HD) ** -0.5,
    }
    if bc_norm:
        t[f"{prefix}B_norm.weight"] = 1 + 0.2 * torch.randn(HD, generator=g)
        t[f"{prefix}C_norm.weight"] = 1 + 0.2 * torch.randn(HD, generator=g)
    return t


def hybrid_qwen3_checkpoint(path, pattern="*-BMF-SWA-BMF", tied=True, pos_emb=False, bc_norm=True, bias=False,
                            tie_emb=False, config=None, dtype=torch.float32, shards=1, seed=0):
    """Write a hybrid_qwen3 checkpoint directory as hybrid-model-factory saves one (config.json with the
    HybridQwen3Config fields, bmojo_config / mamba2_config / swa_config as their priming code writes them,
    safetensors with the names their modules get); returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    symbols = pattern.split("-")
    t = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": 1 + 0.2 * torch.randn(D, generator=g)}
    if not tie_emb:
        t["lm_head.weight"] = torch.randn(V, D, generator=g) * D ** -0.5
    for i, s in enumerate(symbols):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
        for name, shape in (("gate_proj", (FF, D)), ("up_proj", (FF, D)), ("down_proj", (D, FF))):
            t[f"{p}mlp.{name}.weight"] = torch.randn(shape, generator=g) * shape[1] ** -0.5
        if s == "*":
            t.update(_attention_tensors(p + "self_attn.", g, bias))
        elif s == "SWA":
            t.update(_attention_tensors(p + "swa.", g, bias))
        elif s == "BMF":
            t.update(_attention_tensors(p + "bmojo_f.bmojo_attn.", g, bias, untied=not tied))
            t.update(_mamba_tensors(p + "bmojo_f.mamba.", g, bc_norm))
        elif s == "M2":
            t.update(_mamba_tensors(p + "mamba.", g, bc_norm))
    cfg = {
        "architectures": ["HybridQwen3ForCausalLM"], "model_type": "hybrid_qwen3", "vocab_size": V, "hidden_size": D,
        "intermediate_size": FF, "num_hidden_layers": len(symbols), "num_attention_heads": H,
        "num_key_value_heads": HKV, "head_dim": HD, "hidden_act": "silu", "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": tie_emb, "attention_bias": bias, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hybrid_override_pattern": pattern,
        "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "dtype": "bfloat16",
    }
    if "BMF" in symbols:
        cfg["bmojo_config"] = {"hidden_size": D, "num_heads": H, "num_key_value_heads": HKV, "head_dim": HD,
                               "rms_norm_eps": 1e-6, "window_size": W, "tie_attn_weights": tied, "ssm_mixer": "mamba2"}
    if {"BMF", "M2"} & set(symbols):
        cfg["mamba2_config"] = {"d_model": D, "d_inner": H * HD, "d_xb": HKV * HD, "intermediate_size": FF,
                                "hidden_act": "silu", "rms_norm_eps": 1e-6, "n_layer": len(symbols),
                                "ssm_cfg": {"expand": 1, "ngroups": H, "d_state": HD},
                                "use_qk_norm": bc_norm, "use_pos_emb": pos_emb}
    if "SWA" in symbols:
        cfg["swa_config"] = {"window_size": W}
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    t = {k: v.to(dtype).contiguous() for k, v in t.items()}
    if shards == 1:
        save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:  # as a large checkpoint is stored: model-0000i-of-0000n.safetensors + an index
        names, weight_map = sorted(t), {}
        for j in range(shards):
            file = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            part = names[j::shards]
            save_file({k: t[k] for k in part}, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return t


def expected_name(src: str) -> str | None:
    """Where each of their tensors must land in bmojo, written out for this test (not the converter's rules)."""
    fixed = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    if src in fixed:
        return fixed[src]
    parts = src.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    p = f"model.layers.{i}."
    if rest == "post_attention_layernorm.weight":
        return p + "post_mixer_layernorm.weight"
    if rest.startswith(("input_layernorm.", "mlp.")):
        return p + rest
    for prefix, target in (("self_attn.", "mixer."), ("swa.", "mixer."), ("bmojo_f.mamba.", "mixer.mamba."),
                           ("mamba.", "mixer.")):
        if rest.startswith(prefix):
            return p + target + rest[len(prefix):]
    if rest.startswith("bmojo_f.bmojo_attn."):
        name = rest[len("bmojo_f.bmojo_attn."):]
        untied = {"q_proj_": "q_fading_proj", "k_proj_": "k_fading_proj", "v_proj_": "v_fading_proj",
                  "q_norm_": "q_fading_norm", "k_norm_": "k_fading_norm"}
        module, _, leaf = name.partition(".")
        return p + "mixer." + untied.get(module, module) + "." + leaf
    return None


CASES = {
    "tied": ("*-BMF-SWA-BMF", dict(tied=True)),
    "untied": ("*-BMF-SWA-BMF", dict(tied=False)),
    "bmf-m2-untied-rope-bc-bias": ("BMF-M2", dict(tied=False, pos_emb=True, bias=True)),
    "m2-bmf-no-bc-norm-tied-emb": ("M2-BMF-*", dict(tied=True, bc_norm=False, tie_emb=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_lands_in_its_bmojo_parameter(tmp_path, case):
    pattern, kw = CASES[case]
    source = hybrid_qwen3_checkpoint(tmp_path / "src", pattern, **kw)
    assert detect_format(str(tmp_path / "src")) == "hybrid-qwen3"
    convert(str(tmp_path / "src"), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    params = model.state_dict()
    landed = set()
    for src, tensor in source.items():
        dst = expected_name(src)
        assert dst in params, f"{src} -> {dst}: no such bmojo parameter"
        torch.testing.assert_close(params[dst], tensor, atol=0, rtol=0, msg=f"{src} -> {dst}")
        landed.add(dst)
    if kw.get("tie_emb"):
        landed.add("lm_head.weight")
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert landed == set(params), f"bmojo parameters no source tensor filled: {sorted(set(params) - landed)}"
    c = model.config
    types = {"*": "attention", "SWA": "sliding_attention", "BMF": "bmojo_f", "M2": "mamba2"}
    assert c.layer_types == [types[s] for s in pattern.split("-")]
    assert (c.sliding_window, c.effective_fading_window, c.memory_slots) == (W, W, 0)
    assert (c.qk_norm, c.fading_mixer, c.residual_in_fp32, c.intermediate_size) == (True, "mamba2", False, FF)
    assert (c.tie_fading_kv, c.fading_query) == (kw["tied"], not kw["tied"])
    assert (c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size, c.mamba2_n_groups) == (H, HD, HD, H)
    assert (c.mamba2_xb_heads, c.mamba2_norm_groups, c.mamba2_conv_kernel, c.mamba2_norm_eps) == (HKV, H, 4, 1e-5)
    assert (c.mamba2_bc_norm, c.mamba2_bc_rope) == (kw.get("bc_norm", True), kw.get("pos_emb", False))
    assert list(c.mamba2_dt_limit) == [0.0, float("inf")] and not c.mamba2_norm_before_gate
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.attention_bias == kw.get("bias", False)
    assert c.tie_word_embeddings == kw.get("tie_emb", False) and (c.bos_token_id, c.eos_token_id) == (1, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_decodes_as_it_runs_in_parallel(tmp_path, case):
    """Past both windows (T > 2W): the fading band, its RoPE positions and the untied query are exercised
    by the prompt, the parallel continuation after a cache and the single-token steps alike."""
    pattern, kw = CASES[case]
    hybrid_qwen3_checkpoint(tmp_path / "src", pattern, **kw)
    convert(str(tmp_path / "src"), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(1, V, (2, 4 * W + 3), generator=torch.Generator().manual_seed(3))  # 0 is the pad id
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        pieces = [model(ids[:, :5], cache=cache).logits]
        pieces += [model(ids[:, j : j + 1], cache=cache).logits for j in range(5, 2 * W + 2)]
        pieces.append(model(ids[:, 2 * W + 2 :], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, atol=1e-4, rtol=0)
    kw_gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids[:, : 2 * W], **kw_gen)
    with torch.no_grad():  # greedy decoding picks the parallel forward's argmax at every step
        logits = model(out[:, :-1]).logits[:, 2 * W - 1 :]
    assert torch.equal(logits.argmax(-1), out[:, 2 * W :])


def test_the_fading_branch_matters(tmp_path):
    """The fading keys move the logits past the first window (so the tests above see them)."""
    hybrid_qwen3_checkpoint(tmp_path / "src", "*-BMF-SWA-BMF", tied=False)
    convert(str(tmp_path / "src"), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ablated = AutoModelForCausalLM.from_pretrained(tmp_path / "out", fading_window=0).eval()
    ids = torch.randint(0, V, (1, 3 * W), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = model(ids).logits, ablated(ids).logits
    torch.testing.assert_close(a[:, :W], b[:, :W])  # no fading key before position W
    assert (a[:, W:] - b[:, W:]).abs().max() > 1e-2


def test_sharded_bf16_checkpoint_converts_like_the_single_file(tmp_path):
    """As the 8B is stored: bf16, sharded with an index; A_log and D come back in fp32 under bf16."""
    hybrid_qwen3_checkpoint(tmp_path / "one", dtype=torch.bfloat16)
    hybrid_qwen3_checkpoint(tmp_path / "sharded", dtype=torch.bfloat16, shards=3)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    convert(str(tmp_path / "one"), str(tmp_path / "out-one"))
    convert(str(tmp_path / "sharded"), str(tmp_path / "out-sharded"), source_format="hybrid-qwen3")
    a, b = load_file(tmp_path / "out-one" / "model.safetensors"), load_file(tmp_path / "out-sharded" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.1.mixer.q_proj.weight"].dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out-one", dtype=torch.bfloat16)
    assert model.model.layers[1].mixer.mamba.A_log.dtype == torch.float32
    assert model.model.layers[1].mixer.q_proj.weight.dtype == torch.bfloat16


def test_cli_converts_and_lists_the_sources(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for source in ("hf-mamba", "hf-mamba2", "hf-llama", "mamba-ssm", "hybrid-qwen3"):
        assert source in text
    hybrid_qwen3_checkpoint(tmp_path / "src")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--from", "hybrid-qwen3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.layer_types[1] == "bmojo_f"


# -- refusals: a ValueError naming the field (or tensor), nothing written ---------------------------------------

def _refused(tmp_path, *patterns, **kw):
    hybrid_qwen3_checkpoint(tmp_path / "src", **kw)
    with pytest.raises(ValueError) as err:
        convert(str(tmp_path / "src"), str(tmp_path / "out"))
    for p in patterns:
        assert p in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    return str(err.value)


@pytest.mark.parametrize("kw,patterns", [
    (dict(pattern="*-GKA-*-BMF"), ("hybrid_override_pattern[1]", "'GKA'", "Gated KalmaNet")),
    (dict(pattern="GDN-BMF"), ("hybrid_override_pattern[0]", "'GDN'", "Gated DeltaNet")),
    (dict(pattern="*DA-BMF*"), ("hybrid_override_pattern[0]", "stage-0/1")),
    (dict(pattern="*-BMF-XYZ"), ("hybrid_override_pattern[2]", "'XYZ'")),
    (dict(config={"bmojo_config": {"window_size": W, "tie_attn_weights": True, "ssm_mixer": "gka"}}),
     ("bmojo_config.ssm_mixer", "'gka'")),
    (dict(config={"bmojo_config": {"window_size": W, "tie_attn_weights": True, "ssm_mixer": "gdn"}}),
     ("bmojo_config.ssm_mixer", "'gdn'")),
    (dict(config={"bmojo_config": None}), ("bmojo_config", "is missing")),
    (dict(config={"swa_config": {"window_size": W + 2}}), ("swa_config.window_size", f"bmojo_config.window_size={W}")),
    (dict(config={"num_hidden_layers": 3}), ("hybrid_override_pattern", "num_hidden_layers=3")),
    (dict(config={"hidden_act": "gelu"}), ("hidden_act", "'gelu'")),
    (dict(config={"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
     ("rope_type", "'dynamic'")),
    (dict(config={"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
     ("partial_rotary_factor",)),
    (dict(config={"mamba2_config": {"use_qk_norm": True, "use_pos_emb": False, "use_pos_embed": True}}),
     ("mamba2_config.use_pos_embed",)),
    (dict(config={"mamba2_config": {"use_qk_norm": True, "rms_norm_eps": 1e-5}}), ("mamba2_config.rms_norm_eps",)),
    (dict(config={"mamba2_config": {"ssm_cfg": {"expand": 2}}}), ("mamba2_config.ssm_cfg.expand",)),
    (dict(config={"mamba2_config": {"d_conv": 3}}), ("mamba2_config.d_conv",)),
    (dict(config={"bmojo_config": {"window_size": W, "tie_attn_weights": True, "num_heads": 8}}),
     ("bmojo_config.num_heads",)),
    (dict(config={"intermediate_size": 40}), ("'model.layers.0.mlp.gate_proj.weight'", "(48, 32)", "(40, 32)")),
], ids=["gka-layer", "gdn-layer", "fused-layer", "unknown-layer", "gka-mixer", "gdn-mixer", "no-bmojo-config",
        "windows-differ", "pattern-length", "gelu", "dynamic-rope", "partial-rotary", "vllm-pos-embed-key",
        "bc-norm-eps", "mamba2-expand", "conv-width", "bmojo-config-heads", "shape"])
def test_unsupported_settings_are_refused_by_name(tmp_path, kw, patterns):
    _refused(tmp_path, *patterns, **kw)


def test_layers_that_disagree_are_refused(tmp_path):
    """bmojo has one Mamba-2 setting for all layers: a checkpoint whose mixers differ (here one BMF layer
    without the B/C norms) is refused with the layers of each variant named."""
    t = hybrid_qwen3_checkpoint(tmp_path / "src")
    del t["model.layers.3.bmojo_f.mamba.B_norm.weight"], t["model.layers.3.bmojo_f.mamba.C_norm.weight"]
    save_file(t, tmp_path / "src" / "model.safetensors")
    with pytest.raises(ValueError, match=r"Mamba-2 mixers differ between layers") as err:
        convert(str(tmp_path / "src"), str(tmp_path / "out"))
    assert "layers [1]" in str(err.value) and "layers [3]" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_untied_fading_projections_in_one_layer_only_are_refused(tmp_path):
    t = hybrid_qwen3_checkpoint(tmp_path / "src", tied=False)
    for name in [k for k in t if k.startswith("model.layers.3.bmojo_f.bmojo_attn.") and k.split(".")[-2].endswith("_")]:
        del t[name]
    save_file(t, tmp_path / "src" / "model.safetensors")
    with pytest.raises(ValueError, match=r"B'MOJO-F attentions differ between layers"):
        convert(str(tmp_path / "src"), str(tmp_path / "out"))


def test_tensors_under_another_layer_types_module_are_refused(tmp_path):
    """A BMF layer's attention lives under bmojo_f.bmojo_attn: the same tensors under self_attn (an
    attention layer's module) are not taken for it."""
    t = hybrid_qwen3_checkpoint(tmp_path / "src")
    for name in [k for k in t if k.startswith("model.layers.1.bmojo_f.bmojo_attn.")]:
        t[name.replace("bmojo_f.bmojo_attn.", "self_attn.")] = t.pop(name)
    save_file(t, tmp_path / "src" / "model.safetensors")
    with pytest.raises(ValueError) as err:
        convert(str(tmp_path / "src"), str(tmp_path / "out"))
    assert "unexpected tensor 'model.layers.1.self_attn.q_proj.weight'" in str(err.value)
    assert "missing tensor 'model.layers.1.mixer.q_proj.weight'" in str(err.value)


def test_config_defaults_are_hybridqwen3configs(tmp_path):
    """Fields a saved config.json leaves out take HybridQwen3Config's defaults (attention_bias false,
    tie_word_embeddings false, rope_theta 10000 with the legacy fields, bmojo window 2048)."""
    hybrid_qwen3_checkpoint(tmp_path / "src", "BMF-*", config={"attention_bias": None, "tie_word_embeddings": None,
                                                               "rope_parameters": None, "rope_theta": 5e5,
                                                               "bmojo_config": {"ssm_mixer": "mamba2"}})
    config, _ = load_converted(str(tmp_path / "src"))
    assert (config.attention_bias, config.tie_word_embeddings) == (False, False)
    assert config.rope_parameters["rope_theta"] == 5e5 and config.rope_parameters["rope_type"] == "default"
    assert (config.sliding_window, config.tie_fading_kv) == (2048, True)


# -- the 8B's sizes quoted in the README ---------------------------------------------------------------------------

def _qwen3_8b_config(path, symbols, tied=True, window=2048):
    """A hybrid_qwen3 config.json written by hand with Qwen3-8B's published sizes (no weights)."""
    cfg = {"model_type": "hybrid_qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
           "num_hidden_layers": len(symbols), "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
           "hybrid_override_pattern": "-".join(symbols)}
    if "BMF" in symbols:
        cfg["bmojo_config"] = {"window_size": window, "tie_attn_weights": tied, "ssm_mixer": "mamba2"}
        cfg["mamba2_config"] = {"use_qk_norm": True, "use_pos_emb": False}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    from bmojo.convert import config_from_hybrid_qwen3

    return config_from_hybrid_qwen3(str(path))


def test_the_8b_numbers_in_the_readme(tmp_path):
    """README, "Running amazon/BMOJOF-primed-HQwen3-8B-Instruct": parameters, weight bytes and decoding state
    of Qwen3-8B's sizes with 18 '*' + 18 'BMF' layers, from bmojo.presets' accounting (the parameter count
    checked against the model built on the meta device, and Qwen3-8B's own count)."""
    from bmojo import BMojoForCausalLM
    from bmojo.presets import layer_param_count, layer_state_nbytes, param_count, state_nbytes

    qwen = _qwen3_8b_config(tmp_path / "qwen", ["*"] * 36)
    hybrid = _qwen3_8b_config(tmp_path / "tied", ["*", "BMF"] * 18)
    untied = _qwen3_8b_config(tmp_path / "untied", ["*", "BMF"] * 18, tied=False)
    assert param_count(qwen) == 8_190_735_360  # Qwen3-8B's published 8.19B
    with torch.device("meta"):
        model = BMojoForCausalLM(hybrid)
    assert sum(p.numel() for p in model.parameters()) == param_count(hybrid) == 9_250_692_288
    assert param_count(untied) == 9_703_681_728
    assert layer_param_count(hybrid, "bmojo_f") - layer_param_count(hybrid, "attention") == 58_886_496  # Mamba-2
    assert layer_state_nbytes(hybrid, "attention") == (0, 4097)
    for w in (512, 2048):
        c = hybrid if w == 2048 else _qwen3_8b_config(tmp_path / f"w{w}", ["*", "BMF"] * 18, window=w)
        assert layer_state_nbytes(c, "bmojo_f") == (12288 * w + 2_134_016, 0)
    gib = lambda c, t: f"{state_nbytes(c, torch.bfloat16, t) / 2**30:.1f} GiB"  # noqa: E731
    quoted = {
        "9.25B": f"{param_count(hybrid) / 1e9:.2f}B", "9.70B": f"{param_count(untied) / 1e9:.2f}B",
        "8.19B": f"{param_count(qwen) / 1e9:.2f}B", "58.9M": "58.9M",
        "18.5 GB": f"{param_count(hybrid) * 2 / 1e9:.1f} GB", "19.4 GB": f"{param_count(untied) * 2 / 1e9:.1f} GB",
        "37 GB": f"{param_count(hybrid) * 4 / 1e9:.0f} GB",
        "26.0 MiB": f"{layer_state_nbytes(hybrid, 'bmojo_f')[0] / 2**20:.1f} MiB",
        "468.6 MiB": f"{state_nbytes(hybrid, torch.bfloat16) / 2**20:.1f} MiB",
        "72.0 KiB": f"{18 * 4097 / 2**10:.1f} KiB",
        "0.74 GiB": f"{state_nbytes(hybrid, torch.bfloat16, 4096) / 2**30:.2f} GiB",
        "2.7 GiB at 32K": gib(hybrid, 32768) + " at 32K", "4.5 GiB": gib(qwen, 32768),
        "9.5 GiB": gib(hybrid, 131072), "18.0 GiB": gib(qwen, 131072),
    }
    for text, computed in quoted.items():
        assert text == computed, (text, computed)
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as fh:
        readme = fh.read()
    section = readme[readme.index("### Running `amazon/BMOJOF-primed-HQwen3-8B-Instruct`"):]
    for text in list(quoted) + ["12,288·w + 2,134,016", "4,097 bytes"]:
        assert text in section, text
