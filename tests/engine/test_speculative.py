"""The speculative engine on tiny random models of every family: greedy output equals plain greedy token for
token (both drafters, every tree shape), drafter caches and compacted target caches equal recomputation, the
sampled output follows the target's distribution, stopping rules; one slow test on the real SmolLM2."""

import copy
import itertools
import types

import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.engine import compat
from adaspec_eagle.config import HeadConfig, TreeConfig
from adaspec_eagle.models.heads import build_head
from adaspec_eagle.models import TINY_FAMILIES, tiny_model, tiny_tokenizer
from adaspec_eagle.engine.speculative import (DEFAULT_DRAFT_VOCAB, DraftLMDrafter, HeadDrafter, LookupDrafter,
                                      lookup_continuation, plain_generate, speculative_generate)
from adaspec_eagle.engine.tree import ancestor_matrix, to_vocab, tree_mask
from adaspec_eagle.engine.verify import warp_probs
from test_verify import chi_square_ok

SHAPES = {
    "chain": TreeConfig(depth=4, topk=1, total_tokens=4, shape="chain"),
    "static": TreeConfig(depth=4, topk=3, total_tokens=10, shape="static"),
    "dynamic": TreeConfig(depth=4, topk=3, total_tokens=10, shape="dynamic"),
}


def noisy_copy(model, scale=0.3, seed=1):
    """A draft that agrees with the target often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return draft


def prompt(seed=1, length=12, vocab=102):
    return torch.randint(5, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


_TARGETS = {}


def target_of(family):
    if family not in _TARGETS:
        _TARGETS[family] = tiny_model(family, seed=0)
    return _TARGETS[family]


def make_drafter(kind, target):
    if kind == "draft_lm":
        return DraftLMDrafter(noisy_copy(target))
    torch.manual_seed(0)
    return HeadDrafter(build_head(target, HeadConfig(kind=kind)).eval())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_equals_plain_greedy(family):
    target = target_of(family)
    ids = prompt()
    ref, _ = plain_generate(target, ids, 16, eos_token_id=[])
    hf = target.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(ids):].tolist()
    assert ref == hf  # the baseline itself equals transformers' greedy generate
    for kind in ("draft_lm", "eagle1", "eagle3"):
        for shape, cfg in SHAPES.items():
            out, stats = speculative_generate(target, ids, make_drafter(kind, target), 16, tree=cfg, eos_token_id=[])
            assert out == ref, (family, kind, shape)
            assert sum(stats["accepted_lengths"]) >= 16 and stats["steps"] == len(stats["accepted_lengths"])
            if kind == "draft_lm":
                assert 0 < stats["accepted_drafts"] < stats["drafted_tokens"], (kind, shape)  # accepts and rejects


@pytest.mark.parametrize("shape", ["chain", "static"])
def test_perfect_drafter_gets_everything_accepted(shape):
    target = target_of("llama")
    out, stats = speculative_generate(target, prompt(), DraftLMDrafter(target), 21, tree=SHAPES[shape],
                                      eos_token_id=[])
    assert stats["accepted_lengths"] == [5] * 5  # every forward's drafts accepted, 25 tokens verified
    assert stats["steps"] == 5 and stats["tau"] == pytest.approx(21 / 5)  # 21 kept


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kept", [(0, 2, 3, 5), (0, 1), (0,)])  # a gather; already in place (only a crop)
def test_compacted_cache_equals_recomputed(family, kept):
    target = target_of(family)
    ids = torch.tensor(prompt(seed=3, length=9))
    #   root = ids[-1]; tree: 1,2 children of root; 3 child of 2; 4 child of 1; 5 child of 3
    tokens = torch.tensor([int(ids[-1]), 11, 12, 13, 14, 15])
    parents = torch.tensor([-1, 0, 0, 2, 1, 3])
    depth = torch.tensor([0, 1, 1, 2, 2, 3])
    cache = compat.new_cache(target.config)
    with torch.no_grad():
        compat.forward(target, ids[None, :-1], cache)
        start = compat.cache_length(cache)
        mask = compat.additive_mask(tree_mask(ancestor_matrix(parents), start), target.dtype)
        compat.forward(target, tokens[None], cache, (depth + start)[None], mask)
        path = torch.tensor(kept)
        compat.compact_cache(cache, start, path)
        fresh = compat.new_cache(target.config)
        compat.forward(target, torch.cat([ids[:-1], tokens[path]])[None], fresh)
    assert compat.cache_length(cache) == compat.cache_length(fresh) == len(ids) - 1 + len(kept)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)


class Recorder:
    """Wraps a drafter; keeps each step's sequence, root logits, expansion logits by slot and the tree."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def root_logits(self, seq):
        out = self.inner.root_logits(seq)
        self.steps.append({"seq": seq.clone(), "root": out, "expanded": []})
        return out

    def expand(self, *args):
        out = self.inner.expand(*args)
        self.steps[-1]["expanded"].append(out)
        return out

    def commit(self, tree, path):
        self.steps[-1]["tree"] = tree
        return self.inner.commit(tree, path)


