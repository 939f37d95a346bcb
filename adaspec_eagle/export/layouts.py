"""Export heads to the checkpoint layouts that EAGLE's `EaModel`, SGLang and vLLM load,
and the `adaspec-eagle export` subcommand. Import (any of these layouts -> our head) is `heads.load_head`.

An export is a pure rename/reshape of a saved head folder (config.json + weights): no target model is loaded
unless `--with-embeddings` asks for its embedding. What each format writes:

| format | head      | architectures          | fc.bias                                   | files              |
|--------|-----------|------------------------|-------------------------------------------|--------------------|
| eagle  | EAGLE-1/2 | LlamaForCausalLM       | as trained; config "bias" tells EaModel   | safetensors + .bin |
| eagle3 | EAGLE-3   | LlamaForCausalLMEagle3 | none                                      | safetensors + .bin |
| sglang | EAGLE-1/2 | LlamaForCausalLMEagle  | always (zeros if trained without)         | model.safetensors  |
| sglang | EAGLE-3   | LlamaForCausalLMEagle3 | none                                      | model.safetensors  |
| vllm   | EAGLE-1/2 | LlamaForCausalLM (*)   | folded into layer 0's attention biases    | model.safetensors  |
| vllm   | EAGLE-3   | LlamaForCausalLMEagle3 | none                                      | model.safetensors  |

(*) vLLM's EAGLEConfig renames it EagleLlamaForCausalLM (llama_eagle.py, whose fc has no bias and which drops
an fc.bias silently). `LlamaForCausalLMEagle` would become `EagleLlamaForCausalLMEagle`, which vLLM does not know.

Config keys the engines read by accident: vLLM's and SGLang's Llama layers build q/k/v/o biases when `bias` (or
`attention_bias`) is true, so only the `eagle` layout (whose `bias` EAGLE's EaModel reads as the fc's) may say
true. The vLLM fold is exact because EAGLE-1's layer 0 has no input norm: fc(x) + b enters attention directly,
so q/k/v_proj(h + b) = q/k/v_proj(h) + W·b, and the residual's b is added back by o_proj's bias.
An EAGLE-3 head whose draft vocabulary is the whole target vocabulary is written in target order without
d2t/t2d (vLLM refuses the pair then, EAGLE deletes it); `target_hidden_size` is written only where it differs
from `hidden_size` (EAGLE skips loading the target's embedding when the key is present).
EAGLE-3 fused layers: the engines' default (2, N//2, N-3) HF hidden_states is written as nothing; other layers go
to eagle_config.eagle_aux_hidden_state_layer_ids in each engine's own numbering (vLLM: layer input, SGLang: output).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaspec_eagle import AdaspecError
from adaspec_eagle.io import MARKER, atomic_folder, check_output_folder, disk_errors
from adaspec_eagle.models import check_target_identity, load_model
from adaspec_eagle.models.heads import infer_kind, read_head_config, read_weights

FORMATS = ("eagle", "eagle3", "sglang", "vllm")
KIND_NAMES = {"eagle1": "EAGLE-1/2", "eagle3": "EAGLE-3"}

# (format, kind) -> (architecture, fc.bias policy: "keep" | "always" | "fold" | None for EAGLE-3)
LAYOUTS = {
    ("eagle", "eagle1"): ("LlamaForCausalLM", "keep"),
    ("sglang", "eagle1"): ("LlamaForCausalLMEagle", "always"),
    ("vllm", "eagle1"): ("LlamaForCausalLM", "fold"),
    ("eagle3", "eagle3"): ("LlamaForCausalLMEagle3", None),
    ("sglang", "eagle3"): ("LlamaForCausalLMEagle3", None),
    ("vllm", "eagle3"): ("LlamaForCausalLMEagle3", None),
}

REFUSALS = {
    ("eagle3", "eagle1"): "the eagle3 layout needs a 3-layer fused fc [H, 3H], a midlayer with 2H attention input, "
                          "its own norm and lm_head over a draft vocabulary; an EAGLE-1/2 head has none of these. "
                          "Export it with --format eagle, sglang or vllm, or train head.kind=eagle3.",
    ("eagle", "eagle3"): "the EAGLE-1/2 layout reads only the target's last hidden state through a [H, 2H] fc and the "
                         "target's lm_head; an EAGLE-3 head fuses three target layers and has its own lm_head. Export "
                         "it with --format eagle3, sglang or vllm.",
}

MODEL_CARD = """# {title}

