"""The bench runs at its smallest setting and every figure it reports is a positive number; its protocol
(warm-up, rounds, medians with min-max, ratios per round), its formatting for people and where library
warnings go (bench.log, not the console)."""
import csv
import io
import json
import logging
import os
import time
import warnings

import pytest
import torch

from bmojo import BMojoForCausalLM
from bmojo.bench.measure import PeakMemory
from bmojo.bench.run import COLUMNS, BenchSettings, people_table, ratios, run_bench
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
    assert "| model | impl | backend | context | prefill tok/s | decode tok/s |" in printed
    assert "e+0" not in printed  # no scientific notation
    for line in ("protocol: per context", "load average", "other processes used", "AMD" if "AMD" in printed else "cores"):
        assert line in printed, line
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
    assert data["conditions"]["load_start"] and data["conditions"]["wall_s"] > 0
    for r in data["rows"]:  # quick mode's rounds, each a positive time; the median within min-max
        assert len(r["prefill_rounds_s"]) == len(r["decode_rounds_s"]) == 7
        assert r["prefill_tok_s_min"] <= r["prefill_tok_s"] <= r["prefill_tok_s_max"]
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
    assert {(e["model"], e["context"]) for e in data["ratios"]} == {(m, c) for m in ("mamba", "transformer")
                                                                    for c in (64, 128)}
    assert (out / "bench.log").exists()
    assert set(COLUMNS) <= set(rows[0])


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


def test_cpu_benchmark_plot(tmp_path):
    """benchmarks/cpu.py's figure draws every panel, the resume ratios only for the rows that have one
    (transformers' Mamba has none)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "cpu.py")
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu)
    rows = [{"model": m, "prefill tok/s T=64": 10.0, "decode tok/s after 8": 5.0, "peak MiB T=64": 1.0,
             "peak MiB T=128": 2.0} for m in ("bmojo", "hf MambaForCausalLM")]
    gen_rows = [{"model": "bmojo", "resume / fresh": 0.85, "resume / fresh min-max": "0.820-0.880",
                 "resume / fresh at equal FLOP rate": 0.78}, {"model": "hf MambaForCausalLM"}]
    out = tmp_path / "cpu.png"
    cpu.plot(rows, gen_rows, [64], [8], [64, 128], str(out), "test machine")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
                                   rounds=1, baselines=False, check_memory=False))
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


# -- protocol, formatting, log -----------------------------------------------------------------------------

def test_numbers_are_printed_for_people():
    from bmojo.bench.measure import format_table, human_count, human_mib, human_seconds

    assert [human_count(v) for v in (37067.0, 131_000.0, 4792.0, 612.4, 43.39, 1.2e6)] == \
        ["37.1k", "131k", "4.8k", "612", "43.4", "1.2M"]
    assert [human_seconds(v) for v in (0.002, 0.000412, 1.63, 200.0)] == ["2.0 ms", "412 µs", "1.6 s", "3 min 20 s"]
    assert [human_mib(v) for v in (591.2, 11.44, 3891.0, 91.5 / 1024)] == ["591 MiB", "11.4 MiB", "3.8 GiB", "91.5 KiB"]
    assert "e+" not in format_table([{"x": 3.707e4, "y": 1.234e9}])
    row = dict(model="m", impl="bmojo", backend="torch", context=1024, batch=1, prefill_tok_s=37067.0,
               prefill_tok_s_min=35012.0, prefill_tok_s_max=38020.0, decode_tok_s=500.0, decode_tok_s_min=480.0,
               decode_tok_s_max=510.0, peak_mib=591.2, state_kib=91.5, mqar_acc=0.998, memory_floats=8192.0)
    table = people_table([row])
    assert "| 37.1k (35.0k–38.0k) | 500 (480–510) | 2.0 ms | 591 MiB | 91.5 KiB | 99.8% | 8192 |" in table, table


def test_ratios_pair_the_rounds():
    """A ratio is the median of per-round ratios (ours and theirs timed in the same round), so a round
    where the machine was slow for both cancels out."""
    ours = dict(model="m", impl="bmojo", backend="torch", context=64, prefill_rounds_s=[1.0, 3.0, 1.0],
                decode_rounds_s=[2.0, 2.0, 2.0], peak_mib=10.0)
    theirs = dict(model="m", impl="hf-X", backend="transformers", vs_backend="torch", context=64,
                  prefill_rounds_s=[2.0, 6.0, 2.0], decode_rounds_s=[1.0, 1.0, 1.0], peak_mib=40.0)
    (e,) = ratios([ours, theirs])
    assert e["prefill"] == (2.0, 2.0, 2.0) and e["decode"] == (0.5, 0.5, 0.5) and e["peak_memory"] == 0.25


def test_one_time_costs_stay_out_of_the_figures(monkeypatch):
    """A model whose first calls are slow (at each shape: allocation, lazy setup) is warmed up before the
    rounds: no timed round sees the slow calls. The slow call costs 1000 s of a virtual clock (the bench's
    clock plus an offset), so the check does not depend on the machine's load."""
    from bmojo.bench import run as R

    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config("mamba", "tiny", vocab_size=64)).eval()
    seen = set()
    forward = model.forward
    offset = [0.0]
    real_clock = time.perf_counter

    def slow_first(input_ids=None, **kw):
        if input_ids.shape not in seen:  # the first call at each shape pays 1000 virtual seconds
            seen.add(input_ids.shape)
            offset[0] += 1000.0
        return forward(input_ids=input_ids, **kw)

    monkeypatch.setattr(model, "forward", slow_first)
    monkeypatch.setattr(R.time, "perf_counter", lambda: real_clock() + offset[0])
    subject = R._Subject("m", "bmojo", "torch", "torch", model, torch.device("cpu"), None, 1.0)
    settings = BenchSettings(contexts=[48], decode_tokens=3, rounds=4)
    bar = type("Bar", (), {"update": lambda self, n: None})()
    (row,) = R._measure_context([subject], 48, settings, 64, bar)
    assert len(row["prefill_rounds_s"]) == len(row["decode_rounds_s"]) == 4
    assert seen, "the model was never called"
    assert max(row["prefill_rounds_s"]) < 1000 and max(row["decode_rounds_s"]) < 1000, row


