"""Typed run configuration: the only schema. Defaults live here once; YAML recipes state what differs;
`key=value` overrides come from the command line; unknown keys, wrong types and out-of-range values are
rejected with the key's dotted name; the resolved config is written next to every output.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import json
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from adaspec_eagle import AdaspecError
from adaspec_eagle.io import (
    atomic_write,
    check_output_folder,
    empty_folder,
    mark_output_folder,
    output_lock,
    read_text,
)


def _check(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise AdaspecError(f"config value {key}={value!r} is out of range: expected {expected}.")


@dataclass
class LossConfig:
    kind: Literal["adaspec", "kd"] = "adaspec"
    """'adaspec' trains only on the top-k tokens by loss gap to the reference; 'kd' is plain distillation
    (the reference stage, and the DistillSpec baseline)."""
    k: float = 0.4
    """Fraction of valid tokens kept by the AdaSPEC selection, in (0, 1]; k = 1 equals plain KD."""
    divergence: Literal["forward_kl", "reverse_kl", "tvd", "jsd"] = "forward_kl"
    """Per-token divergence between target and draft; the AdaSPEC reference code uses forward KL(target || draft)."""
    beta: float = 0.5
    """JSD mixing weight in [0, 1] (only for divergence=jsd)."""
    temperature: float = 1.0
    """Softmax temperature applied to target, draft and reference logits (> 0)."""
    scope: Literal["batch", "global"] = "batch"
    """Where the top-k threshold is taken: the micro-batch (the AdaSPEC reference code's) or all ranks' tokens together."""
    reduction: Literal["num_items", "mean"] = "num_items"
    """'num_items': sum over kept tokens / valid tokens in the batch (the AdaSPEC reference code's num_items_in_batch);
    'mean': mean over kept tokens."""
    chunk_size: int = 1024
    """Tokens per chunk in the memory-efficient path (never three [tokens, vocab] fp32 tensors at once)."""
    budget: Literal["equal_tokens", "equal_steps"] = "equal_tokens"
    """Training budget of the AdaSPEC stage against the reference stage. 'equal_tokens' (the AdaSPEC reference
    implementation's scripts): the AdaSPEC stage runs as many optimizer steps as the reference, each on
    round(batch_size / k) sequences, i.e. 1/k times the epochs, so each step trains on as many *kept* tokens as
    a reference step (k = 0.4: batch 16 -> 40, 3 epochs -> 7.5). 'equal_steps': the same steps and batch as
    the reference, so AdaSPEC trains on k times the tokens (kept for comparison)."""

    def __post_init__(self):
        _check(0.0 < self.k <= 1.0, "loss.k", self.k, "0 < k <= 1")
        _check(0.0 <= self.beta <= 1.0, "loss.beta", self.beta, "0 <= beta <= 1")
        _check(self.temperature > 0, "loss.temperature", self.temperature, "> 0")
        _check(self.chunk_size >= 1, "loss.chunk_size", self.chunk_size, ">= 1")


@dataclass
class DataConfig:
    dataset: str = "sharegpt"
    """'sharegpt' (the bundled package), a paper task (gsm8k, alpaca, mbpp, cnn_dm, xsum), 'humaneval', or a
    local .json/.jsonl file."""
    path: str | None = None
    """Local file for a paper task instead of the hub (same fields as the hub dataset)."""
    max_length: int = 512
    """Tokens per sample after truncation."""
    num_samples: int | None = None
    """Use at most this many training samples (None: all)."""
    holdout: int = 64
    """Samples set aside (deterministically) as the held-out split."""
    seed: int = 0
    """Seed of the deterministic train / held-out split."""
    self_distill: bool = False
    """Train on the target's own greedy answers (regen.py: the first user turn of each chat / each prompt is
    answered by the target, train and held-out splits, cached resumably in OUT/regen.jsonl)."""
    answer_tokens: int | None = None
    """data.self_distill: answer with at most this many new tokens (None: up to max_length)."""
    regen_batch_size: int = 32
    """data.self_distill: prompts answered per batched `generate` call (left-padded, sorted by length)."""

    def __post_init__(self):
        _check(self.max_length >= 8, "data.max_length", self.max_length, ">= 8")
        _check(self.num_samples is None or self.num_samples >= 1, "data.num_samples", self.num_samples, ">= 1")
        _check(self.holdout >= 0, "data.holdout", self.holdout, ">= 0")
        _check(self.answer_tokens is None or self.answer_tokens >= 1, "data.answer_tokens", self.answer_tokens,
               ">= 1")
        _check(self.regen_batch_size >= 1, "data.regen_batch_size", self.regen_batch_size, ">= 1")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""

    def __post_init__(self):
        _check(0.0 < self.lr < 1.0, "optim.lr", self.lr, "0 < lr < 1")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", self.max_grad_norm, ">= 0")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data per stage."""
    max_steps: int | None = None
    """Stop each stage after this many optimizer steps (None: run the epochs)."""
    max_minutes: float | None = None
    """Time budget per stage: after its first 20 steps the stage's step count (and with it the LR schedule) is
    cut to what fits this many minutes at the rate measured so far; the cut is saved with checkpoints, so a
    resume keeps it (a cut at or below optim.warmup_steps ends still warming up). The minutes are training
    steps': held-out evaluations (`eval_every`) and checkpoint saves come on top, so leave room for them in a
    fixed slot on a lent machine. None: no budget."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    save_every: int = 200
    """Optimizer steps between checkpoints (atomic; the run resumes from the last one)."""
    log_every: int = 10
    seed: int = 0
    eval_every: int | None = None
    """Optimizer steps between held-out evaluations of a head stage (chain acceptance, `evaluate_head`); the
    stage then keeps the head with the best held-out chain tau, not the last one (loss keeps falling after tau
    peaks). None: no evaluation during training; the last head is kept."""

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs", self.epochs, "> 0")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, ">= 1")
        _check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes", self.max_minutes, "> 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, ">= 1")
        _check(self.save_every >= 1, "train.save_every", self.save_every, ">= 1")
        _check(self.log_every >= 1, "train.log_every", self.log_every, ">= 1")
        _check(self.eval_every is None or self.eval_every >= 1, "train.eval_every", self.eval_every, ">= 1")


@dataclass
class HeadConfig:
    kind: Literal["eagle1", "eagle3"] = "eagle1"
    """'eagle1': fc over [embedding, last feature] + one decoder layer, the target's lm_head (EAGLE-1/2).
    'eagle3': fused three-layer features, own norm and lm_head over a draft vocabulary."""
    draft_vocab_size: int = 8192
    """EAGLE-3 draft vocabulary: the most frequent training tokens (clamped to the target vocabulary)."""
    ttt_steps: int = 7
    """EAGLE-3 training-time-test unroll length."""
    ttt_decay: float = 0.8
    """Weight of unroll step j is ttt_decay**j (EAGLE-3's unroll, and EAGLE-1's with head.unroll_steps > 1)."""
    unroll_steps: int = 1
    """EAGLE-1/2: train the head on its own outputs as it drafts (a training-time test, as HASS does for EAGLE-2
    heads): step j of the unroll reads the head's step j-1 outputs and is scored against the target's token and
    feature j places on; each step costs about one more head forward and token loss. 1: teacher-forced only."""
    fc_bias: bool = False
    """A bias on the EAGLE-1 fc layer. vLLM's EAGLE-1 layout has none (an exported bias must be folded)."""
    token_loss_weight: float = 0.1
    """EAGLE-1/2: weight of the token loss (the AdaSPEC / KD divergence to the target's next-token distribution;
    EAGLE-1 trains its soft cross-entropy, which has the same gradient, at 0.1)."""
    feature_loss_weight: float = 1.0
    """EAGLE-1/2: weight of the smooth-L1 regression of the next target feature (EAGLE-1: 1.0; 0 disables).
    EAGLE-3 has none. Which positions it covers under AdaSPEC: `feature_loss_positions`."""
    feature_loss_positions: Literal["kept", "all"] = "kept"
    """EAGLE-1/2 under AdaSPEC: 'kept' regresses the feature at the positions the token selection keeps; 'all' at
    every valid position, in or out of the vocabulary, exactly as KD does (summed over them and normalised as
    the token loss is, so its per-step weight is 1/k times 'kept''s). KD always covers every position."""
    feature_noise: float = 0.2
    """EAGLE-1/2: uniform noise U(-a/2, a/2) of width a added to the input target features while training
    (never at inference), so the head learns to read its own, imperfect, features at deeper tree levels.
    EAGLE-1 adds width 0.2 * 512 / (padded batch length), i.e. 0.2 at 512 tokens; this is the fixed width."""
    train_vocab_size: int = 0
    """EAGLE-1/2: train the token loss over the this-many most frequent trainable tokens of the data only
    (0: the whole vocabulary). The teacher is renormalised over them, positions whose target token lies
    outside are left out (`exclude_out_of_vocab`); the saved token counts make `HeadDrafter(draft_vocab=N)`
    draft over the same ids."""
    exclude_out_of_vocab: bool = True
    """With a restricted (EAGLE-3 draft or EAGLE-1 training) vocabulary: leave out of the token loss the
    positions whose target token is not in it (EAGLE-3's rule), instead of training on a renormalised teacher
    that cannot name the right token."""

    def __post_init__(self):
        _check(self.draft_vocab_size >= 2, "head.draft_vocab_size", self.draft_vocab_size, ">= 2")
        _check(self.ttt_steps >= 1, "head.ttt_steps", self.ttt_steps, ">= 1")
        _check(0 < self.ttt_decay <= 1, "head.ttt_decay", self.ttt_decay, "0 < decay <= 1")
        _check(self.unroll_steps >= 1 and (self.kind == "eagle1" or self.unroll_steps == 1), "head.unroll_steps",
               self.unroll_steps, ">= 1, and 1 for an EAGLE-3 head (it unrolls head.ttt_steps)")
        _check(self.feature_loss_weight >= 0, "head.feature_loss_weight", self.feature_loss_weight, ">= 0")
        _check(self.token_loss_weight > 0, "head.token_loss_weight", self.token_loss_weight, "> 0")
        _check(self.feature_noise >= 0, "head.feature_noise", self.feature_noise, ">= 0")
        _check(self.train_vocab_size == 0 or self.train_vocab_size >= 2, "head.train_vocab_size",
               self.train_vocab_size, "0 (whole vocabulary) or >= 2")


MAX_LOOKUP_TOKENS = 256
"""The most prompt-lookup tokens a tree may carry (`TreeConfig.lookup_tokens`, `--lookup-tokens`, `lookup:N`)."""


@dataclass
class TreeConfig:
    depth: int = 6
    """Draft levels (chain length for a chain)."""
    topk: int = 8
    """Children considered per expanded node."""
    total_tokens: int = 48
    """Draft tokens verified per step (the tree budget)."""
    shape: Literal["dynamic", "static", "chain"] = "dynamic"
    lookup_tokens: int = 0
    """Prompt lookup grafted onto every tree: up to this many tokens that followed the latest earlier occurrence
    of the sequence's last n-gram (0: off). They cost no draft forward, only verify positions."""
    lookup_ngram: int = 3
    """Longest n-gram matched for prompt lookup; shorter ones are tried down to `lookup_min_ngram`."""
    lookup_min_ngram: int = 2
    """Shortest n-gram matched (1 also copies after any repeated single token: more guesses, mostly wrong)."""

    def __post_init__(self):
        _check(self.depth >= 1, "tree.depth", self.depth, ">= 1")
        _check(self.topk >= 1, "tree.topk", self.topk, ">= 1")
        _check(1 <= self.total_tokens <= 1024, "tree.total_tokens", self.total_tokens, "1..1024")
        _check(0 <= self.lookup_tokens <= MAX_LOOKUP_TOKENS, "tree.lookup_tokens", self.lookup_tokens,
               f"0..{MAX_LOOKUP_TOKENS}")
        _check(1 <= self.lookup_min_ngram <= self.lookup_ngram, "tree.lookup_min_ngram", self.lookup_min_ngram,
               f"1..lookup_ngram ({self.lookup_ngram})")

    @property
    def max_depth(self) -> int:
        """The deepest node a tree can hold (positions it needs past the root)."""
        return max(self.depth, self.lookup_tokens)

    @property
    def draft_depth(self) -> int:
        """Levels the drafter drafts: a chain, or a dynamic tree's kept set, never goes deeper than the budget
        (levels past it would be drafted and pruned); a static tree drafts `depth`."""
        return min(self.depth, self.total_tokens) if self.shape in ("chain", "dynamic") else self.depth


@dataclass
class HeadRecipe:
    """`adaspec-eagle train-head`: a reference head (KD), then the AdaSPEC head against it."""

    target: str = "smollm2-135m"
    """The frozen target: a registry name (`adaspec-eagle list-models`), a model folder, a .gguf file, a hub id, or
    tiny-FAMILY."""
    output_dir: str = "runs/head"
    """Where the run writes its heads, checkpoints and feature cache (a new or empty folder, or one of its runs)."""
    stage: Literal["both", "reference", "draft"] = "both"
    """Stages to train: the reference head (KD), the draft head (loss.kind, against `reference`), or both."""
    reference: str | None = None
    """Path of a trained reference head (for stage=draft)."""
    init_head: str | None = None
    """A trained head folder (this tool's, or an EAGLE / SGLang / vLLM export) whose weights start every stage:
    continued training, e.g. more epochs or new data for a shipped head. Its kind, fc bias and (EAGLE-3) draft
    vocabulary must match the recipe's head. None: a fresh head from train.seed."""
    features: Literal["cached", "online"] = "cached"
    """'cached': run the target once, store features on disk (memory-mapped), reuse for both stages."""
    feature_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Storage dtype of cached features (recorded in the cache manifest)."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DraftLMRecipe:
    """`adaspec-eagle train-draft-lm`: optional target fine-tune, reference LM (KD), AdaSPEC draft LM."""

    target: str = "pythia-1.4b"
    """The target: a registry name (`adaspec-eagle list-models`), a model folder or a hub id."""
    draft: str = "pythia-31m"
    """The draft's initialisation: a registry name or path, 'layers=N' (the target's first N layers) or
    'fresh:hidden=H,layers=L' (a new model of that size)."""
    output_dir: str = "runs/draft-lm"
    """Where the run writes its models (a new or empty folder, or one of its runs)."""
    stages: list[str] = field(default_factory=lambda: ["target", "reference", "draft"])
    """Stages to run, in order: target fine-tune, reference LM (KD), draft LM (loss.kind)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="gsm8k"))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, batch_size=16))
    target_epochs: float | None = None
    reference_epochs: float | None = None
    draft_epochs: float | None = None

    def __post_init__(self):
        bad = [s for s in self.stages if s not in ("target", "reference", "draft")]
        _check(not bad and len(self.stages) > 0, "stages", self.stages, "a list of target/reference/draft")


# ----------------------------------------------------------------------------------------------------------
# Generic loading: dict -> dataclass with type checks


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted value) for a value read from YAML against an annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return True, None
                continue
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        conv = []
        for i, item in enumerate(value):
            arg = args[0] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args[min(i, len(args) - 1)]
            ok, c = _type_ok(item, arg)
            if not ok:
                return False, value
            conv.append(c)
        return True, (conv if origin is list else tuple(conv))
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads "3e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys and wrong types by dotted name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:

        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise AdaspecError(f"unknown config key '{prefix}{key}'.{hint} Known keys here: {sorted(names)}.")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise AdaspecError(f"config key '{prefix}{name}' must be a mapping of {tp.__name__} fields, "
                                   f"got {value!r}.")
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            expected = (f"one of {list(typing.get_args(tp))}" if typing.get_origin(tp) is Literal
                        else str(tp).replace("typing.", "").replace("<class '", "").replace("'>", ""))
            raise AdaspecError(f"config key '{prefix}{name}' has value {value!r} of the wrong type; expected "
                               f"{expected}.")
        kwargs[name] = conv
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['loss.k=0.3', 'train.max_steps=5'] -> nested dict; values parsed as YAML scalars."""
    result: dict = {}
    for item in overrides:
        if "=" not in item:
            raise AdaspecError(f"override {item!r} is not of the form key=value (e.g. loss.k=0.3).")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AdaspecError(f"override {item!r} conflicts with another override of {part!r}.")
        node[parts[-1]] = value
    return result


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML itself keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:
                pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, what: str):
    """Parse YAML text strictly (no duplicate keys); errors name `what` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise AdaspecError(f"{what} is not valid YAML: {e}") from None


def load_recipe(cls, path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None):
    """Defaults of `cls`, then the YAML at `path`, then `key=value` overrides; validated."""

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise AdaspecError(f"recipe {str(p)!r} does not exist; see recipes/ for the shipped ones.")
        data = load_yaml(read_text(p, "recipe"), f"recipe {str(p)!r}")
        if data is None:
            raise AdaspecError(f"recipe {str(p)!r} is empty; a recipe sets at least one key (e.g. `target: "
                               "smollm2-135m`). Run without --recipe for the defaults.")
        if not isinstance(data, dict):
            raise AdaspecError(f"recipe {str(p)!r} must be a mapping of config keys, got {type(data).__name__}.")
    if overrides:
        data = merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg, folder: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output (atomically)."""

    path = Path(folder) / name
    atomic_write(path, yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False, allow_unicode=True))
    return path


