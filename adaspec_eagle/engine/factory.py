"""One way to name and build a drafter, shared by `generate`, `bench` and the Python API:

    head:PATH            an EAGLE-1/2 or EAGLE-3 head folder (ours or any exported / published layout)
    draft-lm:NAME        a draft LM: a registry name, a folder, or layers=N (the target's first N layers)
    lookup:N             prompt lookup, N tokens a step (no model)

optionally prefixed by a label, LABEL=SPEC (e.g. adaspec=head:runs/demo/adaspec).

    from adaspec_eagle.engine.factory import make_drafter
    drafter, _ = make_drafter("head:heads/smollm2-135m-kd", target, tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import MAX_LOOKUP_TOKENS
from adaspec_eagle.engine import speculative
from adaspec_eagle.models.draft_lm import init_draft
from adaspec_eagle.models.heads import load_head


@dataclass
class DrafterSpec:
    label: str
    kind: str  # head | draft-lm | lookup
    source: str


def parse_drafter(spec: str) -> DrafterSpec:
    label = None
    left, eq, right = spec.partition("=")
    if eq and ":" not in left:  # "adaspec=head:heads/x"; "draft-lm:layers=4" has its ':' before the '='
        label, spec = left, right
    kind, colon, source = spec.partition(":")
    if not colon or kind not in ("head", "draft-lm", "lookup") or not source:
        raise AdaspecError(f"--drafter {spec!r}: expected head:PATH, draft-lm:NAME_OR_PATH (a registry name, "
                           "a folder, or layers=N for the target's first N layers) or lookup:N (prompt lookup, N "
                           "tokens a step), optionally LABEL=... first.")
    if kind == "lookup" and not (source.isdigit() and 1 <= int(source) <= MAX_LOOKUP_TOKENS):
        raise AdaspecError(f"--drafter {spec!r}: lookup:N takes the number of lookup tokens a step, "
                           f"1..{MAX_LOOKUP_TOKENS}.")
    return DrafterSpec(label or f"{kind}:{Path(source.rstrip('/')).name or source}", kind, source)


def make_drafter(spec: DrafterSpec | str, target, tokenizer, dtype: str = "float32",
                 draft_vocab: int | str | None = "auto"):
    """A drafter spec (or its string) -> (engine drafter, draft LM model or None). The draft LM also serves
    transformers' assisted generation. draft_vocab: an EAGLE-1/2 head's frequency-restricted draft vocabulary
    (`speculative.HeadDrafter`)."""

    if isinstance(spec, str):
        spec = parse_drafter(spec)
    if spec.kind == "lookup":
        return speculative.LookupDrafter(), None
    if spec.kind == "head":

        return speculative.HeadDrafter(load_head(spec.source, target), draft_vocab=draft_vocab), None

    draft = init_draft(spec.source, target, tokenizer, dtype=dtype).eval()
    return speculative.DraftLMDrafter(draft), draft
