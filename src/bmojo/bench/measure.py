"""Timing, peak memory and table helpers for benchmarks (figures are measured, never asserted)."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
import threading
import time
import warnings

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


class _Tally(logging.Filter):
    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record):
        self.count += 1
        return True


@contextlib.contextmanager
def library_messages_to(path: str):
    """Inside the block, Python warnings (transformers' deprecations, torch's, bmojo's fallbacks) and
    transformers' log records go to the file ``path`` (appended), not to the console; transformers'
    progress bars are off. Yields a tally whose ``.count`` is the number of messages written. Everything
    is restored on exit."""
    from transformers.utils import logging as hf_logging

    fh = open(path, "a", encoding="utf-8")
    tally = _Tally()
    handler = logging.StreamHandler(fh)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S"))
    handler.addFilter(tally)
    root = hf_logging.get_logger()  # transformers' library logger, configured
    default = getattr(hf_logging, "_default_handler", None)
    had_default, propagate = default in root.handlers, root.propagate
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the log gets transformers' warnings even where they were silenced
    if had_default:
        root.removeHandler(default)
    root.addHandler(handler)
    root.propagate = False  # not to the root logger either (transformers propagates when CI is set)
    if bars:
        hf_logging.disable_progress_bar()

    def show(message, category, filename, lineno, file=None, line=None):
        tally.count += 1
        fh.write(f"{time.strftime('%H:%M:%S')} {category.__name__} [{filename}:{lineno}] {message}\n")
        fh.flush()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once per place it is raised
            warnings.showwarning = show
            yield tally
    finally:
        root.removeHandler(handler)
        if had_default:
            root.addHandler(default)
        root.propagate = propagate
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        fh.close()


def load_average() -> str | None:
    """The 1, 5 and 15 minute load averages of /proc/loadavg ("0.12 0.30 0.41"), None where unreadable."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return None


def _sig(v: float) -> str:
    """Three significant digits at most and never scientific notation: 591, 37.1, 2.0, 0.45."""
    a = abs(v)
    if a >= 99.95:
        return f"{v:.0f}"
    if a >= 0.9995:
        return f"{v:.1f}"
    if a == 0 or a != a:
        return f"{v:g}"
    decimals = 1 - math.floor(math.log10(a))  # two significant digits below 1
    return f"{v:.{decimals}f}"


def human_count(v: float | None) -> str:
    """A rate or count for people: 37.1k, 131k, 4.8k, 612, 1.2M (no scientific notation)."""
    if v is None:
        return ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale * 0.9995:
            return _sig(v / scale) + suffix
    return _sig(v)


def human_seconds(s: float | None) -> str:
    """A duration for people: 2.0 ms, 412 µs, 1.6 s, 3 min 20 s."""
    if s is None:
        return ""
    if s == 0:
        return "0 s"
    if s >= 120:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    if s >= 0.9995:
        return f"{_sig(s)} s"
    if s >= 0.9995e-3:
        return f"{_sig(s * 1e3)} ms"
    return f"{_sig(s * 1e6)} µs"


def human_mib(mib: float | None) -> str:
    """A size given in MiB, for people: 591 MiB, 11.4 MiB, 3.8 GiB, 91.5 KiB."""
    if mib is None:
        return ""
    n = mib * 2**20
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale * 0.9995:
            return f"{_sig(n / scale)} {unit}"
    return f"{n:.0f} B"


def format_table(rows: list[dict], columns: list[str] | None = None, formats: dict | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table. ``formats`` maps a column to a function of its value
    (e.g. :func:`human_count`); other floats get 4 significant digits, without scientific notation
    from 10^4 up."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    formats = formats or {}

    def fmt(c, v):
        if c in formats:
            return formats[c](v)
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