def _diff_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


@contextlib.contextmanager
def claim_output_dir(folder: str | os.PathLike, cfg, overwrite: bool = False, command: str = "train"):
    """Make `folder` this run's own for the duration of the block (the rule of `io.check_output_folder`).

    Refuses (before anything is written) a folder holding files this tool did not make, whatever `overwrite`
    says, and a folder holding a different run (its resolved config differs; the differing keys are named)
    unless `overwrite`, which empties that run's folder; and a folder another live process is writing to (an
    exclusive lock, so two runs never interleave). The same config resumes. Only the main process of a
    distributed launch checks and locks."""

    folder = Path(folder)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        check_output_folder(folder, replace=overwrite)
    if main_process and folder.exists() and not overwrite:
        saved = folder / "config.yaml"
        if saved.is_file():
            old = yaml.safe_load(saved.read_text()) or {}
            new = json.loads(json.dumps(to_dict(cfg)))
            differ = _diff_keys(old, new)
            if differ:
                raise AdaspecError(f"output folder {str(folder)!r} holds a different run (config differs at "
                                   f"{', '.join(differ[:6])}); choose another output_dir, or pass --overwrite to "
                                   "delete that run and start afresh.")
    folder.mkdir(parents=True, exist_ok=True)
    if not main_process:
        yield folder
        return
    with output_lock(folder):
        mark_output_folder(folder, command)
        if overwrite:  # start afresh: nothing of the previous run may be resumed with another config
            empty_folder(folder)
        yield folder


