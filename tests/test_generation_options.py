"""generate() options (temperature, top-k, top-p, repetition penalty, eos, max/min lengths) behave as
in transformers' own models: same weights, same seed, same options -> the same tokens as
LlamaForCausalLM (for the transformer member) and MambaForCausalLM (for the mamba member)."""
import pytest
import torch

from bmojo import BMojoForCausalLM
from bmojo.bench.baselines import hf_baseline
from bmojo.presets import preset_config

OPTIONS = {
    "greedy": dict(do_sample=False, max_new_tokens=12),
    "temperature": dict(do_sample=True, temperature=0.7, max_new_tokens=12),
    "top_k": dict(do_sample=True, top_k=5, max_new_tokens=12),
    "top_p": dict(do_sample=True, top_p=0.8, temperature=1.3, max_new_tokens=12),
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.8, max_new_tokens=12),
    "max_length": dict(do_sample=True, top_k=20, max_length=15),
    "min_new_tokens": dict(do_sample=True, min_new_tokens=10, max_new_tokens=10),
}


@pytest.fixture(scope="module", params=["transformer", "mamba"])
def pair(request):
    torch.manual_seed(0)
    ours = BMojoForCausalLM(preset_config(request.param, "tiny", vocab_size=64, hidden_size=32)).eval()
    with torch.no_grad():  # sharper logits than the init's, so that sampling options matter
        ours.lm_head.weight.mul_(40)
    return ours, hf_baseline(ours)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_same_tokens_as_transformers(pair, name):
    ours, theirs = pair
    prompt = torch.randint(0, 60, (2, 7))
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(123)
        outs.append(model.generate(prompt, pad_token_id=63, **OPTIONS[name]))
    assert torch.equal(outs[0], outs[1]), (outs[0], outs[1])
    assert outs[0].shape[1] == (15 if name == "max_length" else 7 + OPTIONS[name]["max_new_tokens"])


def test_eos_stops_each_row_and_pads(pair):
    ours, theirs = pair
    prompt = torch.randint(0, 60, (3, 5))
    with torch.no_grad():
        greedy = ours.generate(prompt, do_sample=False, max_new_tokens=6, pad_token_id=63)
    eos = int(greedy[0, 7])  # the third generated token of row 0 becomes the eos token
    outs = [m.generate(prompt, do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=63)
            for m in (ours, theirs)]
    assert torch.equal(outs[0], outs[1])
    row = outs[0][0, 5:].tolist()
    stop = row.index(eos)
    assert all(t == 63 for t in row[stop + 1:])  # finished rows are padded
