"""The MQAR generator follows Zoology's definition; the shipped MQAR checkpoints reach their recorded accuracy."""
import json
import os

import numpy as np
import pytest
import torch

from bmojo.data import IGNORE_INDEX, MQARConfig, count_correct, multiquery_ar, power_law_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMBERS = ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo")


def _cfg(**kw):
    d = dict(vocab_size=64, seq_len=96, num_kv_pairs=8, power_a=0.01, num_examples=300, seed=3)
    d.update(kw)
    return MQARConfig(**d)


@pytest.mark.parametrize("noise", [True, False])
def test_layout_matches_zoology(noise):
    c = _cfg(random_non_queries=noise)
    d = c.generate()
    n, T, K, V = c.num_examples, c.seq_len, c.num_kv_pairs, c.vocab_size
    x, y = d.inputs, d.labels
    assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.int64
    keys, values = x[:, 0 : 2 * K : 2], x[:, 1 : 2 * K : 2]
    # keys from the lower half (never 0, Zoology's placeholder), values from the upper half
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    assert torch.equal(keys, d.keys) and torch.equal(values, d.values)
    for row in range(n):
        assert len(set(keys[row].tolist())) == K  # each key once in the key-value block
        assert len(set(values[row].tolist())) == K
    # one query per key, on the even slots after the block, each key asked exactly once
    qp = d.query_positions
    assert qp.min() >= 2 * K and qp.max() <= T - 2 and ((qp - 2 * K) % 2 == 0).all()
    assert torch.equal(torch.gather(x, 1, qp), keys)
    for row in range(n):
        assert len(set(qp[row].tolist())) == K
    # labels: -100 except right after each query, holding the value paired earlier with that key
    answers = y != IGNORE_INDEX
    assert (answers.sum(1) == K).all()
    assert torch.equal(answers.nonzero()[:, 1].view(n, K).sort(1).values, (qp + 1).sort(1).values)
    for row in range(n):
        pair = dict(zip(keys[row].tolist(), values[row].tolist()))
        for j in answers[row].nonzero().flatten().tolist():
            assert y[row, j].item() == pair[x[row, j - 1].item()]
    if not noise:  # Zoology's random_non_queries=False: 0 everywhere else, each key exactly twice
        filler = torch.ones_like(x, dtype=torch.bool)
        filler[:, : 2 * K] = False
        filler.scatter_(1, qp, False)
        assert (x[filler] == 0).all()
        for row in range(n):
            counts = torch.bincount(x[row], minlength=V)
            assert (counts[keys[row]] == 2).all()
    else:  # noise is uniform over the whole vocabulary
        assert x[:, 2 * K :].max() >= V // 2 and (x[:, 2 * K :] == 0).any()


def test_deterministic_by_seed():
    a, b, c = _cfg().generate(), multiquery_ar(_cfg()), _cfg(seed=4).generate()
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    # fixed-seed fingerprint: the generator must not drift silently (shipped eval sets depend on it)
    assert a.inputs[0, :16].tolist() == [21, 37, 29, 38, 1, 44, 5, 39, 10, 43, 8, 55, 2, 52, 17, 48]
    assert a.query_positions[0].tolist() == [16, 68, 20, 30, 38, 26, 18, 84]
    assert int(a.inputs.sum()) == 871654


def test_zoology_docstring_example_shape():
    """Zoology's example: vocab 12, 2 pairs, length 16, no noise -> k v k v, then queries on even slots."""
    d = MQARConfig(vocab_size=12, seq_len=16, num_kv_pairs=2, num_examples=50, seed=0,
                   random_non_queries=False).generate()
    x, y = d.inputs, d.labels
    assert ((x[:, 0:4:2] >= 1) & (x[:, 0:4:2] < 6)).all() and (x[:, 1:4:2] >= 6).all()
    assert ((x[:, 4:] == 0) | (x[:, 4:] < 6)).all() and (x[:, 5::2] == 0).all()
    assert ((y != -100).sum(1) == 2).all()


