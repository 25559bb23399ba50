"""The associative-recall study (B'MOJO, Fig. 2 at CPU scale), protocol v2: MQAR accuracy of the zoo
against its memory budget, every run trained until it stops improving.

    python benchmarks/mqar.py --plan                  # what is done, missing, blocked; CPU time left per group
    python benchmarks/mqar.py --only recipe           # part 1: the transformer recipe check (~0.2 CPU-h)
    python benchmarks/mqar.py --only sweep            # part 2: lr sweep per member and setting at budget B2
    python benchmarks/mqar.py --only budgets          # part 3: budgets B1 and B3 at each member's best lr
    python benchmarks/mqar.py --only seeds --part 1/2 # part 4 (in halves): seeds 1 and 2 of every point
    python benchmarks/mqar.py --only ablation         # part 5: eidetic slots
    python benchmarks/mqar.py --only lrcheck          # part 6: the other SSM members at mamba's lr (K2)
    python benchmarks/mqar.py                         # everything still missing, in that order
    python benchmarks/mqar.py --hours 1.5             # start no new run after 1.5 h (the rest waits)
    python benchmarks/mqar.py --report-only           # rebuild mqar.md and the plots from the cache
    python benchmarks/mqar.py --ship                  # export each member's best run to checkpoints/
    python benchmarks/mqar.py --timing                # measure ms per training step of every point here

Recipe (calibrated on this machine; benchmarks/results/mqar_calibration.md has every run)
    2 layers, d_model 64, 4 heads of 16 with 4 key/value heads (full multi-head attention: with one or two
    key/value heads the transformer stayed on the 1/K plateau), SwiGLU MLP 128 (none for mamba), SSM
    expand 2 (d_inner 128), sliding window w = 8, RoPE for transformer and swa only. MQAR (bmojo.data.mqar)
    with T = 64, vocabulary 64, uniform query gaps (power_a = 1), filler token 0. Batch 32 (at batch 16 the
    transformer stayed on the plateau for 3000 steps), AdamW (wd 0.1), warmup 100 steps, cosine to 0.1x at
    the cap, clip 1.0, fp32, one thread per run. Calibration: the transformer reached 99.6 % (K = 2, two
    seeds) and 100 % (K = 3, seed 0) within 2000 steps at lr 3e-3, but K = 3 seed 1 sat at 1/K, and K = 4
    (T = 64 or 32) sat at 25 % for 2000 steps at lr 1e-3 and 3e-3: K = 4 is not a candidate.

Settings and the recipe check
    Candidate data settings, tried in order: K1 (K = 1), K2 (K = 2), K3 (K = 3, tried only if K2 fails);
    all T = 64, vocabulary 64. For each, the transformer is trained at every learning rate (seed 0), then
    seeds 1 and 2 at the best one; the setting passes when all three seeds reach >= 99 %. The study uses
    the first K_LEVELS = 2 candidates that pass; a setting that fails is reported and not used. (The first
    order, K2 and K3 before K1 with one 2000-step cap, failed both: K2 reached 98.9 % still rising at the
    cap, K3 stayed at 1/K on two of three seeds. K1 alone saturates: every SSM-bearing member solves it.)

Every run
    Evaluated every 250 steps on a fixed set (1000 sequences, seed 1234); stops when the accuracy has not
    improved by more than 0.5 points over three evaluations (bmojo.train's early stopping; never before
    step 1000, the plateau that precedes MQAR's sharp transitions) or at the cap: 2000 steps at K = 1,
    4000 at K > 1 (CAP_FACTOR; the report marks every run that hit it). Learning rate: {3e-3, 1e-3,
    1e-2} per member per setting (seed 0, at budget B2), the best one reused for the member's other
    budgets and seeds. Seeds 0, 1, 2 (initialisation
    and data order; the data set is the same) for every reported point: mean and min-max. A run that
    diverges is recorded as such (it loses the lr sweep). The final model is the one at the stop step.

Memory budget (the x-axis) is :func:`memory_floats` (``bmojo.presets.recall_memory_floats``): floats of
recurrent state per layer after T tokens, mean over layers: attention 2 T Hkv Dh, sliding attention
2 w Hkv Dh, mamba d_inner N, bmojo-f d_inner N + 2 (w + m_f) Hkv Dh, bmojo adds 2 m_e Hkv Dh. With
d_inner 128 and Hkv Dh = 64, one unit of d_state and one token of keys + values both cost 128 floats.
Budgets B1 / B2 / B3 = 1536 / 2048 / 3072 floats per layer: mamba N = 12 / 16 / 24; hybrid (mamba +
sliding layer) N = 16 / 24 / 40; bmojo-f N = m_f = 2 / 4 / 8; bmojo has bmojo-f's N with its fading
tokens split half fading, half eidetic (m_f = m_e = 1 / 2 / 4). The transformer keeps 8192 (its KV cache
at T = 64), swa 1024 (its window): one point each. Eidetic ablation: bmojo at B2's N and m_f with
m_e in {2, 8, 32}, on the used setting with the largest K. Learning-rate check: on that setting too,
seeds 1 and 2 of every other SSM-bearing member at B2 at mamba's lr, where it differs from their own (one
seed per lr, as the sweep gives, cannot tell a member that never leaves the 1/K plateau from one given an
unlucky lr and seed; mamba left it in one seed of three). Beyond the window: *far* queries are those whose
value lies w = 8 or more tokens back.

Work order, parts and budget
    Groups, most important first: ``recipe`` (transformer check), ``sweep`` (every member at B2, three
    lrs), ``budgets`` (B1, B3 at the best lr), ``seeds`` (seeds 1, 2 of every point), ``ablation``, ``lrcheck``. A group
    runs what its dependencies allow (a member's budgets need its finished lr sweep); ``--plan`` and the
    report list what is done, missing and blocked. ``--part N/M`` takes a stable share of a group's runs
    (by a hash of the run name), ``--hours H`` starts nothing after H hours; invocations may run at the
    same time (the cache is merged under a lock, and a run another invocation is training is skipped). Every finished run is cached in
    benchmarks/results/mqar_runs_v2.json; an interrupted run resumes from its last checkpoint (every 250
    steps) in --workdir (default runs/mqar-v2, ignored by git). The earlier protocol's cache
    (mqar_runs.json) is left as it was; its report moves to mqar_v1.md when this one first writes mqar.md.

    Estimate (``--plan``; ms per step measured during calibration on the shared 2-core machine, 1 thread;
    the table is in mqar_calibration.md): 114 runs if K1 and K2 pass (before the lrcheck group's 6), 9.5-11.3 CPU-hours if a run stops at
    75 % of its cap on average (minimum / median step times), 12.7-15.1 if every run went to its cap; two
    runs in parallel halve the wall time. Measured: the 42 K1 runs of the first order took 1.8 CPU-hours
    (most stopped at step 1000, solved), so the K1 half costs about a third of its estimate; K2 decides
    the total. The SSM-bearing members are 3-10x slower per step than attention (the selective scan's
    backward dominates on CPU).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE_NAME = "mqar_runs_v2.json"
REPORT_MARK = "<!-- benchmarks/mqar.py protocol v2 -->"
MEMBERS = ("transformer", "swa", "mamba", "hybrid", "bmojo-f", "bmojo")
SSM_MEMBERS = ("mamba", "hybrid", "bmojo-f", "bmojo")
SWEEP_ORDER = ("bmojo", "bmojo-f", "hybrid", "mamba", "swa")  # within one learning rate of the sweep

W = 8
BASE_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                  sliding_window=W, d_state=16, expand=2)
SETTINGS = {  # candidate MQAR data settings, in the order the recipe check tries them
    "K1": dict(num_kv_pairs=1, seq_len=64, vocab_size=64),
    "K2": dict(num_kv_pairs=2, seq_len=64, vocab_size=64),
    "K3": dict(num_kv_pairs=3, seq_len=64, vocab_size=64),
}
# K > 1 gets twice the steps: at 2000 the transformer was still gaining at K = 2 (98.9 % at the cap)
CAP_FACTOR = {"K1": 1, "K2": 2, "K3": 2}
K_LEVELS = 2  # the study uses the first K_LEVELS candidates whose recipe check passes
RECIPE_TARGET = 0.99
BUDGETS = {"B1": 1536, "B2": 2048, "B3": 3072}
KNOBS = {  # member -> budget -> overrides that fill it exactly (tests/test_mqar.py checks the sums)
    "transformer": {"-": dict(rope_theta=10000.0)},
    "swa": {"-": dict(rope_theta=10000.0)},
    "mamba": {"B1": dict(d_state=12), "B2": dict(d_state=16), "B3": dict(d_state=24)},
    "hybrid": {"B1": dict(d_state=16), "B2": dict(d_state=24), "B3": dict(d_state=40)},
    "bmojo-f": {"B1": dict(d_state=2, fading_window=2), "B2": dict(d_state=4, fading_window=4),
                "B3": dict(d_state=8, fading_window=8)},
    "bmojo": {"B1": dict(d_state=2, fading_window=1, memory_slots=1), "B2": dict(d_state=4, fading_window=2, memory_slots=2),
              "B3": dict(d_state=8, fading_window=4, memory_slots=4)},
}
SWEEP_BUDGET = "B2"
ABLATION_SLOTS = (2, 8, 32)  # bmojo at B2's N and m_f (m_e = 2 is B2 itself)
LRS = (3e-3, 1e-3, 1e-2)  # run in this order: the calibrated value first
SEEDS = (0, 1, 2)
TRAIN = dict(batch=32, cap=2000, eval_every=250, patience=3, min_delta=0.005, min_steps=1000, warmup=100,
             eval_examples=1000, eval_seed=1234, data_seed=0)
GROUPS = ("recipe", "sweep", "budgets", "seeds", "ablation", "lrcheck")
LR_CHECK_MEMBER = "mamba"  # lrcheck: the other SSM-bearing members at this member's lr on the hardest setting
TYPICAL_SHARE = 0.75  # the plan's guess of where an average run stops, as a share of its cap
STEP_MS = {  # ms per training step (batch 32, T = 64, 1 thread) measured in calibration: (minimum, median)
    "transformer--": (33, 34), "swa--": (34, 35),
    "mamba-B1": (164, 204), "mamba-B2": (149, 184), "mamba-B3": (207, 358),
    "hybrid-B1": (130, 134), "hybrid-B2": (201, 221), "hybrid-B3": (342, 348),
    "bmojo-f-B1": (87, 88), "bmojo-f-B2": (92, 95), "bmojo-f-B3": (126, 167),
    "bmojo-B1": (91, 99), "bmojo-B2": (105, 132), "bmojo-B3": (126, 148),
}


def setting_cap(setting: str) -> int:
    """The step cap of every run at ``setting``."""
    return TRAIN["cap"] * CAP_FACTOR[setting]


def memory_floats(config, seq_len: int) -> float:
    """Recurrent memory per layer (mean over layers) in floats: :func:`bmojo.presets.recall_memory_floats`,
    which ``bmojo bench`` plots against too (formula in the module docstring)."""
    from bmojo.presets import recall_memory_floats

    return recall_memory_floats(config, seq_len)


def member_budgets(member: str) -> tuple[str, ...]:
    return tuple(KNOBS[member])


def sweep_budget(member: str) -> str:
    return SWEEP_BUDGET if SWEEP_BUDGET in KNOBS[member] else "-"


# -- run specifications ---------------------------------------------------------------------------

def model_overrides(member: str, knobs: dict) -> dict:
    from bmojo.presets import member_layer_types

    d = dict(BASE_MODEL)
    d.update(layer_types=member_layer_types(member, 2), intermediate_size=0 if member == "mamba" else 128,
             memory_slots=0, rope_theta=None)
    d.update(knobs)
    return d


def run_spec(member: str, setting: str, budget: str, lr: float, seed: int = 0, knobs: dict | None = None,
             tag: str = "") -> dict:
    """Everything that determines one run. The name is the cache key; the recorded data, model and
    training settings must also match for a cached run to count (a changed protocol leaves old runs
    stale, and the report counts them as missing)."""
    knobs = KNOBS[member][budget] if knobs is None else knobs
    b, cap = TRAIN["batch"], setting_cap(setting)
    name = f"{member}-{setting}{'' if budget == '-' else '-' + budget}{tag}-lr{lr:g}-s{seed}-b{b}-c{cap}"
    data = dict(SETTINGS[setting], power_a=1.0, random_non_queries=False, seed=TRAIN["data_seed"], num_examples=cap * b)
    return dict(name=name, member=member, setting=setting, kv=SETTINGS[setting]["num_kv_pairs"], budget=budget, lr=lr,
                seed=seed, tag=tag, knobs=knobs, model_overrides=model_overrides(member, knobs), data=data, batch=b,
                cap=cap, train=dict(TRAIN, cap=cap))


def train_config(spec: dict, workdir: str):
    from bmojo.train import TrainConfig

    t = spec["train"]  # the protocol travels with the spec (worker processes read nothing else)
    return TrainConfig(
        output_dir=os.path.join(workdir, spec["name"]), model=spec["member"], size="tiny",
        model_overrides=spec["model_overrides"], data=spec["data"],
        eval_data=dict(seed=t["eval_seed"], num_examples=t["eval_examples"]), eval_examples=t["eval_examples"],
        steps=spec["cap"], batch_size=spec["batch"], lr=spec["lr"], min_lr_ratio=0.1, warmup_steps=t["warmup"],
        weight_decay=0.1, grad_clip=1.0, dtype="float32", seed=spec["seed"], eval_every=t["eval_every"],
        early_stop_patience=t["patience"], early_stop_min_delta=t["min_delta"], early_stop_min_steps=t["min_steps"],
        eval_batch_size=100, save_every=t["eval_every"], log_every=50, distributed="none", threads=1, progress=False,
    )


def run_one(spec: dict, workdir: str) -> dict:
    """Train one run (resuming from its checkpoint if it has one) until it stops or hits the cap, then
    score near / far queries on the evaluation set. A diverged run is returned with status 'diverged'.
    The run's directory is locked while it trains (another invocation gets an error and moves on), and
    its record is also written there (record.json), so a finished run is never trained twice even if
    the cache did not get it."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # no loading bars from the workers in the study's log
    cfg = train_config(spec, workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, spec["name"] + ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"{spec['name']} is being trained by another invocation") from None
    try:
        return _train_and_score(spec, cfg)
    finally:
        lock.close()


