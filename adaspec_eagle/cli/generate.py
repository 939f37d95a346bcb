"""`adaspec-eagle generate`: speculative generation from the command line, streaming the text and ending with
the step statistics.

    adaspec-eagle generate --target smollm2-135m --draft-lm layers=10 "Write a haiku about the sea"
    adaspec-eagle generate --target smollm2-135m --head runs/head/adaspec --total-tokens auto "Hello"
    adaspec-eagle generate --target smollm2-135m --lookup-tokens 10 "Fix the bug in: ..."   # prompt lookup alone
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import MAX_LOOKUP_TOKENS, TreeConfig, add_flags
from adaspec_eagle.engine.factory import make_drafter, parse_drafter
from adaspec_eagle.engine.speculative import (
    LookupDrafter,
    eos_ids,
    parse_draft_vocab,
    plain_generate,
    speculative_generate,
    tuned_tree,
)
from adaspec_eagle.models import check_runtime, load_model
from adaspec_eagle.models.heads import check_head_folder


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tokenizer(prompt)["input_ids"]


class Streamer:
    """Prints the decoded text as tokens arrive. The whole output is decoded each time (so characters that span
    tokens render), and a trailing U+FFFD, a character whose bytes have not all arrived, is held back until they
    have; `finish` prints whatever is left."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], ""

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def __call__(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"))

    def finish(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))


def format_stats(stats: dict) -> str:
    lines = [
        f"steps {stats['steps']}  new tokens {stats['new_tokens']}  tau {stats['tau']:.2f} tokens/forward  "
        f"draft acceptance {stats['draft_acceptance']:.1%} ({stats['accepted_drafts']}/{stats['drafted_tokens']})",
        f"time {stats['total_time_s']:.2f}s = prefill {stats['prefill_time_s']:.2f}s + draft "
        f"{stats['draft_time_s']:.2f}s + verify {stats['verify_time_s']:.2f}s  ->  {stats['tokens_per_s']:.1f} tok/s",
    ]
    if "tree" in stats:
        lines.append(f"tree {stats['tree']}")
    if stats.get("lookup_drafted"):
        lines.append(f"prompt lookup: {stats['lookup_accepted']} of {stats['lookup_drafted']} grafted tokens "
                     "accepted")
    return "\n".join(lines)


def check_args(args, max_lookup: int) -> None:
    """Every flag checked before the target loads (which takes a while for a real model)."""

    check_runtime(args.device, args.dtype, args.threads)
    checks = [(args.max_new_tokens >= 1, "--max-new-tokens", ">= 1"), (args.temperature >= 0, "--temperature",
              ">= 0 (0 is greedy)"), (0 < args.top_p <= 1, "--top-p", "in (0, 1]"), (args.depth >= 1, "--depth",
              ">= 1"), (args.topk >= 1, "--topk", ">= 1"), (0 <= args.lookup_tokens <= max_lookup,
              "--lookup-tokens", f"0 (off) up to {max_lookup} tokens a step")]
    for ok, flag, expected in checks:
        if not ok:
            raise AdaspecError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: expected {expected}.")
    if args.stop and any(s == "" for s in args.stop):
        raise AdaspecError('--stop "": an empty stop string would stop at once; give the text to stop at.')
    total = str(args.total_tokens)
    if total != "auto" and (not total.isdigit() or not 1 <= int(total) <= 1024):
        raise AdaspecError(f"--total-tokens {total!r}: expected an integer in 1..1024 or 'auto'.")
    spec = drafter_spec(args)  # a malformed --drafter is refused here
    if spec is not None and spec.kind == "head":

        check_head_folder(spec.source)


def drafter_spec(args):
    """The drafter the flags name, in the one spelling `generate`, `bench` and the Python API share
    (`engine.factory`): --drafter SPEC, or its shorthands --head PATH and --draft-lm NAME. None: no drafter."""

    if args.drafter:
        return parse_drafter(args.drafter)
    if args.head:
        return parse_drafter(f"head:{args.head}")
    if args.draft_lm:
        return parse_drafter(f"draft-lm:{args.draft_lm}")
    return None


