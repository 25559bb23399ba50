"""One decoding step of the depthwise causal conv1d in Triton: the state (b, d, K-1) is shifted in place
(the whole-sequence conv is ``parallel.py``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import NO_BACKWARD, needs_grad, next_pow2, torch_fallback
from .parallel import _sigmoid, _silu


@triton.jit
def _conv_update_kernel(
    X, S, W, BIAS, Y, dim, Km1,
    sx_b, sx_d, ss_b, ss_d, ss_k, sw_d, sw_k,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < dim
    mask_dk = mask_d[:, None] & (offs_k < Km1)[None, :]
    s_ptr = S + pid_b * ss_b + offs_d[:, None] * ss_d + offs_k[None, :] * ss_k
    st = tl.load(s_ptr, mask=mask_dk, other=0.0)
    shifted = tl.load(s_ptr + ss_k, mask=mask_d[:, None] & (offs_k + 1 < Km1)[None, :], other=0.0)
    x = tl.load(X + pid_b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0)
    w = tl.load(W + offs_d[:, None] * sw_d + offs_k[None, :] * sw_k, mask=mask_dk, other=0.0).to(tl.float32)
    w_last = tl.load(W + offs_d * sw_d + (K - 1) * sw_k, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.sum(w * st.to(tl.float32), axis=1) + w_last * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * _sigmoid(acc)
    tl.store(Y + pid_b * dim + offs_d, acc.to(Y.dtype.element_ty), mask=mask_d)
    new = tl.where((offs_k == Km1 - 1)[None, :], x.to(S.dtype.element_ty)[:, None], shifted)
    tl.debug_barrier()  # every read of the old state happens before any write of the new one
    tl.store(s_ptr, new, mask=mask_dk)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Same contract as :func:`bmojo.ops.causal_conv1d_update`: conv_state (b, d, K-1) is shifted in place,
    y (b, d) returned. A decoding step without a backward: when autograd needs gradients of the inputs it
    runs the torch backend's step instead, with a one-time warning."""
    silu = _silu(activation)
    if needs_grad(x, weight, bias):
        return torch_fallback("causal_conv1d_update", x.device, NO_BACKWARD)(x, conv_state, weight, bias, activation)
    b, d = x.shape
    K = weight.shape[1]
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    BD = min(128, next_pow2(d))
    _conv_update_kernel[(triton.cdiv(d, BD), b)](
        x, conv_state, weight, bias, y, d, K - 1,
        *x.stride(), *conv_state.stride(), *weight.stride(),
        K=K, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=BD, BLOCK_K=next_pow2(max(K - 1, 1)),
    )
    return y
