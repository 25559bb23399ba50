"""The zoo's recipes (docs/design.md, "The model family"): one ``BMojoConfig`` per member and size.

Members: ``transformer`` (all full attention, RoPE), ``swa`` (all sliding-window attention),
``mamba`` (Mamba-1 blocks, no MLP, like mamba-ssm), ``hybrid`` (alternating mamba /
sliding_attention), ``bmojo-f`` and ``bmojo`` (Mamba-1 fading mixer); ``mamba2`` (Mamba-2 blocks, no
MLP, mamba-ssm's ``Mamba2`` defaults: d_state 128, headdim 64, expand 2, ngroups 1), ``bmojo-f-mamba2``
and ``bmojo-mamba2`` (``fading_mixer="mamba2"``, the authors' Mamba-2 as their released B'MOJO-F
checkpoints have it, see :func:`bmojo.convert.config_from_hybrid_qwen3`: expand 1, one SSM head per
attention head, head_dim = d_state = the attention's head_dim, one B/C group per head, x and B for
the key/value heads, RMSNorm on B and C; no QK-norm, so they differ from ``bmojo-f`` / ``bmojo`` only
in the fading mixer). Sizes: ``tiny`` (for tests and CPU demos) and the paper's scales ``130m``,
``370m``, ``790m``, ``1.4b``.

How the paper-scale presets match their nominal size
----------------------------------------------------
The nominal sizes are Mamba's: d_model / depth 768/24, 1024/48, 1536/48, 2048/48, vocabulary 50280
(GPT-NeoX tokenizer padded to a multiple of 8), tied embeddings. Every member uses the same width,
vocabulary and embeddings, so members differ only in their blocks. Per layer (d = width, I = the
SwiGLU width, about 8d/3 rounded down to a multiple of 64, head_dim 64):

=================================== ============ ==============================================
layer                                parameters   depth at each size
=================================== ============ ==============================================
``mamba`` (no MLP)                   ~6.3 d^2     Mamba's depth L
``mamba2`` (no MLP)                  ~6.2 d^2     Mamba's depth L (Mamba-2's sizes use the same)
``attention`` + MLP                  ~12 d^2      L / 2 (halved depth)
``mamba`` / ``sliding`` + MLP        ~13 d^2 avg  L / 2 (hybrid)
``bmojo_f`` / ``bmojo`` + MLP        ~18 d^2      round(L * P(mamba layer) / P(bmojo layer)), ~L / 3
the same, Mamba-2 fading mixer       ~17 d^2      round(L * P(mamba2 layer) / P(bmojo layer)), ~L / 3
=================================== ============ ==============================================

A B'MOJO layer carries a Mamba mixer, the attention projections and an MLP, so at the halved depth
it would overshoot the nominal size by 30-40%. Its depth is instead the one that matches the
non-embedding parameters of the SSM preset with the same mixer at that size (``mamba``, the model the
nominal sizes come from; ``mamba2`` for the ``*-mamba2`` members), computed from the exact per-layer
counts of :func:`bmojo.presets.accounting.layer_param_count`: ``bmojo-f`` / ``bmojo`` 8 layers at 130m
and 17 at 370m, 790m and 1.4b; ``bmojo-f-mamba2`` / ``bmojo-mamba2`` 9, 18, 17, 17 (the authors' Mamba-2
mixer, expand 1, is smaller than Mamba-1's). Applied to the other MLP-bearing members the same rule
would give 13, 26, 25, 25 layers (transformer, swa) and 12, 23, 23, 23 (hybrid), within two layers of
the halved depth (12, 24, 24, 24), which those members keep. Every paper-scale preset lands within
10% of its nominal size (tests/test_presets.py checks it; ``bmojo presets`` prints the counts).

Windowed members use ``sliding_window=512`` (the fading window defaults to the same); ``bmojo``
keeps 64 eidetic memory slots per layer. Only ``transformer`` uses RoPE (B'MOJO's default is no
positional encoding).
"""
from __future__ import annotations

from ..configuration_bmojo import BMojoConfig
from .accounting import layer_param_count

