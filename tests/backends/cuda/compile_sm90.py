"""Compile every Triton kernel launch of the cuda backend for Hopper (sm_90) without a GPU.

Run as a script (it must not share a process with the interpreter-mode tests):

    python tests/backends/cuda/compile_sm90.py

Every kernel launch made by the ops' forward and backward (bf16, head dims 64 and 128, grouped B/C,
GQA, memory with and without validity masks) is intercepted: instead of running, the kernel is
compiled with the argument types and specialisations a real launch would use (ints equal to 1 become
constants, as Triton does), down to a cubin through ptxas. Register use and spills are read back with
cuobjdump. Exit status 1 if any kernel fails to compile or spills to local memory.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
         torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_seen: set = set()
failures: list[str] = []


def _resources(cubin: bytes) -> str:
    if not os.path.exists(CUOBJDUMP):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", fh.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)} local={m.group(4)}" if m else ""


def _compile_instead_of_launch(self, *args, grid, warmup=False, **kwargs):
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIONS}
    bound = self.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    sig, consts = {}, {}
    for p in self.params:
        val = bound.arguments[p.name]
        if p.is_constexpr or val is None or (isinstance(val, int) and not isinstance(val, bool) and val == 1):
            sig[p.name], consts[p.name] = "constexpr", val
        elif isinstance(val, torch.Tensor):
            sig[p.name] = "*" + TYPES[val.dtype]
        elif isinstance(val, bool):
            sig[p.name] = "i1"
        elif isinstance(val, int):
            sig[p.name] = "i32" if abs(val) < 2**31 else "i64"
        elif isinstance(val, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{self.__name__}: argument {p.name} of type {type(val)}")
    key = (self.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
           tuple(sorted(opts.items())))
    if key in _seen:
        return
    _seen.add(key)
    blocks = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k in ("K", "PREC")}
    t0 = time.time()
    try:
        kernel = triton.compile(ASTSource(self, sig, consts), target=TARGET, options=opts)
    except Exception as e:  # noqa: BLE001
        failures.append(self.__name__)
        print(f"FAIL {self.__name__} {blocks}: {type(e).__name__}: {str(e)[:2000]}")
        return
    res = _resources(kernel.asm["cubin"])
    if re.search(r"local=[1-9]", res):
        failures.append(self.__name__ + " (spills)")
    print(f"ok   {self.__name__:36s} {time.time() - t0:5.1f}s {res} {opts} {blocks}")


def main() -> int:
    JITFunction.run = _compile_instead_of_launch
    import bmojo.backends.cuda as bmojo_cuda

    ops = bmojo_cuda.OPS
    dt = torch.bfloat16
    torch.manual_seed(0)

    def r(*shape, dtype=dt):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    b, T, d, N = 2, 100, 64, 16
    x, dtv, z = r(b, T, d), r(b, T, d), r(b, T, d)
    A, D, bias = r(d, N, dtype=torch.float32), r(d, dtype=torch.float32), r(d, dtype=torch.float32)
    for B, C in ((r(b, T, 2, N), r(b, T, 2, N)), (r(b, T, N), r(b, T, N))):
        y, h = ops["selective_scan"](x, dtv, A, B, C, D, z, bias, True, r(b, d, N, dtype=torch.float32), True)
        (y.float().sum() + h.sum()).backward()
    with torch.no_grad():
        ops["selective_state_update"](torch.zeros(b, d, N), x[:, 0], dtv[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], bias)
        w = r(d, 4, dtype=torch.float32)
    y, _ = ops["causal_conv1d"](x, w, bias, "silu", r(b, d, 3), True)
    y.float().sum().backward()
    with torch.no_grad():
        ops["causal_conv1d_update"](x[:, 0], torch.zeros(b, d, 3, dtype=dt), w, bias, "silu")
    for hd in (64, 128):
        q, k, v, kf, vf = r(b, T, 8, hd), r(b, T, 2, hd), r(b, T, 2, hd), r(b, T, 2, hd), r(b, T, 2, hd)
        nc = -(-T // 32)
        km, vm = r(b, nc, 8, 2, hd), r(b, nc, 8, 2, hd)
        for valid in (torch.rand(b, nc, 8) < 0.5, None):
            o, lse = ops["bmojo_attention"](q, k, v, 32, kf, vf, None, km, vm, valid, None, True)
            (o.float().sum() + lse.sum()).backward()
        ops["bmojo_attention"](q, k, v).float().sum().backward()
        with torch.no_grad():
            ops["attention_decode"](q[:, 0], k, v, torch.rand(b, T) < 0.5)
    print(f"{len(_seen)} kernel variants compiled for sm_90; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
