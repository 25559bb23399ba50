"""Step-by-step decoding reproduces the parallel forward (docs/design.md, "Decoding state"), and greedy generate() equals
argmax decoding of the parallel forward."""
import pytest
import torch

from bmojo import BMojoCache, BMojoForCausalLM
from bmojo_testing import lively, tiny_config

STACKS = {
    "attention": ["attention", "attention"],
    "sliding_attention": ["sliding_attention", "sliding_attention"],
    "mamba": ["mamba", "mamba"],
    "bmojo_f": ["bmojo_f", "bmojo_f"],
    "bmojo": ["bmojo", "bmojo"],
    "mixed": ["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"],
}
T = 4 * 8 + 5  # four windows of w=8 plus a remainder


def _model(stack, **kw):
    return lively(BMojoForCausalLM(tiny_config(STACKS[stack], **kw))).eval()


ROPES = {
    "nope": {},
    "rope": dict(rope_theta=10000.0),
    # scaled RoPE from transformers' functions; the fading keys rotate with it at their own positions
    "yarn": dict(max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                              "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("stack", list(STACKS))
def test_step_by_step_matches_parallel(stack, rope):
    model = _model(stack, **ROPES[rope])
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        steps = torch.cat([model(ids[:, j : j + 1], cache=cache, use_cache=True).logits
                           for j in range(T)], 1)
    torch.testing.assert_close(steps, parallel, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == T


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["keep-f", "keep-kv"])
@pytest.mark.parametrize("fading_window", [0, 1, 13], ids=lambda m: f"m_f={m}")
def test_state_holds_its_documented_sizes_and_matches_parallel(fading_window, kv_heads):
    """The decoding state (bmojo.cache): a ring of w keys/values, m_f fading keys/values, m_e slots for
    this chunk and the next (no candidate ring), and for the window's tokens their SSM outputs
    (d = 32 <= 2 Hkv D = 32) or, when smaller (2 Hkv D = 16), their fading keys/values. Fading windows
    shorter and longer than w (=8), with RoPE (fading keys rotate to their own positions)."""
    model = _model("bmojo", fading_window=fading_window, rope_theta=10000.0, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        head = model(ids[:, :3], past_key_values=cache, use_cache=True).logits
        steps = [model(ids[:, j : j + 1], past_key_values=cache, use_cache=True).logits for j in range(3, T)]
    torch.testing.assert_close(torch.cat([head, *steps], 1), parallel, atol=1e-4, rtol=0)
    c, state = model.config, cache.layers[0]
    d, kv = c.hidden_size, (c.num_key_value_heads, c.head_dim)
    assert state.window.k.shape == state.window.v.shape == (2, 8, *kv)
    assert (state.eidetic.history.shape, state.eidetic.scores.eps.shape) == ((2, c.innovation_taps, d), (2, 8))
    for slots in (state.eidetic.current, state.eidetic.upcoming):
        assert slots.k.shape == (2, 3, *kv) and slots.eps.shape == slots.pos.shape == (2, 3)
    if not fading_window:
        assert state.fading is None
        return
    assert state.fading.ring.k.shape == (2, fading_window, *kv)
    if kv_heads == 2:
        assert state.fading.window_f.f.shape == (2, 8, d) and state.fading.window_kv is None
    else:
        assert state.fading.window_kv.k.shape == (2, 8, *kv) and state.fading.window_f is None
    assert cache.state_nbytes()[0] == state.nbytes()


@pytest.mark.parametrize("rows", ["uniform", "per-row"])
def test_memory_update_paths_match_parallel(rows):
    """When every row sits at the same position the host knows where chunks begin and merges memory
    only there; rows at different positions (left padding) take the tensor-only path, which merges
    every step and applies it where a row starts a chunk. Both equal the parallel forward."""
    model = _model("bmojo")
    ids = torch.randint(1, 64, (2, T))
    mask = torch.ones_like(ids)
    if rows == "per-row":
        mask[1, :3] = 0  # row 1 starts 3 positions later: its chunk boundaries fall on other steps
    new = 2 * 8 + 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        stepped = torch.stack(out.logits, 1)  # (2, new, vocab)
        for i in range(2):
            row = out.sequences[i, int(mask[i].eq(0).sum()):]
            parallel = model(row[None]).logits[0, -new - 1 : -1]
            torch.testing.assert_close(stepped[i], parallel, atol=1e-4, rtol=0)


@pytest.mark.parametrize("split", [1, 8, 16, 19])
@pytest.mark.parametrize("stack", ["bmojo", "mixed"])
def test_prefill_then_steps_matches_parallel(stack, split):
    """The state left by a parallel prefill of any length (on, before or after a chunk boundary)
    continues exactly like the step-by-step state."""
    model = _model(stack)
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        head = model(ids[:, :split], cache=cache, use_cache=True).logits
        tail = model(ids[:, split:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([head, tail], 1), parallel, atol=1e-4, rtol=0)


def test_memory_is_used():
    """The eidetic slots change the output (so the equivalence tests above exercise them)."""
    model = _model("bmojo")
    fewer = BMojoForCausalLM(tiny_config(STACKS["bmojo"], memory_slots=1)).eval()
    fewer.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        with_memory, with_one = model(ids).logits, fewer(ids).logits
    assert not torch.allclose(with_memory[:, 16:], with_one[:, 16:], atol=1e-5)
    torch.testing.assert_close(with_memory[:, :8], with_one[:, :8])  # chunk 0 has no memory either way


@pytest.mark.parametrize("stack", ["bmojo", "mixed", "mamba", "attention"])
def test_greedy_generate_equals_parallel_argmax(stack):
    model = _model(stack)
    prompt = torch.randint(0, 63, (2, 13))  # 63 is the pad id
    out = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=63)
    seq = prompt
    with torch.no_grad():
        for _ in range(24):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_sampling_generate_runs_batched():
    model = _model("mixed")
    prompt = torch.randint(0, 63, (3, 9))
    torch.manual_seed(1)
    a = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=8, pad_token_id=63)
    torch.manual_seed(1)
    b = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=8, pad_token_id=63)
    assert a.shape == (3, 19) and torch.equal(a, b) and torch.equal(a[:, :9], prompt)


def test_state_size_is_constant_except_full_attention():
    model = _model("mixed")
    sizes = {}
    for n in (20, 60):
        cache = BMojoCache(model.config)
        with torch.no_grad():
            model(torch.randint(0, 64, (1, n)), cache=cache, use_cache=True)
            model(torch.randint(0, 64, (1, 1)), cache=cache, use_cache=True)
        sizes[n] = cache.state_nbytes()
    for i, lt in enumerate(model.config.layer_types):
        if lt == "attention":
            assert sizes[60][i] > sizes[20][i]
        else:
            assert sizes[60][i] == sizes[20][i], lt


RESUME_SPLITS = [(8,), (5, 12), (7, 9, 30), (1, 17, 18), (16, 24, 25, 33)]  # on, before and after chunk starts


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["keeps-f", "keeps-kv"])
@pytest.mark.parametrize("splits", RESUME_SPLITS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("stack", list(STACKS))
def test_resume_in_parallel_matches_parallel(stack, splits, kv_heads):
    """Tokens after a cache run in parallel from its state (a chat's next turn, chunked prefill): the
    logits of every piece, and the state left for the next, equal one parallel forward (and so
    step-by-step decoding), with RoPE on every key; the fading state holding the window's SSM outputs
    (projected on resumption) or its fading keys and values (fewer key/value heads)."""
    model = _model(stack, rope_theta=10000.0, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        bounds = (0, *splits, T)
        pieces = [model(ids[:, a:b], cache=cache).logits for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == T


@pytest.mark.parametrize("stack", ["bmojo", "mixed"])
def test_resume_after_a_padded_prompt_matches_each_row_alone(stack):
    """Rows at different positions (a left-padded prompt) resume together: their chunks begin at
    different new tokens, and each row still gets exactly its own result."""
    model = _model(stack, rope_theta=10000.0)
    ids = torch.randint(1, 64, (3, T))
    pads = [0, 3, 9]
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    with torch.no_grad():
        cache = BMojoCache(model.config)
        head = model(ids[:, :14], attention_mask=mask[:, :14], cache=cache).logits
        tail = model(ids[:, 14:], cache=cache).logits
        for i, p in enumerate(pads):
            alone = model(ids[i : i + 1, p:]).logits[0]
            torch.testing.assert_close(torch.cat([head[i, p:], tail[i]]), alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fill", [0.0, float("-inf")])
@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_ring_slices_equal_per_row_gathers_and_the_definition(capacity, fill):
    """A ring read or filled at a position every row shares (slices: what a resume with a host-known start
    uses) holds what per-row positions give, and what the definition says: position p in slot p % capacity,
    positions before 0 or before the sequence's first one empty (``fill``)."""
    from bmojo.cache import Ring

    g = torch.Generator().manual_seed(capacity)
    shapes = dict(k=((3,), torch.float32, "cpu"))
    for last in range(-2, 3 * capacity + 2):
        ring = Ring.allocate(size=capacity, batch=2, capacity=capacity, fill=fill, **shapes)
        ring.data["k"] = torch.randn(2, capacity, 3, generator=g)
        for count in range(0, capacity + 3):
            got = ring.ordered("k", last, count)
            assert torch.equal(got, ring.ordered("k", torch.full((2,), last), count)), (last, count)
            for i, p in enumerate(range(last - count + 1, last + 1)):
                want = ring.k[:, p % capacity] if 0 <= p and p > last - capacity else torch.full((2, 3), fill)
                assert torch.equal(got[:, i], want), (last, count, p)
        for first in range(-2, max(last, -1) + 2):
            x = torch.randn(2, max(last - first + 1, 0), 3, generator=g)
            a, b = (Ring.allocate(size=capacity, batch=2, capacity=capacity, fill=fill, **shapes) for _ in range(2))
            a.load(last, first=first, k=x)
            if x.shape[1]:
                b.load(torch.full((2,), last), first=torch.full((2,), first), k=x)
                assert torch.equal(a.k, b.k), (last, first)
            for slot in range(capacity):
                p = last - (last - slot) % capacity
                want = x[:, p - first] if p >= max(first, 0) else torch.full((2, 3), fill)
                assert torch.equal(a.k[:, slot], want), (last, first, slot)
