"""B'MOJO and the models it generalizes, as one Hugging Face model class (docs/design.md).

Each layer is ``h = h + mixer(RMSNorm(h))`` then, if ``intermediate_size > 0``,
``h = h + MLP(RMSNorm(h))``. The mixer is a Mamba-1 block (``mamba``, :mod:`bmojo.layers.mamba`) or a
:class:`~bmojo.layers.attention.BMojoAttention`, whose one softmax reads up to three memories: the last
``w`` keys (in-context), keys projected from the Mamba outputs ``f`` for the ``m_f`` positions before
the window (fading), and ``m_e`` past keys kept because ``f`` was hard to predict there
(:mod:`bmojo.layers.eidetic`). ``attention`` and ``sliding_attention`` are the same class with the
fading and eidetic memories switched off.

A forward runs one of three paths (docs/design.md, "Data path"): a fresh sequence runs the parallel
form (left- or right-padded rows in the same pass); tokens after a :class:`~bmojo.cache.BMojoCache`
that has seen some run the parallel form from the state (``resume``); one token per row runs the
recurrent step. The model calls only :mod:`bmojo.ops`, through the kernels ``config.backend`` resolves
once per device.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import BMojoCache, LayerState
from .checkpoint import check_directory, check_finite, looks_local, validate_checkpoint
from .configuration_bmojo import BMojoConfig
from .hf_compat import CACHE_NAME, output_cache, take_cache
from .layers.attention import BMojoAttention
from .layers.common import BMojoMLP, BMojoRMSNorm, BMojoRotaryEmbedding, residual_add
from .layers.mamba import BMojoMambaMixer
from .layers.mamba2 import BMojoMamba2Mixer
from .ops import Kernels


@dataclass
class StepContext:
    """What every layer of a decoding step shares: positions t (b,), tokens consumed so far (padding
    included), RoPE at t and at t - w (the token leaving the window), and whether all rows start a
    memory chunk here (None when rows sit at different positions)."""

    t: torch.Tensor
    seen: int
    rope: tuple | None
    rope_evicted: tuple | None
    boundary: bool | None


class BMojoDecoderLayer(nn.Module):
    """``h + mixer(RMSNorm(h))`` then ``h + MLP(RMSNorm(h))``. With ``residual_in_fp32`` the residual
    stream stays fp32 and each branch reads it cast to the weights' dtype (HF Mamba / mamba-ssm order)."""

    def __init__(self, config: BMojoConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.ssm_only = self.layer_type in ("mamba", "mamba2")
        self.residual_in_fp32 = config.residual_in_fp32
        self.input_layernorm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == "mamba":
            self.mixer = BMojoMambaMixer(config, layer_idx, kernels)
        elif self.layer_type == "mamba2":
            self.mixer = BMojoMamba2Mixer(config, layer_idx, kernels)
        else:
            self.mixer = BMojoAttention(config, layer_idx, kernels)
        self.mlp = None
        if config.intermediate_size > 0:
            self.post_mixer_layernorm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = BMojoMLP(config)

    def _branch_input(self, norm: BMojoRMSNorm, h: torch.Tensor):
        u = norm(h.to(norm.weight.dtype))
        return u, (h.float() if self.residual_in_fp32 else h)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return h
        u, h = self._branch_input(self.post_mixer_layernorm, h)
        return residual_add(h, self.mlp(u))

    def forward(self, h: torch.Tensor, rope=None, state: LayerState | None = None, lengths: torch.Tensor | None = None,
                output_attentions: bool = False):
        """A fresh sequence: h (b, T, d) -> (b, T, d), and the mixer's attention weights (None for mamba)."""
        u, h = self._branch_input(self.input_layernorm, h)
        weights = None
        if self.ssm_only:
            mixed = self.mixer(u, state.mamba if state is not None else None, lengths, rope)
        else:
            mixed, weights = self.mixer(u, rope, state, lengths, output_attentions)
        return self._mlp(residual_add(h, mixed)), weights

    def resume(self, h: torch.Tensor, rope, rope_window, state: LayerState, start: torch.Tensor, seen: int,
               host_start: int | None = None):
        """T tokens after ``state``, in parallel: h (b, T, d) -> (b, T, d)."""
        u, h = self._branch_input(self.input_layernorm, h)
        if self.ssm_only:
            mixed = self.mixer.resume(u, state.mamba, rope)
        else:
            mixed = self.mixer.resume(u, rope, rope_window, state, start, seen, host_start)
        return self._mlp(residual_add(h, mixed))

    def step(self, h: torch.Tensor, ctx: StepContext, state: LayerState, output_attentions: bool = False):
        """One token per row, h (b, d) -> (b, d), and the mixer's (probabilities, source positions)
        when asked (None for mamba)."""
        u, h = self._branch_input(self.input_layernorm, h)
        weights = None
        if self.ssm_only:
            mixed = self.mixer.step(u, state.mamba, ctx.rope)
        else:
            mixed = self.mixer.step(u, ctx.t, ctx.rope, state, ctx.seen, ctx.rope_evicted, ctx.boundary,
                                    output_attentions)
            if output_attentions:
                mixed, weights = mixed
        return self._mlp(residual_add(h, mixed)), weights


AUTO_MAP = {
    "AutoConfig": "configuration_bmojo.BMojoConfig",
    "AutoModel": "modeling_bmojo.BMojoModel",
    "AutoModelForCausalLM": "modeling_bmojo.BMojoForCausalLM",
}
# Written only on request (save_pretrained(..., remote_code=True)): two one-line files that import the
# installed bmojo package, so that `trust_remote_code=True` loads the checkpoint without `import bmojo`.
REMOTE_CODE_SHIMS = {
    "configuration_bmojo.py": "from bmojo.configuration_bmojo import BMojoConfig  # noqa: F401\n",
    "modeling_bmojo.py": "from bmojo.modeling_bmojo import BMojoForCausalLM, BMojoModel  # noqa: F401\n",
}


def write_remote_code_shims(directory: str) -> None:
    """The files ``AUTO_MAP`` names, so ``trust_remote_code=True`` works without ``import bmojo``."""
    for name, text in REMOTE_CODE_SHIMS.items():
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(text)


class BMojoPreTrainedModel(PreTrainedModel):
    config_class = BMojoConfig
    config: BMojoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BMojoDecoderLayer"]
    _keep_in_fp32_modules_strict = ["A_log", "D"]  # fp32 whatever dtype the model is loaded in (bf16 too)
    _is_stateful = True
    _supports_sdpa = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False,
                        allow_nonfinite: bool = False, **kwargs):
        """transformers' ``from_pretrained``, after a full check of a local checkpoint (see
        :func:`bmojo.checkpoint.validate_checkpoint`): every tensor named, shaped and typed as the config
        requires, whatever the file format. Safetensors only unless ``allow_pickle`` (then read with
        ``weights_only=True``). Weights holding NaN or inf are refused unless ``allow_nonfinite``. A
        local path that does not exist, or has no config.json, is an error (no model-hub lookup)."""
        path = os.path.expanduser(str(pretrained_model_name_or_path))
        if os.path.isdir(path) or looks_local(path):
            check_directory(path)
            config = kwargs.get("config")
            if not isinstance(config, BMojoConfig):
                config = BMojoConfig.from_pretrained(path)
            validate_checkpoint(path, cls, config, allow_pickle=allow_pickle)
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if not allow_nonfinite:
            check_finite(model[0] if isinstance(model, tuple) else model, path)
        return model

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, **kwargs):
        """Safetensors weights and config.json. ``remote_code=True`` also writes an ``auto_map`` and the two
        one-line files it names (they import the installed bmojo), for ``trust_remote_code=True`` loading
        without ``import bmojo``; by default a checkpoint holds no Python file.

        Files are written beside the target and renamed into place: a symbolic link in the target is
        replaced, never followed, and a failed save leaves the previous files as they were."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("bmojo saves safetensors only (safe_serialization=False was asked for)")
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".bmojo-save-", dir=save_directory)  # same filesystem: atomic renames
        had, auto_map = hasattr(self.config, "auto_map"), getattr(self.config, "auto_map", None)
        try:
            if remote_code:
                self.config.auto_map = dict(AUTO_MAP)
            elif had:
                del self.config.auto_map
            super().save_pretrained(staging, *args, **kwargs)
            if remote_code:
                write_remote_code_shims(staging)
            written = set(os.listdir(staging))
            for name in os.listdir(save_directory):  # weights of an earlier save that this one does not rewrite
                if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")) \
                        and name not in written:
                    os.unlink(os.path.join(save_directory, name))
            for name in written:
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            if had:
                self.config.auto_map = auto_map
            elif remote_code:
                del self.config.auto_map
            shutil.rmtree(staging, ignore_errors=True)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BMojoRotaryEmbedding):  # non-persistent buffer: from_pretrained leaves it uninitialized
            init.copy_(module.inv_freq, BMojoRotaryEmbedding(self.config).inv_freq)
        if isinstance(module, (BMojoMambaMixer, BMojoMamba2Mixer)):
            module.init_mamba_weights()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
        if self.config.rescale_prenorm_residual:
            # GPT-2 / mamba-ssm: scale the projections that write into the residual stream by 1/sqrt(2L).
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            for name in ("out_proj", "o_proj", "down_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, nn.Linear):
                    init.normal_(proj.weight, mean=0.0, std=std)


class BMojoModel(BMojoPreTrainedModel):
    """The backbone: embeddings, ``num_hidden_layers`` blocks of ``config.layer_types``, final norm."""

    def __init__(self, config: BMojoConfig):
        config.check()  # again: a config may have been edited since it was built
        super().__init__(config)
        self.kernels = Kernels(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BMojoDecoderLayer(config, i, self.kernels) for i in range(config.num_hidden_layers))
        self.norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BMojoRotaryEmbedding(config) if config.rope_parameters is not None else None
        self._fading_rope = self.rotary_emb is not None and any(
            t in ("bmojo_f", "bmojo") for t in config.layer_types) and config.effective_fading_window > 0
        self._memory = "bmojo" in config.layer_types
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope(self, h: torch.Tensor, positions: torch.Tensor):
        return None if self.rotary_emb is None else self.rotary_emb(h, positions)

    def _check_inputs(self, input_ids, inputs_embeds, check_values: bool = True):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BMojoModel: pass exactly one of input_ids and inputs_embeds")
        device = self.embed_tokens.weight.device
        x = input_ids if input_ids is not None else inputs_embeds
        if x.device != device:
            raise ValueError(f"BMojoModel: inputs are on {x.device} but the model is on {device}; move them with .to({str(device)!r})")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"BMojoModel: input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise ValueError(f"BMojoModel: input_ids must be integer token ids, got dtype {input_ids.dtype}")
            # A host-side range check: skipped in decoding steps, under compilation/export and on lazy
            # devices (XLA), where reading the values back would force a host synchronisation.
            if (check_values and input_ids.numel() and not torch.compiler.is_compiling()
                    and device.type in ("cpu", "cuda", "mps")):
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"BMojoModel: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"BMojoModel: inputs_embeds must be (batch, T, {self.config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        if x.shape[1] == 0:
            raise ValueError("BMojoModel: got an empty sequence (T = 0)")
        if x.shape[0] == 0:
            raise ValueError(f"BMojoModel: got an empty batch (shape {tuple(x.shape)})")
        if inputs_embeds is not None and not inputs_embeds.is_floating_point():
            raise ValueError(f"BMojoModel: inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")

    def _token_spans(self, attention_mask, T: int, position_ids=None):
        """(first token, number of tokens) per row (b,) of a padded prompt, or None when nothing is masked.

        Each row's tokens must be one contiguous run: left padding, right padding or both. The mask is
        checked here, once per prompt (a few host reads); under ``torch.compile`` / ``torch.export`` it
        is trusted (no value-dependent branch) and always applied."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[1] != T:
            raise ValueError(f"BMojoModel: attention_mask must be (batch, {T}) for a prompt of {T} tokens, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        first = mask.long().argmax(1)  # the first 1 of each row
        length = mask.sum(1)
        if torch.compiler.is_compiling():
            return first, length
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(f"BMojoModel: attention_mask holds {bad!r}; it must hold only 0 (padding) and 1 (token)")
        if not bool(mask.any(1).all()):
            rows = (~mask.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"BMojoModel: attention_mask masks every token of rows {rows}")
        j = torch.arange(T, device=mask.device)[None, :]
        inside = (j >= first[:, None]) & (j < (first + length)[:, None])
        if not bool((inside == mask).all()):
            rows = (inside != mask).any(1).nonzero().flatten().tolist()
            raise ValueError(f"BMojoModel: attention_mask rows {rows} have padding between tokens; only left or "
                             "right padding (each row's tokens in one run) is supported")
        if position_ids is not None:
            if position_ids.shape != mask.shape or not bool(((position_ids == j - first[:, None]) | ~mask).all()):
                raise ValueError("BMojoModel: position_ids differ from the positions bmojo derives from the "
                                 "attention_mask (0, 1, ... from each row's first token); custom positions are "
                                 "not supported")
        return None if bool(mask.all()) else (first, length)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BMojoCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (b, T) -> last_hidden_state (b, T, d).

        With no cache, or one that has seen no token, the parallel form runs from position 0 (a
        padded ``attention_mask`` in the same pass: each row gets exactly what it gets alone; outputs
        at pads are zero) and, if ``use_cache``, leaves the decoding state after each row's last token.
        After a cache that has seen tokens, T > 1 new tokens run in parallel from its state and one
        token per row runs the recurrent step; both advance the state. The cache may be passed as
        ``cache`` (transformers >= 5.24) or ``past_key_values``; the output carries it under the
        installed release's name.

        ``output_attentions``: per attention-bearing layer, weights (b, Hq, T, past + T) over token
        slots (mamba layers have none, as in Jamba); after a cache, tokens then run one by one.
        ``output_hidden_states``: the embeddings and each layer's output, the last one normed. Both
        default to the config's, as does ``return_dict``."""
        cache = take_cache(cache, past_key_values, "BMojoModel")
        _reject_unknown_kwargs("BMojoModel", kwargs)
        c = self.config
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.return_dict if return_dict is None else return_dict
        use_cache = use_cache if use_cache is not None else (c.use_cache and not self.training)
        if use_cache and cache is None:
            cache = BMojoCache(c)
        if cache is not None and not isinstance(cache, BMojoCache):
            raise TypeError(f"BMojoModel: the cache must be a BMojoCache, got {type(cache).__name__}")
        start = cache.seen_tokens if cache is not None else 0
        # values are checked for a prompt and for new tokens after a cache; a decoding step checks
        # shapes only (reading values back would synchronise with the device every token)
        self._check_inputs(input_ids, inputs_embeds, check_values=start == 0 or _length(input_ids, inputs_embeds) > 1)
        if input_ids is not None and input_ids.dtype not in (torch.long, torch.int):
            input_ids = input_ids.long()  # uint8 / int16 token ids: the embedding takes int64 or int32
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, T, _ = h.shape
        if cache is not None:
            cache.check_batch(b, c)
            if not cache.is_allocated:
                cache.allocate(b, h.device, self.embed_tokens.weight.dtype, tokens=T)
            cache.reserve(T)
        if start == 0:
            spans = self._token_spans(attention_mask, T, position_ids)
            h, hidden, attentions = self._prefill(h, cache, spans, output_hidden_states, output_attentions)
        else:
            if attention_mask is not None:
                self._check_mask_after_cache(attention_mask, b, start, T)
            if T == 1 or output_attentions:
                h, hidden, attentions = self._decode(h, cache, output_hidden_states, output_attentions)
            else:
                h, hidden, attentions = self._resume(h, cache, output_hidden_states)
        out = BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            **{CACHE_NAME: cache if use_cache else None},
        )
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _check_mask_after_cache(attention_mask, b: int, start: int, T: int) -> None:
        """After a cache the mask covers past + new tokens; the new ones must all be tokens (checked
        when several arrive; a decoding step checks the shape only)."""
        if tuple(attention_mask.shape) != (b, start + T):
            raise ValueError(f"BMojoModel: attention_mask must be (batch, {start + T}) (past + new tokens), "
                             f"got {tuple(attention_mask.shape)}")
        if T > 1 and not torch.compiler.is_compiling() and not bool((attention_mask[:, start:] == 1).all()):
            raise ValueError("BMojoModel: masked tokens after the cache's tokens; only a prompt may be padded")

    def _prefill(self, h, cache, spans, output_hidden_states, output_attentions):
        """The parallel form over h (b, T, d) from position 0. Padded rows (``spans``: first token and
        number of tokens per row) are rolled so that their tokens come first and their padding last,
        where causality hides it; outputs are rolled back, zero at pads."""
        b, T, _ = h.shape
        first = lengths = None
        if spans is not None:
            first, lengths = spans
            h = _roll_rows(h, first)
        rope = self._rope(h, torch.arange(T, device=h.device))
        hidden = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            h, weights = layer(h, rope, cache.layer_states[i] if cache is not None else None, lengths, output_attentions)
            if weights is not None:
                attentions.append(weights)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        if spans is not None:  # back to the caller's layout, zeros at pads
            h = _unroll_rows(h, first, lengths)
            hidden = None if hidden is None else [_unroll_rows(x, first, lengths) for x in hidden]
            attentions = None if attentions is None else [_unroll_weights(w, first, lengths) for w in attentions]
        if cache is not None:
            cache.prompt = spans
            cache.uniform_offset = 0 if spans is None else None
            cache.advance(T, positions=torch.full((b,), T, dtype=torch.long, device=h.device) if lengths is None else lengths)
        return h, hidden, attentions

    def _resume(self, h, cache, output_hidden_states):
        """T > 1 tokens after the cache's, in parallel from its state."""
        T = h.shape[1]
        start, seen = cache.positions, cache.seen_tokens
        host_start = None if cache.uniform_offset is None else seen - cache.uniform_offset  # every row's, if shared
        rope = self._rope(h, start[:, None] + torch.arange(T, device=h.device)[None, :])
        w = self.config.sliding_window
        rope_window = None
        if self._fading_rope:  # RoPE of the positions the window rings hold (w, or fewer while they grow)
            n = next(s.window.capacity for s in cache.layer_states if s.window is not None)
            rope_window = self._rope(h, start[:, None] - n + torch.arange(n, device=h.device)[None, :])
        hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            h = layer.resume(h, rope, rope_window, cache.layer_states[i], start, seen, host_start)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        cache.advance(T)
        return h, hidden, None

    def _decode(self, h, cache, output_hidden_states, output_attentions):
        """The recurrent form, token by token."""
        T = h.shape[1]
        w = self.config.sliding_window
        outs, per_token, per_token_attn = [], [], []
        for j in range(T):
            x, t, seen = h[:, j], cache.positions, cache.seen_tokens
            boundary = (None if cache.uniform_offset is None or not self._memory
                        else (seen - cache.uniform_offset) % w == 0)  # chunk starts matter to bmojo layers only
            ctx = StepContext(t=t, seen=seen, rope=self._rope(x, t[:, None]), boundary=boundary,
                              rope_evicted=self._rope(x, (t - w)[:, None]) if self._fading_rope else None)
            hid, attn = [], []
            for i, layer in enumerate(self.layers):
                hid.append(x)
                x, weights = layer.step(x, ctx, cache.layer_states[i], output_attentions)
                if weights is not None:  # (b, Hq, 1, seen + 1), padded to the call's seen + T key slots
                    attn.append(F.pad(_weights_by_slot(*weights, t, cache.prompt, seen), (0, T - 1 - j)))
            x = self.norm(x)
            hid.append(x)
            outs.append(x)
            per_token.append(hid)
            per_token_attn.append(attn)
            cache.advance(1)
        hidden = ([torch.stack([p[i] for p in per_token], 1) for i in range(len(self.layers) + 1)]
                  if output_hidden_states else None)
        attentions = None
        if output_attentions:
            attentions = [torch.cat([a[i] for a in per_token_attn], 2) for i in range(len(per_token_attn[0]))]
        return torch.stack(outs, 1), hidden, attentions