def cmd_generate(args) -> int:

    check_args(args, MAX_LOOKUP_TOKENS)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = drafter_spec(args)
    target, tokenizer = load_model(args.target, dtype=args.dtype, device=args.device)
    if spec is not None:
        drafter, _ = make_drafter(spec, target, tokenizer, args.dtype, parse_draft_vocab(args.draft_vocab))
        if spec.kind == "lookup":
            args.lookup_tokens = int(spec.source)
    elif args.lookup_tokens:
        drafter = LookupDrafter()
    else:
        drafter = None
    ids = _prompt_ids(tokenizer, args.prompt, not args.no_chat)
    eos = eos_ids(target, tokenizer)
    stream = Streamer(tokenizer)
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos, stop_strings=args.stop or None,
                  tokenizer=tokenizer, on_tokens=stream)
    if drafter is None:
        if args.temperature > 0:
            raise AdaspecError("plain decoding here is greedy only; give --head, --draft-lm or --lookup-tokens to "
                               "sample.")
        _, stats = plain_generate(target, ids, **common)
    else:
        total = args.total_tokens
        if total == "auto" and isinstance(drafter, LookupDrafter):
            total = 1  # nothing to tune: the tree is the lookup chain
        elif total == "auto":

            tree, tuned = tuned_tree(target, drafter, ids, TreeConfig(depth=args.depth, topk=args.topk,
                                                                     shape=args.tree_shape,
                                                                     lookup_tokens=args.lookup_tokens))
            print(f"[auto tree budget: {tree.total_tokens} tokens, depth {tree.depth}"
                  + (f", lookup {tree.lookup_tokens}" if args.lookup_tokens else "")
                  + f"; {tuned['summary']}]", file=sys.stderr)
            total, args.depth, args.lookup_tokens = tree.total_tokens, tree.depth, tree.lookup_tokens
        tree = TreeConfig(depth=args.depth, topk=args.topk, total_tokens=int(total), shape=args.tree_shape,
                          lookup_tokens=args.lookup_tokens)
        _, stats = speculative_generate(target, ids, drafter, temperature=args.temperature, top_p=args.top_p,
                                        tree=tree, seed=args.seed, **common)
        stats["tree"] = ("prompt lookup" if isinstance(drafter, LookupDrafter) else
                         f"{tree.shape} depth={tree.depth} topk={tree.topk} total_tokens={tree.total_tokens}")
        if tree.lookup_tokens:
            stats["tree"] += f" lookup_tokens={tree.lookup_tokens}"
        if getattr(drafter, "draft_vocab_size", None):
            stats["tree"] += f" draft_vocab={drafter.draft_vocab_size}"
    stream.finish()
    print("\n")
    print(format_stats(stats), file=sys.stderr if args.stats_to_stderr else sys.stdout)
    return 0


@dataclass
class GenerateOptions:
    """`generate`'s options besides the prompt and the drafter: each field is one flag (`config.add_flags`)."""

    target: str = field(default="smollm2-135m", metadata={"help": "registry name, folder, .gguf file or "
                                                                  "tiny-<family>"})
    draft_vocab: str = field(default="auto", metadata={
        "help": "EAGLE-1/2 heads: draft from the N most frequent training tokens only (lossless, a cheaper draft "
                "step); 0 = the whole vocabulary; auto = 8192 when the head folder has token_counts.safetensors"})
    lookup_tokens: int = field(default=0, metadata={
        "help": "graft up to N prompt-lookup tokens (what followed the last n-gram's latest earlier occurrence) "
                "onto every tree; alone, without a drafter: prompt lookup decoding"})
    tree_shape: str = field(default="dynamic", metadata={"choices": ("dynamic", "static", "chain")})
    depth: int = field(default=6, metadata={"help": "draft levels (the chain length for --tree-shape chain)"})
    topk: int = field(default=8, metadata={"help": "children per expanded node"})
    total_tokens: str = field(default="48", metadata={
        "help": "draft tokens verified per step, or 'auto' to measure this machine and pick the fastest budget"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (identical to plain greedy)"})
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list, metadata={"append": True, "help": "stop string (repeatable)"})
    seed: int = 0
    no_chat: bool = field(default=False, metadata={"help": "feed the prompt as raw text, without the chat "
                                                           "template"})
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    stats_to_stderr: bool = field(default=False, metadata={"help": "print the statistics on stderr"})


def register_cli(sub) -> None:
    p = sub.add_parser("generate", help="generate text with tree speculative decoding (streams, then statistics)",
                       description="Generate with tree speculative decoding: a draft head (--head) or a draft LM "
                                   "(--draft-lm) proposes a token tree the target verifies in one forward, optionally "
                                   "with prompt-lookup tokens grafted on (--lookup-tokens). Batch size 1. Without a "
                                   "drafter: plain greedy decoding by the same engine.")
    p.add_argument("prompt", help="the user message (the chat template is applied for chat targets)")
    drafter = p.add_mutually_exclusive_group()
    drafter.add_argument("--drafter", help="head:PATH, draft-lm:NAME_OR_PATH or lookup:N, as bench spells them")
    drafter.add_argument("--head", help="folder of a trained EAGLE / EAGLE-3 head for this target (= --drafter "
                                        "head:PATH)")
    drafter.add_argument("--draft-lm", help="draft LM: registry name, folder, or layers=N (the target's first N "
                                            "layers)")
    add_flags(p, GenerateOptions)
    p.set_defaults(func=cmd_generate)