def _record_path(cfg) -> str:
    return os.path.join(cfg.output_dir, "record.json")


def _save_record(cfg, record: dict) -> dict:
    os.makedirs(cfg.output_dir, exist_ok=True)
    tmp = _record_path(cfg) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, _record_path(cfg))
    return record


def _train_and_score(spec: dict, cfg) -> dict:
    import torch

    from bmojo import BMojoForCausalLM
    from bmojo.data import MQARConfig, value_distances
    from bmojo.train import TrainingDivergedError, train

    if os.path.exists(_record_path(cfg)):  # finished by an invocation whose result did not reach the cache
        with open(_record_path(cfg)) as fh:
            record = json.load(fh)
        if all(record.get(k) == spec[k] for k in ("model_overrides", "data", "train")):
            return record
    t0 = time.perf_counter()
    try:
        res = train(cfg)
    except TrainingDivergedError as e:
        return _save_record(cfg, dict(spec, status="diverged", error=str(e), accuracy=None,
                                      wall_s=time.perf_counter() - t0, finished=time.strftime("%Y-%m-%d %H:%M:%S")))
    wall = time.perf_counter() - t0
    model = BMojoForCausalLM.from_pretrained(res["final_dir"]).eval()
    with open(os.path.join(res["final_dir"], "eval.json")) as fh:
        data = MQARConfig.from_dict(json.load(fh)["eval_data"]).generate()
    dist = value_distances(data)
    hit = torch.zeros_like(dist, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(data), 100):
            logits = model(data.inputs[i : i + 100], use_cache=False).logits
            pred = logits.gather(1, data.query_positions[i : i + 100, :, None].expand(-1, -1, logits.shape[-1]))
            hit[i : i + 100] = pred.argmax(-1) == data.values[i : i + 100]
    far = dist >= W
    fe = res["final_eval"]
    history = res["history"]
    record = _save_record(cfg, dict(
        spec, status="done", memory=memory_floats(model.config, spec["data"]["seq_len"]),
        params=sum(p.numel() for p in model.parameters()), accuracy=fe["accuracy"], eval_loss=fe["loss"],
        steps_done=fe["step"], stop="early" if res["stopped_early"] else "cap", stop_reason=res["stopped_early"],
        best_eval=max([e["accuracy"] for e in res["eval_history"]] + [fe["accuracy"]]),
        evals=[[e["step"], round(e["accuracy"], 4)] for e in res["eval_history"]],
        acc_near=float(hit[~far].float().mean()) if (~far).any() else None,
        acc_far=float(hit[far].float().mean()) if far.any() else None, far_fraction=float(far.float().mean()),
        train_loss_last=sum(h["loss"] for h in history[-10:]) / len(history[-10:]) if history else None,
        wall_s=wall, ms_per_step=1000 * wall / max(1, len(history)), final_dir=res["final_dir"],
        resumed=res["resumed_from"] is not None, finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    ))
    for name in os.listdir(cfg.output_dir):  # keep final/, the logs and the record: the run is finished
        if name.startswith("ckpt-"):
            shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
        elif name == "latest":
            os.remove(os.path.join(cfg.output_dir, name))
    return record


