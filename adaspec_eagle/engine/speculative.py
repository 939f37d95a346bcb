"""The speculative decoding loop and its drafters (a small draft LM, an EAGLE head, prompt lookup alone) behind one
interface.

One step: the drafter grows a token tree rooted at the last accepted token (`tree.build_tree`), optionally with a
prompt-lookup chain grafted on (`TreeConfig.lookup_tokens`: the tokens that followed the latest earlier occurrence
of the sequence's last n-gram; no draft forward); the target scores the whole tree in one forward with a 4-D tree
mask and explicit positions over its own cache; verification (`verify.py`) picks the accepted path and the next
token; the target's cache (and the drafter's) is compacted to the accepted path, everything else discarded. Batch
size 1 throughout.

Cache invariant (target and draft LM alike): the cache holds every accepted token except the last one (the
"pending" root of the next tree), whose logits the next verify forward computes together with the tree's.
"""

from __future__ import annotations

import time
from dataclasses import replace as dataclasses_replace

import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import TreeConfig
from adaspec_eagle.engine import compat, linear_routing
from adaspec_eagle.engine.tree import DraftTree, build_tree, graft_chain, tree_mask
from adaspec_eagle.engine.verify import greedy_verify, stochastic_verify, warp_probs
from adaspec_eagle.models import embedding_rows
from adaspec_eagle.models.heads import frequent_ids


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., V_d) -> (..., vocab): drop padding rows of a larger embedding, -inf for ids a smaller one lacks."""
    v = logits.shape[-1]
    if v == vocab:
        return logits
    if v > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - v), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class Drafter:
    """What the loop needs from a drafter. `features` says which target hidden states it reads:
    None, "last" (final-norm last layer, EAGLE-1/2) or a tuple of HF hidden_states indices to concatenate
    (EAGLE-3's fused layers)."""

    features: None | str | tuple[int, ...] = None
    vocab_ids: torch.Tensor | None = None
    """None: `root_logits` / `expand` return logits over the whole target vocabulary. Else the (Vd,) CPU target ids
    their columns stand for (a restricted draft vocabulary); `vocab_size` is then the target's."""
    vocab_size: int | None = None

    def reset(self, target) -> None:
        """Forget any previous sequence (called once per generate)."""

    def add_features(self, features: torch.Tensor) -> None:
        """(k, F) target features of the next k accepted positions (contiguous since the last call)."""

    def root_logits(self, seq: torch.Tensor) -> torch.Tensor | None:
        """seq: (T,) every accepted token, the last being the tree root. Catch the drafter's cache up and return
        its logits (V,) for the token after the root ((Vd,) over `vocab_ids` when set), or None when it cannot
        draft (then the step decodes one token)."""
        raise NotImplementedError

    def expand(self, tokens, depth, parent_slots, visible) -> torch.Tensor:
        """One batched forward of tree nodes (see `tree.ExpandFn`) -> logits (n, V), or (n, Vd) over `vocab_ids`."""
        raise NotImplementedError

    def commit(self, tree: DraftTree, path: list[int]) -> None:
        """The target accepted `path` (tree node indices from the root): drop the rejected tree nodes."""

    def models(self) -> tuple:
        """The torch modules the drafter runs (their linear layers get `linear_routing.small_batch_linears`)."""
        return ()


class LookupDrafter(Drafter):
    """No model: every tree is the root plus the prompt-lookup chain (`TreeConfig.lookup_tokens`), i.e. prompt
    lookup decoding (Saxena 2023) run by this engine."""

    def root_logits(self, seq):
        return None


def lookup_continuation(seq: torch.Tensor, max_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: for n = max_ngram .. min_ngram, find the latest earlier occurrence of the last n tokens of
    `seq` (T,) and return the `max_tokens` tokens that followed it ([] when no such n-gram recurs). A continuation
    that reaches the end of `seq` repeats it (a loop of period p gives its period over and over, as successive
    lookups would)."""
    T = int(seq.numel())
    if max_tokens <= 0:
        return []
    for n in range(min(max_ngram, T - 1), max(min_ngram, 1) - 1, -1):
        windows = seq[:T - 1].unfold(0, n, 1)  # (T-n, n): every n-gram that has a token after it
        hits = (windows == seq[T - n:]).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return seq[start + torch.arange(max_tokens) % (T - start)].tolist()
    return []


class DraftLMDrafter(Drafter):
    """A small causal LM sharing the target's tokenizer. Keeps its own cache of the accepted prefix plus the
    accepted tree nodes it already forwarded (their keys/values equal a sequential forward's)."""

    def __init__(self, model):
        self.model = model
        self.vocab = None

    def models(self):
        return (self.model,)

    def reset(self, target) -> None:
        self.vocab = int(target.get_output_embeddings().weight.shape[0])
        self.cache = compat.new_cache(self.model.config)
        self.base = 0  # cached tokens before the tree (the root included once fed)

    @torch.no_grad()
    def root_logits(self, seq):
        done = compat.cache_length(self.cache)
        out = compat.forward(self.model, seq[None, done:], self.cache, last_logits_only=True)  # catch-up, causal
        self.base = len(seq)
        return _fit_vocab(out.logits[0, -1].float().cpu(), self.vocab)  # (V,)

    @torch.no_grad()
    def expand(self, tokens, depth, parent_slots, visible):
        allowed = tree_mask(visible, self.base)  # (1, 1, n, base + S + n)
        mask = compat.additive_mask(allowed, self.model.dtype)
        position_ids = (depth + self.base - 1)[None]  # (1, n): the root sits at base - 1
        out = compat.forward(self.model, tokens[None], self.cache, position_ids, mask)
        return _fit_vocab(out.logits[0].float().cpu(), self.vocab)  # (n, V)

    def commit(self, tree, path):
        slots = [int(tree.slots[n]) for n in path[1:]]
        kept = slots[:next((i for i, s in enumerate(slots) if s < 0), len(slots))]
        compat.compact_cache(self.cache, self.base, torch.tensor(kept, dtype=torch.long))


DEFAULT_DRAFT_VOCAB = 8192
"""Draft vocabulary of an EAGLE-1/2 head drafter under "auto" (a sixth of SmolLM2's 49,152 ids). For the shipped
heads the 8,192 most frequent training tokens cover 90% of held-out ShareGPT assistant tokens (16,384: 96%;
`scripts/draft_vocab_cost.py`), yet the tokens a head gets right are frequent ones: with the KD head on this
project's 2-core CPU (3-token trees, 6 ShareGPT + 6 HumanEval prompts, 64 tokens) τ was the same with 8,192 as
with 16,384 (1.63 / 1.53) and the draft step about 1 ms cheaper; 4,096 began to lose τ on code."""


def fast_draft_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the restricted draft lm_head runs in: bf16 where the hardware has bf16 matmul (CUDA, or a CPU
    whose oneDNN supports it: 3-4x faster than fp32 for this memory-bound product here), else the weight's own.
    Lossless either way: it only ranks draft candidates; the target verifies in its own dtype."""
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    if weight.device.type == "cuda":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else weight.dtype
    except (AttributeError, RuntimeError):
        return weight.dtype


def parse_draft_vocab(value) -> int | str:
    """A `--draft-vocab` value: 'auto' or a non-negative integer (0 = the whole vocabulary)."""
    value = str(value).strip()
    if value == "auto":
        return value
    if not value.isdigit():
        raise AdaspecError(f"--draft-vocab {value!r}: expected a non-negative integer (0 = the whole vocabulary) or "
                           "'auto'.")
    return int(value)


class HeadDrafter(Drafter):
    """An EAGLE head (EAGLE-1/2 `EagleHead` or EAGLE-3 `Eagle3Head`). The head's pair at position t is
    (feature f_t, token x_{t+1}) (as in training); its cache holds the pairs of accepted tokens only, built from
    true target features: tree nodes run on the head's own outputs and are always discarded."""

    def __init__(self, head, draft_vocab: int | str | None = None):
        """draft_vocab: for an EAGLE-1/2 head, score only the `draft_vocab` most frequent training tokens (the
        head's `token_counts`, plus the EOS / BOS / PAD ids) instead of the whole target lm_head: the drafting
        lm_head, the bulk of a small target's draft step, shrinks by V / draft_vocab. Lossless (the target
        verifies every token); a target token outside the set is simply never drafted. None, 0 or >= V: the
        whole vocabulary; "auto": DEFAULT_DRAFT_VOCAB when the head has token counts, else the whole vocabulary.
        EAGLE-3 heads already draft over their own vocabulary and ignore it."""
        self.head = head
        self.features = tuple(head.target_layer_ids) if getattr(head, "uses_fused", False) else "last"
        self._weight = self._bias = None  # the restricted drafting lm_head (`_restrict`)
        if head.kind == "eagle3":  # it drafts over its own vocabulary: rank over that, map ids back
            self.vocab_ids, self.vocab_size = head.draft_ids.cpu(), int(head.config.vocab_size)
            ids = self.vocab_ids
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size
                                or int(ids.unique().numel()) != int(ids.numel())):
                raise AdaspecError(f"this EAGLE-3 head's draft vocabulary (d2t) maps to ids outside "
                                   f"0..{self.vocab_size - 1} or to one id twice; its d2t buffer does not fit this "
                                   "target. Retrain or re-export the head for this target's vocabulary.")
        if draft_vocab == "auto":
            draft_vocab = DEFAULT_DRAFT_VOCAB if getattr(head, "token_counts", None) is not None else None
        if draft_vocab and head.kind == "eagle1":
            self._restrict(int(draft_vocab))

    def models(self):
        return (self.head,)

    @property
    def draft_vocab_size(self) -> int | None:
        """Tokens the head drafts from (None: the whole target vocabulary or the EAGLE-3 head's own)."""
        return None if self._weight is None else int(self._weight.shape[0])

    def _restrict(self, size: int) -> None:
        lm_head = self.head.target_lm_head
        vocab = int(lm_head.weight.shape[0])
        if size < 1:
            raise AdaspecError(f"draft_vocab={size}: expected a positive number of tokens (or None for all).")
        if size >= vocab:
            return
        counts = getattr(self.head, "token_counts", None)
        if counts is None:
            raise AdaspecError(f"draft_vocab={size} needs the head's training-token counts (token_counts.safetensors "
                               "in its folder, written by train-head); this head has none. Draft over the whole "
                               "vocabulary (--draft-vocab 0) or add them with heads.write_token_counts.")
        self.vocab_ids, self.vocab_size = frequent_ids(self.head.config, counts, size), vocab  # (size,) ascending
        rows = self.vocab_ids.to(lm_head.weight.device)
        dtype = fast_draft_dtype(lm_head.weight)
        self._weight = lm_head.weight.detach()[rows].to(dtype).contiguous()  # (size, H)
        bias = getattr(lm_head, "bias", None)
        self._bias = None if bias is None else bias.detach()[rows].to(dtype).contiguous()

    def _logits(self, hidden_out: torch.Tensor) -> torch.Tensor:
        """(1, n, H) head outputs -> (n, V) float logits on the CPU, or (n, Vd) over `vocab_ids` for a restricted
        draft vocabulary or an EAGLE-3 head's own."""
        if self.head.kind == "eagle3":
            return self.head.draft_logits(hidden_out)[0].float().cpu()
        if self._weight is None:
            return self.head.logits(hidden_out)[0].float().cpu()
        sub = torch.nn.functional.linear(hidden_out[0].to(self._weight.dtype), self._weight, self._bias)  # (n, Vd)
        return sub.float().cpu()

    def reset(self, target) -> None:
        self.cache = compat.new_cache()
        self.feats = None  # (k, F) target features not yet fed, for positions done .. done + k - 1
        self.done = 0  # pairs in the cache = positions 0 .. done-1
        self.hidden = None

    def add_features(self, features):
        self.feats = features if self.feats is None else torch.cat([self.feats, features])

    @torch.no_grad()
    def root_logits(self, seq):
        # Pairs for positions done .. T-2: (f_t, x_{t+1}); the last one is (f_{T-2}, root).
        n = len(seq) - 1 - self.done
        if n <= 0 or self.feats is None or self.feats.shape[0] < n:
            return None
        hidden_in = self.head.project(self.feats[None, :n])  # (1, n, H)
        position_ids = torch.arange(self.done, self.done + n)[None]
        out = self.head(hidden_in, seq[None, self.done + 1:], position_ids, None, self.cache)  # (1, n, H)
        self.feats = self.feats[n:]
        self.done += n
        self.root_hidden = out[:, -1:]  # (1, 1, H)
        self.tree_hidden = out[:, :0]  # (1, S, H) outputs of forwarded tree nodes, by slot
        return self._logits(self.root_hidden)[0]  # (V,) or (Vd,)

    @torch.no_grad()
    def expand(self, tokens, depth, parent_slots, visible):
        prev = torch.cat([self.root_hidden, self.tree_hidden], dim=1)  # (1, 1 + S, H)
        hidden_in = prev[:, parent_slots + 1]  # (1, n, H): parent slot -1 is the root
        allowed = tree_mask(visible, self.done)  # (1, 1, n, done + S + n)
        position_ids = (depth + self.done - 1)[None]  # the root's pair sits at done - 1
        out = self.head(hidden_in, tokens[None], position_ids, allowed, self.cache)  # (1, n, H)
        self.tree_hidden = torch.cat([self.tree_hidden, out], dim=1)
        return self._logits(out)  # (n, V) or (n, Vd)

    def commit(self, tree, path):
        compat.truncate_cache(self.cache, self.done)


def _select_features(out, kind, path: torch.Tensor) -> torch.Tensor:
    """Target features of the accepted nodes: (a, H) last layer, or (a, 3H) fused layers."""
    hs = out.hidden_states
    if kind == "last":
        return hs[-1][0, path]
    return torch.cat([hs[i][0, path] for i in kind], dim=-1)


def _stop_index(tokens: list[int], eos: set[int], stop_strings, tokenizer, start: int = 0) -> int | None:
    """The first length L in (start, len(tokens)] at which tokens[:L] (the new tokens) ends in EOS or decodes to a
    text holding a stop string, else None: the length plain decoding, which checks after every token, stops at.
    Every such prefix is decoded: decoding need not be prefix-monotone (clean-up of spaces before punctuation can
    remove a stop string that a shorter prefix showed)."""
    for n in range(start + 1, len(tokens) + 1):
        if tokens[n - 1] in eos:
            return n
        if stop_strings:
            text = tokenizer.decode(tokens[:n], skip_special_tokens=False)
            if any(s in text for s in stop_strings):
                return n
    return None


def eos_ids(target, tokenizer) -> list[int]:
    """The ids that end a generation: the target's generation-config EOS ids and the tokenizer's EOS."""
    ids = set()
    for value in (getattr(target.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update([value] if isinstance(value, int) else list(value or []))
    return sorted(ids)


def _eos_set(target, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(target.generation_config, "eos_token_id", None) if hasattr(
            target, "generation_config") else None
    if eos_token_id is None:
        return set()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def context_length(config) -> int | None:
    """The target's maximum number of positions, where its config states one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_to_context(target, n_prompt: int, max_new_tokens: int, margin: int = 0) -> int:
    """max_new_tokens cut so that prompt + output (+ `margin` draft positions) stays inside the target's
    context: generation then stops cleanly at the context end. A prompt that already fills it is refused."""
    limit = context_length(target.config)
    if limit is None:
        return max_new_tokens
    if n_prompt + margin >= limit:
        raise AdaspecError(f"the prompt has {n_prompt} tokens but the target's context is {limit} positions"
                           + (f" (and {margin} are kept free for draft tokens)" if margin else "")
                           + "; shorten the prompt.")
    return min(max_new_tokens, limit - n_prompt - margin)


def _check_args(prompt_ids, max_new_tokens, temperature, top_p, stop_strings, tokenizer) -> list[int]:
    ids = prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 2 and prompt_ids.shape[0] != 1:
        raise AdaspecError(f"speculative decoding runs batch size 1; got prompt_ids of shape "
                           f"{tuple(prompt_ids.shape)}. Call it once per prompt.")
    if not ids:
        raise AdaspecError("the prompt is empty; give at least one token (e.g. the BOS token).")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise AdaspecError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got {max_new_tokens}, "
                           f"{temperature}, {top_p}.")
    if stop_strings and tokenizer is None:
        raise AdaspecError("stop_strings need the tokenizer to decode the output; pass tokenizer=.")
    return ids


def _prefill(target, drafter: Drafter, ids: list[int], cache) -> torch.Tensor:
    """The target's cache of every prompt token but the last (the first tree's root), the drafter's features of
    them; -> the sequence so far (T,)."""
    drafter.reset(target)
    kind = drafter.features
    seq = torch.tensor(ids, dtype=torch.long)
    if len(ids) > 1:
        out = compat.forward(target, seq[None, :-1], cache, output_hidden_states=kind is not None,
                             last_logits_only=True)  # its logits are not read
        if kind is not None:
            drafter.add_features(_select_features(out, kind, torch.arange(len(ids) - 1)))
    return seq


def _draft(drafter: Drafter, seq: torch.Tensor, tree_cfg: TreeConfig, sample, limit, stats: dict) -> DraftTree:
    """The step's draft tree rooted at the last token, with the prompt-lookup chain grafted on. Near the end of the
    context both are cut to the positions left (the root sits at len(seq) - 1, a node of depth d at
    len(seq) - 1 + d; at least one is left while generation goes on, since len(seq) < limit then)."""
    left = None if limit is None else limit - len(seq)
    if left is not None and left < tree_cfg.depth:
        tree_cfg = dataclasses_replace(tree_cfg, depth=left)
    root = int(seq[-1])
    root_logits = drafter.root_logits(seq)
    draft = (DraftTree.root_only(root) if root_logits is None
             else build_tree(root, root_logits, drafter.expand, tree_cfg, sample,
                             getattr(drafter, "vocab_ids", None), getattr(drafter, "vocab_size", None)))
    if tree_cfg.lookup_tokens:
        positions_left = tree_cfg.lookup_tokens if left is None else min(tree_cfg.lookup_tokens, left)
        chain = lookup_continuation(seq, positions_left, tree_cfg.lookup_ngram, tree_cfg.lookup_min_ngram)
        draft, grafted = graft_chain(draft, chain)
        stats["lookup_drafted"] += grafted
    return draft


def _verify(target, drafter: Drafter, draft: DraftTree, cache, temperature: float, top_p: float, generator):
    """One target forward over the tree, verification, and the caches (target's and drafter's) compacted to the
    accepted path -> (path of tree nodes, emitted tokens: the accepted drafts and the next token)."""
    kind = drafter.features
    start = compat.cache_length(cache)  # == len(seq) - 1
    allowed = tree_mask(draft.ancestors(), start)  # (1, 1, N+1, start + N+1)
    out = compat.forward(target, draft.tokens[None], cache, (draft.depth + start)[None],
                         compat.additive_mask(allowed, target.dtype), output_hidden_states=kind is not None)
    logits = out.logits[0].float().cpu()  # (N+1, V)
    if temperature > 0:
        path, nxt = stochastic_verify(draft, logits, temperature, top_p, generator)
    else:
        path, nxt = greedy_verify(draft, logits)
    path_t = torch.tensor(path, dtype=torch.long)
    compat.compact_cache(cache, start, path_t)
    drafter.commit(draft, path)
    if kind is not None:
        drafter.add_features(_select_features(out, kind, path_t))
    return path, draft.tokens[path_t[1:]].tolist() + [nxt]


def _record_step(stats: dict, draft: DraftTree, path: list[int], emitted: list[int], t0: float, t1: float,
                 t2: float) -> None:
    stats["draft_times_s"].append(t1 - t0)
    stats["verify_times_s"].append(t2 - t1)  # target forward + verification + cache compaction
    stats["verify_time_s"] += t2 - t1
    stats["draft_time_s"] += t1 - t0
    stats["steps"] += 1
    stats["accepted_lengths"].append(len(emitted))
    stats["drafted_tokens"] += draft.size
    stats["accepted_drafts"] += len(path) - 1
    stats["lookup_accepted"] += sum(n >= draft.first_grafted for n in path[1:])


@torch.no_grad()
def speculative_generate(target, prompt_ids, drafter: Drafter, max_new_tokens: int = 128,
                         temperature: float = 0.0, top_p: float = 1.0, tree: TreeConfig | None = None,
                         eos_token_id=None, stop_strings=None, tokenizer=None, seed: int = 0, on_tokens=None):
    """Generate with tree speculative decoding. Batch size 1 (one prompt, (T,) or (1, T) ids).

    temperature 0 is greedy (output identical to plain greedy decoding); > 0 samples from the target's
    distribution at that temperature and top_p, exactly (recursive rejection sampling). eos_token_id: an id or
    ids (default: the target's generation config); generation stops after emitting one, or once the text
    contains a stop string. on_tokens(list[int]) is called with the tokens emitted at each step (streaming).

    Returns (new token ids, stats): stats has steps, accepted_lengths (the tokens each target forward's
    verification accepted, bonus included; the last one's may run past the tokens kept), tau (tokens kept per
    target forward), drafted_tokens / accepted_drafts / draft_acceptance, per-step
    draft_times_s and verify_times_s (target forward + verification + cache compaction) and their totals,
    prefill_time_s, total_time_s and tokens_per_s; lookup_drafted / lookup_accepted count the prompt-lookup
    tokens grafted onto the trees (`TreeConfig.lookup_tokens`) and accepted. Near the end of the target's context
    the trees (and lookup chains) are cut to the positions left, so generation runs to the context end exactly
    as `plain_generate` does."""
    with linear_routing.small_batch_linears(target, *drafter.models()):
        ids = _check_args(prompt_ids, max_new_tokens, temperature, top_p, stop_strings, tokenizer)
        tree_cfg = tree or TreeConfig()
        max_new_tokens = fit_to_context(target, len(ids), max_new_tokens)
        limit = context_length(target.config)
        eos = _eos_set(target, eos_token_id)
        generator = torch.Generator().manual_seed(seed)
        def sample(logits):  # a chain's child drawn from the draft distribution (stochastic mode only)
            q = warp_probs(logits.cpu(), temperature, top_p)  # (V,)
            return int(torch.multinomial(q, 1, generator=generator)), q

        t_start = time.perf_counter()
        cache = compat.new_cache(target.config)
        seq = _prefill(target, drafter, ids, cache)
        stats = {"steps": 0, "accepted_lengths": [], "drafted_tokens": 0, "accepted_drafts": 0, "draft_time_s": 0.0,
                 "verify_time_s": 0.0, "draft_times_s": [], "verify_times_s": [], "lookup_drafted": 0,
                 "lookup_accepted": 0, "prefill_time_s": time.perf_counter() - t_start}
        new: list[int] = []
        while len(new) < max_new_tokens:
            t0 = time.perf_counter()
            draft = _draft(drafter, seq, tree_cfg, sample if temperature > 0 else None, limit, stats)
            t1 = time.perf_counter()
            path, emitted = _verify(target, drafter, draft, cache, temperature, top_p, generator)
            _record_step(stats, draft, path, emitted, t0, t1, time.perf_counter())
            seq = torch.cat([seq, torch.tensor(emitted)])
            room = max_new_tokens - len(new)
            stop = _stop_index(new + emitted, eos, stop_strings, tokenizer, start=len(new))
            keep = min(room, len(emitted) if stop is None else stop - len(new))  # stop > len(new): keep >= 1
            new.extend(emitted[:keep])
            if on_tokens is not None and keep > 0:
                on_tokens(emitted[:keep])
            if stop is not None:
                break
        return new, _finish(stats, new, t_start)


def _finish(stats: dict, new: list[int], t_start: float) -> dict:
    stats["total_time_s"] = time.perf_counter() - t_start
    stats["new_tokens"] = len(new)
    lengths = stats["accepted_lengths"]
    stats["tau"] = len(new) / len(lengths) if lengths else 0.0  # tokens kept per target forward
    stats["draft_acceptance"] = stats["accepted_drafts"] / stats["drafted_tokens"] if stats["drafted_tokens"] else 0.0
    stats["tokens_per_s"] = len(new) / stats["total_time_s"] if stats["total_time_s"] > 0 else 0.0
    return stats


@torch.no_grad()
def plain_generate(target, prompt_ids, max_new_tokens: int = 128, eos_token_id=None, stop_strings=None,
                   tokenizer=None, on_tokens=None):
    """Plain greedy decoding with a cache, one target forward per token (batch size 1): the baseline that
    speculative output must equal. Returns (new token ids, stats) with the same timing keys. Stops at the end of
    the target's context."""
    with linear_routing.small_batch_linears(target):
        ids = _check_args(prompt_ids, max_new_tokens, 0.0, 1.0, stop_strings, tokenizer)
        max_new_tokens = fit_to_context(target, len(ids), max_new_tokens)
        eos = _eos_set(target, eos_token_id)
        t_start = time.perf_counter()
        cache = compat.new_cache(target.config)
        logits = compat.forward(target, torch.tensor([ids]), cache, last_logits_only=True).logits[0, -1].cpu()
        stats = {"steps": 0, "accepted_lengths": [], "drafted_tokens": 0, "accepted_drafts": 0, "draft_time_s": 0.0,
                 "verify_time_s": 0.0, "prefill_time_s": time.perf_counter() - t_start}
        new: list[int] = []
        while len(new) < max_new_tokens:
            tok = int(logits.argmax())
            new.append(tok)
            stats["steps"] += 1
            stats["accepted_lengths"].append(1)
            if on_tokens is not None:
                on_tokens([tok])
            if _stop_index(new, eos, stop_strings, tokenizer, start=len(new) - 1) is not None \
                    or len(new) >= max_new_tokens:
                break
            t0 = time.perf_counter()
            logits = compat.forward(target, torch.tensor([[tok]]), cache).logits[0, -1].cpu()
            stats["verify_time_s"] += time.perf_counter() - t0
        return new, _finish(stats, new, t_start)


# ----------------------------------------------------------------------------------------------------------
# Tree budget auto-tuning


class CommitRecorder:
    """Forwards to a drafter and keeps (tree, accepted path) of every step (the engine calls `commit` once per
    target forward): the tree budget tuner's profile and the benchmark's step records."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def commit(self, tree, path):
        self.steps.append((tree, path))
        return self.inner.commit(tree, path)


def accepted_within_budget(tree: DraftTree, path: list[int], budget: int, lookup_cap: int | None = None,
                           max_depth: int | None = None) -> int:
    """Draft tokens of `path` that a tree pruned to its `budget` best nodes by score would still accept.

    Pruning keeps an ancestor-closed top set (`tree.top_budget`) and greedy acceptance on a subtree is the
    accepted path cut at the first missing node, so this is exact for greedy dynamic trees and chains. Prompt-lookup
    nodes (`tree.grafted`) do not count against the budget: they stay while the path above them does (a lower
    bound: a cut tree can leave the lookup chain more of its own nodes to add). lookup_cap: a chain cut to that
    many tokens (a grafted node's depth is its place in the chain), None: as grafted. max_depth: a dynamic tree
    drafted only that many levels deep, whose budget goes to the best nodes of those levels (exact as well: the
    levels it drafts are the same)."""
    scores = tree.scores[1:]
    if max_depth is not None:
        scores = scores.masked_fill(tree.depth[1:] > max_depth, float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices + 1  # best first
    rank = torch.empty(tree.size + 1, dtype=torch.long)
    rank[order] = torch.arange(tree.size)
    kept = 0
    for node in path[1:]:
        if node < tree.first_grafted and (int(rank[node]) >= budget
                                          or max_depth is not None and int(tree.depth[node]) > max_depth):
            break
        if node >= tree.first_grafted and lookup_cap is not None and int(tree.depth[node]) > lookup_cap:
            break
        kept += 1
    return kept


def _verified_tokens(tree: DraftTree, budget: int, lookup_cap: int, max_depth: int | None = None) -> int:
    """Draft tokens a verify forward carries for `tree` cut to `budget` drafted nodes (of depth <= `max_depth`)
    and `lookup_cap` lookup tokens (the same lower bound as `accepted_within_budget`)."""
    drafted = tree.depth[1:tree.first_grafted]
    available = int((drafted <= max_depth).sum()) if max_depth is not None else int(drafted.numel())
    grafted = tree.depth[tree.first_grafted:]
    return min(budget, available) + int((grafted <= lookup_cap).sum())


def _interpolate(costs: dict[int, float], n: int) -> float:
    """c(n) from measured costs: exact where measured, linear between the nearest measured sizes."""
    if n in costs:
        return costs[n]
    below, above = max((k for k in costs if k < n), default=None), min((k for k in costs if k > n), default=None)
    if below is None or above is None:
        return costs[above if below is None else below]
    return costs[below] + (costs[above] - costs[below]) * (n - below) / (above - below)


LOOKUP_CAPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
"""Lookup chain lengths `tune_tree_budget` tries (up to the tree's own `lookup_tokens`)."""
EXACT_COST_TOKENS = 16
"""`tune_tree_budget` measures the verify cost at every size up to this many draft tokens (where small-batch
kernels make it uneven, `kernels.py`) and at the budgets above it, interpolating in between."""


@torch.no_grad()
def measure_verify_cost(target, prefix_len: int, sizes, repeats: int = 3) -> dict[int, float]:
    """Seconds of one target verify forward of n draft tokens (+ the root) after `prefix_len` cached tokens, for
    each n in `sizes` (median of `repeats`, after one warm-up)."""

    vocab = embedding_rows(target)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, max(prefix_len, 1)), generator=g)
    cache = compat.new_cache(target.config)
    compat.forward(target, prefix, cache, last_logits_only=True)
    start = compat.cache_length(cache)
    costs = {}
    with linear_routing.small_batch_linears(target):
        for n in sizes:
            costs[n] = _verify_cost(target, cache, start, n, vocab, g, repeats)
    return costs


def _verify_cost(target, cache, start: int, n: int, vocab: int, g, repeats: int) -> float:
    """Median seconds of `repeats` verify forwards of a chain of n draft tokens (+ the root) after the cached
    `start` tokens (after one warm-up); the cache is cut back to `start` after each."""
    parents = torch.arange(-1, n)  # a chain: the cost depends on the token count, not the shape
    allowed = tree_mask(DraftTree(torch.zeros(n + 1, dtype=torch.long), parents, torch.arange(n + 1),
                                  torch.zeros(n + 1), parents).ancestors(), start)
    mask = compat.additive_mask(allowed, target.dtype)
    tokens = torch.randint(0, vocab, (1, n + 1), generator=g)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        compat.forward(target, tokens, cache, (torch.arange(n + 1) + start)[None], mask)
        if target.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        compat.truncate_cache(cache, start)
    return sorted(times[1:])[len(times[1:]) // 2]


AUTO_BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def tune_tree_budget(target, drafter: Drafter, prompt_ids, tree: TreeConfig, sizes=AUTO_BUDGETS,
                     profile_tokens: int = 32, eos_token_id=None) -> dict:
    """Pick the tree budget (total_tokens), its depth, and with lookup the lookup chain length, that maximise
    expected tokens per second on this machine.

    Measures (1) the acceptance profile: a greedy run of `profile_tokens` tokens from the prompt with the largest
    budget, giving for every budget n the mean tokens per step tau(n) had the tree been cut to its n best nodes
    (`accepted_within_budget`); (2) the median draft time per tree level of that run (a budget of n drafts at most
    min(depth, n) levels, see `tree.build_tree`); (3) the target's verify cost c(m) of m draft tokens at this
    prompt length (`measure_verify_cost`), each step of the profile priced at the tokens it would have verified.
    Returns {"total_tokens", "depth", "lookup_tokens", "table": [(n, tau, draft_s, verify_s, tokens_per_s,
    lookup, depth)], "summary"} maximising tau / (draft + verify). A dynamic tree tries every depth up to
    min(tree.depth, n) (`accepted_within_budget`'s max_depth): on a CPU one level fewer is a draft forward less,
    often for the same tau; other shapes keep min(tree.depth, n) (static: tree.depth).

    With `tree.lookup_tokens`, the profile grafts lookup chains of that length; they count in tau (not against n)
    and every chain length L in `LOOKUP_CAPS` up to it is tried (the chain cut to L tokens), so a machine where
    each verified token costs much can pick a short chain. The table then holds the best L per budget."""
    sizes = sorted({int(n) for n in sizes if n >= 1})
    big = dataclasses_replace(tree, total_tokens=max(sizes))
    rec = CommitRecorder(drafter)
    _, stats = speculative_generate(target, prompt_ids, rec, profile_tokens, tree=big, eos_token_id=eos_token_id)
    if not rec.steps:
        raise AdaspecError("auto-tuning needs at least one decoding step; raise profile_tokens or check the prompt.")
    levels = tree.depth if tree.shape != "chain" else min(tree.depth, max(sizes))
    # the median step: the first steps of a cold process (CUDA kernels loading, caches) would inflate a mean
    per_level = sorted(stats["draft_times_s"])[len(stats["draft_times_s"]) // 2] / levels
    n_prompt = len(prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)
    caps = sorted({c for c in LOOKUP_CAPS if c < tree.lookup_tokens} | {tree.lookup_tokens})

    def depths(n):
        return range(1, min(tree.depth, n) + 1) if tree.shape == "dynamic" else [
            min(tree.depth, n) if tree.shape == "chain" else tree.depth]

    verified = {(n, cap, d): [_verified_tokens(t, n, cap, d) for t, _ in rec.steps]
                for n in sizes for cap in caps for d in depths(n)}
    needed = {m for ms in verified.values() for m in ms}
    exact = {m for m in needed if m <= EXACT_COST_TOKENS} | {n for n in sizes if n <= max(needed)} | {max(needed)}
    costs = measure_verify_cost(target, n_prompt + profile_tokens // 2, sorted(exact))
    table = []
    for n in sizes:
        rows = []
        for d in depths(n):
            draft_s = per_level * (d if tree.shape != "static" else levels)
            cut = d if tree.shape == "dynamic" else None
            for cap in caps:
                tau = sum(1 + accepted_within_budget(t, p, n, cap, cut) for t, p in rec.steps) / len(rec.steps)
                verify_s = sum(_interpolate(costs, m) for m in verified[n, cap, d]) / len(rec.steps)
                rows.append((n, tau, draft_s, verify_s, tau / (draft_s + verify_s), cap, d))
        table.append(max(rows, key=lambda row: row[4]))
    best = max(table, key=lambda row: row[4])
    summary = (f"tau {best[1]:.2f}, draft {best[2] * 1e3:.0f} ms + verify {best[3] * 1e3:.0f} ms a step, expected "
               f"{best[4]:.1f} tok/s" + (f", lookup {best[5]}" if tree.lookup_tokens else "") + "; "
               + ", ".join(f"{row[0]}:{row[4]:.1f}" for row in table))
    return {"total_tokens": best[0], "depth": best[6], "lookup_tokens": best[5], "table": table, "summary": summary}


def tuned_tree(target, drafter: Drafter, prompt_ids, tree: TreeConfig, eos_token_id=None) -> tuple[TreeConfig, dict]:
    """`tree` with the budget, depth and lookup length `tune_tree_budget` picks for `drafter` on `prompt_ids`, and
    what was tuned: {"total_tokens", "depth", "summary"[, "lookup_tokens" when `tree` grafts lookup]}."""
    tuned = tune_tree_budget(target, drafter, prompt_ids, tree, eos_token_id=eos_token_id)
    record = {k: tuned[k] for k in ("total_tokens", "depth", "summary")}
    if tree.lookup_tokens:
        record["lookup_tokens"] = tuned["lookup_tokens"]
    return dataclasses_replace(tree, total_tokens=tuned["total_tokens"], depth=tuned["depth"],
                               lookup_tokens=tuned["lookup_tokens"]), record
