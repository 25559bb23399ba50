"""Checkpoint interop: Hugging Face Mamba / Mamba-2 / Llama, mamba-ssm and the authors' hybrid_qwen3
(B'MOJO-F) checkpoints -> bmojo checkpoints.

================ ====================================================== ===================================
source            what it is                                             becomes
================ ====================================================== ===================================
``hf-mamba``      a transformers ``MambaForCausalLM`` directory           the ``mamba`` preset layout
                  (config.json with model_type "mamba" + safetensors)    (all ``mamba``, no MLP)
``hf-mamba2``     a transformers ``Mamba2ForCausalLM`` directory          all ``mamba2``, no MLP
                  (model_type "mamba2")
``hf-llama``      a transformers ``LlamaForCausalLM`` directory           the ``transformer`` preset
                  (model_type "llama")                                    layout (all ``attention``)
``mamba-ssm``     a mamba-ssm ``MambaLMHeadModel`` state dict: a          the ``mamba`` layout, or all
                  directory with config.json (d_model, n_layer, ...)      ``mamba2`` for
                  and model.safetensors, or a weights file with its       ``ssm_cfg.layer = "Mamba2"``
                  config.json beside it
``hybrid-qwen3``  the authors' hybrid-model-factory ``HybridQwen3``       ``attention`` (``*``),
                  directory (model_type "hybrid_qwen3",                   ``sliding_attention`` (``SWA``),
                  ``hybrid_override_pattern`` such as "*-BMF-SWA-M2")     ``bmojo_f`` with the Mamba-2
                                                                          fading mixer (``BMF``),
                                                                          ``mamba2`` (``M2``); SwiGLU MLP
                                                                          and Qwen3 QK-norm everywhere
================ ====================================================== ===================================

The result is ``config.json`` + ``model.safetensors`` written by ``BMojoForCausalLM.save_pretrained``,
loadable with ``AutoModelForCausalLM.from_pretrained`` after ``import bmojo``.

Every tensor is checked before anything is written: a missing or unexpected tensor, a shape that
disagrees with the config, or a config feature bmojo cannot reproduce (LayerNorm instead of RMSNorm,
a RoPE type whose frequencies follow the sequence length, a non-SiLU activation, attention or MLP blocks
inside a mamba-ssm model, GKA / GDN layers or fading mixers, per-layer settings that differ where bmojo
has one setting for all layers) raises a ``ValueError`` naming the tensor (or field) and both values. A
source file that cannot be read as what it should be (a config.json that is not a JSON object, a
safetensors file that is not one, a pickle that does not load) raises :class:`ConversionError` (a
``ValueError``) naming the file. The checkpoint is written to a temporary directory beside the output and
renamed into place only when complete, so a failed conversion leaves nothing behind. Pickled weights
(``.bin``, ``.pt``, ...) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.

Numerics: bmojo's RMSNorm is HF Mamba's / Llama's / Qwen3's (fp32 statistics, weight applied after
casting back), its gated RMSNorm is mamba-ssm's / transformers' (gate, then RMS over groups), and
``residual_in_fp32`` is copied from the source (Llama and Qwen3 keep their residual in the model dtype).
How each hybrid_qwen3 setting maps onto bmojo's is written out in :func:`config_from_hybrid_qwen3`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Callable

import torch

from .configuration_bmojo import BMojoConfig

FORMATS = ("hf-mamba", "hf-mamba2", "hf-llama", "mamba-ssm", "hybrid-qwen3")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin",)


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the file (or tensor, or field)."""


def _read_json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``; ConversionError naming the file if it is not one."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: {what} must be a JSON object, got a JSON {_json_kind(data)}")
    return data


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


# -- reading source checkpoints ------------------------------------------------------------------
class _Tensors:
    """Name -> shape of a checkpoint's tensors, with the data read only on request."""

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._loaders: dict[str, Callable[[], torch.Tensor]] = {}

    def add(self, name: str, shape, loader: Callable[[], torch.Tensor], origin: str) -> None:
        if name in self.shapes:
            raise ValueError(f"tensor {name!r} appears twice in the checkpoint (again in {origin})")
        self.shapes[name] = tuple(int(s) for s in shape)
        self._loaders[name] = loader

    def load(self, name: str) -> torch.Tensor:
        return self._loaders[name]()


