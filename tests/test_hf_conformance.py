"""bmojo behaves as an in-tree Hugging Face model, on every transformers release pyproject.toml admits.

The yardstick is transformers' own common model tests (ModelTesterMixin / GenerationTesterMixin, run
locally from a transformers source release, nothing of theirs committed); each behaviour they check is
tested here with bmojo's own tests:

* ``generate()`` (greedy, sampling with a fixed seed, beams, ``num_return_sequences``) equals the same
  decoding done by full recomputation without a cache (``use_cache=False``), scores included;
* continuing ``generate()`` from a returned cache equals one long ``generate()``; ``inputs_embeds``
  prompts generate like the ids they embed;
* the cache travels under the name the installed release uses (``cache`` from 5.24, else
  ``past_key_values``), the other name is accepted, and bmojo raises no deprecation warning;
* ``output_attentions`` / ``output_hidden_states`` / ``return_dict`` follow the call or the config.
"""
import logging
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from bmojo import BMojoCache, BMojoForCausalLM
from bmojo.hf_compat import CACHE_NAME, output_cache
from bmojo_testing import lively, tiny_config

STACKS = {
    "attention": ["attention", "attention"],
    "sliding_attention": ["sliding_attention", "sliding_attention"],
    "mamba": ["mamba", "mamba"],
    "bmojo_f": ["bmojo_f", "bmojo_f"],
    "bmojo": ["bmojo", "bmojo"],
    "mixed": ["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"],
}
PAD = 63


def _model(stack, **kw):
    torch.manual_seed(0)
    model = lively(BMojoForCausalLM(tiny_config(STACKS[stack], rope_theta=10000.0, pad_token_id=PAD, **kw))).eval()
    with torch.no_grad():  # logits sharp enough that sampling and beams have real choices to make
        model.lm_head.weight.mul_(3)
    return model


def _prompt(batch=2, length=13, seed=1):
    return torch.randint(0, PAD, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(prompt, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                          output_logits=True, min_new_tokens=kw.get("max_new_tokens", 0), **kw)


DECODING = {
    "greedy": dict(do_sample=False, max_new_tokens=19),
    "sample": dict(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=19),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=11),
    "beam_sample": dict(do_sample=True, num_beams=2, max_new_tokens=11),
}


@pytest.mark.parametrize("decoding", list(DECODING))
@pytest.mark.parametrize("stack", list(STACKS))
def test_generate_equals_full_recomputation(stack, decoding):
    """The cached decoder and a decoder that recomputes the whole sequence each step agree on every
    token, every logit and every beam score (19 steps cross two chunk boundaries of w = 8)."""
    model = _model(stack)
    kw = DECODING[decoding]
    cached = _generate(model, _prompt(), seed=5, **kw)
    full = _generate(model, _prompt(), seed=5, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), atol=1e-4, rtol=0)
    if "sequences_scores" in cached:
        torch.testing.assert_close(cached.sequences_scores, full.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stack", ["mixed", "bmojo", "attention"])
def test_generate_continues_from_a_returned_cache(stack):
    model = _model(stack)
    prompt = _prompt()
    first = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=PAD,
                           return_dict_in_generate=True)
    cache = output_cache(first)
    assert isinstance(cache, BMojoCache) and cache.get_seq_length() == prompt.shape[1] + 6
    more = model.generate(first.sequences, **{CACHE_NAME: cache}, max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=PAD)
    once = model.generate(prompt, max_new_tokens=19, min_new_tokens=19, do_sample=False, pad_token_id=PAD)
    assert torch.equal(more, once)


def test_generate_from_a_cache_given_as_the_other_name():
    """A cache passed under the name other releases use (past_key_values on 5.24, cache before) is used."""
    model = _model("mixed")
    prompt = _prompt()
    other = "past_key_values" if CACHE_NAME == "cache" else "cache"
    cache = BMojoCache(model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation notice for the old name
        out = model.generate(prompt, **{other: cache}, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=PAD)
    assert cache.get_seq_length() == prompt.shape[1] + 4
    assert torch.equal(out, model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                           pad_token_id=PAD))


@pytest.mark.parametrize("stack", ["mixed", "mamba"])
def test_generate_from_inputs_embeds(stack):
    model = _model(stack)
    prompt = _prompt()
    embeds = model.get_input_embeddings()(prompt)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=PAD)
    from_ids = model.generate(prompt, **kw)
    from_embeds = model.generate(inputs_embeds=embeds, **kw)  # returns the new tokens only
    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1]:])


def test_no_deprecation_warning_from_bmojo(caplog):
    """transformers 5.24 warns when a model uses the old cache name; bmojo's own code never does."""
    model = _model("mixed")
    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            out = model.generate(_prompt(), max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                                 return_dict_in_generate=True)
            model.generate(_prompt(), max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=PAD)
            model(_prompt(), use_cache=True)
            output_cache(out)
    finally:
        hf_logging.disable_propagation()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_forward_takes_either_cache_name_and_returns_the_installed_one():
    model = _model("mixed")
    ids = _prompt()
    out = model(ids[:, :9], use_cache=True)
    cache = output_cache(out)
    assert isinstance(cache, BMojoCache) and CACHE_NAME in out.keys()
    step = model(ids[:, 9:10], past_key_values=cache).logits
    cache2 = output_cache(model(ids[:, :9], use_cache=True))
    torch.testing.assert_close(model(ids[:, 9:10], cache=cache2).logits, step)
    with pytest.raises(ValueError, match="both cache= and past_key_values="):
        model(ids[:, 10:11], cache=cache, past_key_values=cache2)


