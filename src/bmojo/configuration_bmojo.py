"""BMojoConfig: one config for B'MOJO and the models it generalizes (docs/design.md, "The model family")."""
from __future__ import annotations

import math
import os

import torch
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

LAYER_TYPES = ("attention", "sliding_attention", "mamba", "mamba2", "bmojo_f", "bmojo")
WINDOWED_TYPES = ("sliding_attention", "bmojo_f", "bmojo")
SSM_TYPES = ("mamba", "mamba2", "bmojo_f", "bmojo")
FADING_MIXERS = ("mamba", "mamba2")
ATTENTION_TYPES = ("attention", "sliding_attention", "bmojo_f", "bmojo")
# RoPE types whose frequencies change with the sequence length: a key cached at one length and the
# same key recomputed at another would differ, so decoding could not equal the parallel forward.
# What each field may hold (checked before transformers derives anything from the config).
_FIELD_KINDS = {
    "vocab_size": ("int",), "hidden_size": ("int",), "num_hidden_layers": ("int",), "layer_types": ("list", "none"),
    "intermediate_size": ("int",), "num_attention_heads": ("int",), "num_key_value_heads": ("int", "none"),
    "head_dim": ("int", "none"), "sliding_window": ("int", "none"), "fading_window": ("int", "none"),
    "memory_slots": ("int", "none"), "innovation_taps": ("int",), "tie_fading_kv": ("bool",),
    "rope_theta": ("float", "none"), "max_position_embeddings": ("int", "none"), "d_state": ("int",),
    "d_conv": ("int",), "expand": ("int",), "dt_rank": ("int", "str"), "dt_min": ("float",), "dt_max": ("float",),
    "dt_init_floor": ("float",), "conv_bias": ("bool",), "proj_bias": ("bool",), "attention_bias": ("bool",),
    "mlp_bias": ("bool",), "rms_norm_eps": ("float",), "tie_word_embeddings": ("bool",),
    "initializer_range": ("float",), "rescale_prenorm_residual": ("bool",), "residual_in_fp32": ("bool",),
    "backend": ("str",), "use_cache": ("bool",), "qk_norm": ("bool",), "fading_query": ("bool",),
    "fading_mixer": ("str",), "mamba2_num_heads": ("int", "none"), "mamba2_head_dim": ("int",),
    "mamba2_state_size": ("int",), "mamba2_n_groups": ("int",), "mamba2_expand": ("int",),
    "mamba2_xb_heads": ("int", "none"), "mamba2_conv_kernel": ("int",), "mamba2_norm_groups": ("int", "none"),
    "mamba2_norm_before_gate": ("bool",), "mamba2_bc_norm": ("bool",), "mamba2_bc_rope": ("bool",),
    "mamba2_D_has_hdim": ("bool",), "mamba2_use_conv_bias": ("bool",), "mamba2_use_bias": ("bool",),
    "mamba2_norm_eps": ("float",), "mamba2_dt_limit": ("list",), "mamba2_A_init_range": ("list",),
}
UNSUPPORTED_ROPE_TYPES = {
    "dynamic": "is not supported: dynamic NTK scaling recomputes the frequencies from the current length, "
               "so cached keys and the parallel forward disagree; use 'yarn', 'llama3' or 'linear'",
    "longrope": "is not supported: it switches frequencies when the sequence passes "
                "original_max_position_embeddings, so cached keys and the parallel forward disagree",
}