# -- cache ----------------------------------------------------------------------------------------

def cache_path(results: str) -> str:
    return os.path.join(results, CACHE_NAME)


def load_cache(results: str) -> dict:
    path = cache_path(results)
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return {"machine": None, "runs": {}, "invocations": [], "timing": {}}


def update_cache(results: str, runs: dict | None = None, **fields) -> dict:
    """Merge ``runs`` (and top-level ``fields``) into the cache file under a lock, so invocations running
    at the same time keep each other's results; returns the merged cache."""
    os.makedirs(results, exist_ok=True)
    lock_name = f"bmojo-mqar-v2-{zlib.crc32(os.path.abspath(results).encode()):08x}.lock"  # outside the repository
    with open(os.path.join(tempfile.gettempdir(), lock_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_cache(results)
        cache["runs"].update(runs or {})
        for key, value in fields.items():
            if key == "invocations":
                cache.setdefault("invocations", []).extend(value)
            elif key == "timing":
                cache.setdefault("timing", {}).update(value)
            else:
                cache[key] = value
        fd, tmp = tempfile.mkstemp(dir=results, prefix=".mqar_runs_v2.", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh, indent=1, sort_keys=True)
        os.replace(tmp, cache_path(results))
    return cache


def cached(cache: dict, spec: dict) -> dict | None:
    """The cached record of ``spec``, if it was run with the same data, model and training settings."""
    r = cache["runs"].get(spec["name"])
    if r is None or any(r.get(k) != spec[k] for k in ("model_overrides", "data", "train")):
        return None
    return r


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "done"


# -- the plan: which runs, in which order, on what they depend ----------------------------------

def best_lr(cache: dict, member: str, setting: str) -> float | None:
    """The learning rate of the member's sweep (seed 0, budget B2) with the best final accuracy (then the
    lower eval loss); None while a sweep run is missing or if every one diverged."""
    rows = [cached(cache, run_spec(member, setting, sweep_budget(member), lr)) for lr in LRS]
    if any(r is None for r in rows):
        return None
    rows = [r for r in rows if _ok(r)]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["accuracy"], -r["eval_loss"]))["lr"]


def recipe_runs(cache: dict, setting: str) -> list[dict]:
    """The transformer's runs at ``setting`` that can be named now: the lr sweep, then seeds 1 and 2 at
    the best lr once the sweep is done and its seed 0 reached the target."""
    out = [run_spec("transformer", setting, "-", lr) for lr in LRS]
    lr = best_lr(cache, "transformer", setting)
    if lr is not None and cached(cache, run_spec("transformer", setting, "-", lr))["accuracy"] >= RECIPE_TARGET:
        out += [run_spec("transformer", setting, "-", lr, seed=s) for s in SEEDS[1:]]
    return out


def recipe_status(cache: dict, setting: str) -> str:
    """'pass' (every seed at the transformer's best lr reaches RECIPE_TARGET), 'fail' (one does not, or
    every lr diverged) or 'pending'."""
    if any(cached(cache, run_spec("transformer", setting, "-", lr)) is None for lr in LRS):
        return "pending"
    lr = best_lr(cache, "transformer", setting)
    if lr is None:
        return "fail"
    rows = [cached(cache, run_spec("transformer", setting, "-", lr, seed=s)) for s in SEEDS]
    if any(_ok(r) and r["accuracy"] < RECIPE_TARGET or r is not None and not _ok(r) for r in rows):
        return "fail"
    return "pending" if any(r is None for r in rows) else "pass"


def used_settings(cache: dict) -> tuple[list[str], bool]:
    """(the settings the study uses, whether that list is final). Candidates are read in order until
    K_LEVELS of them passed or are still being checked; every passing one read is used (the pending ones
    before it could at most fill the remaining levels), and the list is final when none is pending."""
    used, pending = [], 0
    for s in SETTINGS:
        if len(used) + pending >= K_LEVELS:
            break
        st = recipe_status(cache, s)
        if st == "pass":
            used.append(s)
        elif st == "pending":
            pending += 1
    return used, pending == 0


def group_specs(cache: dict, group: str) -> tuple[list[dict], list[str]]:
    """(the runs of ``group`` that can be named now, in priority order; why others cannot yet)."""
    specs, blocked = [], []
    used, final = used_settings(cache)
    if group == "recipe":  # the candidates used_settings() reads, failed ones included (their runs are done)
        live = 0
        for s in SETTINGS:
            if live >= K_LEVELS:
                break
            st = recipe_status(cache, s)
            specs += recipe_runs(cache, s)
            live += st != "fail"
            if st == "pending" and best_lr(cache, "transformer", s) is None:
                blocked.append(f"transformer seeds 1-2 at {s}: its lr sweep is not finished")
        return specs, blocked
    if not final:
        blocked.append(f"{group}: the recipe check has not decided every setting (used so far: {used or 'none'})")
    if group == "sweep":
        for s in used:
            for lr in LRS:
                specs += [run_spec(m, s, sweep_budget(m), lr) for m in SWEEP_ORDER]
    elif group in ("budgets", "seeds"):
        members = SSM_MEMBERS if group == "budgets" else ("swa",) + SSM_MEMBERS
        for s in used:
            for m in members:
                lr = best_lr(cache, m, s)
                if lr is None:
                    blocked.append(f"{group} of {m} at {s}: its lr sweep is not finished (or every lr diverged)")
                    continue
                for b in member_budgets(m):
                    if group == "budgets" and b != SWEEP_BUDGET:
                        specs.append(run_spec(m, s, b, lr))
                    elif group == "seeds":
                        specs += [run_spec(m, s, b, lr, seed=seed) for seed in SEEDS[1:]]
    elif group == "lrcheck":
        if final and used:
            specs, why = lr_check_runs(cache, hardest_setting(used))
            blocked += why
    elif group == "ablation":
        if final and used:
            s = hardest_setting(used)
            lr = best_lr(cache, "bmojo", s)
            if lr is None:
                blocked.append(f"ablation at {s}: bmojo's lr sweep is not finished")
            else:
                specs += ablation_runs(s, lr)
    else:
        raise ValueError(f"unknown group {group!r}; groups: {GROUPS}")
    return specs, blocked