def _read_safetensors(path: str, into: _Tensors) -> None:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    except Exception as e:  # safetensors' SafetensorError (not a ValueError), OSError, ...
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None

    def load(name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{path}: tensor {name!r} cannot be read ({e})") from None

    for name, shape in shapes.items():
        into.add(name, shape, lambda n=name: load(n), path)


def _read_pickle(path: str, into: _Tensors, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise ValueError(
            f"{path}: pickled weights are refused because unpickling can run arbitrary code; convert them to "
            "safetensors, or pass allow_pickle=True (--allow-pickle) to read them with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip / pickle), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    for name, t in state.items():
        into.add(name, t.shape, lambda t=t: t, path)


def _read_weights(source: str, allow_pickle: bool) -> _Tensors:
    """The tensors of a weights file or of a checkpoint directory (single file, sharded, or pickled)."""
    out = _Tensors()
    if os.path.isfile(source):
        if source.endswith(".safetensors"):
            _read_safetensors(source, out)
        elif source.endswith(PICKLE_SUFFIXES):
            _read_pickle(source, out, allow_pickle)
        else:
            raise ValueError(f"{source}: unknown weights format (expected .safetensors, or .bin/.pt with allow_pickle)")
        return out
    index = os.path.join(source, SAFE_INDEX)
    if os.path.isfile(index):
        weight_map = _read_json_object(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"{index}: 'weight_map' must be an object of tensor name -> shard file, "
                                  f"got {weight_map!r:.80}")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            _read_safetensors(os.path.join(source, shard), out)
        return out
    if os.path.isfile(os.path.join(source, SAFE_WEIGHTS)):
        _read_safetensors(os.path.join(source, SAFE_WEIGHTS), out)
        return out
    pickled = sorted(f for f in os.listdir(source) if f.endswith(PICKLE_SUFFIXES))
    if not pickled:
        raise FileNotFoundError(f"{source}: no {SAFE_WEIGHTS}, {SAFE_INDEX} or pickled weights found")
    for f in pickled:
        _read_pickle(os.path.join(source, f), out, allow_pickle)
    return out


def _source_config(source: str) -> tuple[str, dict]:
    directory = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: no config.json found in {directory}")
    return directory, _read_json_object(path, "the model config")


_MODEL_TYPES = {"mamba": "hf-mamba", "mamba2": "hf-mamba2", "llama": "hf-llama", "hybrid_qwen3": "hybrid-qwen3"}


def detect_format(source: str) -> str:
    """One of :data:`FORMATS`, from the source's config.json (``model_type``, or mamba-ssm's fields)."""
    _, cfg = _source_config(source)
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if model_type is None and "d_model" in cfg and "n_layer" in cfg:
        return "mamba-ssm"
    raise ValueError(f"{source}: cannot convert model_type={model_type!r}; supported: HF Mamba ('mamba'), HF Mamba-2 "
                     "('mamba2'), HF Llama ('llama'), hybrid-model-factory's 'hybrid_qwen3' and mamba-ssm configs "
                     "(d_model, n_layer, ...)")


# -- configs ---------------------------------------------------------------------------------------
def _refuse(field: str, value, why: str):
    raise ValueError(f"cannot convert: source config {field}={value!r} {why}")


def _default_heads(hidden_size: int) -> int:
    return hidden_size // 64 if hidden_size % 64 == 0 else 1  # unused by mamba layers; as the mamba preset


def config_from_hf_mamba(source: str) -> BMojoConfig:
    """The bmojo config (``mamba`` preset layout) of a transformers ``MambaConfig``."""
    from transformers import MambaConfig

    c = MambaConfig.from_pretrained(source)
    if c.hidden_act != "silu":
        _refuse("hidden_act", c.hidden_act, "is not supported (bmojo's Mamba mixer uses SiLU)")
    return BMojoConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        layer_types=["mamba"] * c.num_hidden_layers, intermediate_size=0,
        num_attention_heads=_default_heads(c.hidden_size),
        d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand, dt_rank=int(c.time_step_rank),
        dt_min=c.time_step_min, dt_max=c.time_step_max, dt_init_floor=c.time_step_floor,
        conv_bias=c.use_conv_bias, proj_bias=c.use_bias, rms_norm_eps=c.layer_norm_epsilon,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        rescale_prenorm_residual=c.rescale_prenorm_residual, residual_in_fp32=c.residual_in_fp32,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


def config_from_hf_llama(source: str) -> BMojoConfig:
    """The bmojo config (``transformer`` preset layout) of a transformers ``LlamaConfig``."""
    from transformers import LlamaConfig

    c = LlamaConfig.from_pretrained(source)
    if c.hidden_act != "silu":
        _refuse("hidden_act", c.hidden_act, "is not supported (bmojo's MLP is SwiGLU with SiLU)")
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_theta", getattr(c, "rope_theta", None)) is None:
        _refuse("rope_parameters.rope_theta", None, "is missing")
    rope.setdefault("rope_theta", getattr(c, "rope_theta", None))
    # any rope_type bmojo cannot honour (dynamic, longrope, partial rotary) is refused by BMojoConfig,
    # naming the field; the scaling types come from transformers' own RoPE functions, as in Llama
    return BMojoConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        layer_types=["attention"] * c.num_hidden_layers, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, rope_parameters=rope, max_position_embeddings=c.max_position_embeddings,
        attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, memory_slots=0, residual_in_fp32=False,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


def config_from_hf_mamba2(source: str) -> BMojoConfig:
    """The bmojo config (all ``mamba2``, no MLP) of a transformers ``Mamba2Config``.

    transformers' Mamba2Mixer is mamba-ssm's Mamba2 with ``norm_before_gate=False``: in_proj to
    [z, x, B, C, dt], conv over x|B|C, per-head A/D/dt_bias, ``time_step_limit`` clamping dt, and the gated
    RMSNorm over ``n_groups`` groups with eps ``layer_norm_epsilon`` (also the blocks' norm eps)."""
    from transformers import Mamba2Config

    c = Mamba2Config.from_pretrained(source)
    if c.hidden_act != "silu":
        _refuse("hidden_act", c.hidden_act, "is not supported (bmojo's Mamba-2 conv activation is SiLU)")
    limit = list(c.time_step_limit)
    if len(limit) != 2:
        _refuse("time_step_limit", c.time_step_limit, "must be [low, high]")
    return BMojoConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        layer_types=["mamba2"] * c.num_hidden_layers, intermediate_size=0,
        num_attention_heads=_default_heads(c.hidden_size),
        mamba2_num_heads=c.num_heads, mamba2_head_dim=c.head_dim, mamba2_state_size=c.state_size,
        mamba2_n_groups=c.n_groups, mamba2_expand=c.expand, mamba2_conv_kernel=c.conv_kernel,
        mamba2_use_conv_bias=c.use_conv_bias, mamba2_use_bias=c.use_bias, mamba2_norm_eps=c.layer_norm_epsilon,
        mamba2_dt_limit=[float(v) for v in limit],
        dt_min=c.time_step_min, dt_max=c.time_step_max, dt_init_floor=c.time_step_floor,
        rms_norm_eps=c.layer_norm_epsilon, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, rescale_prenorm_residual=c.rescale_prenorm_residual,
        residual_in_fp32=c.residual_in_fp32,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


# mamba-ssm's Mamba (Mamba-1) block arguments; those that only shape initialization or the kernels
# are accepted and ignored.
_MAMBA_SSM_ARGS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                   "dt_init_floor", "dt_init", "dt_scale", "use_fast_path", "layer"}
# mamba-ssm's Mamba2 block arguments, likewise (conv_init, A_init_range, chunk_size, ... shape only
# initialization, kernels or parallelism).
_MAMBA2_SSM_ARGS = {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                    "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
                    "bias", "conv_bias", "chunk_size", "use_mem_eff_path", "layer", "process_group",
                    "sequence_parallel"}


def config_from_mamba_ssm(source: str) -> BMojoConfig:
    """The bmojo config of a mamba-ssm ``MambaConfig`` (config.json): the ``mamba`` preset layout, or all
    ``mamba2`` layers for ``ssm_cfg.layer = "Mamba2"`` (mamba-ssm's Mamba2 defaults: d_state 128, headdim
    64, ngroups 1, expand 2; its gated RMSNorm has eps 1e-5 and ``d_ssm / ngroups`` channels per group)."""
    _, c = _source_config(source)
    for field in ("d_model", "n_layer", "vocab_size"):
        if field not in c:
            _refuse(field, None, "is missing (not a mamba-ssm config.json?)")
    ssm = dict(c.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        _refuse("ssm_cfg.layer", layer, "is not supported (bmojo converts mamba-ssm's Mamba1 and Mamba2 layers)")
    unknown = sorted(set(ssm) - (_MAMBA_SSM_ARGS if layer == "Mamba1" else _MAMBA2_SSM_ARGS))
    if unknown:
        _refuse("ssm_cfg", ssm, f"has settings bmojo does not reproduce: {unknown}")
    if c.get("d_intermediate", 0):
        _refuse("d_intermediate", c["d_intermediate"], "is not supported (mamba-ssm's GatedMLP blocks)")
    if c.get("attn_layer_idx"):
        _refuse("attn_layer_idx", c["attn_layer_idx"], "is not supported (mamba-ssm's MHA layers)")
    if not c.get("rms_norm", True):
        _refuse("rms_norm", c["rms_norm"], "is not supported (LayerNorm; bmojo uses RMSNorm)")
    vocab, multiple = c["vocab_size"], c.get("pad_vocab_size_multiple", 8) or 1
    if vocab % multiple:
        vocab += multiple - vocab % multiple  # mamba-ssm pads the embedding rows
    d = c["d_model"]
    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=c["n_layer"], intermediate_size=0,
                  num_attention_heads=_default_heads(d), dt_min=ssm.get("dt_min", 0.001),
                  dt_max=ssm.get("dt_max", 0.1), dt_init_floor=ssm.get("dt_init_floor", 1e-4),
                  rms_norm_eps=c.get("norm_epsilon", 1e-5), tie_word_embeddings=c.get("tie_embeddings", True),
                  residual_in_fp32=c.get("residual_in_fp32", True))
    if layer == "Mamba2":
        expand, headdim = ssm.get("expand", 2), ssm.get("headdim", 64)
        d_inner = expand * d
        if ssm.get("d_ssm") not in (None, d_inner):
            _refuse("ssm_cfg.d_ssm", ssm["d_ssm"], f"is not supported: a d_ssm below d_inner={d_inner} adds a gated "
                    "MLP inside the mixer, which bmojo's Mamba-2 mixer does not have")
        if not ssm.get("rmsnorm", True):
            _refuse("ssm_cfg.rmsnorm", ssm["rmsnorm"], "is not supported: bmojo's Mamba-2 mixer always ends with "
                    "the gated RMSNorm")
        if d_inner % headdim:
            _refuse("ssm_cfg.headdim", headdim, f"must divide d_inner = expand * d_model = {d_inner}")
        limit = ssm.get("dt_limit", (0.0, float("inf")))
        return BMojoConfig(
            **common, layer_types=["mamba2"] * c["n_layer"], mamba2_num_heads=d_inner // headdim,
            mamba2_head_dim=headdim, mamba2_state_size=ssm.get("d_state", 128), mamba2_n_groups=ssm.get("ngroups", 1),
            mamba2_expand=expand, mamba2_conv_kernel=ssm.get("d_conv", 4), mamba2_D_has_hdim=ssm.get("D_has_hdim", False),
            mamba2_norm_before_gate=ssm.get("norm_before_gate", False), mamba2_use_conv_bias=ssm.get("conv_bias", True),
            mamba2_use_bias=ssm.get("bias", False), mamba2_norm_eps=1e-5, mamba2_dt_limit=[float(v) for v in limit],
            mamba2_A_init_range=list(ssm.get("A_init_range", (1.0, 16.0))),
        )
    return BMojoConfig(
        **common, layer_types=["mamba"] * c["n_layer"],
        d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
        dt_rank=ssm.get("dt_rank", "auto"), conv_bias=ssm.get("conv_bias", True), proj_bias=ssm.get("bias", False),
    )


# -- hybrid-model-factory's hybrid_qwen3 ---------------------------------------------------------------
# HybridQwen3Config's defaults (a config.json saved by transformers may leave out fields at their default)
_HQ3_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
                 "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": False, "attention_bias": False}
# hybrid_override_pattern symbol -> bmojo layer type (the stage-2, unfused layers)
HYBRID_QWEN3_LAYERS = {"*": "attention", "SWA": "sliding_attention", "BMF": "bmojo_f", "M2": "mamba2"}
_HQ3_REFUSED = {
    "GKA": "Gated KalmaNet layers have no bmojo counterpart",
    "GDN": "Gated DeltaNet layers have no bmojo counterpart",
}
_HQ3_FUSED = ("*DA", "M2*", "BMF*", "GDN*", "GKA*", "SWA*", "GDN>GKA")  # stage-0/1 distillation layers
# mamba2_config entries that the training code derives from the base config (and vLLM reads): they must agree
_HQ3_MAMBA2_FIXED = {"d_conv": 4, "use_conv_bias": True, "use_bias": False, "xb_proj_rank": None,
                     "xb_learnable_residual": False, "use_rotary_emb": False}


def _hq3_field(c: dict, name: str, kinds: tuple, where: str = ""):
    """``c[name]`` (or HybridQwen3Config's default) after checking its JSON type; names the field."""
    value = c.get(name, _HQ3_DEFAULTS.get(name))
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict), "none": lambda v: v is None}
    if not any(ok[k](value) for k in kinds):
        _refuse(where + name, value, f"must be {' or '.join(kinds)}")
    return value


