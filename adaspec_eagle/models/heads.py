"""EAGLE-style draft heads on a frozen target: the EAGLE-1/2 head (`EagleHead`) and the EAGLE-3 head
(`Eagle3Head`), built from transformers' own Llama layer classes, plus saving and loading them.

Both heads are Llama-style at the target's hidden size whatever the target family (the head never runs the
target's own layers). Parameter names are exactly the engines' checkpoint keys (`export.layouts`), so `state_dict()`
is the EAGLE / EAGLE-3 layout and export is a rename at most.

The target's input embedding (both heads) and `lm_head` (EAGLE-1) are *referenced, not owned*: they are kept in
a plain holder attribute (`_TargetRef`), so they are not parameters, buffers or state-dict entries of the head.
Consequences: `head.state_dict()` holds only head weights; optimizers, DDP/FSDP (`accelerate.prepare(head)`) and
saving see only the head; `copy.deepcopy(head)` shares the target; `head.to(device)` does not move the target
(move the target yourself; `embed`/`logits` move activations to the target module's device and back). The target
modules are called as modules, so hooks of a sharded target (e.g. ZeRO-3 parameter gathering) still run; no
gradient reaches them.

Forward contract (INTERFACES.md): `head(hidden_in (B,T,H), input_ids (B,T), position_ids=None,
attention_mask=None, cache=None) -> hidden_out (B,T,H)`; `head.logits(hidden_out) -> (B,T,V_target)`.
attention_mask: None (causal, offset by the cache length), a 2-D (B, P+T) padding mask (1 = real token, combined
with causal), or a 4-D (B|1, 1, T, P+T) mask: bool or integer (True/1 = attend) or additive float (0 / -inf).
cache: a transformers `DynamicCache`; the head's single layer is layer 0 of it. position_ids: (B, T) or (T,);
default past .. past+T-1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from adaspec_eagle import AdaspecError
from adaspec_eagle.io import atomic_folder, atomic_write, fsync_dir, read_text
from adaspec_eagle.models import (
    check_target_identity,
    embedding_rows,
    feature_layer_ids,
    target_identity,
)

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Head config from any target family


def _first_attr(cfg, names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def head_config(target_config, vocab_size: int, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The head's LlamaConfig at the target's hidden size, for any family (Llama, Qwen2, Phi, GPT-NeoX, CodeGen).

    Heads and KV heads follow the target (KV heads = heads where the family has no GQA); the MLP width is the
    target's intermediate size (CodeGen's `n_inner`, 4H when unset); RoPE theta and scaling come from the target
    when it is RoPE-based (partial rotary is not copied: the head rotates its full head_dim)."""
    hidden = int(target_config.hidden_size)
    heads = int(_first_attr(target_config, ("num_attention_heads", "n_head")))
    if hidden % heads:
        raise AdaspecError(f"target hidden_size {hidden} is not divisible by its {heads} attention heads.")
    kv_heads = int(_first_attr(target_config, ("num_key_value_heads",), heads))
    intermediate = int(_first_attr(target_config, ("intermediate_size", "n_inner"), 4 * hidden))
    eps = float(_first_attr(target_config, ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"), 1e-6))
    max_pos = int(_first_attr(target_config, ("max_position_embeddings", "n_positions"), 4096))
    rope = dict(getattr(target_config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", _first_attr(target_config, ("rope_theta", "rotary_emb_base"), 10000.0)))
    rope_parameters = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
    rope_parameters.update(rope_type=rope.get("rope_type", "default"), rope_theta=theta)
    eos = _id_list(getattr(target_config, "eos_token_id", None))
    cfg = LlamaConfig(
        vocab_size=int(vocab_size), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, hidden_act="silu",
        max_position_embeddings=max_pos, rms_norm_eps=eps, rope_parameters=rope_parameters,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=getattr(target_config, "bos_token_id", None),
        pad_token_id=getattr(target_config, "pad_token_id", None),
        eos_token_id=(eos[0] if len(eos) == 1 else eos) or None)
    set_attn_implementation(cfg, attn_implementation)
    return cfg


def set_attn_implementation(cfg: LlamaConfig, name: str) -> None:
    """'sdpa' or 'eager'; both take a 4-D mask (converted to the form each expects in `prepare_mask`)."""
    if name not in ("sdpa", "eager"):
        raise AdaspecError(f"attention implementation {name!r} is not supported by the heads; use 'sdpa' or 'eager'.")
    cfg._attn_implementation = name


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: masks and positions


def default_position_ids(batch: int, length: int, past: int, device) -> torch.Tensor:
    """(B, T) positions past .. past+T-1."""
    return torch.arange(past, past + length, device=device).unsqueeze(0).expand(batch, length)


def prepare_mask(attention_mask, batch: int, length: int, past: int, dtype: torch.dtype, device,
                 attn_implementation: str):
    """Turn the caller's mask into what the attention function expects: (B|1, 1, T, P+T) bool for sdpa,
    additive float (0 / dtype min) for eager, or None for sdpa's own causal path (no past, no mask)."""
    total = past + length
    if attention_mask is None:
        if attn_implementation == "sdpa" and (past == 0 or length == 1):
            return None  # sdpa: is_causal for T > 1, full attention over the cache for T == 1
        q = torch.arange(length, device=device)[:, None] + past
        mask = (torch.arange(total, device=device)[None, :] <= q)[None, None]  # (1, 1, T, P+T)
    elif attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, total):
            raise AdaspecError(f"2-D attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + "
                               f"length) = ({batch}, {total}).")
        q = torch.arange(length, device=device)[:, None] + past
        keys = torch.arange(total, device=device)[None, :]
        causal = keys <= q  # (T, P+T)
        mask = causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = mask | (keys == q)[None, None]  # a padded query sees itself: no all-masked row (NaN in sdpa)
    elif attention_mask.dim() == 4:
        b, one, t, k = attention_mask.shape
        if b not in (1, batch) or one != 1 or t != length or k != total:
            raise AdaspecError(f"4-D attention_mask has shape {tuple(attention_mask.shape)}; expected "
                               f"({batch} or 1, 1, {length}, {total}) = (batch, 1, length, past + length).")
        mask = attention_mask.to(device)
        if not mask.is_floating_point():
            mask = mask.bool()  # integer 1/0 masks mean attend / not, like bool ones
    else:
        raise AdaspecError(f"attention_mask must be None, 2-D (B, P+T) or 4-D (B, 1, T, P+T); got "
                           f"{attention_mask.dim()}-D.")
    if mask.dtype == torch.bool:
        if attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask
    return mask.to(dtype)


def _cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def _run_layer(layer: LlamaDecoderLayer, attn_input, residual, position_embeddings, mask, cache):
    """One decoder layer from its submodules: residual + attn(attn_input), then the pre-norm MLP block.
    self_attn is called positionally (hidden, position_embeddings, mask, cache) so the cache reaches it both in
    transformers 5.17 (`past_key_values=`) and 5.24 (`cache=`)."""
    attn_out, _ = layer.self_attn(attn_input, position_embeddings, mask, cache)  # (B, T, H)
    hidden = residual + attn_out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))  # (B, T, H)


# ----------------------------------------------------------------------------------------------------------
# Heads


class _TargetRef:
    """The target modules a head uses without owning them: not registered with the head, and shared (not
    copied) by `copy.deepcopy(head)`, e.g. when a trainer snapshots a head."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def __deepcopy__(self, memo):
        return self


class _HeadBase(nn.Module):
    """What both heads share: the referenced target embedding, rotary positions, mask handling."""

    kind = ""
    uses_fused = False

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Module):
        super().__init__()
        self.config = config
        self._target = _TargetRef(embed_tokens)  # referenced, not registered (see the module docstring)
        self.rotary_emb = LlamaRotaryEmbedding(config)  # only non-persistent buffers: not in the state dict
        self._inv_freq_fp32 = self.rotary_emb.inv_freq.detach().clone()
        self.target_identity = None  # set by build_head / load_head; recorded by save_head
        self.target_layer_ids = None  # EAGLE-3: HF hidden_states indices fused by `project`

    def _apply(self, fn, *args, **kwargs):
        # `.to(bf16)` would round the RoPE frequencies; keep them fp32 (HF computes RoPE in fp32 too).
        out = super()._apply(fn, *args, **kwargs)
        rot = self.rotary_emb
        if rot.inv_freq.dtype != torch.float32:
            rot.inv_freq = self._inv_freq_fp32.to(rot.inv_freq.device)
            rot.original_inv_freq = self._inv_freq_fp32.to(rot.inv_freq.device)
        return out

    @property
    def target_embed(self) -> nn.Module:
        return self._target.modules[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) frozen target embeddings, on the head's device and dtype."""
        emb = self.target_embed
        weight = getattr(emb, "weight", None)
        with torch.no_grad():
            out = emb(input_ids.to(weight.device) if weight is not None else input_ids)
        return out.to(device=self.fc.weight.device, dtype=self.dtype)

    def _positions_and_mask(self, hidden, position_ids, attention_mask, cache):
        batch, length = hidden.shape[:2]
        past = _cache_length(cache)
        if position_ids is None:
            position_ids = default_position_ids(batch, length, past, hidden.device)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(batch, length)
        position_embeddings = self.rotary_emb(hidden, position_ids.to(hidden.device))  # (cos, sin) (B, T, D)
        mask = prepare_mask(attention_mask, batch, length, past, hidden.dtype, hidden.device,
                            self.config._attn_implementation)
        return position_embeddings, mask

    def set_attn_implementation(self, name: str) -> None:
        set_attn_implementation(self.config, name)


class EagleHead(_HeadBase):
    """EAGLE-1/2: hidden_out = Layer(fc(cat[embed(x_{t+1}), f_t])), logits = target lm_head(hidden_out).

    f_t is the target's last hidden state after its final norm (or the head's own previous output while
    drafting). Layer 0 has no input_layernorm (EAGLE's layout): the key does not exist. No final norm."""

    kind = "eagle1"

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Module, lm_head: nn.Module, fc_bias: bool = True):
        super().__init__(config, embed_tokens)
        self._target = _TargetRef(embed_tokens, lm_head)
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        layer = LlamaDecoderLayer(config, layer_idx=0)
        layer.input_layernorm = nn.Identity()
        self.layers = nn.ModuleList([layer])

    @property
    def target_lm_head(self) -> nn.Module:
        return self._target.modules[1]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """EAGLE-1 reads the target's last hidden state as is: (B, T, H) -> (B, T, H)."""
        return features.to(self.dtype)

    def forward(self, hidden_in, input_ids, position_ids=None, attention_mask=None, cache=None):
        hidden_in = hidden_in.to(self.dtype)  # (B, T, H)
        x = self.fc(torch.cat([self.embed(input_ids), hidden_in], dim=-1))  # (B, T, 2H) -> (B, T, H)
        pos, mask = self._positions_and_mask(x, position_ids, attention_mask, cache)
        layer = self.layers[0]
        return _run_layer(layer, layer.input_layernorm(x), x, pos, mask, cache)  # (B, T, H)

    def logits(self, hidden_out: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, V_target) through the frozen target lm_head (gradient flows to hidden only)."""
        head = self.target_lm_head
        weight = head.weight
        hidden = hidden_out.to(device=weight.device, dtype=weight.dtype)
        if weight.requires_grad and torch.is_grad_enabled():  # a target left trainable: never train it from here
            bias = getattr(head, "bias", None)
            return F.linear(hidden, weight.detach(), None if bias is None else bias.detach())
        return head(hidden)


class Eagle3Head(_HeadBase):
    """EAGLE-3: hidden_in = fc(cat[h_low, h_mid, h_high]) of the target (HF hidden_states at
    `feature_layer_ids`, unnormalized); the midlayer attends over cat[input_layernorm(embed(x_{t+1})),
    hidden_norm(hidden_in)] (2H) with the residual on hidden_in; logits = lm_head(norm(hidden_out)) over a draft
    vocabulary mapped back to target ids by d2t (target = draft + d2t[draft])."""

    kind = "eagle3"
    uses_fused = True

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Module, draft_vocab_size: int):
        super().__init__(config, embed_tokens)
        hidden = config.hidden_size
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        midlayer = LlamaDecoderLayer(config, layer_idx=0)
        attn, head_dim = midlayer.self_attn, config.head_dim
        attn.q_proj = nn.Linear(2 * hidden, config.num_attention_heads * head_dim, bias=False)
        attn.k_proj = nn.Linear(2 * hidden, config.num_key_value_heads * head_dim, bias=False)
        attn.v_proj = nn.Linear(2 * hidden, config.num_key_value_heads * head_dim, bias=False)
        midlayer.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.midlayer = midlayer
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    @property
    def draft_vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def draft_ids(self) -> torch.Tensor:
        """(V_draft,) the target id of each draft id."""
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def project(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, T, 3H) fused target hidden states -> (B, T, H) hidden_in for the first draft step."""
        return self.fc(fused.to(self.dtype))

    def forward(self, hidden_in, input_ids, position_ids=None, attention_mask=None, cache=None):
        hidden_in = hidden_in.to(self.dtype)  # (B, T, H)
        layer = self.midlayer
        attn_input = torch.cat([layer.input_layernorm(self.embed(input_ids)), layer.hidden_norm(hidden_in)], -1)
        pos, mask = self._positions_and_mask(hidden_in, position_ids, attention_mask, cache)
        return _run_layer(layer, attn_input, hidden_in, pos, mask, cache)  # (B, T, H)

    def draft_logits(self, hidden_out: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, V_draft) logits over the draft vocabulary (cheap; for training)."""
        return self.lm_head(self.norm(hidden_out))

    def logits(self, hidden_out: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, V_target): draft logits scattered to their target ids, -inf elsewhere."""
        return draft_to_target_logits(self.draft_logits(hidden_out), self.draft_ids, self.config.vocab_size)


