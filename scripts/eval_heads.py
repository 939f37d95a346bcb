"""Held-out agreement of several heads with their target on one held-out split, so heads trained by different
recipes or machines are compared on the same positions: top-1, forward KL, and greedy chain acceptance (gamma 4,
by depth, and its tau), drafting over the engine's default restricted vocabulary where a head has token counts.

    OMP_NUM_THREADS=2 python scripts/eval_heads.py heads/smollm2-135m-kd heads/smollm2-135m-adaspec \
        --answers docs/records/heads/answers.jsonl.xz --holdout 256 --max-length 512 --out runs/eval-heads.jsonl

--answers: a self-distillation answer cache (`regen.jsonl`, optionally .xz) whose held-out answers replace the
conversations' own (the target's own text, what greedy decoding drafts against); without it the split is
ShareGPT as written. The target's features of the split are computed once (a feature cache in --cache).

--breakdown FILE.md: where two or more heads differ, position by position (`position_records`): top-1 by how
frequent the target's token is in the first head's training answers, by how hard the position is for the first
head (its KL quintile; give the AdaSPEC run's reference head first and this is the difficulty AdaSPEC selects
by), by the target's confidence, and the tokens each head gets right most often where the first does not; then
greedy chains (gamma 4) depth by depth at the positions where both the first head and another reached the depth,
and at depths 2-4 by frequency and by token.
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
from adaspec_eagle.training.head import CHAIN_GAMMA, evaluate_head, position_records, restricted_vocab

FREQ_BUCKETS = [(0, 100), (100, 1000), (1000, DEFAULT_DRAFT_VOCAB), (DEFAULT_DRAFT_VOCAB, None)]
CONFIDENCE_EDGES = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0 + 1e-9]


def _bucket_table(title: str, names: list[str], recs: list[dict], buckets: list[tuple[str, torch.Tensor]],
                  metric: str = "top-1"):
    """Markdown rows: per bucket (label, bool mask over positions), its share and each head's rate of "hit" (the
    column says `metric`), and the difference of every head from the first."""
    n = recs[0]["hit"].numel()
    head = f"| {title} | positions | " + " | ".join(f"{metric} {x}" for x in names) + " | " + \
        " | ".join(f"{x} - {names[0]}" for x in names[1:]) + " |"
    lines = [head, "|---|---:|" + "---:|" * (2 * len(names) - 1)]
    for label, mask in buckets:
        m = int(mask.sum())
        if not m:
            continue
        top = [float(r["hit"][mask].float().mean()) for r in recs]
        lines.append(f"| {label} | {m:,} ({m / n:.0%}) | " + " | ".join(f"{t:.1%}" for t in top) + " | "
                     + " | ".join(f"{(t - top[0]) * 100:+.1f}" for t in top[1:]) + " |")
    return lines


def _rank_buckets(tokens: torch.Tensor, counts: torch.Tensor):
    rank = torch.empty_like(counts, dtype=torch.long)
    rank[torch.argsort(counts.float(), descending=True, stable=True)] = torch.arange(counts.numel())
    r = rank[tokens]
    return [(f"rank {lo + 1:,}-{hi:,}" if hi else f"rank > {lo:,}", (r >= lo) & (r < (hi or counts.numel())))
            for lo, hi in FREQ_BUCKETS]


def _difficulty_buckets(kl: torch.Tensor):
    edges = torch.quantile(kl.double(), torch.linspace(0, 1, 6, dtype=torch.float64))
    q = torch.bucketize(kl.double(), edges[1:-1], right=True)  # 0..4
    names = ["easiest", "2nd", "3rd", "4th", "hardest"]
    return [(f"{names[i]} fifth (KL {edges[i]:.2f}-{edges[i + 1]:.2f})", q == i) for i in range(5)]


def _net_wins(names, recs, tok, k: int = 12, where: str = "") -> list[str]:
    """The target tokens where each head is right and the first head wrong most often (net of the reverse);
    `where` prefixes the positions' description."""
    lines = []
    for name, r in zip(names[1:], recs[1:]):
        net = torch.zeros(int(recs[0]["token"].max()) + 1)
        net.index_add_(0, recs[0]["token"], r["hit"].float() - recs[0]["hit"].float())
        for side, order in ((f"{name} right, {names[0]} wrong", True), (f"{names[0]} right, {name} wrong", False)):
            top = torch.argsort(net, descending=order)[:k]
            words = ", ".join(f"{tok.decode([int(t)])!r} {abs(int(net[t]))}" for t in top
                              if (net[t] > 0 if order else net[t] < 0))
            lines.append(f"- **{side}** ({where}net positions, by target token): {words}")
    return lines


