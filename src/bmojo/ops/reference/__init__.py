"""The naive oracles of every op: readable, slow, self-contained (one module per op, sharing no code with
each other or with any backend), the contract every backend is tested against. ``bmojo.ops`` re-exports
them with a ``_ref`` suffix (``bmojo.ops.selective_scan_ref``, ...)."""
from .attention import (
    attention_decode_ref,
    attention_decode_weights_ref,
    bmojo_attention_ref,
    bmojo_attention_weights_ref,
    bmojo_visibility_masks,
)
from .causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from .innovation import innovation_scores_ref, innovation_select_ref, select_from_scores_ref
from .selective_scan import selective_scan_ref, selective_state_update_ref
from .ssd_scan import ssd_scan_ref, ssd_state_update_ref

__all__ = [
    "selective_scan_ref", "selective_state_update_ref", "causal_conv1d_ref", "causal_conv1d_update_ref",
    "bmojo_attention_ref", "bmojo_attention_weights_ref", "attention_decode_ref", "attention_decode_weights_ref",
    "bmojo_visibility_masks", "innovation_scores_ref", "innovation_select_ref", "select_from_scores_ref",
    "ssd_scan_ref", "ssd_state_update_ref",
]
