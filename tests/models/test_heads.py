"""EAGLE-1/2 and EAGLE-3 heads: state-dict layout, shapes for every tiny family, cache / mask equivalences,
the draft vocabulary, gradients, and save / load with target checks."""

import json
import warnings

import pytest
import torch
from transformers import DynamicCache

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import HeadConfig
from adaspec_eagle.models.heads import (Eagle3Head, EagleHead, build_draft_vocab, build_head, load_head, read_token_counts,
                                 save_head, write_token_counts)
from adaspec_eagle.models import TINY_FAMILIES, TINY_VOCAB, target_forward_features, tiny_model

torch.set_num_threads(2)
H = 64

EAGLE1_KEYS = {
    "fc.weight": (H, 2 * H), "fc.bias": (H,),
    "layers.0.self_attn.q_proj.weight": (H, H), "layers.0.self_attn.k_proj.weight": (H // 2, H),
    "layers.0.self_attn.v_proj.weight": (H // 2, H), "layers.0.self_attn.o_proj.weight": (H, H),
    "layers.0.mlp.gate_proj.weight": (2 * H, H), "layers.0.mlp.up_proj.weight": (2 * H, H),
    "layers.0.mlp.down_proj.weight": (H, 2 * H), "layers.0.post_attention_layernorm.weight": (H,),
}


def eagle3_keys(vd, v=TINY_VOCAB, kv=H // 2):
    return {
        "fc.weight": (H, 3 * H),
        "midlayer.self_attn.q_proj.weight": (H, 2 * H), "midlayer.self_attn.k_proj.weight": (kv, 2 * H),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * H), "midlayer.self_attn.o_proj.weight": (H, H),
        "midlayer.mlp.gate_proj.weight": (2 * H, H), "midlayer.mlp.up_proj.weight": (2 * H, H),
        "midlayer.mlp.down_proj.weight": (H, 2 * H), "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,), "midlayer.post_attention_layernorm.weight": (H,),
        "norm.weight": (H,), "lm_head.weight": (vd, H), "d2t": (vd,), "t2d": (v,),
    }


def counts(seed=0):
    return torch.rand(TINY_VOCAB, generator=torch.Generator().manual_seed(seed))


def make(kind, family="llama", seed=0, attn="sdpa", **kw):
    target = tiny_model(family, seed=seed)
    torch.manual_seed(seed + 1)
    head = build_head(target, HeadConfig(kind=kind, draft_vocab_size=40, **kw), token_counts=counts(seed),
                      attn_implementation=attn)
    with torch.no_grad():  # norms start at ones: perturb them so the tests see them
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return target, head.eval()


def inputs(target, head, T=9, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY_VOCAB, (B, T), generator=g)
    feats = target_forward_features(target, ids, eagle3_layers=True)
    return ids, head.project(feats["fused"] if head.uses_fused else feats["features"])


def test_state_dict_layouts():
    _, h1 = make("eagle1", fc_bias=True)
    assert {k: tuple(v.shape) for k, v in h1.state_dict().items()} == EAGLE1_KEYS
    _, h3 = make("eagle3")
    assert {k: tuple(v.shape) for k, v in h3.state_dict().items()} == eagle3_keys(40)
    assert h3.d2t.dtype == torch.int64 and h3.t2d.dtype == torch.bool
    _, nobias = make("eagle1", fc_bias=False)
    assert "fc.bias" not in nobias.state_dict()
    _, default = make("eagle1")  # new heads have no fc bias (vLLM's EAGLE-1 layout has none)
    assert set(default.state_dict()) == set(EAGLE1_KEYS) - {"fc.bias"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_every_family_forward_and_cache(family, kind):
    target, head = make(kind, family)
    ids, hin = inputs(target, head)
    with torch.no_grad():
        full = head(hin[:, :-1], ids[:, 1:])  # (B, 8, H)
        assert full.shape == (2, 8, H) and torch.isfinite(full).all()
        assert head.logits(full).shape == (2, 8, TINY_VOCAB)
        cache = DynamicCache()
        steps = torch.cat([head(hin[:, i:i + 1], ids[:, i + 1:i + 2], cache=cache) for i in range(8)], dim=1)
        cache = DynamicCache()  # chunks of several tokens after a cache (needs an explicit causal mask)
        chunks = torch.cat([head(hin[:, :3], ids[:, 1:4], cache=cache), head(hin[:, 3:8], ids[:, 4:9], cache=cache)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masks_equal_causal_and_tree(kind, attn):
    target, head = make(kind, attn=attn)
    ids, hin = inputs(target, head)
    x, nxt = hin[:, :-1], ids[:, 1:]
    T = 8
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    additive = torch.zeros(T, T).masked_fill(~causal, float("-inf"))
    with torch.no_grad():
        ref = head(x, nxt)
        torch.testing.assert_close(head(x, nxt, attention_mask=causal[None, None].expand(2, 1, T, T)), ref)
        torch.testing.assert_close(head(x, nxt, attention_mask=additive[None, None]), ref)
        torch.testing.assert_close(head(x, nxt, attention_mask=torch.ones(2, T, dtype=torch.long)), ref)
        torch.testing.assert_close(head(x, nxt, attention_mask=causal.long()[None, None]), ref)
        # left padding: the real tokens' outputs equal the unpadded run; padded rows stay finite
        pad = torch.ones(2, T, dtype=torch.long)
        pad[1, :3] = 0
        padded = head(x, nxt, attention_mask=pad, position_ids=(pad.cumsum(1) - 1).clamp(min=0))
        assert torch.isfinite(padded).all()
        torch.testing.assert_close(padded[1, 3:], head(x[1:, 3:], nxt[1:, 3:])[0], atol=1e-5, rtol=1e-4)
        # a tree mask: every token sees token 0 and itself only, at position 1 -> equals the 2-token sequence
        tree = torch.eye(T, dtype=torch.bool)
        tree[:, 0] = True
        pos = torch.tensor([0] + [1] * (T - 1)).expand(2, T)
        out = head(x, nxt, position_ids=pos, attention_mask=tree[None, None])
        for i in (3, 6):
            pair = head(x[:, [0, i]], nxt[:, [0, i]])
            torch.testing.assert_close(out[:, i], pair[:, 1], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(out[:, 3], ref[:, 3], atol=1e-3)  # the mask did change something
        with pytest.raises(AdaspecError, match="4-D attention_mask"):
            head(x, nxt, attention_mask=causal[None, None, :5])


def test_sdpa_equals_eager():
    target, head = make("eagle3", attn="sdpa")
    ids, hin = inputs(target, head)
    with torch.no_grad():
        a = head(hin[:, :-1], ids[:, 1:])
        head.set_attn_implementation("eager")
        b = head(hin[:, :-1], ids[:, 1:])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_draft_vocab():
    c = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3], dtype=torch.float)
    d2t, t2d = build_draft_vocab(c, 4)
    ids = torch.arange(4) + d2t
    assert ids.tolist() == [0, 2, 3, 5] and t2d.tolist() == [i in (0, 2, 3, 5) for i in range(8)]
    d2t, t2d = build_draft_vocab(c, 4, keep_ids=[6])  # a never-seen EOS is kept, the least frequent pick drops
    assert (torch.arange(4) + d2t).tolist() == [2, 3, 5, 6]
    with pytest.raises(AdaspecError):
        build_draft_vocab(c, 1, keep_ids=[1, 6])


def test_build_head_keeps_special_ids():
    target = tiny_model("llama")
    c = torch.arange(TINY_VOCAB, dtype=torch.float)  # id 99 is frequent, ids 0..4 (specials) are the rarest
    head = build_head(target, HeadConfig(kind="eagle3", draft_vocab_size=10), token_counts=c, keep_ids=[2])
    assert head.draft_ids.tolist() == [0, 1, 2, 3, *range(96, 102)]  # pad, bos, keep_ids, eos + 6 most frequent
    with pytest.raises(AdaspecError, match="token_counts has 5 entries"):
        build_head(target, HeadConfig(kind="eagle3"), token_counts=torch.ones(5))


def test_eagle3_logits_map_draft_to_target():
    target, head = make("eagle3")
    ids, hin = inputs(target, head)
    with torch.no_grad():
        out = head(hin[:, :-1], ids[:, 1:])
        full, small = head.logits(out), head.draft_logits(out)
    assert small.shape == (2, 8, 40)
    assert head.t2d.sum() == 40 and head.t2d[3]  # EOS (id 3) is always in the draft vocabulary
    torch.testing.assert_close(full[..., head.draft_ids], small)
    assert torch.isinf(full[..., ~head.t2d]).all() and (full[..., ~head.t2d] < 0).all()
    assert head.t2d[head.draft_ids].all()


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_gradients_reach_head_only(kind):
    target, head = make(kind)
    target.requires_grad_(True)  # even a target left trainable must not be trained through the head
    head.train()
    ids, hin = inputs(target, head)
    out = head(hin[:, :-1], ids[:, 1:])  # EAGLE-3: hin = project(fused) trains fc
    logits = head.draft_logits(out) if kind == "eagle3" else head.logits(out)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert not any(p is q for p in head.parameters() for q in target.parameters())


def test_dtype_cast_keeps_target_and_rope():
    target, head = make("eagle1")
    head.to(torch.bfloat16)
    assert head.fc.weight.dtype == torch.bfloat16 and head.rotary_emb.inv_freq.dtype == torch.float32
    assert target.get_input_embeddings().weight.dtype == torch.float32  # the target is not the head's to move
    ids, hin = inputs(target, head)
    with torch.no_grad():
        out = head(hin[:, :-1], ids[:, 1:])
    assert out.dtype == torch.bfloat16 and torch.isfinite(head.logits(out)).all()


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_save_load_round_trip(tmp_path, kind):
    target, head = make(kind)
    save_head(head, tmp_path / "h", {"loss": "adaspec", "tau": 2.5})
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == TINY_VOCAB
    assert cfg["adaspec"]["kind"] == kind and cfg["adaspec"]["target"]["hidden_size"] == H
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same target: no fingerprint warning
        loaded = load_head(tmp_path / "h", target)
    assert isinstance(loaded, EagleHead if kind == "eagle1" else Eagle3Head) and loaded.meta["tau"] == 2.5
    ids, hin = inputs(target, head)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(hin[:, :-1], ids[:, 1:])),
                                   head.logits(head(hin[:, :-1], ids[:, 1:])), atol=0, rtol=0)


def test_token_counts_travel_with_the_head(tmp_path):
    target, head = make("eagle1")
    c = torch.arange(TINY_VOCAB, dtype=torch.int64) * 3
    folder = save_head(head, tmp_path / "h", {}, token_counts=c)
    assert torch.equal(read_token_counts(folder), c) and torch.equal(load_head(folder, target).token_counts, c)
    bare = save_head(head, tmp_path / "bare", {})
    assert read_token_counts(bare) is None and load_head(bare, target).token_counts is None
    write_token_counts(bare, c + 1)  # added afterwards (atomic rename, no temp file left)
    assert torch.equal(load_head(bare, target).token_counts, c + 1)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors", "token_counts.safetensors"]
    write_token_counts(bare, torch.ones(5))
    with pytest.raises(AdaspecError, match="has 5 entries but the target vocabulary has"):
        load_head(bare, target)
    (bare / "token_counts.safetensors").write_bytes(b"junk")
    with pytest.raises(AdaspecError, match="corrupt"):
        load_head(bare, target)
    with pytest.raises(AdaspecError, match="not a head folder"):
        write_token_counts(tmp_path / "nowhere", c)


def test_load_checks_target_and_files(tmp_path):
    target, head = make("eagle1")
    folder = save_head(head, tmp_path / "h", {})
    with pytest.warns(UserWarning, match="fingerprint"):
        load_head(folder, tiny_model("llama", seed=5))  # same shapes, other weights
    with pytest.raises(AdaspecError, match="hidden_size"):
        load_head(folder, tiny_model("llama", hidden_size=32))
    with pytest.raises(AdaspecError, match="vocab_size"):
        load_head(folder, tiny_model("llama", vocab_size=120))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdaspecError, match="corrupt or truncated"):
        load_head(folder, target)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(AdaspecError, match="corrupt or truncated"):
        load_head(folder, target)
    weights.unlink()
    with pytest.raises(AdaspecError, match="no weight file"):
        load_head(folder, target)
    with pytest.raises(AdaspecError, match="does not exist"):
        load_head(tmp_path / "nowhere", target)


def test_save_unwraps_wrappers(tmp_path):
    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed put around a model: the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    target, head = make("eagle1")
    save_head(Wrapper(head), tmp_path / "h", {})
    torch.testing.assert_close(load_head(tmp_path / "h", target).fc.weight, head.fc.weight)
    with pytest.raises(AdaspecError, match="not an EAGLE head"):
        save_head(torch.nn.Linear(2, 2), tmp_path / "x", {})


def test_save_is_atomic(tmp_path, monkeypatch):
    target, head = make("eagle1")
    folder = save_head(head, tmp_path / "h", {"v": 1})
    from adaspec_eagle.models import heads as heads_module

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(heads_module, "save_file", boom)
    with pytest.raises(OSError):
        save_head(head, folder, {"v": 2})
    assert json.loads((folder / "config.json").read_text())["adaspec"]["meta"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no temporary folder left behind


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_masked_step_over_cache_equals_one_forward(kind):
    """A training-time-test style second step: T new queries over a cache of T keys with an arbitrary 4-D mask
    equals one forward over both steps with the matching (2T, 2T) mask."""
    target, head = make(kind)
    ids, hin = inputs(target, head)
    T = 8
    x0, n0 = hin[:, :-1], ids[:, 1:]
    x1, n1 = torch.randn_like(x0), torch.roll(n0, -1, dims=1)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    step1 = torch.cat([causal, torch.eye(T, dtype=torch.bool)], dim=1)  # (T, 2T): causal on step 0, own slot
    full = torch.cat([torch.cat([causal, torch.zeros(T, T, dtype=torch.bool)], 1), step1], 0)  # (2T, 2T)
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        cache = DynamicCache()
        a0 = head(x0, n0, position_ids=pos, cache=cache)
        a1 = head(x1, n1, position_ids=pos + 1, attention_mask=step1[None, None], cache=cache)
        both = head(torch.cat([x0, x1], 1), torch.cat([n0, n1], 1), position_ids=torch.cat([pos, pos + 1], 1),
                    attention_mask=full[None, None])
    torch.testing.assert_close(torch.cat([a0, a1], 1), both, atol=1e-5, rtol=1e-4)


def test_deepcopy_shares_target_and_accelerate_prepare():
    import copy

    from accelerate import Accelerator

    target, head = make("eagle1")
    twin = copy.deepcopy(head)
    assert twin.target_embed is head.target_embed and twin.target_lm_head is head.target_lm_head
    assert twin.fc.weight is not head.fc.weight
    prepared, opt = Accelerator(cpu=True).prepare(head, torch.optim.AdamW(head.parameters(), lr=1e-3))
    ids, hin = inputs(target, head)
    loss = prepared(hin[:, :-1], ids[:, 1:]).pow(2).mean()
    loss.backward()
    opt.step()
    assert set(prepared.state_dict()) == set(EAGLE1_KEYS) - {"fc.bias"}
