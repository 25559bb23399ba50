"""The torch backend: the implementations that run on any device (and the fallback everywhere).

Each fast implementation lives beside its naive reference (``bmojo/ops/<op>/naive.py``, the oracle):
a chunked scan, a K-tap depthwise conv, block-sparse attention and a decode step without kv repeats; never a (T, T) mask or a loop over T.
"""
from .attention.blocksparse import bmojo_attention_blocksparse
from .attention.decode import attention_decode_torch
from .causal_conv1d.torch_conv import causal_conv1d_torch, causal_conv1d_update_torch
from .innovation.chunk import innovation_scores_inplace, innovation_select_chunked, merge_memory
from .selective_scan.chunk import selective_scan_chunked, selective_state_update_step

OPS = {
    "selective_scan": selective_scan_chunked,
    "selective_state_update": selective_state_update_step,
    "causal_conv1d": causal_conv1d_torch,
    "causal_conv1d_update": causal_conv1d_update_torch,
    "bmojo_attention": bmojo_attention_blocksparse,
    "attention_decode": attention_decode_torch,
    "innovation_select": innovation_select_chunked,
    "innovation_scores": innovation_scores_inplace,
    "merge_memory": merge_memory,
}
