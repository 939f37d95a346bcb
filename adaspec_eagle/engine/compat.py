"""The one adapter between the engine and transformers' cache / mask API, which moves between versions.

What differs (checked in the installed sources):
- 5.24 names the forward argument `cache` (`past_key_values` is deprecated); 5.17 only knows `past_key_values`.
- `DynamicLayer.crop(n)`: 5.24 refuses a positive n; 5.17 reads a positive n as the final length (deprecated).
  Both accept a negative n = the number of tokens to drop, which is the only form used here.
- Both return an already 4-D `attention_mask` unchanged from `masking_utils._preprocess_mask_arguments` and hand
  it to the attention function, where the eager path adds it to the scores: so a custom mask must be an
  *additive float* mask in the model's dtype, shaped (B, 1, Q, KV_len) with KV_len = cached + Q.

Everything else in the engine talks to models only through `forward`, `new_cache`, `cache_length` and
`compact_cache`.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from adaspec_eagle import AdaspecError

_CACHE_KWARG: dict[type, str] = {}
_KEEPS_LOGITS: dict[type, bool] = {}


def cache_kwarg(model) -> str:
    """The name of the forward argument that takes the cache object for this model class."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(model.forward).parameters
        if "cache" in params:
            _CACHE_KWARG[cls] = "cache"
        elif "past_key_values" in params:
            _CACHE_KWARG[cls] = "past_key_values"
        else:
            raise AdaspecError(f"{cls.__name__}.forward takes neither `cache` nor `past_key_values`; the engine "
                               "needs a transformers causal LM that accepts a cache object.")
    return _CACHE_KWARG[cls]


def takes_logits_to_keep(model) -> bool:
    """Whether this model class's forward can compute only the last positions' logits (`logits_to_keep`)."""
    cls = type(model)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _KEEPS_LOGITS[cls]


def new_cache(config=None):
    """An empty `DynamicCache`; with a model config its layer types follow the config (so a sliding-window
    model is refused by `compact_cache` instead of silently attending past its window)."""

    return DynamicCache(config=config) if config is not None else DynamicCache()


MASKED_ATTENTION = ("eager", "sdpa")
"""Attention implementations that apply an arbitrary additive (B, 1, Q, K) mask, as tree verification needs."""


def check_mask_support(model) -> None:
    """Refuse a model whose attention implementation would not apply a tree's attention mask."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in MASKED_ATTENTION:
        raise AdaspecError(f"{type(model).__name__} runs attn_implementation={impl!r}, which does not apply the "
                           "custom attention masks tree verification needs (draft tokens would see their "
                           "siblings); load it with attn_implementation='sdpa' (or 'eager').")


def forward(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
            last_logits_only: bool = False):
    """One forward of a transformers causal LM that appends to `cache` in place.

    input_ids: (B, Q); position_ids: (B, Q) or None (then positions follow the cache);
    attention_mask: None (causal over cache + input) or an additive float mask (B, 1, Q, cached + Q).
    last_logits_only: the caller reads only the last position's logits; a model that supports it
    (`logits_to_keep`) then skips the lm_head for the others (a fifth of a SmolLM2-135M prefill) and returns
    logits (B, 1, V); others return all positions as usual.
    A mask is refused for attention implementations other than eager and sdpa (flash-attention kernels take
    padding masks only: tree nodes would attend to their siblings and the output would be silently wrong)."""
    if attention_mask is not None:
        check_mask_support(model)
    kwargs = {cache_kwarg(model): cache}
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    if last_logits_only and takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    device = model.device
    input_ids = input_ids.to(device)
    position_ids = None if position_ids is None else position_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                 **kwargs)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive float mask (0 where allowed, dtype min elsewhere), same shape."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def cache_length(cache) -> int:
    """Tokens held by the cache (0 for an empty one)."""
    return int(cache.get_seq_length())


def _check_layers(cache) -> None:
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise AdaspecError(f"cache layer {i} is a {type(layer).__name__}; tree verification needs full-attention "
                               "DynamicLayer caches (turn off sliding-window attention in the model config).")


@torch.no_grad()
def compact_cache(cache, start: int, keep: torch.Tensor) -> None:
    """Keep the first `start` cached tokens, then the tokens at offsets `keep` (a, ) after `start` (ascending),
    and drop everything else: the tree nodes of a verified draft collapse onto the accepted path.

    Implemented with each layer's own keys / values tensors (index_select along the sequence dim, written into
    place) and the layer's `crop` with a negative count, which means the same in 5.17 and 5.24."""
    _check_layers(cache)
    total = cache_length(cache)
    a = int(keep.numel())
    if start + a > total:
        raise ValueError(f"compact_cache: keeping {start}+{a} tokens of a cache that holds {total}")
    in_place = bool((keep.cpu() == torch.arange(a)).all())  # the path is already where it belongs: only crop
    for layer in cache.layers:
        if in_place or not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        idx = keep.to(layer.keys.device) + start
        # (B, heads, a, head_dim): gather first, then write, so overlapping source/destination is safe.
        keys, values = layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx)
        layer.keys[..., start:start + a, :] = keys
        layer.values[..., start:start + a, :] = values
    drop = total - start - a
    if drop:
        cache.crop(-drop)


@torch.no_grad()
def truncate_cache(cache, length: int) -> None:
    """Drop every cached token after the first `length`."""
    drop = cache_length(cache) - length
    if drop < 0:
        raise ValueError(f"truncate_cache: cache holds {cache_length(cache)} tokens, asked to keep {length}")
    if drop:
        cache.crop(-drop)