def hardest_setting(used: list[str]) -> str:
    """The used setting with the most key-value pairs: the eidetic ablation and the lr check run there."""
    return max(used, key=lambda s: SETTINGS[s]["num_kv_pairs"])


def lr_check_runs(cache: dict, setting: str) -> tuple[list[dict], list[str]]:
    """Seeds 1 and 2, at budget B2, of every other SSM-bearing member whose best lr at ``setting`` differs
    from LR_CHECK_MEMBER's, at that member's lr (seed 0 is the sweep's run): whether a member left the
    1/K plateau and another did not because of the lr each was given. (runs, why some cannot be named)"""
    ref = best_lr(cache, LR_CHECK_MEMBER, setting)
    if ref is None:
        return [], [f"lrcheck at {setting}: {LR_CHECK_MEMBER}'s lr sweep is not finished"]
    specs, blocked = [], []
    for m in SSM_MEMBERS:
        if m == LR_CHECK_MEMBER:
            continue
        own = best_lr(cache, m, setting)
        if own is None:
            blocked.append(f"lrcheck of {m} at {setting}: its lr sweep is not finished")
        elif own != ref:
            specs += [run_spec(m, setting, SWEEP_BUDGET, ref, seed=x) for x in SEEDS[1:]]
    return specs, blocked


def ablation_runs(setting: str, lr: float) -> list[dict]:
    base = KNOBS["bmojo"][SWEEP_BUDGET]
    return [run_spec("bmojo", setting, SWEEP_BUDGET, lr, seed=seed, knobs=dict(base, memory_slots=me), tag=f"-me{me}")
            for me in ABLATION_SLOTS if me != base["memory_slots"] for seed in SEEDS]


def in_part(name: str, part: tuple[int, int] | None) -> bool:
    """Stable split of the runs into M parts by a hash of the name (part N of M, 1-based)."""
    return part is None or zlib.crc32(name.encode()) % part[1] == part[0] - 1


def step_ms(member: str, budget: str, cache: dict | None = None, which: int = 1) -> float:
    """ms per training step of a point: this machine's ``--timing`` if cached, else calibration's
    (``which`` 0: minimum, 1: median)."""
    key = f"{member}-{budget}"
    timing = (cache or {}).get("timing", {})
    if key in timing:
        return timing[key]
    return STEP_MS.get(key, STEP_MS.get(f"bmojo-{budget}", (150, 150)))[which]


def full_plan(settings: tuple[str, ...] = ("K1", "K2")) -> dict[str, list[dict]]:
    """Every run of the study if ``settings`` pass the recipe check (lr placeholders: 3e-3): the basis of
    the CPU-time estimate."""
    out = {g: [] for g in GROUPS}
    for s in settings:
        out["recipe"] += [run_spec("transformer", s, "-", lr) for lr in LRS]
        out["recipe"] += [run_spec("transformer", s, "-", LRS[0], seed=x) for x in SEEDS[1:]]
        for m in SWEEP_ORDER:
            out["sweep"] += [run_spec(m, s, sweep_budget(m), lr) for lr in LRS]
            for b in member_budgets(m):
                if m != "swa" and b != SWEEP_BUDGET:
                    out["budgets"].append(run_spec(m, s, b, LRS[0]))
                out["seeds"] += [run_spec(m, s, b, LRS[0], seed=x) for x in SEEDS[1:]]
    hardest = hardest_setting(list(settings))
    out["ablation"] = ablation_runs(hardest, LRS[0])
    # lrcheck: seeds 1, 2 of each other SSM member at LR_CHECK_MEMBER's lr (if it differs from their own)
    out["lrcheck"] = [run_spec(m, hardest, SWEEP_BUDGET, LRS[2], seed=x)
                      for m in SSM_MEMBERS if m != LR_CHECK_MEMBER for x in SEEDS[1:]]
    return out


def cpu_seconds(specs: list[dict], cap_share: float, cache: dict | None = None, which: int = 1) -> float:
    """CPU seconds of ``specs`` if each run stops after ``cap_share`` of its cap (evaluations included)."""
    def run_s(s):
        steps = cap_share * s["cap"]
        evals = steps // TRAIN["eval_every"] * TRAIN["eval_examples"] / TRAIN["batch"] / 3  # a forward ~ 1/3 step
        return step_ms(s["member"], s["budget"], cache, which) * (steps + evals) / 1000

    return sum(map(run_s, specs))


def expected_seconds(cache: dict, spec: dict) -> float:
    """Wall seconds ``spec`` should take: its seed-0 twin's if cached, else the plan's estimate."""
    twin = cached(cache, run_spec(spec["member"], spec["setting"], spec["budget"], spec["lr"], seed=0,
                                  knobs=spec["knobs"], tag=spec["tag"]))
    if twin is not None and twin.get("wall_s"):
        return twin["wall_s"]
    return cpu_seconds([spec], TYPICAL_SHARE, cache)


def plan_text(cache: dict, part=None) -> str:
    caps = ", ".join(f"{k} {setting_cap(k)}" for k in ("K1", "K2"))
    lines = ["Whole study if K1 and K2 pass (every run at the calibrated step times, 1 thread):", "",
             f"| group | runs | CPU-h at {TYPICAL_SHARE:.0%} of the cap (min / median ms) | at the cap ({caps}; min / median ms) |",
             "|---|---|---|---|"]
    full = full_plan()
    for g in GROUPS:
        lines.append(f"| {g} | {len(full[g])} | {cpu_seconds(full[g], TYPICAL_SHARE, which=0) / 3600:.2f} / "
                     f"{cpu_seconds(full[g], TYPICAL_SHARE) / 3600:.2f} | "
                     f"{cpu_seconds(full[g], 1.0, which=0) / 3600:.2f} / "
                     f"{cpu_seconds(full[g], 1.0) / 3600:.2f} |")
    allr = [s for g in GROUPS for s in full[g]]
    lines += [f"| all | {len(allr)} | {cpu_seconds(allr, TYPICAL_SHARE, which=0) / 3600:.2f} / "
              f"{cpu_seconds(allr, TYPICAL_SHARE) / 3600:.2f} | "
              f"{cpu_seconds(allr, 1.0, which=0) / 3600:.2f} / {cpu_seconds(allr, 1.0) / 3600:.2f} |",
              "", "Now (from the cache" + (f", part {part[0]}/{part[1]}" if part else "") + "):", ""]
    for g in GROUPS:
        specs, blocked = group_specs(cache, g)
        todo = [s for s in specs if cached(cache, s) is None and in_part(s["name"], part)]
        done = [s for s in specs if cached(cache, s) is not None]
        lines.append(f"- {g}: {len(done)} done, {len(todo)} to run now "
                     f"(~{cpu_seconds(todo, TYPICAL_SHARE, cache) / 3600:.2f} CPU-h)"
                     + (f"; blocked: {'; '.join(blocked)}" if blocked else ""))
    return "\n".join(lines)