def _check_step(step, reference) -> int:
    """Every root and tree-node logit the drafter produced in `step` equals `reference(seq + path tokens)`
    computed from scratch: its cache was caught up and compacted correctly, and tree masks / positions are
    right. Returns the number of tree nodes checked."""
    if step["root"] is None:
        return 0
    torch.testing.assert_close(step["root"], reference(step["seq"]), atol=1e-4, rtol=1e-4)
    tree, checked = step["tree"], 0
    by_slot = torch.cat(step["expanded"]) if step["expanded"] else None
    for node in range(1, tree.size + 1):
        slot = int(tree.slots[node])
        if slot < 0:
            continue
        chain, p = [], node
        while p > 0:
            chain.append(int(tree.tokens[p]))
            p = int(tree.parents[p])
        seq = torch.cat([step["seq"], torch.tensor(chain[::-1])])
        torch.testing.assert_close(by_slot[slot], reference(seq), atol=1e-4, rtol=1e-4)
        checked += 1
    return checked


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_draft_lm_logits_equal_recomputation(family):
    target = target_of(family)
    drafter = DraftLMDrafter(noisy_copy(target))
    rec = Recorder(drafter)
    out, _ = speculative_generate(target, prompt(), rec, 20, tree=SHAPES["dynamic"], eos_token_id=[])
    with torch.no_grad():
        checked = sum(_check_step(step, lambda seq: drafter.model(seq[None]).logits[0, -1]) for step in rec.steps)
    assert checked > 0


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_head_logits_equal_recomputation(kind):
    """The head's pair at position t is (f_t, x_{t+1}): true target features for accepted tokens, the head's own
    output for tree nodes. Recomputed per step with a fresh cache, one token at a time."""
    target = target_of("qwen2")
    drafter = make_drafter(kind, target)
    head = drafter.head
    rec = Recorder(drafter)
    speculative_generate(target, prompt(), rec, 10, tree=SHAPES["dynamic"], eos_token_id=[])
    checked = 0
    for step in rec.steps:
        accepted = step["seq"]
        t0 = len(accepted)
        with torch.no_grad():
            hs = target(accepted[None], output_hidden_states=True).hidden_states
        feats = hs[-1] if kind == "eagle1" else torch.cat([hs[i] for i in head.target_layer_ids], -1)

        @torch.no_grad()
        def reference(seq, feats=feats, accepted=accepted, t0=t0):
            cache = compat.new_cache()
            h = head(head.project(feats[:, :t0 - 1]), accepted[None, 1:], torch.arange(t0 - 1)[None], None, cache)
            h = h[:, -1:]  # the root's pair (f_{t0-2}, root) at position t0 - 2
            for i, tok in enumerate(seq[t0:].tolist()):
                h = head(h, torch.tensor([[tok]]), torch.tensor([[t0 - 1 + i]]), None, cache)
            return head.logits(h)[0, -1].float()

        checked += _check_step(step, reference)
    assert checked > 0


