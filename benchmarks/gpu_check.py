"""The one-command GPU check: everything that needs a CUDA GPU, in one run, under 8 minutes.

    python benchmarks/gpu_check.py              # writes benchmarks/results/gpu.md (and .json)
    python benchmarks/gpu_check.py --out DIR    # elsewhere

On a machine with a CUDA GPU it runs, each step under its own time limit:

1. every Triton kernel test on the GPU (``pytest tests/backends/cuda`` without the interpreter);
2. the whole model on ``backend="cuda"`` against ``backend="torch"``: logits and every gradient, fp32 and
   bf16, every layer type in one model;
3. the compiled decoding step with CUDA graphs (``mode="reduce-overhead"``): logits equal to the eager
   step over 200 tokens, graphs built, compile time, ms per token compiled and eager;
4. ``benchmarks/kernels.py --quick`` (Triton kernels against the torch backend, SDPA, FlashAttention-2
   and mamba-ssm when installed).

Without a GPU it says so and exits 0. A failing step is recorded and the next one runs; the exit status
is 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"kernel tests": 180, "model cuda vs torch": 90, "compiled decoding": 120, "kernel benchmarks": 150}


def _run(cmd: list[str], limit: int, env=None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
        return out.returncode, out.stdout + out.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, text + f"\n(timed out after {limit} s)", time.perf_counter() - t0


def kernel_tests() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rc, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/backends/cuda"],
                         LIMITS["kernel tests"], env)
    summary = [line for line in out.splitlines() if " passed" in line or " failed" in line or " error" in line]
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return dict(ok=rc == 0, seconds=secs, summary=summary[-1] if summary else out[-300:], failures=failures[:20])


def _mixed_config(**kw):
    from bmojo import BMojoConfig

    return BMojoConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=5,
                       layer_types=["bmojo", "mamba", "attention", "sliding_attention", "bmojo_f"],
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=64, fading_window=48,
                       memory_slots=16, intermediate_size=512, rope_theta=10000.0, **kw)


def model_cuda_vs_torch(device: str = "cuda", fast_backend: str = "cuda", length: int = 333) -> dict:
    from bmojo import BMojoForCausalLM

    rows = []
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        torch.manual_seed(0)
        ref = BMojoForCausalLM(_mixed_config(backend="torch")).to(device, dtype)
        fast = BMojoForCausalLM(_mixed_config(backend=fast_backend)).to(device, dtype)
        fast.load_state_dict(ref.state_dict())
        ids = torch.randint(0, 1024, (2, length), device=device)  # odd length, several chunks of w = 64
        out = {}
        for name, model in (("torch", ref), ("cuda", fast)):
            model.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            out[name] = (model(ids).logits.float(), {n: p.grad.float() for n, p in model.named_parameters()})
        logit_err = (out["cuda"][0] - out["torch"][0]).abs().max().item()
        scale = out["torch"][0].abs().max().item()
        grad_err = max(((out["cuda"][1][n] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item()
                       for n, g in out["torch"][1].items())
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), logit_max_abs_err=logit_err, logit_scale=scale,
                         worst_relative_grad_err=grad_err, ok=logit_err <= tol * max(scale, 1) and grad_err <= 20 * tol))
    return dict(ok=all(r["ok"] for r in rows), rows=rows)


def compiled_decoding(device: str = "cuda", steps: int = 200) -> dict:
    """The step compiled from the torch backend's ops (inductor writes the GPU kernels; CUDA graphs
    replay them), against the same step run eagerly."""
    from transformers import CompileConfig

    from bmojo import BMojoCache, BMojoForCausalLM
    from bmojo.modeling_bmojo import CompiledDecoding

    torch.manual_seed(0)
    model = BMojoForCausalLM(_mixed_config(backend="torch")).to(device).eval()
    prompt = torch.randint(0, 1024, (1, 256), device=device)
    caches = [BMojoCache(model.config, 1, device=device, dtype=torch.float32, max_length=256 + steps + 64)
              for _ in range(2)]
    decoding = CompiledDecoding(model, CompileConfig(mode="reduce-overhead", fullgraph=True))
    with torch.no_grad():
        token = model(prompt, cache=caches[0]).logits[:, -1:].argmax(-1)
        model(prompt, cache=caches[1])
        worst, eager_tok = 0.0, token
        for _ in range(steps):
            got = decoding.step(token, caches[0])
            want = model.decode_step(eager_tok, caches[1])
            worst = max(worst, (got - want).abs().max().item())
            token = eager_tok = want[:, -1:].argmax(-1)
        timings = {}
        for name, fn, cache in (("compiled", decoding.step, caches[0]), ("eager", model.decode_step, caches[1])):
            for _ in range(5):
                fn(token, cache)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(50):
                fn(token, cache)
            _sync(device)
            timings[name] = (time.perf_counter() - t0) / 50 * 1e3
    return dict(ok=worst <= 2e-3 and decoding.failed is None and decoding.compiles == 1, max_abs_logit_err=worst,
                graphs=decoding.compiles, compile_seconds=decoding.compile_seconds, failed=decoding.failed,
                ms_per_token_compiled=timings["compiled"], ms_per_token_eager=timings["eager"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_benchmarks() -> dict:
    rc, out, secs = _run([sys.executable, "benchmarks/kernels.py", "--quick"], LIMITS["kernel benchmarks"])
    return dict(ok=rc == 0, seconds=secs, tail=out[-3000:])


def _markdown(env: dict, results: dict) -> str:
    lines = ["# GPU check", "", f"Run {env['date']} on {env['gpu']} ({env['machine']}); torch {env['torch']}, "
             f"triton {env['triton']}, CUDA {env['cuda']}. `python benchmarks/gpu_check.py`.", ""]
    for name, r in results.items():
        lines += [f"## {name}: {'ok' if r.get('ok') else 'FAILED'}", ""]
        if "error" in r:
            lines += ["```", r["error"], "```", ""]
        elif name == "kernel tests":
            lines += [f"{r['summary']} ({r['seconds']:.0f} s)", ""] + [f"- `{f}`" for f in r["failures"]] + [""]
        elif name == "model cuda vs torch":
            lines += ["| dtype | max abs logit error | logit scale | worst relative gradient error |", "| --- | --- | --- | --- |"]
            lines += [f"| {x['dtype']} | {x['logit_max_abs_err']:.2e} | {x['logit_scale']:.2f} | {x['worst_relative_grad_err']:.2e} |"
                      for x in r["rows"]] + [""]
        elif name == "compiled decoding":
            lines += [f"- 200 steps (torch backend ops compiled by inductor, CUDA graphs), max abs logit difference "
                      f"compiled vs eager: {r['max_abs_logit_err']:.2e}",
                      f"- graphs built: {r['graphs']} ({r['compile_seconds']:.1f} s), failure: {r['failed']}",
                      f"- ms per token: compiled {r['ms_per_token_compiled']:.2f}, eager {r['ms_per_token_eager']:.2f}", ""]
        else:
            lines += ["```", r["tail"], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for gpu.md / gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here; nothing to check (the Triton kernels are tested on CPU "
              "through the interpreter by the test suite).")
        return 0
    import triton

    env = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
               machine=platform.node(), torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    steps = {"kernel tests": kernel_tests, "model cuda vs torch": model_cuda_vs_torch,
             "compiled decoding": compiled_decoding, "kernel benchmarks": kernel_benchmarks}
    results = {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on: the next step may still tell us something
            import traceback

            results[name] = dict(ok=False, error=traceback.format_exc()[-3000:])
        results[name]["seconds"] = results[name].get("seconds", time.perf_counter() - t0)
        print(f"gpu_check: {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.md").write_text(_markdown(env, results))
    (out / "gpu.json").write_text(json.dumps(dict(env=env, results=results), indent=2, default=str))
    print(f"gpu_check: wrote {out / 'gpu.md'}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
