"""The bench runs at its smallest setting and every figure it reports is a positive number."""
import csv
import io
import json
import os

import pytest
import torch

from bmojo import BMojoForCausalLM
from bmojo.bench.measure import PeakMemory
from bmojo.bench.run import COLUMNS, BenchSettings, run_bench
from bmojo.cli import main
from bmojo.presets import preset_config


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for member in ("mamba", "transformer", "bmojo"):
        BMojoForCausalLM(preset_config(member, "tiny")).save_pretrained(root / member)
    (root / "no-weights").mkdir()  # a config-only preset dir is not a shipped checkpoint
    return root


def test_quick_bench_smallest_setting(ckpt_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--checkpoints", str(ckpt_root), "--contexts", "64,128",
                 "--decode-tokens", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in printed
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    impls = {(r["model"], r["impl"]) for r in rows}
    assert impls == {("mamba", "bmojo"), ("mamba", "hf-MambaForCausalLM"), ("transformer", "bmojo"),
                     ("transformer", "hf-LlamaForCausalLM"), ("bmojo", "bmojo")}
    assert len(rows) == 2 * len(impls)
    for r in rows:
        for col in ("context", "prefill_tok_s", "decode_tok_s", "memory_floats"):
            assert float(r[col]) > 0, (col, r)
        if r["impl"] == "bmojo":
            assert float(r["state_kib"]) > 0
        if r["peak_mib"] != "":
            assert float(r["peak_mib"]) > 0, r
    for png in ("throughput_vs_context.png", "memory_vs_context.png"):
        assert (out / png).stat().st_size > 1000
    data = json.loads((out / "results.json").read_text())
    assert data["machine"] and len(data["rows"]) == len(rows)


def test_bench_rejects_unknown_model_and_backend(ckpt_root):
    with pytest.raises(SystemExit, match="unknown models"):
        run_bench(BenchSettings(checkpoints=str(ckpt_root), models=["gpt5"], contexts=[32]))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="'cuda' cannot run here"):
            run_bench(BenchSettings(checkpoints=str(ckpt_root), backends=["cuda"], contexts=[32]))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_counts_a_forward_run_after_a_larger_one():
    # bench evaluates MQAR at batch 64 before timing: the allocator then served the next forward from
    # its freed heap and the resident set did not grow (read as 0.06 MiB instead of ~18)
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config("bmojo", "tiny", vocab_size=512)).eval()
    with torch.no_grad():
        model(torch.randint(0, 512, (64, 256)), use_cache=False)
        with PeakMemory() as mem:
            model(torch.randint(0, 512, (1, 1024)), use_cache=False)
    logits = 1024 * 512 * 4
    assert mem.peak >= logits, mem.peak / 2**20


def test_cpu_benchmark_interleaved_decode_rates():
    """benchmarks/cpu.py's interleaved decode timing runs for bmojo and transformers' Mamba (whose
    cache is passed differently) and gives one positive rate per (model, prompt)."""
    import importlib.util

    from bmojo.bench.baselines import hf_baseline

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "cpu.py")
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu)
    bm = BMojoForCausalLM(preset_config("bmojo", "tiny", vocab_size=512)).eval()
    hf = hf_baseline(BMojoForCausalLM(preset_config("mamba", "tiny", vocab_size=512)).eval())
    rates = cpu.decode_rates({"bmojo": bm, "hf": hf}, prompts=[5, 9], steps=2, rounds=3)
    assert sorted(rates) == sorted([("bmojo", 5), ("bmojo", 9), ("hf", 5), ("hf", 9)])
    assert all(r > 0 for r in rates.values())


# -- memory: points that cannot fit are refused before anything is allocated ---------------------------

def test_a_context_too_large_for_memory_is_refused_up_front(ckpt_root, tmp_path):
    """`bmojo bench --contexts 100000000` once allocated 25 GB before failing: the estimate (weights,
    forward activations, decoding state) is compared with MemAvailable first, naming both."""
    import resource

    from bmojo.bench.memory import available_nbytes

    if available_nbytes("cpu")[0] is None:
        pytest.skip("no /proc/meminfo")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SystemExit) as e:
        main(["bench", "--checkpoints", str(ckpt_root), "--contexts", "1024,100000000", "--output", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert "context 100000000 (bmojo, backend torch" in msg and "MemAvailable" in msg, msg
    assert "needs about" in msg and "is available" in msg and "weights" in msg and "decoding state" in msg
    assert "context 1024 " not in msg  # only the points that cannot fit are named
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # nothing big was allocated
    assert not (tmp_path / "o").exists()


def test_memory_check_uses_the_estimate_and_can_be_turned_off(ckpt_root, monkeypatch):
    import bmojo.bench.memory as M

    monkeypatch.setattr(M, "available_nbytes", lambda device: (1 << 20, "a test's 1 MiB"))
    with pytest.raises(SystemExit, match=r"context 64 \(mamba, backend torch.*transformers' twin's forward.*1.0 MiB is "
                                         r"available \(a test's 1 MiB\)"):
        run_bench(BenchSettings(checkpoints=str(ckpt_root), models=["mamba"], contexts=[64], decode_tokens=1))
    rows = run_bench(BenchSettings(checkpoints=str(ckpt_root), models=["bmojo"], contexts=[32], decode_tokens=1,
                                   repeat=1, baselines=False, check_memory=False))
    assert len(rows) == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("member", ["mamba", "bmojo"])
def test_memory_estimate_is_the_measured_order_of_magnitude(member):
    """The estimate of a forward's activations stays within 0.7x-3x of the peak a forward really adds
    (measured, on this machine: ~1.5x for these; a model rewrite that changes its memory shows here)."""
    from bmojo.bench.memory import forward_activation_nbytes

    torch.manual_seed(0)
    config = preset_config(member, "tiny", hidden_size=128, num_attention_heads=8, vocab_size=512)
    model = BMojoForCausalLM(config).eval()
    T = 8192
    with torch.no_grad():
        with PeakMemory() as mem:
            model(torch.randint(0, 512, (1, T)), use_cache=False)
    est = forward_activation_nbytes(config, T, 1, torch.float32)
    assert 0.7 * mem.peak <= est <= 3 * mem.peak, (est / 2**20, mem.peak / 2**20)