def sample_first_two(target, ids, drafter, cfg, temperature, top_p, trials=450):
    """Sampled speculative generation of two tokens over `trials` seeds: (counts (V*V,) of the sampled pairs, the
    target's exact joint probability of each pair (V*V,), drafted tokens, accepted drafts)."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        p1 = warp_probs(target(torch.tensor([ids])).logits[0, -1], temperature, top_p)  # (V,)
        rows = torch.tensor([ids + [x] for x in range(vocab)])
        p2 = warp_probs(target(rows).logits[:, -1], temperature, top_p)  # (V, V)
    counts = torch.zeros(vocab * vocab)
    drafted = accepted = 0
    for seed in range(trials):
        out, stats = speculative_generate(target, ids, drafter, 2, temperature=temperature, top_p=top_p, tree=cfg,
                                          eos_token_id=[], seed=seed)
        counts[out[0] * vocab + out[1]] += 1
        drafted += stats["drafted_tokens"]
        accepted += stats["accepted_drafts"]
    return counts, (p1[:, None] * p2).flatten(), drafted, accepted


def test_sampling_matches_target_distribution():
    """Joint distribution of the first two sampled tokens (a vocabulary of 8) against exact target
    probabilities, with a draft that is often rejected (chain: SpecInfer rule; dynamic tree: top-k rule)."""
    target = tiny_model("llama", seed=0, vocab_size=8)
    ids = prompt(seed=5, length=6, vocab=8)
    trees = {"chain": TreeConfig(depth=2, topk=1, total_tokens=2, shape="chain"),
             "dynamic": TreeConfig(depth=2, topk=2, total_tokens=4, shape="dynamic")}
    for shape, cfg in trees.items():
        drafter = DraftLMDrafter(noisy_copy(target, 0.3, seed=2))  # overlaps the target by ~0.4
        counts, joint, drafted, accepted = sample_first_two(target, ids, drafter, cfg, 0.8, 0.95)
        ok, stat, crit = chi_square_ok(counts, joint)
        assert ok, (shape, stat, crit)
        assert 0.1 * drafted < accepted < 0.9 * drafted, (shape, accepted, drafted)  # accepts and rejects


def test_sampling_applies_top_p_in_verification(monkeypatch):
    """A flatter target (temperature 2) whose top-p 0.8 drops about a fifth of its mass from the first token:
    speculative sampling keeps the target's top-p distribution, and a verification that ignores top-p (the draft
    still drafts inside it) is caught."""
    from adaspec_eagle.engine import speculative

    target = tiny_model("llama", seed=0, vocab_size=8)
    ids = prompt(seed=5, length=6, vocab=8)
    with torch.no_grad():
        logits = target(torch.tensor([ids])).logits[0, -1]
    kept = warp_probs(logits, 2.0, 0.8) > 0
    assert warp_probs(logits, 2.0, 1.0)[~kept].sum() > 0.1  # top-p really removes mass here
    chain = TreeConfig(depth=2, topk=1, total_tokens=2, shape="chain")
    for cfg in (chain, TreeConfig(depth=2, topk=2, total_tokens=4, shape="dynamic")):
        drafter = DraftLMDrafter(noisy_copy(target, 0.3, seed=2))
        counts, joint, _, _ = sample_first_two(target, ids, drafter, cfg, 2.0, 0.8)
        ok, stat, crit = chi_square_ok(counts, joint)
        assert ok, (cfg.shape, stat, crit)
    real = speculative.stochastic_verify
    monkeypatch.setattr(speculative, "stochastic_verify",
                        lambda tree, logits, temperature, top_p, generator: real(tree, logits, temperature, 1.0, generator))
    counts, joint, _, _ = sample_first_two(target, ids, DraftLMDrafter(noisy_copy(target, 0.3, seed=2)), chain, 2.0, 0.8)
    assert not chi_square_ok(counts, joint)[0]


def test_sampled_third_token_follows_the_target():
    """The third sampled token, which comes from a later step than the first or as a bonus after accepted drafts:
    its marginal distribution equals the target's (exact, summed over the 64 two-token prefixes), for a chain
    and a dynamic tree whose drafts are often rejected."""
    target = tiny_model("llama", seed=0, vocab_size=8)
    ids = prompt(seed=5, length=6, vocab=8)
    temperature, top_p, vocab = 1.5, 0.9, 8
    with torch.no_grad():
        p1 = warp_probs(target(torch.tensor([ids])).logits[0, -1], temperature, top_p)  # (V,)
        rows1 = torch.tensor([ids + [a] for a in range(vocab)])
        p2 = warp_probs(target(rows1).logits[:, -1], temperature, top_p)  # (V, V)
        rows2 = torch.tensor([ids + [a, b] for a in range(vocab) for b in range(vocab)])
        p3 = warp_probs(target(rows2).logits[:, -1], temperature, top_p).view(vocab, vocab, vocab)
    marginal = torch.einsum("a,ab,abc->c", p1, p2, p3)
    for cfg in (TreeConfig(depth=2, topk=1, total_tokens=2, shape="chain"),
                TreeConfig(depth=2, topk=2, total_tokens=4, shape="dynamic")):
        drafter = DraftLMDrafter(noisy_copy(target, 0.3, seed=2))
        counts, steps = torch.zeros(vocab), 0
        for seed in range(600):
            out, stats = speculative_generate(target, ids, drafter, 3, temperature=temperature, top_p=top_p,
                                              tree=cfg, eos_token_id=[], seed=seed)
            counts[out[2]] += 1
            steps += stats["steps"]
        ok, stat, crit = chi_square_ok(counts, marginal)
        assert ok, (cfg.shape, counts, marginal, stat, crit)
        assert 600 < steps < 3 * 600  # some generations took several steps, some fewer than three


def test_sampled_generation_stops_at_eos_and_max_tokens():
    """Sampling with tree steps that emit several tokens: the output ends at the first EOS (nothing after it) or at
    max_new_tokens exactly, and the streamed tokens are the output."""
    target = tiny_model("llama", seed=0, vocab_size=8)
    ids = prompt(seed=5, length=6, vocab=8)
    drafter = DraftLMDrafter(noisy_copy(target, 0.3, seed=2))
    cfg = TreeConfig(depth=3, topk=2, total_tokens=6, shape="dynamic")
    ended = 0
    for seed in range(40):
        streamed = []
        out, _ = speculative_generate(target, ids, drafter, 12, temperature=1.5, tree=cfg, eos_token_id=1, seed=seed,
                                      on_tokens=streamed.extend)
        assert out == streamed and len(out) <= 12
        assert 1 not in out[:-1] and (out[-1] == 1 or len(out) == 12)
        ended += out[-1] == 1
    assert 0 < ended < 40  # both ways of ending happen


def test_lookup_continuation():
    seq = torch.tensor([1, 2, 3, 4, 5, 1, 2, 3])
    assert lookup_continuation(seq, 3) == [4, 5, 1]  # the 3-gram 1 2 3 recurs
    assert lookup_continuation(seq, 2, max_ngram=1) == [4, 5]  # only the last token is matched
    assert lookup_continuation(torch.tensor([7, 8, 7, 9, 7]), 5) == [9, 7, 9, 7, 9]  # the latest occurrence, looped
    assert lookup_continuation(torch.tensor([1, 2, 3]), 4) == [] and lookup_continuation(seq, 0) == []
    assert lookup_continuation(torch.tensor([7, 8, 7, 9, 7]), 5, min_ngram=2) == []  # no 2-gram recurs
    loop = torch.tensor([5, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert lookup_continuation(loop, 8) == [1, 2, 3, 1, 2, 3, 1, 2]  # a loop continues past the end of seq


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_lookup_grafted_trees_equal_plain_greedy(family):
    """Prompt-lookup chains grafted onto every drafter's trees (and alone) keep greedy output identical; on a
    repetitive prompt they are drafted and accepted."""
    target = target_of(family)
    ids = prompt(seed=3, length=10)
    ids = ids + ids + ids[:4]
    ref, _ = plain_generate(target, ids, 24, eos_token_id=[])
    drafters = [("lookup", LookupDrafter())] + [(k, make_drafter(k, target)) for k in ("draft_lm", "eagle1", "eagle3")]
    for kind, drafter in drafters:
        for shape, cfg in SHAPES.items():
            if kind == "lookup" and shape != "chain":
                continue
            cfg = TreeConfig(**{**cfg.__dict__, "lookup_tokens": 6})
            out, stats = speculative_generate(target, ids, drafter, 24, tree=cfg, eos_token_id=[])
            assert out == ref, (family, kind, shape)
            assert stats["lookup_drafted"] > 0 and stats["lookup_accepted"] <= stats["lookup_drafted"]
            assert stats["accepted_drafts"] <= stats["drafted_tokens"]
    out, stats = speculative_generate(target, ids, LookupDrafter(), 24, tree=TreeConfig(lookup_tokens=6),
                                      eos_token_id=[])
    assert stats["lookup_accepted"] > 0 and stats["tau"] > 1  # the repeated prompt is copied


def test_sampling_with_lookup_matches_target_distribution():
    """Sampled chains (SpecInfer rule) with deterministic lookup siblings grafted on, and lookup alone: the joint
    distribution of the first two tokens still equals the target's."""
    target = tiny_model("llama", seed=0, vocab_size=8)
    ids = prompt(seed=5, length=6, vocab=8)
    ids = ids + ids[:3]
    chain = TreeConfig(depth=2, topk=1, total_tokens=2, shape="chain", lookup_tokens=3)
    for name, drafter in (("chain+lookup", DraftLMDrafter(noisy_copy(target, 0.3, seed=2))),
                          ("lookup", LookupDrafter())):
        counts, joint, drafted, accepted = sample_first_two(target, ids, drafter, chain, 0.8, 1.0)
        ok, stat, crit = chi_square_ok(counts, joint)
        assert ok, (name, stat, crit)
        assert 0 < accepted < drafted, (name, accepted, drafted)


