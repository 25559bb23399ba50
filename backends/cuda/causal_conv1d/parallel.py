"""Depthwise causal conv1d in Triton over every position at once: prefill forward and backward (the
one-step update is ``fused_recurrent.py``).

x (b, T, d), weight (d, K), bias (d,), state (b, d, K-1): the K-1 inputs before position 0.
Tap j multiplies x[t - (K-1) + j], as the contract says (:func:`bmojo.ops.causal_conv1d`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import next_pow2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _conv_pre(X, W, INIT, pid_b, t, offs_d, mask_t, mask_d, T,
              sx_b, sx_t, sx_d, sw_d, sw_k, si_b, si_d, si_k,
              K: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + offs_d * sw_d + j * sw_k, mask=mask_d, other=0.0).to(tl.float32)
        p = t - (K - 1) + j
        m = ((p >= 0) & mask_t)[:, None] & mask_d[None, :]
        xv = tl.load(X + pid_b * sx_b + p[:, None] * sx_t + offs_d[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
        if HAS_INIT:
            mi = ((p < 0) & mask_t)[:, None] & mask_d[None, :]
            xv += tl.load(INIT + pid_b * si_b + offs_d[None, :] * si_d + (p + K - 1)[:, None] * si_k,
                          mask=mi, other=0.0).to(tl.float32)
        acc += w[None, :] * xv
    return acc


@triton.jit
def _conv_fwd_kernel(
    X, W, BIAS, INIT, Y, T, dim,
    sx_b, sx_t, sx_d, sw_d, sw_k, si_b, si_d, si_k, sy_b, sy_t, sy_d,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = t < T
    mask_d = offs_d < dim
    acc = _conv_pre(X, W, INIT, pid_b, t, offs_d, mask_t, mask_d, T, sx_b, sx_t, sx_d, sw_d, sw_k,
                    si_b, si_d, si_k, K, HAS_INIT, BLOCK_T, BLOCK_D)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * _sigmoid(acc)
    m = mask_t[:, None] & mask_d[None, :]
    tl.store(Y + pid_b * sy_b + t[:, None] * sy_t + offs_d[None, :] * sy_d, acc.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_w_kernel(
    X, W, BIAS, INIT, DY, DPRE, DW, DBIAS, T, dim,
    sx_b, sx_t, sx_d, sw_d, sw_k, si_b, si_d, si_k, so_b, so_t, so_d,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dpre = dy * act'(pre) (stored fp32), and this tile's share of dweight / dbias (fp32 atomics)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = t < T
    mask_d = offs_d < dim
    m = mask_t[:, None] & mask_d[None, :]
    dpre = tl.load(DY + pid_b * so_b + t[:, None] * so_t + offs_d[None, :] * so_d, mask=m, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(X, W, INIT, pid_b, t, offs_d, mask_t, mask_d, T, sx_b, sx_t, sx_d, sw_d, sw_k,
                        si_b, si_d, si_k, K, HAS_INIT, BLOCK_T, BLOCK_D)
        if HAS_BIAS:
            pre += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        sig = _sigmoid(pre)
        dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
    tl.store(DPRE + (pid_b * T + t[:, None]) * dim + offs_d[None, :], dpre, mask=m)
    if HAS_BIAS:
        tl.atomic_add(DBIAS + offs_d, tl.sum(dpre, axis=0), mask=mask_d)
    for j in tl.static_range(K):
        p = t - (K - 1) + j
        mx = ((p >= 0) & mask_t)[:, None] & mask_d[None, :]
        xv = tl.load(X + pid_b * sx_b + p[:, None] * sx_t + offs_d[None, :] * sx_d, mask=mx, other=0.0).to(tl.float32)
        if HAS_INIT:
            mi = ((p < 0) & mask_t)[:, None] & mask_d[None, :]
            xv += tl.load(INIT + pid_b * si_b + offs_d[None, :] * si_d + (p + K - 1)[:, None] * si_k,
                          mask=mi, other=0.0).to(tl.float32)
        tl.atomic_add(DW + offs_d * K + j, tl.sum(dpre * xv, axis=0), mask=mask_d)


@triton.jit
def _conv_bwd_x_kernel(
    W, DPRE, DX, DINIT, T, dim, sw_d, sw_k,
    K: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[p] = sum_j w[j] dpre[p + K-1 - j] for p in [-(K-1), T): p < 0 goes to d initial_state."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T) - (K - 1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + offs_d * sw_d + j * sw_k, mask=mask_d, other=0.0).to(tl.float32)
        s = p + (K - 1) - j
        m = ((s >= 0) & (s < T))[:, None] & mask_d[None, :]
        acc += w[None, :] * tl.load(DPRE + (pid_b * T + s[:, None]) * dim + offs_d[None, :], mask=m, other=0.0)
    mx = ((p >= 0) & (p < T))[:, None] & mask_d[None, :]
    tl.store(DX + (pid_b * T + p[:, None]) * dim + offs_d[None, :], acc.to(DX.dtype.element_ty), mask=mx)
    if HAS_INIT:
        mi = (p < 0)[:, None] & mask_d[None, :]
        tl.store(DINIT + (pid_b * dim + offs_d[None, :]) * (K - 1) + (p + K - 1)[:, None],
                 acc.to(DINIT.dtype.element_ty), mask=mi)


def _silu(activation) -> bool:
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")


def _blocks(T: int, d: int) -> tuple[int, int]:
    return min(32, next_pow2(T)), min(32, next_pow2(d))


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu):
        b, T, d = x.shape
        K = weight.shape[1]
        init = None if initial_state is None else initial_state.to(x.dtype)
        y = torch.empty(b, T, d, dtype=x.dtype, device=x.device)
        BT, BD = _blocks(T, d)
        si = init.stride() if init is not None else (0, 0, 0)
        _conv_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(d, BD), b)](
            x, weight, bias, init, y, T, d, *x.stride(), *weight.stride(), *si, *y.stride(),
            K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=silu, BLOCK_T=BT, BLOCK_D=BD,
        )
        ctx.save_for_backward(x, weight, bias, init)
        ctx.silu = silu
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, init = ctx.saved_tensors
        b, T, d = x.shape
        K = weight.shape[1]
        BT, BD = _blocks(T, d)
        dev = x.device
        dpre = torch.empty(b, T, d, dtype=torch.float32, device=dev)
        dw = torch.zeros(d, K, dtype=torch.float32, device=dev)
        dbias = torch.zeros(d, dtype=torch.float32, device=dev) if bias is not None else None
        si = init.stride() if init is not None else (0, 0, 0)
        _conv_bwd_w_kernel[(triton.cdiv(T, BT), triton.cdiv(d, BD), b)](
            x, weight, bias, init, dy, dpre, dw, dbias, T, d,
            *x.stride(), *weight.stride(), *si, *dy.stride(),
            K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=ctx.silu, BLOCK_T=BT, BLOCK_D=BD,
        )
        dx = torch.empty(b, T, d, dtype=x.dtype, device=dev)
        want_init = init is not None and ctx.needs_input_grad[3] and K > 1
        dinit = torch.empty(b, d, K - 1, dtype=torch.float32, device=dev) if want_init else None
        _conv_bwd_x_kernel[(triton.cdiv(T + K - 1, BT), triton.cdiv(d, BD), b)](
            weight, dpre, dx, dinit, T, d, *weight.stride(),
            K=K, HAS_INIT=want_init, BLOCK_T=BT, BLOCK_D=BD,
        )
        if init is not None and ctx.needs_input_grad[3] and dinit is None:
            dinit = torch.zeros(b, d, 0, dtype=torch.float32, device=dev)
        return (dx, dw.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype),
                None if dinit is None else dinit.to(ctx.init_dtype), None)


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """Same contract as :func:`bmojo.ops.causal_conv1d`."""
    silu = _silu(activation)
    b, T, d = x.shape
    K = weight.shape[1]
    if T == 0:
        y = x.new_empty(b, 0, d)
    else:
        y = CausalConv1dFn.apply(x, weight, bias, initial_state, silu)
    if not return_final_state:
        return y
    # the last K-1 inputs of [initial_state, x]: plain torch, so autograd covers it
    prev = x.new_zeros(b, d, K - 1) if initial_state is None else initial_state.to(x.dtype)
    xp = torch.cat([prev, x.transpose(1, 2)], dim=-1)
    return y, xp[:, :, xp.shape[-1] - (K - 1):].contiguous()
