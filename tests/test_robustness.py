"""Careless users and a faulty environment: either correct behaviour, or an exception whose message names
the offending value, field or file. Grouped by area: loading and saving, configs, inputs; the ops' and
the command line's own checks are in tests/backends and tests/test_train_robustness.py; properties over
random configs and inputs at the end."""
import json
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bmojo import BMojoCache, BMojoConfig, BMojoForCausalLM, BMojoModel
from bmojo.checkpoint import CheckpointError
from bmojo_testing import lively, tiny_config

ALL_TYPES = ["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"]


@pytest.fixture()
def ckpt(tmp_path):
    model = BMojoForCausalLM(tiny_config(["bmojo", "mamba"])).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


# -- loading and saving --------------------------------------------------------------------------

def test_save_replaces_a_symlink_in_the_target_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "important.json"
    victim.write_text('{"keep": true}')
    target = tmp_path / "out"
    target.mkdir()
    os.symlink(victim, target / "config.json")
    BMojoForCausalLM(tiny_config(["mamba"])).save_pretrained(target)
    assert victim.read_text() == '{"keep": true}'
    assert not os.path.islink(target / "config.json") and json.loads((target / "config.json").read_text())["model_type"] == "bmojo"
    assert not [n for n in os.listdir(target) if n.startswith(".bmojo-save")]  # no staging folder left


def test_pickled_weights_are_checked_like_safetensors(ckpt):
    state = load_file(ckpt / "model.safetensors")
    del state["model.layers.1.mixer.A_log"]
    torch.save(state, ckpt / "pytorch_model.bin")
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.1\.mixer\.A_log'\]"):
        BMojoForCausalLM.from_pretrained(ckpt, allow_pickle=True)


def test_non_finite_weights_are_refused_by_name(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' holds NaN"):
        BMojoForCausalLM.from_pretrained(ckpt)
    model = BMojoForCausalLM.from_pretrained(ckpt, allow_nonfinite=True)  # the explicit opt-out
    assert torch.isnan(model.model.norm.weight).any()


def test_a_separate_head_under_tied_embeddings_is_refused(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings=True"):
        BMojoForCausalLM.from_pretrained(ckpt)


def test_a_directory_without_config_or_a_missing_path_is_named(ckpt, tmp_path):
    os.remove(ckpt / "config.json")
    for load in (BMojoConfig.from_pretrained, BMojoForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="no config.json"):
            load(ckpt)
    missing = tmp_path / "nowhere" / "model"
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="no such directory"):
        BMojoForCausalLM.from_pretrained(str(missing))
    assert time.perf_counter() - t0 < 5  # no model-hub retries


def test_ssm_parameters_stay_fp32_when_loading_in_bf16(ckpt):
    model = BMojoForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n.endswith(("A_log", ".D")))
    assert dtypes["model.layers.0.mixer.q_proj.weight"] == torch.bfloat16


# -- configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(sliding_window=True), "sliding_window"),
    (dict(memory_slots=2.5), "memory_slots"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(dtype="nonsense"), "dtype"),
    (dict(rope_theta="10000"), "rope_theta"),
    (dict(pad_token_id=512), "pad_token_id"),
    (dict(eos_token_id=[1, -3]), "eos_token_id"),
    (dict(hidden_size=256.0), "hidden_size"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BMojoConfig(**kwargs)


def test_a_huge_window_costs_only_what_the_sequence_needs():
    """sliding_window=2**31-1 used to allocate its whole ring up front (17 GB for a 20-token prompt)."""
    model = BMojoForCausalLM(tiny_config(["bmojo", "sliding_attention"], sliding_window=2**31 - 1,
                                         fading_window=2**20)).eval()
    cache = BMojoCache(model.config)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 20)), cache=cache)
        model(torch.randint(0, 64, (1, 1)), cache=cache)
    assert sum(cache.state_nbytes()) < 2**20


# -- inputs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(BMojoForCausalLM(tiny_config(ALL_TYPES, rope_theta=10000.0))).eval()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_ids_work(model, dtype):
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(dtype)).logits, model(ids).logits)


def test_an_empty_batch_is_named(model):
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 5, dtype=torch.long))


