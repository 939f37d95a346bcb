"""What the restricted draft vocabulary of an EAGLE-1/2 head costs and saves, for the README's numbers.

Coverage: the fraction of held-out ShareGPT assistant tokens inside the N most frequent training tokens (the
head's `token_counts`). Cost: one greedy generation with the whole vocabulary and with N = 8192 / 16384, same
head, tree and prompt (second of two passes, after warm-up), checking that the output is identical.

    OMP_NUM_THREADS=1 python scripts/draft_vocab_cost.py --head heads/smollm2-135m-kd
"""

from __future__ import annotations

import argparse

import torch

from adaspec_eagle.config import DataConfig, TreeConfig
from adaspec_eagle.data import build_dataset
from adaspec_eagle.heads import load_head
from adaspec_eagle.models import load_model
from adaspec_eagle.speculative import HeadDrafter, speculative_generate

SIZES = (0, 8192, 16384)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", default="heads/smollm2-135m-kd")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--holdout", type=int, default=48, help="held-out ShareGPT conversations for the coverage")
    args = p.parse_args()
    torch.set_num_threads(1)
    target, tok = load_model(args.target)
    head = load_head(args.head, target)
    held = build_dataset(DataConfig(dataset="sharegpt", max_length=256, holdout=args.holdout), tok, "heldout")
    tokens = torch.cat([torch.as_tensor(s["input_ids"])[torch.as_tensor(s["loss_mask"]).bool()] for s in held])
    for n in SIZES[1:]:
        ids = HeadDrafter(head, draft_vocab=n)._ids_cpu
        print(f"coverage of {len(tokens)} held-out assistant tokens by the {n} most frequent: "
              f"{torch.isin(tokens, ids).float().mean():.1%}")
    prompt = "Explain how a transformer language model generates text, step by step."
    ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False)["input_ids"]
    tree = TreeConfig(depth=3, topk=4, total_tokens=8)
    outs = {}
    for rep in range(2):
        for n in SIZES:
            new, st = speculative_generate(target, ids, HeadDrafter(head, draft_vocab=n), 64, tree=tree,
                                           eos_token_id=[])
            assert new == outs.setdefault("ref", new), "output differs with a restricted draft vocabulary"
            if rep:
                print(f"draft_vocab={n or 'all'}: tau {st['tau']:.2f}  draft {1e3 * st['draft_time_s'] / st['steps']:.1f}"
                      f" ms/step  verify {1e3 * st['verify_time_s'] / st['steps']:.1f} ms/step  "
                      f"{st['tokens_per_s']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
