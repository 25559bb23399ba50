"""benchmarks/gpu_check.py has never run on a GPU yet: check here that it says so and exits 0 without
one, and that its steps and its report work (the model and compiled-decoding steps run on CPU)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script runs for real")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "no CUDA GPU" in out.stdout
    assert not (tmp_path / "gpu.md").exists()


def test_steps_and_report_run_on_cpu():
    gpu_check = _module()
    model = gpu_check.model_cuda_vs_torch(device="cpu", fast_backend="torch", length=70)
    assert model["ok"] and model["rows"][0]["logit_max_abs_err"] == 0.0
    decoding = gpu_check.compiled_decoding(device="cpu", steps=12)
    assert decoding["ok"] and decoding["graphs"] == 1
    env = dict(date="today", gpu="none", machine="cpu", torch=torch.__version__, triton="-", cuda=None)
    text = gpu_check._markdown(env, {"kernel tests": dict(ok=True, seconds=1.0, summary="3 passed", failures=[]),
                                     "model cuda vs torch": model, "compiled decoding": decoding,
                                     "kernel benchmarks": dict(ok=False, error="boom")})
    assert "## compiled decoding: ok" in text and "## kernel benchmarks: FAILED" in text and "boom" in text