def _length(input_ids, inputs_embeds) -> int:
    return (input_ids if input_ids is not None else inputs_embeds).shape[1]


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x (b, T, ...) with row i rolled left by shift[i]: out[i, j] = x[i, (j + shift[i]) % T]."""
    T = x.shape[1]
    src = torch.remainder(torch.arange(T, device=x.device)[None, :] + shift[:, None], T)
    return torch.gather(x, 1, src.view(*src.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def _unroll_rows(x: torch.Tensor, shift: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_roll_rows`, with zeros outside each row's tokens [shift, shift + length)."""
    T = x.shape[1]
    j = torch.arange(T, device=x.device)[None, :]
    src = torch.remainder(j - shift[:, None], T)
    out = torch.gather(x, 1, src.view(*src.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
    keep = ((j >= shift[:, None]) & (j < (shift + lengths)[:, None])).view(*src.shape, *[1] * (x.dim() - 2))
    return torch.where(keep, out, out.new_zeros(()))


def _unroll_weights(w: torch.Tensor, shift: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Attention weights (b, H, T, T) of rolled rows back to the caller's layout, in queries and keys."""
    w = _unroll_rows(w.transpose(1, 2), shift, lengths)  # (b, Tq, H, Tk)
    w = _unroll_rows(w.transpose(1, 3), shift, lengths)  # (b, Tk, H, Tq)
    return w.permute(0, 2, 3, 1)


def _weights_by_slot(p: torch.Tensor, sources: torch.Tensor, t: torch.Tensor, prompt, n: int) -> torch.Tensor:
    """A decoding step's probabilities p (b, H, S) over keys built from row positions ``sources`` (b, S)
    (< 0: an empty slot) -> weights (b, H, 1, n + 1) over the caller's n + 1 token slots. A padded
    prompt (``prompt`` = first token and token count per row) holds positions p < length at slot
    first + p; later positions follow the whole prompt, at slot p + (n - t)."""
    if prompt is None:
        slots = sources
    else:
        first, length = prompt
        slots = sources + torch.where(sources < length[:, None], first[:, None], (n - t)[:, None])
    slots = slots.clamp(min=0)  # empty keys carry probability 0
    weights = p.new_zeros(*p.shape[:2], n + 1).scatter_add_(-1, slots[:, None].expand_as(p), p)
    return weights[:, :, None]


# Keywords of transformers' causal-LM loss (ForCausalLMLoss) that Trainer and users pass to forward.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Keywords that transformers or tokenizers may pass and that a causal LM without them rightly ignores.
_IGNORED_KWARGS = ("cache_position", "token_type_ids")


def _reject_unknown_kwargs(who: str, kwargs: dict) -> None:
    """A misspelled or unsupported keyword must not be swallowed (a renamed cache argument once was)."""
    unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"{who}.forward() got unexpected keyword arguments {unknown}")


class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.model = BMojoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BMojoCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (b, T) -> logits (b, T, vocab) (the last ``logits_to_keep`` positions if > 0);
        ``labels`` (b, T) give the shifted next-token cross-entropy, -100 ignored. Other arguments as
        :meth:`BMojoModel.forward`."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=take_cache(cache, past_key_values,
                         "BMojoForCausalLM"), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, position_ids=position_ids, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            self._check_labels(labels, out.last_hidden_state.shape[:2])
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions, **{CACHE_NAME: output_cache(out)})
        return output if return_dict else output.to_tuple()

    def _check_labels(self, labels: torch.Tensor, shape) -> None:
        """labels: integer token ids (b, T) like the input, each in [0, vocab_size) or -100 (ignored)."""
        if not torch.is_tensor(labels) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"BMojoForCausalLM: labels must be integer token ids, got "
                             f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}")
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"BMojoForCausalLM: labels must have the input's shape {tuple(shape)}, got {tuple(labels.shape)}")
        if not torch.compiler.is_compiling():
            bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"BMojoForCausalLM: labels hold {labels[bad][0].item()}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size}) and not the ignore index -100")

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode=None, batch_size=None,
                                      max_cache_length=None, *args, **kwargs):
        """transformers' DynamicCache knows attention layers only; every bmojo layer keeps a BMojoCache
        state, under the name the installed transformers passes to forward (CACHE_NAME). With a
        ``compile_config`` (or ``cache_implementation="static"``) it is allocated now at its final
        size, which makes the decoding step compileable (see :class:`CompiledDecoding`)."""
        other = "past_key_values" if CACHE_NAME == "cache" else "cache"
        if model_kwargs.get(other) is not None and model_kwargs.get(CACHE_NAME) is None:
            model_kwargs[CACHE_NAME] = model_kwargs.pop(other)
        if model_kwargs.get(CACHE_NAME) is not None or generation_config.use_cache is False:
            return
        static = generation_config.compile_config is not None or generation_config.cache_implementation == "static"
        if static and batch_size is not None and max_cache_length is not None:
            rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            model_kwargs[CACHE_NAME] = BMojoCache(self.config, rows, device=self.device, dtype=self.dtype,
                                                  max_length=max_cache_length + 1)
        else:
            model_kwargs[CACHE_NAME] = BMojoCache(self.config)

    @staticmethod
    def create_masks_for_generate(config=None, inputs_embeds=None, attention_mask=None, *args, **kwargs):
        """The 2D padding mask, unchanged. generate() turns it into per-layer-type 4D masks when the cache is
        compileable; bmojo builds its own from the 2D mask, and transformers' mask functions know only some of
        its layer types (5.4 raises on ``mamba``; later releases build 4D masks for ``sliding_attention``)."""
        return attention_mask

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """Compile the decoding step when the cache is compileable (allocated at its final size) and either a
        ``compile_config`` was given (any device) or the model is on a GPU (transformers' default)."""
        if generation_config.disable_compile:
            return False
        cache = model_kwargs.get(CACHE_NAME)
        if not isinstance(cache, BMojoCache) or not cache.is_compileable:
            return False
        return generation_config.compile_config is not None or self.device.type in ("cuda", "xpu")

    def get_compiled_call(self, compile_config=None):
        """What ``generate()`` calls when it compiles: decoding steps run one compiled graph per
        (batch size, dtype, device); the prompt and anything else run the eager forward."""
        decoding = getattr(self, "_compiled_decoding", None)
        if decoding is None or decoding.compile_config != compile_config:
            decoding = self._compiled_decoding = CompiledDecoding(self, compile_config)
        return decoding

    def decode_step(self, input_ids: torch.Tensor, cache: BMojoCache) -> torch.Tensor:
        """One decoding step for every row, tensor operations only: input_ids (b, 1) -> logits (b, 1, V).
        The state is updated in place and ``cache`` advanced. This is what :class:`CompiledDecoding`
        compiles; it needs a cache allocated at its final size (``BMojoCache(..., max_length=...)``)."""
        logits = _static_step(self, input_ids, cache)
        cache.seen_tokens += 1
        return logits


