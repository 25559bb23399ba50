"""Bridges between the ``bmojo.ops`` signature of B'MOJO attention and its NKI kernels (``parallel.py``):
argument layout on the way in, zero gradients for keys that are given but never visible on the way out.
Pure PyTorch, so it runs on XLA tensors (where it feeds the real kernels) and on CPU tensors (where the
tests feed it to ``nki.simulate`` or the emulator). ``call(kernel, *args)`` runs one kernel, as in
``selective_scan/layout.py``; the kernel module is imported lazily (it needs the ``nki`` package).
"""
from __future__ import annotations

import importlib
import math

import torch


def _kernels(form: str):
    return importlib.import_module(f"{__package__}.{form}")


def _attn_common(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale):
    w = 0 if window is None else int(window)
    mf = (w if fading_window is None else int(fading_window)) if window is not None else 0
    has_fading = k_fading is not None and window is not None and mf > 0  # mf == 0: no fading key is visible
    mf = mf if has_fading else 0
    has_memory = k_memory is not None and window is not None
    mv = None
    if has_memory:
        mv = (memory_valid.float() if memory_valid is not None
              else q.new_ones(k_memory.shape[:3], dtype=torch.float32)).contiguous()
    sc = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return dict(q=c(q), k=c(k), v=c(v), kf=c(k_fading) if has_fading else None, vf=c(v_fading) if has_fading else None,
                km=c(k_memory) if has_memory else None, vm=c(v_memory) if has_memory else None, mv=mv,
                w=w, mf=mf, scale=sc, has_fading=has_fading, has_memory=has_memory)


def bmojo_attention_impl(call, q, k, v, window=None, k_fading=None, v_fading=None, fading_window=None, k_memory=None,
                         v_memory=None, memory_valid=None, scale=None):
    """-> o (b, T, Hq, D) in q.dtype, lse (b, T, Hq) fp32."""
    K = _kernels("parallel")
    a = _attn_common(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale)
    return call(K.bmojo_attention_fwd, a["q"], a["k"], a["v"], a["kf"], a["vf"], a["km"], a["vm"], a["mv"],
                a["w"], a["mf"], a["scale"], a["has_fading"], a["has_memory"])


def bmojo_attention_backward_impl(call, do, dlse, q, k, v, window, k_fading, v_fading, fading_window, k_memory,
                                  v_memory, memory_valid, scale, o, lse):
    """-> dq, dk, dv, dk_fading, dv_fading, dk_memory, dv_memory (None where the input was None or unused)."""
    K = _kernels("parallel")
    a = _attn_common(q, k, v, window, k_fading, v_fading, fading_window, k_memory, v_memory, memory_valid, scale)
    dlse = dlse.float().contiguous() if dlse is not None else lse.new_zeros(lse.shape, dtype=torch.float32)
    outs = list(call(K.bmojo_attention_bwd, a["q"], a["k"], a["v"], a["kf"], a["vf"], a["km"], a["vm"], a["mv"],
                     o.contiguous(), do.to(o.dtype).contiguous(), lse.float().contiguous(), dlse,
                     a["w"], a["mf"], a["scale"], a["has_fading"], a["has_memory"]))
    dq, dk, dv = outs[:3]
    rest = outs[3:]
    dkf = dvf = dkm = dvm = None
    if a["has_fading"]:
        dkf, dvf = rest[:2]
        rest = rest[2:]
    elif k_fading is not None:  # fading keys given but invisible (no window): zero gradient
        dkf, dvf = torch.zeros_like(k_fading), torch.zeros_like(v_fading)
    if a["has_memory"]:
        dkm, dvm = rest[:2]
    elif k_memory is not None:
        dkm, dvm = torch.zeros_like(k_memory), torch.zeros_like(v_memory)
    return dq, dk, dv, dkf, dvf, dkm, dvm
