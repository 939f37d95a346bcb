"""The head objective's knobs (EAGLE-1 weighting, feature noise, restricted training vocabulary, EAGLE-3's
out-of-vocabulary rule), the AdaSPEC budget protocol, and the held-out chain-acceptance evaluation, on tiny
models."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import HeadConfig, HeadRecipe, LossConfig, TrainConfig, load_recipe
from adaspec_eagle.training.features import pad_batch
from adaspec_eagle.models.heads import build_head, load_head
from adaspec_eagle.models import target_forward_features, tiny_model
from adaspec_eagle.training.head import (chain_acceptance, eagle3_loss, evaluate_head, head_forward, head_loss,
                                      head_valid_mask, position_records, reference_steps, restricted_vocab,
                                      stage_budget, budget_note, TTTUnroll)
from _helpers import samples

TINY_RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "heads" / "tiny.yaml")


def setup(seed=0, n=4):
    target = tiny_model("llama").requires_grad_(False)
    torch.manual_seed(seed)
    head = build_head(target, HeadConfig())
    batch = pad_batch(samples(n, T=20, seed=seed), 0)
    return target, head, batch


def grads(head, loss):
    head.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}


def test_loss_is_the_weighted_sum_of_token_and_feature_terms():
    target, head, batch = setup()
    kd = LossConfig(kind="kd")
    token, _ = head_loss(head, batch, target=target, loss_cfg=kd, feature_loss_weight=0.0)
    both, _ = head_loss(head, batch, target=target, loss_cfg=kd, feature_loss_weight=1.0, token_loss_weight=0.1)
    feats = target_forward_features(target, batch["input_ids"], batch["attention_mask"])["features"]
    valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])
    hidden = head_forward(head, feats, batch["input_ids"])[valid]
    feature = F.smooth_l1_loss(hidden, feats[:, 1:][valid], reduction="none").mean(-1).sum() / valid.sum()
    torch.testing.assert_close(both, 0.1 * token + feature)


@pytest.mark.parametrize("kind", ["adaspec", "kd"])
def test_sharded_lm_head_path_gives_the_same_loss_and_gradients(monkeypatch, kind):
    """The ZeRO-3 path (lm_head called as a module, whole logits) trains what the chunked path trains: the same
    token loss, the feature loss at the same kept positions, the same gradients."""
    from adaspec_eagle.training import head as train_head

    target, head, batch = setup()
    torch.manual_seed(3)
    reference = build_head(target, HeadConfig())
    cfg = LossConfig(kind=kind, k=0.25)

    def run():
        loss, stats = head_loss(head, batch, target=target, loss_cfg=cfg, reference=reference,
                                feature_loss_weight=1.0, token_loss_weight=0.1)
        return loss.detach(), stats, grads(head, loss)

    chunked = run()
    monkeypatch.setattr(train_head, "_is_partitioned", lambda module: True)
    sharded = run()
    assert chunked[1] == pytest.approx(sharded[1]) and (kind == "kd" or chunked[1]["kept"] < chunked[1]["valid"])
    torch.testing.assert_close(sharded[0], chunked[0])
    for name, g in chunked[2].items():
        torch.testing.assert_close(sharded[2][name], g, atol=1e-6, rtol=1e-4)


def test_feature_noise_only_while_training():
    target, head, batch = setup()
    kd = LossConfig(kind="kd")
    clean, _ = head_loss(head, batch, target=target, loss_cfg=kd, feature_loss_weight=1.0)
    torch.manual_seed(1)
    noisy, _ = head_loss(head, batch, target=target, loss_cfg=kd, feature_loss_weight=1.0, feature_noise=0.5)
    assert not torch.allclose(clean, noisy)  # the input features were perturbed
    with torch.no_grad():  # evaluation: no noise whatever the setting
        a, _ = head_loss(head, batch, target=target, loss_cfg=kd, feature_loss_weight=1.0, feature_noise=0.5)
    torch.testing.assert_close(a, clean.detach())


def test_noise_has_the_configured_width():
    from adaspec_eagle.training.head import add_feature_noise

    x = torch.zeros(200_000)
    noise = add_feature_noise(x, 0.2)
    assert -0.1 <= float(noise.min()) < -0.099 and 0.099 < float(noise.max()) <= 0.1
    assert abs(float(noise.mean())) < 1e-3
    assert add_feature_noise(x, 0.0) is x


@pytest.mark.parametrize("kind", ["kd", "adaspec"])
def test_restricted_vocabulary_equal_to_the_full_loss_when_it_is_whole(kind):
    target, head, batch = setup()
    torch.manual_seed(3)
    reference = build_head(target, HeadConfig())
    cfg = LossConfig(kind=kind, k=0.5)
    vocab = target.get_output_embeddings().weight.shape[0]
    every = torch.randperm(vocab)  # the whole vocabulary, in another order
    full, s_full = head_loss(head, batch, target=target, loss_cfg=cfg, reference=reference, feature_loss_weight=1.0)
    g_full = grads(head, full)
    part, s_part = head_loss(head, batch, target=target, loss_cfg=cfg, reference=reference, feature_loss_weight=1.0,
                             vocab_ids=every)
    g_part = grads(head, part)
    torch.testing.assert_close(part, full)
    assert s_part == pytest.approx(s_full)
    for name in g_full:
        torch.testing.assert_close(g_part[name], g_full[name])


def test_restricted_vocabulary_renormalises_and_leaves_out_unnamed_targets():
    target, head, batch = setup()
    cfg = LossConfig(kind="kd")
    ids = torch.arange(5, 40)  # a part of the vocabulary (the samples use ids 5..101)
    n_valid = float(head_valid_mask(batch["loss_mask"], batch["attention_mask"]).sum())
    loss, stats = head_loss(head, batch, target=target, loss_cfg=cfg, vocab_ids=ids, feature_loss_weight=0.0,
                            num_items=n_valid)  # the loop's num_items: every valid position of the step
    feats = target_forward_features(target, batch["input_ids"], batch["attention_mask"])["features"]
    valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])
    labels = F.pad(batch["input_ids"][:, 2:], (0, 1))[valid]
    inside = (labels >= 5) & (labels < 40)
    w = target.get_output_embeddings().weight[ids]
    with torch.no_grad():
        student = head_forward(head, feats, batch["input_ids"])[valid] @ w.T
        teacher = feats[:, 1:][valid] @ w.T
    lp = teacher.log_softmax(-1)
    kl = (lp.exp() * (lp - student.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(loss, kl[inside].sum() / valid.sum())
    assert stats["valid"] == int(inside.sum()) < int(valid.sum())
    # without the rule every valid position trains on the renormalised teacher
    loss_all, _ = head_loss(head, batch, target=target, loss_cfg=cfg, vocab_ids=ids, exclude_out_of_vocab=False)
    torch.testing.assert_close(loss_all, kl.sum() / valid.sum())


def test_restricted_vocab_ids_are_the_drafters():
    from adaspec_eagle.engine.speculative import HeadDrafter

    target, head, _ = setup()
    counts = torch.zeros(target.get_output_embeddings().weight.shape[0], dtype=torch.int64)
    counts[10:60] = torch.arange(50, 0, -1)
    head.token_counts = counts
    ids = restricted_vocab(head, counts, 20)
    drafter = HeadDrafter(head, draft_vocab=20)
    assert torch.equal(ids.sort().values, drafter.vocab_ids.cpu().sort().values)
    assert restricted_vocab(head, counts, 0) is None and restricted_vocab(head, counts, 10**6) is None


def test_adaspec_feature_loss_covers_only_kept_positions():
    target, head, batch = setup()
    torch.manual_seed(3)
    reference = build_head(target, HeadConfig())
    ada = LossConfig(kind="adaspec", k=0.25)
    with_feat, _ = head_loss(head, batch, target=target, loss_cfg=ada, reference=reference, feature_loss_weight=1.0)
    no_feat, stats = head_loss(head, batch, target=target, loss_cfg=ada, reference=reference,
                               feature_loss_weight=0.0)
    feats = target_forward_features(target, batch["input_ids"], batch["attention_mask"])["features"]
    valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])
    per = F.smooth_l1_loss(head_forward(head, feats, batch["input_ids"])[valid], feats[:, 1:][valid],
                           reduction="none").mean(-1)
    extra = float((with_feat - no_feat).detach()) * float(valid.sum())  # the feature term's sum over the positions it covers
    n_kept = int(stats["kept"])
    assert 0 < n_kept < stats["valid"]
    ordered = per.detach().sort().values
    # the sum over some n_kept of the valid positions: between the n_kept smallest and the n_kept largest
    assert float(ordered[:n_kept].sum()) - 1e-4 <= extra <= float(ordered[-n_kept:].sum()) + 1e-4


def test_adaspec_feature_loss_at_all_positions_is_kds_feature_term():
    """feature_positions='all': the AdaSPEC loss's feature term is the smooth-L1 mean over every valid position,
    the same term KD adds, while its token term stays the selective one."""
    target, head, batch = setup()
    torch.manual_seed(3)
    reference = build_head(target, HeadConfig())
    ada, kd = LossConfig(kind="adaspec", k=0.25), LossConfig(kind="kd")
    kw = {"target": target, "reference": reference}
    token_only, _ = head_loss(head, batch, loss_cfg=ada, feature_loss_weight=0.0, **kw)
    ada_all, stats = head_loss(head, batch, loss_cfg=ada, feature_loss_weight=1.0, feature_positions="all", **kw)
    ada_kept, _ = head_loss(head, batch, loss_cfg=ada, feature_loss_weight=1.0, **kw)
    kd_token, _ = head_loss(head, batch, loss_cfg=kd, feature_loss_weight=0.0, **kw)
    kd_both, _ = head_loss(head, batch, loss_cfg=kd, feature_loss_weight=1.0, **kw)
    feats = target_forward_features(target, batch["input_ids"], batch["attention_mask"])["features"]
    valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])
    mean_all = F.smooth_l1_loss(head_forward(head, feats, batch["input_ids"])[valid], feats[:, 1:][valid])
    assert 0 < stats["kept"] < stats["valid"]  # the token loss still selects
    torch.testing.assert_close(ada_all - token_only, mean_all, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ada_all - token_only, kd_both - kd_token, rtol=1e-5, atol=1e-6)
    # 'kept' covers a quarter of the positions
    assert float((ada_kept - token_only).detach()) < float(mean_all.detach()) - 1e-4
    # the gradient reaches the head through the positions the selection leaves out too
    g_all, g_kept = grads(head, ada_all), grads(head, ada_kept)  # the token terms are the same
    assert any(not torch.allclose(g_all[n], g_kept[n]) for n in g_all)


def test_feature_loss_positions_key_is_checked():
    recipe = TINY_RECIPE
    assert load_recipe(HeadRecipe, recipe, ["head.feature_loss_positions=all"]).head.feature_loss_positions == "all"
    with pytest.raises(AdaspecError, match="head.feature_loss_positions.*'kept', 'all'"):
        load_recipe(HeadRecipe, recipe, ["head.feature_loss_positions=some"])


def test_eagle3_leaves_out_positions_whose_target_is_outside_the_draft_vocabulary():
    target = tiny_model("llama").requires_grad_(False)
    counts = torch.zeros(target.get_output_embeddings().weight.shape[0], dtype=torch.int64)
    counts[5:40] = 1  # draft vocabulary: ids 5..39 (+ special ids)
    head = build_head(target, HeadConfig(kind="eagle3", draft_vocab_size=40), token_counts=counts)
    batch = pad_batch(samples(4, T=20, seed=2), 0)
    cfg = LossConfig(kind="kd")
    kept, stats_in = eagle3_loss(TTTUnroll(head), batch, target=target, loss_cfg=cfg, steps=3, decay=1.0)
    allp, stats_all = eagle3_loss(TTTUnroll(head), batch, target=target, loss_cfg=cfg, steps=3, decay=1.0,
                                  exclude_out_of_vocab=False)
    n_all = n_in = 0
    for j in range(3):  # unroll step j predicts x_{t+2+j}
        valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"], j)
        labels = F.pad(batch["input_ids"][:, 2 + j:], (0, 1 + j))[:, :valid.shape[1]][valid]
        n_all += int(valid.sum())
        n_in += int(head.t2d[labels].sum())
    assert stats_all["valid"] == n_all
    assert stats_in["valid"] == n_in < n_all
    assert float(kept.detach()) < float(allp.detach())


def test_equal_tokens_budget_arithmetic():
    cfg = HeadRecipe(loss=LossConfig(k=0.4), train=TrainConfig(batch_size=16, epochs=3))
    ada = stage_budget(cfg, "adaspec", None)
    assert (ada.batch_size, ada.epochs) == (40, 7.5)  # the AdaSPEC authors' scripts: 3 epochs x 16 -> 7.5 x 40
    assert ada.batch_size * cfg.loss.k == cfg.train.batch_size  # kept tokens per step = reference tokens per step
    assert stage_budget(cfg, "reference", None) is cfg.train
    eq = dataclasses.replace(cfg, loss=LossConfig(k=0.4, budget="equal_steps"))
    assert stage_budget(eq, "adaspec", None) == cfg.train
    # a known reference step count (a time-capped reference) caps the AdaSPEC stage at the same steps
    capped = dataclasses.replace(cfg, train=TrainConfig(batch_size=16, max_minutes=2.0))
    ada = stage_budget(capped, "adaspec", 321)
    assert (ada.max_steps, ada.max_minutes, ada.batch_size) == (321, None, 40)
    # the KD baseline stage is held to the reference's steps too, at its own batch
    kd = stage_budget(capped, "kd", 321)
    assert (kd.max_steps, kd.max_minutes, kd.batch_size) == (321, None, 16)
    assert stage_budget(capped, "kd", None) == capped.train and budget_note("kd", kd, 321) is None
    # a smaller train.max_steps (a short trial) still caps the stage, and the log says it is not an equal budget
    trial = dataclasses.replace(cfg, train=TrainConfig(batch_size=16, max_steps=5))
    ada = stage_budget(trial, "adaspec", 321)
    assert ada.max_steps == 5 and "fewer steps than its reference (321)" in budget_note("adaspec", ada, 321)
    roomy = dataclasses.replace(cfg, train=TrainConfig(batch_size=16, max_steps=1000))
    assert stage_budget(roomy, "adaspec", 321).max_steps == 321
    assert budget_note("adaspec", stage_budget(roomy, "adaspec", 321), 321) is None
    assert reference_steps({"reference": {"steps": 7}}, None) == 7
    head = type("H", (), {"meta": {"steps": 9}})()
    assert reference_steps({}, head) == 9 and reference_steps({}, None) is None


def test_equal_tokens_gives_the_same_steps_and_kept_tokens(tmp_path):
    from adaspec_eagle.training.head import run_pipeline

    recipe = TINY_RECIPE
    cfg = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path}", "loss.k=0.3", "train.max_steps=null",
                                           "train.epochs=1", "train.batch_size=2", "data.num_samples=9"])
    result = run_pipeline(cfg, progress=False, log=lambda m: None)
    ref, ada = result["train"]["reference"], result["train"]["adaspec"]
    # reference: ceil(9 / 2) = 5 steps. AdaSPEC at batch round(2 / 0.3) = 7 and 1 * 7 / 2 = 3.5 epochs would run
    # ceil(3.5 * ceil(9 / 7)) = 7 steps by its own epochs; it runs the reference's 5, each on 7 sequences
    assert ref["steps"] == ada["steps"] == 5
    assert (ref["batch_size"], ada["batch_size"]) == (2, 7)
    import json as _json
    saved = _json.loads((tmp_path / "adaspec" / "config.json").read_text())["adaspec"]["meta"]
    assert saved["budget"] == "equal_tokens" and saved["batch_size"] == 7 and saved["steps"] == 5


def test_adaspec_stage_takes_the_reference_step_count_when_the_reference_is_time_capped(tmp_path, monkeypatch):
    from adaspec_eagle.training import head as train_head

    recipe = TINY_RECIPE
    cfg = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path}", "train.max_steps=null", "train.epochs=3",
                                           "train.batch_size=2", "data.num_samples=8"])
    real = train_head.stage_budget
    seen = {}

    def capped(cfg, stage, ref_steps):  # the reference stops early, as a time cap would stop it
        out = real(cfg, stage, ref_steps)
        seen[stage] = (ref_steps, out.max_steps)
        return dataclasses.replace(out, max_steps=5) if stage == "reference" else out

    monkeypatch.setattr(train_head, "stage_budget", capped)
    result = train_head.run_pipeline(cfg, progress=False, log=lambda m: None)
    assert result["train"]["reference"]["steps"] == 5
    assert seen["adaspec"] == (5, 5) and result["train"]["adaspec"]["steps"] == 5


def test_chain_acceptance_by_hand():
    # one sequence x = [0, 1, 2, 3, 4, 5]; the target's greedy token after each prefix
    x = torch.tensor([[0, 1, 2, 3, 4, 5]])
    greedy = torch.tensor([[1, 2, 9, 4, 5, 6]])  # the text leaves the target's path at x_3 (target says 9)
    start = torch.ones(1, 5, dtype=torch.bool)
    draft = torch.tensor([[[2, 9, 4, 5, 6]],     # step 0 from t: guess for x_{t+2} (= greedy[t+1] when right)
                          [[9, 4, 5, 6, 7]]])    # step 1: guess for x_{t+3} (= greedy[t+2])
    acc, reached = chain_acceptance(draft, greedy, x, start)
    # t=0: x1 == greedy0 (start ok); step0 2 == greedy1 ok; step1 needs x2 == greedy1 (2 == 2) and 9 == greedy2 ok
    # t=1: x2 == greedy1; step0 9 == greedy2 ok; step1 needs x3 == greedy2: 3 != 9, the text left the path
    # t=2: x3 != greedy2: no chain starts there
    # t=3: x4 == greedy3; step0 5 == greedy4 ok; step1 x5 == greedy4 and 6 == greedy5 ok
    # t=4: x5 == greedy4; step0 6 == greedy5 ok; step1 runs past the end
    assert acc[0].tolist() == [[True, True, False, True, True]]
    assert acc[1].tolist() == [[True, False, False, True, False]]
    assert reached[0].tolist() == [[True, True, False, True, True]]
    assert reached[1].tolist() == [[True, False, False, True, False]]


class OracleHead(torch.nn.Module):
    """A stand-in EAGLE-1 head whose step j output at t is the target's own feature f_{t+1+j} (right at every
    depth up to `right_depth`, a fixed wrong feature after)."""

    kind, uses_fused = "eagle1", False

    def __init__(self, lm_head, features, right_depth=99):
        super().__init__()
        self.lm_head, self.f, self.right_depth = lm_head, features, right_depth  # f: (B, T, H) of the one batch

    def project(self, features):
        return features

    def forward(self, hidden, ids, pos, attention_mask=None, cache=None):
        j = int(pos[0, 0])
        n = hidden.shape[1]
        out = F.pad(self.f[:, 1 + j:], (0, 0, 0, j))[:, :n]
        if j >= self.right_depth:
            out = torch.zeros_like(out) + self.f[:, :1]
        return out

    def logits(self, h):
        return self.lm_head(h)


def greedy_samples(target, n=3, prompt=6, new=14):
    out = []
    for i in range(n):
        ids = torch.randint(5, 100, (1, prompt), generator=torch.Generator().manual_seed(i))
        full = target.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)[0]
        mask = torch.zeros(full.numel(), dtype=torch.bool)
        mask[prompt:] = True
        out.append({"input_ids": full, "loss_mask": mask})
    return out


def test_oracle_head_is_accepted_at_every_depth_and_a_one_step_head_only_at_the_first():
    target = tiny_model("llama").requires_grad_(False).eval()
    data = greedy_samples(target)  # equal lengths: one batch, no padding
    feats = target_forward_features(target, torch.stack([s["input_ids"] for s in data]))["features"]
    e = evaluate_head(OracleHead(target.get_output_embeddings(), feats), target, data, chain=4)
    assert e["top1"] == 1.0
    assert e["chain"]["accept_by_depth"] == [1.0, 1.0, 1.0, 1.0]
    assert 4.0 < e["chain"]["tau"] <= 5.0  # chains near the end of a sample are cut
    e1 = evaluate_head(OracleHead(target.get_output_embeddings(), feats, right_depth=1), target, data, chain=4)
    assert e1["top1"] == 1.0 and e1["chain"]["accept_by_depth"][0] == 1.0
    assert e1["chain"]["accept_by_depth"][1] < 0.5 and e1["chain"]["tau"] < 2.6


def test_position_records_align_across_heads_and_sum_to_the_evaluation():
    target = tiny_model("llama").requires_grad_(False).eval()
    data = greedy_samples(target)
    feats = target_forward_features(target, torch.stack([s["input_ids"] for s in data]))["features"]
    oracle = position_records(OracleHead(target.get_output_embeddings(), feats), target, data)
    _, head, _ = setup()
    rec = position_records(head, target, data, batch_size=2)  # another batching: the same positions, in order
    e = evaluate_head(head, target, data, batch_size=3)
    assert rec["hit"].numel() == e["positions"] == oracle["hit"].numel()
    assert torch.equal(rec["token"], oracle["token"])  # the target's argmax: the same position by position
    assert bool(oracle["hit"].all()) and float(oracle["kl"].abs().max()) < 1e-5
    assert abs(float(rec["hit"].float().mean()) - e["top1"]) < 1e-9
    assert abs(float(rec["kl"].mean()) - e["kl"]) < 1e-5
    assert bool(((rec["confidence"] > 0) & (rec["confidence"] <= 1)).all())


def test_position_records_chains_sum_to_the_evaluations_acceptance_by_depth():
    target = tiny_model("llama").requires_grad_(False).eval()
    data = greedy_samples(target)
    feats = target_forward_features(target, torch.stack([s["input_ids"] for s in data]))["features"]
    _, head, _ = setup()
    for h in (head, OracleHead(target.get_output_embeddings(), feats, right_depth=1)):
        e = evaluate_head(h, target, data, chain=3)  # one batch: the oracle knows the batch's features
        rec = position_records(h, target, data, chain=3)
        assert rec["reached"].shape == rec["accepted"].shape == rec["chain_token"].shape == (3, e["positions"])
        assert not bool((rec["accepted"] & ~rec["reached"]).any())
        depth = [a / r if r else 0.0 for a, r in zip(rec["accepted"].sum(1).tolist(), rec["reached"].sum(1).tolist())]
        assert depth == pytest.approx(e["chain"]["accept_by_depth"], abs=1e-9)
        assert 1 + float(rec["accepted"].sum()) / float(rec["reached"][0].sum()) == pytest.approx(e["chain"]["tau"])
        assert torch.equal(rec["chain_token"][0], rec["token"])  # depth 1 drafts the target's next token
        assert bool((rec["chain_token"][rec["reached"]] >= 0).all())
    # the oracle right at depth 1 only: on the target's own text every chain it starts is accepted at depth 1 and
    # reaches depth 2, where none is accepted
    assert int(rec["reached"][0].sum()) > 30 and torch.equal(rec["accepted"][0], rec["reached"][0])
    assert torch.equal(rec["reached"][1], rec["accepted"][0]) and not bool(rec["accepted"][1:].any())


def test_trained_head_chain_metrics_are_consistent():
    target, head, _ = setup()
    data = greedy_samples(target)
    e = evaluate_head(head, target, data, chain=3)
    depth = e["chain"]["accept_by_depth"]
    assert len(depth) == 3 and all(0.0 <= a <= 1.0 for a in depth)
    assert 1.0 <= e["chain"]["tau"] <= 1.0 + depth[0] + 1e-9 + depth[0] * depth[1] * 2  # bounded by the rates
    assert e["chain"]["chains"] > 0


def test_eval_every_keeps_the_head_with_the_best_heldout_tau(tmp_path, monkeypatch):
    """The stage's saved head is the evaluation with the best chain tau, not the last one (faked scores)."""
    import json as _json

    from adaspec_eagle.training import head as train_head
    from adaspec_eagle.models.heads import load_head

    scores = iter([1.2, 1.9, 1.5, 1.1, 1.3, 1.6, 1.0, 1.0])  # reference: best at its 2nd evaluation (step 2)
    real = train_head.evaluate_head

    def fake(head, target, heldout, *args, **kw):
        out = real(head, target, heldout, *args, **kw)
        if kw.get("chain"):
            out["chain"]["tau"] = next(scores)
        return out

    monkeypatch.setattr(train_head, "evaluate_head", fake)
    recipe = TINY_RECIPE
    cfg = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path}", "train.max_steps=4", "train.eval_every=1",
                                           "stage=reference"])
    result = train_head.run_pipeline(cfg, progress=False, log=lambda m: None)
    record = result["train"]["reference"]
    assert [e["step"] for e in record["evals"]] == [1, 2, 3, 4]
    assert record["selected"]["step"] == 2 and record["selected"]["tau"] == 1.9
    saved = _json.loads((tmp_path / "reference" / "config.json").read_text())["adaspec"]["meta"]
    assert saved["selected"]["step"] == 2 and saved["steps"] == 4
    best = load_head(str(tmp_path / "runs" / "reference" / "best"), train_head.load_target(cfg.target)[0])
    kept = load_head(str(tmp_path / "reference"), train_head.load_target(cfg.target)[0])
    for (name, a), (_, b) in zip(best.state_dict().items(), kept.state_dict().items()):
        assert torch.equal(a, b), name