def test_unknown_keywords_raise():
    """A misspelled keyword is an error, never swallowed (a renamed cache argument once was)."""
    model = _model("mamba")
    with pytest.raises(TypeError, match="cache_params"):
        model(_prompt(), cache_params=None)
    with pytest.raises(TypeError, match="output_attention"):
        model(_prompt(), output_attention=True)


def test_return_dict_and_output_flags_follow_the_config():
    model = _model("mixed")
    ids = _prompt()
    with torch.no_grad():
        as_tuple = model(ids, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(ids).logits)
        model.config.return_dict = False
        assert isinstance(model(ids, use_cache=False), tuple)
        model.config.return_dict = True
        model.config.output_hidden_states = True
        hidden = model(ids).hidden_states
        assert len(hidden) == len(model.config.layer_types) + 1
        assert model(ids, output_hidden_states=False).hidden_states is None
        model.config.output_hidden_states = False
        model.config.output_attentions = True
        attentions = model(ids).attentions
        model.config.output_attentions = False
    # as Jamba: one entry per attention-bearing layer (mamba layers have none)
    assert len(attentions) == sum(t != "mamba" for t in model.config.layer_types)


@pytest.mark.parametrize("stack", ["mixed", "bmojo"])
def test_attention_weights(stack):
    """Per attention-bearing layer, weights (b, Hq, T, T) over source positions: rows sum to 1, nothing
    in the future, and for a sliding window nothing before it; the outputs stay those of the fast path.
    Step-by-step decoding returns the same rows as the parallel form."""
    model = _model(stack)
    ids = _prompt(length=27)
    T = ids.shape[1]
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
        torch.testing.assert_close(out.logits, model(ids).logits, atol=1e-5, rtol=0)
        cache = BMojoCache(model.config)
        steps = [model(ids[:, j : j + 1], cache=cache, use_cache=True, output_attentions=True).attentions
                 for j in range(T)]
    attention_types = [t for t in model.config.layer_types if t != "mamba"]
    assert len(out.attentions) == len(attention_types) and all(len(s) == len(attention_types) for s in steps)
    for i, (layer_type, w) in enumerate(zip(attention_types, out.attentions)):
        assert w.shape == (2, model.config.num_attention_heads, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
        assert torch.equal(torch.triu(w, diagonal=1), torch.zeros_like(w))
        if layer_type == "sliding_attention":
            assert torch.equal(torch.tril(w, diagonal=-8), torch.zeros_like(w))
        if layer_type == "bmojo":  # fading keys and memory slots reach beyond the window
            assert torch.tril(w, diagonal=-8).abs().sum() > 0
        stepped = torch.cat([F_pad(s[i], T) for s in steps], 2)
        torch.testing.assert_close(stepped, w, atol=1e-5, rtol=0)


def F_pad(w, T):
    return torch.nn.functional.pad(w, (0, T - w.shape[-1]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_weights_of_a_padded_row_equal_the_row_alone(side):
    """In the prompt and while decoding, a padded row's weights are the row's own, placed at its tokens'
    slots of the caller's layout (the prompt's, then the generated tokens after the whole prompt).
    (``generate()`` reads the last column's logits, a pad in a right-padded row, so the right-padded row
    is decoded by hand from its last token, as in test_inputs.)"""
    model = _model("mixed")
    row = _prompt(batch=1, length=17)
    pads = torch.full((1, 6), PAD)
    ids = torch.cat([torch.cat([pads, row] if side == "left" else [row, pads], 1), _prompt(batch=1, length=23, seed=2)])
    first = 6 if side == "left" else 0
    mask = torch.zeros_like(ids)
    mask[0, first : first + 17], mask[1] = 1, 1
    slots = torch.cat([torch.arange(first, first + 17), torch.arange(23, 26)])  # the row's tokens, then 3 new ones
    with torch.no_grad():
        alone = model.generate(row, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD,
                               output_attentions=True, return_dict_in_generate=True)
        out = model(ids, attention_mask=mask, use_cache=True, output_attentions=True)
        cache, padded = output_cache(out), [out.attentions]
        for token in alone.sequences[0, 17:20]:  # the row's generated tokens; the other row's don't matter
            padded.append(model(torch.stack([token, token])[:, None], cache=cache, output_attentions=True).attentions)
    for step, (ws, wa) in enumerate(zip(padded, alone.attentions)):
        for w, a in zip(ws, wa):  # per layer: (b, H, queries, keys)
            keys = slots[: a.shape[-1]]
            queries = keys[-a.shape[2]:] if step == 0 else torch.tensor([0])  # a step's one query
            torch.testing.assert_close(w[0][:, queries][..., keys], a[0], atol=1e-5, rtol=0)
            assert torch.isclose(w[0][:, queries].sum(-1), torch.ones(())).all()  # nothing on the pads


def test_python_dash_m_bmojo_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bmojo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout and "convert" in out.stdout
