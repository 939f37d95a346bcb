"""Training data from the target itself: answering each training prompt with the target (`data.self_distill`).

A head trained on its target's own outputs accepts more at decode time (SpecForge and FastDraft regenerate
their data this way): at temperature 0 the text a head drafts against is exactly the target's greedy output.

What is answered. A chat keeps its leading system turn and its *first user turn only*; the target's greedy answer
to that becomes the one assistant turn (later turns are dropped: answering turn 2 would need the target's own
turn-1 answer, and the original turn-2 question may no longer fit it). A prompt/completion example keeps its
prompt; the answer becomes the completion (plus the EOS string, as data.py's completions end). The results have
the form data.py loads, so `data.build_dataset` (chat rendering, loss masks, truncation) is unchanged.

Generation. Batched greedy decoding with HF `generate` (left-padded batches, do_sample=False), prompts sorted by
length. An example's answer is at most `max_length - len(prompt)` tokens (its sample is cut there anyway), cut
at the first EOS id of the tokenizer / generation config; prompts of `max_length` tokens or more are not
answered (their samples would hold no answer token). Results do not depend on batch composition, up to padding
numerics.

Cache. OUT/regen.jsonl: a header line {"regen": 1, "target": models.target_identity} then one record per
answered example {"index", "key", "answer", "tokens", "eos"}, appended and flushed after every batch; `key` hashes
the target fingerprint, the rendered prompt and the token limit. A rerun answers only the indices whose key is
missing (a killed run resumes; a changed prompt or max_length is answered again); a cache written by another
target is refused.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaspec_eagle import AdaspecError
from adaspec_eagle.data import load_examples, render_chat, split_order
from adaspec_eagle.models import identity_mismatch, target_identity

CACHE_NAME = "regen.jsonl"
CACHE_VERSION = 1
IDENTITY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "fingerprint")


# ----------------------------------------------------------------------------------------------------------
# Examples <-> prompts


def prompt_part(example: dict) -> dict:
    """The part of an example the target answers: {"messages": (system?, first user)} or {"prompt"}."""
    if "messages" not in example:
        return {"prompt": example["prompt"]}
    msgs = example["messages"]
    first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if first is None:
        raise AdaspecError("a chat without a user turn cannot be answered by the target (data.self_distill).")
    return {"messages": tuple(msgs[: first + 1])}


def prompt_text(tokenizer, example: dict) -> str:
    """The prompt as the target sees it: the chat rendered with the generation prompt, or the plain prompt."""

    part = prompt_part(example)
    if "messages" in part:
        return render_chat(tokenizer, part["messages"], add_generation_prompt=True)
    return part["prompt"]


def prompt_ids(tokenizer, example: dict) -> list[int]:
    """Token ids of the prompt, tokenized as `data.encode_example` tokenizes the full example."""
    text = prompt_text(tokenizer, example)
    return list(tokenizer(text, add_special_tokens="messages" not in example)["input_ids"])


def with_answer(example: dict, answer: str, eos: str) -> dict:
    """The example with its answer replaced: chats get one assistant turn after the first user turn."""
    part = prompt_part(example)
    if "messages" in part:
        return {"messages": part["messages"] + ({"role": "assistant", "content": answer},)}
    return {"prompt": part["prompt"], "completion": answer + eos}


def record_key(identity: dict, text: str, limit: int) -> str:
    blob = json.dumps([identity["fingerprint"], identity["vocab_size"], text, int(limit)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------
# The cache file


def _same_target(recorded: dict, now: dict) -> bool:
    return identity_mismatch(recorded, now, IDENTITY_KEYS) is None


def read_cache(path: str | os.PathLike, identity: dict) -> dict[int, dict]:
    """{index: record} of an existing cache (empty when there is none); refuses another target's cache. A torn
    last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("regen") != CACHE_VERSION:
        raise AdaspecError(f"{str(path)!r} is not an answer cache of this version; delete it, pass --overwrite, "
                           "or choose another --output-dir.")
    if not _same_target(header["target"], identity):
        was = header["target"]
        raise AdaspecError(f"the answer cache {str(path)!r} was generated by another target ({was.get('name')!r}, "
                           f"fingerprint {was.get('fingerprint')}) than {identity['name']!r} (fingerprint "
                           f"{identity['fingerprint']}); pass --overwrite to answer again with this target, or "
                           "choose another --output-dir.")
    records = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[int(rec["index"])] = rec  # a later record of an index supersedes an earlier one
    return records


