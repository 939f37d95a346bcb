"""Acceptance and speed benchmarks (`adaspec-eagle bench`): owns the prompt suites a benchmark runs on, the
methods it times (plain decoding, our engine with each drafter, transformers' assisted generation and prompt
lookup) and the runner that times them all against plain decoding of the same target in the same run. The
metrics live in `bench_metrics`, the record and its outputs (`bench.json`, `bench.md`, PNG plots) in
`bench_report`.

"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from adaspec_eagle import AdaspecError
from adaspec_eagle.bench.metrics import PAPER_GAMMA
from adaspec_eagle.bench.report import (
    ENGINE_PLAIN,
    make_record,
    markdown_table,
    write_outputs,
)
from adaspec_eagle.config import (
    MAX_LOOKUP_TOKENS,
    DataConfig,
    TreeConfig,
    add_flags,
    from_flags,
    to_flags,
)
from adaspec_eagle.data import prompts_for_eval, read_records, render_chat
from adaspec_eagle.engine import linear_routing
from adaspec_eagle.engine.factory import make_drafter, parse_drafter
from adaspec_eagle.engine.speculative import (
    CommitRecorder,
    parse_draft_vocab,
    plain_generate,
    speculative_generate,
    tuned_tree,
)
from adaspec_eagle.engine.speculative import eos_ids as stop_ids
from adaspec_eagle.io import check_output_folder, disk_errors
from adaspec_eagle.models import check_runtime, load_model

# ----------------------------------------------------------------------------------------------------------
# Prompt suites

# Suites that `data.prompts_for_eval` provides (held-out split, the paper's prompt formats); the paper tasks go
# through `datasets` and need a network.
DATA_SUITES = ("sharegpt", "humaneval", "gsm8k", "alpaca", "mbpp", "cnn_dm", "xsum")
# MT-bench's first turns (through `datasets`, needs a network); a local copy goes through jsonl:FILE ("turns").
MT_BENCH = ("HuggingFaceH4/mt_bench_prompts", "train")
SUITE_HELP = ("sharegpt (held-out), humaneval, gsm8k, alpaca, mbpp, cnn_dm, xsum, mt_bench (these six need a "
              "network; a paper task also reads a local copy of its records as TASK:FILE, e.g. gsm8k:test.jsonl), "
              "or jsonl:FILE (one JSON object a line: 'prompt' raw text, chat 'messages', or MT-bench 'turns')")


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt: ids pass through; a chat message list is rendered with the tokenizer's chat
    template (`data.render_chat`, with the generation prompt); a string is raw text, as `data` treats task
    prompts."""

    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer(render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def read_prompt_file(path: str, n: int) -> list:
    """Up to `n` prompts of a local JSON/JSONL file, in file order: records with a 'prompt' string (raw text),
    chat 'messages' (everything up to the last user turn) or MT-bench 'turns' (the first turn, as a chat)."""

    if not os.path.isfile(path):
        raise AdaspecError(f"suite jsonl:{path}: no such file; pass an existing .json/.jsonl file of prompts.")
    prompts = []
    for i, row in enumerate(read_records(path)):
        if len(prompts) >= n:
            break
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            users = [j for j, m in enumerate(row["messages"]) if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise AdaspecError(f"{path}, record {i + 1}: 'messages' has no user turn.")
            prompts.append(row["messages"][: users[-1] + 1])
        elif isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            prompts.append([{"role": "user", "content": str(row["turns"][0])}])
        else:
            raise AdaspecError(f"{path}, record {i + 1}: expected a 'prompt' string, a 'messages' list or a "
                               "'turns' list.")
    if not prompts:
        raise AdaspecError(f"{path} holds no prompts.")
    return prompts


def _mt_bench_prompts(n: int) -> list:
    try:
        import datasets

        ds = datasets.load_dataset(MT_BENCH[0], split=MT_BENCH[1])
    except Exception as e:  # offline or hub errors come in many types; the message names the way out
        raise AdaspecError(f"suite 'mt_bench' loads {MT_BENCH[0]} through `datasets`, which failed "
                           f"({type(e).__name__}: {str(e)[:200]}). It needs a network; offline, pass a local copy "
                           "as --suite jsonl:question.jsonl (records with 'turns').") from e
    return [[{"role": "user", "content": ds[i]["prompt"][0]}] for i in range(min(n, len(ds)))]


def _data_prompts(name: str, path: str | None, tokenizer, n: int) -> list:
    try:
        return prompts_for_eval(name, tokenizer, n, DataConfig(dataset=name, path=path))
    except AdaspecError as e:
        if path or name in ("sharegpt", "humaneval"):
            raise
        raise AdaspecError(f"suite {name!r}: {e} For bench: --suite {name}:FILE reads a local copy of the "
                           "task's records.") from e


def load_suite(spec: str, tokenizer, n: int) -> dict:
    """One suite -> {"name", "source", "prompts": [token id lists]} with at most `n` prompts."""
    if spec.startswith("jsonl:"):
        path = spec[len("jsonl:"):]
        raw, name, source = read_prompt_file(path, n), Path(path).stem, os.path.abspath(path)
    elif spec.partition(":")[0] in DATA_SUITES:
        name, _, path = spec.partition(":")
        raw, source = _data_prompts(name, path or None, tokenizer, n), f"data.prompts_for_eval({name!r})"
        source += f" from {os.path.abspath(path)}" if path else ""
    elif spec == "mt_bench":
        raw, name, source = _mt_bench_prompts(n), spec, f"datasets: {MT_BENCH[0]} (first turns)"
    else:
        raise AdaspecError(f"unknown suite {spec!r}; use {SUITE_HELP}.")
    prompts = [encode_prompt(tokenizer, p) for p in raw[:n]]
    if not prompts:
        raise AdaspecError(f"suite {spec!r} gave no prompts (are they all longer than the data max_length?).")
    return {"name": name, "source": source, "prompts": prompts}


# ----------------------------------------------------------------------------------------------------------
# Methods: each turns prompt ids into a `Run`


@dataclass
class Run:
    new_ids: list[int]
    seconds: float
    steps: list[dict] | None = None  # engine step records (speculative methods)
    target_forwards: int | None = None  # counted with a hook (HF generate methods)
    phases: dict | None = None  # the engine's own split: draft / verify / prefill seconds

    @property
    def new_tokens_len(self) -> int:
        return len(self.new_ids)


@dataclass
class Method:
    name: str
    kind: str  # plain | speculative | assisted | prompt_lookup
    generate: Callable[[list[int], int, str | None], Run] = field(repr=False)  # (prompt ids, seed, suite) -> Run
    info: dict = field(default_factory=dict)
    depth: int = 0  # draft positions reported by acceptance_by_position
    gamma: int | None = None  # chain length when alpha is defined


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_generate_method(name: str, kind: str, target, eos_ids, pad_id, max_new_tokens: int, temperature: float,
                       top_p: float, info: dict | None = None, **extra) -> Method:
    """Plain / assisted / prompt-lookup decoding through `transformers`' own `generate`, from a fresh
    GenerationConfig (the model's defaults, e.g. a repetition penalty, would change the output). Target
    forwards are counted with a forward hook, so tau = new tokens / target forwards for the peers too."""

    sampling = temperature > 0
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, eos_token_id=eos_ids,
                           pad_token_id=pad_id, **({"temperature": temperature, "top_p": top_p, "top_k": 0}
                                                   if sampling else {}))
    for key in ("prompt_lookup_num_tokens",):
        if key in extra:
            setattr(gen, key, extra.pop(key))

    def generate(ids: list[int], seed: int, suite: str | None = None) -> Run:
        torch.manual_seed(seed)
        x = torch.tensor([ids], device=target.device)  # (1, T)
        calls = [0]
        hook = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            _sync(target.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = target.generate(x, attention_mask=torch.ones_like(x), generation_config=gen, **extra)
            _sync(target.device)
            seconds = time.perf_counter() - t0
        finally:
            hook.remove()
        return Run(out[0, x.shape[1]:].tolist(), seconds, target_forwards=calls[0])

    return Method(name, kind, generate, info=dict(info or {}, implementation="transformers.generate"))


def engine_step_records(stats: dict, recorded: list[dict]) -> list[dict]:
    """Per-forward step records: the engine's own (stats["steps"] as a list, the stats contract) or, when it
    gives only a count, the ones recorded at `commit`, checked against its accepted_lengths (bonus included)."""
    if isinstance(stats.get("steps"), list):
        return list(stats["steps"])
    lengths = stats.get("accepted_lengths")
    if lengths is not None and [r["accepted"] + 1 for r in recorded] != list(lengths):
        raise RuntimeError(f"engine accepted lengths {lengths[:8]} disagree with the recorded verification steps "
                           f"{[r['accepted'] + 1 for r in recorded][:8]}")
    return list(recorded)


def engine_method(name: str, target, tokenizer, drafter, tree, max_new_tokens: int, temperature: float,
                  top_p: float, eos_ids: list[int], info: dict | None = None) -> Method:
    """Speculative decoding by our engine; acceptance comes from its step records. tree: one `TreeConfig`, or
    {suite name: TreeConfig} (trees tuned per suite; recorded as `trees`, and `tree` is the first)."""

    recorder = CommitRecorder(drafter)
    trees = tree if isinstance(tree, dict) else {}
    default = next(iter(trees.values())) if trees else tree

    def generate(ids: list[int], seed: int, suite: str | None = None) -> Run:
        x = torch.tensor([ids], device=target.device)  # (1, T)
        recorder.steps = []
        _sync(target.device)
        t0 = time.perf_counter()
        new, stats = speculative_generate(target=target, prompt_ids=x, drafter=recorder, tokenizer=tokenizer,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          tree=trees.get(suite, default), eos_token_id=eos_ids, seed=seed)
        _sync(target.device)
        seconds = time.perf_counter() - t0
        phases = {k: float(stats[k]) for k in ("draft_time_s", "verify_time_s", "prefill_time_s") if k in stats}
        recorded = [{"accepted": len(path) - 1, "drafted": int(drafted.size)} for drafted, path in recorder.steps]
        return Run(_ids(new), seconds, steps=engine_step_records(stats, recorded), phases=phases)

    every = list(trees.values()) or [tree]
    # alpha is a drafted chain's, of one length gamma for every suite (trees tuned per suite may differ: no alpha)
    shapes = {(t.shape, t.topk, t.lookup_tokens, t.depth) for t in every}
    chain = len(shapes) == 1 and default.shape == "chain" and default.topk == 1 and not default.lookup_tokens
    info = dict(info or {}, implementation="adaspec_eagle.engine.speculative.speculative_generate",
                tree=dataclasses.asdict(default))
    if trees:
        info["trees"] = {k: dataclasses.asdict(t) for k, t in trees.items()}
    return Method(name, "speculative", generate, depth=max(t.max_depth for t in every),
                  gamma=default.draft_depth if chain else None, info=info)


def engine_plain_method(name: str, target, tokenizer, max_new_tokens: int, temperature: float, top_p: float,
                        eos_ids: list[int]) -> Method:
    """Plain greedy decoding by our engine's own loop (same cache code as the speculative path)."""

    def generate(ids: list[int], seed: int, suite: str | None = None) -> Run:
        x = torch.tensor([ids], device=target.device)  # (1, T)
        _sync(target.device)
        t0 = time.perf_counter()
        new, _ = plain_generate(target=target, prompt_ids=x, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                                tokenizer=tokenizer)
        _sync(target.device)
        seconds = time.perf_counter() - t0
        new = _ids(new)
        return Run(new, seconds, target_forwards=len(new))

    return Method(name, "plain", generate, info={"implementation": "adaspec_eagle.engine.speculative.plain_generate"})


def _ids(out) -> list[int]:
    """New token ids from an engine output (a list or a (N,) / (1, N) tensor)."""
    ids = out.tolist() if hasattr(out, "tolist") else list(out)
    return ids[0] if ids and isinstance(ids[0], list) else ids


# ----------------------------------------------------------------------------------------------------------
# Drafters named on the command line: "[LABEL=]head:PATH", "[LABEL=]draft-lm:NAME_OR_PATH_OR_layers=N" or
# "[LABEL=]lookup:N" (prompt lookup run by the engine, N tokens a step)


# ----------------------------------------------------------------------------------------------------------
# The runner


@dataclass
class BenchConfig:
    """A benchmark run. Each field is one `bench` flag (`config.add_flags`): `--field-name`, help below."""

    target: str = field(default="smollm2-135m", metadata={"help": "target model (registry name, folder, .gguf, "
                                                                  "hub id)"})
    drafters: list[str] = field(default_factory=list, metadata={
        "flag": "--drafter", "append": True, "metavar": "[LABEL=]KIND:SOURCE",
        "help": "head:PATH (a trained head folder), draft-lm:NAME_OR_PATH (or draft-lm:layers=N: the target's first "
                "N layers) or lookup:N (prompt lookup run by our engine, N tokens a step); repeat for several "
                "drafters side by side"})
    suites: list[str] = field(default_factory=lambda: ["sharegpt"], metadata={
        "flag": "--suite", "append": True, "metavar": "SUITE", "help": f"repeatable; {SUITE_HELP}"})
    num_prompts: int = field(default=8, metadata={"help": "prompts per suite"})
    max_new_tokens: int = 128
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (outputs checked against plain)"})
    top_p: float = 1.0
    repeats: int = field(default=3, metadata={"help": "timed runs of every method on every prompt"})
    warmup: int = field(default=1, metadata={"help": "untimed runs of every method on each suite's first prompt "
                                                     "before timing"})
    depth: int = field(default=6, metadata={"help": "draft tree depth"})
    topk: int = field(default=8, metadata={"help": "children per expanded node"})
    total_tokens: int | str = field(default="48", metadata={
        "help": "draft tokens verified per step, or 'auto': tuned per drafter and suite (budget, depth, lookup "
                "length) for this machine on the suite's first prompt"})
    tree_shape: str = field(default="dynamic", metadata={"choices": ("dynamic", "static", "chain")})
    draft_vocab: int | str = field(default="auto", metadata={
        "help": "EAGLE-1/2 heads: draft from the N most frequent training tokens (lossless); 0 = whole vocabulary; "
                "auto = 8192 when the head has token counts"})
    peers: list[str] = field(default_factory=lambda: ["assisted", "prompt_lookup"], metadata={
        "csv": True, "help": "comma list of assisted (transformers assisted generation, draft-LM drafters only) "
                             "and prompt_lookup; 'none' for neither"})
    prompt_lookup_tokens: int = field(default=10, metadata={"help": "prompt_lookup_num_tokens of the peer"})
    lookup_tokens: int = field(default=0, metadata={
        "help": "also run each head / draft-LM drafter with up to N prompt-lookup tokens grafted onto its trees "
                "(a '+lookup(N)' row; 0: no such rows)"})
    alpha_protocol: bool = field(default=False, metadata={
        "help": f"also run each drafter as a greedy chain with γ={PAPER_GAMMA} to measure the paper's α"})
    baseline: list[str] = field(default_factory=lambda: ["hf"], metadata={
        "csv": True, "help": "plain decoding: hf (transformers generate), engine (our plain_generate) or hf,engine; "
                             "the first is the speedup reference; with hf,engine each speculative row also gets "
                             "its speedup over the engine's plain loop (speculation's own part)"})
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)"})
    seed: int = 0
    out: str = field(default="runs/bench", metadata={"help": "output folder"})
    progress: bool = field(default=True, metadata={"flag": "--no-progress", "negate": True,
                                                   "help": "no progress bar"})

    def __post_init__(self):
        checks = [(self.num_prompts >= 1, "--num-prompts", ">= 1"), (self.max_new_tokens >= 1, "--max-new-tokens",
                  ">= 1"), (self.temperature >= 0, "--temperature", ">= 0"), (0 < self.top_p <= 1, "--top-p",
                  "in (0, 1]"), (self.repeats >= 1, "--repeats", ">= 1"), (self.warmup >= 0, "--warmup", ">= 0"),
                  (0 <= self.lookup_tokens <= MAX_LOOKUP_TOKENS, "--lookup-tokens", f"in 0..{MAX_LOOKUP_TOKENS}")]

        self.draft_vocab = parse_draft_vocab(self.draft_vocab)
        if self.total_tokens != "auto":
            if not str(self.total_tokens).isdigit() or not 1 <= int(self.total_tokens) <= 1024:
                raise AdaspecError(f"--total-tokens {self.total_tokens!r}: expected an integer in 1..1024 or 'auto'.")
            self.total_tokens = int(self.total_tokens)
        for ok, flag, expected in checks:
            if not ok:
                raise AdaspecError(f"{flag} is out of range: expected {expected}.")
        bad = [p for p in self.peers if p not in ("assisted", "prompt_lookup")]
        if bad:
            raise AdaspecError(f"--peers {bad}: choose from assisted, prompt_lookup (comma separated), or none.")
        if not self.baseline or any(b not in ("hf", "engine") for b in self.baseline):
            raise AdaspecError(f"--baseline {self.baseline}: choose hf, engine or hf,engine (the first is the "
                               "reference for speedup).")
        if self.temperature > 0 and "engine" in self.baseline:
            raise AdaspecError("--baseline engine is greedy only; with --temperature > 0 use --baseline hf.")

        check_runtime(self.device, self.dtype, self.threads)


def chain_info(info: dict) -> dict:
    """A drafter's info for its paper-alpha chain row: the same drafter, not its tuned tree."""
    return {**{k: v for k, v in info.items() if k != "tuned_tree"}, "protocol": "paper alpha"}


def _tuned_trees(target, drafter, tune_prompts: dict, tree, eos_ids) -> tuple[dict, dict]:
    """`tree`'s budget, depth and lookup length tuned for `drafter` on each suite's prompt
    (`speculative.tune_tree_budget`) -> ({suite: TreeConfig}, {suite: what was tuned, for the record})."""

    trees, record = {}, {}
    for suite, prompt in tune_prompts.items():
        trees[suite], record[suite] = tuned_tree(target, drafter, prompt, tree, eos_token_id=eos_ids)
    return trees, record


def _drafter_methods(cfg: BenchConfig, spec, drafter, target, tokenizer, eos_ids, tune_prompts, tree,
                     common: dict) -> list[Method]:
    """One drafter's rows: its tree (tuned per suite with total_tokens="auto"), with --lookup-tokens a row with
    prompt lookup grafted on, with --alpha-protocol a greedy chain of the paper's gamma."""

    auto = cfg.total_tokens == "auto"
    info = {"drafter": spec.kind, "source": spec.source}
    if getattr(drafter, "draft_vocab_size", None):
        info["draft_vocab"] = drafter.draft_vocab_size
    if spec.kind == "lookup":  # nothing to tune: the tree is the lookup chain
        own_tree = TreeConfig(depth=1, topk=1, total_tokens=1, shape="chain", lookup_tokens=int(spec.source))
        info["lookup_tokens"] = int(spec.source)
        return [engine_method(spec.label, target, tokenizer, drafter, own_tree, eos_ids=eos_ids, info=info, **common)]
    own_tree = tree
    if auto:
        if not tune_prompts:
            raise AdaspecError("--total-tokens auto needs a prompt to tune on.")
        own_tree, info["tuned_tree"] = _tuned_trees(target, drafter, tune_prompts, tree, eos_ids)
    methods = [engine_method(spec.label, target, tokenizer, drafter, own_tree, eos_ids=eos_ids, info=info, **common)]
    if cfg.lookup_tokens:
        looked = dataclasses.replace(own_tree if not auto else tree, lookup_tokens=cfg.lookup_tokens)
        looked_info = {**info, "lookup_tokens": cfg.lookup_tokens}
        if auto:  # its own budget and chain length: the lookup tokens lengthen every verify
            looked, looked_info["tuned_tree"] = _tuned_trees(target, drafter, tune_prompts, looked, eos_ids)
        methods.append(engine_method(f"{spec.label}+lookup({cfg.lookup_tokens})", target, tokenizer, drafter,
                                     looked, eos_ids=eos_ids, info=looked_info, **common))
    if cfg.alpha_protocol and (tree.shape, tree.draft_depth, tree.topk) != ("chain", PAPER_GAMMA, 1):
        chain = TreeConfig(shape="chain", depth=PAPER_GAMMA, topk=1, total_tokens=PAPER_GAMMA)
        methods.append(engine_method(f"{spec.label} [chain γ={PAPER_GAMMA}]", target, tokenizer, drafter,
                                     chain, eos_ids=eos_ids, info=chain_info(info), **common))
    return methods


def build_methods(cfg: BenchConfig, target, tokenizer, eos_ids: list[int], tune_prompts: dict | None = None
                  ) -> list[Method]:
    """The baseline(s) first (the first is the speedup reference), then each drafter (its tree, and a greedy
    gamma=4 chain with --alpha-protocol), then the peers. total_tokens="auto": each drafter's tree budget, depth
    (and lookup length) are tuned per suite on `tune_prompts` ({suite name: prompt ids}, each suite's first
    prompt) before anything is timed: code and chat want different trees."""

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    common = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    methods = []
    for b in cfg.baseline:
        methods.append(hf_generate_method("plain-hf", "plain", target, eos_ids, pad_id, **common) if b == "hf" else
                       engine_plain_method(ENGINE_PLAIN, target, tokenizer, eos_ids=eos_ids, **common))
    auto = cfg.total_tokens == "auto"
    tree = TreeConfig(depth=cfg.depth, topk=cfg.topk, total_tokens=1 if auto else cfg.total_tokens,
                      shape=cfg.tree_shape)
    specs = [parse_drafter(d) for d in cfg.drafters]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise AdaspecError(f"drafter labels {labels} repeat; name them apart with LABEL=, e.g. "
                           "--drafter kd=head:heads/kd --drafter adaspec=head:heads/adaspec.")
    draft_lms = []
    for spec in specs:
        drafter, draft_lm = make_drafter(spec, target, tokenizer, cfg.dtype, cfg.draft_vocab)
        linear_routing.prepare(*drafter.models())  # measured here, not inside a timed or tuning run
        methods += _drafter_methods(cfg, spec, drafter, target, tokenizer, eos_ids, tune_prompts, tree, common)
        if draft_lm is not None:
            draft_lms.append((spec, draft_lm))
    if "assisted" in cfg.peers:
        for spec, draft_lm in draft_lms:
            methods.append(hf_generate_method(f"assisted:{spec.label}", "assisted", target, eos_ids, pad_id,
                                              info={"draft_lm": spec.source}, assistant_model=draft_lm, **common))
    if "prompt_lookup" in cfg.peers:
        methods.append(hf_generate_method(f"prompt-lookup({cfg.prompt_lookup_tokens})", "prompt_lookup", target,
                                          eos_ids, pad_id, info={"prompt_lookup_num_tokens": cfg.prompt_lookup_tokens},
                                          prompt_lookup_num_tokens=cfg.prompt_lookup_tokens, **common))
    return methods


def run_bench(cfg: BenchConfig) -> dict:
    """Load, warm up, run every method on every prompt `repeats` times (interleaved, so drift hits all methods
    alike), and return the benchmark record (see `write_outputs`)."""

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target, tokenizer = load_model(cfg.target, dtype=cfg.dtype, device=cfg.device)
    linear_routing.prepare(target)  # the engine's linear routing, measured before anything is timed
    eos_ids = stop_ids(target, tokenizer)
    suites = [load_suite(s, tokenizer, cfg.num_prompts) for s in cfg.suites]
    names = [s["name"] for s in suites]
    if len(set(names)) != len(names):
        raise AdaspecError(f"suites {names} repeat a name; give each suite once.")
    methods = build_methods(cfg, target, tokenizer, eos_ids, tune_prompts={s["name"]: s["prompts"][0] for s in suites})

    for _ in range(cfg.warmup):  # compile / allocate / fill caches, with each suite's tree; not recorded
        for s in suites:
            for m in methods:
                m.generate(s["prompts"][0], cfg.seed, s["name"])

    runs = {s["name"]: {m.name: [[] for _ in s["prompts"]] for m in methods} for s in suites}
    total = cfg.repeats * sum(len(s["prompts"]) for s in suites) * len(methods)
    running = {m.name: [0, 0] for m in methods}  # emitted tokens, forwards (for the bar's running tau)
    with tqdm(total=total, desc="bench", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for r in range(cfg.repeats):
            for s in suites:
                for i, ids in enumerate(s["prompts"]):
                    for m in methods:
                        run = m.generate(ids, cfg.seed + r, s["name"])
                        runs[s["name"]][m.name][i].append(run)
                        if run.steps:
                            running[m.name][0] += sum(st["accepted"] + 1 for st in run.steps)
                            running[m.name][1] += len(run.steps)
                        bar.update(1)
                    bar.set_postfix_str(" ".join(f"τ[{_short(k)}]={a / b:.2f}" for k, (a, b) in running.items()
                                                 if b), refresh=False)
    return make_record(cfg, suites, methods, runs, command=command_line(cfg))


def _short(name: str, width: int = 18) -> str:
    """A method name for the progress bar: the chain marker shortened, long names cut in the middle."""
    name = name.replace(f" [chain γ={PAPER_GAMMA}]", "·chain")
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width // 2):]


def command_line(cfg: BenchConfig) -> str:
    """The `adaspec-eagle bench` command that reproduces `cfg` (recorded in bench.json and bench.md), every flag
    derived from `BenchConfig` (`config.to_flags`); the progress bar is left out."""

    flags = to_flags(dataclasses.replace(cfg, progress=True))
    return shlex.join(["adaspec-eagle", "bench", *flags])




# ----------------------------------------------------------------------------------------------------------
# CLI


def cmd_bench(args) -> int:
    cfg = from_flags(BenchConfig, args)
    check_output_folder(cfg.out)  # before the benchmark runs: a file, a read-only place or others' files
    record = run_bench(cfg)
    print(markdown_table(record))
    with disk_errors("the benchmark's results", cfg.out, "The table above is all of it; bench.json was not written."):
        written = write_outputs(record, cfg.out)
    print("wrote " + ", ".join(written.values()))
    bad = [m for m, ok in record["lossless"].items() if ok is False]
    if bad:  # every output is written; the exit status says the run is not lossless
        print(f"error: greedy output differs from {record['reference']} for {bad} (see 'mismatches' in "
              "bench.json). Speculative decoding must reproduce plain greedy token for token: in float32 this is "
              "a bug in that method's path; in bfloat16/float16 near-ties can flip an argmax between the tree "
              "forward and a sequential one.", file=sys.stderr)
        return 1
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="acceptance (τ, α, accepted/drafted) and speed (tokens/s, speedup over plain "
                                     "decoding) of drafters and peers on prompt suites",
                       description="Benchmark drafters against plain decoding of the same target in the same run. "
                                   "Writes bench.json, bench.md and PNG plots to --out.")
    add_flags(p, BenchConfig)
    p.set_defaults(func=cmd_bench)
