"""``bmojo bench``: every shipped checkpoint x every backend that runs here, side by side.

For each model and backend: prefill tokens/s, decode tokens/s and peak memory against context length,
and the recall accuracy of the MQAR checkpoints. transformers' own ``MambaForCausalLM`` and
``LlamaForCausalLM`` run on the same weights (of the mamba and transformer checkpoints) in the same
run, as baselines. Writes a markdown table, CSV, JSON, PNG plots and a log (bench.log) of every warning
and transformers log message raised while measuring.

The protocol (:func:`run_bench`): every model is loaded first (all backends, all baselines). At each
context, every timed figure of every subject (prefill; decode; compiled decode with ``compile``) runs
once untimed (the warm-up: one-time costs such as first-call allocations, lazy imports and kernel
selection land there), its peak memory is measured on one more untimed forward, then the subjects take
turns in ``rounds`` rounds: in each round every subject is timed once per figure, the order rotated
by one each round. A figure is the median over the rounds, with the min-max; a ratio against a baseline
is the median of the per-round ratios (ours and theirs timed in the same round, so slow drifts in the
machine's speed cancel).
"""
from __future__ import annotations

import csv
import gc
import io
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import ops
from ..hf_compat import cache_kwarg, output_cache
from .measure import (PeakMemory, format_table, human_count, human_mib, human_seconds, library_messages_to,
                      load_average, machine_description)

COLUMNS = ["model", "impl", "backend", "context",
           "prefill_tok_s", "prefill_tok_s_min", "prefill_tok_s_max",
           "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max",
           "compiled_decode_tok_s", "compiled_decode_tok_s_min", "compiled_decode_tok_s_max", "compile_s",
           "peak_mib", "state_kib", "mqar_acc", "memory_floats"]
LOG_NAME = "bench.log"
MEMORY_READINGS = 3  # peak memory is the least of this many readings of one untimed forward


@dataclass
class BenchSettings:
    checkpoints: str | None = None
    models: list[str] | None = None
    backends: list[str] | None = None
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    batch: int = 1
    dtype: str = "float32"
    threads: int | None = None
    decode_tokens: int = 32
    rounds: int = 5  # every subject timed once per round; figures are medians over the rounds
    baselines: bool = True
    output: str = "bench_out"
    check_memory: bool = True  # refuse points whose estimated memory exceeds what is available (bench.memory)
    compile: bool = False  # also time decoding through CompiledDecoding (torch.compile; compile time reported apart)


QUICK = dict(contexts=[1024, 2048], decode_tokens=64, rounds=7)


class BenchResult(list):
    """The rows of a run (a list of dicts), with ``conditions``: the machine, the load before and after,
    the CPU time other processes used during the run, the wall time and the log's path."""

    conditions: dict

    def __init__(self, rows=(), conditions: dict | None = None):
        super().__init__(rows)
        self.conditions = conditions or {}


def default_checkpoint_dir() -> str:
    """The repository's checkpoints/ (editable install), else ./checkpoints."""
    here = os.path.dirname(os.path.abspath(__file__))
    for up in (os.path.join(here, "..", "..", ".."), os.getcwd()):
        path = os.path.normpath(os.path.join(up, "checkpoints"))
        if os.path.isdir(path):
            return path
    raise FileNotFoundError("bmojo bench: no checkpoints/ directory found; pass --checkpoints DIR")


def shipped_checkpoints(root: str) -> dict[str, str]:
    """{name: path} of the checkpoints under ``root`` that carry weights."""
    found = {d: os.path.join(root, d) for d in sorted(os.listdir(root))
             if os.path.isfile(os.path.join(root, d, "model.safetensors"))}
    if not found:
        raise FileNotFoundError(f"bmojo bench: no checkpoint with model.safetensors under {root}")
    return found


def _device_for(backend: str) -> torch.device:
    if backend == "cuda" and torch.cuda.is_available():
        return torch.device("cuda")
    if backend == "neuron":
        import torch_xla.core.xla_model as xm  # only reachable when the neuron backend is available

        return xm.xla_device()
    return torch.device("cpu")