def restricted_head_drafter(target, size, seed=0):
    """An EAGLE-1 head drafter that drafts from `size` ids only, ranked by made-up training counts."""
    torch.manual_seed(seed)
    head = build_head(target, HeadConfig(kind="eagle1")).eval()
    vocab = target.config.vocab_size
    head.token_counts = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed)).to(torch.int64)
    return HeadDrafter(head, draft_vocab=size)


def test_restricted_draft_vocab_is_lossless_and_cheaper(monkeypatch):
    target = target_of("llama")
    ids = prompt()
    ref, _ = plain_generate(target, ids, 16, eos_token_id=[])
    drafter = restricted_head_drafter(target, 40)
    assert drafter.draft_vocab_size == 40 and drafter._weight.shape == (40, target.config.hidden_size)
    eos = target.config.eos_token_id
    assert eos in drafter.vocab_ids.tolist()  # EOS is always draftable
    full = HeadDrafter(drafter.head)
    hidden = torch.randn(1, 3, target.config.hidden_size)
    assert drafter._logits(hidden).shape == (3, 40) and drafter.vocab_size == target.config.vocab_size
    a, b = to_vocab(drafter._logits(hidden), drafter.vocab_ids, drafter.vocab_size), full._logits(hidden)
    inside = torch.zeros(b.shape[-1], dtype=torch.bool)
    inside[drafter.vocab_ids] = True
    tol = {} if drafter._weight.dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}  # bf16 ranking weights
    torch.testing.assert_close(a[:, inside], b[:, inside], **tol)
    assert torch.isneginf(a[:, ~inside]).all()
    for shape, cfg in SHAPES.items():
        out, stats = speculative_generate(target, ids, drafter, 16, tree=cfg, eos_token_id=[])
        assert out == ref, shape
    # what the choices mean, and the errors
    assert HeadDrafter(drafter.head, draft_vocab=0).draft_vocab_size is None
    assert HeadDrafter(drafter.head, draft_vocab=10_000).draft_vocab_size is None  # >= V: the whole vocabulary
    assert HeadDrafter(drafter.head, draft_vocab="auto").draft_vocab_size is None  # 8192 >= 102 ids: all of them
    monkeypatch.setattr("adaspec_eagle.engine.speculative.DEFAULT_DRAFT_VOCAB", 50)
    assert HeadDrafter(drafter.head, draft_vocab="auto").draft_vocab_size == 50  # with counts: the default
    drafter.head.token_counts = None
    assert HeadDrafter(drafter.head, draft_vocab="auto").draft_vocab_size is None
    with pytest.raises(AdaspecError, match="needs the head's training-token counts"):
        HeadDrafter(drafter.head, draft_vocab=40)
    from adaspec_eagle.engine.speculative import parse_draft_vocab

    assert parse_draft_vocab("auto") == "auto" and parse_draft_vocab("8192") == 8192
    with pytest.raises(AdaspecError, match="--draft-vocab"):
        parse_draft_vocab("-3")


