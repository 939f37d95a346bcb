"""Subcommands about data: `data-stats` (load a dataset as training would and print what it holds)."""

from __future__ import annotations


def cmd_data_stats(args) -> int:
    import time

    from .config import DataConfig
    from .data import build_dataset

    if args.target == "tiny":
        from .models import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    else:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(args.target)
    cfg = DataConfig(dataset=args.dataset, path=args.path, max_length=args.max_length, num_samples=args.num_samples,
                     holdout=args.holdout, seed=args.seed)
    start = time.perf_counter()
    samples = build_dataset(cfg, tokenizer, split=args.split)
    print(samples.source.line())
    print(samples.summary.line())
    lengths = sorted(len(s["input_ids"]) for s in samples)
    print(f"sequence length: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} "
          f"(max_length {cfg.max_length}); built in {time.perf_counter() - start:.1f} s")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("data-stats", help="load a dataset as training would and print samples, tokens, masking")
    p.add_argument("--dataset", default="sharegpt",
                   help="sharegpt, gsm8k, alpaca, mbpp, cnn_dm, xsum, or a local .json/.jsonl file")
    p.add_argument("--path", default=None, help="local JSON/JSONL file for a paper task instead of the hub")
    p.add_argument("--target", default="smollm2-135m",
                   help="model whose tokenizer and chat template are used ('tiny': the test tokenizer)")
    p.add_argument("--num-samples", type=int, default=None, help="training samples to build (default: all)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--holdout", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    p.set_defaults(func=cmd_data_stats)
