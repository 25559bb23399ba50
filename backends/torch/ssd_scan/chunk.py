"""Chunked SSD scan (Mamba-2) for the torch backend: the matrix ("state space dual") form, fast on CPU and
differentiable by autograd through plain torch ops (the decoding step is ``fused_recurrent.py``; the
contract and the oracle are ``bmojo.ops.ssd_scan`` and ``bmojo.ops.reference.ssd_scan``).

Mamba-2 decays the whole (P, N) state of a head by one scalar per token, ``exp(a_t)`` with
``a_t = dt'_t A_h <= 0``, so within a chunk of L tokens the scan is a masked matrix product. With
``seg[i, j] = a_{j+1} + ... + a_i`` (the log-decay from token j to token i, i >= j), per head:

* intra-chunk: ``y_i += sum_{j <= i} (C_i . B_j) exp(seg[i, j]) dt'_j x_j``: the (L, L) kernel
  ``(C B^T) * exp(seg) * dt'`` (causal), times the chunk's x, one batched matmul;
* the chunk's initial state h0: ``y_i += exp(seg[i, -1]) C_i h0``, with ``seg[i, -1] = a_0 + ... + a_i``;
* the chunk's end state from a zero start: ``S = sum_j exp(seg[L-1, j]) dt'_j x_j B_j^T`` (P, N);
* state passing: ``h0_{c+1} = exp(a_0 + ... + a_{L-1}) h0_c + S_c``, a loop over chunks (never over
  tokens): T / L small elementwise steps on (b, H, P, N).

``seg`` is computed as a masked cumulative sum of ``a`` (each entry a sum of same-sign terms, starting from
zero at j), never as a difference of two prefix sums, so a strongly decaying chunk (large dt' |A|) keeps
full relative precision and every decay is in [0, 1]. B and C are read per group: the (L, L) products
``C B^T`` are computed once per group and broadcast over the H / G heads that read it, and the state products
put the heads of a group side by side in the columns (``(N, L) @ (L, R P)``, states held state-major
(b, G, N, R, P)), so B and C are never copied per head.

T is padded to a multiple of L with dt' = 0 (decay 1, no input): padded tokens leave the state unchanged,
so the state after the last chunk is the final state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def _dt_transform(dt, dt_bias, dt_softplus, dt_limit):
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    return dtf.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))


def _chunk_masks(L: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(k > j) and (i >= j) masks, (L, L) bool."""
    idx = torch.arange(L, device=device)
    return idx[:, None] > idx[None, :], idx[:, None] >= idx[None, :]


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """SSD scan, same contract as ``ssd_scan_ref``: x, z (b, T, H, P); dt (b, T, H); A, dt_bias (H,);
    B, C (b, T, G, N); D (H,) or (H, P); initial_state (b, H, P, N). Returns y (b, T, H, P) in x's dtype
    and, if ``return_final_state``, the final state (b, H, P, N) fp32. All arithmetic is fp32.
    ``chunk_size`` is the length L of the chunks (the (L, L) kernels cost O(T L H) memory)."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    R = H // G  # heads per group
    h = x.new_zeros(b, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        y = x.new_zeros(b, 0, H, P)
        return (y, h.clone()) if return_final_state else y
    xf = x.float()
    dtf = _dt_transform(dt, dt_bias, dt_softplus, dt_limit)
    L = max(1, min(int(chunk_size), T))
    nc = -(-T // L)
    pad = nc * L - T
    xp, dtp, Bp, Cp = xf, dtf, B.float(), C.float()
    if pad:
        xp = F.pad(xp, (0, 0, 0, 0, 0, pad))
        dtp = F.pad(dtp, (0, 0, 0, pad))  # dt' = 0 after the transform: the padding leaves the state as is
        Bp = F.pad(Bp, (0, 0, 0, 0, 0, pad))
        Cp = F.pad(Cp, (0, 0, 0, 0, 0, pad))
    x6 = xp.view(b, nc, L, G, R, P)  # token-major chunks
    dth = dtp.view(b, nc, L, G, R).permute(0, 1, 3, 4, 2)  # (b, nc, G, R, L)
    Bg = Bp.view(b, nc, L, G, N).transpose(2, 3)  # (b, nc, G, L, N)
    Cg = Cp.view(b, nc, L, G, N).transpose(2, 3)
    a = dth * A.float().view(G, R, 1)  # log-decays (b, nc, G, R, L), <= 0
    later, causal = _chunk_masks(L, x.device)
    # seg[i, j] = sum_{j < k <= i} a_k: rows k of a masked to k > j, summed over k <= i
    seg = a.unsqueeze(-1).expand(*a.shape, L).masked_fill(~later, 0.0).cumsum(-2)  # (..., L, L) [i, j]
    decay = torch.exp(seg).masked_fill(~causal, 0.0)
    cs = a.cumsum(-1)  # a_0 + ... + a_i: the log-decay from the chunk start to token i
    # intra-chunk, per head: ((C B^T) * decay * dt'_j) @ x
    CB = torch.matmul(Cg, Bg.transpose(-1, -2))  # (b, nc, G, L, L) [i, j] = C_i . B_j
    W = CB.unsqueeze(3) * decay * dth.unsqueeze(-2)  # (b, nc, G, R, L, L)
    y_in = torch.matmul(W, x6.permute(0, 1, 3, 4, 2, 5))  # (b, nc, G, R, L, P)
    # each chunk's end state from a zero start, S^T = sum_j B_j (exp(seg[L-1, j]) dt'_j x_j)^T, with the heads
    # of a group side by side in the columns: (N, L) @ (L, R P), no copy of B per head
    w_end = (decay[..., L - 1, :] * dth).permute(0, 1, 4, 2, 3).unsqueeze(-1)  # (b, nc, L, G, R, 1)
    xw = (x6 * w_end).transpose(2, 3).reshape(b, nc, G, L, R * P)
    S = torch.matmul(Bg.transpose(-1, -2), xw)  # (b, nc, G, N, R P)
    # state passing, state-major (b, G, N, R, P): one small step per chunk
    decay_chunk = torch.exp(cs[..., L - 1]).view(b, nc, G, 1, R, 1)
    h = h.view(b, G, R, P, N).permute(0, 1, 4, 2, 3)  # (b, G, N, R, P)
    S = S.view(b, nc, G, N, R, P)
    starts = []
    for c in range(nc):
        starts.append(h)
        h = decay_chunk[:, c] * h + S[:, c]
    h0 = torch.stack(starts, 1).view(b, nc, G, N, R * P)  # the state entering each chunk
    # the initial state's contribution, exp(cs_i) C_i h0, again (L, N) @ (N, R P) per group
    y = torch.matmul(Cg, h0).view(b, nc, G, L, R, P) * torch.exp(cs).permute(0, 1, 2, 4, 3).unsqueeze(-1)
    y = y + y_in.transpose(3, 4)
    y = y.transpose(2, 3).reshape(b, nc * L, H, P)
    if pad:
        y = y[:, :T]
    h = h.permute(0, 1, 3, 4, 2).reshape(b, H, P, N)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y
