"""The cuda backend's selective scan: ``chunk`` (scan, forward and backward), ``fused_recurrent`` (one step)."""
from .chunk import SelectiveScanFn, selective_scan
from .fused_recurrent import selective_state_update

__all__ = ["SelectiveScanFn", "selective_scan", "selective_state_update"]
