"""The small modules every layer type shares: RMSNorm, RoPE, the SwiGLU MLP, and the in-place
inference helpers they use."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..configuration_bmojo import UNSUPPORTED_ROPE_TYPES, BMojoConfig


def inference() -> bool:
    """No autograd recording and no compiler: in-place updates of fresh intermediates are safe and
    worth it (they save a large buffer each; on CPU a fresh multi-MB buffer also costs page faults).
    Under torch.compile the compiler fuses and reuses buffers itself."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def residual_add(h: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``h + branch``; in inference, accumulated into ``branch`` (a fresh output of a projection) when
    that gives the same dtype. ``h`` itself is never written (callers may keep it, e.g. hidden states)."""
    if inference() and branch.dtype == torch.result_type(h, branch) and branch.shape == h.shape:
        return branch.add_(h)
    return h + branch


class BMojoRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        rstd = torch.rsqrt((xf * xf).mean(-1, keepdim=True).add_(self.variance_epsilon))
        y = (xf * rstd).to(dtype)
        if inference() and y.dtype == self.weight.dtype:
            return y.mul_(self.weight)  # same values as weight * y, one large buffer fewer
        return self.weight * y


class BMojoRotaryEmbedding(nn.Module):
    """RoPE at absolute positions (Llama's rotary, half-split layout) for ``config.rope_parameters``:
    ``default`` here, every scaling type (linear, llama3, yarn, ...) from transformers' own
    ``ROPE_INIT_FUNCTIONS``, with their attention scaling folded into cos and sin as Llama does."""

    def __init__(self, config: BMojoConfig):
        super().__init__()
        params = config.rope_parameters
        if params["rope_type"] in UNSUPPORTED_ROPE_TYPES:  # a config edited after it was checked
            raise ValueError(f"BMojoConfig: rope_parameters['rope_type']={params['rope_type']!r} is invalid: "
                             f"{UNSUPPORTED_ROPE_TYPES[params['rope_type']]}")
        if params["rope_type"] == "default":
            dim = config.head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As transformers' rotary modules: position_ids (T,) or (b, T) -> cos, sin (..., T, head_dim) in
        x's dtype (x gives only dtype and device), computed in fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(x.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, T, H, D), cos/sin (T, D) or (b, T, D) -> x rotated, in x's dtype.

    ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x2, x1]``, written as one product and two
    fused multiply-adds on the halves (no negated or concatenated copy of x)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    if cos.dim() == 3:
        cos, sin = cos[None], sin[None]
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = xf * cos
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out.to(x.dtype)


def as_buffer(x: torch.Tensor) -> torch.Tensor:
    """x itself; under ``torch.compile``, a buffer computed once. Inductor inlines a pointwise producer into
    its consumers' loops, and a decoding step's scores read the query once per cached key: the query's
    RoPE (cos and sin included) was recomputed for every key (the transformer preset's compiled CPU step
    2.5 -> 1.9 ms over 376 cache slots, 3.6 -> 2.2 ms over 1000). A product with the identity, an external
    matmul, is exact and makes x a buffer."""
    if not torch.compiler.is_compiling():
        return x
    return torch.matmul(x, torch.eye(x.shape[-1], dtype=x.dtype, device=x.device))


class BMojoMLP(nn.Module):
    """SwiGLU, Llama names."""

    def __init__(self, config: BMojoConfig):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference():  # same values, two (T, intermediate) buffers fewer
            return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