def test_eval_every_without_a_heldout_split_is_refused(tmp_path):
    from adaspec_eagle.training.head import run_pipeline

    recipe = TINY_RECIPE
    cfg = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path / 'o'}", "train.eval_every=2", "data.holdout=0"])
    with pytest.raises(AdaspecError, match="data.holdout"):
        run_pipeline(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "o" / "reference").exists()


def test_cpu_bf16_autocast_head_loss_stays_close_to_fp32():
    """train.precision=bf16 on a CPU (autocast): the loss and the gradient follow the fp32 ones closely."""
    target, head, batch = setup()
    ids = torch.arange(5, 60)
    kd = LossConfig(kind="kd")
    kw = dict(target=target, loss_cfg=kd, feature_loss_weight=1.0, token_loss_weight=0.1, vocab_ids=ids)
    fp32, _ = head_loss(head, batch, **kw)
    g32 = grads(head, fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = head_loss(head, batch, **kw)
    g16 = grads(head, bf16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=1e-3)
    for name in g32:
        cos = F.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_feature_loss_regresses_the_clean_next_feature_from_noisy_inputs():
    target, head, batch = setup()
    kd = LossConfig(kind="kd")
    torch.manual_seed(7)
    loss, _ = head_loss(head, batch, target=target, loss_cfg=kd, feature_loss_weight=1.0, token_loss_weight=1e-9,
                        feature_noise=0.5)
    feats = target_forward_features(target, batch["input_ids"], batch["attention_mask"])["features"]
    valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])
    torch.manual_seed(7)
    noisy = feats + (torch.rand_like(feats) - 0.5) * 0.5
    hidden = head_forward(head, noisy, batch["input_ids"])[valid]
    want = F.smooth_l1_loss(hidden, feats[:, 1:][valid], reduction="none").mean(-1).sum() / valid.sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_adaspec_with_a_restricted_vocabulary_trains_features_at_the_selected_rows():
    """AdaSPEC + a vocabulary with gaps + the feature loss: the feature term covers exactly the selected rows."""
    from adaspec_eagle.training.losses import quantile_threshold

    target, head, batch = setup(n=6)
    torch.manual_seed(3)
    reference = build_head(target, HeadConfig())
    ada = LossConfig(kind="adaspec", k=0.4)
    ids = torch.arange(5, 60)
    n_valid = float(head_valid_mask(batch["loss_mask"], batch["attention_mask"]).sum())
    kw = dict(target=target, loss_cfg=ada, reference=reference, vocab_ids=ids, num_items=n_valid)
    with_feat, _ = head_loss(head, batch, feature_loss_weight=1.0, **kw)
    no_feat, stats = head_loss(head, batch, feature_loss_weight=0.0, **kw)
    feats = target_forward_features(target, batch["input_ids"], batch["attention_mask"])["features"]
    valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])
    labels = F.pad(batch["input_ids"][:, 2:], (0, 1))[valid]
    inside = (labels >= 5) & (labels < 60)
    w = target.get_output_embeddings().weight[ids]
    with torch.no_grad():
        h = head_forward(head, feats, batch["input_ids"])[valid]
        r = head_forward(reference, feats, batch["input_ids"])[valid]
        lt = (feats[:, 1:][valid] @ w.T).log_softmax(-1)

        def kl(x):
            return (lt.exp() * (lt - (x @ w.T).log_softmax(-1))).sum(-1)

        delta = (kl(h) - kl(r))[inside]
        selected = delta >= quantile_threshold(delta, 0.4)
        rows = inside.nonzero().squeeze(1)[selected]  # rows of the N valid positions
        per = F.smooth_l1_loss(h, feats[:, 1:][valid], reduction="none").mean(-1)
    assert int(stats["kept"]) == int(selected.sum()) and 0 < len(rows) < int(inside.sum())
    torch.testing.assert_close((with_feat - no_feat).detach(), per[rows].sum() / n_valid, rtol=1e-4, atol=1e-6)