# -- running --------------------------------------------------------------------------------------

def run_all(specs: list[dict], results: str, workdir: str, workers: int, deadline: float | None) -> set[str]:
    """Run ``specs`` (in order, ``workers`` at a time, one thread each); each finished run is merged into
    the cache at once. No run starts after ``deadline`` (time.time()). A run that fails is reported and
    left for the next invocation. Returns the names attempted (started)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    attempted, queue = set(), list(specs)
    print(f"{len(queue)} runs to do, {workers} at a time", flush=True)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        running = {}
        while queue or running:
            while queue and len(running) < workers and (deadline is None or time.time() < deadline):
                s = queue.pop(0)
                try:
                    running[pool.submit(run_one, s, workdir)] = s
                except BrokenProcessPool:  # a worker died (killed, out of memory): the caller starts a new pool
                    print("the worker pool broke; the runs not started go to a new one", flush=True)
                    return attempted
                attempted.add(s["name"])
            if not running:
                print(f"deadline reached; {len(queue)} runs left for the next invocation", flush=True)
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                s = running.pop(fut)
                try:
                    r = fut.result()
                except Exception as e:  # keep the others going; retried by the next invocation
                    print(f"FAILED {s['name']}: {type(e).__name__}: {e}", flush=True)
                    continue
                update_cache(results, {r["name"]: r})
                if r["status"] == "diverged":
                    print(f"{r['name']}: diverged ({r['error'][:120]})", flush=True)
                else:
                    print(f"{r['name']}: acc {100 * r['accuracy']:.1f} % (far {_pct(r['acc_far'])}) at step "
                          f"{r['steps_done']} ({r['stop']}), {r['wall_s']:.0f} s", flush=True)
    return attempted


def run_groups(groups, results: str, workdir: str, workers: int, part=None, deadline=None) -> None:
    attempted: set[str] = set()
    for g in groups:
        while deadline is None or time.time() < deadline:
            cache = load_cache(results)
            specs, _ = group_specs(cache, g)
            todo = [s for s in specs if cached(cache, s) is None and in_part(s["name"], part)
                    and s["name"] not in attempted]
            if not todo:
                break
            if g in ("seeds", "lrcheck"):  # longest first, so the workers run out of work together
                todo.sort(key=lambda s: -expected_seconds(cache, s))
            print(f"== {g}", flush=True)
            attempted |= run_all(todo, results, workdir, workers, deadline)


def measure_timing(results: str, steps: int = 6) -> dict:
    """ms per training step (batch and T of the study, 1 thread) of every member at every budget, here."""
    import torch

    from bmojo import BMojoForCausalLM
    from bmojo.data import MQARConfig
    from bmojo.presets import preset_config

    torch.set_num_threads(1)
    setting = SETTINGS["K2"]
    out = {}
    for m in MEMBERS:
        for b in member_budgets(m):
            spec = run_spec(m, "K2", b, LRS[0])
            data = MQARConfig(**dict(spec["data"], num_examples=TRAIN["batch"])).generate()
            model = BMojoForCausalLM(preset_config(m, "tiny", **spec["model_overrides"], vocab_size=setting["vocab_size"]))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ts = []
            for _ in range(steps + 2):
                t0 = time.perf_counter()
                model(input_ids=data.inputs, labels=data.labels, use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad()
                ts.append(time.perf_counter() - t0)
            out[f"{m}-{b}"] = round(1000 * statistics.median(ts[2:]), 1)
            print(f"{m:12s} {b}: {out[f'{m}-{b}']:.0f} ms/step", flush=True)
    update_cache(results, timing=out, timing_load=os.getloadavg()[0])
    return out


# -- aggregation ------------------------------------------------------------------------------------

def point(cache: dict, member: str, setting: str, budget: str, lr: float | None, knobs=None, tag="") -> dict | None:
    """The seeds of one reported point: records, mean, min, max (accuracy, far, near), steps, cap hits."""
    if lr is None:
        return None
    rows = [cached(cache, run_spec(member, setting, budget, lr, seed=s, knobs=knobs, tag=tag)) for s in SEEDS]
    done = [r for r in rows if _ok(r)]
    if not done:
        return None
    acc = [r["accuracy"] for r in done]

    def mean(key):
        v = [r[key] for r in done if r.get(key) is not None]
        return statistics.fmean(v) if v else None

    return dict(member=member, setting=setting, budget=budget, lr=lr, rows=done, n=len(done),
                missing=sum(r is None for r in rows), diverged=sum(r is not None and not _ok(r) for r in rows),
                mean=statistics.fmean(acc), lo=min(acc), hi=max(acc), far=mean("acc_far"), near=mean("acc_near"),
                steps=statistics.fmean(r["steps_done"] for r in done), caps=sum(r["stop"] == "cap" for r in done),
                memory=done[0]["memory"], knobs=done[0]["knobs"], wall=sum(r["wall_s"] for r in done))


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def _span(p):
    return f"{_pct(p['mean'])} ({_pct(p['lo'])}-{_pct(p['hi'])})" if p["n"] > 1 else _pct(p["mean"])


def _knob_text(member: str, knobs: dict, seq_len: int) -> str:
    if member == "transformer":
        return f"full KV, T={seq_len}"
    parts = [] if member == "swa" else [f"N={knobs['d_state']}"]
    if member != "mamba":
        parts.append(f"w={W}")
    if member in ("bmojo-f", "bmojo"):
        parts.append(f"m_f={knobs['fading_window']}")
    if member == "bmojo":
        parts.append(f"m_e={knobs['memory_slots']}")
    return ", ".join(parts)


ORDERINGS = (("bmojo", "bmojo-f"), ("bmojo-f", "hybrid"), ("hybrid", "mamba"), ("bmojo", "mamba"))
TIE = 0.01  # means within one point are a tie


def verdict(a: dict, b: dict) -> str:
    """Whether ``a >= b`` holds between two points (means; a tie is within TIE)."""
    d = a["mean"] - b["mean"]
    if abs(d) <= TIE:
        return "tie"
    hi, lo = (a, b) if d > 0 else (b, a)
    seeds = (" (one seed)" if min(a["n"], b["n"]) < 2 else
             " (seed ranges apart)" if hi["lo"] > lo["hi"] else " (seed ranges overlap)")
    return ("holds" if d > 0 else "reversed") + seeds


# -- report ---------------------------------------------------------------------------------------

def write_report(cache: dict, results: str, part=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(results, exist_ok=True)
    used, final = used_settings(cache)
    t = TRAIN
    lines = [REPORT_MARK, "# MQAR: recall against memory budget, trained to convergence (protocol v2)", "",
             "Generated by `python benchmarks/mqar.py` (its docstring has the whole protocol); every number is measured "
             f"and cached per run in `benchmarks/results/{CACHE_NAME}`. The earlier protocol (fixed 240 steps) is in "
             "`mqar_v1.md` and `mqar_runs.json`; the recipe's calibration in `mqar_calibration.md`.", "",
             f"- machine: {cache.get('machine')}",
             f"- models: 2 layers, d_model 64, 4 heads x 16 with 4 key/value heads, SwiGLU 128 (mamba: none), "
             f"d_inner 128, window w = {W}; RoPE for transformer and swa only",
             f"- data: MQAR, T = 64, vocabulary 64, uniform query gaps, filler 0; settings "
             + ", ".join(f"{k} (K = {v['num_kv_pairs']})" for k, v in SETTINGS.items()) + " tried in that order",
             f"- training: batch {t['batch']}, AdamW (wd 0.1), warmup {t['warmup']}, cosine to 0.1x at the cap of "
             + ", ".join(f"{setting_cap(k)} ({k})" for k in SETTINGS)
             + f" steps, clip 1.0, fp32; evaluation every {t['eval_every']} steps on {t['eval_examples']} "
             f"fixed sequences (seed {t['eval_seed']}); stop when accuracy has not improved by more than "
             f"{100 * t['min_delta']:g} points over {t['patience']} evaluations (not before step {t['min_steps']}), "
             "or at the cap",
             f"- learning rate: best of {', '.join(f'{x:g}' for x in LRS)} per member and setting (seed 0, budget "
             f"{SWEEP_BUDGET}); seeds {', '.join(map(str, SEEDS))} at it; points are mean (min-max) over seeds",
             f"- accuracy at the answer positions; *far*: the value lies {W} or more tokens back (beyond the window); "
             "chance 1/32; answering with some value of the context scores 1/K", ""]

    # status: what is missing
    lines += ["## Status", ""]
    missing_total = 0
    for g in GROUPS:
        specs, blocked = group_specs(cache, g)
        todo = [s["name"] for s in specs if cached(cache, s) is None]
        missing_total += len(todo)
        lines.append(f"- **{g}**: {len(specs) - len(todo)} of {len(specs)} named runs done "
                     f"(the plan has {len(full_plan()[g])} if K1 and K2 pass)"
                     + (f"; missing: {', '.join(todo)}" if todo else "")
                     + (f"; not yet named: {'; '.join(blocked)}" if blocked else ""))
    complete = missing_total == 0 and final and not any(group_specs(cache, g)[1] for g in GROUPS)
    lines += ["", "The study is complete." if complete else "**The study is not complete**: the runs listed above are "
              "missing (or not yet named), and every conclusion below covers only what has run.", ""]

    # recipe check
    lines += ["## Recipe check: the transformer at every candidate setting", "",
              "| setting | K | lr | seed | accuracy % | far % | steps | stop |", "|---|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        for spec in recipe_runs(cache, s):
            r = cached(cache, spec)
            if r is None:
                continue
            if _ok(r):
                lines.append(f"| {s} | {spec['kv']} | {spec['lr']:g} | {spec['seed']} | {_pct(r['accuracy'])} | "
                             f"{_pct(r['acc_far'])} | {r['steps_done']} | {r['stop']} |")
            else:
                lines.append(f"| {s} | {spec['kv']} | {spec['lr']:g} | {spec['seed']} | diverged | | | |")
    lines += [""] + [f"- {s}: **{recipe_status(cache, s)}**" + (" (used)" if s in used else "") for s in SETTINGS]
    lines += ["", f"Settings used: {', '.join(used) or 'none yet'}" + ("" if final else " (not final: a check is pending)"), ""]

    # main table
    pts = {}
    for s in used:
        for m in MEMBERS:
            lr = best_lr(cache, m, s)
            for b in member_budgets(m):
                p = point(cache, m, s, b, lr)
                if p is not None:
                    pts[(m, s, b)] = p
    lines += ["## Accuracy against memory (best learning rate per member and setting)", "",
              "| setting | model | budget | memory (floats/layer) | state | lr | seeds | accuracy % | far % | near % | "
              "mean steps | runs at the cap |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, s, b), p in sorted(pts.items(), key=lambda kv: (kv[0][1], MEMBERS.index(kv[0][0]), kv[1]["memory"])):
        lines.append(f"| {s} | {m} | {b} | {p['memory']:.0f} | {_knob_text(m, p['knobs'], 64)} | {p['lr']:g} | "
                     f"{p['n']}{' (+' + str(p['missing']) + ' missing)' if p['missing'] else ''} | {_span(p)} | "
                     f"{_pct(p['far'])} | {_pct(p['near'])} | {p['steps']:.0f} | {p['caps']} |")

    # lr sweep
    lines += ["", f"## Learning-rate sweep (seed 0, budget {SWEEP_BUDGET})", "",
              "| setting | model | lr | accuracy % | far % | steps | stop | wall s |", "|---|---|---|---|---|---|---|---|"]
    for s in used:
        for m in MEMBERS:
            for lr in LRS:
                r = cached(cache, run_spec(m, s, sweep_budget(m), lr))
                if r is None:
                    continue
                if _ok(r):
                    lines.append(f"| {s} | {m} | {lr:g} | {_pct(r['accuracy'])} | {_pct(r['acc_far'])} | "
                                 f"{r['steps_done']} | {r['stop']} | {r['wall_s']:.0f} |")
                else:
                    lines.append(f"| {s} | {m} | {lr:g} | diverged | | | | {r['wall_s']:.0f} |")

    # orderings
    lines += ["", "## The paper's orderings at equal memory", "",
              "| ordering | setting | budget | means % | verdict |", "|---|---|---|---|---|"]
    summary = {}
    for a, b in ORDERINGS:
        for s in used:
            for bud in BUDGETS:
                pa, pb = pts.get((a, s, bud)), pts.get((b, s, bud))
                if pa is None or pb is None:
                    continue
                v = verdict(pa, pb)
                summary.setdefault(f"{a} >= {b}", []).append(v.split()[0])
                lines.append(f"| {a} >= {b} | {s} | {bud} | {_pct(pa['mean'])} vs {_pct(pb['mean'])} | {v} |")
    for m in SSM_MEMBERS:
        for s in used:
            ps = [pts.get((m, s, b)) for b in BUDGETS]
            if all(p is not None for p in ps):
                v = [verdict(ps[i + 1], ps[i]).split()[0] for i in range(len(ps) - 1)]
                summary.setdefault("accuracy grows with the budget", []).extend(v)
                lines.append(f"| {m}: B3 >= B2 >= B1 | {s} | all | {' / '.join(_pct(p['mean']) for p in ps)} | "
                             f"{', '.join(v)} |")
    for s in used:
        tr = point(cache, "transformer", s, "-", best_lr(cache, "transformer", s))
        if tr is not None:
            others = [p for (m, s2, _), p in pts.items() if s2 == s and m != "transformer"]
            beaten = [p for p in others if p["mean"] > tr["mean"] + TIE]
            summary.setdefault("transformer >= every member", []).append("reversed" if beaten else "holds")
    lines += [""]
    for k, vs in summary.items():
        n = len(vs)
        lines.append(f"- **{k}**: holds at {vs.count('holds')} of {n} points, tie at {vs.count('tie')}, "
                     f"reversed at {vs.count('reversed')}")
    if not summary:
        lines.append("- no ordering can be checked yet (points missing)")

    # beyond the window
    lines += ["", f"## Beyond the window (far: value {W}+ tokens back; near: within the window)", "",
              "| setting | model | budget | near % | far % | far share of queries % |", "|---|---|---|---|---|---|"]
    for (m, s, b), p in sorted(pts.items(), key=lambda kv: (kv[0][1], MEMBERS.index(kv[0][0]), kv[1]["memory"])):
        if b in ("-", SWEEP_BUDGET):
            lines.append(f"| {s} | {m} | {b} | {_pct(p['near'])} | {_pct(p['far'])} | "
                         f"{_pct(statistics.fmean(r['far_fraction'] for r in p['rows']))} |")

    # ablation
    abl = []
    if final and used:
        s = hardest_setting(used)
        lr = best_lr(cache, "bmojo", s)
        base = KNOBS["bmojo"][SWEEP_BUDGET]
        for me in ABLATION_SLOTS:
            knobs = dict(base, memory_slots=me)
            tag = "" if me == base["memory_slots"] else f"-me{me}"
            p = point(cache, "bmojo", s, SWEEP_BUDGET, lr, knobs=None if not tag else knobs, tag=tag)
            if p is not None:
                abl.append((me, p))
        bf = pts.get(("bmojo-f", s, SWEEP_BUDGET))
        lines += ["", f"## Eidetic ablation (bmojo at {s}, N = {base['d_state']}, m_f = {base['fading_window']}: "
                      "accuracy against memory slots m_e)", "",
                  "| m_e | memory (floats/layer) | seeds | accuracy % | far % | near % |", "|---|---|---|---|---|---|"]
        for me, p in abl:
            lines.append(f"| {me} | {p['memory']:.0f} | {p['n']} | {_span(p)} | {_pct(p['far'])} | {_pct(p['near'])} |")
        if bf is not None:
            lines.append(f"| 0 (bmojo-f, m_f = {KNOBS['bmojo-f'][SWEEP_BUDGET]['fading_window']}) | {bf['memory']:.0f} | "
                         f"{bf['n']} | {_span(bf)} | {_pct(bf['far'])} | {_pct(bf['near'])} |")
        if len(abl) >= 2:
            v = [verdict(abl[i + 1][1], abl[i][1]).split()[0] for i in range(len(abl) - 1)]
            lines += ["", f"- **more eidetic slots, higher accuracy**: {', '.join(v)} "
                          f"(m_e {' -> '.join(str(me) for me, _ in abl)})"]

    # lr check: the other SSM-bearing members at LR_CHECK_MEMBER's lr
    if final and used:
        s = hardest_setting(used)
        ref = best_lr(cache, LR_CHECK_MEMBER, s)
        kv = SETTINGS[s]["num_kv_pairs"]
        off = (1 + 1 / kv) / 2  # a run above this left the 1/K copy plateau
        left = lambda a: a is not None and a > off  # noqa: E731
        rows = []
        for m in SSM_MEMBERS:
            accs = [cached(cache, run_spec(m, s, SWEEP_BUDGET, ref, seed=x)) for x in SEEDS] if ref else []
            accs = [r["accuracy"] if _ok(r) else None for r in accs if r is not None]
            if accs:
                own = pts.get((m, s, SWEEP_BUDGET))
                rows.append((m, accs, own))
        if rows:
            lines += ["", f"## Learning-rate check at {s}: every SSM-bearing member at {LR_CHECK_MEMBER}'s lr "
                          f"({ref:g}), budget {SWEEP_BUDGET}", "",
                      f"Each member's lr was picked on seed 0; at {s} a run either stays on the 1/K plateau or leaves "
                      f"it, so the pick can rest on little. Here every member runs seeds {', '.join(map(str, SEEDS))} "
                      f"at the lr {LR_CHECK_MEMBER} got (seed 0 is the sweep's run). *Left*: runs above "
                      f"{_pct(off)} % (halfway from 1/K to 100 %).", "",
                      "| model | own best lr | accuracy % per seed at this lr | left | at its own best lr (main table) |",
                      "|---|---|---|---|---|"]
            for m, accs, own in rows:
                per_seed = " / ".join("diverged" if a is None else _pct(a) for a in accs)
                lines.append(f"| {m} | {best_lr(cache, m, s):g} | {per_seed} | {sum(map(left, accs))} of {len(accs)} | "
                             f"{_span(own) if own else '-'} |")
            others = [left(a) for m, accs, _ in rows if m != LR_CHECK_MEMBER for a in accs]
            mine = [left(a) for m, accs, _ in rows if m == LR_CHECK_MEMBER for a in accs]
            lines += ["", f"- **at {LR_CHECK_MEMBER}'s lr**: {LR_CHECK_MEMBER} left the plateau in {sum(mine)} of "
                          f"{len(mine)} runs, the other members in {sum(others)} of {len(others)}"]

    # runs at the cap
    # the plan's runs only: the cache also keeps runs of earlier protocol revisions (other caps), unused
    planned = [r for r in (cached(cache, x) for g in GROUPS for x in group_specs(cache, g)[0]) if r is not None]
    caps = sorted({r["name"] for r in planned if _ok(r) and r.get("stop") == "cap"})
    lines += ["", "## Runs that hit the cap (still improving, or too slow to tell, when they stopped)", "",
              ", ".join(caps) if caps else "none", ""]
    inv = cache.get("invocations", [])
    unique = {r["name"]: r for r in planned}
    total = sum(r.get("wall_s", 0) for r in unique.values())
    stale = sum(r.get("wall_s", 0) for n, r in cache["runs"].items() if n not in unique)
    lines += [f"CPU time of the plan's {len(unique)} runs: {total / 3600:.2f} h (each run's wall time, one thread; "
              f"shared with other jobs at times); {stale / 3600:.2f} h more in runs of earlier revisions kept in the cache; "
              f"{len(inv)} invocation(s), {sum(inv) / 3600:.2f} h of wall time.", "",
              "![accuracy vs memory](mqar_fig2.png)", "", "![eidetic ablation](mqar_eidetic.png)", ""]

    colors = {"transformer": "k", "swa": "tab:gray", "mamba": "tab:blue", "hybrid": "tab:green",
              "bmojo-f": "tab:orange", "bmojo": "tab:red"}
    cols = max(1, len(used))
    fig, axes = plt.subplots(1, cols, figsize=(6 * cols, 4.4), squeeze=False)
    for ax, s in zip(axes[0], used or ["-"]):
        for m in MEMBERS:
            ps = sorted([p for (m2, s2, _), p in pts.items() if m2 == m and s2 == s], key=lambda p: p["memory"])
            if not ps:
                continue
            x = [p["memory"] for p in ps]
            y = [100 * p["mean"] for p in ps]
            err = [[100 * (p["mean"] - p["lo"]) for p in ps], [100 * (p["hi"] - p["mean"]) for p in ps]]
            mk = {"transformer": "s", "swa": "D"}.get(m, "o")
            ax.errorbar(x, y, yerr=err, fmt=mk + "-", color=colors[m], label=m, capsize=3, ms=6)
            ax.plot(x, [100 * (p["far"] or 0) for p in ps], "x:", color=colors[m], alpha=0.7)
        if s in SETTINGS:
            ax.axhline(100 / 32, color="0.6", lw=0.8, ls="--")
            ax.axhline(100 / SETTINGS[s]["num_kv_pairs"], color="0.8", lw=0.8, ls="-.")
            ax.set_title(f"{s}: K = {SETTINGS[s]['num_kv_pairs']}, T = 64, w = {W}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory: recurrent state floats per layer")
        ax.set_ylabel("MQAR accuracy % (o all, x far; bars: seed min-max)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "mqar_fig2.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if abl:
        ax.errorbar([me for me, _ in abl], [100 * p["mean"] for _, p in abl], capsize=3, fmt="o-", color="tab:red",
                    yerr=[[100 * (p["mean"] - p["lo"]) for _, p in abl], [100 * (p["hi"] - p["mean"]) for _, p in abl]],
                    label="all queries")
        ax.plot([me for me, _ in abl], [100 * (p["far"] or 0) for _, p in abl], "x:", color="tab:red", label="far")
        ax.set_title(f"bmojo at {hardest_setting(used)}, N = {KNOBS['bmojo'][SWEEP_BUDGET]['d_state']}")
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eidetic memory slots m_e")
    ax.set_ylabel("MQAR accuracy %")
    fig.tight_layout()
    fig.savefig(os.path.join(results, "mqar_eidetic.png"), dpi=110)
    plt.close(fig)

    text = "\n".join(lines) + "\n"
    path = os.path.join(results, "mqar.md")
    v1 = os.path.join(results, "mqar_v1.md")
    if os.path.exists(path) and not os.path.exists(v1):
        with open(path) as fh:
            if REPORT_MARK not in fh.readline():
                os.replace(path, v1)  # the earlier protocol's report is kept beside its cache
                print(f"the earlier report is now {v1}")
    with open(path, "w") as fh:
        fh.write(text)
    return text


# -- shipping -------------------------------------------------------------------------------------

CARD = """---
library_name: transformers
tags: [bmojo, mqar, associative-recall]
---
# mqar-{member}