def runnable_backends(requested: list[str] | None) -> list[str]:
    """torch always; cuda with a GPU and Triton; neuron on a Neuron device. Requested but unavailable
    backends are reported, not silently dropped."""
    candidates = requested or ["torch", "cuda", "neuron"]
    out = []
    for name in candidates:
        device = "cuda" if name == "cuda" else ("xla" if name == "neuron" else "cpu")
        if name == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
        elif name in ops.available_backends(device):
            out.append(name)
            continue
        else:
            reason = f"not available on {device}"
        if requested:
            raise SystemExit(f"bmojo bench: backend {name!r} cannot run here ({reason})")
        print(f"bmojo bench: skipping backend {name!r}: {reason}", file=sys.stderr)  # stdout: the table (or --json)
    return out


def mqar_accuracy(model, ckpt_dir: str) -> float | None:
    """Recall accuracy on the checkpoint's fixed MQAR evaluation set (eval.json, as ``bmojo train``
    writes it), or None for checkpoints that are not MQAR-trained."""
    path = os.path.join(ckpt_dir, "eval.json")
    if not os.path.isfile(path):
        return None
    from ..data import MQARConfig, evaluate

    with open(path) as fh:
        data = MQARConfig.from_dict(json.load(fh)["eval_data"]).generate()
    return evaluate(model, data.inputs, data.labels, batch_size=64)["accuracy"]


def _mqar_length(ckpt_dir: str) -> int:
    path = os.path.join(ckpt_dir, "mqar.json")
    if os.path.isfile(path):
        with open(path) as fh:
            return int(json.load(fh).get("seq_len", 256))
    return 256


def _twin_kind(config) -> str | None:
    """Which transformers twin :func:`bmojo.bench.baselines.hf_baseline` builds for ``config``."""
    types = set(config.layer_types)
    if types == {"mamba"} and config.intermediate_size == 0:
        return "mamba"
    if types == {"attention"} and config.rope_theta is not None:
        return "llama"
    return None


def check_memory(ckpts: dict[str, str], backends: list[str], settings: BenchSettings, dtype: torch.dtype) -> None:
    """Refuse, before anything is allocated, every point whose estimated memory
    (:func:`bmojo.bench.memory.estimate_point_nbytes`, plus the weights of every other model the run
    holds on that device at the same time) exceeds what its device has available; the message names
    the model, backend and context, the estimate and the memory available."""
    from ..configuration_bmojo import BMojoConfig
    from ..presets import param_count
    from .memory import _elem, available_nbytes, estimate_point_nbytes, human_bytes

    configs = {}
    for name, path in ckpts.items():
        try:
            configs[name] = BMojoConfig.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            continue  # not a bmojo config: loading it reports the problem
    held: dict[str, int] = {}  # device -> weights of every model (and twin) loaded on it at once
    for i, backend in enumerate(backends):
        dev = "cuda" if backend == "cuda" else ("xla" if backend == "neuron" else "cpu")
        for name, config in configs.items():
            twin = settings.baselines and i == 0 and _twin_kind(config) is not None
            held[dev] = held.get(dev, 0) + param_count(config) * _elem(dtype) * (2 if twin else 1)
    too_big = []
    for backend in backends:
        if backend == "neuron":
            continue  # device memory is not queryable through torch here
        dev = "cuda" if backend == "cuda" else "cpu"
        avail, source = available_nbytes(dev)
        if avail is None:
            continue
        for name, config in configs.items():
            twin = _twin_kind(config) if settings.baselines and backend == backends[0] else None
            for ctx in settings.contexts:
                est = estimate_point_nbytes(config, ctx, settings.batch, dtype, settings.decode_tokens, twin)
                others = held.get(dev, 0) - est["weights"]
                total = est["total"] + others
                if total > avail:
                    parts = (f"weights {human_bytes(est['weights'])}, forward activations {human_bytes(est['forward'])}, "
                             f"decoding state {human_bytes(est['state'])}"
                             + (f", transformers' twin's forward {human_bytes(est['twin_forward'])}" if twin else "")
                             + (f", the other models' weights {human_bytes(others)}" if others > 0 else ""))
                    too_big.append(f"context {ctx} ({name}, backend {backend}, batch {settings.batch}, "
                                   f"{settings.dtype}) needs about {human_bytes(total)} ({parts}) but "
                                   f"{human_bytes(avail)} is available ({source})")
    if too_big:
        shown = too_big[:5] + ([f"... and {len(too_big) - 5} more"] if len(too_big) > 5 else [])
        raise SystemExit("bmojo bench: refusing points that cannot fit in memory:\n  " + "\n  ".join(shown)
                         + "\nchoose smaller --contexts (or --batch, or fewer --models), or pass --no-memory-check "
                         "to try anyway")


