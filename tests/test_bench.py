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
