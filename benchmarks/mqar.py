"""The associative-recall study: MQAR accuracy of the zoo at matched memory budgets (B'MOJO, Fig. 2).

    python benchmarks/mqar.py                 # run (or continue) the study, write results + plots
    python benchmarks/mqar.py --ship          # also export one trained model per member to checkpoints/
    python benchmarks/mqar.py --report-only   # rebuild mqar.md / the plots from the cached results
    python benchmarks/mqar.py --long-steps 1200 --long-kv 1,4   # also the members at B1, trained longer

Setting (scaled to a shared 2-core CPU): 2-layer models, d_model 64, 4 query heads of 16 sharing one
key/value head, SwiGLU MLP 128 (none for mamba), vocabulary 64, sequences of T = 256, window w = 32.
MQAR (``bmojo.data.mqar``, Zoology's definition) with K key-value pairs, query gaps uniform
(``power_a = 1``, so most queries ask for a pair far outside a 32-token window), filler token 0
instead of random noise (``random_non_queries = False``: with 64 tokens, noise would repeat the keys).
K = 1 is the pure memory probe (one pair: a model that can still see it answers by copying the only
value); K = 4 adds the key-value binding (copying some value of the context scores only 1/4).

Memory budget (the x-axis) is :func:`memory_floats`: the floats of recurrent state per layer that a
decoder keeps for one sequence, averaged over layers:

    attention          2 * T * Hkv * Dh          (the KV cache after T tokens)
    sliding_attention  2 * w * Hkv * Dh          (the window of keys and values)
    mamba              d_inner * N               (the SSM state)
    bmojo_f            d_inner * N + 2 * (w + m_f) * Hkv * Dh
    bmojo              bmojo_f + 2 * m_e * Hkv * Dh   (the eidetic slots)

It leaves out the Mamba conv state (d_inner * (d_conv - 1)), B'MOJO's innovation taps and scores,
the window's SSM outputs, the next chunk's slots, and slot positions/scores, as the paper's "SSM state + KV cache + memory" count does. With
d_inner = 128 and Hkv * Dh = 16, one unit of d_state costs 128 floats and one token of keys+values 32.

Budgets B1 = 4096 and B2 = 8192 floats per layer, filled as each member can (w = 32 throughout):
mamba N = 32 / 64; hybrid (mamba + sliding layer) N = 56 / 120; bmojo-f N = 16, m_f = 32 / N = 32,
m_f = 96; bmojo N = 16, m_f = 16, m_e = 16 / N = 32, m_f = 48, m_e = 48. swa has only its window
(1024 floats at w = 32) and the transformer only its KV cache (8192 at T = 256): one point each.
transformer and swa use RoPE (attention alone has no other source of order); the SSM-bearing members
have none, as in the paper.

Protocol: the same data for everyone (training set seed 0, a fixed evaluation set, seed recorded),
same steps, batch, schedule. Learning rate: best of {3e-3, 1e-2} per member on K = 1 at its smallest
budget, reused for its other runs. K = 1 runs at both budgets, K = 4 at the smallest (``--full``
adds K = 4 at B2). Ablation: bmojo at B1's N and m_f, K = 1, with m_e in {4, 16, 64}.
Every finished run is cached in benchmarks/results/mqar_runs.json; rerunning continues where it
stopped (interrupted runs resume from their last checkpoint in --workdir).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE = os.path.join(RESULTS, "mqar_runs.json")
MEMBERS = ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo")

T, W, VOCAB = 256, 32, 64
BASE_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  sliding_window=W, d_state=16, expand=2)
BUDGETS = {"B1": 4096, "B2": 8192}
KNOBS = {  # member -> budget -> overrides that fill it (see the module docstring)
    "transformer": {"-": dict(rope_theta=10000.0)},
    "swa": {"-": dict(rope_theta=10000.0)},
    "mamba": {"B1": dict(d_state=32), "B2": dict(d_state=64)},
    "hybrid": {"B1": dict(d_state=56), "B2": dict(d_state=120)},
    "bmojo-f": {"B1": dict(d_state=16, fading_window=32), "B2": dict(d_state=32, fading_window=96)},
    "bmojo": {"B1": dict(d_state=16, fading_window=16, memory_slots=16),
              "B2": dict(d_state=32, fading_window=48, memory_slots=48)},
}
ABLATION_SLOTS = (4, 16, 64)
LRS = (3e-3, 1e-2)
SEEDS = (0, 1, 2)  # initialisation / data-order seeds of the seed check
SEED_CHECK = ("bmojo-f", "bmojo")
KV_COUNTS = (1, 4)
SWEEP_KV = 1
EVAL_EXAMPLES = {1: 500, 4: 500}


def memory_floats(config, seq_len: int = T) -> float:
    """Recurrent memory per layer (mean over layers) in floats; the formula is in the module docstring
    and in :func:`bmojo.presets.recall_memory_floats`, which ``bmojo bench`` plots against too."""
    from bmojo.presets import recall_memory_floats

    return recall_memory_floats(config, seq_len)


# -- the runs -------------------------------------------------------------------------------------

def model_overrides(member: str, knobs: dict) -> dict:
    from bmojo.presets import member_layer_types as _layer_types

    d = dict(BASE_MODEL)
    d.update(layer_types=_layer_types(member, 2), intermediate_size=0 if member == "mamba" else 128,
             memory_slots=0, rope_theta=None)
    d.update(knobs)
    return d


def run_spec(member: str, budget: str, kv: int, lr: float, steps: int, batch: int, knobs: dict | None = None,
             tag: str = "", seed: int = 0) -> dict:
    knobs = KNOBS[member][budget] if knobs is None else knobs
    if seed:
        tag += f"-seed{seed}"
    name = f"{member}-{budget}{tag}-K{kv}-lr{lr:g}-s{steps}-b{batch}"
    return dict(name=name, member=member, budget=budget, kv=kv, lr=lr, steps=steps, batch=batch,
                model_overrides=model_overrides(member, knobs), knobs=knobs, tag=tag, seed=seed)


def _train_config(spec: dict, workdir: str):
    from bmojo.train import TrainConfig

    kv, steps, batch = spec["kv"], spec["steps"], spec["batch"]
    return TrainConfig(
        output_dir=os.path.join(workdir, spec["name"]), model=spec["member"], size="tiny",
        model_overrides=spec["model_overrides"],
        data=dict(vocab_size=VOCAB, seq_len=T, num_kv_pairs=kv, power_a=1.0, num_examples=steps * batch, seed=0,
                  random_non_queries=False),
        eval_data=dict(seed=1234, num_examples=EVAL_EXAMPLES[kv]), eval_examples=EVAL_EXAMPLES[kv],
        steps=steps, batch_size=batch, lr=spec["lr"], min_lr_ratio=0.1, warmup_steps=max(1, steps // 10),
        weight_decay=0.1, grad_clip=1.0, dtype="float32", seed=spec.get("seed", 0), eval_every=0, eval_batch_size=50,
        save_every=100, log_every=10, distributed="none", threads=1, progress=False,
    )


def run_one(spec: dict, workdir: str) -> dict:
    """Train one run (resuming if its directory holds a checkpoint), then score near/far accuracy."""
    import torch

    from bmojo import BMojoForCausalLM
    from bmojo.data import MQARConfig, value_distances
    from bmojo.train import train

    torch.set_num_threads(1)
    cfg = _train_config(spec, workdir)
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    model = BMojoForCausalLM.from_pretrained(res["final_dir"]).eval()
    data = MQARConfig.from_dict(json.load(open(os.path.join(res["final_dir"], "eval.json")))["eval_data"]).generate()
    dist = value_distances(data)  # (n, K)
    hit = torch.zeros_like(dist, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(data), 50):
            logits = model(data.inputs[i : i + 50], use_cache=False).logits
            pred = logits.gather(1, data.query_positions[i : i + 50, :, None].expand(-1, -1, logits.shape[-1]))
            hit[i : i + 50] = pred.argmax(-1) == data.values[i : i + 50]
    far = dist >= W
    history = res["history"]
    return dict(
        spec, memory=memory_floats(model.config), params=sum(p.numel() for p in model.parameters()),
        accuracy=res["final_eval"]["accuracy"], eval_loss=res["final_eval"]["loss"],
        acc_near=float(hit[~far].float().mean()) if (~far).any() else None,
        acc_far=float(hit[far].float().mean()) if far.any() else None, far_fraction=float(far.float().mean()),
        train_loss_last=sum(h["loss"] for h in history[-10:]) / max(1, len(history[-10:])) if history else None,
        learned_at=learned_at(history),
        wall_s=wall, final_dir=res["final_dir"], resumed=res["resumed_from"] is not None,
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


LEARNED_LOSS = 1.0  # train loss well below chance (log 32 = 3.47): the pair is being recalled


def learned_at(history: list[dict]) -> int | None:
    """First logged step whose train loss is below LEARNED_LOSS (None: never)."""
    return next((h["step"] for h in history if h["loss"] < LEARNED_LOSS), None)


def backfill_learned_at(cache: dict, workdir: str) -> bool:
    """Add ``learned_at`` to cached runs recorded before it existed, from their log.jsonl when it is still
    in ``workdir``. Returns whether any run changed."""
    changed = False
    for r in cache["runs"].values():
        log = os.path.join(workdir, r["name"], "log.jsonl")
        if "learned_at" not in r and os.path.exists(log):
            with open(log) as fh:
                history = [h for h in map(json.loads, fh) if "loss" in h and "step" in h]
            r["learned_at"], changed = learned_at(history), True
    return changed


# -- cache ----------------------------------------------------------------------------------------

def load_cache() -> dict:
    if os.path.exists(CACHE):
        with open(CACHE) as fh:
            return json.load(fh)
    return {"machine": None, "runs": {}}


def save_cache(cache: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=".mqar_runs.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(cache, fh, indent=1, sort_keys=True)
    os.replace(tmp, CACHE)


def run_all(specs: list[dict], cache: dict, workdir: str, workers: int) -> None:
    todo = [s for s in specs if s["name"] not in cache["runs"]]
    if not todo:
        return
    cost = {"mamba": 4, "hybrid": 3, "bmojo": 2, "bmojo-f": 2}
    todo.sort(key=lambda s: -cost.get(s["member"], 1) * (2 if s["budget"] == "B2" else 1))
    print(f"{len(todo)} runs to do ({len(specs) - len(todo)} cached), {workers} workers", flush=True)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, s, workdir): s for s in todo}
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                r = fut.result()
            except Exception as e:  # keep the others going; the failure is reported
                print(f"FAILED {s['name']}: {type(e).__name__}: {e}", flush=True)
                continue
            cache["runs"][r["name"]] = r
            save_cache(cache)
            print(f"{r['name']}: acc {r['accuracy']:.3f} (near {r['acc_near']}, far {r['acc_far']:.3f}) "
                  f"{r['wall_s']:.0f} s", flush=True)


def _small_budget(member: str) -> str:
    """The budget of a member's learning-rate sweep (and longer runs): B1, or "-" for attention alone."""
    return "-" if member in ("transformer", "swa") else "B1"


