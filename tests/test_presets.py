"""Zoo presets (docs/design.md, "The model family"): the shipped checkpoints/<preset>/ configs, their sizes, the analytic
parameter and decode-state counts behind `bmojo presets`, and the CLI table."""
from __future__ import annotations

import filecmp
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import bmojo  # noqa: F401  (registers model_type "bmojo")
from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.cli import main as cli_main
from bmojo.hf_compat import output_cache
from bmojo.presets import (MEMBERS, NOMINAL_PARAMS, PAPER_SIZES, PRESET_FILES, layer_param_count, layer_state_nbytes,
                           param_count, preset_config, preset_names, write_preset_configs)

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def test_shipped_presets_build_on_meta_within_10_percent():
    for name, member, size in preset_names(PAPER_SIZES):
        path = os.path.join(ROOT, name)
        assert sorted(os.listdir(path)) == ["README.md", "config.json"] == sorted(PRESET_FILES), name  # no Python
        config = AutoConfig.from_pretrained(path)
        assert isinstance(config, BMojoConfig)
        got, want = config.to_dict(), preset_config(member, size).to_dict()
        got.pop("_name_or_path"), want.pop("_name_or_path")
        assert "auto_map" not in got, name
        assert got == want, f"{name}: regenerate with python -m bmojo.presets --write checkpoints"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in model.parameters())
        assert n == param_count(config), name
        nominal = NOMINAL_PARAMS[size]
        assert abs(n / nominal - 1) <= 0.10, f"{name}: {n:,} parameters vs nominal {nominal:,.0f}"
        assert f"{n:,}" in open(os.path.join(path, "README.md")).read(), name
        assert config.vocab_size == 50280
        if member in ("mamba", "mamba2"):
            assert config.intermediate_size == 0 and set(config.layer_types) == {member}
        if member == "mamba2":  # mamba-ssm's Mamba2 defaults
            assert (config.mamba2_state_size, config.mamba2_head_dim, config.mamba2_n_groups) == (128, 64, 1)
            assert config.mamba2_num_heads * config.mamba2_head_dim == 2 * config.hidden_size
        if member in ("swa", "hybrid", "bmojo-f", "bmojo", "bmojo-f-mamba2", "bmojo-mamba2"):
            assert config.sliding_window == 512
        if member.endswith("-mamba2"):  # the authors' Mamba-2 fading mixer; otherwise as bmojo-f / bmojo
            heads, hd = config.num_attention_heads, config.head_dim
            assert (config.fading_mixer, config.qk_norm, config.mamba2_bc_norm) == ("mamba2", False, True)
            assert (config.mamba2_num_heads, config.mamba2_head_dim, config.mamba2_state_size) == (heads, hd, hd)
            assert (config.mamba2_n_groups, config.mamba2_xb_heads) == (heads, config.num_key_value_heads)
            base = preset_config(member[: -len("-mamba2")], size).to_dict()
            mine = config.to_dict()
            differing = {k for k in base.keys() | mine.keys() if base.get(k) != mine.get(k)}
            assert differing <= {"_name_or_path", "num_hidden_layers", "layer_types", "fading_mixer"} | {
                k for k in mine if k.startswith("mamba2_")}, differing


def test_regenerating_the_checkpoints_gives_the_committed_files(tmp_path):
    write_preset_configs(str(tmp_path))
    for name, _, _ in preset_names(PAPER_SIZES):
        assert sorted(os.listdir(tmp_path / name)) == sorted(PRESET_FILES), name  # config.json + model card only
        for f in PRESET_FILES:
            assert filecmp.cmp(tmp_path / name / f, os.path.join(ROOT, name, f), shallow=False), f"{name}/{f}"


