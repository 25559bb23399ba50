"""Kernel benchmarks for the cuda backend (Triton), timed with triton.testing.do_bench.

    python benchmarks/kernels.py            # on a CUDA machine: full sweep -> benchmarks/results/kernels.{md,png}
    python benchmarks/kernels.py --quick    # fewer sizes
    python benchmarks/kernels.py --smoke    # the smallest sizes through the whole pipeline (any machine)

Compared:
  selective_scan   Triton (bmojo.backends.cuda) | torch backend (bmojo.ops, backend="torch") | mamba-ssm's
                   selective_scan_fn (CUDA, when mamba_ssm is installed)
  bmojo_attention  Triton, one fused kernel | torch SDPA given the full visibility mask (window, fading
                   band, memory slots) over the concatenated keys | two attention passes (window; fading +
                   memory) merged by log-sum-exp, in torch ops | FlashAttention-2 over the window only (a
                   lower bound: it skips the fading and memory keys), when flash_attn is installed

Reported: ms (median of do_bench), TFLOP/s and GB/s. FLOPs count only visible (query, key) pairs:
4 * D per pair and query head forward (QK^T and PV), 2.5x that forward+backward; the scan counts
9 flops per (token, channel, state) forward, 2.5x forward+backward. Bytes are the minimal traffic
(every input read once, every output written once). Without a CUDA GPU nothing can be timed: the script
says so, runs the smallest case through the Triton interpreter against the naive references and exits 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GPU = torch.cuda.is_available()
if not GPU:
    # must be set before triton is imported (the kernels are decorated at import of bmojo.backends.cuda)
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402

from bmojo.bench.measure import format_table, machine_description  # noqa: E402
from bmojo.ops import bmojo_attention_ref, bmojo_visibility_masks, selective_scan_ref  # noqa: E402


# ------------------------------------------------------------------------------------------------
# inputs


def scan_inputs(b, T, d, N, G, dtype, device, grad):
    def r(*s, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*s, device=device, dtype=torch.float32) * scale + shift).to(dt).requires_grad_(grad)

    return dict(
        x=r(b, T, d), dt=r(b, T, d, scale=0.5, shift=-1.0),
        A=(-torch.arange(1, N + 1, device=device, dtype=torch.float32)).repeat(d, 1).requires_grad_(grad),
        B=r(b, T, G, N), C=r(b, T, G, N), D=r(d, dt=torch.float32), z=r(b, T, d),
        dt_bias=r(d, dt=torch.float32, scale=0.1),
    )


def attn_inputs(b, T, Hq, Hkv, D, w, m_f, m_e, dtype, device, grad):
    def r(*s):
        return torch.randn(*s, device=device, dtype=dtype).requires_grad_(grad)

    nc = -(-T // w)
    valid = torch.ones(b, nc, m_e, dtype=torch.bool, device=device)
    valid[:, 0] = False  # the first chunk has no eligible past position
    return dict(q=r(b, T, Hq, D), k=r(b, T, Hkv, D), v=r(b, T, Hkv, D), window=w,
                k_fading=r(b, T, Hkv, D), v_fading=r(b, T, Hkv, D), fading_window=m_f,
                k_memory=r(b, nc, m_e, Hkv, D), v_memory=r(b, nc, m_e, Hkv, D), memory_valid=valid)


def visible_pairs(T, w, m_f, m_e, valid):
    t = torch.arange(T, dtype=torch.float64)
    ctx = torch.clamp(t + 1, max=w)
    fad = torch.clamp(t - w + 1, min=0, max=m_f)
    mem = valid[0].sum(-1).double()[(t // w).long()] if m_e else torch.zeros_like(t)
    return float((ctx + fad + mem).sum())


# ------------------------------------------------------------------------------------------------
# attention baselines


def _flat_keys(a):
    """[k; kf; km] concatenated along the key axis, and the (b, 1, T, S) visibility mask."""
    q, k = a["q"], a["k"]
    b, T = q.shape[:2]
    w, m_f = a["window"], a["fading_window"]
    ctx, fad = bmojo_visibility_masks(T, w, m_f, q.device)
    nc, m_e = a["k_memory"].shape[1:3]
    chunk = torch.arange(T, device=q.device) // w
    mem = (chunk[:, None] == torch.arange(nc, device=q.device)[None, :])[None, :, :, None] & a["memory_valid"][:, None]
    mask = torch.cat([ctx.expand(b, T, T), fad.expand(b, T, T), mem.reshape(b, T, nc * m_e)], -1)[:, None]
    K = torch.cat([k, a["k_fading"], a["k_memory"].flatten(1, 2)], 1)
    V = torch.cat([a["v"], a["v_fading"], a["v_memory"].flatten(1, 2)], 1)
    return K, V, mask


def sdpa_masked(a):
    K, V, mask = _flat_keys(a)
    q = a["q"]
    rep = q.shape[2] // K.shape[2]
    K, V = K.repeat_interleave(rep, 2), V.repeat_interleave(rep, 2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def _attn_lse(q, K, V, mask, scale):
    """Masked attention in torch ops returning (o fp32, lse fp32); rows with no key give o=0, lse=-inf."""
    rep = q.shape[2] // K.shape[2]
    K, V = K.repeat_interleave(rep, 2), V.repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), K.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.einsum("bhts,bshd->bthd", p, V.float()), lse.transpose(1, 2)


def two_pass_lse(a):
    """B'MOJO-F style: attention over the window, attention over fading + memory, merged by lse."""
    q, k, v = a["q"], a["k"], a["v"]
    b, T, _, D = q.shape
    scale = 1.0 / math.sqrt(D)
    ctx, fad = bmojo_visibility_masks(T, a["window"], a["fading_window"], q.device)
    o1, l1 = _attn_lse(q, k, v, ctx[None, None], scale)
    K, V, mask = _flat_keys(a)
    o2, l2 = _attn_lse(q, K[:, T:], V[:, T:], mask[..., T:], scale)
    lse = torch.logaddexp(l1, l2)
    o = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
    return o.to(q.dtype)


