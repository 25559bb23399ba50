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


def test_study_long_runs_reuse_each_members_learning_rate(tmp_path):
    """benchmarks/mqar.py --long-steps: the SSM-bearing members at B1, K = 1 with the study's best lr,
    and the report's longer-training table compares them with the same run at the study's length."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "mqar.py")
    spec = importlib.util.spec_from_file_location("bench_mqar", path)
    mqar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mqar)
    cache = {"runs": {}}
    for member, good_lr in (("mamba", 1e-2), ("hybrid", 3e-3), ("bmojo-f", 3e-3), ("bmojo", 1e-2)):
        for lr in mqar.LRS:
            s = mqar.run_spec(member, "B1", 1, lr, 240, 16)
            cache["runs"][s["name"]] = dict(s, accuracy=0.9 if lr == good_lr else 0.1, eval_loss=1.0, acc_near=0.9,
                                            acc_far=0.9, train_loss_last=1.0, wall_s=60.0)
    assert mqar.long_specs(cache, 240, 16, 1200, kvs=(1, 4))[1]["kv"] == 4
    long = mqar.long_specs(cache, 240, 16, 1200)  # no transformer run cached: no lr, so not run
    assert [(s["member"], s["lr"], s["steps"], s["budget"], s["kv"]) for s in long] == [
        ("mamba", 1e-2, 1200, "B1", 1), ("hybrid", 3e-3, 1200, "B1", 1), ("bmojo-f", 3e-3, 1200, "B1", 1),
        ("bmojo", 1e-2, 1200, "B1", 1)]
    cache["runs"][long[0]["name"]] = dict(long[0], accuracy=0.5, eval_loss=2.0, acc_near=0.6, acc_far=0.4,
                                          train_loss_last=2.0, wall_s=600.0,
                                          learned_at=mqar.learned_at([{"step": 10, "loss": 3.5}, {"step": 20, "loss": 0.9}]))
    table = "\n".join(mqar._long_section(cache, 240, 16))
    assert "| 1 | mamba | 1200 | 0.01 | 50.0 | 60.0 | 40.0 | 2.000 | 20 | 90.0 | 10.0 min |" in table