An {kind_name} speculative-decoding draft head in the **{fmt}** layout (`architectures: {arch}`),
exported by adaspec-eagle.

| | |
|---|---|
| target | `{target_name}` ({model_type}, hidden {hidden}, vocabulary {vocab}, embedding fingerprint `{fingerprint}`) |
| training data | {data} |
| loss | {loss} |
| measured τ (mean accepted length) | {tau} |
| measured α (acceptance rate) | {alpha} |
| target embedding included | {with_emb} |

Other recorded training facts: {other}

## Load it

{usage}

The head was trained for the target above; loading it on another model of different shapes or vocabulary
fails, and the same model at another precision or quantization loses some acceptance.
"""

USAGE = {
    "eagle": "EAGLE (`pip install eagle-llm`): `EaModel.from_pretrained(base_model_path=TARGET, "
             "ea_model_path=\"{out}\", use_eagle3=False)`. EAGLE-1's original loader is strict and also expects "
             "`embed_tokens.weight`: export with `--with-embeddings` for it.",
    "eagle3": "EAGLE (`pip install eagle-llm`): `EaModel.from_pretrained(base_model_path=TARGET, "
              "ea_model_path=\"{out}\")` (use_eagle3 defaults to True).",
    "sglang": "SGLang: `python -m sglang.launch_server --model-path TARGET --speculative-algorithm {algo} "
              "--speculative-draft-model-path {out} --speculative-num-steps 5 --speculative-eagle-topk 8 "
              "--speculative-num-draft-tokens 32`.",
    "vllm": "vLLM: `vllm serve TARGET --speculative-config '{{\"method\": \"{method}\", \"model\": \"{out}\", "
            "\"num_speculative_tokens\": 5}}'`.",
    "adaspec": "adaspec-eagle: `adaspec-eagle generate --target TARGET --head {out} \"PROMPT\"` "
               "(any of the four layouts loads back with `heads.load_head`).",
}


def convert(state: dict[str, torch.Tensor], config: dict, fmt: str,
            embed_tokens: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Pure: a head's state dict and config.json -> those of `fmt`. Refuses a head the format cannot express."""
    if fmt not in FORMATS:
        raise AdaspecError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}.")
    kind = infer_kind(state)
    if (fmt, kind) in REFUSALS:
        raise AdaspecError(f"cannot export this {KIND_NAMES[kind]} head as {fmt!r}: {REFUSALS[(fmt, kind)]}")
    arch, bias_policy = LAYOUTS[(fmt, kind)]
    out = {k: v.detach().cpu().contiguous() for k, v in state.items() if k != "embed_tokens.weight"}
    cfg = dict(config)
    hidden = int(out["fc.weight"].shape[0])
    cfg.pop("qkv_bias", None)  # vLLM and EAGLE read it before attention_bias; these layers have no such biases
    cfg.update(attention_bias=False, mlp_bias=False)
    if kind == "eagle1":
        _eagle1_layout(out, cfg, fmt, bias_policy, hidden)
    else:
        _eagle3_layout(out, cfg, fmt, hidden)
    if embed_tokens is not None:
        vocab = int(cfg.get("vocab_size", embed_tokens.shape[0]))
        if tuple(embed_tokens.shape) != (vocab, hidden):
            raise AdaspecError(f"embedding of shape {tuple(embed_tokens.shape)} does not fit this head "
                               f"(vocabulary {vocab}, hidden {hidden}); pass the head's own target.")
        out["embed_tokens.weight"] = embed_tokens.detach().cpu().to(out["fc.weight"].dtype).contiguous()
    cfg.update(architectures=[arch], model_type="llama", num_hidden_layers=1, tie_word_embeddings=False)
    cfg.setdefault("torch_dtype", str(out["fc.weight"].dtype).replace("torch.", ""))
    adaspec = dict(cfg.get("adaspec") or {})
    adaspec["export"] = {"format": fmt, "architecture": arch, "with_embeddings": embed_tokens is not None}
    cfg["adaspec"] = adaspec
    return out, cfg


