"""The model on the cuda backend (kernels through bmojo.ops dispatch) equals the torch backend:
logits and every parameter gradient of a tiny B'MOJO + Mamba stack."""
import warnings

import torch

from cuda_testutils import triton  # noqa: F401  (skips the module without triton)

from bmojo import BMojoConfig, BMojoForCausalLM  # noqa: E402


def test_tiny_model_cuda_backend_matches_torch(device):
    torch.manual_seed(0)
    cfg = BMojoConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, layer_types=["bmojo", "mamba"],
                      num_attention_heads=2, num_key_value_heads=1, sliding_window=6, fading_window=4,
                      memory_slots=2, intermediate_size=24, d_state=4, backend="torch")
    model = BMojoForCausalLM(cfg).to(device)
    ids = torch.randint(0, 32, (2, 15), device=device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    out_t = model(ids, labels=ids)
    g_t = torch.autograd.grad(out_t.loss, params, allow_unused=True)
    model.config.backend = "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # innovation_select stays on torch (warns once)
        out_c = model(ids, labels=ids)
        g_c = torch.autograd.grad(out_c.loss, params, allow_unused=True)
    torch.testing.assert_close(out_c.logits, out_t.logits, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(named, g_c, g_t):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
