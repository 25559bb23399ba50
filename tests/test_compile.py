"""The compiled decoding step: one graph for every step of a (batch, dtype, device), logits equal to the
eager step's over a long generation crossing chunk boundaries, for every layer type, through our own
API and through generate()'s compile_config; a failing compiler falls back with one warning."""
import warnings

import pytest
import torch
from transformers import CompileConfig

from bmojo import BMojoCache, BMojoForCausalLM
from bmojo.modeling_bmojo import CompiledDecoding
from bmojo_testing import lively, tiny_config

ALL_TYPES = ["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"]
PAD = 63


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(BMojoForCausalLM(tiny_config(ALL_TYPES, rope_theta=10000.0, pad_token_id=PAD))).eval()


def test_compiled_step_equals_eager_for_200_tokens_with_one_graph(model):
    ids = torch.randint(0, PAD, (2, 13))
    compiled_cache = BMojoCache(model.config, 2, dtype=torch.float32, max_length=256)
    eager_cache = BMojoCache(model.config, 2, dtype=torch.float32, max_length=256)
    decoding = CompiledDecoding(model)
    with torch.no_grad():
        token = model(ids, cache=compiled_cache).logits[:, -1:].argmax(-1)
        model(ids, cache=eager_cache)
        for step in range(200):  # w = 8: 25 chunk boundaries, the full-attention cache filling up
            got = decoding.step(token, compiled_cache)
            want = model.decode_step(token, eager_cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"step {step}")
            token = want[:, -1:].argmax(-1)
    assert decoding.failed is None and decoding.compiles == 1
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 213


def test_compiled_step_over_a_long_full_attention_cache_equals_eager():
    """Over 1024+ cached keys with one query head per kv head (inductor's mul + sum loop over a long cache,
    with a RoPE'd query held in a buffer), the compiled step equals the eager step."""
    torch.manual_seed(2)
    model = lively(BMojoForCausalLM(tiny_config(["attention", "sliding_attention"], rope_theta=10000.0,
                                                num_key_value_heads=None))).eval()
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    ids = torch.randint(0, PAD, (2, 1030))
    compiled_cache = BMojoCache(model.config, 2, dtype=torch.float32, max_length=1040)
    eager_cache = BMojoCache(model.config, 2, dtype=torch.float32, max_length=1040)
    decoding = CompiledDecoding(model)
    with torch.no_grad():
        token = model(ids, cache=compiled_cache).logits[:, -1:].argmax(-1)
        model(ids, cache=eager_cache)
        for step in range(5):
            got = decoding.step(token, compiled_cache)
            want = model.decode_step(token, eager_cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"step {step}")
            token = want[:, -1:].argmax(-1)
    assert decoding.failed is None and decoding.compiles == 1


def test_generate_with_a_compile_config_equals_eager(model):
    ids = torch.randint(0, PAD, (3, 9))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=PAD)
    eager = model.generate(ids, **kw)
    compiled = model.generate(ids, compile_config=CompileConfig(fullgraph=True, dynamic=False), **kw)
    assert torch.equal(compiled, eager)
    decoding = model._compiled_decoding
    assert decoding.failed is None and decoding.compiles == 1
    again = model.generate(ids, compile_config=model._compiled_decoding.compile_config, **kw)
    assert torch.equal(again, eager) and model._compiled_decoding.compiles == 1  # same shapes: no recompile


@pytest.mark.parametrize("layer_types", [["sliding_attention"] * 2, ["mamba", "bmojo"]])
def test_generate_with_a_static_cache_and_left_padding_equals_eager(layer_types):
    """With a compileable cache generate() asks for per-layer-type 4D masks; bmojo keeps the 2D padding mask
    (transformers 5.4 raised on unknown layer types, later releases build 4D masks for sliding_attention)."""
    torch.manual_seed(1)
    model = lively(BMojoForCausalLM(tiny_config(layer_types, rope_theta=10000.0, pad_token_id=PAD))).eval()
    ids = torch.randint(0, PAD, (2, 11))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = PAD, 0
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=PAD)
    eager = model.generate(ids, **kw)
    static = model.generate(ids, cache_implementation="static", **kw)
    compiled = model.generate(ids, compile_config=CompileConfig(fullgraph=True, dynamic=False), **kw)
    assert torch.equal(static, eager) and torch.equal(compiled, eager)


def test_a_failing_compiler_warns_once_and_decodes_eagerly(model, monkeypatch):
    def broken(self, gm, example_inputs):
        raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("no C++ compiler"))

    monkeypatch.setattr(CompiledDecoding, "_backend", broken)
    ids = torch.randint(0, PAD, (1, 9))
    cache = BMojoCache(model.config, 1, dtype=torch.float32, max_length=32)
    reference = BMojoCache(model.config, 1, dtype=torch.float32, max_length=32)
    decoding = CompiledDecoding(model)
    with torch.no_grad():
        token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        model(ids, cache=reference)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                got = decoding.step(token, cache)
                torch.testing.assert_close(got, model.decode_step(token, reference), atol=1e-5, rtol=0)
    assert sum("decoding eagerly" in str(w.message) for w in caught) == 1
    assert decoding.failed is not None


def test_a_cache_that_can_grow_is_refused(model):
    with pytest.raises(ValueError, match="max_length"):
        CompiledDecoding(model).step(torch.zeros(1, 1, dtype=torch.long), BMojoCache(model.config, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_as_buffer_is_exact_when_compiled(dtype):
    """as_buffer (the rotated query of a compiled decoding step) is x itself, to the bit, eager and compiled."""
    from bmojo.layers.common import as_buffer

    x = torch.randn(3, 4, 64).to(dtype)
    cos, sin = torch.randn(64).to(dtype), torch.randn(64).to(dtype)
    fn = lambda t: as_buffer(t * cos + t.flip(-1) * sin)  # noqa: E731
    want = x * cos + x.flip(-1) * sin
    assert torch.equal(as_buffer(want), want)
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), want)