def test_a_kept_head_from_a_lost_trajectory_is_dropped_on_resume(tmp_path):
    from adaspec_eagle.models.heads import save_head
    from adaspec_eagle.training.head import BestHeadKeeper

    target, head, _ = setup()
    folder = tmp_path / "best"
    save_head(head, folder, {"best": {"step": 40, "tau": 2.0, "top1": 0.5, "kl": 1.0}})
    keeper = BestHeadKeeper(folder, target, [], 4, 0, None, {}, resume_step=50)
    assert keeper.best["step"] == 40  # from the checkpoint's own past: kept
    keeper = BestHeadKeeper(folder, target, [], 4, 0, None, {}, resume_step=30)
    assert keeper.best is None and not folder.exists()  # later than the resumed checkpoint: dropped


def test_init_head_starts_every_stage_from_the_given_head(tmp_path):
    from adaspec_eagle.training import head as train_head

    recipe = TINY_RECIPE
    base = [f"output_dir={tmp_path / 'first'}", "stage=reference", "train.max_steps=3", "data.num_samples=8"]
    train_head.run_pipeline(load_recipe(HeadRecipe, recipe, base), progress=False, log=lambda m: None)
    target = train_head.load_target(load_recipe(HeadRecipe, recipe, base).target)[0]
    first = load_head(str(tmp_path / "first" / "reference"), target)
    # continued with a vanishing learning rate, both stages end where the given head was, not at a fresh head
    cfg = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path / 'next'}", f"init_head={tmp_path / 'first' / 'reference'}",
                                           "train.max_steps=2", "data.num_samples=8", "optim.lr=1e-12"])
    train_head.run_pipeline(cfg, progress=False, log=lambda m: None)
    torch.manual_seed(cfg.train.seed)
    fresh = build_head(target, cfg.head)
    for stage in ("reference", "adaspec"):
        got = load_head(str(tmp_path / "next" / stage), target).state_dict()
        for name, value in first.state_dict().items():
            torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0)
        assert not torch.allclose(got["fc.weight"], fresh.state_dict()["fc.weight"])
    # a head that does not fit the recipe's head is named before training; nothing is written
    bad = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path / 'bad'}", f"init_head={tmp_path / 'first' / 'reference'}",
                                           "head.fc_bias=true", "data.num_samples=8"])
    with pytest.raises(AdaspecError, match="fc_bias"):
        train_head.run_pipeline(bad, progress=False, log=lambda m: None)
    assert not (tmp_path / "bad" / "reference").exists()
    missing = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path / 'm'}", f"init_head={tmp_path / 'nope'}"])
    with pytest.raises(AdaspecError, match="does not exist"):
        train_head.run_pipeline(missing, progress=False, log=lambda m: None)


