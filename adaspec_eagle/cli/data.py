"""Subcommands about data: `data-stats` (load a dataset as training would and print what it holds) and
`data-tokenize` (encode a dataset once into a compact file that training reads as `data.dataset`)."""

from __future__ import annotations

import os
import time

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import DataConfig
from adaspec_eagle.data import build_dataset, write_tokenized
from adaspec_eagle.models import load_tokenizer, tiny_tokenizer


def _tokenizer(target: str):
    if target == "tiny":

        return tiny_tokenizer()

    return load_tokenizer(target)


def cmd_data_tokenize(args) -> int:

    if os.path.exists(args.out) and not args.overwrite:
        raise AdaspecError(f"{args.out!r} exists; pass --overwrite to replace it or choose another --out.")
    tokenizer = _tokenizer(args.target)
    start = time.perf_counter()
    meta = write_tokenized(args.out, tokenizer, DataConfig(dataset=args.dataset, path=args.path,
                                                           max_length=args.max_length), progress=not args.quiet)
    mb = os.path.getsize(args.out) / 2 ** 20
    print(f"{meta['source']}\nwrote {args.out}: {meta['examples']} examples, {meta['tokens']} tokens "
          f"({meta['targets']} targets), cut at {meta['max_length']}, {mb:.1f} MiB, in {time.perf_counter() - start:.0f} s")
    return 0


def cmd_data_stats(args) -> int:

    tokenizer = _tokenizer(args.target)
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

    p = sub.add_parser("data-tokenize", help="encode a dataset once (chat template, loss mask, cut) into a compact "
                       ".safetensors file that `data.dataset` accepts",
                       description="Every example in source order, so splits match the text source's. Two bytes "
                                   "a token: small enough to carry to an offline GPU machine.")
    p.add_argument("--dataset", default="sharegpt",
                   help="sharegpt, gsm8k, alpaca, mbpp, cnn_dm, xsum, or a local .json/.jsonl file")
    p.add_argument("--path", default=None, help="local JSON/JSONL file for a paper task instead of the hub")
    p.add_argument("--target", default="smollm2-135m", help="model whose tokenizer is used ('tiny': the test one)")
    p.add_argument("--max-length", type=int, default=2048, help="cut each example here (training may cut shorter)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_tokenize)
