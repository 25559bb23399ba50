"""Measurement helpers shared by the CLI and benchmarks/: timers, peak memory, tables."""
from .measure import PeakMemory, format_table, machine_description, time_call

__all__ = ["PeakMemory", "format_table", "machine_description", "time_call"]