def test_library_warnings_go_to_the_log_not_the_console(ckpt_root, tmp_path, capsys, monkeypatch):
    """transformers' deprecation and fallback messages (Python warnings and its logger) are written to
    <output>/bench.log; the console gets the table and one line naming the log."""
    from transformers.utils import logging as hf_logging

    from bmojo.bench import run as R

    accuracy = R.mqar_accuracy

    def noisy(model, path):
        warnings.warn("bench-test: a deprecated argument", FutureWarning)
        hf_logging.get_logger("transformers.models.llama").warning("bench-test: falling back to a slow path")
        return accuracy(model, path)

    monkeypatch.setattr(R, "mqar_accuracy", noisy)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silenced by the caller (other test modules do): the log still gets them
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escaped the capture would fail the command
        assert main(["bench", "--quick", "--checkpoints", str(ckpt_root), "--models", "transformer", "--contexts", "32",
                     "--decode-tokens", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "bench-test" not in printed.out and "bench-test" not in printed.err
    log = (out / "bench.log").read_text()
    assert "FutureWarning" in log and "bench-test: a deprecated argument" in log
    assert "bench-test: falling back to a slow path" in log and "transformers.models.llama" in log
    assert "bench.log" in printed.out
    # and the capture is undone: transformers' own handler is back, warnings are shown again
    assert hf_logging._default_handler in logging.getLogger("transformers").handlers
    assert hf_logging.get_verbosity() == hf_logging.ERROR
    hf_logging.set_verbosity(verbosity)
    with pytest.warns(FutureWarning):
        warnings.warn("after", FutureWarning)


def test_compiled_decoding_is_timed_on_request(ckpt_root, monkeypatch):
    """compile=True adds the compiled decoding rate and the compile time (the compiler is replaced by
    the eager graph here: the plumbing is tested, not inductor)."""
    from bmojo.modeling_bmojo import CompiledDecoding

    calls = []

    def eager_backend(self, gm, example_inputs):
        self.compiles += 1
        calls.append(1)
        return gm.forward

    monkeypatch.setattr(CompiledDecoding, "_backend", eager_backend)
    rows = run_bench(BenchSettings(checkpoints=str(ckpt_root), models=["bmojo"], contexts=[32, 48], decode_tokens=2,
                                   rounds=2, baselines=False, compile=True, output=str(ckpt_root.parent / "c")))
    assert len(calls) == 1  # one graph for every context (the cache is sized for the longest)
    for r in rows:
        assert r["compiled_decode_tok_s"] > 0
    assert rows[0]["compile_s"] is not None and rows[-1]["compile_s"] is None  # compiled once, at the first context
    assert "compiled decode tok/s" in people_table(rows)
    assert rows.conditions["compiles"]["bmojo/torch"]["graphs"] == 1


def test_compare_two_runs(tmp_path, capsys):
    """python -m bmojo.bench.compare prints every ratio of two runs and the largest disagreement."""
    from bmojo.bench.compare import main as compare_main

    def run(prefill):
        entry = dict(model="m", backend="torch", baseline="hf-X", context=64, prefill=[prefill, 1, 1],
                     decode=[1.0, 1, 1], peak_memory=0.5)
        return {"ratios": [entry], "conditions": {"wall_s": 1.0, "other_processes_cores": 0.0}}

    for name, prefill in (("a", 10.0), ("b", 11.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(run(prefill)))
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "largest disagreement between the tokens/s ratios: 15.0%" in capsys.readouterr().out
