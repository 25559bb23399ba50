"""Checkpoint interop (bmojo.convert): HF MambaForCausalLM, HF LlamaForCausalLM and mamba-ssm
checkpoints convert to bmojo checkpoints with the same logits (fp32, atol 1e-4) and the same greedy
generations; bad checkpoints raise a ValueError naming the tensor and both shapes, and write nothing.

mamba_ssm itself cannot be installed here (it needs CUDA to build), so the mamba-ssm path is tested with
a ``MambaLMHeadModel``-style state dict made by renaming a random HF Mamba's weights into mamba-ssm's
names (backbone.embedding, backbone.layers.{i}.mixer/norm, backbone.norm_f, lm_head) beside a
mamba-ssm config.json.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM
from transformers.utils import logging as hf_logging

import bmojo  # noqa: F401  (registers model_type "bmojo")
from bmojo.cli import main as cli_main
from bmojo.convert import convert

hf_logging.set_verbosity_error()  # HF Mamba's "kernel not installed, using the reference path" notes
V = 101
PAD = 0  # never in the prompts: HF infers an attention mask from pad tokens


def _perturb(model, scale=0.05):
    """Move every parameter off its init (norm weights of 1, zero biases, ...) so the test sees them all."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _prompt(vocab=V, batch=2, length=12):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


def _assert_same_model(ref, converted_dir, vocab=V, generate=True):
    model = AutoModelForCausalLM.from_pretrained(converted_dir).eval()
    assert type(model).__name__ == "BMojoForCausalLM"
    ids = _prompt(vocab)
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if generate:
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=PAD)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    return model


def _hf_mamba(**kw):
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=kw.pop("vocab_size", V), hidden_size=32, state_size=8, num_hidden_layers=2,
                      pad_token_id=PAD, bos_token_id=None, eos_token_id=None, **kw)
    return _perturb(MambaForCausalLM(cfg))


def _hf_llama(**kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      pad_token_id=PAD, bos_token_id=None, eos_token_id=None, **kw)
    cfg._attn_implementation = "eager"
    return _perturb(LlamaForCausalLM(cfg))


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False)],
                         ids=["tied", "untied-biases"])
def test_hf_mamba_converts_to_the_mamba_layout(tmp_path, kw):
    ref = _hf_mamba(**kw)
    ref.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    model = _assert_same_model(ref, tmp_path / "out")
    c = model.config
    assert c.layer_types == ["mamba", "mamba"] and c.intermediate_size == 0
    assert (c.d_state, c.d_conv, c.dt_rank, c.tie_word_embeddings) == (8, 4, 2, ref.config.tie_word_embeddings)
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no temporary directory left behind


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
], ids=["mha-tied", "gqa-headdim-biases-untied"])
def test_hf_llama_converts_to_the_transformer_layout(tmp_path, kw):
    ref = _hf_llama(**kw)
    ref.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    model = _assert_same_model(ref, tmp_path / "out")
    c = model.config
    assert c.layer_types == ["attention", "attention"]
    assert c.rope_theta == ref.config.rope_parameters["rope_theta"]
    assert (c.num_key_value_heads, c.head_dim) == (ref.config.num_key_value_heads, ref.config.head_dim)


def _mamba_ssm_checkpoint(ref, path, with_lm_head: bool, weights="model.safetensors"):
    """Rename an HF Mamba's weights into a mamba-ssm MambaLMHeadModel state dict + config.json."""
    os.makedirs(path, exist_ok=True)
    state = {}
    for k, v in ref.state_dict().items():
        k = k.replace("backbone.embeddings.", "backbone.embedding.")
        if k == "lm_head.weight" and not with_lm_head:
            continue
        state[k] = v.clone().contiguous()
    if weights.endswith(".safetensors"):
        save_file(state, os.path.join(path, weights))
    else:
        torch.save(state, os.path.join(path, weights))
    c = ref.config
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": V - 4,
                   "ssm_cfg": {"d_state": c.state_size}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                   "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
                   "tie_embeddings": True}, fh)
    return os.path.join(path, weights)


def test_mamba_ssm_state_dict_converts(tmp_path):
    ref = _hf_mamba(vocab_size=104)  # mamba-ssm pads vocab_size 97 up to a multiple of 8
    _mamba_ssm_checkpoint(ref, tmp_path / "dir", with_lm_head=False)
    convert(str(tmp_path / "dir"), str(tmp_path / "out-dir"))  # a directory, format detected from config.json
    model = _assert_same_model(ref, tmp_path / "out-dir", vocab=104)
    assert model.config.vocab_size == 104
    # a weights file with config.json beside it; torch.save'd tied checkpoints also hold lm_head.weight
    f = _mamba_ssm_checkpoint(ref, tmp_path / "file", with_lm_head=True, weights="weights.safetensors")
    convert(f, str(tmp_path / "out-file"), source_format="mamba-ssm")
    a, b = load_file(tmp_path / "out-dir" / "model.safetensors"), load_file(tmp_path / "out-file" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_weights_need_the_flag_and_load_weights_only(tmp_path):
    ref = _hf_mamba(vocab_size=104)
    f = _mamba_ssm_checkpoint(ref, tmp_path / "pkl", with_lm_head=True, weights="pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights are refused"):
        convert(f, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    convert(str(tmp_path / "pkl"), str(tmp_path / "out"), allow_pickle=True)
    _assert_same_model(ref, tmp_path / "out", vocab=104, generate=False)


def _expect_refusal(tmp_path, src, *patterns):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        convert(str(src), str(out))
    for p in patterns:
        assert p in str(err.value), str(err.value)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]  # no temporary directory either
    return str(err.value)


def test_config_mismatch_names_tensor_and_both_shapes(tmp_path):
    _hf_mamba().save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["hidden_size"] = 48
    cfg_file.write_text(json.dumps(cfg))
    _expect_refusal(tmp_path, tmp_path / "hf", "'backbone.embeddings.weight'", "(101, 32)", "(101, 48)")


def test_bad_tensors_are_named(tmp_path):
    _hf_llama().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)  # wrong shape
    del state["model.layers.0.self_attn.k_proj.weight"]  # missing
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)  # unexpected
    save_file(state, weights)
    msg = _expect_refusal(tmp_path, tmp_path / "hf", "'model.layers.1.mlp.up_proj.weight'", "(95, 64)", "(96, 64)",
                          "missing tensor 'model.layers.0.mixer.k_proj.weight'",
                          "unexpected tensor 'model.layers.0.self_attn.extra.weight'")
    assert "3 problem(s)" in msg


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}


