"""Bad inputs fail clearly; left-padded batches generate exactly what each row generates alone."""
import pytest
import torch

from bmojo import BMojoForCausalLM
from bmojo_testing import tiny_config

PAD = 63


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BMojoForCausalLM(tiny_config(["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"],
                                        rope_theta=10000.0, pad_token_id=PAD)).eval()


def test_left_padded_batch_generates_like_each_row_alone(model):
    lengths = [21, 9, 16, 3]  # pads of 0, 12, 5 and 18: on, off and across chunk boundaries (w=8)
    prompts = [torch.randint(0, PAD, (1, n)) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.shape[1]:], mask[i, T - p.shape[1]:] = p[0], 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=PAD)
    for i, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=PAD)
        assert torch.equal(batched[i, T:], alone[0, p.shape[1]:]), f"row {i}"


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_padded_logits_equal_unpadded(model, side):
    """Left, right or two-sided padding: each row's logits are the row's own; zero at pads."""
    a, b = torch.randint(0, PAD, (1, 19)), torch.randint(0, PAD, (1, 11))
    first = {"left": 8, "right": 0, "both": 3}[side]
    row = torch.full((1, 19), PAD)
    row[0, first : first + 11] = b[0]
    mask = torch.zeros(2, 19, dtype=torch.long)
    mask[0], mask[1, first : first + 11] = 1, 1
    with torch.no_grad():
        out = model(torch.cat([a, row]), attention_mask=mask).logits
        torch.testing.assert_close(out[1, first : first + 11], model(b).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0], model(a).logits[0], atol=1e-5, rtol=0)
        assert out[1, mask[1] == 0].abs().sum() == 0


def test_right_padded_batch_generates_like_each_row_alone(model):
    """transformers warns about right padding for decoder-only models; bmojo honours it anyway: each row
    continues from its own last token."""
    lengths = [21, 9, 3]
    prompts = [torch.randint(0, PAD, (1, n)) for n in lengths]
    ids = torch.full((3, 21), PAD)
    mask = torch.zeros(3, 21, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : p.shape[1]], mask[i, : p.shape[1]] = p[0], 1
    with torch.no_grad():
        nxt = model(ids, attention_mask=mask, use_cache=True)
        cache = nxt.cache if hasattr(nxt, "cache") and "cache" in nxt else nxt.past_key_values
        tokens = nxt.logits[torch.arange(3), mask.sum(1) - 1].argmax(-1)
        steps = [tokens]
        for _ in range(9):
            tokens = model(tokens[:, None], cache=cache).logits[:, -1].argmax(-1)
            steps.append(tokens)
        batched = torch.stack(steps, 1)
    for i, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=PAD)
        assert torch.equal(batched[i], alone[0, p.shape[1]:]), f"row {i}"


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[1, 2, 64]]), "token id 64 is outside the vocabulary"),
    (torch.tensor([[1, -1, 3]]), "token id -1"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.zeros(2, 0, dtype=torch.long), "empty sequence"),
    (torch.tensor([1, 2, 3]), r"must be \(batch, T\)"),
])
def test_bad_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_mismatched_devices(model):
    with pytest.raises(ValueError, match="meta"):
        model(torch.zeros(1, 4, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("mask,match", [
    ([[1, 1, 0, 1]], "padding between tokens"),
    ([[0, 1, 0, 1]], "padding between tokens"),
    ([[0, 0, 0, 0]], "masks every token"),
    ([[1, 2, 1, 1]], "must hold only 0"),
    ([[1.0, 0.5, 1.0, 1.0]], "must hold only 0"),
    ([[1, 1, 1]], r"attention_mask must be \(batch, 4\)"),
])
def test_bad_masks(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor(mask))
