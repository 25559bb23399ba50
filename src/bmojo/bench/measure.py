"""Timing, peak memory and table helpers for benchmarks (figures are measured, never asserted)."""
from __future__ import annotations

import functools
import os
import platform
import threading
import time

import torch


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_freed_heap() -> None:
    """Make freed CPU memory leave the resident set, so a peak-RSS reading sees this block's allocations.

    glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), after which freed
    tensors stay in the heap and are reused without growing the resident set: a forward run after an
    evaluation of a larger batch then reads as ~0 MiB. A low threshold (``mallopt``) puts large tensors
    in their own mappings, returned on free; ``malloc_trim`` releases what the heap holds now. No-op
    where glibc is not the allocator.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)


def _restore_heap_reuse() -> None:
    """After a measurement: large blocks back in the heap (the threshold glibc's dynamic rule reaches,
    32 MiB), so later timings do not pay a page fault per tensor."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory added while the ``with`` block runs, in bytes (``.peak``). Measure one call, not a
    timed loop: on CPU the allocator is set to return memory on free while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU (Linux): the kernel's
    peak resident set size (VmHWM, reset at entry) above the resident size at entry; where the mark
    cannot be reset, the resident size sampled every millisecond. Elsewhere ``.peak`` stays None and
    ``.method`` says so.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.peak: int | None = None
        self.method = "cuda_max_allocated" if self.device.type == "cuda" else "peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_heap()
        self._base = _rss_bytes()
        self._thread = None
        if self._base is None:
            self.method = "unavailable (no /proc/self/statm)"
        elif not _reset_peak_rss():
            self.method = "rss_sampled"
            self._max = self._base
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._max = max(self._max, _rss_bytes() or 0)
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes() or 0) - self._base
        elif self._base is not None:
            self.peak = max((_peak_rss_bytes() or 0) - self._base, 0)
        if self.device.type != "cuda":
            _restore_heap_reuse()
        return False


def time_call(fn, warmup: int = 1, repeat: int = 3, device: torch.device | str = "cpu", clock=time.perf_counter) -> float:
    """Median time of ``fn()`` in seconds after ``warmup`` calls: wall time by default; pass
    ``clock=time.process_time`` for CPU time, which other processes on a shared machine do not inflate
    (meaningful with one torch thread)."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    times.sort()
    return times[len(times) // 2]


def machine_description() -> str:
    """One line naming the machine: CPU model, cores, torch threads, GPU if any, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
