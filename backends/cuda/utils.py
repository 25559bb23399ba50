"""Small helpers shared by the Triton kernels of the cuda backend."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


NO_BACKWARD = "the Triton decoding-step kernel has no backward and autograd needs gradients of its inputs"


def torch_fallback(op: str, device: torch.device, reason: str):
    """The torch backend's ``op`` for ``device``, announced once (naming the op, this backend and why):
    what a cuda op runs when its kernel cannot serve a call."""
    from bmojo.ops import registry

    registry.warn_once(("cuda", op, reason), f"bmojo: {op} on the cuda backend falls back to the torch backend: {reason}")
    return registry.torch_implementation(op, device)
