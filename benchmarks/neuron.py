"""Kernel benchmarks for the neuron backend (NKI) on a Trainium instance (trn1 / trn2).

    python benchmarks/neuron.py             # on a trn1/trn2 host with torch-neuronx + nki: full sweep
    python benchmarks/neuron.py --quick     # fewer sizes
    python benchmarks/neuron.py --profile   # also keep the NEFFs for Neuron Explorer (see below)

Compared on the same NeuronCore (XLA device):
  selective_scan   NKI kernels (bmojo.backends.neuron custom ops) | torch backend ops lowered by XLA
  bmojo_attention  NKI kernels (one flash-style kernel over window + fading + memory) | torch backend

Each case is timed forward and forward+backward. Timing: the first call compiles (reported separately as
"compile s"); then each timed call ends with ``torch_xla.sync()`` and waits for the device
(``xm.wait_device_ops()``), median of ``--repeat`` calls, so the figures are end-to-end step latencies of
a graph holding just the op. For instruction-level profiles use ``--profile``: it sets
``NEURON_FRAMEWORK_DEBUG=1`` so the compiled NEFFs are kept, then run
``neuron-explorer capture -n <neff> -s profile.ntff`` and ``neuron-explorer view`` (see the NKI
"Profiling NKI kernels with Neuron Explorer" guide).

Not on a Neuron host (no torch_xla / torch_neuronx / nki, or no /dev/neuron*): the script says so and
exits 0. Results go to benchmarks/results/neuron.md (and .json).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def neuron_unavailable() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    for mod in ("torch_xla", "torch_neuronx", "nki"):
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or a broken install
            return f"{mod} is not importable ({type(e).__name__}: {e})"
    if not glob.glob("/dev/neuron*"):
        return "no Neuron device (/dev/neuron*) on this machine"
    return None


def scan_case(b, T, d, N, G, dtype, device, grad):
    import torch

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s) * scale + shift).to(dt).to(device).requires_grad_(grad)

    A = (-torch.arange(1, N + 1, dtype=torch.float32)).repeat(d, 1).to(device).requires_grad_(grad)
    return dict(x=r(b, T, d), dt=r(b, T, d, scale=0.5, shift=-1.0), A=A, B=r(b, T, G, N), C=r(b, T, G, N),
                D=r(d, dt=torch.float32), z=r(b, T, d), dt_bias=r(d, scale=0.1, dt=torch.float32))


def attn_case(b, T, Hq, Hkv, D, w, mf, me, dtype, device, grad):
    import torch

    def r(*s):
        return torch.randn(*s).to(dtype).to(device).requires_grad_(grad)

    nc = -(-T // w)
    valid = torch.ones(b, nc, me, dtype=torch.bool)
    valid[:, 0] = False
    return dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D), window=w, k_fading=r(b, T, Hkv, D),
                v_fading=r(b, T, Hkv, D), fading_window=mf, k_memory=r(b, nc, me, Hkv, D),
                v_memory=r(b, nc, me, Hkv, D), memory_valid=valid.to(device))


def timed(fn, sync, repeat):
    """(compile+first call seconds, median seconds of the next ``repeat`` calls)."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return first, times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--profile", action="store_true", help="keep NEFFs (NEURON_FRAMEWORK_DEBUG=1) for neuron-explorer")
    ap.add_argument("--out", default=str(HERE / "results" / "neuron"))
    args = ap.parse_args(argv)

    reason = neuron_unavailable()
    if reason is not None:
        print(f"benchmarks/neuron.py: not on a Neuron (Trainium) host: {reason}. Nothing to time; exiting.")
        return 0
    if args.profile:
        os.environ["NEURON_FRAMEWORK_DEBUG"] = "1"
        os.environ.setdefault("XLA_IR_DEBUG", "1")
        os.environ.setdefault("XLA_HLO_DEBUG", "1")

    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm

    import bmojo.ops as ops
    from bmojo.bench.measure import format_table

    device = torch_xla.device()
    dtype = getattr(torch, args.dtype)

    def sync():
        (getattr(torch_xla, "sync", None) or xm.mark_step)()
        xm.wait_device_ops()

    scan_sizes = [(4, 2048, 1536, 16, 1)] if args.quick else [(4, 1024, 1536, 16, 1), (4, 2048, 1536, 16, 1),
                                                              (2, 4096, 2048, 16, 1), (4, 2048, 1536, 16, 4)]
    attn_sizes = [(4, 2048, 16, 16, 64, 512, 512, 16)] if args.quick else [
        (4, 1024, 16, 16, 64, 256, 256, 16), (4, 2048, 16, 16, 64, 512, 512, 16),
        (2, 4096, 16, 4, 128, 512, 512, 16)]
    rows = []
    for backend in ("neuron", "torch"):
        for b, T, d, N, G in scan_sizes:
            for grad in (False, True):
                inp = scan_case(b, T, d, N, G, dtype, device, grad)

                def run():
                    y = ops.selective_scan(**inp, backend=backend)
                    if grad:
                        y.float().sum().backward()
                first, med = timed(run, sync, args.repeat)
                flops = 9 * b * T * d * N * (2.5 if grad else 1.0)
                rows.append(dict(op="selective_scan", backend=backend, shape=f"b{b} T{T} d{d} N{N} G{G}",
                                 pass_="fwd+bwd" if grad else "fwd", ms=med * 1e3, **{"compile s": first},
                                 **{"GFLOP/s": flops / med / 1e9}))
                print(rows[-1], flush=True)
        for b, T, Hq, Hkv, D, w, mf, me in attn_sizes:
            for grad in (False, True):
                inp = attn_case(b, T, Hq, Hkv, D, w, mf, me, dtype, device, grad)

                def run():
                    o = ops.bmojo_attention(**inp, backend=backend)
                    if grad:
                        o.float().sum().backward()
                first, med = timed(run, sync, args.repeat)
                pairs = b * Hq * T * (min(T, w) + mf + me)  # upper bound on visible (query, key) pairs
                flops = 4 * D * pairs * (2.5 if grad else 1.0)
                rows.append(dict(op="bmojo_attention", backend=backend,
                                 shape=f"b{b} T{T} Hq{Hq} Hkv{Hkv} D{D} w{w} mf{mf} me{me}",
                                 pass_="fwd+bwd" if grad else "fwd", ms=med * 1e3, **{"compile s": first},
                                 **{"GFLOP/s": flops / med / 1e9}))
                print(rows[-1], flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = format_table([{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows])
    header = (f"# neuron backend kernels\n\nDevice: {device} ({os.environ.get('NEURON_PLATFORM_TARGET_OVERRIDE', 'auto')}), "
              f"dtype {args.dtype}, median of {args.repeat} synced calls after a compiling one.\n\n")
    out.with_suffix(".md").write_text(header + table + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
