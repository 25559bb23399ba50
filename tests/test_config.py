import pytest

from bmojo import BMojoConfig


@pytest.mark.parametrize("kwargs,field", [
    (dict(layer_types=["bmojo", "transformer"], num_hidden_layers=2), "layer_types[1]"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=-3, layer_types=["sliding_attention"] * 4), "sliding_window"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(memory_slots=4, layer_types=["mamba", "bmojo_f"], num_hidden_layers=2), "memory_slots"),
    (dict(layer_types=["bmojo"] * 3), "layer_types"),
    (dict(backend="tpu"), "backend"),
    (dict(fading_window=-1), "fading_window"),
    (dict(rope_theta=10000.0, head_dim=15, num_attention_heads=4), "rope_theta"),
])
def test_bad_config_raises_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        BMojoConfig(**kwargs)


def test_defaults_follow_layer_types():
    assert BMojoConfig(layer_types=["mamba"] * 4).memory_slots == 0
    assert BMojoConfig().memory_slots == 16
    c = BMojoConfig(hidden_size=96, num_attention_heads=6)
    assert c.head_dim == 16 and c.num_key_value_heads == 6 and c.dt_rank == 6
    assert BMojoConfig(layer_types=["mamba", "attention"], num_hidden_layers=2).layer_types == ["mamba", "attention"]
