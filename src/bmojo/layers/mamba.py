"""The Mamba-1 mixer: the ``mamba`` layer type, and the fading branch of ``bmojo_f`` / ``bmojo``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..cache import ConvSSMState, gather_positions
from ..configuration_bmojo import BMojoConfig


class BMojoMambaMixer(nn.Module):
    """Mamba-1 mixer (mamba-ssm's ``Mamba`` block; parameter names as transformers' ``MambaMixer``):
    in_proj to x and z, depthwise causal conv, x_proj to (dt, B, C), dt_proj, selective scan with
    ``A = -exp(A_log)``, skip ``D``, gate ``silu(z)``, out_proj. State: :class:`bmojo.cache.ConvSSMState`.

    Three ways to run, one per :mod:`bmojo.modeling_bmojo` path: :meth:`forward` (a fresh sequence),
    :meth:`resume` (new tokens after a state) and :meth:`step` (one token). ``rope`` is accepted and unused
    (the Mamba-2 mixer, which shares this interface, may rotate B and C)."""

    def __init__(self, config: BMojoConfig, layer_idx: int, kernels):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kernels = kernels  # the model's resolved ops (see bmojo.ops.kernels)
        d, di, N, R = config.hidden_size, config.d_inner, config.d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank = di, N, R
        self.in_proj = nn.Linear(d, 2 * di, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(di, di, config.d_conv, groups=di, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        # A_log and D stay fp32 (see _keep_in_fp32_modules) and out of weight decay (_no_weight_decay).
        self.A_log = nn.Parameter(torch.empty(di, N))
        self.D = nn.Parameter(torch.empty(di))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_weight_decay = True
        self.out_proj = nn.Linear(di, d, bias=config.proj_bias)

    @torch.no_grad()
    def init_mamba_weights(self) -> None:
        """S4D-real A, unit D, and dt bias = softplus^-1 of dt log-uniform in [dt_min, dt_max] (mamba-ssm)."""
        c = self.config
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A).expand(self.d_inner, -1))
        init.ones_(self.D)
        std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=self.dt_proj.bias.device) * (math.log(c.dt_max) - math.log(c.dt_min))
            + math.log(c.dt_min)
        ).clamp(min=c.dt_init_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))

    def _ssm_inputs(self, x: torch.Tensor):
        """x (..., d_inner) after the conv -> dt (..., d_inner) with the dt bias already added (one
        ``addmm``, so the scan gets ``dt_bias=None``), B, C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt is a column slice of x_proj's output: a contiguous copy (dt_rank wide) makes the addmm ~1.6x faster
        return F.linear(dt.contiguous(), self.dt_proj.weight, self.dt_proj.bias), B, C

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)

    def forward(self, u: torch.Tensor, state: ConvSSMState | None = None,
                lengths: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        """u (b, T, d) from position 0 -> (b, T, d). A ``state`` receives the conv/SSM states after each
        row's last token. ``lengths`` (b,): row i's tokens are ``u[i, :lengths[i]]``, the rest padding
        after them (causal: it never reaches a token; the SSM state is frozen over it, dt' = 0, so the
        final state is the state after the row's last token)."""
        ops = self.kernels.on(u.device)
        x, z = self.in_proj(u).chunk(2, dim=-1)
        whole_rows = state is not None and lengths is None
        out = ops.causal_conv1d(x, self._conv_weight(), self.conv1d.bias, "silu", return_final_state=whole_rows)
        x_conv, conv_state = out if whole_rows else (out, None)
        dt, B, C = self._ssm_inputs(x_conv)
        if lengths is not None:
            past_end = torch.arange(u.shape[1], device=u.device)[None, :] >= lengths[:, None]
            dt = dt.masked_fill(past_end[..., None], -1e4)  # softplus(-1e4) is exactly 0 in fp32
            if state is not None:  # the conv inputs of each row's last d_conv - 1 tokens
                K1 = self.config.d_conv - 1
                index = (lengths - K1)[:, None] + torch.arange(K1, device=u.device)[None, :]
                conv_state = gather_positions(x, index).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        out = ops.selective_scan(x_conv, dt, A, B, C, D=self.D, z=z, dt_bias=None, dt_softplus=True,
                                 return_final_state=state is not None)
        y = out[0] if state is not None else out
        if state is not None:
            state.conv, state.ssm = conv_state.to(state.conv.dtype).contiguous(), out[1]
        return self.out_proj(y)

    def resume(self, u: torch.Tensor, state: ConvSSMState, rope=None) -> torch.Tensor:
        """u (b, T, d): tokens after ``state`` -> (b, T, d); advances the state past them."""
        ops = self.kernels.on(u.device)
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x_conv, conv_state = ops.causal_conv1d(x, self._conv_weight(), self.conv1d.bias, "silu",
                                               initial_state=state.conv.to(x.dtype), return_final_state=True)
        dt, B, C = self._ssm_inputs(x_conv)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ops.selective_scan(x_conv, dt, A, B, C, D=self.D, z=z, dt_bias=None, dt_softplus=True,
                                          initial_state=state.ssm, return_final_state=True)
        state.conv, state.ssm = conv_state.to(state.conv.dtype).contiguous(), ssm_state
        return self.out_proj(y)

    def step(self, u: torch.Tensor, state: ConvSSMState, rope=None) -> torch.Tensor:
        """One token: u (b, d) -> (b, d); updates the state in place."""
        ops = self.kernels.on(u.device)
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = ops.causal_conv1d_update(x, state.conv, self._conv_weight(), self.conv1d.bias, "silu")
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(state.ssm, x, dt, A, B, C, D=self.D, z=z, dt_bias=None, dt_softplus=True)
        return self.out_proj(y)