def _chain_lines(names, recs, counts, tok, k: int = 12) -> list[str]:
    """Greedy chains (records with "reached" / "accepted") compared depth by depth where both heads got there:
    at depth j, among the positions where the first head and another both reached j (each accepted every earlier
    depth), each one's acceptance; then depths 2 and on pooled, by how frequent the token to draft is and by the
    tokens each gets right where the other does not."""
    first = recs[0]
    gamma = first["reached"].shape[0]
    lines = []
    for name, r in zip(names[1:], recs[1:]):
        both = first["reached"] & r["reached"]  # (gamma, N)
        lines += [f"Greedy chains of {gamma}, at the positions where both {names[0]} and {name} reached a depth "
                  f"(each accepted every earlier one):", "",
                  f"| depth | positions both reached | acceptance {names[0]} | acceptance {name} "
                  f"| {name} - {names[0]} |",
                  "|---:|---:|---:|---:|---:|"]
        for j in range(gamma):
            m = both[j]
            a0, a1 = (float(x["accepted"][j][m].float().mean()) if m.any() else 0.0 for x in (first, r))
            lines.append(f"| {j + 1} | {int(m.sum()):,} | {a0:.1%} | {a1:.1%} | {(a1 - a0) * 100:+.1f} |")
        if gamma < 2:
            continue
        deep = both[1:] & (first["chain_token"][1:] >= 0)  # depths 2.. pooled
        if not deep.any():
            continue
        token = first["chain_token"][1:][deep]
        hit0, hit1 = first["accepted"][1:][deep], r["accepted"][1:][deep]
        pooled = [{"hit": hit0, "token": token}, {"hit": hit1, "token": token}]
        if counts is not None:
            lines += [""] + _bucket_table(f"depths 2-{gamma}: frequency of the token to draft in {names[0]}'s "
                                          "training answers", [names[0], name], pooled,
                                          _rank_buckets(token, counts), metric="acceptance")
        lines += [""] + _net_wins([names[0], name], pooled, tok, k, where=f"depths 2-{gamma}, ") + [""]
    return lines


def breakdown(paths: list[str], recs: list[dict], counts, tok) -> str:
    """The markdown comparison of the heads at `paths` from their `position_records`; counts: the first head's
    training token counts (None: no frequency table)."""
    names = [Path(x).name for x in paths]
    if len(set(names)) < len(names):  # e.g. several runs' OUT/reference: name them by their run folder too
        names = [f"{Path(x).parent.name}/{Path(x).name}" for x in paths]
    conf = recs[0]["confidence"]
    lines = [f"Held-out positions: {recs[0]['hit'].numel():,}; top-1 = the head's argmax equals the target's.", ""]
    if counts is not None:
        lines += _bucket_table(f"frequency of the target token in {names[0]}'s training answers", names, recs,
                               _rank_buckets(recs[0]["token"], counts)) + [""]
    lines += _bucket_table(f"difficulty for {names[0]} (its KL(target || head) fifths)", names, recs,
                           _difficulty_buckets(recs[0]["kl"])) + [""]
    lines += _bucket_table("the target's probability of its token", names, recs,
                           [(f"{lo:.2f}-{min(hi, 1.0):.2f}", (conf >= lo) & (conf < hi))
                            for lo, hi in zip(CONFIDENCE_EDGES, CONFIDENCE_EDGES[1:])]) + [""]
    lines += _net_wins(names, recs, tok)
    if "reached" in recs[0]:
        lines += [""] + _chain_lines(names, recs, counts, tok)
    return "\n".join(lines).rstrip("\n") + "\n"


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
    p.add_argument("--breakdown", help="write the position-by-position comparison of the heads here (markdown)")
    a = p.parse_args()
    if a.breakdown and len(a.heads) < 2:
        p.error("--breakdown compares heads position by position: give two or more head folders")
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
        recs = []  # (position_records, training token counts) per head, for --breakdown
        for path in a.heads:
            head = load_head(path, target)
            counts = getattr(head, "token_counts", None)
            ids = restricted_vocab(head, counts, DEFAULT_DRAFT_VOCAB) if counts is not None and not head.uses_fused \
                else None
            e = evaluate_head(head, target, cached, 8, pad, chain=CHAIN_GAMMA, vocab_ids=ids)
            if a.breakdown:
                recs.append((position_records(head, target, cached, 8, pad, chain=CHAIN_GAMMA, vocab_ids=ids),
                             counts))
            row = {"head": path, "data": "target answers" if a.answers else "as written", "samples": len(held),
                   "top1": round(e["top1"], 4), "kl": round(e["kl"], 4), "positions": e["positions"],
                   "chain_tau": round(e["chain"]["tau"], 4),
                   "accept_by_depth": [round(x, 4) for x in e["chain"]["accept_by_depth"]]}
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if a.breakdown:
            Path(a.breakdown).write_text(breakdown(a.heads, [r for r, _ in recs], recs[0][1], tok))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
