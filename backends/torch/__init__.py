"""bmojo's torch backend: plain PyTorch on any device, the default and the fallback of every other backend
(docs/design.md, "Op API and backends"). Written for CPU speed: a chunked scan, a K-tap depthwise conv,
block-sparse attention and a decode step without kv repeats; never a (T, T) mask or a loop over T.

One folder per op, one file per form (chunk: chunked over T; parallel: all T at once; fused_recurrent:
one token; decode: one query over a cache):

* ``selective_scan/``: ``chunk`` (scan forward and hand-written backward), ``fused_recurrent`` (step);
* ``ssd_scan/``: ``chunk`` (Mamba-2 scan in the chunked matrix form, autograd), ``fused_recurrent`` (step);
* ``causal_conv1d/``: ``parallel`` (K shifted multiply-adds), ``fused_recurrent`` (step);
* ``attention/``: ``parallel`` (block-sparse B'MOJO attention), ``decode`` (one query over a cache);
* ``innovation/``: ``parallel`` (scores), ``chunk`` (selection, merged chunk by chunk),
  ``fused_recurrent`` (one merge of the memory).

``OPS`` maps each op to one implementation for every device, or to a table by device type
(``torch.device.type``, with ``"default"`` for the others), which ``bmojo.ops.registry`` resolves: the
device-specific choices are made here, never inside an implementation.
"""
from .attention import attention_decode_torch, bmojo_attention_blocksparse, bmojo_attention_gathered
from .causal_conv1d import causal_conv1d_torch, causal_conv1d_update_torch
from .innovation import innovation_scores_inplace, innovation_select_chunked, merge_memory
from .selective_scan import selective_scan_chunked, selective_scan_chunked_exp, selective_state_update_step
from .ssd_scan import ssd_scan_chunked, ssd_state_update_step

OPS = {
    # exp2 decays on CPU (about twice as fast as exp there); exp elsewhere (torch-xla does not lower exp2:
    # it would run on the host)
    "selective_scan": {"cpu": selective_scan_chunked, "default": selective_scan_chunked_exp},
    "selective_state_update": selective_state_update_step,
    "causal_conv1d": causal_conv1d_torch,
    "causal_conv1d_update": causal_conv1d_update_torch,
    # the banded kernel reads overlapping unfold views, cheap on CPU and CUDA; XLA / Neuron run unfold on
    # the host, so the other devices get the gathering kernel
    "bmojo_attention": {"cpu": bmojo_attention_blocksparse, "cuda": bmojo_attention_blocksparse,
                        "default": bmojo_attention_gathered},
    "attention_decode": attention_decode_torch,
    "innovation_select": innovation_select_chunked,
    "innovation_scores": innovation_scores_inplace,
    "merge_memory": merge_memory,
    "ssd_scan": ssd_scan_chunked,
    "ssd_state_update": ssd_state_update_step,
}

__all__ = ["OPS"]
