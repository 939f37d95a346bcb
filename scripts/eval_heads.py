"""Held-out top-1 agreement (and forward KL) of several heads with their target, on one held-out split, so heads
trained by different recipes or machines are compared on the same positions.

    OMP_NUM_THREADS=2 python scripts/eval_heads.py heads/smollm2-135m-kd heads/smollm2-135m-adaspec \
        runs/head-smollm2-135m-ship/reference runs/head-smollm2-135m-ship/adaspec

The default split is the one recipes/heads/smollm2-135m-ship.yaml holds out: 48 ShareGPT conversations, seed 0,
cut at 256 tokens.
"""

from __future__ import annotations

import argparse
import json

import torch

from adaspec_eagle.config import DataConfig
from adaspec_eagle.data import build_dataset
from adaspec_eagle.heads import load_head
from adaspec_eagle.models import load_model
from adaspec_eagle.train_head import evaluate_head


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("heads", nargs="+", help="head folders")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--dataset", default="sharegpt")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--holdout", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    target, tok = load_model(a.target)
    held = build_dataset(DataConfig(dataset=a.dataset, max_length=a.max_length, holdout=a.holdout, seed=a.seed),
                         tok, "heldout")
    for folder in a.heads:
        with torch.no_grad():
            e = evaluate_head(load_head(folder, target), target, held, 8, tok.pad_token_id or 0)
        print(json.dumps({"head": folder, "top1": round(e["top1"], 4), "kl": round(e["kl"], 4),
                          "positions": e["positions"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
