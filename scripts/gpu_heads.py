"""The head experiment of issue #17 in one process, for a lent GPU (or a small rehearsal on a CPU).

Runs `train_head.run_pipeline` for a list of configurations, in priority order, until a deadline: the first run
answers the training prompts with the target (data.self_distill) and caches the target features; every later
run reuses both (its output folder gets a copy of the answer cache and links to the feature caches, which the
pipeline validates against the data as usual). The target is loaded once. Each run selects its heads by
held-out chain tau (train.eval_every).

  python scripts/gpu_heads.py --recipe recipes/heads/smollm2-135m-gpu.yaml --out /tmp/heads --deadline 480 \
      --export $OUT data.dataset=/tmp/sharegpt-first-turns.jsonl

--export DIR gets results.json (every run's records and held-out evaluations, written after each run), one
head-NAME.tar per exported head (weights in bf16: the transfer limit) and answers.jsonl.xz (the target's
answers). Overrides (key=value) apply to every run.
"""

from __future__ import annotations

import argparse
import functools
import json
import lzma
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaspec_eagle.training import head as train_head  # noqa: E402
from adaspec_eagle.config import HeadRecipe, load_recipe  # noqa: E402

# (name, stage, reference run, overrides): in priority order. Names starting "s" are the shipped candidates.
RUNS = [
    ("s0", "both", None, []),
    ("s1", "both", None, ["train.seed=1"]),
    ("s0-equal-steps", "draft", "s0", ["loss.budget=equal_steps"]),
    ("s0-old-objective", "reference", None, ["head.token_loss_weight=1.0", "head.feature_loss_weight=0.1",
                                             "head.feature_noise=0.0"]),
    ("s1-equal-steps", "draft", "s1", ["loss.budget=equal_steps", "train.seed=1"]),
    # the KD control at AdaSPEC's forwarded sequences: KD from the draft stage's initialisation, at the AdaSPEC
    # stage's batch (ADASPEC_BATCH: round(B / k), 80 for the GPU recipe) for the reference's step count: separates
    # the selection from the extra data
    ("s0-kd-adaspec-batch", "draft", "s0", ["loss.kind=kd", "train.batch_size=ADASPEC_BATCH"]),
    # AdaSPEC with KD's feature term (every position, not only the kept ones): is the narrower term what costs it
    # the deeper chain positions against that control?
    ("s0-feature-all", "draft", "s0", ["head.feature_loss_positions=all"]),
    # the same positions at about the kept term's weight per step (KEPT_FEATURE_WEIGHT: k x head.feature_loss_weight):
    # separates the positions from the weight
    ("s0-feature-all-k", "draft", "s0", ["head.feature_loss_positions=all",
                                         "head.feature_loss_weight=KEPT_FEATURE_WEIGHT"]),
    ("s0-k0.6", "draft", "s0", ["loss.k=0.6"]),
    ("s0-no-noise", "reference", None, ["head.feature_noise=0.0"]),
    ("s0-k0.2", "draft", "s0", ["loss.k=0.2"]),
    ("s1-old-objective", "reference", None, ["head.token_loss_weight=1.0", "head.feature_loss_weight=0.1",
                                             "head.feature_noise=0.0", "train.seed=1"]),
]
EXPORT_HEADS = ["s0/reference", "s0/adaspec", "s1/reference", "s1/adaspec"]
ADASPEC_BATCH = "ADASPEC_BATCH"
"""In a run's overrides: the batch the AdaSPEC stage trains at under `loss.budget: equal_tokens` with the recipe
and the command line's overrides (`train_head.stage_budget`)."""
KEPT_FEATURE_WEIGHT = "KEPT_FEATURE_WEIGHT"
"""In a run's overrides: loss.k x head.feature_loss_weight with the recipe and the command line's overrides."""


def resolve_overrides(recipe: str, common: list[str], extra: list[str]) -> list[str]:
    """`extra` with ADASPEC_BATCH replaced by the AdaSPEC stage's batch and KEPT_FEATURE_WEIGHT by k x
    head.feature_loss_weight (the weight at which the feature term over every position weighs about what the term
    over the kept fraction k does), for `recipe` + `common` overrides."""
    if not any(p in e for e in extra for p in (ADASPEC_BATCH, KEPT_FEATURE_WEIGHT)):
        return extra
    base = load_recipe(HeadRecipe, recipe, [*common, "loss.kind=adaspec", "loss.budget=equal_tokens"])
    values = {ADASPEC_BATCH: str(train_head.stage_budget(base, "adaspec", None).batch_size),
              KEPT_FEATURE_WEIGHT: f"{base.loss.k * base.head.feature_loss_weight:g}"}
    out = []
    for e in extra:
        for placeholder, value in values.items():
            e = e.replace(placeholder, value)
        out.append(e)
    return out