def check_cache(path: str | os.PathLike, target) -> None:
    """Raise (before anything is written) when `path` holds answers of another target."""

    read_cache(path, target_identity(target))


def _open_for_append(path: Path, identity: dict, fresh: bool):
    if fresh or not path.is_file() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w", encoding="utf-8")
        f.write(json.dumps({"regen": CACHE_VERSION, "target": identity}) + "\n")
        f.flush()
        return f
    text = path.read_bytes()
    if not text.endswith(b"\n"):  # drop a torn last line before appending
        path.write_bytes(text[: text.rfind(b"\n") + 1])
    return open(path, "a", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Generation


def _eos_ids(target, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(getattr(target, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _pad_id(target, tokenizer) -> int:
    for value in (tokenizer.pad_token_id, getattr(target.generation_config, "pad_token_id", None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


@torch.no_grad()
def greedy_batch(target, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: set[int]):
    """Greedy answers to a batch of prompts: left-pad to (B, P), `generate`, return the new ids of each row cut
    at (and without) its first EOS, with a flag saying whether it stopped there."""
    device = next(target.parameters()).device
    P = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)  # (B, P) left-padded
    attention_mask = torch.zeros((len(prompts), P), dtype=torch.long)  # (B, P)
    for b, p in enumerate(prompts):
        input_ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, P - len(p):] = 1
    out = target.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                          eos_token_id=sorted(eos_ids) or None, num_beams=1, temperature=None, top_p=None,
                          top_k=None)  # (B, P + N)
    answers = []
    for row in out[:, P:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
        answers.append((row if cut is None else row[:cut], cut is not None))
    return answers


def _answer(target, tokenizer, examples, todo, keys, cache_path, identity, fresh, batch_size, progress, results,
            stats) -> None:
    """Generate the `todo` answers in batches of similar prompt lengths, appending each batch to the cache as it
    finishes; fills `results` and `stats` in place."""

    todo.sort()  # similar lengths share a batch: less padding
    pad_id, eos_ids, eos = _pad_id(target, tokenizer), _eos_ids(target, tokenizer), tokenizer.eos_token or ""
    was_training = target.training
    target.eval()
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="answering with the target", unit="prompt", disable=not progress)
    with _open_for_append(cache_path, identity, fresh) as f:
        for b in range(0, len(todo), batch_size):
            batch = todo[b: b + batch_size]
            answers = greedy_batch(target, [ids for _, _, ids, _ in batch], max(x[3] for x in batch), pad_id,
                                   eos_ids)
            for (_, i, _, limit), (new, stopped) in zip(batch, answers):
                stopped = stopped and len(new) < limit  # the EOS itself must fit in the limit
                new = new[:limit]
                answer = tokenizer.decode(new, skip_special_tokens=False)
                f.write(json.dumps({"index": i, "key": keys[i], "answer": answer, "tokens": len(new),
                                    "eos": stopped}) + "\n")
                results[i] = with_answer(examples[i], answer, eos)
                stats["new_tokens"] += len(new)
                stats["eos"] += int(stopped)
            f.flush()
            stats["generated"] += len(batch)
            stats["seconds"] = time.perf_counter() - start
            stats["tokens_per_s"] = stats["new_tokens"] / max(stats["seconds"], 1e-9)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{stats['tokens_per_s']:.1f}")
    bar.close()
    target.train(was_training)


def regenerate(target, tokenizer, examples: list[dict], indices, cache_path: str | os.PathLike, *, max_length: int,
               batch_size: int = 8, progress: bool = True, fresh: bool = False, log=None,
               answer_tokens: int | None = None):
    """Answer `examples[i]` for i in `indices` with the target; return ({i: answered example}, stats).

    Indices whose prompt has `max_length` tokens or more are left out of the result. An answer has at most
    `answer_tokens` new tokens (None: up to max_length). Finished answers are read
    from / appended to `cache_path` (see the module docstring); `fresh` starts the cache over.
    stats: {"answered", "cached", "generated", "too_long", "new_tokens", "seconds", "tokens_per_s", "eos"}."""

    cache_path = Path(cache_path)
    identity = target_identity(target)
    done = {} if fresh else read_cache(cache_path, identity)
    eos = tokenizer.eos_token or ""
    todo, results, too_long = [], {}, 0
    keys = {}
    for i in indices:
        text = prompt_text(tokenizer, examples[i])
        ids = prompt_ids(tokenizer, examples[i])
        limit = max_length - len(ids)
        if limit < 1:
            too_long += 1
            continue
        limit = min(limit, answer_tokens or limit)
        keys[i] = key = record_key(identity, text, limit)
        rec = done.get(i)
        if rec is not None and rec.get("key") == key:
            results[i] = with_answer(examples[i], rec["answer"], eos)
        else:
            todo.append((len(ids), i, ids, limit))
    stats = {"answered": 0, "cached": len(results), "generated": 0, "too_long": too_long, "new_tokens": 0,
             "seconds": 0.0, "tokens_per_s": 0.0, "eos": 0}
    if todo:
        _answer(target, tokenizer, examples, todo, keys, cache_path, identity, fresh, batch_size, progress, results,
                stats)
        if log:
            log(f"answered {stats['generated']} prompts with the target: {stats['new_tokens']} tokens in "
                f"{stats['seconds']:.1f} s ({stats['tokens_per_s']:.1f} tokens/s), {stats['eos']} ended with EOS")
    stats["answered"] = len(results)
    return results, stats


def cached_answer_examples(cfg, tokenizer, cache_path: str | os.PathLike):
    """(examples, SourceInfo) of `data.load_examples(cfg)` with the answers of an existing answer cache in place
    (optionally .xz-compressed, e.g. one brought back from another machine), None where an example has none;
    no target needed. The form `data.build_dataset(..., examples=...)` takes."""

    eos = tokenizer.eos_token or ""
    examples, source = load_examples(cfg, eos)
    opener = lzma.open if str(cache_path).endswith(".xz") else open
    with opener(cache_path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][1:]  # (the first line is the header)
    out = [None] * len(examples)
    for rec in records:
        out[rec["index"]] = with_answer(examples[rec["index"]], rec["answer"], eos)
    return out, source


def self_distill_examples(cfg, tokenizer, target, cache_path, *, batch_size: int = 8, progress: bool = True,
                          fresh: bool = False, log=None):
    """`data.load_examples(cfg)` with answers from the target, for `data.build_dataset(..., examples=...)`.

    Answered: the held-out examples, and the first `cfg.num_samples` training examples (in split order) whose
    prompt fits in `cfg.max_length`. Held-out answers are regenerated too, so held-out agreement measures the
    head on the target's own outputs (what acceptance at temperature 0 sees). Every other slot is None, which
    `build_dataset` skips: training never falls back to an original answer. Returns (examples, SourceInfo)."""

    examples, source = load_examples(cfg, tokenizer.eos_token or "")
    heldout, train = split_order(len(examples), cfg.holdout, cfg.seed)
    chosen = list(heldout)
    if cfg.num_samples is None:
        chosen += train
    else:  # the first num_samples training prompts that fit (too-long ones would be dropped by build_dataset)
        fits = 0
        for i in train:
            if fits >= cfg.num_samples:
                break
            if len(prompt_ids(tokenizer, examples[i])) < cfg.max_length:
                chosen.append(i)
                fits += 1
    answered, stats = regenerate(target, tokenizer, examples, chosen, cache_path, max_length=cfg.max_length,
                                 batch_size=batch_size, progress=progress, fresh=fresh, log=log,
                                 answer_tokens=cfg.answer_tokens)
    out = [answered.get(i) for i in range(len(examples))]
    note = (f"answers regenerated by the target for {len(answered)} examples ({stats['cached']} from the cache "
            f"{cache_path}; first user turn of chats only)")
    source = replace(source, notes=[*source.notes, note])  # a copy: load_sharegpt's result is shared
    return out, source
