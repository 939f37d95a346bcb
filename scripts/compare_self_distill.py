"""Cross-evaluate train-head runs on each other's held-out sets: top-1 agreement with the target and KL.

Made for the self-distillation comparison (recipes/heads/smollm2-135m-selfdistill.yaml): a head trained on the
target's own answers and one trained on the original answers, each scored on both held-out sets. The held-out
set of target answers is the text a head drafts against at temperature 0, so its top-1 agreement is the first
draft position's acceptance rate.

    python scripts/compare_self_distill.py --run target-answers=runs/head-smollm2-135m-sd-target \
        --run original=runs/head-smollm2-135m-sd-original [--stage reference] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaspec_eagle.training.features import open_cache
from adaspec_eagle.models.heads import load_head
from adaspec_eagle.models import load_model
from adaspec_eagle.training.head import evaluate_head


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="a train-head output folder")
    p.add_argument("--stage", default="reference", help="the head folder inside each run (reference, adaspec, kd)")
    p.add_argument("--target", default=None, help="default: the target recorded in the first run's config.yaml")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    runs = dict(r.split("=", 1) for r in args.run)
    target_name = args.target
    if target_name is None:
        import yaml

        target_name = yaml.safe_load((Path(next(iter(runs.values()))) / "config.yaml").read_text())["target"]
    target, _ = load_model(target_name)
    results = {}
    for head_label, head_dir in runs.items():
        head = load_head(Path(head_dir) / args.stage, target)
        for set_label, set_dir in runs.items():
            cache = open_cache(Path(set_dir) / "features-heldout", target)
            results[f"{head_label} on {set_label}"] = r = evaluate_head(head, target, cache)
            print(f"head {head_label:>16} | held-out {set_label:>16}: top-1 {r['top1']:.2%}  KL {r['kl']:.3f}  "
                  f"({r['positions']} positions)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