def test_query_gaps_follow_the_power_law():
    """Marginal slot frequencies match sequential weighted sampling without replacement (np.random.choice)."""
    c = _cfg(seq_len=64, num_kv_pairs=4, num_examples=20000, power_a=0.3)
    d = c.generate()
    space = c.query_space
    ours = torch.bincount(((d.query_positions - c.context_len) // 2).flatten(), minlength=space).double()
    ours /= ours.sum()
    rng = np.random.default_rng(0)
    p = power_law_probs(space, c.power_a)
    ref = np.zeros(space)
    for _ in range(20000):
        ref[rng.choice(space, size=c.num_kv_pairs, replace=False, p=p)] += 1
    ref /= ref.sum()
    assert np.abs(ours.numpy() - ref).max() < 0.01
    assert ours[0] > ours[space // 2] > ours[-1] * 0.9  # decreasing with the gap


def test_config_json_roundtrip(tmp_path):
    c = _cfg(power_a=0.5, random_non_queries=False)
    c.save(str(tmp_path))
    assert json.loads((tmp_path / "mqar.json").read_text())["num_kv_pairs"] == 8
    assert MQARConfig.load(str(tmp_path)) == c
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQARConfig(seq_len=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="unknown"):
        MQARConfig.from_dict({"vocab": 3})


def test_count_correct_uses_the_causal_alignment():
    d = _cfg(num_examples=4).generate()
    logits = torch.zeros(4, d.config.seq_len, d.config.vocab_size)
    logits[:, :-1].scatter_(2, d.labels[:, 1:].clamp(min=0)[..., None], 1.0)  # position t predicts label t+1
    assert count_correct(logits, d.labels) == (4 * 8, 4 * 8)
    assert count_correct(torch.roll(logits, 1, dims=1), d.labels)[0] < 4


# -- shipped checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("member", MEMBERS)
def test_shipped_checkpoint_reaches_recorded_accuracy(member):
    """checkpoints/mqar-<member> loads offline after `import bmojo` and scores at least its recorded
    accuracy minus 1 point on its fixed evaluation set (eval.json records the set's MQARConfig). It
    carries no Python file and no auto_map: the installed bmojo package is the code."""
    from transformers import AutoModelForCausalLM

    import bmojo  # noqa: F401  (registers the model type)
    from bmojo.data import evaluate

    path = os.path.join(ROOT, "checkpoints", f"mqar-{member}")
    for name in ("config.json", "model.safetensors", "generation_config.json", "mqar.json", "eval.json", "README.md"):
        assert os.path.exists(os.path.join(path, name)), f"{path} lacks {name}"
    assert not [f for f in os.listdir(path) if f.endswith(".py")], path
    with open(os.path.join(path, "config.json")) as fh:
        assert "auto_map" not in json.load(fh), path
    with open(os.path.join(path, "eval.json")) as fh:
        record = json.load(fh)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "BMojoForCausalLM"
    assert MQARConfig.load(path).seq_len == record["eval_data"]["seq_len"]
    data = MQARConfig.from_dict(record["eval_data"]).generate()
    got = evaluate(model, data.inputs, data.labels, batch_size=100)
    assert got["total"] == record["total"]
    assert got["accuracy"] >= record["accuracy"] - 0.01, (member, got, record["accuracy"])
    if member == "transformer":  # the study's recipe: a setting is used only where the transformer solves it
        assert record["accuracy"] >= 0.99, record
    assert record["learned"] == (record["accuracy"] >= 0.99), record  # the card says whether it learned


def test_evaluation_lives_beside_the_data_and_bench_does_not_import_train():
    """MQAR evaluation is bmojo.data.evaluate (bmojo.train re-exports it); nothing in bmojo.bench imports
    bmojo.train."""
    import ast
    import glob

    import bmojo.data
    import bmojo.train

    assert bmojo.train.evaluate is bmojo.data.evaluate
    bench = os.path.join(ROOT, "src", "bmojo", "bench")
    for path in glob.glob(os.path.join(bench, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                package = ["bmojo", "bench"][: 2 - node.level + 1] if node.level else []
                base = ".".join(package + ([node.module] if node.module else []))
                imported = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            else:
                continue
            assert not any(m == "bmojo.train" or m.startswith("bmojo.train.") for m in imported), (path, imported)


def test_evaluate_splits_rows_over_a_group():
    """evaluate() over a two-rank group (each rank's share, counts summed) equals one process."""
    from bmojo import BMojoForCausalLM
    from bmojo.data import evaluate
    from bmojo_testing import tiny_config

    model = BMojoForCausalLM(tiny_config(["mamba"], vocab_size=64)).eval()
    d = _cfg(num_examples=7, seq_len=32, num_kv_pairs=2).generate()
    whole = evaluate(model, d.inputs, d.labels, batch_size=3)

    class Rank:
        def __init__(self, rank):
            self.rank, self.world, self.device = rank, 2, torch.device("cpu")

        def all_sum(self, values):
            return values

    parts = [evaluate(model, d.inputs, d.labels, 2, Rank(r)) for r in (0, 1)]
    assert sum(p["correct"] for p in parts) == whole["correct"] and sum(p["total"] for p in parts) == whole["total"]


# -- benchmarks/mqar.py (the study's protocol; no training beyond one tiny run) ---------------------

@pytest.fixture(scope="module")
def study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_mqar", os.path.join(ROOT, "benchmarks", "mqar.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(study, spec, acc, **kw):
    r = dict(spec, status="done", accuracy=acc, eval_loss=1.0 - acc, acc_far=acc, acc_near=acc, far_fraction=0.9,
             steps_done=1500, stop="early", stop_reason="plateau", memory=1.0, params=1, wall_s=10.0, final_dir="-")
    r.update(kw)
    return r


def _put(study, cache, spec, acc, **kw):
    cache["runs"][spec["name"]] = _record(study, spec, acc, **kw)


def test_study_budgets_are_filled_exactly(study):
    """Every member's knobs fill its budget to the float (memory_floats = bmojo.presets.recall_memory_floats)."""
    from bmojo.presets import preset_config

    for member, budgets in study.KNOBS.items():
        for budget in budgets:
            cfg = preset_config(member, "tiny", **dict(study.run_spec(member, "K2", budget, 3e-3)["model_overrides"],
                                                       vocab_size=64))
            want = {"transformer": 2 * 64 * 4 * 16, "swa": 2 * study.W * 4 * 16}.get(member) or study.BUDGETS[budget]
            assert study.memory_floats(cfg, 64) == want, (member, budget)


def test_study_recipe_check_decides_the_settings(study):
    """The transformer's check runs K1 and K2 first; a failing K2 brings in K3; later groups follow the
    settings used and each member's best learning rate; the ablation sits at the largest K used."""
    assert study.run_spec("transformer", "K2", "-", 3e-3)["cap"] == 2 * study.run_spec("transformer", "K1", "-", 3e-3)["cap"]
    cache = {"runs": {}}
    specs, blocked = study.group_specs(cache, "recipe")
    assert [(s["setting"], s["lr"]) for s in specs] == [("K1", lr) for lr in study.LRS] + [("K2", lr) for lr in study.LRS]
    assert blocked and study.used_settings(cache) == ([], False)
    assert study.group_specs(cache, "sweep")[0] == [] and study.group_specs(cache, "sweep")[1]
    for lr, acc in zip(study.LRS, (0.995, 0.5, 0.3)):
        _put(study, cache, study.run_spec("transformer", "K3", "-", lr), acc)
        _put(study, cache, study.run_spec("transformer", "K2", "-", lr), 0.4)  # K2: stuck on the plateau
    cache["runs"][study.run_spec("transformer", "K2", "-", 1e-2)["name"]].update(status="diverged", accuracy=None)
    assert study.recipe_status(cache, "K2") == "fail"
    specs, _ = study.group_specs(cache, "recipe")
    assert [(s["setting"], s["seed"]) for s in specs if s["seed"]] == [("K3", 1), ("K3", 2)]
    assert "K3" in {s["setting"] for s in specs}  # K2 failed: the next candidate is checked
    for seed in (1, 2):
        _put(study, cache, study.run_spec("transformer", "K3", "-", 3e-3, seed=seed), 0.99)
    assert study.used_settings(cache) == (["K3"], False)  # K1 still pending
    assert len(study.group_specs(cache, "sweep")[0]) == len(study.LRS) * len(study.SWEEP_ORDER)  # K3 can start
    for seed, lr in ((0, 1e-3), (0, 3e-3), (0, 1e-2), (1, 1e-3), (2, 1e-3)):
        _put(study, cache, study.run_spec("transformer", "K1", "-", lr, seed=seed), 1.0 if lr == 1e-3 else 0.98)
    assert study.used_settings(cache) == (["K1", "K3"], True)

    sweep, blocked = study.group_specs(cache, "sweep")
    assert not blocked and len(sweep) == 2 * 3 * 5
    assert (sweep[0]["member"], sweep[0]["setting"], sweep[0]["budget"], sweep[0]["lr"]) == ("bmojo", "K1", "B2", 3e-3)
    assert study.group_specs(cache, "budgets")[1]  # blocked until the sweep is done
    best = {"swa": 1e-3, "mamba": 1e-2, "hybrid": 3e-3, "bmojo-f": 1e-2, "bmojo": 3e-3}
    for s in sweep:
        _put(study, cache, s, 0.6 if s["lr"] == best[s["member"]] else 0.5)
    budgets, blocked = study.group_specs(cache, "budgets")
    assert not blocked and len(budgets) == 2 * 4 * 2
    assert all(s["lr"] == best[s["member"]] and s["budget"] in ("B1", "B3") for s in budgets)
    seeds, _ = study.group_specs(cache, "seeds")
    assert len(seeds) == 2 * (1 + 4 * 3) * 2 and {s["seed"] for s in seeds} == {1, 2}
    ablation, _ = study.group_specs(cache, "ablation")
    assert {s["setting"] for s in ablation} == {"K3"} and len(ablation) == 2 * 3
    assert sorted({s["model_overrides"]["memory_slots"] for s in ablation}) == [8, 32]
    # the lr check: seeds 1, 2 at mamba's lr, at the largest K, for the members whose own lr differs
    lrcheck, blocked = study.group_specs(cache, "lrcheck")
    assert not blocked and {(s["member"], s["setting"], s["budget"], s["lr"], s["seed"]) for s in lrcheck} == {
        (m, "K3", "B2", 1e-2, x) for m in ("hybrid", "bmojo") for x in (1, 2)}
    # a changed protocol leaves old records stale instead of reusing them
    spec = sweep[0]
    assert study.cached(cache, spec) is not None
    assert study.cached(cache, dict(spec, data=dict(spec["data"], seq_len=128))) is None


def test_study_parts_split_the_runs(study):
    names = [s["name"] for g in study.full_plan().values() for s in g]
    parts = [{n for n in names if study.in_part(n, (i, 3))} for i in (1, 2, 3)]
    assert set().union(*parts) == set(names) and sum(map(len, parts)) == len(names) and all(parts)
    assert study.main(["--plan"]) == 0


def test_study_report_orderings_and_ship(study, tmp_path):
    """The report lists what is missing, checks the orderings and plots; the earlier report is kept as
    mqar_v1.md; --ship exports each member's best run with a card and eval.json (here to tmp_path)."""
    from bmojo import BMojoForCausalLM
    from bmojo.presets import preset_config

    final = tmp_path / "final"  # one exported model stands for every run's final/
    spec = study.run_spec("bmojo", "K2", "B2", 3e-3)
    BMojoForCausalLM(preset_config("bmojo", "tiny", **dict(spec["model_overrides"], vocab_size=64))).save_pretrained(final)
    MQARConfig(**spec["data"]).save(str(final))
    (final / "eval.json").write_text(json.dumps({"eval_data": dict(spec["data"], num_examples=10, seed=1234),
                                                 "accuracy": 0.9, "total": 20, "correct": 18, "loss": 0.1, "step": 1500}))
    cache = {"runs": {}, "machine": "test"}
    for setting in ("K1", "K2"):
        for lr in study.LRS:
            _put(study, cache, study.run_spec("transformer", setting, "-", lr), 1.0 if lr == 3e-3 else 0.5,
                 final_dir=str(final))
        for seed in (1, 2):
            _put(study, cache, study.run_spec("transformer", setting, "-", 3e-3, seed=seed), 0.995, final_dir=str(final))
    rank = {"swa": 0.2, "mamba": 0.4, "hybrid": 0.5, "bmojo-f": 0.6, "bmojo": 0.9}
    for m, acc in rank.items():
        for s in study.group_specs(cache, "sweep")[0]:
            if s["member"] == m:
                _put(study, cache, s, acc if s["lr"] == 3e-3 else acc / 2, final_dir=str(final), knobs=s["knobs"])
    for s in study.group_specs(cache, "budgets")[0]:
        _put(study, cache, s, rank[s["member"]] + (0.05 if s["budget"] == "B3" else -0.05), final_dir=str(final))
    results = tmp_path / "results"
    results.mkdir()
    (results / "mqar.md").write_text("# the earlier protocol\n")
    text = study.write_report(cache, str(results))
    assert (results / "mqar_v1.md").read_text() == "# the earlier protocol\n"
    assert (results / "mqar.md").read_text().startswith(study.REPORT_MARK)
    assert (results / "mqar_fig2.png").stat().st_size > 0 and (results / "mqar_eidetic.png").exists()
    assert "**The study is not complete**" in text and "bmojo-K2-B1-lr0.003-s1-b32-c4000" in text.split("## Recipe")[0]
    assert "| bmojo >= bmojo-f | K2 | B2 | 90.0 vs 60.0 | holds (one seed) |" in text
    assert "**bmojo >= bmojo-f**: holds at 6 of 6 points" in text
    assert "- K2: **pass** (used)" in text
    # every member shares mamba's lr here: the lr check's table holds the sweep's seed-0 runs only
    assert "## Learning-rate check at K2: every SSM-bearing member at mamba's lr (0.003), budget B2" in text
    assert "- **at mamba's lr**: mamba left the plateau in 0 of 1 runs, the other members in 1 of 3" in text
    study.write_report(cache, str(results))  # a second report does not touch mqar_v1.md
    assert (results / "mqar_v1.md").read_text() == "# the earlier protocol\n"

    shipped = study.ship(cache, dest_root=str(tmp_path / "ckpt"))
    assert len(shipped) == 6
    card = (tmp_path / "ckpt" / "mqar-swa" / "README.md").read_text()
    assert "did not learn this setting" in card and "tokens back" in card
    ev = json.loads((tmp_path / "ckpt" / "mqar-bmojo" / "eval.json").read_text())
    assert ev["setting"] == study.separating_setting(cache) and ev["stop"] == "early" and ev["steps_trained"] == 1500
    assert not [f for f in os.listdir(tmp_path / "ckpt" / "mqar-bmojo") if f.endswith(".py")]


def test_study_run_one_trains_stops_and_caches(study, tmp_path, monkeypatch):
    """One real (tiny) run through the study's path: early stopping, near/far split, checkpoints removed
    once finished, the record merged into the cache beside another one."""
    monkeypatch.setattr(study, "TRAIN", dict(study.TRAIN, cap=6, eval_every=2, min_steps=0, eval_examples=20, batch=4,
                                             patience=1, min_delta=0.5))
    spec = study.run_spec("transformer", "K2", "-", 3e-3)
    r = study.run_one(spec, str(tmp_path / "work"))
    assert r["status"] == "done" and r["stop"] == "early" and r["steps_done"] == 4 and r["evals"][0][0] == 2
    assert 0 <= r["acc_far"] <= 1 and r["memory"] == 8192 and r["ms_per_step"] > 0
    left = os.listdir(tmp_path / "work" / spec["name"])
    assert "final" in left and "record.json" in left and not [n for n in left if n.startswith("ckpt-") or n == "latest"]
    assert study.run_one(spec, str(tmp_path / "work")) == r  # finished: the record is read back, nothing retrained
    import fcntl

    with open(tmp_path / "work" / (spec["name"] + ".lock"), "w") as held:  # another invocation trains it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another invocation"):
            study.run_one(spec, str(tmp_path / "work"))
    results = str(tmp_path / "results")
    study.update_cache(results, {"other": {"name": "other"}})
    cache = study.update_cache(results, {r["name"]: r}, invocations=[1.0])
    assert set(cache["runs"]) == {"other", r["name"]} and study.cached(cache, spec) == r
    monkeypatch.undo()
    assert study.cached(cache, study.run_spec("transformer", "K2", "-", 3e-3)) is None  # another protocol


def test_study_runs_in_worker_processes(tmp_path, monkeypatch):
    """The command's path: specs handed to a spawned worker (the protocol travels in the spec), results
    merged into the cache, the report and plan written; a second call finds nothing left to do."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    mqar = importlib.import_module("mqar")  # importable by name, as the spawned worker needs
    monkeypatch.setattr(mqar, "TRAIN", dict(mqar.TRAIN, cap=4, eval_every=2, min_steps=0, eval_examples=20, batch=4))
    specs = [mqar.run_spec("transformer", "K1", "-", lr) for lr in (3e-3, 1e-3)]
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    attempted = mqar.run_all(specs, results, work, workers=1, deadline=None)
    assert attempted == {s["name"] for s in specs}
    cache = mqar.load_cache(results)
    assert all(mqar.cached(cache, s)["steps_done"] == 4 for s in specs)
    assert mqar.run_all(specs, results, work, workers=1, deadline=0.0) == set()  # past the deadline: nothing starts
    sys.modules.pop("mqar", None)