def bf16_head_tar(head_dir: Path, dest: Path) -> None:
    """A tar of the head folder with its weights cast to bf16 (config and token counts as they are)."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = dest.with_suffix(".d")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(head_dir, tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in weights.items()},
              str(tmp / "model.safetensors"))
    with tarfile.open(dest, "w") as tar:
        tar.add(tmp, arcname=head_dir.parent.name + "-" + head_dir.name)
    shutil.rmtree(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True, help="folder of the runs")
    ap.add_argument("--export", help="folder for results.json, head tars and the answers")
    ap.add_argument("--deadline", type=float, default=480, help="seconds: start no run expected to end later")
    ap.add_argument("--only", help="comma-separated run names (default: all, in priority order)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    export = Path(args.export) if args.export else None
    if export:
        export.mkdir(parents=True, exist_ok=True)
    # one target for every run (the pipeline asks for it by name each time)
    train_head.load_target = functools.lru_cache(maxsize=2)(train_head.load_target)
    results: dict = {"runs": {}, "skipped": [], "started": t0}
    spent: dict[str, float] = {}
    by_name = {r[0]: r for r in RUNS}
    runs = [by_name[n] for n in args.only.split(",")] if args.only else RUNS  # (--only: in its order)

    def estimate(stage: str) -> float:
        ref, ada = spent.get("reference"), spent.get("adaspec")
        if ref is None:
            return 0.0
        return {"both": ref + (ada or 2.5 * ref), "reference": ref, "draft": ada or 2.5 * ref}[stage]

    for name, stage, ref_run, extra in runs:
        extra = resolve_overrides(args.recipe, args.overrides, extra)
        elapsed = time.time() - t0
        if elapsed + estimate(stage) > args.deadline:
            results["skipped"].append(name)
            print(f"[{elapsed:.0f}s] skip {name}: expected {estimate(stage):.0f}s, past the deadline", flush=True)
            continue
        run_dir = out / name
        first = out / runs[0][0]
        if name != runs[0][0] and first.is_dir():  # reuse the answers and the features of the first run
            run_dir.mkdir(parents=True, exist_ok=True)
            for item in ("regen.jsonl", "features", "features-heldout"):
                src, dst = first / item, run_dir / item
                if src.exists() and not dst.exists():
                    shutil.copy(src, dst) if src.is_file() else os.symlink(src.resolve(), dst)
        overrides = [*args.overrides, *extra, f"output_dir={run_dir}", f"stage={stage}"]
        if ref_run:
            overrides.append(f"reference={out / ref_run / 'reference'}")
        cfg = load_recipe(HeadRecipe, args.recipe, overrides)
        print(f"[{elapsed:.0f}s] run {name}: {' '.join(extra) or 'base recipe'} (stage {stage})", flush=True)
        start = time.time()
        result = train_head.run_pipeline(cfg, resume=True, progress=False, log=lambda m: print(m, flush=True))
        for s, record in result["train"].items():
            spent.setdefault("reference" if s == "reference" else "adaspec", record.get("seconds", 0.0))
        results["runs"][name] = {
            "stage": stage, "overrides": extra, "seconds": time.time() - start,
            "train": {s: {k: v for k, v in r.items() if k != "losses"} | {"loss_last": r.get("losses", [None])[-1]}
                      for s, r in result["train"].items()},
            "eval": result["eval"]}
        if export:  # after every run: a kill at the deadline loses only the run in flight
            (export / "results.json").write_text(json.dumps(results, indent=1))
            for rel in EXPORT_HEADS:
                head, dest = out / rel, export / f"head-{rel.replace('/', '-')}.tar"
                if rel.startswith(name + "/") and (head / "config.json").is_file():
                    bf16_head_tar(head, dest)
            answers = out / runs[0][0] / "regen.jsonl"
            if answers.is_file() and not (export / "answers.jsonl.xz").exists():
                with open(answers, "rb") as src, lzma.open(export / "answers.jsonl.xz", "wb", preset=6) as dst:
                    shutil.copyfileobj(src, dst)
        print(f"[{time.time() - t0:.0f}s] done {name}: " + json.dumps(result["eval"]), flush=True)
    if export:
        results["seconds"] = time.time() - t0
        (export / "results.json").write_text(json.dumps(results, indent=1))
    print(f"[{time.time() - t0:.0f}s] all done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
