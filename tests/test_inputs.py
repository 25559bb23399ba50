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


def test_left_padded_logits_equal_unpadded(model):
    a, b = torch.randint(0, PAD, (1, 19)), torch.randint(0, PAD, (1, 11))
    ids = torch.cat([a, torch.cat([torch.full((1, 8), PAD), b], 1)])
    mask = (torch.arange(19)[None] >= torch.tensor([[0], [8]])).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(out[1, 8:], model(b).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0], model(a).logits[0], atol=1e-5, rtol=0)


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
    ([[1, 1, 0, 1]], "not left-padded"),
    ([[1, 1, 1, 0]], "not left-padded"),
    ([[0, 0, 0, 0]], "masks every token"),
    ([[1, 1, 1]], r"attention_mask must be \(batch, 4\)"),
])
def test_bad_masks(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor(mask))
