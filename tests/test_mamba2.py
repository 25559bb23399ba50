"""The Mamba-2 mixer (``mamba2`` layers, ``fading_mixer="mamba2"``), QK-norm and a fading query of its own:
step-by-step decoding and resumption equal the parallel forward, for the standard Mamba-2 and for the
authors' B'MOJO-F variant (x and B for fewer heads, B/C norms and RoPE), tied and untied; the analytic
parameter count matches the model."""
import pytest
import torch

from bmojo import BMojoCache, BMojoForCausalLM
from bmojo.presets import layer_param_count
from bmojo_testing import lively, tiny_config

M2 = dict(mamba2_head_dim=8, mamba2_state_size=4)
AUTHORS = dict(fading_mixer="mamba2", mamba2_head_dim=8, mamba2_num_heads=4, mamba2_state_size=8, mamba2_n_groups=4,
               mamba2_xb_heads=2, mamba2_bc_norm=True, mamba2_bc_rope=True, mamba2_norm_groups=4, qk_norm=True,
               rope_theta=10000.0, head_dim=8, num_attention_heads=4, num_key_value_heads=2)
CASES = {
    "mamba2": (["mamba2", "mamba2"], dict(M2, mamba2_n_groups=2)),
    "mamba2-D-hdim-dt-limit": (["mamba2"], dict(M2, mamba2_D_has_hdim=True, mamba2_dt_limit=(0.001, 0.5))),
    "bmojo-mamba2": (["bmojo", "bmojo_f"], dict(M2, fading_mixer="mamba2")),
    "bmojo-mamba2-qknorm-rope": (["bmojo", "attention"], dict(M2, fading_mixer="mamba2", qk_norm=True, rope_theta=1e4)),
    "authors-tied": (["attention", "bmojo_f", "sliding_attention", "bmojo_f"], AUTHORS),
    "authors-untied": (["attention", "bmojo_f"], dict(AUTHORS, tie_fading_kv=False, fading_query=True)),
    "authors-untied-memory": (["bmojo", "mamba2"], dict(AUTHORS, tie_fading_kv=False, fading_query=True)),
    "mamba1-fading-query": (["bmojo_f", "bmojo"], dict(tie_fading_kv=False, fading_query=True, qk_norm=True, rope_theta=1e4)),
}
T = 37


def _model(case):
    layer_types, kw = CASES[case]
    torch.manual_seed(0)
    return lively(BMojoForCausalLM(tiny_config(layer_types, **kw))).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_decoding_and_resumption_equal_the_parallel_forward(case):
    model = _model(case)
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        pieces = [model(ids[:, :5], cache=cache).logits]
        pieces += [model(ids[:, j : j + 1], cache=cache).logits for j in range(5, 12)]
        pieces += [model(ids[:, 12:29], cache=cache).logits, model(ids[:, 29:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["mamba2", "authors-untied-memory"])
def test_padded_rows_equal_each_row_alone(case):
    model = _model(case)
    ids = torch.randint(1, 64, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(out[1, 6:], model(ids[1:, 6:]).logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_count_matches_the_model(case):
    model = _model(case)
    counted = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers."))
    assert counted == sum(layer_param_count(model.config, t) for t in model.config.layer_types)


def test_the_fading_query_and_norms_matter():
    """Untied fading projections with their own query give other logits than the tied layer (so the
    equivalence tests above exercise the separate query and norms)."""
    untied = _model("authors-untied")
    ids = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        before = untied(ids).logits
        untied.model.layers[1].mixer.q_fading_proj.weight.add_(torch.randn_like(untied.model.layers[1].mixer.q_fading_proj.weight))
        after = untied(ids).logits
    assert not torch.allclose(before[:, 16:], after[:, 16:], atol=1e-4)  # positions with fading keys change
    torch.testing.assert_close(before[:, :8], after[:, :8])  # the first window sees no fading key


@pytest.mark.parametrize("kw,field", [
    (dict(mamba2_n_groups=3), "mamba2_n_groups"),
    (dict(mamba2_xb_heads=3), "mamba2_xb_heads"),
    (dict(mamba2_bc_rope=True), "mamba2_bc_rope"),
    (dict(fading_query=True), "fading_query"),
    (dict(fading_mixer="mamba3"), "fading_mixer"),
    (dict(mamba2_dt_limit=(0.5, 0.1)), "mamba2_dt_limit"),
])
def test_bad_mamba2_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(["mamba2", "bmojo_f"], **{**M2, "fading_mixer": "mamba2", **kw})