def _eagle1_layout(out: dict, cfg: dict, fmt: str, bias_policy: str, hidden: int) -> None:
    """In place: the fc bias as the format holds it, and `bias` as each engine reads it."""
    bias = out.get("fc.bias")
    if bias_policy == "always" and bias is None:
        out["fc.bias"] = torch.zeros(hidden, dtype=out["fc.weight"].dtype)  # fc(x) unchanged
    if bias_policy == "fold" and bias is not None:
        if bias.abs().max().item() > 0:
            fold_fc_bias(out)
            cfg["attention_bias"] = True
        out.pop("fc.bias", None)
    # EAGLE's EaModel builds fc with config["bias"] (default True); vLLM and SGLang read it as attention bias
    cfg["bias"] = fmt == "eagle" and "fc.bias" in out


def _eagle3_layout(out: dict, cfg: dict, fmt: str, hidden: int) -> None:
    """In place: the draft vocabulary map (none for the whole vocabulary), target_hidden_size only where it
    differs, and non-default fused layers in each engine's numbering."""
    if "fc.bias" in out:
        raise AdaspecError("this EAGLE-3 head has an fc.bias, which EAGLE-3 loaders do not have; re-train it "
                           "without one.")
    out["d2t"], out["t2d"] = out["d2t"].to(torch.int64), out["t2d"].to(torch.bool)
    if out["t2d"].all():  # the whole vocabulary: lm_head rows in target order, no mapping
        order = torch.empty_like(out["d2t"])
        order[torch.arange(out["d2t"].numel()) + out["d2t"]] = torch.arange(out["d2t"].numel())
        out["lm_head.weight"] = out["lm_head.weight"][order].contiguous()
        del out["d2t"], out["t2d"]
    cfg["draft_vocab_size"] = int(out["lm_head.weight"].shape[0])
    cfg["bias"] = False  # SGLang builds the EAGLE-3 fc with config.bias; vLLM reads it as attention bias
    target_hidden = int(out["fc.weight"].shape[1]) // 3
    cfg.pop("target_hidden_size", None)
    if target_hidden != hidden:
        cfg["target_hidden_size"] = target_hidden
    adaspec = cfg.get("adaspec") or {}
    layer_ids, n = adaspec.get("target_layer_ids"), (adaspec.get("target") or {}).get("num_hidden_layers")
    if layer_ids:  # ours, as HF hidden_states indices; a foreign head's eagle_config passes through as is
        cfg.pop("eagle_config", None)
    if layer_ids and n and list(layer_ids) != [2, n // 2, n - 3]:
        # Engines default to HF hidden_states (2, N//2, N-3); for other layers each names them its own way:
        # vLLM by the decoder layer the state enters (= HF index), SGLang by the layer that produced it (-1).
        if fmt == "eagle3":
            raise AdaspecError(f"EAGLE's EaModel always fuses target layers (2, N//2, N-3); this head fuses "
                               f"{layer_ids}. Export it with --format sglang or vllm.")
        ids = list(layer_ids) if fmt == "vllm" else [i - 1 for i in layer_ids]
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True}


def fold_fc_bias(state: dict[str, torch.Tensor]) -> None:
    """EAGLE-1 layer 0 without fc.bias: q/k/v biases W·b and o_proj bias b give the same output (no input norm
    in that layer), for layouts whose fc has no bias (vLLM). In place; float64 products, stored in the weights'
    dtype."""
    b = state.pop("fc.bias")
    prefix = "layers.0.self_attn."
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = state[prefix + name + ".weight"]
        state[prefix + name + ".bias"] = (weight.double() @ b.double()).to(weight.dtype)
    state[prefix + "o_proj.bias"] = b.clone()


