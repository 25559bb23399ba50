"""The torch backend's selective scan: ``chunk`` (the chunked scan, exp2 or exp decays), ``fused_recurrent``
(one decoding step)."""
from .chunk import selective_scan_chunked, selective_scan_chunked_exp
from .fused_recurrent import selective_state_update_step

__all__ = ["selective_scan_chunked", "selective_scan_chunked_exp", "selective_state_update_step"]
