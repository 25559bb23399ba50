"""``bmojo bench``: every shipped checkpoint x every backend that runs here, side by side.

For each model and backend: prefill tokens/s, decode tokens/s and peak memory against context length,
and the recall accuracy of the MQAR checkpoints. transformers' own ``MambaForCausalLM`` and
``LlamaForCausalLM`` run on the same weights (of the mamba and transformer checkpoints) in the same
run, as baselines. Writes a markdown table, CSV, JSON and PNG plots.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .. import ops
from ..hf_compat import cache_kwarg, output_cache
from .measure import PeakMemory, format_table, machine_description, time_call

COLUMNS = ["model", "impl", "backend", "context", "prefill_tok_s", "decode_tok_s", "peak_mib", "state_kib",
           "mqar_acc", "memory_floats"]


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
    repeat: int = 3
    baselines: bool = True
    output: str = "bench_out"
    check_memory: bool = True  # refuse points whose estimated memory exceeds what is available (bench.memory)


QUICK = dict(contexts=[1024, 2048], decode_tokens=8, repeat=1)


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
        print(f"bmojo bench: skipping backend {name!r}: {reason}")
    return out


def _decode_rate(model, ids, n_tokens: int) -> tuple[float, int]:
    """Tokens/s of ``n_tokens`` greedy decoding steps after a prefill of ``ids``; and state bytes."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, cache=cache, use_cache=True)  # warm-up step
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        rate = ids.shape[0] * n_tokens / (time.perf_counter() - t0)
    state = cache.state_nbytes() if hasattr(cache, "state_nbytes") else None
    return rate, (sum(state) if state is not None else None)


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
    (:func:`bmojo.bench.memory.estimate_point_nbytes`) exceeds what its device has available; the
    message names the model, backend and context, the estimate and the memory available."""
    from ..configuration_bmojo import BMojoConfig
    from .memory import available_nbytes, estimate_point_nbytes, human_bytes

    too_big = []
    for backend in backends:
        if backend == "neuron":
            continue  # device memory is not queryable through torch here
        avail, source = available_nbytes("cuda" if backend == "cuda" else "cpu")
        if avail is None:
            continue
        for name, path in ckpts.items():
            try:
                config = BMojoConfig.from_pretrained(path)
            except (OSError, ValueError, TypeError):
                continue  # not a bmojo config: loading it reports the problem
            twin = _twin_kind(config) if settings.baselines and backend == backends[0] else None
            for ctx in settings.contexts:
                est = estimate_point_nbytes(config, ctx, settings.batch, dtype, settings.decode_tokens, twin)
                if est["total"] > avail:
                    parts = (f"weights {human_bytes(est['weights'])}, forward activations {human_bytes(est['forward'])}, "
                             f"decoding state {human_bytes(est['state'])}"
                             + (f", transformers' twin's forward {human_bytes(est['twin_forward'])}" if twin else ""))
                    too_big.append(f"context {ctx} ({name}, backend {backend}, batch {settings.batch}, "
                                   f"{settings.dtype}) needs about {human_bytes(est['total'])} ({parts}) but "
                                   f"{human_bytes(avail)} is available ({source})")
    if too_big:
        shown = too_big[:5] + ([f"... and {len(too_big) - 5} more"] if len(too_big) > 5 else [])
        raise SystemExit("bmojo bench: refusing points that cannot fit in memory:\n  " + "\n  ".join(shown)
                         + "\nchoose smaller --contexts (or --batch), or pass --no-memory-check to try anyway")


def run_bench(settings: BenchSettings) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from ..presets import recall_memory_floats
    from .baselines import hf_baseline

    if settings.threads:
        torch.set_num_threads(settings.threads)
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
    rows: list[dict] = []
    grid = [(name, be) for name in ckpts for be in backends]
    bar = tqdm(total=len(grid) * len(settings.contexts), desc="bench", unit="point")
    for name, backend in grid:
        device = _device_for(backend)
        model = AutoModelForCausalLM.from_pretrained(ckpts[name]).to(device=device, dtype=dtype).eval()
        model.config.backend = backend
        acc = mqar_accuracy(model, ckpts[name])
        impls = [("bmojo", model)]
        if settings.baselines and backend == backends[0]:
            twin = hf_baseline(model)
            if twin is not None:
                impls.append((f"hf-{type(twin).__name__}", twin.to(device)))
        # the recall study's x-axis (benchmarks/mqar.py): floats of state per layer at MQAR's length
        budget = recall_memory_floats(model.config, _mqar_length(ckpts[name]))
        for ctx in settings.contexts:
            ids = torch.randint(0, model.config.vocab_size, (settings.batch, ctx), device=device)
            for impl, m in impls:
                with torch.no_grad():
                    t = time_call(lambda: m(ids, use_cache=False), warmup=0 if settings.repeat == 1 else 1,
                                  repeat=settings.repeat, device=device)
                    with PeakMemory(device) as mem:  # one more forward, untimed
                        m(ids, use_cache=False)
                decode, state = (_decode_rate(m, ids, settings.decode_tokens) if impl == "bmojo"
                                 else _hf_decode_rate(m, ids, settings.decode_tokens))
                rows.append(dict(model=name, impl=impl, backend=backend if impl == "bmojo" else "transformers",
                                 context=ctx, prefill_tok_s=settings.batch * ctx / t, decode_tok_s=decode,
                                 peak_mib=None if mem.peak is None else mem.peak / 2**20,
                                 state_kib=None if state is None else state / 1024, mqar_acc=acc,
                                 memory_floats=budget))
            bar.update(1)
        del model, impls
    bar.close()
    return rows


def _hf_decode_rate(model, ids, n_tokens: int) -> tuple[float, None]:
    with torch.no_grad():
        out = model(ids, use_cache=True)
        name = cache_kwarg(model)
        nxt = out.logits[:, -1:].argmax(-1)
        kw = {name: getattr(out, name)}
        out = model(nxt, use_cache=True, **kw)
        t0 = time.perf_counter()
        for i in range(n_tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, use_cache=True, **kw)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        return ids.shape[0] * n_tokens / (time.perf_counter() - t0), None


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
        pts = sorted((r["context"], r["prefill_tok_s"], r["decode_tok_s"]) for r in rows if (r["model"], r["impl"], r["backend"]) == s)
        style = "--" if s[1] != "bmojo" else "-"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label(s))
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label(s))
    for ax, title in zip(axes, ["prefill tokens/s", "decode tokens/s after a prompt of that length"]):
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


def write_outputs(rows: list[dict], settings: BenchSettings, as_json: bool = False) -> str:
    os.makedirs(settings.output, exist_ok=True)
    header = (f"bmojo bench — {machine_description()}\n"
              f"batch {settings.batch}, dtype {settings.dtype}, {settings.decode_tokens} decode steps, "
              f"median of {settings.repeat} prefill runs; peak memory = {'CUDA max allocated' if torch.cuda.is_available() else 'peak resident set size (VmHWM, reset first)'} above the start")
    table = format_table(rows, COLUMNS)
    with open(os.path.join(settings.output, "results.md"), "w") as fh:
        fh.write(f"# bmojo bench\n\n{header}\n\n{table}\n")
    with open(os.path.join(settings.output, "results.csv"), "w") as fh:
        fh.write(to_csv(rows))
    with open(os.path.join(settings.output, "results.json"), "w") as fh:
        json.dump({"machine": machine_description(), "settings": asdict(settings), "rows": rows}, fh, indent=1)
    plots = plot(rows, settings.output)
    if as_json:
        return json.dumps({"machine": machine_description(), "rows": rows})
    return f"{header}\n\n{table}\n\n{to_csv(rows)}\nwrote {settings.output}/results.md, results.csv, results.json, " + ", ".join(os.path.basename(p) for p in plots)
