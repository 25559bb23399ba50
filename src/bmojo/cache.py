"""Fixed-size recurrent state for generation (SPEC 1.3), held in transformers' cache API.

Each layer keeps a small dict of batch-first tensors. Only ``attention`` layers grow (their KV
cache); every other layer type costs the same per token at position 100 and 100,000:

=================== ===========================================================================
mamba               conv (b, d_inner, d_conv-1), ssm (b, d_inner, N) fp32
sliding_attention   window ring of keys/values (b, w, Hkv, D)
bmojo_f             mamba + window ring + fading ring (b, m_f, Hkv, D), and for the window's tokens
                    whichever is smaller: their SSM outputs (b, w, d), projected to fading keys/values
                    as they leave the window, or those keys/values (b, w, Hkv, D) x 2, projected on
                    arrival (:func:`fading_keeps_ssm_outputs`)
bmojo               bmojo_f + the last ``taps`` SSM outputs, the window's innovation scores (b, w), and
                    ``m_e`` memory slots (key, value, eps, position) for this chunk and for the next
                    (selected from the window ring when this chunk begins, so no candidate ring)
attention           growing keys/values (b, S, Hkv, D)
=================== ===========================================================================

A ring slot ``j`` of size ``n`` holds, after position ``t``, the latest position p <= t with
p % n == j, i.e. p = t - ((t - j) mod n).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class LayerState:
    """One layer's state: named batch-first tensors plus the number of tokens seen."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_type: str):
        self.layer_type = layer_type
        self.tensors: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _map(self, fn) -> None:
        self.tensors = {k: fn(v) for k, v in self.tensors.items()}

    def reset(self) -> None:
        self.tensors = {}
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])


def ring_positions(t: torch.Tensor, size: int) -> torch.Tensor:
    """Positions held by the ``size`` slots of a ring after position t (b,) -> (b, size); negative = empty."""
    j = torch.arange(size, device=t.device)
    t = t[:, None]
    return t - torch.remainder(t - j, size)


def fading_keeps_ssm_outputs(config) -> bool:
    """Whether a fading layer's decoder keeps the window's SSM outputs f (d floats per token) rather than
    their fading keys and values (2 Hkv D): the smaller of the two (f when d <= 2 Hkv D, as without GQA)."""
    return config.hidden_size <= 2 * config.num_key_value_heads * config.head_dim


class BMojoCache(Cache):
    """The per-layer recurrent states of a bmojo model; created by ``generate()`` or by the model
    when ``use_cache=True`` and none is given. ``get_seq_length()`` counts the tokens consumed."""

    is_compileable = False

    def __init__(self, config):
        self.config = config
        # Per row, the position of the next token in that row's own frame (padding excluded).
        self.positions: torch.Tensor | None = None
        # A padded prompt's (first token, number of tokens) per row, in the caller's layout; None if unpadded.
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(layers=[LayerState(t) for t in config.layer_types])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen_tokens if self.layers else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.get_seq_length(layer_idx or 0) > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [t != "attention" for t in self.config.layer_types]

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def reset(self) -> None:
        self.positions = self.prompt = None
        for layer in self.layers:
            layer.reset()

    def _map_rows(self, fn) -> None:
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.prompt is not None:
            self.prompt = tuple(fn(x) for x in self.prompt)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda x: x.index_select(0, beam_idx.to(x.device)))
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda x: x.repeat_interleave(repeats, dim=0))
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda x: x[indices])
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def crop(self, max_length: int) -> None:
        raise RuntimeError(
            "BMojoCache cannot be cropped: recurrent (SSM) and ring-buffer states cannot be rewound; "
            "re-run the prompt instead (assisted decoding / contrastive search are not supported)."
        )

    def state_nbytes(self) -> list[int]:
        """Bytes held by each layer's state (constant in T for every type but ``attention``)."""
        return [layer.nbytes() for layer in self.layers]

    def __repr__(self) -> str:
        return f"BMojoCache(seen_tokens={self.get_seq_length()}, layers={[l.layer_type for l in self.layers]})"
