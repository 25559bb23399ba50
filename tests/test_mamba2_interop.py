"""Mamba-2 interop (bmojo.convert): transformers' ``Mamba2ForCausalLM`` and mamba-ssm's ``Mamba2`` layout
convert to all-``mamba2`` bmojo checkpoints with transformers' logits (fp32, atol 1e-4) over a sequence
that crosses Mamba-2 chunk boundaries (transformers' chunk_size 8 and the torch backend's 64), and the
same greedy generations.

The reference is checked first: transformers' torch path (``torch_forward``, what runs on a CPU) equals a
naive float64 recurrence written here from the Mamba-2 equations. One difference is known (transformers
5.24): its decoding step does not clamp dt to ``time_step_limit`` (only its chunked scan does), so with a
limit other than the default (0, inf) its ``generate`` disagrees with its own forward; there bmojo is
compared with the recurrence (logits) and with its own forward (greedy tokens).

mamba_ssm cannot be installed here (it needs CUDA to build); its Mamba2 layout is built by renaming the
HF model's tensors (transformers' Mamba2Mixer is mamba-ssm's Mamba2 with ``norm_before_gate=False``; the
names differ only in ``backbone.embedding``) beside a mamba-ssm config.json.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM
from transformers.utils import logging as hf_logging

import bmojo  # noqa: F401  (registers model_type "bmojo")
from bmojo.convert import convert

hf_logging.set_verbosity_error()  # "the fast path is not available" notes
V, PAD, T = 104, 0, 133  # T odd, past two of the torch backend's 64-token chunks and many of HF's 8


def _lively(model):
    """Every parameter off its init: A_log, dt_bias, D and the norms' weights random too (at the init all
    heads share D = 1 and unit norm weights, which would hide a head or group mixed up)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(0.5 + 4 * torch.rand(p.shape, generator=g)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 1.0)
            elif name.endswith("mixer.D"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_mamba2(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8, expand=2,
               n_groups=1, chunk_size=8, layer_norm_epsilon=1e-5, pad_token_id=PAD, bos_token_id=None,
               eos_token_id=None)
    cfg.update(kw)
    return _lively(Mamba2ForCausalLM(Mamba2Config(**cfg)))


def _prompt(batch=2, length=T, seed=2):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))  # no pad id