@pytest.mark.parametrize("rope", [
    LLAMA3,
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
], ids=lambda r: r["rope_type"])
def test_hf_llama_with_rope_scaling_converts(tmp_path, rope):
    """Llama 3.x checkpoints use llama3 scaling: the frequencies come from transformers' own RoPE
    functions, so logits equal LlamaForCausalLM's (fp32, 1e-5) at positions past the original length."""
    ref = _hf_llama(num_key_value_heads=2, max_position_embeddings=128, rope_parameters=dict(rope))
    ref.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    ids = _prompt(length=70)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    unscaled = _hf_llama(num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": rope["rope_theta"]})
    unscaled.load_state_dict(ref.state_dict())
    with torch.no_grad():  # the scaling is really applied (it once was silently ignored)
        assert (unscaled(ids).logits - model(ids).logits).abs().max() > 1e-3
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_unsupported_features_are_refused(tmp_path):
    _hf_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}).save_pretrained(
        tmp_path / "hf")
    _expect_refusal(tmp_path, tmp_path / "hf", "rope_type", "'dynamic'")


def test_cli_convert(tmp_path, capsys):
    ref = _hf_mamba()
    ref.save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--overwrite"]) == 0
    _assert_same_model(ref, tmp_path / "out", generate=False)


# -- unreadable source files: a ConversionError (a ValueError) naming the file, nothing written ----------

@pytest.mark.parametrize("text,what", [
    ("{not json", "is not valid JSON"),
    ('[{"model_type": "mamba"}]', "must be a JSON object, got a JSON array"),
    ('"mamba"', "must be a JSON object, got a JSON string"),
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
], ids=["not-json", "json-list", "json-string", "not-utf8"])
@pytest.mark.parametrize("source_format", ["auto", "hf-mamba", "mamba-ssm"])
def test_unreadable_config_json_is_named(tmp_path, text, what, source_format):
    from bmojo.convert import ConversionError

    _hf_mamba().save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    (cfg_file.write_bytes if isinstance(text, bytes) else cfg_file.write_text)(text)
    with pytest.raises(ConversionError) as err:
        convert(str(tmp_path / "hf"), str(tmp_path / "out"), source_format=source_format)
    assert isinstance(err.value, ValueError)
    assert str(cfg_file) in str(err.value) and what in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x08" + b"\x00" * 7 + b"{}"],
                         ids=["random-bytes", "empty", "truncated"])
def test_unreadable_safetensors_is_named(tmp_path, content):
    from bmojo.convert import ConversionError

    _hf_mamba().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(content)
    with pytest.raises(ConversionError, match="not a readable safetensors file") as err:
        convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    assert str(weights) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_pickle_and_index_are_named(tmp_path):
    from bmojo.convert import ConversionError

    ref = _hf_mamba(vocab_size=104)
    f = _mamba_ssm_checkpoint(ref, tmp_path / "pkl", with_lm_head=True, weights="pytorch_model.bin")
    with open(f, "wb") as fh:
        fh.write(os.urandom(512))
    with pytest.raises(ConversionError, match="not a loadable PyTorch weights file") as err:
        convert(f, str(tmp_path / "out"), allow_pickle=True)
    assert f in str(err.value)
    _hf_mamba().save_pretrained(tmp_path / "sharded")
    os.remove(tmp_path / "sharded" / "model.safetensors")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(ConversionError, match="'weight_map' must be an object") as err:
        convert(str(tmp_path / "sharded"), str(tmp_path / "out"))
    assert str(index) in str(err.value)


def test_cli_convert_errors_name_the_file_without_a_traceback(tmp_path, capsys):
    _hf_mamba().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert e.value.code != 0 and str(tmp_path / "hf" / "config.json") in str(e.value.code)
    _hf_mamba().save_pretrained(tmp_path / "hf2")
    (tmp_path / "hf2" / "model.safetensors").write_bytes(os.urandom(1000))
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(tmp_path / "hf2"), str(tmp_path / "out")])
    assert str(tmp_path / "hf2" / "model.safetensors") in str(e.value.code)
    assert not (tmp_path / "out").exists()