def best_lr(cache: dict, member: str, steps: int, batch: int) -> float | None:
    budget = _small_budget(member)
    rows = [cache["runs"].get(run_spec(member, budget, SWEEP_KV, lr, steps, batch)["name"]) for lr in LRS]
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["accuracy"], -r["eval_loss"]))["lr"]


def stage_specs(cache: dict, steps: int, batch: int, full: bool = False) -> tuple[list, list]:
    sweep = [run_spec(m, b, SWEEP_KV, lr, steps, batch) for m in MEMBERS for b in KNOBS[m] if b in ("-", "B1")
             for lr in LRS]
    rest = []
    for m in MEMBERS:
        lr = best_lr(cache, m, steps, batch)
        if lr is None:
            continue
        for b in KNOBS[m]:
            for kv in KV_COUNTS:
                if kv != SWEEP_KV and b == "B2" and not full:
                    continue
                s = run_spec(m, b, kv, lr, steps, batch)
                if s["name"] not in {x["name"] for x in sweep}:
                    rest.append(s)
        if m == "bmojo":
            for slots in ABLATION_SLOTS:
                knobs = dict(KNOBS["bmojo"]["B1"], memory_slots=slots)
                if knobs != KNOBS["bmojo"]["B1"]:
                    rest.append(run_spec(m, "B1", SWEEP_KV, lr, steps, batch, knobs=knobs, tag=f"-me{slots}"))
        if m in SEED_CHECK:  # one seed is one draw of a phase transition: repeat the key comparison
            for seed in SEEDS[1:]:
                rest.append(run_spec(m, "B1", SWEEP_KV, lr, steps, batch, seed=seed))
    return sweep, rest