def test_preset_writer_cli_writes_only_config_and_card(tmp_path, capsys):
    """`bmojo presets --write` and `python -m bmojo.presets --write` write the same folders; shims an older
    writer left in a folder are removed, so regenerating checkpoints/ gives the committed tree."""
    from bmojo.presets.cards import main as presets_main

    stale = tmp_path / "a" / "bmojo-130m"
    stale.mkdir(parents=True)
    for shim in ("configuration_bmojo.py", "modeling_bmojo.py"):
        (stale / shim).write_text("from bmojo.modeling_bmojo import BMojoForCausalLM\n")
    assert cli_main(["presets", "--write", str(tmp_path / "a")]) == 0
    assert presets_main(["--write", str(tmp_path / "b")]) == 0
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b")) == sorted(
        n for n, _, _ in preset_names(PAPER_SIZES))
    for name, _, _ in preset_names(PAPER_SIZES):
        assert sorted(os.listdir(tmp_path / "a" / name)) == sorted(PRESET_FILES), name
        for f in PRESET_FILES:
            assert filecmp.cmp(tmp_path / "a" / name / f, tmp_path / "b" / name / f, shallow=False)
    assert "auto_map" not in (tmp_path / "a" / "bmojo-130m" / "config.json").read_text()


def test_presets_keep_their_import_paths():
    """The split (recipes / accounting / cards) keeps every name importable from bmojo.presets."""
    import bmojo.presets as P
    from bmojo.presets import accounting, cards, recipes

    assert P.preset_config is recipes.preset_config and P.MEMBERS is recipes.MEMBERS
    assert P.layer_state_nbytes is accounting.layer_state_nbytes and P.forward_flops is accounting.forward_flops
    assert P.write_preset_configs is cards.write_preset_configs and P.model_card is cards.model_card
    assert P.member_layer_types("hybrid", 3) == ["mamba", "sliding_attention", "mamba"]  # benchmarks/mqar.py uses it


def test_preset_api_keeps_tiny_and_overrides():
    c = preset_config("bmojo", "tiny", num_hidden_layers=3, backend="torch")
    assert c.num_hidden_layers == 3 and c.layer_types == ["bmojo"] * 3 and c.backend == "torch"
    assert set(MEMBERS) == {"transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo", "mamba2", "bmojo-f-mamba2",
                            "bmojo-mamba2"}
    with pytest.raises(ValueError, match="member"):
        preset_config("gpt", "130m")


@pytest.mark.parametrize("kw", [
    dict(),
    dict(attention_bias=True, mlp_bias=True, proj_bias=True, conv_bias=False, tie_fading_kv=False,
         tie_word_embeddings=False, num_key_value_heads=2, head_dim=8),
    dict(fading_mixer="mamba2", mamba2_head_dim=8, mamba2_state_size=8, mamba2_n_groups=2),
    dict(fading_mixer="mamba2", mamba2_num_heads=4, mamba2_head_dim=8, mamba2_state_size=8, mamba2_n_groups=4,
         mamba2_xb_heads=2, mamba2_bc_norm=True, num_key_value_heads=2, qk_norm=True, tie_fading_kv=False,
         fading_query=True),
], ids=["default", "biases-untied-gqa", "mamba2-fading", "authors-mamba2-untied"])
def test_analytic_parameter_count_matches_the_model(kw):
    types = ["attention", "sliding_attention", "mamba", "mamba2", "bmojo_f", "bmojo"]
    c = BMojoConfig(vocab_size=97, hidden_size=32, num_hidden_layers=6, layer_types=types, intermediate_size=48,
                    num_attention_heads=4, sliding_window=8, **kw)
    model = BMojoForCausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == param_count(c)
    for i, t in enumerate(types):
        assert sum(p.numel() for p in model.model.layers[i].parameters()) == layer_param_count(c, t), t


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("member", MEMBERS)
def test_analytic_state_size_matches_the_cache(member, dtype, kv_heads):
    """`bmojo presets` computes state sizes from the config (docs/design.md, "Decoding state"); BMojoCache holds the same. With
    GQA (2 Hkv D < d) fading layers keep the window's fading keys/values instead of its SSM outputs."""
    torch.manual_seed(0)
    gqa = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    c = preset_config(member, "tiny", backend="torch", fading_window=8, **gqa)
    model = BMojoForCausalLM(c).to(dtype).eval()
    T = 3 * c.sliding_window + 5  # past the window, the fading window and a chunk boundary
    ids = torch.randint(0, c.vocab_size, (1, T))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = output_cache(out)
        expected = [sum(x * n for x, n in zip(layer_state_nbytes(c, t, dtype), (1, T))) for t in c.layer_types]
        assert cache.state_nbytes() == expected
        model(ids[:, :1], cache=cache)  # one decoding step: only attention grows
        for t, got in zip(c.layer_types, cache.state_nbytes()):
            fixed, per_token = layer_state_nbytes(c, t, dtype)
            if per_token:  # a growing KV cache may reserve capacity ahead (amortised appends)
                assert fixed + per_token * (T + 1) <= got <= fixed + per_token * 2 * (T + 16), t
            else:
                assert got == fixed, t


