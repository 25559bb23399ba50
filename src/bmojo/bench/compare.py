"""Do two ``bmojo bench`` runs agree? ``python -m bmojo.bench.compare OUT_A OUT_B`` reads both
results.json files and prints, for every ratio against transformers (prefill and decode tokens/s, peak
memory) at every (model, context), both values and how far apart they are, then the largest
disagreement among the tokens/s ratios."""
from __future__ import annotations

import json
import os
import sys


def _load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as fh:
        return json.load(fh)


def _value(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def compare(a: dict, b: dict) -> tuple[list[dict], float]:
    """Every ratio of run ``a`` beside the same ratio of run ``b``; ``apart`` = max/min - 1. Returns the
    lines and the largest ``apart`` among the tokens/s ratios (prefill, decode)."""
    theirs = {(e["model"], e["backend"], e["baseline"], e["context"]): e for e in b.get("ratios", [])}
    lines, worst = [], 0.0
    for e in a.get("ratios", []):
        f = theirs.get((e["model"], e["backend"], e["baseline"], e["context"]))
        if f is None:
            continue
        for fig in ("prefill", "decode", "peak_memory"):
            x, y = _value(e.get(fig)), _value(f.get(fig))
            if not x or not y:
                continue
            apart = max(x, y) / min(x, y) - 1
            lines.append(dict(model=e["model"], context=e["context"], figure=fig, a=x, b=y, apart=apart))
            if fig != "peak_memory":
                worst = max(worst, apart)
    return lines, worst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bmojo.bench.compare OUT_A OUT_B  (bmojo bench output folders or results.json)")
        return 2
    a, b = (_load(p) for p in argv)
    lines, worst = compare(a, b)
    for r in lines:
        print(f"{r['model']:20s} {r['context']:>6d} {r['figure']:12s} {r['a']:8.3f} {r['b']:8.3f} {100 * r['apart']:6.1f}%")
    for name, run in zip(argv, (a, b)):
        c = run.get("conditions", {})
        print(f"{name}: measured in {c.get('wall_s', float('nan')):.1f} s, other processes "
              f"{c.get('other_processes_cores', float('nan')):.2f} cores, load {c.get('load_start')} -> {c.get('load_end')}")
    print(f"largest disagreement between the tokens/s ratios: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