# -- timing ------------------------------------------------------------------------------------------------

@dataclass
class _Subject:
    """One thing timed: a bmojo model on a backend, or transformers' twin of one."""

    name: str
    impl: str  # "bmojo" or "hf-<class>"
    backend: str  # bmojo's backend, or "transformers"
    vs_backend: str  # the bmojo backend a twin is compared with (its own backend for bmojo)
    model: Any
    device: torch.device
    acc: float | None
    budget: float
    compiled: Any = None  # CompiledDecoding (settings.compile, bmojo models)

    @property
    def ours(self) -> bool:
        return self.impl == "bmojo"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_prefill(s: _Subject, ids: torch.Tensor) -> float:
    """Seconds of one forward pass over the prompt, without a cache."""
    _sync(s.device)
    t0 = time.perf_counter()
    s.model(ids, use_cache=False)
    _sync(s.device)
    return time.perf_counter() - t0


def _time_decode(s: _Subject, ids: torch.Tensor, n_tokens: int) -> tuple[float, int | None]:
    """Seconds of ``n_tokens`` greedy decoding steps after an untimed prefill of ``ids`` and one untimed
    step; and the decoding state's bytes (bmojo's cache; None for transformers' models)."""
    if s.ours:
        out = s.model(ids, use_cache=True)
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)

        def step(tok):
            return s.model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    else:
        name = cache_kwarg(s.model)
        out = s.model(ids, use_cache=True)
        kw = {name: getattr(out, name)}
        nxt = out.logits[:, -1:].argmax(-1)

        def step(tok):
            return s.model(tok, use_cache=True, **kw).logits[:, -1:].argmax(-1)
    nxt = step(nxt)
    _sync(s.device)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        nxt = step(nxt)
    _sync(s.device)
    seconds = time.perf_counter() - t0
    state = cache.state_nbytes() if s.ours and hasattr(cache, "state_nbytes") else None
    return seconds, (sum(state) if state is not None else None)


def _time_compiled_decode(s: _Subject, ids: torch.Tensor, n_tokens: int, max_length: int) -> float:
    """As :func:`_time_decode`, the steps through ``CompiledDecoding`` on a cache allocated at
    ``max_length`` (one size for every context: one graph per model)."""
    from ..cache import BMojoCache

    cache = BMojoCache(s.model.config, ids.shape[0], device=s.device, dtype=s.model.dtype, max_length=max_length)
    nxt = s.model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    nxt = s.compiled.step(nxt, cache).argmax(-1)
    _sync(s.device)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        nxt = s.compiled.step(nxt, cache).argmax(-1)
    _sync(s.device)
    return time.perf_counter() - t0


def _spread(rates: list[float]) -> tuple[float, float, float]:
    return statistics.median(rates), min(rates), max(rates)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f[:8]) - idle, sum(f[:8])


def _own_cpu_seconds() -> float:
    return time.process_time()  # this process, every thread, user + system


def _load_subjects(ckpts, backends, settings, dtype, bar) -> list[_Subject]:
    from transformers import AutoModelForCausalLM

    from ..presets import recall_memory_floats
    from .baselines import hf_baseline

    subjects = []
    for name, path in ckpts.items():
        for backend in backends:
            device = _device_for(backend)
            model = AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=dtype).eval()
            model.config.backend = backend
            acc = mqar_accuracy(model, path)
            # the recall study's x-axis (benchmarks/mqar.py): floats of state per layer at MQAR's length
            budget = recall_memory_floats(model.config, _mqar_length(path))
            ours = _Subject(name, "bmojo", backend, backend, model, device, acc, budget)
            if settings.compile:
                from ..modeling_bmojo import CompiledDecoding

                ours.compiled = CompiledDecoding(model)
            subjects.append(ours)
            if settings.baselines and backend == backends[0]:
                twin = hf_baseline(model)
                if twin is not None:
                    subjects.append(_Subject(name, f"hf-{type(twin).__name__}", "transformers", backend,
                                             twin.to(device), device, acc, budget))
            bar.update(1)
    return subjects