def _oracle_state_nbytes(c: BMojoConfig, layer_type: str, dtype: torch.dtype) -> tuple[int, int]:
    """The decode-time state of one layer for one sequence, written out by hand from docs/design.md, "Decoding state" (this test's
    own oracle, independent of bmojo.cache): (fixed bytes, bytes per token)."""
    a = torch.empty((), dtype=dtype).element_size()
    kv = c.num_key_value_heads * c.head_dim  # one key (or one value) per token, elements
    w, m_f, m_e, d = c.sliding_window, c.effective_fading_window, c.memory_slots, c.hidden_size
    if layer_type == "attention":
        return 0, 2 * kv * a + 1  # a key, a value and a bool validity flag per token
    fixed = 0
    mixer = layer_type if layer_type in ("mamba", "mamba2") else c.fading_mixer
    if layer_type in ("mamba", "mamba2", "bmojo_f", "bmojo") and mixer == "mamba":
        fixed += c.d_inner * (c.d_conv - 1) * a  # conv state, model dtype
        fixed += c.d_inner * c.d_state * 4  # SSM state, fp32
    if layer_type in ("mamba", "mamba2", "bmojo_f", "bmojo") and mixer == "mamba2":
        H, P, N, G = c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size, c.mamba2_n_groups
        xb = c.mamba2_xb_heads or H  # x for xb heads, B for xb groups (or G), C for G groups: the conv's channels
        fixed += (xb * P + (c.mamba2_xb_heads or G) * N + G * N) * (c.mamba2_conv_kernel - 1) * a
        fixed += H * P * N * 4  # SSM state (heads, head_dim, state), fp32
    if layer_type in ("mamba", "mamba2"):
        return fixed, 0
    fixed += 2 * w * kv * a  # ring of the window's keys / values
    if layer_type in ("bmojo_f", "bmojo") and m_f > 0:
        fixed += 2 * m_f * kv * a  # fading keys / values of the m_f positions before the window
        # the window's SSM outputs (d per token) where that is no larger than their fading keys/values
        fixed += w * d * a if d <= 2 * kv else 2 * w * kv * a
    if layer_type == "bmojo":
        fixed += c.innovation_taps * d * a  # the predictor's last k SSM outputs
        fixed += w * 4  # fp32 innovation scores of the window's tokens
        fixed += 2 * (2 * m_e * kv * a + m_e * 8 + m_e * 4)  # this and the next chunk's slots: k, v, int64 pos, fp32 eps
    return fixed, 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", ["tiny", "130m"])
@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "gqa"])
def test_state_size_matches_the_hand_written_formula(member, size, dtype, kv_heads):
    """layer_state_nbytes (which allocates bmojo.cache.LayerState on the meta device) equals the formula."""
    c = preset_config(member, size, **({} if kv_heads is None else {"num_key_value_heads": kv_heads}))
    for t in dict.fromkeys(c.layer_types):
        assert layer_state_nbytes(c, t, dtype) == _oracle_state_nbytes(c, t, dtype), (member, size, t)
    if kv_heads == 1 and member in ("bmojo-f", "bmojo", "bmojo-f-mamba2", "bmojo-mamba2"):  # GQA: the fading keys/values branch is the one taken
        assert c.hidden_size > 2 * c.num_key_value_heads * c.head_dim


def test_presets_cli_table(capsys):
    assert cli_main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in preset_names(PAPER_SIZES):
        assert f"| {name} |" in out
    assert "grows" in out and "(fixed)" in out