# ----------------------------------------------------------------------------------------------------------
# Command-line flags from a config dataclass: one definition per option


_FLAG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "int | str": str}


def add_flags(parser, cls) -> None:
    """One flag per field of dataclass `cls`: `--field-name` of the field's type and default, help from
    `metadata["help"]`. Metadata may also set "flag" (another name), "append" (a repeatable flag for a list
    field), "csv" (a comma list for a list field), "choices", "metavar", and for booleans "negate" (the flag turns
    a true default off)."""
    for f in dataclasses.fields(cls):
        m = f.metadata
        flag = m.get("flag", "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"dest": f.name, "help": m.get("help")}
        if f.type in ("bool", bool):
            kw.update(action="store_false" if m.get("negate") else "store_true", default=default)
        elif m.get("append"):
            kw.update(action="append", default=None, metavar=m.get("metavar"))
        elif m.get("csv"):
            kw.update(default=",".join(default) or "none", metavar=m.get("metavar"))
        else:
            kw.update(type=_FLAG_TYPES[str(f.type)], default=default, metavar=m.get("metavar"))
            if "choices" in m:
                kw["choices"] = m["choices"]
        parser.add_argument(flag, **{k: v for k, v in kw.items() if v is not None or k == "default"})


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it} for dataclass `cls` (its attribute docstrings; read from its
    source once per class, since every command's parser asks for them)."""
    docs, last = {}, None
    for node in ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and \
                isinstance(node.value.value, str):
            docs[last] = " ".join(node.value.value.split())
            last = None
        else:
            last = None
    return docs


def _owner(cls, key: str):
    """The dataclass that holds the last part of a dotted recipe key ('loss.kind' -> LossConfig)."""
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_key_flags(parser, cls, flags: dict[str, str]) -> None:
    """Shortcut flags for recipe keys of `cls` ({'--loss': 'loss.kind', ...}): each flag's help and choices come
    from the key's field (its docstring and Literal type), so the recipe key is the one definition. A flag not
    given leaves the recipe's value; `key_overrides` turns the given ones into `key=value` overrides. A list
    field takes a comma list."""
    for flag, key in flags.items():
        owner, name = _owner(cls, key), key.split(".")[-1]
        hint = typing.get_type_hints(owner)[name]
        kw = {"dest": _flag_dest(flag), "default": None,
              "help": f"{field_docs(owner).get(name, '')} (recipe key {key})".strip()}
        if typing.get_origin(hint) is Literal:
            kw["choices"] = list(typing.get_args(hint))
        elif typing.get_origin(hint) is list:
            kw["metavar"] = "A,B"
        parser.add_argument(flag, **kw)


def key_overrides(args, cls, flags: dict[str, str]) -> list[str]:
    """The `key=value` overrides of the `add_key_flags` flags given on the command line (a list field's comma list
    as [a,b]; an empty one is kept, for the config to refuse)."""
    out = []
    for flag, key in flags.items():
        value = getattr(args, _flag_dest(flag))
        if value is None:
            continue
        hint = typing.get_type_hints(_owner(cls, key))[key.split(".")[-1]]
        out.append(f"{key}=[{value}]" if typing.get_origin(hint) is list else f"{key}={value}")
    return out


def from_flags(cls, args):
    """The dataclass `cls` from parsed `add_flags` arguments (a repeatable flag never given keeps the field's
    default; a comma list 'none' or '' is empty)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if f.metadata.get("append") and value is None:
            continue
        if f.metadata.get("csv"):
            value = [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]
        values[f.name] = value
    return cls(**values)


def to_flags(cfg) -> list[str]:
    """The `add_flags` arguments that give back the dataclass instance `cfg` (`from_flags(type(cfg), ...)`):
    every field, in field order; a None or false boolean flag is left out, as is `progress`-style negated flags
    at their default."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        m, value = f.metadata, getattr(cfg, f.name)
        flag = m.get("flag", "--" + f.name.replace("_", "-"))
        if f.type in ("bool", bool):
            if value != (f.default if f.default is not dataclasses.MISSING else False):
                out.append(flag)
        elif m.get("append"):
            for item in value:
                out += [flag, str(item)]
        elif m.get("csv"):
            out += [flag, ",".join(value) or "none"]
        elif value is not None:
            out += [flag, str(value)]
    return out