@pytest.mark.parametrize("labels,match", [
    (torch.zeros(2, 10, dtype=torch.long), r"labels must have the input's shape \(2, 11\)"),
    (torch.full((2, 11), 64), "labels hold 64"),
    (torch.zeros(2, 11), "labels must be integer"),
])
def test_bad_labels_are_named(model, labels, match):
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(2, 11, dtype=torch.long), labels=labels)


def test_a_cache_of_another_model_is_refused(model):
    other = BMojoCache(tiny_config(ALL_TYPES, hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match="hidden_size=48"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=other)
    fewer = BMojoCache(tiny_config(ALL_TYPES[:3]))
    with pytest.raises(ValueError, match="layer_types"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=fewer)


@pytest.mark.parametrize("stack", ALL_TYPES + ["mixed"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_stay_causal(stack, value):
    """A NaN or inf in inputs_embeds at position t reaches no output before t: masked keys are never
    multiplied (0 * NaN); outputs before t equal the run on the first t positions."""
    layer_types = ALL_TYPES if stack == "mixed" else [stack, stack]
    net = lively(BMojoModel(tiny_config(layer_types, rope_theta=10000.0))).eval()
    x = torch.randn(2, 37, 32)
    for t in (5, 17, 36):
        y = x.clone()
        y[0, t, 3], y[1, t] = value, value
        with torch.no_grad():
            out = net(inputs_embeds=y).last_hidden_state
            before = net(inputs_embeds=x[:, :t]).last_hidden_state
        assert torch.isfinite(out[:, :t]).all(), (stack, t)
        torch.testing.assert_close(out[:, :t], before, atol=1e-4, rtol=0)
        assert not torch.isfinite(out[:, t]).all()


# -- properties ------------------------------------------------------------------------------------

FIELDS = st.fixed_dictionaries({
    "layer_types": st.lists(st.sampled_from(ALL_TYPES), min_size=1, max_size=3),
    "sliding_window": st.one_of(st.integers(-2, 12), st.just(True), st.just(2.0)),
    "fading_window": st.one_of(st.none(), st.integers(-1, 12)),
    "memory_slots": st.one_of(st.none(), st.integers(-1, 5), st.just(1.5)),
    "num_key_value_heads": st.sampled_from([1, 2, 3, 4]),
    "rope_theta": st.one_of(st.none(), st.sampled_from([10000.0, -1.0, float("nan"), "1e4"])),
    "rms_norm_eps": st.sampled_from([1e-5, 0.0, float("nan")]),
    "innovation_taps": st.integers(0, 5),
})


FIELD_NAMES = ["layer_types", "sliding_window", "fading_window", "memory_slots", "num_key_value_heads", "rope_theta",
               "rms_norm_eps", "innovation_taps", "head_dim", "num_hidden_layers"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=FIELDS, T=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_any_config_is_refused_by_name_or_runs_exactly(fields, T, seed):
    """Either a ValueError/TypeError naming a field, or a model whose logits are finite and equal to
    token-by-token decoding (its recurrent form)."""
    kw = dict(fields, num_hidden_layers=len(fields["layer_types"]))
    try:
        config = tiny_config(kw.pop("layer_types"), **kw)
    except (ValueError, TypeError) as e:
        assert any(name in str(e) for name in FIELD_NAMES), str(e)
        return
    torch.manual_seed(seed)
    net = lively(BMojoForCausalLM(config)).eval()
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        parallel = net(ids).logits
        cache = BMojoCache(config)
        steps = torch.cat([net(ids[:, j : j + 1], cache=cache).logits for j in range(T)], 1)
    assert torch.isfinite(parallel).all()
    torch.testing.assert_close(steps, parallel, atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None)
@given(pads=st.lists(st.integers(0, 9), min_size=1, max_size=3), right=st.booleans(), T=st.integers(10, 24))
def test_any_padding_gives_each_row_its_own_logits(pads, right, T):
    torch.manual_seed(0)
    net = lively(BMojoForCausalLM(tiny_config(ALL_TYPES, rope_theta=10000.0))).eval()
    ids = torch.randint(1, 64, (len(pads), T), generator=torch.Generator().manual_seed(T))
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        if right:
            mask[i, T - p:] = 0 if p else 1
        else:
            mask[i, :p] = 0
    with torch.no_grad():
        out = net(ids, attention_mask=mask).logits
        for i in range(len(pads)):
            keep = mask[i].bool()
            torch.testing.assert_close(out[i, keep], net(ids[i : i + 1, keep]).logits[0], atol=1e-4, rtol=0)


# -- ops ---------------------------------------------------------------------------------------------

def _scan_args(b=2, T=5, d=8, N=4):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(b, T, d), dt=r(b, T, d), A=-torch.rand(d, N, generator=g), B=r(b, T, N), C=r(b, T, N))


@pytest.mark.parametrize("change,match", [
    (dict(B=torch.randn(2, 5, 2, 4), C=torch.randn(2, 5, 4, 4)), "B and C must have the same shape"),
    (dict(B=torch.randn(2, 5, 4, 4)), "B and C must have the same shape"),
    (dict(B=torch.randn(8, 4), C=torch.randn(8, 4)), "time-invariant"),
])
def test_scan_refuses_mismatched_or_constant_B_C(change, match):
    from bmojo import ops

    with pytest.raises(ValueError, match=match):
        ops.selective_scan(**dict(_scan_args(), **change))
    args = _scan_args()
    state = torch.zeros(2, 8, 4)
    with pytest.raises(ValueError, match="B and C must have the same shape"):
        ops.selective_state_update(state, args["x"][:, 0], args["dt"][:, 0], args["A"], torch.randn(2, 2, 4),
                                   torch.randn(2, 4, 4))


@pytest.mark.parametrize("kw,match", [
    (dict(bias=torch.zeros(7)), r"bias must be \(d=8,\)"),
    (dict(weight=torch.randn(8, 4, 1)), r"weight must be \(d=8, K\)"),
    (dict(initial_state=torch.zeros(2, 8, 2)), r"initial_state must be \(b, d, K-1\)"),
    (dict(activation="gelu"), "activation must be"),
])
def test_conv_names_bad_arguments(kw, match):
    from bmojo import ops

    args = dict(x=torch.randn(2, 5, 8), weight=torch.randn(8, 4), bias=None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ops.causal_conv1d(**args)


def test_decode_and_selection_name_bad_arguments():
    from bmojo import ops

    q, k = torch.randn(2, 4, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(ValueError, match=r"valid must be a bool mask \(b, S\)=\(2, 6\)"):
        ops.attention_decode(q, k, k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must be a bool mask"):
        ops.attention_decode(q, k, k, torch.ones(2, 6))
    with pytest.raises(ValueError, match="window must be a positive int"):
        ops.bmojo_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), window=2.0)
    with pytest.raises(ValueError, match="slots must be a positive int"):
        ops.innovation_select(torch.randn(1, 9, 4), 4, 2.0, 2)
    positions, valid = ops.innovation_select(torch.randn(2, 0, 4), 4, 3, 2)  # T = 0: no chunk
    assert positions.shape == valid.shape == (2, 0, 3)


@pytest.mark.parametrize("stack", ["attention", "bmojo", "bmojo_f", "sliding_attention", "mixed"])
@pytest.mark.parametrize("t", [3, 26], ids=["in-the-cache", "in-the-new-tokens"])
def test_non_finite_inputs_in_a_resumed_forward_match_the_parallel_one(stack, t):
    """A NaN in inputs_embeds at position t, before the cache or among the new tokens: the new tokens'
    outputs after a cache of 20 positions equal the parallel forward's, NaN for NaN (the resumed path's
    rings, fading keys and eidetic merges carry a non-finite key only to the queries that see it)."""
    from bmojo import BMojoCache

    layer_types = ALL_TYPES if stack == "mixed" else [stack, stack]
    config = tiny_config(layer_types, rope_theta=10000.0)
    net = lively(BMojoModel(config)).eval()
    x = torch.randn(2, 37, 32)
    x[0, t, 3] = float("nan")
    with torch.no_grad():
        parallel = net(inputs_embeds=x).last_hidden_state
        cache = BMojoCache(config)
        net(inputs_embeds=x[:, :20], past_key_values=cache)
        resumed = net(inputs_embeds=x[:, 20:], past_key_values=cache).last_hidden_state
    torch.testing.assert_close(resumed, parallel[:, 20:], atol=1e-4, rtol=0, equal_nan=True)
    assert torch.isfinite(resumed[1]).all()  # the other row never sees it