def test_a_given_eagle3_head_must_draft_over_the_vocabulary_this_data_gives(tmp_path):
    from adaspec_eagle.models.heads import save_head
    from adaspec_eagle.training.head import _check_init, _check_reference

    target = tiny_model("llama").requires_grad_(False)
    counts = torch.zeros(target.get_output_embeddings().weight.shape[0], dtype=torch.int64)
    counts[5:40] = 1
    other = counts.roll(30)  # same size, other ids
    save_head(build_head(target, HeadConfig(kind="eagle3", draft_vocab_size=40), token_counts=counts), tmp_path / "h")
    cfg = HeadRecipe(head=HeadConfig(kind="eagle3", draft_vocab_size=40), init_head=str(tmp_path / "h"))
    assert _check_init(cfg, target, counts).kind == "eagle3"  # the data it was trained on: accepted
    assert _check_reference(cfg, tmp_path / "h", target, counts).kind == "eagle3"
    with pytest.raises(AdaspecError, match="init_head .* drafts over another vocabulary"):
        _check_init(cfg, target, other)
    with pytest.raises(AdaspecError, match="reference head .* another draft vocabulary"):
        _check_reference(cfg, tmp_path / "h", target, other)


def test_unrolled_eagle1_loss_reduces_to_the_teacher_forced_one_and_scores_step_j_j_places_on():
    target, head, batch = setup()
    kw = dict(target=target, loss_cfg=LossConfig(kind="kd"), feature_loss_weight=1.0, token_loss_weight=0.1)
    one, s1 = head_loss(head, batch, **kw)
    # step 0 of the unroll is the teacher-forced pass: with step 1 weighted 0 the loss and gradients are the same
    zero, s0 = head_loss(TTTUnroll(head), batch, **kw, unroll_steps=2, unroll_decay=0.0)
    torch.testing.assert_close(zero, one)
    g1, g0 = grads(head, one), grads(head, zero)
    for name in g1:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-4, atol=1e-7)
    two, s2 = head_loss(TTTUnroll(head), batch, **kw, unroll_steps=2, unroll_decay=0.8)
    with pytest.raises(AdaspecError, match="TTTUnroll"):  # a bare head cannot run the unroll
        head_loss(head, batch, **kw, unroll_steps=2)
    valid1 = int(head_valid_mask(batch["loss_mask"], batch["attention_mask"], 1).sum())
    assert s2["valid"] == s1["valid"] + valid1 and float(two.detach()) > float(one.detach())
    # alignment: a head whose step j output is the target's feature f_{t+1+j} has no feature loss and agrees with
    # the target at every step; one that is right only at step 0 is charged at step 1 alone
    data = greedy_samples(target)
    b = pad_batch(data, 0)
    feats = target_forward_features(target, b["input_ids"])["features"]
    lm = target.get_output_embeddings()
    feat_only = dict(target=target, loss_cfg=LossConfig(kind="kd"), feature_loss_weight=1.0, token_loss_weight=0.0)
    oracle, _ = head_loss(TTTUnroll(OracleHead(lm, feats)), b, **feat_only, unroll_steps=3)
    assert float(oracle) < 1e-6
    kd_only = dict(target=target, loss_cfg=LossConfig(kind="kd"), feature_loss_weight=0.0)
    assert float(head_loss(TTTUnroll(OracleHead(lm, feats)), b, **kd_only, unroll_steps=3)[0]) < 1e-5
    step0_only = OracleHead(lm, feats, right_depth=1)
    assert float(head_loss(TTTUnroll(step0_only), b, **feat_only, unroll_steps=1 + 1, unroll_decay=1e-9)[0]) < 1e-6
    assert float(head_loss(TTTUnroll(step0_only), b, **feat_only, unroll_steps=2)[0]) > 1e-3


def test_unroll_steps_trains_an_eagle1_head_through_the_pipeline(tmp_path):
    from adaspec_eagle.training import head as train_head

    recipe = TINY_RECIPE
    cfg = load_recipe(HeadRecipe, recipe, [f"output_dir={tmp_path}", "stage=reference", "train.max_steps=2",
                                           "data.num_samples=8", "head.unroll_steps=3"])
    out = train_head.run_pipeline(cfg, progress=False, log=lambda m: None)
    rec = out["train"]["reference"]
    assert rec["steps"] == 2 and all(x == x and x > 0 for x in rec["losses"])
    assert load_head(str(tmp_path / "reference"), train_head.load_target(cfg.target)[0]).kind == "eagle1"
    with pytest.raises(AdaspecError, match="head.unroll_steps"):
        HeadConfig(kind="eagle3", unroll_steps=2)