def _static_step(model: BMojoForCausalLM, input_ids: torch.Tensor, cache: BMojoCache) -> torch.Tensor:
    """The decoding step with no host value in it: positions, the full-attention slot and chunk
    starts are tensors (so one graph serves every step), every state update is in place."""
    m, c = model.model, model.config
    x = m.embed_tokens(input_ids[:, 0])
    t = cache.positions
    rope_evicted = m._rope(x, (t - c.sliding_window)[:, None]) if m._fading_rope else None
    ctx = StepContext(t=t, seen=cache.kv_slot, rope=m._rope(x, t[:, None]), rope_evicted=rope_evicted, boundary=None)
    for layer, state in zip(m.layers, cache.layer_states):
        x, _ = layer.step(x, ctx, state)
    logits = model.lm_head(m.norm(x).to(model.lm_head.weight.dtype))[:, None]
    cache.positions.add_(1)
    cache.kv_slot.add_(1)
    return logits


class CompiledDecoding:
    """Decoding steps through ``torch.compile`` (inductor; with ``mode="reduce-overhead"`` on a GPU,
    CUDA graphs), used by ``generate()`` through transformers' ``compile_config`` and callable directly.

    One graph serves every step of a given (batch size, dtype, device): the step reads no host value
    (see :func:`_static_step`) and the cache's tensors keep their addresses. ``compiles`` counts the
    graphs built (recompilations included); ``compile_seconds`` the time spent building them. If
    compilation fails, decoding continues eagerly after one warning."""

    def __init__(self, model: BMojoForCausalLM, compile_config=None):
        self.model = model
        self.compile_config = compile_config
        self.compiles = 0
        self.compile_seconds = 0.0
        self.failed: str | None = None
        self._fn = None

    def _backend(self, gm, example_inputs):
        import time

        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        t0 = time.perf_counter()
        cfg = self.compile_config
        mode = getattr(cfg, "mode", None) if cfg is not None else None
        if mode == "reduce-overhead" and self.model.device.type != "cuda":
            mode = None  # CUDA graphs exist on GPUs only
        patches = dict(list_mode_options(mode)) if mode else {}
        patches.update(getattr(cfg, "options", None) or {})
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        self.compile_seconds += time.perf_counter() - t0
        return compiled

    def step(self, input_ids: torch.Tensor, cache: BMojoCache) -> torch.Tensor:
        """input_ids (b, 1) -> logits (b, 1, V), compiled (eager after a failed compilation)."""
        if not cache.is_compileable:
            raise ValueError("CompiledDecoding: the cache must be allocated at its final size "
                             "(BMojoCache(config, batch_size, device=..., dtype=..., max_length=...))")
        if self.failed is None and self._fn is None:
            if cache.positions.device.type == "cuda":  # CUDA graphs replay these buffers in place
                for state in cache.layer_states:
                    for x in _state_tensors(state):
                        torch._dynamo.mark_static_address(x)
                for x in (cache.positions, cache.kv_slot):
                    torch._dynamo.mark_static_address(x)
            # a code object of its own: torch.compile's per-code cache (and its recompile limit) then holds this
            # model's graphs only, however many models a process decodes with
            step = types.FunctionType(_static_step.__code__.replace(), _static_step.__globals__, "_static_step")
            self._fn = torch.compile(step, backend=self._backend, fullgraph=True, dynamic=False)
        if self.failed is None:
            try:
                logits = self._fn(self.model, input_ids, cache)
                cache.seen_tokens += 1
                return logits
            except Exception as e:  # noqa: BLE001 - any compiler failure: warn once, decode eagerly
                if not _is_compile_failure(e):
                    raise
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                import warnings

                warnings.warn(f"bmojo: torch.compile of the decoding step failed ({self.failed}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
        return self.model.decode_step(input_ids, cache)

    def __call__(self, input_ids=None, cache=None, past_key_values=None, **kwargs):
        """generate()'s forward: decoding steps compiled, the rest (the prompt) eager."""
        cache = take_cache(cache, past_key_values, "CompiledDecoding")
        plain = not any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "labels"))
        if (plain and isinstance(cache, BMojoCache) and cache.is_allocated and cache.seen_tokens > 0
                and input_ids is not None and input_ids.shape[1] == 1 and kwargs.get("inputs_embeds") is None):
            logits = self.step(input_ids, cache)
            return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})
        return self.model(input_ids=input_ids, cache=cache, **kwargs)


def _state_tensors(state) -> list[torch.Tensor]:
    out = []
    for _, value in state._fields():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif hasattr(value, "_fields"):
            out.extend(_state_tensors(value))
    return out


def _is_compile_failure(e: Exception) -> bool:
    """Errors from the compiler stack (dynamo, inductor, a missing C++ toolchain), not from the model."""
    module = type(e).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx", "torch._subclasses")) or isinstance(
        e, (OSError, ImportError, NotImplementedError))


__all__ = ["BMojoPreTrainedModel", "BMojoModel", "BMojoForCausalLM"]
