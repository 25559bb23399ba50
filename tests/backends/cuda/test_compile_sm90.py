"""Without a GPU, check that every kernel also compiles for Hopper (sm_90) through ptxas, without spills."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuda_testutils import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the other tests compile and run the kernels")
@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
