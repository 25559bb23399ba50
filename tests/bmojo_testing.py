"""Shared test helpers (a uniquely named module: tests/backends/cuda/conftest.py would shadow `conftest`)."""


def tiny_config(layer_types, **kw):
    """A small config with every memory active at short lengths (w=8, m_f=5, m_e=3)."""
    from bmojo import BMojoConfig

    defaults = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=len(layer_types), layer_types=list(layer_types),
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, fading_window=5,
        memory_slots=3 if "bmojo" in layer_types else 0, intermediate_size=48, d_state=4, backend="torch",
    )
    defaults.update(kw)
    return BMojoConfig(**defaults)


def lively(model):
    """Re-draw every linear weight with std fan_in^-1/2, in place, and return the model.

    At mamba-ssm's init the SSM output f is ~1e-4, so fading keys and values barely move the
    attention and a decoder that mishandled them (wrong slot, wrong RoPE position) would still match
    the parallel forward. O(1) activations make every branch count."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)
    return model