def test_sampling_with_a_restricted_draft_vocab_matches_the_target():
    """A head drafting from 4 of 8 ids (its proposal has no mass on the other 4): rejection sampling still gives
    the target's distribution of the first two tokens."""
    target = tiny_model("llama", seed=0, vocab_size=8)
    ids = prompt(seed=5, length=6, vocab=8)
    drafter = restricted_head_drafter(target, 4, seed=3)
    cfg = TreeConfig(depth=2, topk=1, total_tokens=2, shape="chain")
    counts, joint, _, _ = sample_first_two(target, ids, drafter, cfg, 0.8, 1.0)
    ok, stat, crit = chi_square_ok(counts, joint)
    assert ok, (stat, crit)


def test_eagle3_head_with_a_restricted_draft_vocabulary():
    """An EAGLE-3 head drafting over 40 of the target's ids: the drafter ranks over them (its logits equal the head's
    whole-vocabulary logits there), greedy output equals plain greedy for every tree shape, sampling keeps the
    target's distribution, and a d2t that leaves the target's vocabulary is refused."""
    target = target_of("llama")
    vocab = target.config.vocab_size
    counts = torch.randperm(vocab, generator=torch.Generator().manual_seed(1)).float()
    torch.manual_seed(0)
    head = build_head(target, HeadConfig(kind="eagle3", draft_vocab_size=40), token_counts=counts).eval()
    drafter = HeadDrafter(head)
    assert drafter.vocab_ids.numel() == 40 and drafter.vocab_size == vocab
    assert drafter.vocab_ids.tolist() == head.draft_ids.tolist() != list(range(40))
    hidden = torch.randn(1, 3, target.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(drafter._logits(hidden), head.logits(hidden)[0][:, drafter.vocab_ids])
    ids = prompt()
    ref, _ = plain_generate(target, ids, 16, eos_token_id=[])
    for shape, cfg in SHAPES.items():
        out, _ = speculative_generate(target, ids, drafter, 16, tree=cfg, eos_token_id=[])
        assert out == ref, shape
    bad = copy.deepcopy(head)
    bad.d2t[0] = vocab  # draft id 0 -> target id vocab: outside the target
    with pytest.raises(AdaspecError, match="d2t"):
        HeadDrafter(bad)

    small = tiny_model("llama", seed=0, vocab_size=8)
    torch.manual_seed(3)
    head8 = build_head(small, HeadConfig(kind="eagle3", draft_vocab_size=4),
                       token_counts=torch.randperm(8, generator=torch.Generator().manual_seed(3)).float()).eval()
    ids8 = prompt(seed=5, length=6, vocab=8)
    for cfg in (TreeConfig(depth=2, topk=1, total_tokens=2, shape="chain"),
                TreeConfig(depth=2, topk=2, total_tokens=4, shape="dynamic")):
        counts8, joint, _, _ = sample_first_two(small, ids8, HeadDrafter(head8), cfg, 0.8, 1.0)
        ok, stat, crit = chi_square_ok(counts8, joint)
        assert ok, (cfg.shape, stat, crit)


def test_tree_budget_tuning_picks_the_best_measured_budget():
    from adaspec_eagle.engine.speculative import AUTO_BUDGETS, tune_tree_budget

    target = target_of("llama")
    drafter = make_drafter("draft_lm", target)
    tuned = tune_tree_budget(target, drafter, prompt(), TreeConfig(depth=4, topk=3), profile_tokens=12,
                             eos_token_id=[])
    table = tuned["table"]
    assert [row[0] for row in table] == list(AUTO_BUDGETS)
    taus = [row[1] for row in table]
    assert taus[0] >= 1 and all(a <= b + 1e-9 for a, b in zip(taus, taus[1:]))  # a bigger tree never accepts less
    assert all(row[4] == pytest.approx(row[1] / (row[2] + row[3])) for row in table)
    best = max(table, key=lambda row: row[4])
    assert tuned["total_tokens"] == best[0] and tuned["depth"] == best[6] <= min(4, best[0])
    assert table[0][6] == 1 and all(1 <= row[6] <= min(4, row[0]) for row in table)  # a 1-token budget: one level
    assert all(row[2] == pytest.approx(table[0][2] * row[6]) for row in table)  # a draft forward per level
    out, _ = speculative_generate(target, prompt(), drafter, 12, eos_token_id=[],
                                  tree=TreeConfig(depth=tuned["depth"], topk=3, total_tokens=tuned["total_tokens"]))
    assert out == plain_generate(target, prompt(), 12, eos_token_id=[])[0]


def test_budget_accounting_and_tuning_with_lookup(monkeypatch):
    """Lookup nodes do not count against the budget (they stay while the path above them does) and a chain cut
    to L tokens keeps the grafted nodes of depth <= L; the tuner prices every step at the tokens it verifies and
    picks the chain length the verify cost pays for."""
    from adaspec_eagle.engine import speculative
    from adaspec_eagle.engine.speculative import _verified_tokens, accepted_within_budget, tune_tree_budget
    from adaspec_eagle.engine.tree import DraftTree, graft_chain

    #   root -> 4 (score -0.1) -> 6 (-0.9);  root -> 5 (-0.5); then the lookup chain 4 -> 7 -> 8 grafted
    tree = DraftTree(torch.tensor([9, 4, 5, 6]), torch.tensor([-1, 0, 0, 1]), torch.tensor([0, 1, 1, 2]),
                     torch.tensor([0.0, -0.1, -0.5, -0.9]), torch.tensor([-1, 0, 1, -1]))
    tree, _ = graft_chain(tree, [4, 7, 8])
    path = [0, 1, 4, 5]  # 4, then the two lookup tokens
    assert [accepted_within_budget(tree, path, n) for n in (0, 1, 2, 3)] == [0, 3, 3, 3]
    assert [accepted_within_budget(tree, [0, 1, 3], n) for n in (1, 2, 3)] == [1, 1, 2]  # 6 ranks third
    assert [accepted_within_budget(tree, path, 3, cap) for cap in (0, 1, 2, 3, 8)] == [1, 1, 2, 3, 3]
    assert [_verified_tokens(tree, n, cap) for n, cap in ((1, 3), (3, 2), (3, 0), (9, 9))] == [3, 4, 3, 5]
    assert accepted_within_budget(tree, [0, 1, 3], 3, max_depth=1) == 1  # 6 sits at depth 2: not drafted
    assert _verified_tokens(tree, 3, 0, max_depth=1) == 2  # only 4 and 5 are drafted one level deep

    # A shallower tree spends its budget on the best nodes it still drafts: root -> 4 (-0.1) -> 5 (-0.2) and
    # root -> 6 (-0.5). Two tokens two levels deep keep 4, 5; one level deep they keep 4, 6.
    deep = DraftTree(torch.tensor([9, 4, 5, 6]), torch.tensor([-1, 0, 1, 0]), torch.tensor([0, 1, 2, 1]),
                     torch.tensor([0.0, -0.1, -0.2, -0.5]), torch.tensor([-1, 0, 1, 2]))
    assert [accepted_within_budget(deep, [0, 3], 2, max_depth=d) for d in (None, 2, 1)] == [0, 0, 1]
    assert [accepted_within_budget(deep, [0, 1, 2], 2, max_depth=d) for d in (None, 2, 1)] == [2, 2, 1]

    target = target_of("llama")
    ids = prompt(seed=1, length=10)
    ids = ids + ids + ids[:4]  # the tiny target copies it after 4 tokens: steps of 1, 1, 1, 1, 7, 7
    cfg = TreeConfig(depth=2, topk=2, lookup_tokens=6)
    for slope, want in ((0.0, 6), (10.0, 0)):  # free extra tokens: the whole chain; costly ones: none
        asked = []
        monkeypatch.setattr(speculative, "measure_verify_cost", lambda t, n, sizes, **kw: asked.append(sizes) or {
            m: 1.0 + slope * m for m in sizes})
        tuned = tune_tree_budget(target, LookupDrafter(), ids, cfg, sizes=(1, 2), profile_tokens=16,
                                 eos_token_id=[])
        assert tuned["lookup_tokens"] == want and all(row[5] == want for row in tuned["table"])
        assert tuned["table"][0][1] == pytest.approx(18 / 6 if want == 6 else 1.0)  # accepted lookup tokens count
        assert 6 in asked[0] and 0 in asked[0]  # every chain length's verify size was measured


def test_eos_stop_strings_and_max_tokens():
    target = target_of("llama")
    tok = tiny_tokenizer()
    ids = prompt()
    ref, _ = plain_generate(target, ids, 30, eos_token_id=[])
    drafter = DraftLMDrafter(noisy_copy(target))
    out, _ = speculative_generate(target, ids, drafter, 7, tree=SHAPES["dynamic"], eos_token_id=[])
    assert out == ref[:7]
    eos = ref[9]
    first = ref.index(eos)
    out, _ = speculative_generate(target, ids, drafter, 30, tree=SHAPES["dynamic"], eos_token_id=eos)
    assert out == ref[:first + 1]
    text = tok.decode(ref)
    stop = text[12:15]
    out, _ = speculative_generate(target, ids, drafter, 30, tree=SHAPES["chain"], eos_token_id=[],
                                  stop_strings=[stop], tokenizer=tok)
    n = next(k for k in range(1, 31) if stop in tok.decode(ref[:k]))
    assert out == ref[:n]
    plain, _ = plain_generate(target, ids, 30, eos_token_id=[], stop_strings=[stop], tokenizer=tok)
    assert plain == out
    streamed = []
    out, _ = speculative_generate(target, ids, drafter, 11, tree=SHAPES["static"], eos_token_id=[],
                                  on_tokens=streamed.extend)
    assert streamed == out == ref[:11]


class _CleanupTokenizer:
    """Decodes token t to "<t> ", except `dot` to ". ", then drops a space before "." (as Hugging Face's
    clean_up_tokenization_spaces does): "<a> " is in decode([a]) but not in decode([a, dot])."""

    def __init__(self, dot):
        self.dot = dot

    def decode(self, tokens, skip_special_tokens=False):
        return "".join(". " if t == self.dot else f"<{t}> " for t in tokens).replace(" .", ".")


def test_stop_strings_checked_at_every_token_when_decoding_is_not_prefix_monotone():
    """A stop string that a prefix of one step's tokens shows and the whole step's text does not: speculative
    decoding stops where plain decoding does, at that prefix."""
    target = target_of("llama")
    ids = prompt()
    drafter = DraftLMDrafter(target)  # the target drafting for itself: every chain is accepted whole
    chain = SHAPES["chain"]
    ref, stats = speculative_generate(target, ids, drafter, 30, tree=chain, eos_token_id=[])
    assert ref == plain_generate(target, ids, 30, eos_token_id=[])[0]
    ends = set(itertools.accumulate(stats["accepted_lengths"]))  # lengths at which a step ended
    assert max(stats["accepted_lengths"]) > 1
    i = next(i for i in range(len(ref) - 1) if i + 1 not in ends and ref[i] not in ref[:i] and ref[i + 1] != ref[i])
    tok = _CleanupTokenizer(dot=ref[i + 1])
    stop = f"<{ref[i]}> "
    assert stop in tok.decode(ref[:i + 1]) and stop not in tok.decode(ref[:i + 2])
    plain, _ = plain_generate(target, ids, 30, eos_token_id=[], stop_strings=[stop], tokenizer=tok)
    assert plain == ref[:i + 1]
    streamed = []
    out, _ = speculative_generate(target, ids, drafter, 30, tree=chain, eos_token_id=[], stop_strings=[stop],
                                  tokenizer=tok, on_tokens=streamed.extend)
    assert out == streamed == plain


def test_tau_counts_the_tokens_kept():
    """A drafter that is always right verifies depth + 1 tokens a forward; with max_new_tokens 3 the one forward
    keeps 3 of its 5: tau is 3 (the tokens the user got), the accepted lengths say what verification accepted."""
    target = target_of("llama")
    out, stats = speculative_generate(target, prompt(), DraftLMDrafter(target), 3, tree=SHAPES["chain"],
                                      eos_token_id=[])
    assert len(out) == 3 and stats["steps"] == 1
    assert stats["accepted_lengths"] == [5] and stats["tau"] == pytest.approx(3.0)


def test_user_errors():
    target = target_of("llama")
    drafter = DraftLMDrafter(target)
    with pytest.raises(AdaspecError, match="batch size 1"):
        speculative_generate(target, torch.ones(2, 4, dtype=torch.long), drafter, 4)
    with pytest.raises(AdaspecError, match="tokenizer"):
        speculative_generate(target, [5, 6], drafter, 4, stop_strings=["x"])
    with pytest.raises(AdaspecError, match="empty"):
        speculative_generate(target, [], drafter, 4)
    # an attention kernel that ignores a tree's mask would let draft tokens see their siblings: refused before
    # the forward (a stub model: loading flash-attention needs its kernels)
    flash = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    mask = torch.zeros(1, 1, 2, 2)
    with pytest.raises(AdaspecError, match="attn_implementation='sdpa'"):
        compat.forward(flash, torch.tensor([[5, 6]]), compat.new_cache(), torch.tensor([[0, 1]]), mask)
    assert compat.forward(target, torch.tensor([[5, 6]]), compat.new_cache(), torch.tensor([[0, 1]]), mask) is not None


@pytest.mark.slow
def test_smollm2_greedy_equality(smollm2):
    model, tok = smollm2
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:6]  # a draft derived from the target: its first 6 layers
    draft.config.num_hidden_layers = 6
    torch.manual_seed(0)
    head = build_head(model, HeadConfig(kind="eagle1")).eval()
    small = TreeConfig(depth=3, topk=3, total_tokens=8, shape="dynamic")
    for text in ("The capital of France is", "def fibonacci(n):"):
        ids = tok(text)["input_ids"]
        ref, _ = plain_generate(model, ids, 24, eos_token_id=[])
        for drafter in (DraftLMDrafter(draft), HeadDrafter(head)):
            out, stats = speculative_generate(model, ids, drafter, 24, tree=small, eos_token_id=[])
            assert out == ref, (text, type(drafter).__name__, tok.decode(out), tok.decode(ref))


