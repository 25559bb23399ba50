"""Checkpoint interop: Hugging Face Mamba / Llama and mamba-ssm checkpoints -> bmojo checkpoints.

=============== ======================================================= ==========================
source           what it is                                              becomes
=============== ======================================================= ==========================
``hf-mamba``     a transformers ``MambaForCausalLM`` directory            the ``mamba`` preset layout
                 (config.json with model_type "mamba" + safetensors)     (all ``mamba``, no MLP)
``hf-llama``     a transformers ``LlamaForCausalLM`` directory            the ``transformer`` preset
                 (model_type "llama")                                     layout (all ``attention``)
``mamba-ssm``    a mamba-ssm ``MambaLMHeadModel`` state dict: a           the ``mamba`` preset layout
                 directory with config.json (d_model, n_layer, ...)
                 and model.safetensors, or a weights file with its
                 config.json beside it
=============== ======================================================= ==========================

The result is ``config.json`` + ``model.safetensors`` written by ``BMojoForCausalLM.save_pretrained``,
loadable with ``AutoModelForCausalLM.from_pretrained`` after ``import bmojo``.

Every tensor is checked before anything is written: a missing or unexpected tensor, a shape that
disagrees with the config, or a config feature bmojo cannot reproduce (LayerNorm instead of RMSNorm,
RoPE scaling, a non-SiLU activation, Mamba-2 or attention layers inside a mamba-ssm model) raises a
``ValueError`` naming the tensor (or field) and both values. A source file that cannot be read as what
it should be (a config.json that is not a JSON object, a safetensors file that is not one, a pickle
that does not load) raises :class:`ConversionError` (a ``ValueError``) naming the file. The checkpoint is written to a temporary
directory beside the output and renamed into place only when complete, so a failed conversion leaves
nothing behind. Pickled weights (``.bin``, ``.pt``, ...) are refused unless ``allow_pickle=True``, and
then read with ``torch.load(weights_only=True)``.

Numerics: bmojo's RMSNorm is HF Mamba's / Llama's (fp32 statistics, weight applied after casting
back), and ``residual_in_fp32`` is copied from the source (Llama keeps its residual in the model dtype).
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

FORMATS = ("hf-mamba", "hf-llama", "mamba-ssm")
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


def detect_format(source: str) -> str:
    """``hf-mamba``, ``hf-llama`` or ``mamba-ssm``, from the source's config.json."""
    _, cfg = _source_config(source)
    model_type = cfg.get("model_type")
    if model_type == "mamba":
        return "hf-mamba"
    if model_type == "llama":
        return "hf-llama"
    if model_type is None and "d_model" in cfg and "n_layer" in cfg:
        return "mamba-ssm"
    raise ValueError(f"{source}: cannot convert model_type={model_type!r}; supported: HF Mamba ('mamba'), HF Llama "
                     "('llama') and mamba-ssm configs (d_model, n_layer, ...)")


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


# mamba-ssm's Mamba (Mamba-1) block arguments; those that only shape initialization or the kernels
# are accepted and ignored.
_MAMBA_SSM_ARGS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                   "dt_init_floor", "dt_init", "dt_scale", "use_fast_path", "layer"}


def config_from_mamba_ssm(source: str) -> BMojoConfig:
    """The bmojo config (``mamba`` preset layout) of a mamba-ssm ``MambaConfig`` (config.json)."""
    _, c = _source_config(source)
    for field in ("d_model", "n_layer", "vocab_size"):
        if field not in c:
            _refuse(field, None, "is missing (not a mamba-ssm config.json?)")
    ssm = dict(c.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba1":
        _refuse("ssm_cfg.layer", ssm["layer"], "is not supported (bmojo's SSM layers are Mamba-1)")
    unknown = sorted(set(ssm) - _MAMBA_SSM_ARGS)
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
    dt_rank = ssm.get("dt_rank", "auto")
    return BMojoConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=c["n_layer"],
        layer_types=["mamba"] * c["n_layer"], intermediate_size=0, num_attention_heads=_default_heads(d),
        d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
        dt_rank=dt_rank, dt_min=ssm.get("dt_min", 0.001), dt_max=ssm.get("dt_max", 0.1),
        dt_init_floor=ssm.get("dt_init_floor", 1e-4), conv_bias=ssm.get("conv_bias", True),
        proj_bias=ssm.get("bias", False), rms_norm_eps=c.get("norm_epsilon", 1e-5),
        tie_word_embeddings=c.get("tie_embeddings", True), residual_in_fp32=c.get("residual_in_fp32", True),
    )


# -- names -----------------------------------------------------------------------------------------
_MIXER = (r"(in_proj\.(weight|bias)|conv1d\.(weight|bias)|x_proj\.weight|dt_proj\.(weight|bias)|A_log|D"
          r"|out_proj\.(weight|bias))")
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
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # non-persistent buffers some old checkpoints carry


def _rename(fmt: str, name: str) -> str | None:
    for pattern, target in _RULES[fmt]:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


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
        dst = _rename(fmt, src)
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
    builder = {"hf-mamba": config_from_hf_mamba, "hf-llama": config_from_hf_llama,
               "mamba-ssm": config_from_mamba_ssm}[fmt]
    try:
        config = builder(directory)
    except ValueError:
        raise
    except Exception as e:  # a field of the wrong type deep inside transformers' or BMojoConfig's checks
        raise ConversionError(f"{os.path.join(directory, 'config.json')}: cannot be read as a {fmt} config "
                              f"({type(e).__name__}: {e})") from None
    tensors = _read_weights(source, allow_pickle)
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

    ``source_format``: ``auto`` (from config.json), ``hf-mamba``, ``hf-llama`` or ``mamba-ssm``.
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


__all__ = ["FORMATS", "ConversionError", "convert", "detect_format", "load_converted", "build_model", "map_state_dict",
           "config_from_hf_mamba", "config_from_hf_llama", "config_from_mamba_ssm"]
