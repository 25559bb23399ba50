"""The torch backend's SSD scan (Mamba-2): ``chunk`` (the chunked matrix form), ``fused_recurrent`` (one
decoding step)."""
from .chunk import ssd_scan_chunked
from .fused_recurrent import ssd_state_update_step

__all__ = ["ssd_scan_chunked", "ssd_state_update_step"]
