"""The Mamba-2 (SSD) mixer: the ``mamba2`` layer type, and the fading branch of ``bmojo_f`` / ``bmojo``
layers with ``fading_mixer="mamba2"`` (the authors' released B'MOJO-F)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..cache import ConvSSMState, gather_positions
from ..configuration_bmojo import BMojoConfig
from .common import BMojoRMSNorm, apply_rotary


class GatedRMSNorm(nn.Module):
    """mamba-ssm's gated RMSNorm (transformers' ``MambaRMSNormGated``): ``y * silu(z)`` then an RMSNorm
    over groups of ``group_size`` channels (``norm_before_gate``: normalise first, then gate)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float, norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            y = y * gate
        groups = y.view(*y.shape[:-1], -1, self.group_size)
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(y.shape)
        if self.norm_before_gate:
            y = y * gate
        return self.weight * y.to(dtype)


class BMojoMamba2Mixer(nn.Module):
    """Mamba-2 mixer (mamba-ssm's ``Mamba2``; parameter names as transformers' ``Mamba2Mixer``):
    in_proj to [z, x, B, C, dt], depthwise causal conv over x‖B‖C, the SSD scan (``ops.ssd_scan``) with a
    per-head scalar ``A = -exp(A_log)``, skip ``D`` and ``dt_bias``, gated RMSNorm with z, out_proj.

    The authors' variant (``mamba2_xb_heads``, ``mamba2_bc_norm``, ``mamba2_bc_rope``) projects x and B for
    fewer heads and repeats them to every head (as attention repeats key/value heads), normalises B and C
    per head and rotates them like keys and queries, before the conv. State: :class:`ConvSSMState` with
    conv (b, conv channels, K-1) and ssm (b, H, P, N) fp32. :meth:`forward` (a fresh sequence),
    :meth:`resume` (tokens after a state) and :meth:`step` (one token), as the Mamba-1 mixer."""

    def __init__(self, config: BMojoConfig, layer_idx: int, kernels):
        super().__init__()
        c = self.config = config
        self.layer_idx, self.kernels = layer_idx, kernels
        H, P, N, G = c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size, c.mamba2_n_groups
        self.num_heads, self.head_dim, self.state_size = H, P, N
        self.xb_heads = c.mamba2_xb_heads or H  # heads x is projected for (repeated to H)
        self.b_groups = c.mamba2_xb_heads or G  # groups B is projected for (repeated to C's when they differ)
        self.c_groups = G
        self.d_inner = H * P
        self.split = [self.xb_heads * P, self.b_groups * N, G * N]
        self.conv_dim = sum(self.split)
        self.in_proj = nn.Linear(c.hidden_size, self.d_inner + self.conv_dim + H, bias=c.mamba2_use_bias)
        K = c.mamba2_conv_kernel
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, padding=K - 1,
                                bias=c.mamba2_use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H * P if c.mamba2_D_has_hdim else H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        groups = G if c.mamba2_norm_groups is None else c.mamba2_norm_groups
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // groups, c.mamba2_norm_eps, c.mamba2_norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=c.mamba2_use_bias)
        self.B_norm = self.C_norm = None
        if c.mamba2_bc_norm:
            self.B_norm, self.C_norm = BMojoRMSNorm(N, 1e-6), BMojoRMSNorm(N, 1e-6)

    @torch.no_grad()
    def init_mamba_weights(self) -> None:
        """mamba-ssm's init: A uniform in A_init_range (A_log = log A), unit D, dt bias = softplus^-1 of dt
        log-uniform in [dt_min, dt_max]."""
        c = self.config
        lo, hi = c.mamba2_A_init_range
        init.copy_(self.A_log, torch.log(torch.empty_like(self.A_log).uniform_(max(lo, 1e-4), hi)))
        init.ones_(self.D)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    # -- pieces ----------------------------------------------------------------------------------
    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)

    def _prepare_bc(self, xBC: torch.Tensor, rope) -> torch.Tensor:
        """The authors' B/C norms and RoPE, before the conv: xBC (..., conv_dim) -> same."""
        if self.B_norm is None and not self.config.mamba2_bc_rope:
            return xBC
        N = self.state_size
        x, B, C = xBC.split(self.split, dim=-1)
        B, C = B.unflatten(-1, (-1, N)), C.unflatten(-1, (-1, N))
        if self.B_norm is not None:
            B, C = self.B_norm(B), self.C_norm(C)
        if self.config.mamba2_bc_rope and rope is not None:
            squeeze = B.dim() == 3  # one token: (b, heads, N)
            if squeeze:
                B, C = B[:, None], C[:, None]
            B, C = apply_rotary(B, *rope), apply_rotary(C, *rope)
            if squeeze:
                B, C = B[:, 0], C[:, 0]
        return torch.cat([x, B.flatten(-2), C.flatten(-2)], -1)

    def _heads(self, xBC: torch.Tensor):
        """xBC after the conv (..., conv_dim) -> x (..., H, P), B, C (..., G, N) with G = C's groups."""
        P, N, H = self.head_dim, self.state_size, self.num_heads
        x, B, C = xBC.split(self.split, dim=-1)
        x = x.unflatten(-1, (self.xb_heads, P))
        if self.xb_heads != H:
            x = x.repeat_interleave(H // self.xb_heads, dim=-2)
        B, C = B.unflatten(-1, (self.b_groups, N)), C.unflatten(-1, (self.c_groups, N))
        if self.b_groups != self.c_groups:
            B = B.repeat_interleave(self.c_groups // self.b_groups, dim=-2)
        return x, B, C

    def _D(self) -> torch.Tensor:
        return self.D.view(self.num_heads, self.head_dim) if self.config.mamba2_D_has_hdim else self.D

    def _finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _split_in(self, u: torch.Tensor, rope):
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        return z, self._prepare_bc(xBC, rope), dt

    # -- the three forms ----------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, state: ConvSSMState | None = None, lengths: torch.Tensor | None = None,
                rope=None) -> torch.Tensor:
        """u (b, T, d) from position 0 -> (b, T, d); ``state`` receives the states after each row's last
        token; ``lengths`` marks trailing padding (the SSM is frozen over it, as in the Mamba-1 mixer)."""
        ops, c = self.kernels.on(u.device), self.config
        z, xBC, dt = self._split_in(u, rope)
        whole = state is not None and lengths is None
        out = ops.causal_conv1d(xBC, self._conv_weight(), self.conv1d.bias, "silu", return_final_state=whole)
        xBC_conv, conv_state = out if whole else (out, None)
        if lengths is not None:
            past_end = torch.arange(u.shape[1], device=u.device)[None, :] >= lengths[:, None]
            dt = dt.masked_fill(past_end[..., None], -1e4)  # softplus(-1e4 + bias) is 0 in fp32: frozen
            if state is not None:
                K1 = c.mamba2_conv_kernel - 1
                index = (lengths - K1)[:, None] + torch.arange(K1, device=u.device)[None, :]
                conv_state = gather_positions(xBC, index).transpose(1, 2)
        x, B, C = self._heads(xBC_conv)
        A = -torch.exp(self.A_log.float())
        out = ops.ssd_scan(x, dt, A, B, C, D=self._D(), dt_bias=self.dt_bias, dt_softplus=True,
                           dt_limit=tuple(c.mamba2_dt_limit), return_final_state=state is not None)
        y = out[0] if state is not None else out
        if state is not None:
            state.conv, state.ssm = conv_state.to(state.conv.dtype).contiguous(), out[1]
        return self._finish(y, z)

    def resume(self, u: torch.Tensor, state: ConvSSMState, rope=None) -> torch.Tensor:
        """u (b, T, d): tokens after ``state`` -> (b, T, d); advances the state past them."""
        ops, c = self.kernels.on(u.device), self.config
        z, xBC, dt = self._split_in(u, rope)
        xBC_conv, conv_state = ops.causal_conv1d(xBC, self._conv_weight(), self.conv1d.bias, "silu",
                                                 initial_state=state.conv.to(xBC.dtype), return_final_state=True)
        x, B, C = self._heads(xBC_conv)
        A = -torch.exp(self.A_log.float())
        y, ssm = ops.ssd_scan(x, dt, A, B, C, D=self._D(), dt_bias=self.dt_bias, dt_softplus=True,
                              dt_limit=tuple(c.mamba2_dt_limit), initial_state=state.ssm, return_final_state=True)
        state.conv, state.ssm = conv_state.to(state.conv.dtype).contiguous(), ssm
        return self._finish(y, z)

    def step(self, u: torch.Tensor, state: ConvSSMState, rope=None) -> torch.Tensor:
        """One token: u (b, d) -> (b, d); the state is updated in place."""
        ops, c = self.kernels.on(u.device), self.config
        z, xBC, dt = self._split_in(u, rope)
        xBC = ops.causal_conv1d_update(xBC, state.conv, self._conv_weight(), self.conv1d.bias, "silu")
        x, B, C = self._heads(xBC)
        A = -torch.exp(self.A_log.float())
        y = ops.ssd_state_update(state.ssm, x, dt, A, B, C, D=self._D(), dt_bias=self.dt_bias, dt_softplus=True,
                                 dt_limit=tuple(c.mamba2_dt_limit))
        return self._finish(y, z)