def draft_to_target_logits(draft_logits: torch.Tensor, draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., V_draft) -> (..., V) with non-draft ids at -inf (differentiable w.r.t. draft_logits)."""
    return to_vocab(draft_logits, draft_ids, vocab_size)


def build_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int,
                      keep_ids=()) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's draft vocabulary: the `draft_vocab_size` most frequent target ids (ties to the lower id), always
    including `keep_ids` (EOS and friends), sorted by id.

    token_counts: (V,) counts over the training data. Returns d2t (V_draft,) int64 with
    target = draft + d2t[draft], and t2d (V,) bool marking the target ids in the draft vocabulary."""
    counts = torch.as_tensor(token_counts).flatten().to(torch.float64)
    vocab = counts.numel()
    size = min(int(draft_vocab_size), vocab)
    keep = sorted({int(i) for i in keep_ids if 0 <= int(i) < vocab})
    if size < len(keep):
        raise AdaspecError(f"draft_vocab_size {size} cannot hold the {len(keep)} ids that must be kept {keep}.")
    order = torch.argsort(-counts, stable=True)  # most frequent first, lower id first on ties
    if keep:
        is_kept = torch.zeros(vocab, dtype=torch.bool)
        is_kept[keep] = True
        order = torch.cat([torch.tensor(keep, dtype=torch.long), order[~is_kept[order]]])
    chosen = torch.sort(order[:size]).values  # (V_draft,) target ids, ascending
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    d2t = chosen - torch.arange(size)
    return d2t.to(torch.int64), t2d


