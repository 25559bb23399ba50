"""Bridge between the ``bmojo.ops.ssd_scan`` signature and its NKI kernel: argument layout on the way in (dt with
time on the free axis, per-head parameters as (H, 1) / (H, P) fp32 columns, states with the state index first),
the final state back to (b, H, P, N). Pure PyTorch, so it runs on XLA tensors (where it feeds the real kernel)
and on CPU tensors (where the tests feed it to ``nki.simulate`` or the emulator).

``ssd_scan_impl`` takes ``call(kernel, *args)``, which runs one kernel: on a Neuron device that is simply
``kernel(*args)`` (``bmojo.backends.neuron.library.direct_call``); in the tests it is a simulator call. The
kernel module is imported lazily: it needs the ``nki`` package.
"""
from __future__ import annotations

import importlib
import math

import torch


def _kernels(form: str):
    return importlib.import_module(f"{__package__}.{form}")


def ssd_scan_impl(call, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf),
                  initial_state=None, chunk=None):
    """-> y (b, T, H, P) in x.dtype, final state (b, H, P, N) fp32. ``chunk``: tokens per chunk (<= 128; the
    kernel's default when None)."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    h0 = (initial_state.float() if initial_state is not None
          else x.new_zeros(b, H, P, N, dtype=torch.float32))
    if T == 0:
        return x.new_empty(b, 0, H, P), h0.clone()
    K = _kernels("chunk")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_hi = math.isfinite(hi)
    col = lambda t: (t.float() if t is not None else x.new_zeros(H, dtype=torch.float32)).reshape(H, 1).contiguous()  # noqa: E731
    Dm = (D.float() if D is not None else x.new_zeros(H, dtype=torch.float32))
    Dm = (Dm[:, None].expand(H, P) if Dm.dim() == 1 else Dm).contiguous()
    y, hT = call(K.ssd_scan_fwd, x.contiguous(), dt.transpose(1, 2).contiguous(), col(A), B.contiguous(), C.contiguous(),
                 Dm, (z if z is not None else x).contiguous(), col(dt_bias), h0.transpose(2, 3).contiguous(),
                 D is not None, z is not None, dt_bias is not None, bool(dt_softplus), lo, hi if has_hi else 0.0, has_hi,
                 *(() if chunk is None else (int(chunk),)))
    return y, hT.transpose(2, 3).contiguous()