A 2-layer `{member}` model of the bmojo zoo trained on MQAR (multi-query associative recall) by
`benchmarks/mqar.py` (protocol v2: trained until it stopped improving).

{label}

```python
import bmojo
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("checkpoints/mqar-{member}")
```

- data (`mqar.json`): setting {setting}: K = {kv} key-value pairs, T = {seq_len}, vocabulary {vocab},
  uniform query gaps, filler 0
- model: `layer_types` {layer_types}, d_model 64, 4 heads x 16 with 4 key/value heads, {state};
  {params:,} parameters; recurrent memory {memory:.0f} floats per layer (budget {budget})
- training: {steps} steps x {batch} sequences ({stop}), AdamW lr {lr:g} (the best of {lrs} for this member
  and setting), warmup {warmup} + cosine to 0.1x at {cap}, grad clip 1.0, fp32, seed {seed}; {wall:.0f} s
  on {machine}
- selection: the best of this member's {n_runs} finished runs at {setting} (budgets and seeds, best lr)

## Evaluation (`eval.json`)

Fixed set `MQARConfig({eval_data})`.

| accuracy | near (value within the last {w} tokens) | far (beyond) | eval loss |
|---|---|---|---|
| {acc} % | {near} % | {far} % | {loss:.3f} |

Chance is 1/32 = 3.1 %; answering with some value of the context scores 1/K = {heur:.0f} %.
"""


def separating_setting(cache: dict) -> str | None:
    """The used setting where the members' best points differ most (spread of their best means)."""
    used, _ = used_settings(cache)
    best = {}
    for s in used:
        means = []
        for m in MEMBERS:
            lr = best_lr(cache, m, s)
            ps = [point(cache, m, s, b, lr) for b in member_budgets(m)]
            ps = [p for p in ps if p is not None]
            if ps:
                means.append(max(p["mean"] for p in ps))
        if len(means) >= 2:
            best[s] = statistics.pstdev(means)
    return max(best, key=best.get) if best else None