def frequent_ids(config, token_counts: torch.Tensor, size: int) -> torch.Tensor:
    """(min(size, V),) int64 target ids, ascending: the `size` most frequent of `token_counts` plus the ids a
    draft vocabulary always keeps (`always_drafted_ids(config)`). The EAGLE-1/2 restricted vocabulary, the same
    for drafting (`speculative.HeadDrafter(draft_vocab=size)`) and training (`head.train_vocab_size`)."""
    d2t, _ = build_draft_vocab(token_counts, size, always_drafted_ids(config))  # drops ids >= vocab
    return torch.arange(d2t.numel()) + d2t


def always_drafted_ids(config, generation_config=None, extra=()) -> list[int]:
    """The ids a draft vocabulary always keeps, whatever their frequency: the config's EOS / BOS / PAD, the
    generation config's EOS and `extra`."""
    return [*_id_list(config.eos_token_id), *_id_list(config.bos_token_id), *_id_list(config.pad_token_id),
            *_id_list(getattr(generation_config, "eos_token_id", None)), *(int(i) for i in extra)]


def build_head(target_model, head_cfg, token_counts=None, attn_implementation: str = "sdpa", keep_ids=()):
    """A fresh head for `target_model` (fp32 parameters, default init of the Llama modules).

    head_cfg: `config.HeadConfig`. token_counts (V,) sets the EAGLE-3 draft vocabulary (`build_draft_vocab`,
    always keeping the EOS/BOS/PAD ids of the target's config and generation config, plus `keep_ids`, e.g. the
    tokenizer's special tokens); without it the draft vocabulary is the whole target vocabulary."""
    vocab = embedding_rows(target_model)
    cfg = head_config(target_model.config, vocab, attn_implementation)
    embed = target_model.get_input_embeddings()
    if head_cfg.kind == "eagle1":
        lm_head = target_model.get_output_embeddings()
        if lm_head is None:
            raise AdaspecError(f"target {type(target_model).__name__} has no output embedding (lm_head) for an "
                               "EAGLE-1 head; use a causal LM.")
        head = EagleHead(cfg, embed, lm_head, fc_bias=head_cfg.fc_bias)
    elif head_cfg.kind == "eagle3":
        keep = always_drafted_ids(cfg, getattr(target_model, "generation_config", None), keep_ids)
        if token_counts is None:
            if head_cfg.draft_vocab_size < vocab:
                warnings.warn(f"no token counts given: the EAGLE-3 draft vocabulary is the whole target vocabulary "
                              f"({vocab}), not head.draft_vocab_size={head_cfg.draft_vocab_size}.", stacklevel=2)
            token_counts = torch.zeros(vocab)
            size = vocab
        else:
            size = head_cfg.draft_vocab_size
            if torch.as_tensor(token_counts).numel() != vocab:
                raise AdaspecError(f"token_counts has {torch.as_tensor(token_counts).numel()} entries but the target "
                                   f"vocabulary has {vocab}; count tokens with the target's tokenizer.")
        d2t, t2d = build_draft_vocab(token_counts, size, keep)
        head = Eagle3Head(cfg, embed, draft_vocab_size=d2t.numel())
        head.set_draft_vocab(d2t, t2d)
    else:
        raise AdaspecError(f"unknown head kind {head_cfg.kind!r}; use 'eagle1' or 'eagle3'.")
    if head.uses_fused:
        head.target_layer_ids = feature_layer_ids(int(target_model.config.num_hidden_layers))
    head.target_identity = target_identity(target_model)
    return head



