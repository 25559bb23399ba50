"""Step-by-step decoding reproduces the parallel forward (SPEC 1.3), and greedy generate() equals
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
def test_state_holds_spec_sizes_and_matches_parallel(fading_window, kv_heads):
    """SPEC 1.3 sizes: a ring of w keys/values, m_f fading keys/values, m_e slots for this chunk and the
    next (no candidate ring), and for the window's tokens their SSM outputs (d = 32 <= 2 Hkv D = 32) or,
    when smaller (2 Hkv D = 16), their fading keys/values. Fading windows shorter and longer than w (=8),
    with RoPE (fading keys rotate to their own positions)."""
    model = _model("bmojo", fading_window=fading_window, rope_theta=10000.0, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        parallel = model(ids).logits
        cache = BMojoCache(model.config)
        head = model(ids[:, :3], cache=cache, use_cache=True).logits
        steps = [model(ids[:, j : j + 1], cache=cache, use_cache=True).logits for j in range(3, T)]
    torch.testing.assert_close(torch.cat([head, *steps], 1), parallel, atol=1e-4, rtol=0)
    c = model.config
    lengths = {name: x.shape[1] for name, x in cache.layers[0].tensors.items() if x.dim() > 1}
    expected = {"k": 8, "v": 8, "eps": 8, "f_hist": c.innovation_taps, "mem_k": 3, "mem_v": 3, "mem_eps": 3,
                "mem_pos": 3, "next_k": 3, "next_v": 3, "next_eps": 3, "next_pos": 3}
    if fading_window:
        expected.update(kf=fading_window, vf=fading_window)
        expected.update(f=8) if kv_heads == 2 else expected.update(kf_window=8, vf_window=8)
    mamba = {"conv", "ssm"}
    assert {n: l for n, l in lengths.items() if n not in mamba} == expected


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-skip", "tensor-only"])
def test_memory_merge_paths_match_parallel(host_reads, monkeypatch):
    """On CPU the step skips the eidetic merge when no row starts a chunk; accelerators take the
    tensor-only path (merge computed every step, applied where a row starts a chunk). Both equal the
    parallel forward, with rows at different positions (left padding) so their chunk boundaries fall
    on different steps."""
    import bmojo.modeling_bmojo as modeling

    monkeypatch.setattr(modeling, "_host_reads_are_free", lambda device: host_reads)
    model = _model("bmojo")
    ids = torch.randint(1, 64, (2, T))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 starts 3 positions later
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
    ids = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        with_memory = model(ids).logits
        model.config.memory_slots = 1
        fewer = model(ids).logits
    assert not torch.allclose(with_memory[:, 16:], fewer[:, 16:], atol=1e-5)
    torch.testing.assert_close(with_memory[:, :8], fewer[:, :8])  # chunk 0 has no memory either way


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