def ship(cache: dict, dest_root: str = os.path.join(ROOT, "checkpoints")) -> list[str]:
    """Export each member's best run at the separating setting to ``dest_root/mqar-<member>``."""
    from bmojo.presets import member_layer_types

    s = separating_setting(cache)
    if s is None:
        print("ship: no setting has results yet")
        return []
    shipped = []
    for m in MEMBERS:
        lr = best_lr(cache, m, s)
        runs = [cached(cache, run_spec(m, s, b, lr, seed=x)) for b in member_budgets(m) for x in SEEDS] if lr else []
        runs = [r for r in runs if _ok(r) and os.path.isdir(r["final_dir"])]
        if not runs:
            print(f"ship: no finished run of {m} at {s} (or its files are gone); skipped")
            continue
        r = max(runs, key=lambda r: (r["accuracy"], -r["eval_loss"]))
        dest = os.path.join(dest_root, f"mqar-{m}")
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(r["final_dir"], tmp)
        with open(os.path.join(tmp, "eval.json")) as fh:
            ev = json.load(fh)
        learned = r["accuracy"] >= RECIPE_TARGET
        label = ("It learned the task." if learned else
                 f"**It did not learn this setting**: this is its best run ({_pct(r['accuracy'])} %)"
                 + (f", and swa cannot see a value more than {W} tokens back" if m == "swa" else "") + ".")
        ev.update(acc_near=r["acc_near"], acc_far=r["acc_far"], far_threshold=W, memory_floats_per_layer=r["memory"],
                  lr=r["lr"], seed=r["seed"], run=r["name"], setting=s, steps_trained=r["steps_done"], stop=r["stop"],
                  learned=learned)
        with open(os.path.join(tmp, "eval.json"), "w") as fh:
            json.dump(ev, fh, indent=2)
            fh.write("\n")
        stop = "stopped early: " + r["stop_reason"] if r["stop"] == "early" else "hit the cap"
        card = CARD.format(
            member=m, label=label, setting=s, kv=r["kv"], seq_len=r["data"]["seq_len"], vocab=r["data"]["vocab_size"],
            layer_types=member_layer_types(m, 2), state=_knob_text(m, r["knobs"], r["data"]["seq_len"]),
            params=r["params"], memory=r["memory"], budget=r["budget"] if r["budget"] != "-" else "its own",
            steps=r["steps_done"], batch=r["batch"], stop=stop, lr=r["lr"], lrs=", ".join(f"{x:g}" for x in LRS),
            warmup=TRAIN["warmup"], cap=r["cap"], seed=r["seed"], wall=r["wall_s"], machine=cache.get("machine"),
            n_runs=len(runs), eval_data=", ".join(f"{k}={v!r}" for k, v in ev["eval_data"].items()), w=W,
            acc=_pct(r["accuracy"]), near=_pct(r["acc_near"]), far=_pct(r["acc_far"]), loss=r["eval_loss"],
            heur=100 / r["kv"])
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(card)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        shipped.append(dest)
        print(f"shipped {dest} ({r['name']}, accuracy {100 * r['accuracy']:.1f} %)")
    return shipped