def flash_window_only(a):
    from flash_attn import flash_attn_func

    return flash_attn_func(a["q"], a["k"], a["v"], causal=True, window_size=(a["window"] - 1, 0))


# ------------------------------------------------------------------------------------------------
# timing


def bench(fn, smoke):
    if smoke and not GPU:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(f, inputs, grad_inputs):
    def run():
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), grad_inputs, allow_unused=True)

    return run


def rate(flops, nbytes, ms):
    return dict(ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12, GBs=nbytes / (ms * 1e-3) / 1e9)


def row(op, impl, shape, mode, flops, nbytes, fn, smoke, note=""):
    try:
        ms = bench(fn, smoke)
        r = rate(flops, nbytes, ms)
    except Exception as e:  # a baseline that cannot run at this size (memory, missing kernel)
        r, note = dict(ms=None, TFLOPs=None, GBs=None), f"failed: {type(e).__name__}: {str(e)[:80]}"
    if GPU:
        torch.cuda.empty_cache()
    return dict(op=op, impl=impl, shape=shape, mode=mode, **r, note=note)


def bench_scan(sizes, dtype, device, smoke):
    import bmojo.ops as ops
    import bmojo.backends.cuda as cuda_backend

    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        selective_scan_fn = None
    rows = []
    for b, T, d, N, G in sizes:
        a = scan_inputs(b, T, d, N, G, dtype, device, grad=True)
        shape = f"b{b} T{T} d{d} N{N} G{G}"
        el = torch.finfo(dtype).bits // 8
        flops = 9.0 * b * T * d * N
        nbytes = el * (4 * b * T * d + 2 * b * T * G * N)
        kw = dict(D=a["D"], z=a["z"], dt_bias=a["dt_bias"], dt_softplus=True)
        impls = {
            "triton": lambda: cuda_backend.OPS["selective_scan"](a["x"], a["dt"], a["A"], a["B"], a["C"], **kw),
            "torch backend": lambda: ops.selective_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], **kw, backend="torch"),
        }
        if selective_scan_fn is not None and GPU:
            t = {n: a[n].detach().transpose(1, 2).contiguous().requires_grad_() for n in ("x", "dt", "z")}
            Bm, Cm = (a[n].detach().permute(0, 2, 3, 1).contiguous().requires_grad_() for n in ("B", "C"))
            impls["mamba-ssm"] = lambda: selective_scan_fn(t["x"], t["dt"], a["A"], Bm, Cm, a["D"], t["z"], a["dt_bias"], True)
        for impl, f in impls.items():
            ins = [a[n] for n in ("x", "dt", "B", "C")] if impl != "mamba-ssm" else [t["x"], t["dt"], Bm, Cm]
            rows.append(row("selective_scan", impl, shape, "fwd", flops, nbytes, lambda: f(), smoke))
            rows.append(row("selective_scan", impl, shape, "fwd+bwd", 2.5 * flops, 2.5 * nbytes, fwd_bwd(f, None, ins), smoke))
    return rows