def _rounds(subjects: list[_Subject], prompt: dict, figures: dict, settings: BenchSettings, max_length: int,
            bar) -> None:
    """``settings.rounds`` rounds; in each, every subject is timed once per figure, the first to go rotating."""
    n = settings.decode_tokens
    for r in range(settings.rounds):
        k = r % len(subjects)
        for s in subjects[k:] + subjects[:k]:
            f = figures[id(s)]
            f["prefill"].append(_time_prefill(s, prompt[id(s)]))
            f["decode"].append(_time_decode(s, prompt[id(s)], n)[0])
            if s.compiled is not None:
                f["compiled_decode"].append(_time_compiled_decode(s, prompt[id(s)], n, max_length))
        bar.update(1)


def _measure_context(subjects: list[_Subject], ctx: int, settings: BenchSettings, max_length: int, bar) -> list[dict]:
    """One context: a warm-up of every figure, peak memory, a second warm-up, then the rounds."""
    n = settings.decode_tokens
    gen = torch.Generator().manual_seed(ctx)
    ids = {}
    for s in subjects:
        key = (s.model.config.vocab_size, s.device)
        if key not in ids:
            ids[key] = torch.randint(0, key[0], (settings.batch, ctx), generator=gen).to(s.device)
    prompt = {id(s): ids[(s.model.config.vocab_size, s.device)] for s in subjects}
    figures = {id(s): {"prefill": [], "decode": [], "compiled_decode": []} for s in subjects}
    peak, state, compile_s = {}, {}, {}
    with torch.no_grad():
        for s in subjects:  # warm-up: every timed figure once, untimed (one-time costs land here)
            _time_prefill(s, prompt[id(s)])
            _, state[id(s)] = _time_decode(s, prompt[id(s)], n)
            if s.compiled is not None:
                before = s.compiled.compile_seconds, s.compiled.compiles
                _time_compiled_decode(s, prompt[id(s)], n, max_length)
                if s.compiled.compiles > before[1]:  # a graph was built here (blank: the model's graph reused)
                    compile_s[id(s)] = s.compiled.compile_seconds - before[0]
        for s in subjects:  # peak memory: the least of MEMORY_READINGS untimed forwards (allocator slack only adds)
            readings = []
            for _ in range(MEMORY_READINGS):
                with PeakMemory(s.device) as mem:
                    s.model(prompt[id(s)], use_cache=False)
                readings.append(mem.peak)
            peak[id(s)] = None if None in readings else min(readings)
        for s in subjects:  # PeakMemory returned the freed heap to the system: grow it back before timing
            _time_prefill(s, prompt[id(s)])
            _time_decode(s, prompt[id(s)], n)
            if s.compiled is not None:
                _time_compiled_decode(s, prompt[id(s)], n, max_length)
        bar.update(1)
        gc.collect()
        gc.disable()  # as timeit does: no collection pause inside a timed call
        try:
            _rounds(subjects, prompt, figures, settings, max_length, bar)
        finally:
            gc.enable()
    rows = []
    for s in subjects:
        f = figures[id(s)]
        tokens = settings.batch
        pre = _spread([tokens * ctx / t for t in f["prefill"]])
        dec = _spread([tokens * n / t for t in f["decode"]])
        cdec = _spread([tokens * n / t for t in f["compiled_decode"]]) if f["compiled_decode"] else (None,) * 3
        rows.append(dict(
            model=s.name, impl=s.impl, backend=s.backend, context=ctx, batch=settings.batch,
            prefill_tok_s=pre[0], prefill_tok_s_min=pre[1], prefill_tok_s_max=pre[2],
            decode_tok_s=dec[0], decode_tok_s_min=dec[1], decode_tok_s_max=dec[2],
            compiled_decode_tok_s=cdec[0], compiled_decode_tok_s_min=cdec[1], compiled_decode_tok_s_max=cdec[2],
            compile_s=compile_s.get(id(s)),
            peak_mib=None if peak[id(s)] is None else peak[id(s)] / 2**20,
            state_kib=None if state[id(s)] is None else state[id(s)] / 1024, mqar_acc=s.acc,
            memory_floats=s.budget, vs_backend=s.vs_backend, prefill_rounds_s=f["prefill"],
            decode_rounds_s=f["decode"], compiled_decode_rounds_s=f["compiled_decode"] or None))
    return rows