def model_card(cfg: dict, fmt: str, out: str) -> str:
    adaspec = cfg.get("adaspec") or {}
    target, meta = adaspec.get("target") or {}, dict(adaspec.get("meta") or {})
    kind = adaspec.get("kind") or ("eagle3" if "draft_vocab_size" in cfg else "eagle1")

    def pop(*keys, default="not recorded"):
        for key in keys:
            if meta.get(key) is not None:
                value = meta.pop(key)
                return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        return default

    loss = pop("loss", "loss_kind")
    details = [f"{key}={meta.pop(key)}" for key in ("k", "divergence", "stage") if meta.get(key) is not None]
    if details:
        loss += f" ({', '.join(details)})"
    usage = [USAGE[fmt].format(out=out, algo="EAGLE3" if kind == "eagle3" else "EAGLE",
                               method="eagle3" if kind == "eagle3" else "eagle"), USAGE["adaspec"].format(out=out)]
    return MODEL_CARD.format(
        title=f"{KIND_NAMES[kind]} head for {target.get('name', 'an unrecorded target')}", kind_name=KIND_NAMES[kind],
        fmt=fmt, arch=cfg["architectures"][0], target_name=target.get("name", "not recorded"),
        model_type=target.get("model_type", "?"), hidden=target.get("hidden_size", cfg.get("hidden_size")),
        vocab=target.get("vocab_size", cfg.get("vocab_size")), fingerprint=target.get("fingerprint", "?"),
        data=pop("data", "dataset", "training_data"), loss=loss,
        tau=pop("tau", "mean_accepted_length"), alpha=pop("alpha", "acceptance_rate"),
        with_emb="yes" if (adaspec.get("export") or {}).get("with_embeddings") else "no (the target's is used)",
        other=json.dumps(meta, default=str) if meta else "none", usage="\n\n".join(f"- {u}" for u in usage))


def export_head(head_folder, fmt: str, out, with_embeddings: bool = False, target: str | None = None,
                force: bool = False) -> Path:
    """Read a head folder (ours or any supported layout), convert it to `fmt`, write `out` atomically:
    config.json, model.safetensors (+ pytorch_model.bin for EAGLE's formats) and README.md.

    with_embeddings: include `embed_tokens.weight`, from `target` (a registry name / path, loaded and checked
    against the recorded identity) or else from the source folder when it has one."""

    out = Path(out)
    if Path(head_folder).resolve() == out.resolve():
        raise AdaspecError(f"--out {str(out)!r} is the head folder itself; export into another folder.")
    check_output_folder(out, replace=force, flag="--force")
    if out.exists() and any(p.name != MARKER for p in out.iterdir()) and not force:
        raise AdaspecError(f"output folder {str(out)!r} exists and is not empty; choose another --out or pass --force "
                           "to replace the export there.")
    config, state = read_head_config(head_folder), read_weights(head_folder)
    if not config:
        raise AdaspecError(f"head folder {str(head_folder)!r} has no config.json, and an export needs the head's "
                           "hidden size, vocabulary and attention shapes from it; export from the folder "
                           "train-head or save_head wrote (it has config.json next to the weights).")
    embed = None
    if with_embeddings:
        if target is not None:

            model = load_model(target, with_tokenizer=False)
            recorded = (config.get("adaspec") or {}).get("target")
            if recorded:
                check_target_identity(recorded, model, what=f"head {str(head_folder)!r}")
            embed = model.get_input_embeddings().weight
        elif "embed_tokens.weight" in state:
            embed = state["embed_tokens.weight"]
        else:
            raise AdaspecError("--with-embeddings needs the target's embedding: pass --target NAME_OR_PATH (the "
                               "model the head was trained for).")
    tensors, cfg = convert(state, config, fmt, embed)
    kept = "An earlier export there is intact." if out.exists() else "Nothing was written."
    with disk_errors("the exported head", out, kept), atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if fmt in ("eagle", "eagle3"):  # EAGLE's EaModel tries pytorch_model.bin first
            torch.save(tensors, tmp / "pytorch_model.bin")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, fmt, str(out)))
        (tmp / MARKER).write_text(json.dumps({"made_by": "adaspec-eagle", "command": "export"}) + "\n")
    return out


def cmd_export(args) -> int:
    out = export_head(args.head, args.format, args.out, with_embeddings=args.with_embeddings, target=args.target,
                      force=args.force)
    cfg = json.loads((out / "config.json").read_text())
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {args.head} -> {out} ({args.format}: {cfg['architectures'][0]}; {files})")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("export", help="export a trained head to the EAGLE, EAGLE-3, SGLang or vLLM layout",
                       description="Write a head folder in the layout an inference engine loads. EAGLE-1/2 heads "
                                   "export to eagle / sglang / vllm, EAGLE-3 heads to eagle3 / sglang / vllm.")
    p.add_argument("head", help="head folder (config.json + model.safetensors or pytorch_model.bin)")
    p.add_argument("--format", required=True, choices=FORMATS, help="target engine layout")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--with-embeddings", action="store_true",
                   help="also write the target's embedding as embed_tokens.weight (EAGLE-1's strict loader)")
    p.add_argument("--target", default=None, help="target model (registry name / path) for --with-embeddings")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_export)