LONG_MEMBERS = ("transformer", "mamba", "hybrid", "bmojo-f", "bmojo")


def long_specs(cache: dict, steps: int, batch: int, long_steps: int, kvs=(SWEEP_KV,)) -> list[dict]:
    """The longer-training check: the transformer (reference) and each SSM-bearing member at B1, with K in
    ``kvs`` and the member's learning rate from the study, trained for ``long_steps`` instead of ``steps``
    (same recipe otherwise)."""
    out = []
    for m in LONG_MEMBERS:
        lr = best_lr(cache, m, steps, batch)
        if lr is not None:
            out += [run_spec(m, _small_budget(m), kv, lr, long_steps, batch) for kv in kvs]
    return out


def _long_section(cache: dict, steps: int, batch: int) -> list[str]:
    rows = [r for r in cache["runs"].values() if r["steps"] != steps and r["batch"] == batch and not r["tag"]
            and r["member"] in LONG_MEMBERS and r["budget"] == _small_budget(r["member"])]
    if not rows:
        return []
    rows.sort(key=lambda r: (r["kv"], r["steps"], LONG_MEMBERS.index(r["member"])))
    lines = ["", "## Longer training (B1; `--long-steps`, `--long-kv`)", "",
             f"The same runs as the study's, trained longer. Chance is 1/32 = 3.1 %; a train loss of log 32 = 3.47 "
             f"means nothing learned.", "",
             f"| K | member | steps | lr | accuracy | near | far | train loss (last 10) | first step with train loss < "
             f"{LEARNED_LOSS:g} | accuracy at {steps} steps | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        short = cache["runs"].get(run_spec(r["member"], r["budget"], r["kv"], r["lr"], steps, batch)["name"])
        lines.append(f"| {r['kv']} | {r['member']} | {r['steps']} | {r['lr']:g} | {_pct(r['accuracy'])} | {_pct(r['acc_near'])} | "
                     f"{_pct(r['acc_far'])} | {r['train_loss_last']:.3f} | {r.get('learned_at') or 'never'} | "
                     f"{_pct(short['accuracy']) if short else '-'} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    return lines


READING = """## Reading of these results (the runs cached in mqar_runs.json)

- **K = 1, recall far beyond the window** (the paper's central claim): at both matched budgets bmojo
  recalls (86.6 % at 4096 floats/layer, 99.8 % at 8192) where bmojo-f, the hybrid and Mamba stay at
  chance (2.8-5.0 %). The seed check repeats bmojo vs bmojo-f at B1 with two more seeds: bmojo 100 % and
  47.6 %, bmojo-f 8.0 % and 5.0 %. So *bmojo > bmojo-f, hybrid, mamba at equal budget* is confirmed here;
  *bmojo-f >= hybrid >= mamba* is **not measured**: all three sit at chance after 240 steps, so their
  order is noise. Full attention reaches 100 % (as expected); SWA is at chance on far queries (3.2 %)
  and, not having learned to copy within 240 steps either, near chance on near ones.
- **Why bmojo works here (measured on 200 evaluation sequences):** in the B1 model the last chunk's
  eidetic memory of layer 0 still holds positions 0 and 1 (the key and its value) in 100 % of rows
  (layer 1: 95 %); in the failed m_e = 4 ablation model layer 0 keeps them in 0 % of rows. Caveat: with
  filler 0 the SSM output is predictable everywhere except at the pair and the queries, so innovation
  selection has an easy job; with Zoology's random filler (not run: with 64 tokens the noise would
  repeat the keys) it would have to find the pair among uniformly surprising tokens.
- **K = 4 (key-value binding):** only the transformer leaves chance (13.0 %, about half of the 25 %
  that "copy some value of the context" gives); every recurrent member, bmojo included, is at chance.
  Within this budget nothing tests the claim at K = 4. Pilot runs outside the study (4 KV heads) agree: a transformer
  with K = 4 stayed at the 1/K plateau for 2,000 steps (T = 64, batch 32), a hybrid reached 10.8 % after
  1,500 steps (T = 256, batch 8).
- **Ablation:** m_e = 4 fails (2.8 %), 16 gives 86.6 %, 64 gives 70.8 %: enough slots to keep the pair
  matter; with one seed per point and a 48-100 % seed spread at m_e = 16, the 16 vs 64 difference is noise.
- **Scale:** 240 steps of 16 sequences on a shared 2-core CPU, d_model 64. These are early-training
  results, where the Mamba-based members had not yet started to learn anything (train loss = chance
  loss, log 32 = 3.47); they say nothing about what those members reach at convergence.
- **Longer training** (last table; `--long-steps 1200`, 5x the steps): every SSM-bearing member solves
  K = 1 at B1 (mamba and hybrid 100 %, bmojo-f 95.4 %, bmojo 100 %), so at this budget K = 1 stops
  separating them once trained. What still separates them is how soon they learn: train loss first below
  1 at step 160 for bmojo, 280 for the hybrid, 710 for mamba and bmojo-f (one seed each; mamba and the
  hybrid at lr 1e-2, the bmojo members at 3e-3, each member's pick at 240 steps). The paper's
  bmojo-f >= hybrid >= mamba order is not seen here: bmojo-f learns no sooner than mamba.
  At K = 4 (`--long-kv 1,4`), 1200 steps: only mamba passes the 1/K "copy some value" plateau (62.5 %);
  bmojo and the transformer sit on it (23.5 / 23.8 %, train loss still falling), bmojo-f and the hybrid
  are near chance (7.1 / 3.5 %). One seed each, learning rates picked on K = 1 at 240 steps (mamba's
  1e-2 vs bmojo's 3e-3 may matter as much as the architecture): the binding task is still early training.
"""


# -- report ---------------------------------------------------------------------------------------

def _knob_text(r: dict) -> str:
    o = r["model_overrides"]
    parts = []
    if r["member"] != "transformer":
        if r["member"] in ("mamba", "hybrid", "bmojo-f", "bmojo"):
            parts.append(f"N={o['d_state']}")
        if r["member"] != "mamba":
            parts.append(f"w={W}")
        if r["member"] in ("bmojo-f", "bmojo"):
            parts.append(f"m_f={o.get('fading_window') or W}")
        if r["member"] == "bmojo":
            parts.append(f"m_e={o['memory_slots']}")
    else:
        parts.append(f"full KV, T={T}")
    return ", ".join(parts)


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def write_report(cache: dict, steps: int, batch: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in cache["runs"].values() if r["steps"] == steps and r["batch"] == batch]
    best = {m: best_lr(cache, m, steps, batch) for m in MEMBERS}
    main = [r for r in runs if not r["tag"] and r["lr"] == best.get(r["member"])]
    order = {m: i for i, m in enumerate(MEMBERS)}
    main.sort(key=lambda r: (r["kv"], order[r["member"]], r["memory"]))
    lines = [
        "# MQAR: recall at matched memory budgets",
        "",
        "Generated by `python benchmarks/mqar.py` (see its docstring for the full protocol); every number is",
        "measured, cached per run in `benchmarks/results/mqar_runs.json`.",
        "",
        f"- machine: {cache.get('machine')}",
        f"- models: 2 layers, d_model 64, 4 query heads x 16 sharing 1 KV head, window w = {W}; "
        f"MQAR T = {T}, vocabulary {VOCAB}, uniform query gaps, filler 0",
        f"- training: {steps} steps x {batch} sequences (each training example seen once), AdamW, warmup "
        f"{max(1, steps // 10)} + cosine to 0.1x, clip 1.0, fp32, 1 thread per run, 2 runs at a time",
        "- evaluation: fixed set (seed 1234; " + ", ".join(f"{n} sequences at K={k}" for k, n in EVAL_EXAMPLES.items()) + "); "
        "accuracy = argmax at the answer positions; *near* = the value lies within the last w tokens of the "
        "query, *far* = it lies beyond (the regime of the claim); chance = 1/32 (32 values), "
        "\"copy some value of the context\" = 1/K",
        "- memory = recurrent state floats per layer (SSM state + window/KV cache + eidetic slots), "
        "see `memory_floats` in benchmarks/mqar.py",
        "",
        "## Accuracy (best learning rate per member)",
        "",
        "| K | model | budget | memory (floats/layer) | state | params | lr | accuracy % | near % | far % | "
        "eval loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in main:
        lines.append(f"| {r['kv']} | {r['member']} | {r['budget']} | {r['memory']:.0f} | {_knob_text(r)} | "
                     f"{r['params']:,} | {r['lr']:g} | {_pct(r['accuracy'])} | {_pct(r['acc_near'])} | "
                     f"{_pct(r['acc_far'])} | {r['eval_loss']:.3f} | {r['wall_s']:.0f} |")
    sweep = sorted([r for r in runs if not r["tag"] and r["kv"] == SWEEP_KV and r["budget"] in ("-", "B1")],
                   key=lambda r: (order[r["member"]], r["lr"]))
    lines += ["", f"## Learning-rate sweep (K = {SWEEP_KV}, smallest budget)", "",
              "| model | lr | accuracy % | far % | eval loss | final train loss | wall s |", "|---|---|---|---|---|---|---|"]
    for r in sweep:
        lines.append(f"| {r['member']} | {r['lr']:g} | {_pct(r['accuracy'])} | {_pct(r['acc_far'])} | "
                     f"{r['eval_loss']:.3f} | {r['train_loss_last']:.3f} | {r['wall_s']:.0f} |")
    abl = sorted([r for r in runs if r["member"] == "bmojo" and r["kv"] == SWEEP_KV and r["budget"] == "B1"
                  and r["lr"] == best.get("bmojo") and r.get("seed", 0) == 0
                  and r["model_overrides"]["d_state"] == KNOBS["bmojo"]["B1"]["d_state"]],
                 key=lambda r: r["model_overrides"]["memory_slots"])
    lines += ["", f"## Eidetic ablation (bmojo, K = {SWEEP_KV}, N = 16, m_f = 16: accuracy vs memory slots m_e)", "",
              "| m_e | memory (floats/layer) | accuracy % | near % | far % | eval loss | wall s |",
              "|---|---|---|---|---|---|---|"]
    bf = next((r for r in main if r["member"] == "bmojo-f" and r["kv"] == SWEEP_KV and r["budget"] == "B1"), None)
    for r in abl:
        lines.append(f"| {r['model_overrides']['memory_slots']} | {r['memory']:.0f} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['acc_near'])} | {_pct(r['acc_far'])} | {r['eval_loss']:.3f} | {r['wall_s']:.0f} |")
    if bf is not None:
        lines.append(f"| 0 (bmojo-f, m_f = 32) | {bf['memory']:.0f} | {_pct(bf['accuracy'])} | {_pct(bf['acc_near'])} | "
                     f"{_pct(bf['acc_far'])} | {bf['eval_loss']:.3f} | {bf['wall_s']:.0f} |")
    seeded = sorted([r for r in runs if r["member"] in SEED_CHECK and r["kv"] == SWEEP_KV and r["budget"] == "B1"
                     and r["lr"] == best.get(r["member"]) and r["tag"] in ("",) + tuple(f"-seed{s}" for s in SEEDS)],
                    key=lambda r: (order[r["member"]], r.get("seed", 0)))
    if seeded:
        lines += ["", f"## Seed check (K = {SWEEP_KV}, B1, best lr; seed = initialisation and data order)", "",
                  "| model | seed | accuracy % | far % | eval loss | wall s |", "|---|---|---|---|---|---|"]
        for r in seeded:
            lines.append(f"| {r['member']} | {r.get('seed', 0)} | {_pct(r['accuracy'])} | {_pct(r['acc_far'])} | "
                         f"{r['eval_loss']:.3f} | {r['wall_s']:.0f} |")
    lines += ["", READING]
    total = sum(r["wall_s"] for r in runs)
    inv = cache.get("invocations", [])
    lines += ["", f"Run time (training + evaluation) summed over the {len(runs)} runs: {total / 60:.1f} min; "
              f"wall time of the study: {sum(inv) / 60:.1f} min over {len(inv)} invocation(s) "
              f"({', '.join(f'{t / 60:.1f}' for t in inv)} min), two runs at a time.", "", "![accuracy vs memory](mqar.png)", "",
              "![eidetic ablation](mqar_ablation.png)", ""]

    colors = {"transformer": "k", "swa": "tab:gray", "mamba": "tab:blue", "hybrid": "tab:green",
              "bmojo-f": "tab:orange", "bmojo": "tab:red"}
    fig, axes = plt.subplots(1, len(KV_COUNTS), figsize=(6 * len(KV_COUNTS), 4.2), squeeze=False)
    for ax, kv in zip(axes[0], KV_COUNTS):
        for m in MEMBERS:
            rs = sorted([r for r in main if r["member"] == m and r["kv"] == kv], key=lambda r: r["memory"])
            if not rs:
                continue
            x = [r["memory"] for r in rs]
            mk = {"transformer": "s", "swa": "D"}.get(m, "o")
            ax.plot(x, [100 * r["accuracy"] for r in rs], mk + "-", color=colors[m], label=m, ms=8 if mk != "o" else 6)
            ax.plot(x, [100 * r["acc_far"] for r in rs], "x:", color=colors[m], alpha=0.7)
        ax.axhline(100 / 32, color="0.6", lw=0.8, ls="--")
        ax.axhline(100 / kv, color="0.8", lw=0.8, ls="-.")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory: recurrent state floats per layer")
        ax.set_ylabel("MQAR accuracy % (o all, x far)")
        ax.set_title(f"K = {kv} pairs, T = {T}, w = {W}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "mqar.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if abl:
        ax.plot([r["model_overrides"]["memory_slots"] for r in abl], [100 * r["accuracy"] for r in abl], "o-",
                color="tab:red", label="all queries")
        ax.plot([r["model_overrides"]["memory_slots"] for r in abl], [100 * r["acc_far"] for r in abl], "x:",
                color="tab:red", label="far queries")
    other_seeds = [r for r in seeded if r["member"] == "bmojo" and r.get("seed", 0) != 0]
    if other_seeds:
        ax.plot([r["model_overrides"]["memory_slots"] for r in other_seeds], [100 * r["accuracy"] for r in other_seeds],
                "^", color="0.4", label="other seeds (all queries)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eidetic memory slots m_e")
    ax.set_ylabel("MQAR accuracy %")
    ax.set_title(f"bmojo, K = {SWEEP_KV}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "mqar_ablation.png"), dpi=110)
    plt.close(fig)
    lines += _long_section(cache, steps, batch)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "mqar.md"), "w") as fh:
        fh.write(text)
    return text


# -- shipping -------------------------------------------------------------------------------------

CARD = """---
library_name: transformers
tags: [bmojo, mqar, associative-recall]
---
# mqar-{member}

A 2-layer `{member}` model of the bmojo zoo trained on MQAR (multi-query associative recall,
Zoology's definition) by `benchmarks/mqar.py`. Load it offline:

```python
import bmojo
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("checkpoints/mqar-{member}")
```

## Recipe

- model: `layer_types` {layer_types}, d_model 64, 4 query heads x 16 with 1 key/value head, {state};
  {params:,} parameters; recurrent memory {memory:.0f} floats per layer (budget {budget})
- data (`mqar.json`): {data}
- training: {steps} steps x {batch} sequences, AdamW (lr {lr:g}, betas 0.9/0.95, weight decay 0.1 except
  A_log, D, dt bias, norms, biases, embeddings), warmup {warmup} + cosine to 0.1x, grad-norm clip 1.0, fp32,
  seed 0; learning rate best of {{3e-3, 1e-2}} for this member (on K = 1)
- wall time: {wall:.0f} s on {machine}

## Evaluation (`eval.json`)

Fixed evaluation set: `MQARConfig({eval_data})` (seed {eval_seed}).

| accuracy | near (value within the last 32 tokens) | far (beyond) | eval loss |
|---|---|---|---|
| {acc} % | {near} % | {far} % | {loss:.3f} |

Chance is 1/32 = 3.1 %. With K = {kv} pair(s), answering with "some value seen in the context" scores
1/K = {heur:.0f} %: at K = 1 the whole task is keeping that one value reachable ~100-250 tokens later.
This is a tiny model trained for a few minutes on a CPU: it shows where each memory type stands early in
training, not what it reaches at convergence.

Reproduce: `python benchmarks/mqar.py --ship` (or `bmojo train --config train_config.json`).
"""


def ship(cache: dict, steps: int, batch: int) -> None:
    from bmojo.presets import member_layer_types as _layer_types

    for m in MEMBERS:
        lr = best_lr(cache, m, steps, batch)
        budget = "-" if m in ("transformer", "swa") else "B2"
        r = cache["runs"].get(run_spec(m, budget, SWEEP_KV, lr, steps, batch)["name"]) if lr is not None else None
        if r is None or not os.path.isdir(r["final_dir"]):
            print(f"ship: no finished run for {m} (or its files are gone); skipped")
            continue
        dest = os.path.join(ROOT, "checkpoints", f"mqar-{m}")
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(r["final_dir"], tmp)
        with open(os.path.join(tmp, "eval.json")) as fh:
            ev = json.load(fh)
        ev.update(acc_near=r["acc_near"], acc_far=r["acc_far"], far_threshold=W, memory_floats_per_layer=r["memory"],
                  lr=r["lr"], run=r["name"])
        with open(os.path.join(tmp, "eval.json"), "w") as fh:
            json.dump(ev, fh, indent=2)
            fh.write("\n")
        with open(os.path.join(tmp, "mqar.json")) as fh:
            data = json.load(fh)
        card = CARD.format(
            member=m, layer_types=_layer_types(m, 2), state=_knob_text(r), params=r["params"], memory=r["memory"],
            budget=r["budget"] if r["budget"] != "-" else "its own", data=data, steps=steps, batch=batch,
            lr=r["lr"], warmup=max(1, steps // 10), wall=r["wall_s"], machine=cache.get("machine"),
            eval_data=", ".join(f"{k}={v!r}" for k, v in ev["eval_data"].items()), eval_seed=ev["eval_data"]["seed"],
            acc=_pct(ev["accuracy"]), near=_pct(r["acc_near"]), far=_pct(r["acc_far"]), loss=ev["loss"],
            heur=100 / r["kv"], kv=r["kv"])
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(card)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        print(f"shipped {dest} (accuracy {ev['accuracy']:.3f})")


def main(argv=None) -> int:
    global RESULTS, CACHE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bmojo-mqar-runs"),
                   help="training directories (checkpoints; not part of the repository)")
    p.add_argument("--ship", action="store_true", help="export one model per member to checkpoints/mqar-<member>/")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--full", action="store_true", help="also K = 4 at the larger budget")
    p.add_argument("--results-dir", default=RESULTS, help="where mqar_runs.json, mqar.md and the plots go")
    p.add_argument("--long-steps", type=int, default=0, metavar="N",
                   help="also train the transformer, mamba, hybrid, bmojo-f and bmojo (B1) for N steps")
    p.add_argument("--long-kv", default=str(SWEEP_KV), metavar="K[,K...]", help="key-value counts of the longer runs")
    args = p.parse_args(argv)
    RESULTS, CACHE = args.results_dir, os.path.join(args.results_dir, "mqar_runs.json")
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from bmojo.bench import machine_description

    cache = load_cache()
    t0 = time.perf_counter()
    if not args.report_only:
        import torch

        torch.set_num_threads(1)
        cache["machine"] = machine_description().replace(" with 1 threads", "") + \
            f"; {args.workers} runs in parallel, 1 torch thread each (shared with other users' jobs)"
        save_cache(cache)
        sweep, _ = stage_specs(cache, args.steps, args.batch, args.full)
        run_all(sweep, cache, args.workdir, args.workers)
        _, rest = stage_specs(cache, args.steps, args.batch, args.full)
        run_all(rest, cache, args.workdir, args.workers)
        if args.long_steps:
            kvs = tuple(int(k) for k in args.long_kv.split(","))
            run_all(long_specs(cache, args.steps, args.batch, args.long_steps, kvs), cache, args.workdir, args.workers)
        wall = time.perf_counter() - t0
        cache.setdefault("invocations", []).append(wall)
        save_cache(cache)
        print(f"study wall time this invocation: {wall / 60:.1f} min")
    if backfill_learned_at(cache, args.workdir):
        save_cache(cache)
    print(write_report(cache, args.steps, args.batch))
    if args.ship:
        ship(cache, args.steps, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
