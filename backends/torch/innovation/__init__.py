"""The torch backend's eidetic selection: ``parallel`` (innovation scores of every position), ``chunk``
(selection merged chunk by chunk), ``fused_recurrent`` (one merge of the memory with new candidates)."""
from .chunk import innovation_select_chunked
from .fused_recurrent import merge_memory
from .parallel import innovation_scores_inplace

__all__ = ["innovation_scores_inplace", "innovation_select_chunked", "merge_memory"]