# -- command line ---------------------------------------------------------------------------------

def _part(text: str) -> tuple[int, int]:
    n, _, m = text.partition("/")
    if not (n.isdigit() and m.isdigit() and 1 <= int(n) <= int(m)):
        raise argparse.ArgumentTypeError(f"--part wants N/M with 1 <= N <= M, got {text!r}")
    return int(n), int(m)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(GROUPS), help=f"groups to run, in this order: {','.join(GROUPS)}")
    p.add_argument("--part", type=_part, default=None, metavar="N/M", help="run only part N of M of each group")
    p.add_argument("--hours", type=float, default=None, help="start no new run after this many hours")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "mqar-v2"),
                   help="training directories (checkpoints and final models; not part of the repository)")
    p.add_argument("--results-dir", default=RESULTS, help="where the cache, mqar.md and the plots go")
    p.add_argument("--plan", action="store_true", help="print what is done, missing and blocked, and the CPU estimate")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--timing", action="store_true", help="measure ms per step of every point on this machine")
    p.add_argument("--ship", action="store_true", help="export each member's best run to checkpoints/mqar-<member>/")
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        p.error(f"unknown group(s) {bad}; groups: {', '.join(GROUPS)}")
    sys.path.insert(0, os.path.join(ROOT, "src"))
    results = args.results_dir
    if args.plan:
        print(plan_text(load_cache(results), args.part))
        return 0
    if args.timing:
        measure_timing(results)
        return 0
    if not args.report_only:
        import torch

        from bmojo.bench import machine_description

        torch.set_num_threads(1)
        update_cache(results, machine=machine_description().replace(" with 1 threads", "")
                     + f"; {args.workers} run(s) at a time per invocation (invocations may overlap), 1 torch thread each")
        t0 = time.perf_counter()
        deadline = time.time() + 3600 * args.hours if args.hours else None
        run_groups([g for g in GROUPS if g in groups], results, args.workdir, args.workers, args.part, deadline)
        wall = time.perf_counter() - t0
        update_cache(results, invocations=[wall])
        print(f"study wall time this invocation: {wall / 60:.1f} min")
    cache = load_cache(results)
    print(write_report(cache, results))
    print(plan_text(cache, args.part))
    if args.ship:
        ship(cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
