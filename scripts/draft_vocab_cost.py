"""What the restricted draft vocabulary of an EAGLE-1/2 head costs and saves, for the README's numbers.

Speed and acceptance: greedy generation over the bench's prompts (`--suite`, first `--num-prompts` of each) with
the whole vocabulary and with the N most frequent training tokens for each N in `--sizes`, same head and tree;
per suite and size it prints τ, draft and verify ms per step and tokens/s, and it checks that every size gives
the same output (the restriction is lossless). Each size runs once untimed on the first prompt first.
`--coverage`: also the fraction of held-out ShareGPT assistant tokens inside each set.

    OMP_NUM_THREADS=2 python scripts/draft_vocab_cost.py --head heads/smollm2-135m-kd --threads 2
"""

from __future__ import annotations

import argparse

import torch

from adaspec_eagle.bench.runner import load_suite
from adaspec_eagle.config import DataConfig, TreeConfig
from adaspec_eagle.models.heads import load_head
from adaspec_eagle.models import load_model
from adaspec_eagle.engine.speculative import HeadDrafter, speculative_generate


def coverage(head, tok, sizes, holdout: int) -> None:
    from adaspec_eagle.data import build_dataset

    held = build_dataset(DataConfig(dataset="sharegpt", max_length=256, holdout=holdout), tok, "heldout")
    tokens = torch.cat([torch.as_tensor(s["input_ids"])[torch.as_tensor(s["loss_mask"]).bool()] for s in held])
    for n in sizes:
        ids = HeadDrafter(head, draft_vocab=n).vocab_ids
        if ids is not None:
            print(f"coverage of {len(tokens)} held-out assistant tokens by the {n} most frequent: "
                  f"{torch.isin(tokens, ids).float().mean():.1%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", default="heads/smollm2-135m-kd")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--suite", action="append", help="bench suites (default: sharegpt and humaneval)")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 4096, 8192, 16384], help="0 = whole vocabulary")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--total-tokens", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--coverage", action="store_true", help="also the held-out ShareGPT coverage of each set")
    p.add_argument("--holdout", type=int, default=48, help="held-out ShareGPT conversations for the coverage")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target, tok = load_model(args.target)
    head = load_head(args.head, target)
    if args.coverage:
        coverage(head, tok, args.sizes, args.holdout)
    tree = TreeConfig(depth=args.depth, topk=args.topk, total_tokens=args.total_tokens)
    drafters = {n: HeadDrafter(head, draft_vocab=n) for n in args.sizes}
    print(f"tree: depth {args.depth}, top-k {args.topk}, {args.total_tokens} tokens; {args.threads} thread(s)")
    for spec in args.suite or ["sharegpt", "humaneval"]:
        suite = load_suite(spec, tok, args.num_prompts)
        for drafter in drafters.values():  # warm-up
            speculative_generate(target, suite["prompts"][0], drafter, 16, tree=tree, eos_token_id=[])
        ref = {}
        for n, drafter in drafters.items():
            sums, tokens = dict.fromkeys(("steps", "draft_time_s", "verify_time_s", "total_time_s"), 0.0), 0
            for i, ids in enumerate(suite["prompts"]):
                new, st = speculative_generate(target, ids, drafter, args.max_new_tokens, tree=tree, eos_token_id=[])
                if ref.setdefault(i, new) != new:
                    raise SystemExit(f"{suite['name']} prompt {i}: draft_vocab={n} changed the output")
                tokens += len(new)
                for k in sums:
                    sums[k] += st[k]
            steps = sums["steps"]
            print(f"{suite['name']}: draft_vocab={n or 'all'}: tau {tokens / steps:.3f}  draft "
                  f"{1e3 * sums['draft_time_s'] / steps:.2f} ms/step  verify {1e3 * sums['verify_time_s'] / steps:.2f}"
                  f" ms/step  {tokens / sums['total_time_s']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