def to_vocab(logits: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., Vd) logits over the target ids `vocab_ids` -> (..., vocab_size) with -inf for every other id
    (differentiable w.r.t. `logits`)."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, vocab_ids.to(logits.device), logits)

# ----------------------------------------------------------------------------------------------------------
# Save / load

ARCHITECTURES = {"eagle1": "LlamaForCausalLM", "eagle3": "LlamaForCausalLMEagle3"}


CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
               "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


def head_config_dict(head, architectures: str | None = None) -> dict:
    """The LlamaConfig-compatible config.json of a head (EAGLE / EAGLE-3 layout) without the adaspec section:
    the fields the engines read, each explicit (no reliance on LlamaConfig defaults)."""
    full = head.config.to_dict()
    cfg = {"architectures": [architectures or ARCHITECTURES[head.kind]], "model_type": "llama",
           "num_hidden_layers": 1, "tie_word_embeddings": False,
           **{k: full[k] for k in CONFIG_KEYS if k in full},
           "torch_dtype": str(head.dtype).replace("torch.", "")}
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = float(rope.get("rope_theta", 10000.0))  # what engines on transformers 4 read
    cfg["rope_scaling"] = dict(rope) if rope.get("rope_type", "default") != "default" else None
    if head.kind == "eagle3":
        # The fused layers are recorded as HF hidden_states indices in adaspec.target_layer_ids, not in
        # eagle_config: vLLM and SGLang read eagle_aux_hidden_state_layer_ids one layer apart (export.py).
        cfg["draft_vocab_size"] = head.draft_vocab_size
        cfg["bias"] = False
    else:
        cfg["bias"] = head.fc.bias is not None  # EAGLE's EaModel builds fc with config["bias"]
    return cfg


