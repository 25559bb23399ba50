"""How much memory one ``bmojo bench`` point needs, estimated before anything is allocated, and how
much the device has: a context that cannot fit is refused up front, naming both numbers.

A point (one checkpoint, backend and context ``T``, batch ``B``) holds at its peak: the weights (and
those of transformers' twin, when the baseline runs), the token ids, and the larger of
* the parallel forward with the cache on (what the decode measurement runs first): the residual
  stream, the widest layer's temporaries (Mamba mixer: projections, conv, dt and the chunked scan's
  fp32 inputs; attention: q/k/v/o and fading keys/values, scores in bounded groups; MLP: the SwiGLU
  width), the logits, plus the decoding state after ``T`` + decode tokens (:func:`bmojo.presets.state_nbytes`);
* transformers' ``MambaForCausalLM`` torch path, whose scan materialises three ``(B, d_inner, T, N)``
  fp32 tensors.
Activation terms are scaled by :data:`SLACK` for allocator overhead and short-lived copies. The
estimate is meant to be the right order of magnitude (tests compare it with a measured peak), so it
refuses contexts that certainly cannot run and lets through those that can.
"""
from __future__ import annotations

import os

import torch

SLACK = 1.25  # allocator overhead and short-lived copies on top of the activations counted
SCORE_GROUP_BYTES = 16 * 2**20  # attention scores are processed in bounded groups (a few MiB each)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_activation_nbytes(config, context: int, batch: int, dtype: torch.dtype) -> int:
    """Peak temporaries of one parallel forward of a bmojo model over ``batch`` x ``context`` tokens."""
    c, a = config, _elem(dtype)
    d, V = c.hidden_size, c.vocab_size
    hq, hkv, hd = c.num_attention_heads or 0, c.num_key_value_heads or 0, c.head_dim or 0
    di, n, r = c.d_inner, c.d_state, c.dt_rank if isinstance(c.dt_rank, int) else 0
    mamba = (4 * di + r + 2 * n) * a + (di + 2 * n) * 4  # in_proj (x, z), conv, x_proj, y; fp32 dt and B/C
    attn = (2 * hq * hd + 4 * hkv * hd) * a  # q, o, k, v (and rotated copies)
    per_token = {"mamba": mamba, "attention": attn, "sliding_attention": attn,
                 "bmojo_f": mamba + attn + (2 * hkv * hd + d) * a,  # + fading keys/values, SSM outputs
                 "bmojo": mamba + attn + (2 * hkv * hd + d) * a + 4 + 8}  # + innovation scores, slot index
    mlp = 3 * c.intermediate_size * a
    widest = max(max(per_token[t], mlp) for t in set(c.layer_types))
    residual = d * (4 + 2 * a)  # h (fp32 residual), normed input, mixer output
    logits = V * a
    tokens = batch * context
    return int(SLACK * (tokens * (residual + widest + logits)) + SCORE_GROUP_BYTES)


def hf_mamba_activation_nbytes(config, context: int, batch: int) -> int:
    """transformers' MambaForCausalLM torch path: discrete A, discrete B and B*u, each (B, d_inner, T, N) fp32."""
    return int(SLACK * 3 * batch * config.d_inner * context * config.d_state * 4)


def estimate_point_nbytes(config, context: int, batch: int, dtype: torch.dtype, decode_tokens: int = 0,
                          hf_twin: str | None = None) -> dict[str, int]:
    """Bytes one bench point needs, by part: ``weights`` (doubled when transformers' twin runs: its
    weights are a copy), ``inputs`` (token ids), ``forward`` (bmojo's parallel forward), ``state``
    (its decoding state after the prompt and the decode steps), ``twin_forward`` (``hf_twin``:
    ``"mamba"`` or ``"llama"``, else 0) and ``total`` = weights + inputs + max(forward + state,
    twin_forward)."""
    from ..presets import param_count, state_nbytes

    weights = param_count(config) * _elem(dtype) * (2 if hf_twin else 1)
    forward = forward_activation_nbytes(config, context, batch, dtype)
    state = batch * state_nbytes(config, dtype, tokens=context + decode_tokens + 1)
    twin = {"mamba": hf_mamba_activation_nbytes(config, context, batch), "llama": forward}.get(hf_twin, 0)
    inputs = batch * context * 8
    return {"weights": weights, "inputs": inputs, "forward": forward, "state": state, "twin_forward": twin,
            "total": weights + inputs + max(forward + state, twin)}


def available_nbytes(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """Memory a new allocation can use now, and where the number comes from: CUDA's free memory on a GPU,
    ``MemAvailable`` of /proc/meminfo on Linux; ``(None, why)`` where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, f"unknown on {os.name} (no /proc/meminfo)"


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


__all__ = ["estimate_point_nbytes", "forward_activation_nbytes", "hf_mamba_activation_nbytes", "available_nbytes",
           "human_bytes", "SLACK"]