MEMBERS = ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo", "mamba2", "bmojo-f-mamba2", "bmojo-mamba2")
# members whose bmojo_f / bmojo layers read the authors' Mamba-2 fading mixer (convert.config_from_hybrid_qwen3)
MAMBA2_FADING_MEMBERS = ("bmojo-f-mamba2", "bmojo-mamba2")
SIZES = {  # name: (hidden_size, mamba depth, vocab)
    "tiny": (64, 4, 512),
    "130m": (768, 24, 50280),
    "370m": (1024, 48, 50280),
    "790m": (1536, 48, 50280),
    "1.4b": (2048, 48, 50280),
}
PAPER_SIZES = ("130m", "370m", "790m", "1.4b")
NOMINAL_PARAMS = {"tiny": None, "130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9}


def member_layer_types(member: str, n: int) -> list[str]:
    """The ``layer_types`` of ``member`` with ``n`` layers."""
    if member == "hybrid":
        return ["mamba" if i % 2 == 0 else "sliding_attention" for i in range(n)]
    kind = {"transformer": "attention", "swa": "sliding_attention", "mamba": "mamba", "mamba2": "mamba2",
            "bmojo-f": "bmojo_f", "bmojo": "bmojo", "bmojo-f-mamba2": "bmojo_f", "bmojo-mamba2": "bmojo"}[member]
    return [kind] * n


def preset_depth(member: str, size: str) -> int:
    """Number of layers of ``member`` at ``size`` (see the module docstring for the rule)."""
    d, depth, vocab = SIZES[size]
    if member in ("mamba", "mamba2"):
        return depth
    halved = max(depth // 2, 2)
    if member not in ("bmojo-f", "bmojo") + MAMBA2_FADING_MEMBERS or size == "tiny":
        return halved
    # Match the non-embedding parameters of the SSM preset with the same mixer (mamba, or mamba2 for the
    # *-mamba2 members) with this member's per-layer count.
    ssm = "mamba2" if member in MAMBA2_FADING_MEMBERS else "mamba"
    ref = _base_config(ssm, size, depth)
    probe = _base_config(member, size, 1)
    budget = depth * layer_param_count(ref, ssm)
    return max(1, round(budget / layer_param_count(probe, probe.layer_types[0])))


def _base_config(member: str, size: str, n_layers: int, **overrides) -> BMojoConfig:
    d, _, vocab = SIZES[size]
    tiny = size == "tiny"
    head_dim = 16 if tiny else 64
    kw = dict(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layers,
        layer_types=member_layer_types(member, n_layers),
        intermediate_size=0 if member in ("mamba", "mamba2") else (2 * d if tiny else 8 * d // 3 // 64 * 64),
        num_attention_heads=d // head_dim,
        sliding_window=16 if tiny else 512,
        memory_slots=(8 if tiny else 64) if member in ("bmojo", "bmojo-mamba2") else 0,
        rope_theta=10000.0 if member in ("transformer",) else None,
    )
    if member == "mamba2":  # mamba-ssm's Mamba2 defaults (smaller heads and state at the tiny size)
        kw.update(mamba2_head_dim=16 if tiny else 64, mamba2_state_size=16 if tiny else 128, mamba2_expand=2,
                  mamba2_n_groups=1)
    kw.update(overrides)
    if member in MAMBA2_FADING_MEMBERS:  # the authors' Mamba-2, shaped by the attention's heads (after overrides)
        heads = kw["num_attention_heads"]
        head_dim = kw.get("head_dim") or kw["hidden_size"] // heads
        authors = dict(fading_mixer="mamba2", mamba2_num_heads=heads, mamba2_head_dim=head_dim,
                       mamba2_state_size=head_dim, mamba2_n_groups=heads, mamba2_expand=1,
                       mamba2_xb_heads=kw.get("num_key_value_heads") or heads, mamba2_norm_groups=heads,
                       mamba2_bc_norm=True, mamba2_conv_kernel=4, mamba2_norm_eps=1e-5)
        for key, value in authors.items():
            kw.setdefault(key, value)
    return BMojoConfig(**kw)


def preset_config(member: str, size: str = "tiny", **overrides) -> BMojoConfig:
    """The config of zoo member ``member`` at ``size``; keyword overrides win."""
    if member not in MEMBERS:
        raise ValueError(f"preset member must be one of {MEMBERS}, got {member!r}")
    if size not in SIZES:
        raise ValueError(f"preset size must be one of {tuple(SIZES)}, got {size!r}")
    n_layers = overrides.pop("num_hidden_layers", None) or preset_depth(member, size)
    if "layer_types" not in overrides:
        overrides["layer_types"] = member_layer_types(member, n_layers)
    return _base_config(member, size, n_layers, **overrides)


def preset_names(sizes=PAPER_SIZES) -> list[tuple[str, str, str]]:
    """``(name, member, size)`` of every preset at ``sizes``; names are ``<member>-<size>``."""
    return [(f"{m}-{s}", m, s) for s in sizes for m in MEMBERS]


__all__ = ["MEMBERS", "MAMBA2_FADING_MEMBERS", "SIZES", "PAPER_SIZES", "NOMINAL_PARAMS", "member_layer_types", "preset_depth",
           "preset_config", "preset_names"]
