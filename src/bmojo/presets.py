"""The zoo's presets (SPEC 1.2): one ``BMojoConfig`` recipe per member and size.

Members: ``transformer`` (all full attention, RoPE), ``swa`` (all sliding-window attention),
``mamba`` (Mamba-1 blocks, no MLP, like mamba-ssm), ``hybrid`` (alternating mamba /
sliding_attention), ``bmojo-f`` and ``bmojo``. Sizes: ``tiny`` (for tests and CPU demos) and the
paper's scales ``130m``, ``370m``, ``790m``, ``1.4b`` (d_model / layers of Mamba's 768/24, 1024/48,
1536/48, 2048/48, with the depth of the MLP-bearing members halved).
"""
from __future__ import annotations

from .configuration_bmojo import BMojoConfig

MEMBERS = ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo")
SIZES = {  # name: (hidden_size, mamba depth, vocab)
    "tiny": (64, 4, 512),
    "130m": (768, 24, 50280),
    "370m": (1024, 48, 50280),
    "790m": (1536, 48, 50280),
    "1.4b": (2048, 48, 50280),
}
NOMINAL_PARAMS = {"tiny": None, "130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9}


def _layer_types(member: str, n: int) -> list[str]:
    if member == "hybrid":
        return ["mamba" if i % 2 == 0 else "sliding_attention" for i in range(n)]
    kind = {"transformer": "attention", "swa": "sliding_attention", "mamba": "mamba",
            "bmojo-f": "bmojo_f", "bmojo": "bmojo"}[member]
    return [kind] * n


def preset_config(member: str, size: str = "tiny", **overrides) -> BMojoConfig:
    """The config of zoo member ``member`` at ``size``; keyword overrides win."""
    if member not in MEMBERS:
        raise ValueError(f"preset member must be one of {MEMBERS}, got {member!r}")
    if size not in SIZES:
        raise ValueError(f"preset size must be one of {tuple(SIZES)}, got {size!r}")
    d, depth, vocab = SIZES[size]
    tiny = size == "tiny"
    has_mlp = member != "mamba"
    n_layers = depth if not has_mlp else max(depth // 2, 2)
    head_dim = 16 if tiny else 64
    kw = dict(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layers,
        layer_types=_layer_types(member, n_layers),
        intermediate_size=0 if not has_mlp else (2 * d if tiny else 8 * d // 3 // 64 * 64),
        num_attention_heads=d // head_dim,
        sliding_window=16 if tiny else 512,
        memory_slots=(8 if tiny else 64) if member == "bmojo" else 0,
        rope_theta=10000.0 if member in ("transformer",) else None,
    )
    kw.update(overrides)
    return BMojoConfig(**kw)