def bench_attention(sizes, dtype, device, smoke):
    import bmojo.backends.cuda as cuda_backend

    try:
        import flash_attn  # noqa: F401
        has_fa = GPU
    except Exception:
        has_fa = False
    rows = []
    for b, T, Hq, Hkv, D, w, m_f, m_e in sizes:
        a = attn_inputs(b, T, Hq, Hkv, D, w, m_f, m_e, dtype, device, grad=True)
        shape = f"b{b} T{T} H{Hq}/{Hkv} D{D} w{w} mf{m_f} me{m_e}"
        el = torch.finfo(dtype).bits // 8
        pairs = visible_pairs(T, w, m_f, m_e, a["memory_valid"].cpu())
        flops = 4.0 * D * pairs * Hq * b
        nbytes = el * (2 * b * T * Hq * D + 4 * b * T * Hkv * D + 2 * a["k_memory"].numel())
        ins = [a[n] for n in ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory")]
        impls = {
            "triton fused": lambda: cuda_backend.OPS["bmojo_attention"](**a),
            "SDPA + mask": lambda: sdpa_masked(a),
            "2 passes + lse merge": lambda: two_pass_lse(a),
        }
        if has_fa:
            impls["FA2 window only"] = lambda: flash_window_only(a)
        for impl, f in impls.items():
            note = "window keys only (lower bound)" if impl.startswith("FA2") else ""
            fl = flops if not impl.startswith("FA2") else 4.0 * D * visible_pairs(T, w, 0, 0, None) * Hq * b
            rows.append(row("bmojo_attention", impl, shape, "fwd", fl, nbytes, lambda: f(), smoke, note))
            g_ins = ins if not impl.startswith("FA2") else ins[:3]
            rows.append(row("bmojo_attention", impl, shape, "fwd+bwd", 2.5 * fl, 2.5 * nbytes, fwd_bwd(f, None, g_ins), smoke, note))
    return rows


# ------------------------------------------------------------------------------------------------
# outputs


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, op in zip(axes, ("selective_scan", "bmojo_attention")):
        sub = [r for r in rows if r["op"] == op and r["ms"] is not None]
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        impls = list(dict.fromkeys((r["impl"], r["mode"]) for r in sub))
        for impl, mode in impls:
            xs, ys = [], []
            for i, s in enumerate(shapes):
                m = [r["ms"] for r in sub if r["shape"] == s and r["impl"] == impl and r["mode"] == mode]
                if m:
                    xs.append(i)
                    ys.append(m[0])
            ax.plot(xs, ys, marker="o", linestyle="-" if mode == "fwd" else "--", label=f"{impl} ({mode})")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(op)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows, machine, out_dir, dtype, smoke):
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "kernels.md"
    png = out_dir / "kernels.png"
    cols = ["op", "impl", "shape", "mode", "ms", "TFLOPs", "GBs", "note"]
    text = [
        "# Kernel benchmarks (cuda backend)",
        "",
        f"Machine: {machine}",
        f"dtype: {dtype}; timer: {'perf_counter, 1 run (smoke run, NOT a measurement)' if smoke and not GPU else 'triton.testing.do_bench (median)'}",
        f"Command: `python benchmarks/kernels.py{' --smoke' if smoke else ''}`",
        "",
        "FLOPs count visible (query, key) pairs only (4*D per pair and head forward, x2.5 fwd+bwd); the scan",
        "counts 9 flops per (token, channel, state). GB/s uses the minimal traffic (inputs read once, outputs",
        "written once). 'FA2 window only' skips the fading and memory keys: a lower bound, not the same op.",
        "",
        format_table(rows, cols),
        "",
        f"![kernel timings]({png.name})",
        "",
    ]
    md.write_text("\n".join(text))
    plot(rows, png, machine + (' (smoke run through the interpreter: not a measurement)' if smoke and not GPU else ''))
    return md, png