def test_recall_memory_floats_is_the_studys_budget():
    # benchmarks/mqar.py, budget B1 = 4096 floats/layer: d_inner 128, one kv head of 16, w = 32
    from bmojo.presets import recall_memory_floats

    base = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                sliding_window=32,
                rope_theta=None)
    bmojo = BMojoConfig(**base, layer_types=["bmojo"] * 2, d_state=16, fading_window=16, memory_slots=16)
    assert recall_memory_floats(bmojo, 256) == 128 * 16 + 2 * (32 + 16) * 16 + 2 * 16 * 16 == 4096
    hybrid = BMojoConfig(**base, layer_types=["mamba", "sliding_attention"], d_state=56)
    assert recall_memory_floats(hybrid, 256) == (128 * 56 + 2 * 32 * 16) / 2 == 4096
    full = BMojoConfig(**base, layer_types=["attention"] * 2)
    assert recall_memory_floats(full, 256) == 2 * 256 * 16 == 8192
    # Mamba-2 state: heads x head_dim x state, for mamba2 layers and a Mamba-2 fading mixer alike
    m2 = dict(mamba2_num_heads=4, mamba2_head_dim=8, mamba2_state_size=32)
    assert recall_memory_floats(BMojoConfig(**base, layer_types=["mamba2"] * 2, **m2), 256) == 4 * 8 * 32
    fading = BMojoConfig(**base, layer_types=["bmojo_f"] * 2, fading_mixer="mamba2", fading_window=16, **m2)
    assert recall_memory_floats(fading, 256) == 4 * 8 * 32 + 2 * (32 + 16) * 16


@pytest.mark.parametrize("layer_type", ["attention", "sliding_attention", "mamba", "mamba2", "bmojo_f", "bmojo"])
def test_forward_flops_counts_the_models_work(layer_type):
    """forward_flops (benchmarks/cpu.py's work per token): linear FLOPs equal what the model's Linear
    modules do in a forward (plus the conv and dt_proj), attention FLOPs the keys the reference's masks
    and the innovation selection let each query see."""
    from bmojo import ops
    from bmojo.ops import bmojo_visibility_masks
    from bmojo.presets import forward_flops
    from bmojo_testing import tiny_config

    T = 37
    config = tiny_config([layer_type, layer_type])
    model = BMojoForCausalLM(config).eval()
    linear = []
    hooks = [m.register_forward_hook(lambda m, i, o: linear.append(2 * i[0].numel() // m.in_features * m.in_features * m.out_features))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.randint(0, 64, (1, T)))
    for h in hooks:
        h.remove()
    got = forward_flops(config, T)
    has_ssm = layer_type in ("mamba", "bmojo_f", "bmojo")
    # the depthwise conv, and dt_proj (applied with F.linear on its weight, so no hook fires)
    extra = 2 * T * config.d_inner * (config.d_conv + config.dt_rank) * has_ssm
    if layer_type == "mamba2":  # only the depthwise conv over x|B|C is not a Linear
        mixer = model.model.layers[0].mixer
        extra = 2 * T * mixer.conv_dim * config.mamba2_conv_kernel
    assert got["linear"] == sum(linear) + 2 * extra  # two layers
    if layer_type == "mamba":
        assert got["attention"] == 0 and got["scan"] == 2 * 7 * T * config.d_inner * config.d_state
        return
    if layer_type == "mamba2":
        H, P, N = config.mamba2_num_heads, config.mamba2_head_dim, config.mamba2_state_size
        assert got["attention"] == 0 and got["scan"] == 2 * 7 * T * H * P * N
        return
    window = None if layer_type == "attention" else config.sliding_window
    in_ctx, fading = bmojo_visibility_masks(T, window, config.effective_fading_window)
    keys = int(in_ctx.sum()) + (int(fading.sum()) if layer_type in ("bmojo_f", "bmojo") else 0)
    if layer_type == "bmojo":
        f = torch.randn(1, T, config.hidden_size)
        _, valid = ops.innovation_select(f, config.sliding_window, config.memory_slots, config.innovation_taps)
        chunk = torch.arange(T) // config.sliding_window
        keys += int(valid[0, chunk].sum())
    hq_hd = config.num_attention_heads * config.head_dim
    assert got["attention"] == 2 * 4 * hq_hd * keys
