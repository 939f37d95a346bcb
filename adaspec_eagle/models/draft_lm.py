"""Standalone draft LMs: how a draft is initialised (a registry model or path, a truncation of the target, or a
fresh config of a given size) and checked against its target before any training starts."""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM

from adaspec_eagle import AdaspecError
from adaspec_eagle.models import check_tokenizers_compatible, embedding_rows, load_model

_LAYER_KEY = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def parse_draft_init(spec: str) -> tuple[str, dict]:
    """'layers=4' -> ('layers', {'layers': 4}); 'fresh:hidden=256,layers=4,heads=4' -> ('fresh', {...});
    anything else is a model name or path -> ('model', {'name': spec})."""
    if spec.startswith("layers="):
        value = spec.split("=", 1)[1]
        if not value.isdigit() or int(value) < 1:
            raise AdaspecError(f"draft init {spec!r}: expected layers=N with N >= 1 (e.g. layers=4).")
        return "layers", {"layers": int(value)}
    if spec.startswith("fresh:"):
        fields = {}
        for item in spec[len("fresh:"):].split(","):
            key, _, value = item.partition("=")
            if key not in ("hidden", "layers", "heads", "intermediate") or not value.isdigit() or int(value) < 1:
                raise AdaspecError(f"draft init {spec!r}: expected fresh:hidden=H,layers=L[,heads=A]"
                                   f"[,intermediate=I] with positive integers; bad item {item!r}.")
            fields[key] = int(value)
        if "hidden" not in fields or "layers" not in fields:
            raise AdaspecError(f"draft init {spec!r} needs at least hidden= and layers=.")
        return "fresh", fields
    return "model", {"name": spec}


def _decoder_layer_count(config) -> int:
    return int(config.num_hidden_layers)


def derive_from_target(target, layers: int):
    """A draft made of the target's first `layers` decoder layers, its embeddings, final norm and lm_head
    (copied, so training the draft never touches the target). Works for every family through the config's
    `num_hidden_layers` and the layer index in parameter names."""

    total = _decoder_layer_count(target.config)
    if not 1 <= layers <= total:
        raise AdaspecError(f"--draft layers={layers}: the target has {total} decoder layers; "
                           f"choose 1..{total}.")
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    draft = AutoModelForCausalLM.from_config(cfg, dtype=target.dtype)
    state = {k: v for k, v in target.state_dict().items()
             if not (m := _LAYER_KEY.search(k)) or int(m.group(1)) < layers}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise AdaspecError(f"could not derive a draft from the target: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        draft.tie_weights()
    draft.config._adaspec_source = f"{getattr(target.config, '_adaspec_source', 'target')}[:{layers} layers]"
    return draft.to(target.device).eval()


def fresh_draft(target, hidden: int, layers: int, heads: int | None = None, intermediate: int | None = None):
    """A randomly initialised draft of the target's family and vocabulary at a given size."""

    cfg = copy.deepcopy(target.config)
    heads = heads or max(1, hidden // 64)
    if hidden % heads:
        raise AdaspecError(f"fresh draft: hidden={hidden} is not divisible by heads={heads}.")
    updates = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
               "intermediate_size": intermediate or 4 * hidden}
    if hasattr(cfg, "num_key_value_heads"):
        updates["num_key_value_heads"] = heads
    if hasattr(cfg, "head_dim"):
        updates["head_dim"] = hidden // heads
    for key, value in updates.items():
        setattr(cfg, key, value)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = (cfg.layer_types * layers)[:layers]
    torch.manual_seed(0)
    draft = AutoModelForCausalLM.from_config(cfg, dtype=target.dtype)
    draft.config._adaspec_source = f"fresh(hidden={hidden},layers={layers})"
    return draft.to(target.device).train()


def init_draft(spec: str, target, target_tokenizer, dtype="float32"):
    """Build the draft LM named by `spec` (see `parse_draft_init`) for `target`; refuse before any training
    when its tokenizer differs from the target's."""
    kind, args = parse_draft_init(spec)
    if kind == "layers":
        return derive_from_target(target, args["layers"])
    if kind == "fresh":
        return fresh_draft(target, args["hidden"], args["layers"], args.get("heads"), args.get("intermediate"))
    draft, draft_tok = load_model(args["name"], dtype=dtype, device=target.device)
    check_tokenizers_compatible(target_tokenizer, draft_tok,
                                embedding_rows(target), embedding_rows(draft),
                                target_name=f"target {getattr(target.config, '_adaspec_source', '')!r}",
                                draft_name=f"draft {args['name']!r}")
    return draft
