"""The cuda backend's SSD scan (Mamba-2): ``chunk`` (chunked scan, forward and backward), ``fused_recurrent``
(one step)."""
from .chunk import SSDScanFn, ssd_scan
from .fused_recurrent import ssd_state_update

__all__ = ["SSDScanFn", "ssd_scan", "ssd_state_update"]