def test_generation_runs_to_the_context_end_as_plain_decoding_does(monkeypatch):
    """Near the context end the trees and lookup chains are cut to the positions left: the output equals plain
    greedy's to the last position, and no draft token is placed past it."""
    from adaspec_eagle import AdaspecError
    from adaspec_eagle.config import TreeConfig
    from adaspec_eagle.models import tiny_model
    from adaspec_eagle.engine.speculative import DraftLMDrafter, plain_generate, speculative_generate

    target = tiny_model("llama", max_position_embeddings=40)
    draft = tiny_model("llama", seed=1, num_layers=1, max_position_embeddings=40)
    prompt = list(range(5, 35))  # 30 of 40 positions
    plain, _ = plain_generate(target, prompt, max_new_tokens=100, eos_token_id=[])
    assert len(plain) == 10
    tree = TreeConfig(depth=3, topk=2, total_tokens=6)
    spec, _ = speculative_generate(target, prompt, DraftLMDrafter(draft), max_new_tokens=100, tree=tree,
                                   eos_token_id=[])
    assert spec == plain
    for shape in ("chain", "dynamic"):  # sampled: every position to the end is filled too
        sampled, _ = speculative_generate(target, prompt, DraftLMDrafter(draft), max_new_tokens=100, eos_token_id=[],
                                          tree=TreeConfig(depth=3, topk=2, total_tokens=6, shape=shape),
                                          temperature=0.8, seed=0)
        assert len(sampled) == 10
    looping = list(range(5, 25)) + list(range(5, 15))  # 30 tokens that repeat: lookup drafts 20-token chains
    ref, _ = plain_generate(target, looping, max_new_tokens=100, eos_token_id=[])
    positions = []
    real_forward = compat.forward

    def forward(model, input_ids, cache, position_ids=None, *args, **kwargs):
        if model is target and position_ids is not None:
            positions.append(int(position_ids.max()))
        return real_forward(model, input_ids, cache, position_ids, *args, **kwargs)

    monkeypatch.setattr(compat, "forward", forward)
    torch.manual_seed(0)
    head = HeadDrafter(build_head(target, HeadConfig(kind="eagle1")).eval())
    for drafter in (DraftLMDrafter(draft), head, LookupDrafter()):  # lookup chains are cut to the positions left
        looked, stats = speculative_generate(target, looping, drafter, max_new_tokens=100, eos_token_id=[],
                                             tree=TreeConfig(depth=3, topk=2, total_tokens=6, lookup_tokens=20))
        assert looked == ref and len(ref) == 40 - 30
        assert stats["lookup_drafted"] > 0 and max(positions) == 39, positions  # the last position, never past
    with pytest.raises(AdaspecError, match="the prompt has 40 tokens but the target's context is 40 positions"):
        plain_generate(target, list(range(5, 45)), max_new_tokens=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-adaspec", "smollm2-135m-kd"])
def test_shipped_heads_are_lossless_and_accept_drafts(smollm2, name):
    """The heads in heads/ load against the bundled target, keep greedy output exact, and (being trained)
    get drafts accepted: a random head accepts almost nothing (see test_smollm2_greedy_equality)."""
    from pathlib import Path

    from adaspec_eagle.models.heads import load_head

    model, tok = smollm2
    head = load_head(Path(__file__).resolve().parents[2] / "heads" / name, model)
    text = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ref, _ = plain_generate(model, ids, 32, eos_token_id=[])
    for drafter in (HeadDrafter(head), HeadDrafter(head, draft_vocab="auto")):
        out, stats = speculative_generate(model, ids, drafter, 32, eos_token_id=[],
                                          tree=TreeConfig(depth=3, topk=4, total_tokens=8))
        assert out == ref
        assert stats["tau"] > 1.2, stats["tau"]
    assert drafter.draft_vocab_size == DEFAULT_DRAFT_VOCAB == 8192  # the shipped heads carry token counts


@pytest.mark.slow
def test_readme_python_example_runs(smollm2, monkeypatch, capsys):
    """The README's Python example (real SmolLM2, a shipped head, prompt lookup grafted on) runs as printed and
    its greedy output equals plain greedy (the example asserts it)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "speculative_generate(" in b)
    monkeypatch.chdir(root)
    exec(compile(example, "README.md", "exec"), {})
    assert re.search(r"tau \d\.\d\d, [\d.]+ tok/s", capsys.readouterr().out)


def test_generation_and_head_evaluation_run_without_autograd(monkeypatch):
    """The engine's loops and the held-out evaluation must not build graphs: with grad enabled the small-batch
    linear routing steps aside and a verify step costs twice as much (a decorator once slid onto a helper)."""
    import adaspec_eagle.engine.compat as compat_mod
    from adaspec_eagle.training.head import evaluate_head
    from _helpers import samples

    target = target_of("llama")
    seen = []
    real_forward = compat_mod.forward

    def forward(*a, **kw):
        seen.append(torch.is_grad_enabled())
        return real_forward(*a, **kw)

    monkeypatch.setattr(compat_mod, "forward", forward)
    drafter = HeadDrafter(build_head(target, HeadConfig()).eval())
    speculative_generate(target, [5, 6, 7, 8], drafter, 6, tree=TreeConfig(depth=2, topk=2, total_tokens=3))
    plain_generate(target, [5, 6, 7, 8], 4)
    assert seen and not any(seen)
    from adaspec_eagle.training import head as head_mod

    calls, real_chain = [], head_mod.chain_acceptance
    monkeypatch.setattr(head_mod, "chain_acceptance",
                        lambda *a, **kw: calls.append(torch.is_grad_enabled()) or real_chain(*a, **kw))
    evaluate_head(build_head(target, HeadConfig()), target, samples(4, T=12), chain=2)
    assert calls and not any(calls)
