"""Depthwise causal conv1d for the torch backend, token-major, K fused multiply-adds (K = taps, ~4): every
position at once (the one-token step is ``fused_recurrent.py``).

Measured on a 2-core CPU at (b, T, d, K) = (1, 2048, 1024, 4): ``F.conv1d(groups=d)`` on the (b, d, T)
layout costs ~38 ms (two transposes plus a slow depthwise kernel); K ``addcmul`` on contiguous
(b, T, d) slices costs ~8 ms forward (~34 vs ~50 ms forward + backward), so the taps win. It loops over
the K taps, never over T.

With a symbolic T (``torch.export`` with a dynamic T, see :func:`_traceable`), the
slice bounds above would branch on T; :func:`causal_conv1d_traceable` reads the taps from one
left-padded copy ``[state or zeros; x]`` instead, with no Python control flow on T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import traceable as _traceable


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The conv's activation: None, or silu (alias swish); any other name is refused."""
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Same contract as ``causal_conv1d_ref``.

    x (b, T, d); weight (d, K); bias (d,); initial_state (b, d, K-1), the K-1 inputs before position 0
    (zeros if None). Returns y (b, T, d) in x's dtype and, if asked, the final state (b, d, K-1): the
    last K-1 inputs, left-padded with the initial state when T < K-1.
    """
    if _traceable(x):
        return causal_conv1d_traceable(x, weight, bias, activation, initial_state, return_final_state)
    b, T, d = x.shape
    K = weight.shape[-1]
    _activate(x.new_empty(0), activation)  # reject a bad activation name before any work
    # The explicit left context (the state, or zeros) makes the conv causal and lets a call continue
    # a previous one; it is kept in x's dtype, like the reference's state.
    prev = None if initial_state is None else initial_state.to(x.dtype).transpose(1, 2)  # (b, K-1, d)
    # fp32 arithmetic, like the reference. The taps as rows of a (K, d) copy: a contiguous per-channel
    # vector broadcasts ~3x faster than a strided column of the (d, K) weight.
    xf, wf = x.float(), weight.float().t().contiguous()
    # y_t = sum_j w_j xp[t - (K-1) + j] over xp = [prev; x]. Tap j reads x shifted right by s = K-1-j:
    # rows t >= s take x[t - s], rows t < s take prev[t + j] (nothing when there is no state). Taps
    # run on slices of x and of the output, so x is never copied into a padded buffer.
    last = wf[K - 1]
    y = xf * last if bias is None else torch.addcmul(bias.float(), xf, last)
    for j in range(K - 1):
        s = K - 1 - j
        if s < T:
            y[:, s:].addcmul_(xf[:, : T - s], wf[j])
        if prev is not None:
            n = min(s, T)
            y[:, :n].addcmul_(prev[:, j : j + n].float(), wf[j])
    if activation is not None and not torch.is_grad_enabled():
        y = F.silu(y, inplace=True)  # inference: y is a fresh buffer (activation already validated)
    else:
        y = _activate(y, activation)
    y = y.to(x.dtype)
    if return_final_state:
        if prev is None:
            prev = x.new_zeros(b, K - 1, d)
        xp = torch.cat([prev, x[:, max(T - (K - 1), 0):]], dim=1)  # only the last K-1 inputs are kept
        return y, xp[:, xp.shape[1] - (K - 1):].transpose(1, 2).contiguous()
    return y


def causal_conv1d_traceable(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """:func:`causal_conv1d_torch` with no Python control flow on T (the path for a symbolic T; also
    correct eagerly). Tap j reads ``xp[j : j + T]`` of ``xp = [state or zeros; x]`` (b, K-1+T, d), in the
    fast path's order (last tap first, the bias fused), so the result is the same bit for bit."""
    b, T, d = x.shape
    K = weight.shape[-1]
    _activate(x.new_empty(0), activation)
    prev = x.new_zeros(b, K - 1, d) if initial_state is None else initial_state.to(x.dtype).transpose(1, 2)
    xp = torch.cat([prev, x], dim=1)  # (b, K-1+T, d) in x's dtype
    xpf, wf = xp.float(), weight.float().t()
    y = x.float() * wf[K - 1] if bias is None else torch.addcmul(bias.float(), x.float(), wf[K - 1])
    for j in range(K - 1):  # static: the taps
        y = torch.addcmul(y, xpf[:, j : j + T], wf[j])
    y = _activate(y, activation).to(x.dtype)
    if return_final_state:
        return y, xp[:, T:].transpose(1, 2).contiguous()  # the last K-1 inputs
    return y
