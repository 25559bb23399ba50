"""Every layer type learns, and gradients reach the SSM parameters and the eidetic memory keys."""
import pytest
import torch

from bmojo import BMojoForCausalLM
from bmojo_testing import tiny_config


@pytest.mark.parametrize("layer_type", ["attention", "sliding_attention", "mamba", "bmojo_f", "bmojo"])
def test_a_few_steps_lower_the_loss(layer_type):
    model = BMojoForCausalLM(tiny_config([layer_type, layer_type])).train()
    ids = torch.randint(0, 64, (4, 29))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_gradients_reach_ssm_parameters_and_memory_keys(monkeypatch):
    model = BMojoForCausalLM(tiny_config(["bmojo", "mamba"], tie_fading_kv=False)).train()
    captured = []
    table = model.model.kernels.on(torch.device("cpu"))  # the ops the model resolved for this device
    real = table.bmojo_attention

    def spy(q, k, v, **kw):
        if kw.get("k_memory") is not None:
            kw["k_memory"].retain_grad()
            captured.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(table, "bmojo_attention", spy)
    ids = torch.randint(0, 64, (2, 37))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if any(key in name for key in ("A_log", ".D", "dt_proj.bias", "k_proj", "v_proj", "k_fading_proj")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    (kw,) = captured
    g = kw["k_memory"].grad  # (b, chunks, m_e, Hkv, D)
    assert g[kw["memory_valid"]].abs().sum(-1).sum(-1).gt(0).all()  # every valid slot gets a gradient
    assert g[~kw["memory_valid"]].abs().sum() == 0  # masked slots get none
