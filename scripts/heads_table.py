"""The README's head-experiment table, generated from the runs' own records (nothing typed by hand):
scripts/gpu_heads.py's results.json (training budget, held-out evaluations on the GPU), scripts/eval_heads.py's
JSON lines (held-out evaluation on this CPU) and `adaspec-eagle bench` records (tau and speedup per suite).

    python scripts/heads_table.py --results runs/gpu1/results.json --eval runs/eval/heads.jsonl \
        --bench runs/bench-heads-auto --bench32 runs/bench-heads-32

--curve LABEL=RECORD[:STAGE] (repeatable) prints only the held-out curves of training stages side by side, from a
train-head results.json (the STAGE's evaluations, default reference) or a checkpoint's trainer_state.json. An even
number of curves is read as pairs (e.g. KD, AdaSPEC for each seed): each pair's second minus its first at every step
both evaluated (a curve given more than once, to be in several pairs, gets one row of its own), and with several
pairs the mean difference ± half its range; --no-mean leaves the mean out (pairs that are different comparisons, not
repeats of one).

--pair KD,ADASPEC (repeatable; drafter names in the bench records) with --eval, --bench and --bench32 prints one
row per head (held-out top-1, KL and chain tau from the --eval line of the head the bench loaded; tau per suite
with both trees), each pair's AdaSPEC minus KD, and with several pairs the mean difference ± half its range.
--same-as COPY=EVALUATED reads the --eval line of EVALUATED for a head the bench loaded from COPY (a copy of it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (row label, run, stage, bench drafter name, eval key) in table order
ROWS = [
    ("KD, shipped before (original answers)", None, None, "old-kd", "heads/smollm2-135m-kd"),
    ("AdaSPEC, shipped before (equal steps)", None, None, "old-adaspec", "heads/smollm2-135m-adaspec"),
    ("KD, seed 0", "s0", "reference", "kd-s0", "runs/gpu1/heads/s0-reference"),
    ("AdaSPEC k=0.4 equal tokens, seed 0", "s0", "adaspec", "adaspec-s0", "runs/gpu1/heads/s0-adaspec"),
    ("KD, seed 1", "s1", "reference", "kd-s1", "runs/gpu1/heads/s1-reference"),
    ("AdaSPEC k=0.4 equal tokens, seed 1", "s1", "adaspec", "adaspec-s1", "runs/gpu1/heads/s1-adaspec"),
    ("AdaSPEC k=0.4 equal steps, seed 0", "s0-equal-steps", "adaspec", None, None),
    ("KD, old objective (1.0 KL + 0.1 feature, no noise), seed 0", "s0-old-objective", "reference", None, None),
]


def bench_cell(record: dict | None, name: str | None, key: str) -> str:
    if record is None or name is None:
        return "—"
    cells = []
    for suite in ("sharegpt", "humaneval"):
        res = record["results"].get(suite, {}).get(name)
        if not res or res.get(key) is None:
            cells.append("—")
            continue
        value = res[key]
        value = value["median"] if isinstance(value, dict) else value
        cells.append(f"{value:.2f}")
    return " / ".join(cells)


def runs_table(path: str) -> None:
    """Every run of a scripts/gpu_heads.py record: budget and held-out evaluation (of that run's own split)."""
    runs = json.loads(Path(path).read_text())["runs"]
    print("| run | stage | budget | k | steps x batch (tokens) | held-out top-1 | chain tau | acceptance by depth |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for name, run in runs.items():
        for stage, t in run["train"].items():
            e = run["eval"][stage]
            k = "—" if stage == "reference" else next((o.split("=")[1] for o in run["overrides"]
                                                       if o.startswith("loss.k=")), "0.4")
            budget = "—" if stage == "reference" else ("equal_steps" if "loss.budget=equal_steps" in run["overrides"]
                                                       else "equal_tokens")
            print(f"| {name} | {'KD' if stage == 'reference' else 'AdaSPEC'} | {budget} | {k} | {t['steps']} x "
                  f"{t['batch_size']} ({t['tokens'] / 1e3:.0f}k) | {e['top1']:.1%} | {e['chain']['tau']:.3f} | "
                  + " / ".join(f"{x:.2f}" for x in e["chain"]["accept_by_depth"]) + " |")


def _evals(spec: str) -> tuple[str, dict]:
    label, _, where = spec.partition("=")
    path, _, stage = where.partition(":")
    record = json.loads(Path(path).read_text())
    evals = record["train"][stage or "reference"]["evals"] if "train" in record else record["evals"]
    return label, {e["step"]: e for e in evals}


def _mean_spread(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    return f"{statistics.mean(values):+.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def curves_table(specs: list[str], mean: bool = True) -> None:
    """Held-out top-1 / chain tau by step for each curve. With an even number of curves they are pairs (first,
    second), and each pair's second minus its first is printed where both have the step; with several pairs and
    `mean`, also the mean difference ± half its range (max - min) across the pairs, at the steps every pair has."""
    curves = [_evals(spec) for spec in specs]
    steps = sorted({step for _, at in curves for step in at})
    print("| held-out top-1 / chain tau at step | " + " | ".join(str(x) for x in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for label, at in dict(zip(specs, curves)).values():  # a curve in several pairs gets one row
        print(f"| {label} | " + " | ".join(f"{at[x]['top1']:.1%} / {at[x]['tau']:.3f}" if x in at else "—"
                                            for x in steps) + " |")
    if len(curves) % 2:
        return
    pairs = [(curves[i], curves[i + 1]) for i in range(0, len(curves), 2)]
    diffs = []  # per pair: {step: (top-1 points, tau)}
    for (first, a), (second, b) in pairs:
        diffs.append({x: (100 * (b[x]["top1"] - a[x]["top1"]), b[x]["tau"] - a[x]["tau"]) for x in steps
                      if x in a and x in b})
        print(f"| {second} − {first} | " + " | ".join(f"{diffs[-1][x][0]:+.1f} / {diffs[-1][x][1]:+.3f}"
                                                      if x in diffs[-1] else "—" for x in steps) + " |")
    if mean and len(pairs) > 1:
        cells = []
        for x in steps:
            at = [d[x] for d in diffs if x in d]
            if len(at) < len(diffs):
                cells.append("—")
                continue
            cells.append(f"{_mean_spread([v[0] for v in at], 1)} / {_mean_spread([v[1] for v in at], 3)}")
        print(f"| mean of the {len(pairs)} differences ± half their range | " + " | ".join(cells) + " |")


SUITES = ("sharegpt", "humaneval")


def pairs_table(pairs: list[str], eval_path: str, bench_path: str, bench32_path: str,
                same_as: dict[str, str] | None = None) -> None:
    """KD/AdaSPEC pairs side by side: each head's held-out figures (its scripts/eval_heads.py line, found by the
    path the bench record loaded it from) and its bench tau per suite with the tuned and the 32-token tree; each
    pair's AdaSPEC − KD, and with several pairs the mean difference ± half its range. `same_as` maps a path the
    bench loaded a head from to the path its copy was evaluated at."""
    evals = {json.loads(line)["head"]: json.loads(line) for line in Path(eval_path).read_text().splitlines()}
    benches = [json.loads((Path(b) / "bench.json").read_text()) for b in (bench_path, bench32_path)]
    sources = {m["name"]: m.get("source") for m in benches[0]["methods"]}

    def figures(name: str) -> list[float]:
        if name not in sources:
            raise SystemExit(f"drafter {name!r} is not in {bench_path}; its drafters: {', '.join(sources)}")
        e = evals.get((same_as or {}).get(sources[name], sources[name]))
        if e is None:
            raise SystemExit(f"no --eval line for {sources[name]!r} (drafter {name!r}); run scripts/eval_heads.py "
                             "on it and append its line")
        return [e["top1"], e["kl"], e["chain_tau"]] + [rec["results"][suite][name]["tau"]
                                                       for rec in benches for suite in SUITES]

    digits, scale = (2, 3, 3, 2, 2, 2, 2), (100, 1, 1, 1, 1, 1, 1)
    print("| head | source | held-out top-1 | forward KL | chain τ (γ 4) | τ tuned, ShareGPT | τ tuned, HumanEval "
          "| τ 32-token, ShareGPT | τ 32-token, HumanEval |")
    print("|---|---|" + "---:|" * 7)
    diffs = []
    for pair in pairs:
        kd, ada = pair.split(",")
        a, b = figures(kd), figures(ada)
        for name, f in ((kd, a), (ada, b)):
            print(f"| {name} | `{sources[name]}` | {f[0]:.2%} | " + " | ".join(f"{x:.{d}f}" for x, d in
                                                                                 zip(f[1:], digits[1:])) + " |")
        diffs.append([y - x for x, y in zip(a, b)])
    for pair, d in zip(pairs, diffs):
        kd, ada = pair.split(",")
        print(f"| {ada} − {kd} | | " + " | ".join(f"{sc * x:+.{dg}f}" for x, dg, sc in zip(d, digits, scale)) + " |")
    if len(diffs) > 1:
        print(f"| mean of the {len(diffs)} differences ± half their range | | "
              + " | ".join(_mean_spread([d[i] for d in diffs], digits[i], scale[i]) for i in range(7)) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results")
    p.add_argument("--eval")
    p.add_argument("--bench")
    p.add_argument("--bench32")
    p.add_argument("--runs", help="print only this gpu_heads.py record's runs table (e.g. the CPU sweep)")
    p.add_argument("--curve", action="append", help="LABEL=RECORD[:STAGE]: print only held-out curves (see above)")
    p.add_argument("--no-mean", action="store_true",
                   help="with --curve: no mean row (the pairs are different comparisons, not repeats)")
    p.add_argument("--pair", action="append", help="KD,ADASPEC drafter names: print only the pairs table (see above)")
    p.add_argument("--same-as", action="append", default=[], help="COPY=EVALUATED head paths, for --pair")
    a = p.parse_args()
    if a.pair:
        if not (a.eval and a.bench and a.bench32):
            p.error("--pair needs --eval, --bench (tuned trees) and --bench32 (32-token tree)")
        pairs_table(a.pair, a.eval, a.bench, a.bench32, dict(x.split("=", 1) for x in a.same_as))
        return 0
    if a.curve:
        curves_table(a.curve, mean=not a.no_mean)
        return 0
    if a.runs:
        runs_table(a.runs)
        return 0
    runs = json.loads(Path(a.results).read_text())["runs"]
    evals = {json.loads(line)["head"]: json.loads(line) for line in Path(a.eval).read_text().splitlines()}
    bench = json.loads((Path(a.bench) / "bench.json").read_text()) if a.bench else None
    bench32 = json.loads((Path(a.bench32) / "bench.json").read_text()) if a.bench32 else None
    print("| head | steps x batch (tokens) | held-out top-1 | chain tau (gamma 4) | acceptance by depth 1/2/3/4 "
          "| tau, tuned tree (ShareGPT / HumanEval) | speedup, tuned tree | tau, 32-token tree | speedup, 32-token tree |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for label, run, stage, drafter, key in ROWS:
        if run is not None and run not in runs:
            continue
        budget = "—"
        if run is not None:
            t = runs[run]["train"][stage]
            budget = f"{t['steps']} x {t['batch_size']} ({t['tokens'] / 1e6:.1f}M)"
        if key in evals:
            e = evals[key]
            top1, tau, depth, mark = e["top1"], e["chain_tau"], e["accept_by_depth"], ""
        else:  # no head came back from the GPU: its own held-out evaluation there (bf16 target)
            e = runs[run]["eval"][stage]
            top1, tau, depth, mark = e["top1"], e["chain"]["tau"], e["chain"]["accept_by_depth"], " (GPU)"
        print(f"| {label} | {budget} | {top1:.1%}{mark} | {tau:.3f}{mark} | {' / '.join(f'{x:.2f}' for x in depth)} "
              f"| {bench_cell(bench, drafter, 'tau')} | {bench_cell(bench, drafter, 'speedup')} "
              f"| {bench_cell(bench32, drafter, 'tau')} | {bench_cell(bench32, drafter, 'speedup')} |")
    # the objectives at equal steps, from the held-out evaluations during training (GPU, bf16 target)
    curves = [(label, run, stage) for label, run, stage in (("EAGLE-1 objective, seed 0", "s0", "reference"),
                                                             ("EAGLE-1 objective, seed 1", "s1", "reference"),
                                                             ("old objective, seed 0", "s0-old-objective",
                                                              "reference")) if run in runs]
    steps = sorted({e["step"] for _, r, s in curves for e in runs[r]["train"][s]["evals"] if e["step"] % 150 == 0})
    print()
    print("| KD head: held-out top-1 / chain tau at step | " + " | ".join(str(x) for x in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for label, run, stage in curves:
        at = {e["step"]: e for e in runs[run]["train"][stage]["evals"]}
        print(f"| {label} | " + " | ".join(f"{at[x]['top1']:.1%} / {at[x]['tau']:.3f}" if x in at else "—"
                                            for x in steps) + " |")
    # AdaSPEC - KD per seed (same run, same steps)
    print()
    diffs = {"top-1 (points)": [], "chain tau": []}
    for seed in ("s0", "s1"):
        if seed not in runs:
            continue
        kd, ada = (evals[f"runs/gpu1/heads/{seed}-{s}"] for s in ("reference", "adaspec"))
        diffs["top-1 (points)"].append(100 * (ada["top1"] - kd["top1"]))
        diffs["chain tau"].append(ada["chain_tau"] - kd["chain_tau"])
    for what, values in diffs.items():
        if values:
            spread = f", spread {max(values) - min(values):.3f}" if len(values) > 1 else ""
            print(f"- AdaSPEC - KD, {what}: " + ", ".join(f"{v:+.3f}" for v in values)
                  + f" (mean {statistics.mean(values):+.3f}{spread})")
    for name, rec in (("tuned tree", bench), ("32-token tree", bench32)):
        if rec is None:
            continue
        for suite in ("sharegpt", "humaneval"):
            values = []
            for seed in ("s0", "s1"):
                r = rec["results"].get(suite, {})
                if f"adaspec-{seed}" in r and f"kd-{seed}" in r:
                    values.append(r[f"adaspec-{seed}"]["tau"] - r[f"kd-{seed}"]["tau"])
            if values:
                print(f"- AdaSPEC - KD, bench tau ({name}, {suite}): " + ", ".join(f"{v:+.3f}" for v in values))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