def naive_logits(ref: Mamba2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """transformers' Mamba2 weights run as the Mamba-2 recurrence, token by token, in float64: per head
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, dt = clamp(softplus(dt + dt_bias),
    time_step_limit); head h reads B/C group h // (H / G); y * silu(z), RMSNorm over each group, out_proj."""
    c = ref.config
    H, P, N, G, K = c.num_heads, c.head_dim, c.state_size, c.n_groups, c.conv_kernel
    di, b, L = H * P, ids.shape[0], ids.shape[1]

    def rms(x, w, eps):
        return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def linear(x, m):
        return x @ m.weight.double().T + (0 if m.bias is None else m.bias.double())

    h = ref.backbone.embeddings.weight.double()[ids]
    for block in ref.backbone.layers:
        mx = block.mixer
        z, xbc, dt = linear(rms(h, block.norm.weight, c.layer_norm_epsilon), mx.in_proj).split([di, di + 2 * G * N, H], -1)
        w = mx.conv1d.weight.double()[:, 0]  # (channels, K)
        padded = F.pad(xbc, (0, 0, K - 1, 0))
        xbc = sum(padded[:, k : k + L] * w[:, k] for k in range(K))
        xbc = F.silu(xbc + (0 if mx.conv1d.bias is None else mx.conv1d.bias.double()))
        x, B, C = xbc.split([di, G * N, G * N], -1)
        x, B, C = x.unflatten(-1, (H, P)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
        B, C = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)  # head -> its group
        dt = F.softplus(dt + mx.dt_bias.double()).clamp(*c.time_step_limit)
        A = -torch.exp(mx.A_log.double())
        state = torch.zeros(b, H, P, N, dtype=torch.float64)
        ys = []
        for t in range(L):
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]
            state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((state @ C[:, t, :, :, None])[..., 0] + mx.D.double()[:, None] * x[:, t])
        y = torch.stack(ys, 1).flatten(-2) * F.silu(z)
        y = rms(y.unflatten(-1, (G, di // G)), torch.ones(()), c.layer_norm_epsilon).flatten(-2) * mx.norm.weight.double()
        h = h + linear(y, mx.out_proj)
    return linear(rms(h, ref.backbone.norm_f.weight, c.layer_norm_epsilon), ref.lm_head)


CASES = {
    "groups1-tied": dict(),
    "groups2-untied-biases": dict(n_groups=2, tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
                                  residual_in_fp32=False),
    "groups4": dict(n_groups=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_torch_path_is_the_recurrence(case):
    """The reference is right at these sizes: transformers' chunked torch path equals the naive recurrence."""
    ref = _hf_mamba2(**CASES[case])
    ids = _prompt(length=41)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits.double(), naive_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_mamba2_converts_with_transformers_logits_and_generations(tmp_path, case):
    ref = _hf_mamba2(**CASES[case])
    ref.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model).__name__ == "BMojoForCausalLM"
    c, rc = model.config, ref.config
    assert c.layer_types == ["mamba2", "mamba2"] and c.intermediate_size == 0
    assert (c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size, c.mamba2_n_groups) == (
        rc.num_heads, rc.head_dim, rc.state_size, rc.n_groups)
    assert (c.tie_word_embeddings, c.residual_in_fp32) == (rc.tie_word_embeddings, rc.residual_in_fp32)
    ids = _prompt()
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert got.shape == want.shape == (2, T, V)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids[:, :37], **kw), ref.generate(ids[:, :37], **kw))
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no temporary directory left behind


def test_time_step_limit_is_honoured_in_parallel_and_decoding(tmp_path):
    """A non-default time_step_limit clamps dt everywhere in bmojo (transformers' decoding step ignores it,
    see the module docstring): logits equal transformers' forward and the recurrence; greedy decoding picks
    the argmax of bmojo's own forward at every step."""
    ref = _hf_mamba2(n_groups=2, time_step_limit=(0.05, 0.5))
    ref.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.mamba2_dt_limit == [0.05, 0.5]
    ids = _prompt(length=41)
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, ref(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.double(), naive_logits(ref, ids), atol=1e-4, rtol=0)
        unclamped = _hf_mamba2(n_groups=2)
        unclamped.load_state_dict(ref.state_dict())
        assert (unclamped(ids).logits - got).abs().max() > 1e-2  # the limit does bind here
    prompt = ids[:, :17]
    out = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits[:, prompt.shape[1] - 1 :]
        torch.testing.assert_close(logits.double(), naive_logits(ref, out[:, :-1])[:, prompt.shape[1] - 1 :],
                                   atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), out[:, prompt.shape[1] :])


def _mamba_ssm_mamba2_checkpoint(ref: Mamba2ForCausalLM, path, vocab_size: int, with_lm_head: bool) -> None:
    """A mamba-ssm MambaLMHeadModel with Mamba2 layers: config.json (ssm_cfg.layer = "Mamba2") and its
    state dict (backbone.embedding, backbone.layers.{i}.norm / .mixer.{in_proj, conv1d, dt_bias, A_log, D,
    norm, out_proj}, backbone.norm_f, lm_head), made from the HF model's tensors."""
    os.makedirs(path, exist_ok=True)
    state = {}
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight" and not with_lm_head:
            continue
        state[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.clone().contiguous()
    save_file(state, os.path.join(path, "model.safetensors"))
    c = ref.config
    ssm_cfg = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
               "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size, "bias": c.use_bias,
               "conv_bias": c.use_conv_bias}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
                   "vocab_size": vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
                   "rms_norm": True, "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 8, "tie_embeddings": c.tie_word_embeddings,
                   "norm_epsilon": c.layer_norm_epsilon}, fh)


@pytest.mark.parametrize("case", ["groups1-tied", "groups2-untied-biases"])
def test_mamba_ssm_mamba2_layout_converts(tmp_path, case):
    ref = _hf_mamba2(**CASES[case])
    tied = ref.config.tie_word_embeddings
    _mamba_ssm_mamba2_checkpoint(ref, tmp_path / "src", vocab_size=V - 3, with_lm_head=not tied)  # padded to V
    convert(str(tmp_path / "src"), str(tmp_path / "out"))  # format detected from config.json (d_model, n_layer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    c = model.config
    assert c.layer_types == ["mamba2", "mamba2"] and c.vocab_size == V and c.tie_word_embeddings == tied
    assert (c.mamba2_num_heads, c.mamba2_n_groups, c.mamba2_norm_before_gate) == (8, ref.config.n_groups, False)
    ids = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
