"""Long contexts stay exact: a small bmojo model runs T = 65536 on the CPU (torch backend) with finite
logits that equal step-by-step decoding at sampled positions, and the scan in fp16 / bf16 stays finite
and close to fp32 over 65536 steps."""
import pytest
import torch

from bmojo import BMojoCache, BMojoForCausalLM, ops
from bmojo_testing import tiny_config

T = 65536


@pytest.fixture(scope="module")
def long_run():
    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config(["bmojo", "mamba"], hidden_size=16, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=0, sliding_window=64,
                                         fading_window=32, memory_slots=8)).eval()
    ids = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return model, ids, logits


def test_logits_finite(long_run):
    _, _, logits = long_run
    assert logits.shape == (1, T, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("end", [4097, 40000, T])
def test_step_by_step_matches_at_sampled_positions(long_run, end):
    """Prefill [0, end - 150) in parallel, then decode token by token up to ``end``, crossing chunk
    boundaries, with memory that holds positions tens of thousands of tokens back."""
    model, ids, logits = long_run
    start = end - 150
    cache = BMojoCache(model.config)
    with torch.no_grad():
        model(ids[:, :start], cache=cache, use_cache=True)
        steps = torch.cat([model(ids[:, j : j + 1], cache=cache, use_cache=True).logits
                           for j in range(start, end)], 1)
    torch.testing.assert_close(steps, logits[:, start:end], atol=1e-4, rtol=0)
    mem_pos = cache.layers[0].eidetic.current.pos
    assert int(mem_pos.min()) < start - 1000  # the eidetic memory reaches far behind the window


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_scan_half_precision_over_65536_steps(dtype, tol):
    torch.manual_seed(0)
    b, d, N = 1, 8, 4
    x, dt = torch.randn(b, T, d), torch.randn(b, T, d) - 2
    A = -torch.exp(torch.log(torch.arange(1.0, N + 1))).expand(d, N).contiguous()
    B, C, z = torch.randn(b, T, N), torch.randn(b, T, N), torch.randn(b, T, d)
    Dp, bias = torch.ones(d), torch.zeros(d)
    low = [t.to(dtype) for t in (x, dt, B, C, z)]
    y32, h32 = ops.selective_scan(*[t.float() for t in low[:2]], A, *[t.float() for t in low[2:4]], D=Dp,
                                  z=low[4].float(), dt_bias=bias, return_final_state=True, backend="torch")
    y, h = ops.selective_scan(low[0], low[1], A, low[2], low[3], D=Dp, z=low[4], dt_bias=bias,
                              return_final_state=True, backend="torch")
    assert y.dtype == dtype and h.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    scale = y32.abs().max()
    assert (y.float() - y32).abs().max() / scale < tol
    torch.testing.assert_close(h, h32, atol=1e-4, rtol=1e-4)  # the state accumulates in fp32