@strict
class BMojoConfig(PreTrainedConfig):
    r"""Configuration of a bmojo model. ``layer_types`` picks each layer's mixer:

    ==================== ==========================================================
    ``attention``         full causal attention (Llama-style)
    ``sliding_attention`` causal attention over the last ``sliding_window`` tokens
    ``mamba``             the Mamba-1 mixer alone
    ``mamba2``            the Mamba-2 (SSD) mixer alone
    ``bmojo_f``           B'MOJO without eidetic memory (window + fading memory)
    ``bmojo``             B'MOJO: window + fading memory + eidetic memory
    ==================== ==========================================================

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width d.
        num_hidden_layers: number of blocks; must equal ``len(layer_types)``.
        layer_types: one of the five types per layer (default: all ``bmojo``).
        intermediate_size: SwiGLU MLP width after each mixer; 0 means no MLP (as in Mamba).
        num_attention_heads / num_key_value_heads / head_dim: attention heads (grouped-query allowed);
            head_dim defaults to hidden_size // num_attention_heads.
        sliding_window: the window ``w`` (in-context memory) and the eidetic chunk length.
        fading_window: ``m_f``, how many positions before the window read fading keys (default w).
        memory_slots: ``m_e``, eidetic memory slots per ``bmojo`` layer (default 16 if any, else 0).
        innovation_taps: k, the taps of the fixed mean predictor of the SSM output.
        tie_fading_kv: fading keys/values use the in-context projections (Wk' = Wk, Wv' = Wv).
        fading_query: fading keys are scored with their own query projection (and norms), as the authors'
            untied B'MOJO-F (``tie_attn_weights: false``); needs ``tie_fading_kv=False``.
        fading_mixer: the SSM of ``bmojo_f`` / ``bmojo`` layers: ``"mamba"`` (Mamba-1) or ``"mamba2"``.
        qk_norm: Qwen3's per-head RMSNorm on queries and keys (fading keys too) before RoPE.
        mamba2_*: the Mamba-2 mixer (``mamba2`` layers and ``fading_mixer="mamba2"``), as transformers'
            ``Mamba2Config`` (num_heads, head_dim, state_size, n_groups, expand, conv_kernel,
            time_step_limit -> mamba2_dt_limit, use_conv_bias, use_bias), plus the options of the authors'
            variant: ``mamba2_xb_heads`` (x and B projected for that many heads, repeated to all heads),
            ``mamba2_bc_norm`` (RMSNorm on B and C per head), ``mamba2_bc_rope`` (RoPE on B and C),
            ``mamba2_norm_groups`` (groups of the gated RMSNorm; default n_groups).
        rope_theta: RoPE base; None (and no ``rope_parameters``) = no positional encoding (B'MOJO's default).
        rope_parameters: transformers' RoPE dict (``rope_type`` and its fields, e.g. ``{"rope_type": "llama3",
            "factor": 8.0, ...}``); its frequencies come from transformers' own RoPE functions. Every key,
            fading keys included, is rotated at its own position. The legacy ``rope_scaling`` is read too.
            ``dynamic`` and ``longrope`` change the frequencies with the sequence length, which a fixed
            decoding state cannot follow: they are refused.
        max_position_embeddings: the pretraining length that RoPE scaling types read (default for their
            ``original_max_position_embeddings``); bmojo itself has no length limit.
        d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, conv_bias, proj_bias:
            Mamba-1 mixer settings as in mamba-ssm (dt_rank "auto" = ceil(hidden_size / 16)).
        attention_bias / mlp_bias: biases in the attention and MLP projections.
        rms_norm_eps, tie_word_embeddings, initializer_range: as in Llama.
        residual_in_fp32: keep the residual stream in fp32 under half-precision weights (as Mamba does).
        backend: kernels to use: "auto" (by device), "torch", "cuda" or "neuron".
    """

    model_type = "bmojo"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 512
    hidden_size: int = 256
    num_hidden_layers: int = 4
    layer_types: list[str] | None = None
    intermediate_size: int = 0
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    sliding_window: int | None = 64
    fading_window: int | None = None
    memory_slots: int | None = None
    innovation_taps: int = 4
    tie_fading_kv: bool = True
    fading_query: bool = False
    fading_mixer: str = "mamba"
    qk_norm: bool = False
    rope_theta: float | int | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int | None = None
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    mamba2_num_heads: int | None = None
    mamba2_head_dim: int = 64
    mamba2_state_size: int = 64
    mamba2_n_groups: int = 1
    mamba2_expand: int = 2
    mamba2_xb_heads: int | None = None
    mamba2_conv_kernel: int = 4
    mamba2_norm_groups: int | None = None
    mamba2_norm_before_gate: bool = False
    mamba2_bc_norm: bool = False
    mamba2_bc_rope: bool = False
    mamba2_D_has_hdim: bool = False
    mamba2_use_conv_bias: bool = True
    mamba2_use_bias: bool = False
    mamba2_norm_eps: float = 1e-5
    mamba2_dt_limit: list | tuple = (0.0, float("inf"))
    mamba2_A_init_range: list | tuple = (1.0, 16.0)
    conv_bias: bool = True
    proj_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = True
    backend: str = "auto"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self._check_field_types(kwargs)
        if self.layer_types is None:
            self.layer_types = ["bmojo"] * self.num_hidden_layers
        layer_types = list(self.layer_types)
        if self.memory_slots is None:  # 16 slots where there is a bmojo layer to use them
            self.memory_slots = 16 if "bmojo" in layer_types else 0
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"BMojoConfig: num_attention_heads={self.num_attention_heads} is invalid: must divide "
                    f"hidden_size={self.hidden_size} (or set head_dim explicitly)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.hidden_size / 16)
        if self.mamba2_num_heads is None and self.mamba2_head_dim:
            self.mamba2_num_heads = max(self.mamba2_expand * self.hidden_size // self.mamba2_head_dim, 1)
        self.mamba2_dt_limit = list(self.mamba2_dt_limit)
        self.mamba2_A_init_range = list(self.mamba2_A_init_range)
        super().__post_init__(**kwargs)
        self.layer_types = layer_types  # transformers renames legacy types ("mamba" -> "linear_attention")
        self.check()  # a plain ValueError naming the field, before transformers' own wrapped checks

    def _check_field_types(self, kwargs: dict) -> None:
        """Each field's type, before anything is derived from it: a bool is not an int, an int-valued
        field takes no float, a float field is finite; the message names the field, its value and type."""

        def bad(field, value, why):
            raise ValueError(f"BMojoConfig: {field}={value!r} ({type(value).__name__}) is invalid: {why}")

        for field, kinds in _FIELD_KINDS.items():
            value = getattr(self, field)
            if value is None and "none" in kinds:
                continue
            if field == "dt_rank" and value == "auto":
                continue
            if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
                continue
            if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    bad(field, value, "must be a finite number")
                continue
            if "bool" in kinds and isinstance(value, bool):
                continue
            if "str" in kinds and isinstance(value, str):
                continue
            if "list" in kinds and isinstance(value, (list, tuple)):
                continue
            bad(field, value, f"must be {' or '.join(k if k != 'none' else 'None' for k in kinds)}")
        for name in ("dtype", "torch_dtype"):
            value = kwargs.get(name, getattr(self, name, None) if name == "dtype" else None)
            if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                bad(name, value, "must name a torch dtype (e.g. 'float32', 'bfloat16')")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if token is not None and (isinstance(token, bool) or not isinstance(token, int)
                                          or not 0 <= token < self.vocab_size):
                    bad(field, value, f"token ids must be ints in [0, vocab_size={self.vocab_size})")

    # -- RoPE: transformers calls these from __post_init__ and from its RoPE functions ---------------
    def convert_rope_params_to_dict(self, **kwargs):
        """Fold the legacy ``rope_scaling`` and ``rope_theta`` into ``rope_parameters`` (one standard
        dict, or None for no positional encoding). Returns the remaining kwargs."""
        legacy = kwargs.pop("rope_scaling", None)
        if legacy and self.rope_parameters and dict(legacy) != dict(self.rope_parameters):
            raise ValueError(f"BMojoConfig: rope_scaling={legacy!r} and rope_parameters={self.rope_parameters!r} "
                             "disagree; pass rope_parameters only")
        params = dict(self.rope_parameters or legacy or {})
        theta = params.get("rope_theta", self.rope_theta)
        if self.rope_theta is not None and theta != self.rope_theta:
            raise ValueError(f"BMojoConfig: rope_theta={self.rope_theta!r} contradicts "
                             f"rope_parameters['rope_theta']={theta!r}")
        if not params and theta is None:
            self.rope_parameters = None
            return kwargs
        if theta is None:
            raise ValueError(f"BMojoConfig: rope_parameters={params!r} is invalid: it needs a rope_theta "
                             "(in the dict or as the rope_theta field)")
        params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
        params["rope_theta"] = theta
        if params["rope_type"] in ("llama3", "yarn", "longrope") and self.max_position_embeddings is not None:
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.rope_parameters, self.rope_theta = params, theta
        return kwargs

    def standardize_rope_params(self) -> None:
        """Already standard (see :meth:`convert_rope_params_to_dict`); transformers' RoPE functions call it."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' ``from_pretrained``; a local directory without config.json, or a local path that
        does not exist, is an error naming the path (not default settings, not a model-hub lookup)."""
        from .checkpoint import check_directory, looks_local

        path = os.path.expanduser(str(pretrained_model_name_or_path))
        if os.path.isdir(path) or looks_local(path):
            if os.path.isfile(path) and path.endswith(".json"):
                return super().from_pretrained(path, **kwargs)
            check_directory(path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # transformers runs every `validate_*` method after __init__ and before saving; ours replace its
    # layer-type vocabulary (attention kinds only) with the zoo's.
    def validate_layer_type(self) -> None:
        self.check()

    def _check_mamba2(self, bad) -> None:
        H, P, N, G = self.mamba2_num_heads, self.mamba2_head_dim, self.mamba2_state_size, self.mamba2_n_groups
        for field in ("mamba2_num_heads", "mamba2_head_dim", "mamba2_state_size", "mamba2_n_groups", "mamba2_conv_kernel"):
            if getattr(self, field) <= 0:
                bad(field, getattr(self, field), "must be a positive int")
        if H % G:
            bad("mamba2_n_groups", G, f"must divide mamba2_num_heads={H}")
        xb = self.mamba2_xb_heads
        if xb is not None and (xb <= 0 or H % xb):
            bad("mamba2_xb_heads", xb, f"must be positive and divide mamba2_num_heads={H}")
        groups = G if self.mamba2_norm_groups is None else self.mamba2_norm_groups
        if groups <= 0 or (H * P) % groups:
            bad("mamba2_norm_groups", self.mamba2_norm_groups, f"must divide num_heads * head_dim = {H * P}")
        if self.mamba2_bc_rope and self.rope_parameters is None:
            bad("mamba2_bc_rope", True, "needs RoPE (rope_theta or rope_parameters)")
        if self.mamba2_bc_rope and N != self.head_dim:
            bad("mamba2_state_size", N, f"must equal head_dim={self.head_dim} with mamba2_bc_rope (B, C rotate like keys)")
        lo, hi = (list(self.mamba2_dt_limit) + [None, None])[:2]
        if len(self.mamba2_dt_limit) != 2 or not 0 <= lo <= hi:
            bad("mamba2_dt_limit", self.mamba2_dt_limit, "must be [low, high] with 0 <= low <= high")

    def _check_rope(self, bad) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = self.rope_parameters
        theta, rope_type = params["rope_theta"], params["rope_type"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            bad("rope_theta", theta, "must be a finite number > 0")
        if self.head_dim % 2:
            bad("head_dim", self.head_dim, "must be even with RoPE")
        if rope_type in UNSUPPORTED_ROPE_TYPES:
            bad("rope_parameters['rope_type']", rope_type, UNSUPPORTED_ROPE_TYPES[rope_type])
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            bad("rope_parameters['rope_type']", rope_type,
                f"must be 'default' or one of transformers' {sorted(set(ROPE_INIT_FUNCTIONS) - set(UNSUPPORTED_ROPE_TYPES))}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            bad("rope_parameters['partial_rotary_factor']", params["partial_rotary_factor"],
                "is not supported: bmojo rotates the whole head (must be 1.0)")
        if rope_type in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
            bad("max_position_embeddings", self.max_position_embeddings,
                f"must be set (or rope_parameters['original_max_position_embeddings']) for rope_type {rope_type!r}")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def effective_fading_window(self) -> int:
        return self.sliding_window if self.fading_window is None else self.fading_window

    def check(self) -> None:
        """Raise ValueError naming the field and value of the first inconsistent setting."""

        def bad(field: str, value, why: str):
            raise ValueError(f"BMojoConfig: {field}={value!r} is invalid: {why}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                bad(field, v, "must be a positive int")
        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", self.layer_types,
                f"has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        for i, lt in enumerate(self.layer_types):
            if lt not in LAYER_TYPES:
                bad(f"layer_types[{i}]", lt, f"must be one of {LAYER_TYPES}")
        types = set(self.layer_types)
        if self.intermediate_size < 0:
            bad("intermediate_size", self.intermediate_size, "must be >= 0 (0 = no MLP)")
        if types & set(ATTENTION_TYPES):
            if not isinstance(self.num_attention_heads, int) or self.num_attention_heads <= 0:
                bad("num_attention_heads", self.num_attention_heads, "must be a positive int")
            if self.head_dim is None or self.head_dim <= 0:
                bad("head_dim", self.head_dim, "must be a positive int")
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                bad("num_key_value_heads", self.num_key_value_heads,
                    f"must be positive and divide num_attention_heads={self.num_attention_heads}")
            if self.rope_parameters is not None:
                self._check_rope(bad)
        if types & set(WINDOWED_TYPES):
            if not isinstance(self.sliding_window, int) or self.sliding_window <= 0:
                bad("sliding_window", self.sliding_window,
                    f"must be a positive int for layer types {sorted(types & set(WINDOWED_TYPES))}")
        if self.fading_window is not None and (not isinstance(self.fading_window, int) or self.fading_window < 0):
            bad("fading_window", self.fading_window, "must be an int >= 0 or None (= sliding_window)")
        if self.memory_slots < 0:
            bad("memory_slots", self.memory_slots, "must be >= 0")
        if "bmojo" in types and self.memory_slots == 0:
            bad("memory_slots", self.memory_slots, "must be > 0 for 'bmojo' layers (use 'bmojo_f' for no memory)")
        if "bmojo" in types and self.innovation_taps <= 0:
            bad("innovation_taps", self.innovation_taps, "must be a positive int")
        if types & set(SSM_TYPES):
            for field in ("d_state", "d_conv", "expand", "dt_rank"):
                v = getattr(self, field)
                if not isinstance(v, int) or v <= 0:
                    bad(field, v, "must be a positive int")
            if not 0 < self.dt_min <= self.dt_max:
                bad("dt_min", self.dt_min, f"must satisfy 0 < dt_min <= dt_max (dt_max={self.dt_max})")
        mamba2_used = "mamba2" in types or (types & {"bmojo_f", "bmojo"} and self.fading_mixer == "mamba2")
        if self.fading_mixer not in FADING_MIXERS:
            bad("fading_mixer", self.fading_mixer, f"must be one of {FADING_MIXERS}")
        if mamba2_used:
            self._check_mamba2(bad)
        if self.fading_query and self.tie_fading_kv:
            bad("fading_query", self.fading_query, "needs tie_fading_kv=False (untied fading projections)")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if self.backend not in ("auto", "torch", "cuda", "neuron"):
            bad("backend", self.backend, "must be one of 'auto', 'torch', 'cuda', 'neuron'")
