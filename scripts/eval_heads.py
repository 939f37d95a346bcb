"""Held-out agreement of several heads with their target on one held-out split, so heads trained by different
recipes or machines are compared on the same positions: top-1, forward KL, and greedy chain acceptance (gamma 4,
by depth, and its tau), drafting over the engine's default restricted vocabulary where a head has token counts.

    OMP_NUM_THREADS=2 python scripts/eval_heads.py heads/smollm2-135m-kd heads/smollm2-135m-adaspec \
        --answers docs/records/heads/answers.jsonl.xz --holdout 256 --max-length 512 --out runs/eval-heads.jsonl

--answers: a self-distillation answer cache (`regen.jsonl`, optionally .xz) whose held-out answers replace the
conversations' own (the target's own text, what greedy decoding drafts against); without it the split is
ShareGPT as written. The target's features of the split are computed once (a feature cache in --cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from adaspec_eagle.config import DataConfig
from adaspec_eagle.data import build_dataset, split_order
from adaspec_eagle.training.features import build_cache, open_cache
from adaspec_eagle.models.heads import load_head
from adaspec_eagle.models import load_model
from adaspec_eagle.data.regen import cached_answer_examples
from adaspec_eagle.engine.speculative import DEFAULT_DRAFT_VOCAB
from adaspec_eagle.training.head import CHAIN_GAMMA, evaluate_head, restricted_vocab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("heads", nargs="+", help="head folders")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--dataset", default="sharegpt")
    p.add_argument("--answers", help="a regen.jsonl(.xz) answer cache: evaluate on the target's own answers")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--holdout", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="evaluate on the first N held-out samples only")
    p.add_argument("--cache", help="folder for the held-out feature cache (default: a temporary one)")
    p.add_argument("--out", help="append one JSON line per head here")
    a = p.parse_args()
    target, tok = load_model(a.target)
    cfg = DataConfig(dataset=a.dataset, max_length=a.max_length, holdout=a.holdout, seed=a.seed)
    examples = cached_answer_examples(cfg, tok, a.answers) if a.answers else None
    if examples is not None:  # only held-out examples are needed; the rest stays unanswered (skipped)
        held_idx = set(split_order(len(examples[0]), a.holdout, a.seed)[0])
        examples = ([e if i in held_idx else None for i, e in enumerate(examples[0])], examples[1])
    held = build_dataset(cfg, tok, "heldout", examples)
    held = list(held)[: a.limit] if a.limit else list(held)
    pad = tok.pad_token_id or 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.cache or tmp)
        if not (folder / "manifest.json").is_file():
            build_cache(target, held, folder, dtype="fp32", batch_size=8, pad_id=pad, progress=False)
        cached = open_cache(folder, target, held)
        for path in a.heads:
            head = load_head(path, target)
            counts = getattr(head, "token_counts", None)
            ids = restricted_vocab(head, counts, DEFAULT_DRAFT_VOCAB) if counts is not None and not head.uses_fused \
                else None
            e = evaluate_head(head, target, cached, 8, pad, chain=CHAIN_GAMMA, vocab_ids=ids)
            row = {"head": path, "data": "target answers" if a.answers else "as written", "samples": len(held),
                   "top1": round(e["top1"], 4), "kl": round(e["kl"], 4), "positions": e["positions"],
                   "chain_tau": round(e["chain"]["tau"], 4),
                   "accept_by_depth": [round(x, 4) for x in e["chain"]["accept_by_depth"]]}
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