def _hq3_rope(c: dict) -> dict:
    """HybridQwen3Config's RoPE: ``rope_parameters``, else the legacy ``rope_theta`` (default 10000) with
    ``rope_scaling`` folded in; a per-layer-type dict of RoPE settings must hold one setting."""
    params = c.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            _refuse("rope_parameters", params, "must be a JSON object")
        if params and all(isinstance(v, dict) for v in params.values()):  # {layer type: parameters}
            distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
            if len(distinct) > 1:
                _refuse("rope_parameters", params, "gives layer types different RoPE settings; bmojo has one")
            params = next(iter(params.values()))
        params = dict(params)
    else:
        params = {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
        if c.get("rope_scaling") is not None:
            if not isinstance(c["rope_scaling"], dict):
                _refuse("rope_scaling", c["rope_scaling"], "must be a JSON object")
            params.update(c["rope_scaling"])
    if "type" in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if params.get("rope_theta") is None:
        _refuse("rope_parameters.rope_theta", None, "is missing")
    return params


def _hq3_layer_types(pattern, n_layers: int) -> list[str]:
    if not isinstance(pattern, str) or not pattern:
        _refuse("hybrid_override_pattern", pattern, "must be a string such as '*-BMF-*-BMF' (one symbol per layer)")
    symbols = pattern.split("-")
    if len(symbols) != n_layers:
        _refuse("hybrid_override_pattern", pattern, f"has {len(symbols)} layers but num_hidden_layers={n_layers}")
    types = []
    for i, s in enumerate(symbols):
        if s in HYBRID_QWEN3_LAYERS:
            types.append(HYBRID_QWEN3_LAYERS[s])
        elif s in _HQ3_REFUSED:
            _refuse(f"hybrid_override_pattern[{i}]", s, f"is not supported: {_HQ3_REFUSED[s]}")
        elif s in _HQ3_FUSED:
            _refuse(f"hybrid_override_pattern[{i}]", s, "is a stage-0/1 (fused, distillation) layer; convert the "
                    "stage-2 checkpoint, whose pattern uses only '*', 'SWA', 'BMF' and 'M2'")
        else:
            _refuse(f"hybrid_override_pattern[{i}]", s, f"is not a layer symbol bmojo knows "
                    f"({', '.join(repr(k) for k in HYBRID_QWEN3_LAYERS)})")
    return types


def _hq3_sub_config(c: dict, name: str, needed: bool) -> dict:
    sub = c.get(name)
    if sub is None:
        return {}
    if not isinstance(sub, dict):
        _refuse(name, sub, "must be a JSON object")
    return sub if needed else {}


def config_from_hybrid_qwen3(source: str) -> BMojoConfig:
    """The bmojo config of a hybrid-model-factory ``HybridQwen3Config`` (config.json, model_type
    "hybrid_qwen3"), read as their modeling code reads it:

    * every layer: Qwen3's pre-norm block (RMSNorm eps ``rms_norm_eps``, residual in the model dtype,
      SwiGLU MLP of ``intermediate_size`` without biases), RoPE from ``rope_parameters`` / ``rope_theta``;
    * ``*``: full causal attention with Qwen3's QK-norm (``qk_norm``), scale head_dim**-0.5;
    * ``SWA``: the same over the last ``swa_config.window_size`` keys (transformers' sliding mask:
      query i sees keys i-W+1..i) -> ``sliding_attention``;
    * ``BMF``: their B'MOJO-F -> ``bmojo_f`` with ``fading_mixer="mamba2"``: in-context keys i-W+1..i and
      fading keys i-2W+1..i-W in one softmax (their flash-attn window ``(W-1, 0)`` on both streams, the
      fading stream shifted by W), W = ``bmojo_config.window_size`` -> sliding_window = fading_window = W;
      fading keys/values from the Mamba-2 output through k_proj/k_norm/v_proj (``tie_attn_weights``) or
      through their own projections and norms, scored by their own query (untied: ``fading_query``);
    * ``M2`` and the BMF fading mixer: their Mamba-2 (expand 1, heads = attention heads, head_dim =
      d_state = head_dim, C for every head, x and B for the KV heads repeated to every head, in_proj
      [z, x, B, C, dt], conv of width 4 over x|B|C, RMSNorm with eps 1e-6 on B and C per head before the
      conv (``mamba2_config.use_qk_norm``), RoPE on B and C before the conv (``use_pos_emb``), gated
      RMSNorm (gate first) per head with eps 1e-5, dt limit (0, inf), per-head A_log, D and dt_bias).

    GKA / GDN layers and fading mixers, the stage-0/1 fused layers, windows that differ between SWA and
    BMF layers, and anything else bmojo cannot reproduce are refused with the field named."""
    _, c = _source_config(source)
    n_layers = _hq3_field(c, "num_hidden_layers", ("int",))
    d = _hq3_field(c, "hidden_size", ("int",))
    heads = _hq3_field(c, "num_attention_heads", ("int",))
    kv_heads = c.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _hq3_field(c, "num_key_value_heads", ("int",))
    head_dim = _hq3_field(c, "head_dim", ("int",))
    eps = _hq3_field(c, "rms_norm_eps", ("float",))
    if _hq3_field(c, "hidden_act", ("str",)) != "silu":
        _refuse("hidden_act", c["hidden_act"], "is not supported (bmojo's MLP is SwiGLU with SiLU)")
    types = _hq3_layer_types(c.get("hybrid_override_pattern"), n_layers)
    present = set(types)
    bmojo = _hq3_sub_config(c, "bmojo_config", "bmojo_f" in present)
    swa = _hq3_sub_config(c, "swa_config", "sliding_attention" in present)
    mamba2 = _hq3_sub_config(c, "mamba2_config", bool(present & {"bmojo_f", "mamba2"}))

    window = None
    if "bmojo_f" in present:
        if not c.get("bmojo_config"):
            _refuse("bmojo_config", c.get("bmojo_config"), "is missing but the pattern has 'BMF' layers")
        mixer = _hq3_field(bmojo, "ssm_mixer", ("str",), "bmojo_config.") if "ssm_mixer" in bmojo else "mamba2"
        if mixer.lower() != "mamba2":
            _refuse("bmojo_config.ssm_mixer", mixer, "is not supported: bmojo's B'MOJO-F fading mixers are Mamba "
                    "and Mamba-2 (no GKA / GDN)")
        window = _hq3_field(bmojo, "window_size", ("int",), "bmojo_config.") if "window_size" in bmojo else 2048
        if window <= 0:
            _refuse("bmojo_config.window_size", window, "must be a positive int")
        tied = _hq3_field(bmojo, "tie_attn_weights", ("bool",), "bmojo_config.") \
            if "tie_attn_weights" in bmojo else True
        # derived entries their training code recomputes from the base config: they must agree with it
        for key, want in (("hidden_size", d), ("num_heads", heads), ("num_key_value_heads", kv_heads),
                          ("head_dim", head_dim), ("rms_norm_eps", eps)):
            if key in bmojo and bmojo[key] != want:
                _refuse(f"bmojo_config.{key}", bmojo[key], f"disagrees with the model's {want!r}")
    else:
        tied = True
    if "sliding_attention" in present:
        sw = swa.get("window_size")
        if isinstance(sw, bool) or not isinstance(sw, int) or sw <= 0:
            _refuse("swa_config.window_size", sw, "must be a positive int for 'SWA' layers")
        if window is not None and sw != window:
            _refuse("swa_config.window_size", sw, f"differs from bmojo_config.window_size={window}; bmojo has one "
                    "sliding_window for sliding_attention and bmojo_f layers")
        window = sw

    m2 = {}
    if present & {"bmojo_f", "mamba2"}:
        qk = mamba2.get("use_qk_norm", True)
        pos = mamba2.get("use_pos_emb", False)
        for key, value in (("use_qk_norm", qk), ("use_pos_emb", pos)):
            if not isinstance(value, bool):
                _refuse(f"mamba2_config.{key}", value, "must be true or false")
        if "use_pos_embed" in mamba2 and mamba2["use_pos_embed"] != pos:  # the key their vLLM plugin reads
            _refuse("mamba2_config.use_pos_embed", mamba2["use_pos_embed"], f"disagrees with "
                    f"mamba2_config.use_pos_emb={pos!r} (the training code reads use_pos_emb)")
        for key, want in _HQ3_MAMBA2_FIXED.items():
            if key in mamba2 and mamba2[key] != want:
                _refuse(f"mamba2_config.{key}", mamba2[key], f"is not supported (the training code's Mamba-2 has {want!r})")
        derived = {"d_model": d, "d_inner": heads * head_dim, "d_xb": kv_heads * head_dim}
        for key, want in derived.items():
            if key in mamba2 and mamba2[key] != want:
                _refuse(f"mamba2_config.{key}", mamba2[key], f"disagrees with the model's {want}")
        ssm_cfg = mamba2.get("ssm_cfg") or {}
        for key, want in (("expand", 1), ("ngroups", heads), ("d_state", head_dim), ("repeat_kv_before_conv", False)):
            if key in ssm_cfg and ssm_cfg[key] != want:
                _refuse(f"mamba2_config.ssm_cfg.{key}", ssm_cfg[key], f"is not supported (must be {want!r})")
        if "rms_norm_eps" in mamba2 and mamba2["rms_norm_eps"] != 1e-6:
            _refuse("mamba2_config.rms_norm_eps", mamba2["rms_norm_eps"], "is not supported: the B/C norms use eps "
                    "1e-6 in the authors' training code and in bmojo (their vLLM plugin would use this value)")
        if heads % kv_heads:
            _refuse("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
        m2 = dict(mamba2_num_heads=heads, mamba2_head_dim=head_dim, mamba2_state_size=head_dim,
                  mamba2_n_groups=heads, mamba2_expand=1, mamba2_xb_heads=kv_heads, mamba2_conv_kernel=4,
                  mamba2_norm_groups=heads, mamba2_norm_before_gate=False, mamba2_bc_norm=qk, mamba2_bc_rope=pos,
                  mamba2_D_has_hdim=False, mamba2_use_conv_bias=True, mamba2_use_bias=False, mamba2_norm_eps=1e-5,
                  mamba2_dt_limit=[0.0, float("inf")], fading_mixer="mamba2")
    return BMojoConfig(
        vocab_size=_hq3_field(c, "vocab_size", ("int",)), hidden_size=d, num_hidden_layers=n_layers,
        layer_types=types, intermediate_size=_hq3_field(c, "intermediate_size", ("int",)),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        sliding_window=window, fading_window=None, memory_slots=0, qk_norm=True,
        tie_fading_kv=tied, fading_query=not tied,
        rope_parameters=_hq3_rope(c), max_position_embeddings=_hq3_field(c, "max_position_embeddings", ("int", "none")),
        attention_bias=_hq3_field(c, "attention_bias", ("bool",)), mlp_bias=False, rms_norm_eps=eps,
        tie_word_embeddings=_hq3_field(c, "tie_word_embeddings", ("bool",)),
        initializer_range=_hq3_field(c, "initializer_range", ("float",)), residual_in_fp32=False,
        pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
        **m2,
    )


# -- names -----------------------------------------------------------------------------------------
_MIXER = (r"(in_proj\.(weight|bias)|conv1d\.(weight|bias)|x_proj\.weight|dt_proj\.(weight|bias)|A_log|D"
          r"|out_proj\.(weight|bias))")
_MIXER2 = (r"(in_proj\.(weight|bias)|conv1d\.(weight|bias)|dt_bias|A_log|D|norm\.weight|out_proj\.(weight|bias)"
           r"|B_norm\.weight|C_norm\.weight)")
_RULES = {
    "hf-mamba": [
        (r"backbone\.embeddings?\.weight", "model.embed_tokens.weight"),
        (r"backbone\.layers\.(\d+)\.norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (rf"backbone\.layers\.(\d+)\.mixer\.{_MIXER}", r"model.layers.\1.mixer.\2"),
        (r"backbone\.norm_f\.weight", "model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    ],
    "mamba-ssm": [
        (r"backbone\.embedding\.weight", "model.embed_tokens.weight"),
        (r"backbone\.layers\.(\d+)\.norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (rf"backbone\.layers\.(\d+)\.mixer\.{_MIXER}", r"model.layers.\1.mixer.\2"),
        (rf"backbone\.layers\.(\d+)\.mixer\.{_MIXER2}", r"model.layers.\1.mixer.\2"),
        (r"backbone\.norm_f\.weight", "model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    ],
    "hf-llama": [
        (r"model\.embed_tokens\.weight", "model.embed_tokens.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj\.(weight|bias))", r"model.layers.\1.mixer.\2"),
        (r"model\.layers\.(\d+)\.mlp\.((gate|up|down)_proj\.(weight|bias))", r"model.layers.\1.mlp.\2"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.post_mixer_layernorm.weight"),
        (r"model\.norm\.weight", "model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    ],
}
_RULES["hf-mamba2"] = [
    (r"backbone\.embeddings?\.weight", "model.embed_tokens.weight"),
    (r"backbone\.layers\.(\d+)\.norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (rf"backbone\.layers\.(\d+)\.mixer\.{_MIXER2}", r"model.layers.\1.mixer.\2"),
    (r"backbone\.norm_f\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
# hybrid_qwen3: names outside the layers, names every layer has, then each layer type's own (a tensor is
# accepted only under the module its layer's pattern symbol creates: `self_attn` in a BMF layer is refused)
_HQ3_GLOBAL = [(r"model\.embed_tokens\.weight", "model.embed_tokens.weight"), (r"model\.norm\.weight", "model.norm.weight"),
               (r"lm_head\.weight", "lm_head.weight")]
_HQ3_BLOCK = [(r"input_layernorm\.weight", "input_layernorm.weight"),
              (r"post_attention_layernorm\.weight", "post_mixer_layernorm.weight"),
              (r"mlp\.((gate|up|down)_proj\.(weight|bias))", r"mlp.\1")]
_ATTN = r"([qkvo]_proj\.(weight|bias)|[qk]_norm\.weight)"
_HQ3_LAYER = {
    "attention": [(rf"self_attn\.{_ATTN}", r"mixer.\1")],
    "sliding_attention": [(rf"swa\.{_ATTN}", r"mixer.\1")],
    "bmojo_f": [(rf"bmojo_f\.bmojo_attn\.{_ATTN}", r"mixer.\1"),
                (r"bmojo_f\.bmojo_attn\.([qkv])_proj_\.(weight|bias)", r"mixer.\1_fading_proj.\2"),
                (r"bmojo_f\.bmojo_attn\.([qk])_norm_\.weight", r"mixer.\1_fading_norm.weight"),
                (rf"bmojo_f\.mamba\.{_MIXER2}", r"mixer.mamba.\1")],
    "mamba2": [(rf"mamba\.{_MIXER2}", r"mixer.\1")],
}
# where each layer type keeps its Mamba-2 mixer and its attention in a hybrid_qwen3 checkpoint
_HQ3_MODULES = {"mamba2": {"Mamba-2 mixer": "mamba."},
                "bmojo_f": {"Mamba-2 mixer": "bmojo_f.mamba.", "B'MOJO-F attention": "bmojo_f.bmojo_attn."},
                "attention": {"attention": "self_attn."}, "sliding_attention": {"attention": "swa."}}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # non-persistent buffers some old checkpoints carry
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _rename(fmt: str, name: str, config: BMojoConfig | None = None) -> str | None:
    if fmt == "hybrid-qwen3":
        return _rename_hybrid_qwen3(name, config.layer_types)
    for pattern, target in _RULES[fmt]:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _rename_hybrid_qwen3(name: str, layer_types: list[str]) -> str | None:
    for pattern, target in _HQ3_GLOBAL:
        if re.fullmatch(pattern, name):
            return target
    m = _LAYER.fullmatch(name)
    if m is None or int(m.group(1)) >= len(layer_types):
        return None
    i, rest = int(m.group(1)), m.group(2)
    for pattern, target in _HQ3_BLOCK + _HQ3_LAYER[layer_types[i]]:
        if re.fullmatch(pattern, rest):
            return f"model.layers.{i}." + re.sub(pattern, target, rest)
    return None


def _check_layers_agree(tensors: "_Tensors", config: BMojoConfig) -> None:
    """A hybrid_qwen3 checkpoint's Mamba-2 mixers (M2 layers and BMF fading mixers) and B'MOJO-F
    attentions must all carry the same tensors with the same shapes: bmojo's config has one Mamba-2 (and
    one B'MOJO-F) setting for all layers. Raises a ValueError naming the layers of each variant."""
    by_layer: dict[int, dict[str, tuple]] = {}
    for name, shape in tensors.shapes.items():
        m = _LAYER.fullmatch(name)
        if m and int(m.group(1)) < len(config.layer_types):
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = shape
    for module in ("Mamba-2 mixer", "B'MOJO-F attention"):
        variants: dict[tuple, list[int]] = {}
        for i, t in enumerate(config.layer_types):
            prefix = _HQ3_MODULES[t].get(module)
            if prefix is None:
                continue
            sig = tuple(sorted((k[len(prefix):], v) for k, v in by_layer.get(i, {}).items() if k.startswith(prefix)))
            if sig:  # a layer without the module at all is reported tensor by tensor (map_state_dict)
                variants.setdefault(sig, []).append(i)
        if len(variants) > 1:
            lines = []
            for sig, layers in variants.items():
                lines.append(f"layers {layers}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sig))
            raise ValueError(f"cannot convert: the checkpoint's {module}s differ between layers, but bmojo's config "
                             f"has one {module} setting for all layers:\n  " + "\n  ".join(lines))


def _expected_shapes(config: BMojoConfig) -> dict[str, tuple[int, ...]]:
    from .modeling_bmojo import BMojoForCausalLM

    with torch.device("meta"):
        model = BMojoForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def map_state_dict(fmt: str, tensors: _Tensors, config: BMojoConfig) -> dict[str, str]:
    """bmojo name -> source name for every tensor, after checking names and shapes against ``config``.
    Raises ValueError listing every problem (tensor, checkpoint shape, expected shape)."""
    expected = _expected_shapes(config)
    tied = config.tie_word_embeddings
    problems, mapping = [], {}
    for src, shape in tensors.shapes.items():
        if _IGNORED.fullmatch(src):
            continue
        dst = _rename(fmt, src, config)
        if dst is None or dst not in expected:
            problems.append(f"unexpected tensor {src!r} {_fmt(shape)}: no bmojo parameter of that name "
                            f"({'maps to ' + repr(dst) if dst else 'not a ' + fmt + ' parameter name'})")
            continue
        if dst in mapping:
            problems.append(f"tensor {src!r} and {mapping[dst]!r} both map to {dst!r}")
            continue
        if shape != expected[dst]:
            problems.append(f"tensor {src!r} (bmojo {dst!r}) has shape {_fmt(shape)} in the checkpoint but the "
                            f"config expects {_fmt(expected[dst])}")
        mapping[dst] = src
    for dst, shape in expected.items():
        if dst not in mapping and not (tied and dst == "lm_head.weight"):
            problems.append(f"missing tensor {dst!r} (expected shape {_fmt(shape)})")
    if problems:
        raise ValueError(f"cannot convert the {fmt} checkpoint ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))
    return mapping


# -- conversion ------------------------------------------------------------------------------------
def load_converted(source: str, source_format: str = "auto", allow_pickle: bool = False):
    """Read, validate and convert ``source``; returns ``(config, state_dict)`` in bmojo names."""
    fmt = detect_format(source) if source_format == "auto" else source_format
    if fmt not in FORMATS:
        raise ValueError(f"source_format must be 'auto' or one of {FORMATS}, got {source_format!r}")
    if fmt != "mamba-ssm" and not os.path.isdir(source):
        raise ValueError(f"{source}: a {fmt} source must be a checkpoint directory")
    directory, _ = _source_config(source)
    builder = {"hf-mamba": config_from_hf_mamba, "hf-mamba2": config_from_hf_mamba2, "hf-llama": config_from_hf_llama,
               "mamba-ssm": config_from_mamba_ssm, "hybrid-qwen3": config_from_hybrid_qwen3}[fmt]
    try:
        config = builder(directory)
    except ValueError:
        raise
    except Exception as e:  # a field of the wrong type deep inside transformers' or BMojoConfig's checks
        raise ConversionError(f"{os.path.join(directory, 'config.json')}: cannot be read as a {fmt} config "
                              f"({type(e).__name__}: {e})") from None
    tensors = _read_weights(source, allow_pickle)
    if fmt == "hybrid-qwen3":
        _check_layers_agree(tensors, config)
    mapping = map_state_dict(fmt, tensors, config)
    state = {dst: tensors.load(src).contiguous() for dst, src in mapping.items()}
    if config.tie_word_embeddings and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state["model.embed_tokens.weight"]
        if not torch.equal(head, emb):
            raise ValueError(f"tensor {mapping['lm_head.weight']!r} differs from the input embedding "
                             f"{mapping['model.embed_tokens.weight']!r} but the config ties them "
                             "(tie_word_embeddings / tie_embeddings = true)")
    return config, state


def build_model(config: BMojoConfig, state: dict[str, torch.Tensor]):
    """A ``BMojoForCausalLM`` holding ``state`` (no random initialization is run)."""
    from .modeling_bmojo import BMojoForCausalLM

    with torch.device("meta"):
        model = BMojoForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # map_state_dict checked this already
        raise ValueError(f"internal error: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if model.model.rotary_emb is not None:  # a non-persistent buffer, still on the meta device
        from .modeling_bmojo import BMojoRotaryEmbedding

        model.model.rotary_emb = BMojoRotaryEmbedding(config)
    return model.eval()


def convert(source: str, output: str, source_format: str = "auto", allow_pickle: bool = False,
            overwrite: bool = False) -> str:
    """Convert the checkpoint at ``source`` into a bmojo checkpoint directory ``output``.

    ``source_format``: ``auto`` (from config.json) or one of :data:`FORMATS` (``hf-mamba``, ``hf-mamba2``,
    ``hf-llama``, ``mamba-ssm``, ``hybrid-qwen3``).
    Everything is validated before anything is written; the directory appears only when complete.
    Returns ``output``.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; choose another output directory or pass overwrite=True")
    config, state = load_converted(source, source_format, allow_pickle)
    model = build_model(config, state)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        if os.path.exists(output):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=parent)
            os.rename(output, os.path.join(old, "x"))
            os.rename(tmp, output)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


__all__ = ["FORMATS", "HYBRID_QWEN3_LAYERS", "ConversionError", "convert", "detect_format", "load_converted",
           "build_model", "map_state_dict", "config_from_hf_mamba", "config_from_hf_mamba2", "config_from_hf_llama",
           "config_from_mamba_ssm", "config_from_hybrid_qwen3"]
