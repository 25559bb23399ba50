import pytest

from bmojo import BMojoConfig


@pytest.mark.parametrize("kwargs,field", [
    (dict(layer_types=["bmojo", "transformer"], num_hidden_layers=2), "layer_types[1]"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=-3, layer_types=["sliding_attention"] * 4), "sliding_window"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(memory_slots=0), "memory_slots"),
    (dict(layer_types=["bmojo"] * 3), "layer_types"),
    (dict(backend="tpu"), "backend"),
    (dict(fading_window=-1), "fading_window"),
    (dict(rope_theta=10000.0, head_dim=15, num_attention_heads=4), "head_dim"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}), "rope_type"),
    (dict(rope_parameters={"rope_type": "nonsense", "rope_theta": 1e4}), "rope_type"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "rope_theta": 1e4}), "max_position_embeddings"),
    (dict(rope_theta=500.0, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "contradicts"),
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


def test_fields_unused_by_the_layer_types_are_accepted():
    """Sweeps share one set of hyperparameters across zoo members: a field a member does not use is kept,
    never an error (as in transformers' own configs)."""
    c = BMojoConfig(layer_types=["mamba", "mamba"], num_hidden_layers=2, memory_slots=3, fading_window=7,
                    innovation_taps=2)
    assert (c.memory_slots, c.fading_window, c.innovation_taps) == (3, 7, 2)
    assert BMojoConfig(layer_types=["attention"] * 2, num_hidden_layers=2, memory_slots=16, d_state=8).memory_slots == 16


def test_rope_settings_are_standardised():
    """rope_theta alone, rope_parameters, and the legacy rope_scaling all give one rope_parameters dict;
    no RoPE at all gives None (B'MOJO's default), and the dict round-trips through save/load."""
    assert BMojoConfig().rope_parameters is None
    assert BMojoConfig(rope_theta=500.0).rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    a = BMojoConfig(rope_parameters=dict(scaled))
    b = BMojoConfig(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    assert a.rope_parameters == b.rope_parameters == scaled and a.rope_theta == b.rope_theta == 1e4
    llama3 = BMojoConfig(max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 1e4})
    assert llama3.rope_parameters["original_max_position_embeddings"] == 64
    assert BMojoConfig.from_dict(llama3.to_dict()).rope_parameters == llama3.rope_parameters