def interpreter_check():
    """No GPU: run the smallest case of each kernel through the Triton interpreter against the references."""
    import bmojo.backends.cuda as cuda_backend

    torch.manual_seed(0)
    a = scan_inputs(1, 16, 8, 4, 1, torch.float32, "cpu", grad=True)
    kw = dict(D=a["D"], z=a["z"], dt_bias=a["dt_bias"])
    ins = [a[n] for n in ("x", "dt", "A", "B", "C")]
    y = cuda_backend.OPS["selective_scan"](*ins, **kw)
    y_ref = selective_scan_ref(*ins, **kw)
    g = torch.autograd.grad(y.sum(), ins)
    g_ref = torch.autograd.grad(y_ref.sum(), ins)
    err_scan = max([(y - y_ref).abs().max().item()] + [(p - r).abs().max().item() for p, r in zip(g, g_ref)])
    a = attn_inputs(1, 24, 2, 1, 16, 8, 8, 2, torch.float32, "cpu", grad=True)
    ins = [a[n] for n in ("q", "k", "v", "k_fading", "v_fading", "k_memory", "v_memory")]
    o = cuda_backend.OPS["bmojo_attention"](**a)
    o_ref = bmojo_attention_ref(**a)
    g = torch.autograd.grad(o.sum(), ins)
    g_ref = torch.autograd.grad(o_ref.sum(), ins)
    err_attn = max([(o - o_ref).abs().max().item()] + [(p - r).abs().max().item() for p, r in zip(g, g_ref)])
    print(f"  selective_scan  b1 T16 d8 N4   fwd+bwd max |triton - reference| = {err_scan:.2e}")
    print(f"  bmojo_attention b1 T24 H2/1 D16 w8 mf8 me2  fwd+bwd max |triton - reference| = {err_attn:.2e}")
    ok = err_scan < 1e-4 and err_attn < 1e-4
    print("  kernels agree with the references" if ok else "  MISMATCH against the references")
    return ok


SCAN_SIZES = [(4, 1024, 2048, 16, 1), (4, 2048, 2048, 16, 1), (4, 4096, 2048, 16, 1), (2, 8192, 2048, 16, 1)]
ATTN_SIZES = [(4, 1024, 16, 4, 64, 256, 256, 32), (4, 2048, 16, 4, 64, 512, 512, 64),
              (2, 4096, 16, 4, 64, 512, 512, 64), (2, 8192, 16, 4, 128, 1024, 1024, 64)]
SMOKE_SCAN = [(1, 16, 8, 4, 1)]
SMOKE_ATTN = [(1, 24, 2, 1, 16, 8, 8, 2)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the two smallest sizes of each op")
    p.add_argument("--smoke", action="store_true", help="the smallest sizes through the whole pipeline")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    machine = machine_description()
    print(f"machine: {machine}")
    if not GPU and not args.smoke:
        print("NO CUDA GPU on this machine: the Triton kernels cannot be timed here, so no results are written.")
        print("Running the smallest case through the Triton interpreter (TRITON_INTERPRET=1) to check the kernels:")
        return 0 if interpreter_check() else 1
    dtype = getattr(torch, args.dtype) if GPU else torch.float32
    device = torch.device("cuda" if GPU else "cpu")
    scan_sizes, attn_sizes = (SMOKE_SCAN, SMOKE_ATTN) if args.smoke else (SCAN_SIZES, ATTN_SIZES)
    if args.quick:
        scan_sizes, attn_sizes = scan_sizes[:2], attn_sizes[:2]
    if not GPU:
        print("NO CUDA GPU: smoke run through the Triton interpreter; the times below are NOT measurements.")
    torch.manual_seed(0)
    rows = bench_scan(scan_sizes, dtype, device, args.smoke) + bench_attention(attn_sizes, dtype, device, args.smoke)
    print(format_table(rows, ["op", "impl", "shape", "mode", "ms", "TFLOPs", "GBs", "note"]))
    md, png = write_results(rows, machine, args.out, args.dtype if GPU else "float32", args.smoke)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
