"""The torch backend: the implementations that run on any device (and the fallback everywhere)."""
from .attention.naive import attention_decode_ref, bmojo_attention_ref
from .causal_conv1d.naive import causal_conv1d_ref, causal_conv1d_update_ref
from .innovation.chunk import innovation_select_chunked
from .selective_scan.naive import selective_scan_ref, selective_state_update_ref

OPS = {
    "selective_scan": selective_scan_ref,
    "selective_state_update": selective_state_update_ref,
    "causal_conv1d": causal_conv1d_ref,
    "causal_conv1d_update": causal_conv1d_update_ref,
    "bmojo_attention": bmojo_attention_ref,
    "attention_decode": attention_decode_ref,
    "innovation_select": innovation_select_chunked,
}