def run_bench(settings: BenchSettings) -> BenchResult:
    """Measure every checkpoint x backend (and transformers' twins) at every context (see the module's
    docstring for the protocol). Warnings and transformers' log messages go to ``<output>/bench.log``."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.rounds < 1 or settings.decode_tokens < 1:
        raise SystemExit("bmojo bench: rounds and decode tokens must be at least 1")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    root = settings.checkpoints or default_checkpoint_dir()
    ckpts = shipped_checkpoints(root)
    if settings.models:
        unknown = [m for m in settings.models if m not in ckpts]
        if unknown:
            raise SystemExit(f"bmojo bench: unknown models {unknown}; shipped: {sorted(ckpts)}")
        ckpts = {m: ckpts[m] for m in settings.models}
    backends = runnable_backends(settings.backends)
    if settings.check_memory:
        check_memory(ckpts, backends, settings, dtype)
    os.makedirs(settings.output, exist_ok=True)
    log_path = os.path.join(settings.output, LOG_NAME)
    with open(log_path, "w") as fh:
        fh.write(f"bmojo bench log: warnings and transformers' messages, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 f"machine: {machine_description()}\nsettings: {json.dumps(asdict(settings))}\n")
    from .measure import _restore_heap_reuse

    _restore_heap_reuse()  # one malloc policy for the whole run (PeakMemory changes it while it measures)
    conditions = dict(machine=machine_description(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                      gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      load_start=load_average(), log=log_path, backends=backends)
    t_start, jiffies, own = time.perf_counter(), _cpu_jiffies(), _own_cpu_seconds()
    max_length = max(settings.contexts) + settings.decode_tokens + 2
    rows = []
    with library_messages_to(log_path) as tally:
        bar = tqdm(total=len(ckpts) * len(backends), desc="bench: loading", unit="model")
        subjects = _load_subjects(ckpts, backends, settings, dtype, bar)
        bar.close()
        bar = tqdm(total=len(settings.contexts) * (settings.rounds + 1), desc="bench: warm-up + rounds", unit="round")
        for ctx in settings.contexts:
            rows += _measure_context(subjects, ctx, settings, max_length, bar)
        bar.close()
    wall = time.perf_counter() - t_start
    end = _cpu_jiffies()
    others = None
    if jiffies is not None and end is not None:
        hz = os.sysconf("SC_CLK_TCK")
        others = max(0.0, (end[0] - jiffies[0]) / hz - (_own_cpu_seconds() - own)) / wall  # cores, on average
    conditions.update(load_end=load_average(), wall_s=wall, other_processes_cores=others, messages=tally.count)
    if settings.compile:
        conditions["compiles"] = {s.name + "/" + s.backend: dict(graphs=s.compiled.compiles,
                                                                 seconds=s.compiled.compile_seconds,
                                                                 failed=s.compiled.failed)
                                  for s in subjects if s.compiled is not None}
    rows.sort(key=lambda r: (r["model"], r["context"], r["impl"] != "bmojo", r["backend"]))
    return BenchResult(rows, conditions)


def ratios(rows: list[dict]) -> list[dict]:
    """Ours vs transformers' twin at each (model, context): for prefill and decode tokens/s the median
    (min, max) of the per-round ratios (both timed in the same round), for peak memory ours / theirs."""
    ours = {(r["model"], r["backend"], r["context"]): r for r in rows if r["impl"] == "bmojo"}
    out = []
    for t in rows:
        if t["impl"] == "bmojo":
            continue
        o = ours.get((t["model"], t.get("vs_backend", "torch"), t["context"]))
        if o is None:
            continue
        entry = dict(model=t["model"], backend=o["backend"], baseline=t["impl"], context=t["context"])
        for fig in ("prefill", "decode"):
            mine, theirs = o.get(f"{fig}_rounds_s"), t.get(f"{fig}_rounds_s")
            if mine and theirs and len(mine) == len(theirs):
                per_round = [b / a for a, b in zip(mine, theirs)]  # tokens/s ratio = their time / our time
                entry[fig] = _spread(per_round)
            else:
                entry[fig] = (o[f"{fig}_tok_s"] / t[f"{fig}_tok_s"],) * 3
        mem = (o["peak_mib"] / t["peak_mib"]) if o.get("peak_mib") and t.get("peak_mib") else None
        entry["peak_memory"] = mem
        out.append(entry)
    return out


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in COLUMNS})
    return buf.getvalue()


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    series = sorted({(r["model"], r["impl"], r["backend"]) for r in rows})

    def label(s):
        return s[0] if s[1] == "bmojo" and s[2] == "torch" else f"{s[0]} [{s[1]}/{s[2]}]"

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in series:
        pts = sorted((r["context"], r) for r in rows if (r["model"], r["impl"], r["backend"]) == s)
        style = "--" if s[1] != "bmojo" else "-"
        for ax, key in zip(axes, ["prefill_tok_s", "decode_tok_s"]):
            xs, ys = [p[0] for p in pts], [p[1][key] for p in pts]
            lo = [y - (p[1].get(f"{key}_min") or y) for y, p in zip(ys, pts)]
            hi = [(p[1].get(f"{key}_max") or y) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, marker="o", capsize=2, label=label(s))
    for ax, title in zip(axes, ["prefill tokens/s (median, min–max over the rounds)",
                                "decode tokens/s after a prompt of that length"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "throughput_vs_context.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s in series:
        pts = sorted((r["context"], r["peak_mib"]) for r in rows if (r["model"], r["impl"], r["backend"]) == s and r["peak_mib"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], "--" if s[1] != "bmojo" else "-", marker="o", label=label(s))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel("peak memory of the prefill (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "memory_vs_context.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    acc = {(r["model"]): (r["memory_floats"], r["mqar_acc"]) for r in rows if r["mqar_acc"] is not None and r["impl"] == "bmojo"}
    if acc:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        markers = "osD^v<>PX*"
        for i, (name, (budget, a)) in enumerate(sorted(acc.items())):  # a legend: shipped models share budgets
            ax.scatter([budget], [100 * a], s=70, marker=markers[i % len(markers)], alpha=0.8, label=name)
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("recurrent memory per layer (floats: SSM state + KV cache + memory slots)")
        ax.set_ylabel("MQAR recall accuracy (%)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "accuracy_vs_budget.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _ratio(v) -> str:
    if v is None:
        return ""
    return f"{v:.1f}x" if v >= 9.95 else f"{v:.2f}x"


def _with_spread(fmt):
    def show(r, key):
        if r.get(key) is None:
            return ""
        lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
        return fmt(r[key]) + (f" ({fmt(lo)}–{fmt(hi)})" if lo is not None and hi is not None else "")
    return show


def people_table(rows: list[dict]) -> str:
    """The results as people read them: 37.1k tokens/s (min–max over the rounds), 2.0 ms, 591 MiB."""
    rate = _with_spread(human_count)
    compiled = any(r.get("compiled_decode_tok_s") is not None for r in rows)
    cols = ["model", "impl", "backend", "context", "prefill tok/s", "decode tok/s", "decode step"]
    cols += ["compiled decode tok/s", "compile time"] if compiled else []
    cols += ["peak memory", "decoding state", "MQAR accuracy", "memory floats"]
    shown = []
    for r in rows:
        d = {"model": r["model"], "impl": r["impl"], "backend": r["backend"], "context": r["context"],
             "prefill tok/s": rate(r, "prefill_tok_s"), "decode tok/s": rate(r, "decode_tok_s"),
             "decode step": human_seconds(r.get("batch", 1) / r["decode_tok_s"]),
             "compiled decode tok/s": rate(r, "compiled_decode_tok_s"), "compile time": human_seconds(r.get("compile_s")),
             "peak memory": human_mib(r.get("peak_mib")),
             "decoding state": human_mib(r["state_kib"] / 1024) if r.get("state_kib") is not None else "",
             "MQAR accuracy": "" if r.get("mqar_acc") is None else f"{100 * r['mqar_acc']:.1f}%",
             "memory floats": "" if r.get("memory_floats") is None else f"{r['memory_floats']:.0f}"}
        shown.append(d)
    return format_table(shown, cols)


def ratio_table(rows: list[dict]) -> str:
    """Ours / transformers' at the same point: tokens/s ratios (median and min–max of the per-round
    ratios) and the peak-memory ratio."""
    out = []
    by = {(r["model"], r["impl"], r["backend"], r["context"]): r for r in rows}
    for e in ratios(rows):
        o = by[(e["model"], "bmojo", e["backend"], e["context"])]
        t = by[(e["model"], e["baseline"], "transformers", e["context"])]

        def fig(name):
            med, lo, hi = e[name]
            return (f"**{_ratio(med)}** ({_ratio(lo)}–{_ratio(hi)}): "
                    f"{human_count(o[f'{name}_tok_s'])} vs {human_count(t[f'{name}_tok_s'])} tok/s")
        mem = "" if e["peak_memory"] is None else (f"{_ratio(e['peak_memory'])}: {human_mib(o['peak_mib'])} vs "
                                                   f"{human_mib(t['peak_mib'])}")
        out.append({"model": e["model"], "vs": e["baseline"], "context": e["context"],
                    "prefill, ours / theirs": fig("prefill"), "decode, ours / theirs": fig("decode"),
                    "peak memory, ours / theirs": mem})
    return format_table(out) if out else ""


def header_lines(settings: BenchSettings, conditions: dict | None) -> list[str]:
    """The machine, the load and the protocol, for the table's header."""
    c = conditions or {}
    lines = [f"bmojo bench — {c.get('machine') or machine_description()}"]
    cores = c.get("cpu_count") or os.cpu_count() or 1
    load = []
    if c.get("load_start") or c.get("load_end"):
        load.append(f"load average (1/5/15 min) {c.get('load_start')} at the start, {c.get('load_end')} at the end")
    if c.get("other_processes_cores") is not None:
        load.append(f"other processes used {c['other_processes_cores']:.2f} of {cores} cores during the run")
    if load:
        lines.append("; ".join(load))
    if (c.get("other_processes_cores") or 0) > 0.25:
        lines.append("WARNING: another process was using the CPU during the run; these figures are not reliable")
    lines.append(f"protocol: per context, every figure of every model, backend and baseline runs once untimed "
                 f"(warm-up), then they take turns in {settings.rounds} rounds (each timed once per round, the order "
                 f"rotated); figures are the median over the rounds (min–max); ratios the median of the per-round "
                 f"ratios")
    compiled = (f"; compiled decode: the same steps through CompiledDecoding (torch.compile) on a cache sized for "
                f"the longest context, compile time apart" if settings.compile else "")
    mem = ("CUDA max allocated" if torch.cuda.is_available() else
           "peak resident set size (VmHWM, reset first)") + f" above the start, the least of {MEMORY_READINGS} untimed forwards"
    lines.append(f"batch {settings.batch}, {settings.dtype}; prefill: one forward over the prompt (no cache); "
                 f"decode: {settings.decode_tokens} greedy steps after the prompt and one untimed step{compiled}; "
                 f"peak memory: {mem}")
    if c.get("compiles"):
        lines.append("compiled decoding: " + ", ".join(
            f"{k} {v['graphs']} graph{'s' if v['graphs'] != 1 else ''} in {human_seconds(v['seconds'])}"
            + (f" (failed: {v['failed']}; decoded eagerly)" if v.get("failed") else "") for k, v in c["compiles"].items()))
    if c.get("wall_s") is not None:
        m = c.get("messages", 0)
        lines.append(f"measured in {human_seconds(c['wall_s'])}; {m} warning{'' if m == 1 else 's'} and log "
                     f"message{'' if m == 1 else 's'} (transformers, torch, bmojo) in {c.get('log')}")
    return lines