def unwrap_head(model):
    """The head inside DDP / FSDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(model, _HeadBase):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise AdaspecError(f"{type(model).__name__} is not an EAGLE head (EagleHead / Eagle3Head) or a wrapper "
                               "of one; pass the head built by build_head or load_head.")
        model = inner
    return model


TOKEN_COUNTS_FILE = "token_counts.safetensors"


def _token_counts_bytes(counts) -> bytes:
    counts = torch.as_tensor(counts).flatten().to(torch.int64).contiguous()
    return save({"counts": counts}, metadata={"what": "target-token frequencies of the training data"})


def write_token_counts(folder, counts) -> Path:
    """Add (or replace) a head folder's `token_counts.safetensors`: (V,) counts of the target tokens the head was
    trained on, which rank the frequency-restricted draft vocabulary (`speculative.HeadDrafter(draft_vocab=N)`).
    Written to a temporary file, fsynced and renamed into place."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AdaspecError(f"{str(folder)!r} is not a head folder (no config.json).")
    atomic_write(folder / TOKEN_COUNTS_FILE, _token_counts_bytes(counts))
    fsync_dir(folder)
    return folder / TOKEN_COUNTS_FILE


def read_token_counts(folder) -> torch.Tensor | None:
    """(V,) int64 training-token counts saved with a head, or None for a head without them (e.g. a foreign one)."""
    path = Path(folder) / TOKEN_COUNTS_FILE
    if not path.is_file():
        return None

    try:
        return load_file(str(path))["counts"]
    except Exception as e:
        raise AdaspecError(f"{str(path)!r} is corrupt ({type(e).__name__}: {e}); delete it (the head still loads "
                           "without it) or write it again with heads.write_token_counts.") from None


def save_head(head, folder, meta: dict | None = None, target_model=None, token_counts=None) -> Path:
    """Write `config.json` (EAGLE / EAGLE-3 layout + an "adaspec" section: kind, target identity, meta) and
    `model.safetensors` into `folder`, atomically, plus `token_counts.safetensors` when `token_counts` (V,) (the
    training data's target-token frequencies) is given. The target identity is taken from `target_model` when
    given, else the identity recorded by `build_head` / `load_head`."""

    head = unwrap_head(head)
    adaspec = {"format_version": FORMAT_VERSION, "kind": head.kind, "fc_bias": head.fc.bias is not None,
               "meta": dict(meta or {})}
    if target_model is not None:
        adaspec["target"] = target_identity(target_model)
    elif getattr(head, "target_identity", None):
        adaspec["target"] = head.target_identity
    if head.uses_fused and getattr(head, "target_layer_ids", None):
        adaspec["target_layer_ids"] = list(head.target_layer_ids)
    cfg = head_config_dict(head)
    cfg["adaspec"] = adaspec
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        if token_counts is not None:
            (tmp / TOKEN_COUNTS_FILE).write_bytes(_token_counts_bytes(token_counts))
    return Path(folder)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_head_folder(folder) -> Path:
    """`folder` as a Path if it is an existing folder; a clear error when it is a file or missing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdaspecError(f"head folder {str(folder)!r} is a file; pass the folder that holds it (config.json and "
                           "the weights).")
    if not folder.is_dir():
        raise AdaspecError(f"head folder {str(folder)!r} does not exist; pass the folder that holds config.json.")
    return folder


def read_weights(folder) -> dict[str, torch.Tensor]:
    """The state dict of a head folder (model.safetensors preferred, else pytorch_model.bin), with a leading
    'model.' prefix stripped (some published heads carry it). Clear errors for missing or corrupt files."""
    folder = check_head_folder(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors / pickle errors on a truncated or corrupt file
            raise AdaspecError(f"head weights {str(path)!r} are corrupt or truncated ({type(e).__name__}: {e}); "
                               "re-export or re-download the head.") from None
        if not isinstance(state, dict) or not state:
            raise AdaspecError(f"head weights {str(path)!r} hold no tensors; re-export or re-download the head.")
        return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    raise AdaspecError(f"no weight file in head folder {str(folder)!r}: expected one of {list(WEIGHT_FILES)}. "
                       "The save may have been interrupted; save or export the head again.")


def unfold_fc_bias(state: dict[str, torch.Tensor], folder) -> None:
    """Undo `export.fold_fc_bias` in place: an EAGLE-1 layer 0 whose attention biases are a folded fc bias b
    (q/k/v bias = W·b, o_proj bias = b) gets fc.bias = b back. Other attention biases are refused: our heads'
    layers have none."""
    prefix = "layers.0.self_attn."
    b = state.get(prefix + "o_proj.bias")
    names = [prefix + n + ".bias" for n in ("q_proj", "k_proj", "v_proj")]
    folded = b is not None and "fc.bias" not in state and all(
        n in state and torch.allclose(state[n].double(), state[n[:-len("bias")] + "weight"].double() @ b.double(),
                                      rtol=1e-3, atol=1e-5 * (1 + b.abs().max().item())) for n in names)
    if not folded:
        raise AdaspecError(f"head {str(folder)!r} has attention biases that are not a folded fc bias (q/k/v bias = "
                           "W·b, o_proj bias = b); this EAGLE-1 layout has no attention biases.")
    for n in names:
        del state[n]
    state["fc.bias"] = state.pop(prefix + "o_proj.bias")


def infer_kind(state: dict) -> str:
    if "midlayer.self_attn.q_proj.weight" in state:
        return "eagle3"
    if "layers.0.self_attn.q_proj.weight" in state:
        return "eagle1"
    raise AdaspecError(f"cannot tell the head kind from its weights: expected 'layers.0.*' (EAGLE-1/2) or "
                       f"'midlayer.*' (EAGLE-3) keys, found {sorted(state)[:8]}.")


def _config_from_saved(saved: dict, state: dict, kind: str, target_model, attn_implementation: str) -> LlamaConfig:
    """Rebuild the head's LlamaConfig from a saved config.json, filling gaps from the weights and the target."""
    base = head_config(target_model.config, embedding_rows(target_model), attn_implementation)
    if not saved:
        return base
    hidden = int(saved.get("hidden_size", base.hidden_size))
    heads = int(saved.get("num_attention_heads", base.num_attention_heads))
    rope = dict(saved.get("rope_parameters") or saved.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = float(rope.get("rope_theta", saved.get("rope_theta", 10000.0)))
    mlp_key = "midlayer.mlp.gate_proj.weight" if kind == "eagle3" else "layers.0.mlp.gate_proj.weight"
    cfg = LlamaConfig(
        vocab_size=int(saved.get("vocab_size", base.vocab_size)), hidden_size=hidden,
        intermediate_size=int(state[mlp_key].shape[0]) if mlp_key in state else int(saved.get("intermediate_size")),
        num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=int(saved.get("num_key_value_heads") or heads),
        head_dim=int(saved.get("head_dim") or hidden // heads), hidden_act=saved.get("hidden_act", "silu"),
        max_position_embeddings=int(saved.get("max_position_embeddings", base.max_position_embeddings)),
        rms_norm_eps=float(saved.get("rms_norm_eps", base.rms_norm_eps)), rope_parameters=rope,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=saved.get("bos_token_id"), eos_token_id=saved.get("eos_token_id"),
        pad_token_id=saved.get("pad_token_id"))
    set_attn_implementation(cfg, attn_implementation)
    return cfg


def read_head_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}

    try:
        return json.loads(read_text(path, "head config"))
    except json.JSONDecodeError as e:
        raise AdaspecError(f"{str(path)!r} is not valid JSON ({e}); re-export the head.") from None


def _fused_layer_ids(adaspec: dict, saved: dict, num_layers: int) -> tuple[int, ...]:
    """HF hidden_states indices an EAGLE-3 head fuses: ours as recorded; a foreign head's
    eagle_config.eagle_aux_hidden_state_layer_ids read as SGLang/SpecForge do (ids of the layers whose *output*
    is taken, so HF index = id + 1); the engines' default (2, N//2, N-3) otherwise."""
    if adaspec.get("target_layer_ids"):
        return tuple(int(i) for i in adaspec["target_layer_ids"])
    aux = (saved.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    default = feature_layer_ids(num_layers)
    if not aux:
        return default
    ids = tuple(int(i) + 1 for i in aux)
    if ids != default:
        warnings.warn(f"reading eagle_aux_hidden_state_layer_ids={list(aux)} the SGLang way (layer outputs: HF "
                      f"hidden_states {list(ids)}); a head trained for vLLM's convention would need {list(aux)}.",
                      stacklevel=3)
    return ids


def load_head(folder, target_model, strict_target: bool = True, attn_implementation: str = "sdpa",
              dtype: torch.dtype | None = None):
    """Load a head saved by `save_head` or exported / published in the EAGLE, EAGLE-3, SGLang or vLLM layout
    (config.json + model.safetensors or pytorch_model.bin; the kind is inferred from the keys).

    Checks the target: a recorded identity goes through `models.check_target_identity` (error on hidden size or
    vocabulary mismatch, warning on another fingerprint); heads without one are checked by shape. `strict_target
    =False` skips the identity check (shapes must still fit). Returns the head in eval mode, in `dtype` (default:
    fp32), on the device of the target's embedding."""
    saved = read_head_config(folder)
    state = read_weights(folder)
    kind = infer_kind(state)
    if kind == "eagle1" and any(k.startswith("layers.0.self_attn.") and k.endswith(".bias") for k in state):
        unfold_fc_bias(state, folder)  # a vLLM export of a head with an fc bias
    adaspec = saved.get("adaspec") or {}
    recorded = adaspec.get("target")
    if strict_target and recorded:
        check_target_identity(recorded, target_model, what=f"head {str(folder)!r}")
    hidden, vocab = int(target_model.config.hidden_size), embedding_rows(target_model)
    fc = state.get("fc.weight")
    if fc is None:
        raise AdaspecError(f"head {str(folder)!r} has no 'fc.weight'; it is not an EAGLE head.")
    head_hidden = int(fc.shape[0]) if fc.shape[0] != hidden else int(saved.get("hidden_size", hidden))
    if head_hidden != hidden:
        raise AdaspecError(f"head {str(folder)!r} has hidden size {head_hidden} but the target "
                           f"{target_identity(target_model)['name']!r} has {hidden}; use the target it was trained "
                           "for.")
    head_vocab = int(state["t2d"].numel()) if "t2d" in state else int(saved.get("vocab_size", vocab))
    if head_vocab != vocab:
        raise AdaspecError(f"head {str(folder)!r} was built for a vocabulary of {head_vocab} tokens but the target has "
                           f"{vocab}; use the target it was trained for.")
    cfg = _config_from_saved({k: v for k, v in saved.items() if k != "adaspec"}, state, kind, target_model,
                             attn_implementation)
    embed = target_model.get_input_embeddings()
    if kind == "eagle1":
        head = EagleHead(cfg, embed, target_model.get_output_embeddings(), fc_bias="fc.bias" in state)
    else:
        head = Eagle3Head(cfg, embed, draft_vocab_size=int(state["lm_head.weight"].shape[0]))
        head.target_layer_ids = _fused_layer_ids(adaspec, saved, int(target_model.config.num_hidden_layers))
        if "d2t" not in state:  # a full-vocabulary EAGLE-3 head
            state["d2t"] = torch.zeros(head.draft_vocab_size, dtype=torch.int64)
            state["t2d"] = torch.ones(vocab, dtype=torch.bool)
    state = {k: v for k, v in state.items() if k != "embed_tokens.weight"}  # the target's embedding is used
    if "d2t" in state:
        state["d2t"], state["t2d"] = state["d2t"].to(torch.int64), state["t2d"].to(torch.bool)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AdaspecError(f"head {str(folder)!r} does not fit an {kind} head for this target: {e}") from None
    head.target_identity = recorded
    head.meta = adaspec.get("meta", {})
    counts = read_token_counts(folder)
    if counts is not None and counts.numel() != vocab:
        raise AdaspecError(f"{str(Path(folder) / TOKEN_COUNTS_FILE)!r} has {counts.numel()} entries but the target "
                           f"vocabulary has {vocab}; delete the file or write it again with the target's tokenizer.")
    head.token_counts = counts
    device = target_model.get_input_embeddings().weight.device
    return head.to(device=device, dtype=dtype or torch.float32).eval()