def write_outputs(rows: list[dict], settings: BenchSettings, as_json: bool = False) -> str:
    """results.md (people's tables), results.csv (raw numbers), results.json (everything, with the run's
    conditions and per-round times) and the plots; returns what the command prints."""
    os.makedirs(settings.output, exist_ok=True)
    conditions = getattr(rows, "conditions", None) or {"machine": machine_description(), "load_end": load_average()}
    header = "\n".join(header_lines(settings, conditions))
    table = people_table(rows)
    vs = ratio_table(rows)
    vs_text = f"\n\nours vs transformers on the same weights, same run:\n\n{vs}" if vs else ""
    with open(os.path.join(settings.output, "results.md"), "w") as fh:
        fh.write("# bmojo bench\n\n" + header.replace("\n", "  \n") + f"\n\n{table}{vs_text}\n")
    with open(os.path.join(settings.output, "results.csv"), "w") as fh:
        fh.write(to_csv(rows))
    data = {"machine": conditions.get("machine"), "conditions": conditions, "settings": asdict(settings),
            "rows": list(rows), "ratios": ratios(rows)}
    with open(os.path.join(settings.output, "results.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    with library_messages_to(os.path.join(settings.output, LOG_NAME)):  # matplotlib's (and pyparsing's) warnings too
        plots = plot(rows, settings.output)
    if as_json:
        return json.dumps(data)
    return (f"{header}\n\n{table}{vs_text}\n\nwrote {settings.output}/results.md, results.csv, results.json, "
            + ", ".join(os.path.basename(p) for p in plots) + f", {LOG_NAME}")
