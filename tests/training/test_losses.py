"""Tests of adaspec_eagle.training.losses: the AdaSPEC reference code's compute_loss transcribed as the oracle, divergence properties,
selection semantics, reductions under gradient accumulation, edge cases, and the chunked hidden-state path."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn import KLDivLoss

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import LossConfig
from adaspec_eagle.training.losses import (
    QUANTILE_MAX_ELEMENTS,
    _quantile_linear,
    adaspec_loss,
    chunked_adaspec_loss,
    per_token_divergence,
    select_topk,
)

from _reference_loss import IGNORE_INDEX
# The oracle: the body of AdaSPECTrainer.compute_loss (seed/AdaSPEC-README.md) transcribed once, with the model
# outputs replaced by given logits and the DeepSpeed/world-size scaling left out; scripts/bench_loss.py times the same function.
from _reference_loss import reference_loss as seed_compute_loss
KINDS = ("forward_kl", "reverse_kl", "tvd", "jsd")


def make_batch(B=3, T=19, V=37, seed=0, dtype=torch.float32):
    """Random logits (B, T, V) for student (leaf), target, reference and labels with masked prompts/padding."""
    g = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    target = (2.5 * torch.randn(B, T, V, generator=g)).to(dtype)
    ref = (target.float() + 1.5 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        prompt = int(torch.randint(1, T // 2, (1,), generator=g))
        labels[b, :prompt] = IGNORE_INDEX
    labels[-1, -3:] = IGNORE_INDEX  # right padding
    return student, target, ref, labels


def ours(student, target, ref, labels, cfg, num_items=None):
    """Our loss on the same raw (unshifted) inputs as the AdaSPEC reference code: the caller shifts."""
    return adaspec_loss(student[:, :-1], target[:, :-1], None if ref is None else ref[:, :-1],
                        labels[:, 1:] != IGNORE_INDEX, cfg, num_items)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grad_of(fn, x):
    x.grad = None
    out = fn()
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    g = x.grad.clone()
    x.grad = None
    return loss.detach(), g


# ---------------------------------------------------------------------------------------------- seed oracle

@pytest.mark.parametrize("k", [0.1, 0.25, 0.4, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("reduction", ["num_items", "mean"])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_matches_seed_oracle(k, reduction, chunk_size):
    student, target, ref, labels = make_batch(seed=int(k * 100))
    n_valid = int((labels[:, 1:] != IGNORE_INDEX).sum())
    num_items = n_valid + 11 if reduction == "num_items" else None  # e.g. the count of a whole accumulation step
    cfg = LossConfig(kind="adaspec", k=k, reduction=reduction, chunk_size=chunk_size)
    want, g_want = grad_of(lambda: seed_compute_loss(student, target, ref, labels, k, num_items), student)
    got, g_got = grad_of(lambda: ours(student, target, ref, labels, cfg, num_items), student)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    assert rel(g_got, g_want) <= 1e-6
    assert g_got.abs().sum() > 0


def test_stats():
    student, target, ref, labels = make_batch(seed=3)
    cfg = LossConfig(k=0.5)
    _, stats = ours(student, target, ref, labels, cfg)
    mask = labels[:, 1:] != IGNORE_INDEX
    kl = per_token_divergence(target[:, :-1][mask], student[:, :-1][mask].detach())
    assert stats["valid"] == float(mask.sum())
    assert stats["kept"] == pytest.approx(math.ceil(0.5 * stats["valid"]), abs=1)
    assert stats["kl"] == pytest.approx(float(kl.mean()), rel=1e-6)
    assert all(isinstance(v, float) for v in stats.values())


# ---------------------------------------------------------------------------------------------- divergences

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_divergence_of_identical_is_zero(kind, beta):
    x = 3 * torch.randn(8, 50)
    d = per_token_divergence(x, x.clone(), kind, temperature=1.7, beta=beta)
    assert d.shape == (8,) and d.dtype == torch.float32
    assert d.abs().max() < 1e-6
    y = 3 * torch.randn(8, 50)
    assert (per_token_divergence(x, y, kind, beta=beta) > 1e-3).all()


def test_divergences_match_definitions():
    t, s = 2 * torch.randn(6, 40, dtype=torch.float64), 2 * torch.randn(6, 40, dtype=torch.float64)
    tau = 1.5
    pt, ps = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    fkl = (pt * (pt.log() - ps.log())).sum(-1)
    rkl = (ps * (ps.log() - pt.log())).sum(-1)
    tvd = 0.5 * (pt - ps).abs().sum(-1)
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    jsd = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    for kind, want in (("forward_kl", fkl), ("reverse_kl", rkl), ("tvd", tvd), ("jsd", jsd)):
        got = per_token_divergence(t, s, kind, temperature=tau, beta=beta)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AdaspecError, match="divergence"):
        per_token_divergence(t, s, "hellinger")


def test_jsd_limits():
    t, s = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    fkl = per_token_divergence(t, s, "forward_kl")
    rkl = per_token_divergence(t, s, "reverse_kl")
    assert torch.equal(per_token_divergence(t, s, "jsd", beta=0.0), fkl)
    assert torch.equal(per_token_divergence(t, s, "jsd", beta=1.0), rkl)
    # JSD_beta = beta KL(t||s) + O(beta^2) as beta -> 0 and (1 - beta) KL(s||t) + O((1-beta)^2) as beta -> 1:
    # the endpoint conventions are the normalised limits, and the error shrinks with eps
    errors = []
    for eps in (1e-2, 1e-3):  # (smaller eps drowns in fp32 rounding: divergences are computed in fp32)
        err0 = (per_token_divergence(t, s, "jsd", beta=eps) / eps - fkl).abs() / fkl
        err1 = (per_token_divergence(t, s, "jsd", beta=1 - eps) / eps - rkl).abs() / rkl
        errors.append(max(float(err0.max()), float(err1.max())))
    assert errors[1] < 2e-2 and errors[1] < errors[0] / 5


@pytest.mark.parametrize("kind", ["reverse_kl", "tvd", "jsd", "forward_kl"])
def test_gradients_of_other_divergences_match_autograd(kind):
    student, target, ref, labels = make_batch(seed=5)
    cfg = LossConfig(k=0.4, divergence=kind, beta=0.3, temperature=1.5, chunk_size=9)
    mask = labels[:, 1:] != IGNORE_INDEX

    def direct():
        s, t, r = student[:, :-1][mask], target[:, :-1][mask], ref[:, :-1][mask]
        actual = per_token_divergence(t, s, kind, 1.5, 0.3)
        with torch.no_grad():
            delta = actual - per_token_divergence(t, r, kind, 1.5, 0.3)
        keep = select_topk(delta, torch.ones_like(delta, dtype=torch.bool), 0.4)
        return actual[keep].sum() / mask.sum()

    want, g_want = grad_of(direct, student)
    got, g_got = grad_of(lambda: ours(student, target, ref, labels, cfg), student)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    assert rel(g_got, g_want) <= 1e-5


# ---------------------------------------------------------------------------------------------- selection

def test_select_topk_is_exactly_the_top_fraction_of_valid_tokens():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(500, generator=g)
    valid = torch.rand(500, generator=g) < 0.7
    delta[~valid] += 100.0  # masked tokens with the largest deltas must still never be selected
    m = int(valid.sum())
    for k in (0.05, 0.2, 0.4, 0.5, 0.9, 1.0):
        keep = select_topk(delta, valid, k)
        assert not (keep & ~valid).any()
        rank = torch.tensor(1 - k, dtype=torch.float32) * (m - 1)
        n_keep = m - int(rank.ceil())  # distinct deltas: the ones at or above the interpolated quantile
        assert int(keep.sum()) == n_keep
        top = delta.masked_fill(~valid, -math.inf).topk(n_keep).indices
        assert set(keep.nonzero().squeeze(1).tolist()) == set(top.tolist())


def test_select_topk_keeps_all_ties_at_threshold():
    delta = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0])
    valid = torch.ones(8, dtype=torch.bool)
    keep = select_topk(delta, valid, 0.25)  # quantile(0.75): rank 5.25 -> threshold 2.25 -> 2 kept
    assert keep.tolist() == [False] * 6 + [True] * 2
    keep = select_topk(delta, valid, 0.7)  # quantile(0.3) = 1.0: all four tied tokens kept (7 of 8 > 0.7 * 8)
    assert keep.tolist() == [False] + [True] * 7


def test_select_topk_empty_and_nonfinite():
    delta = torch.randn(10)
    assert not select_topk(delta, torch.zeros(10, dtype=torch.bool), 0.4).any()
    delta[3] = float("nan")
    valid = torch.ones(10, dtype=torch.bool)
    with pytest.raises(AdaspecError, match="delta"):
        select_topk(delta, valid, 0.4)
    valid[3] = False  # a NaN at a masked token is ignored
    assert select_topk(delta, valid, 0.4).sum() > 0


def test_quantile_fallback_equals_torch_quantile():
    g = torch.Generator().manual_seed(2)
    for n in (1, 2, 3, 10, 101, 1000, 4097):
        for x in (torch.randn(n, generator=g), torch.randint(0, 5, (n,), generator=g).float()):  # with ties
            for q in (0.0, 0.05, 0.3, 1 / 3, 0.5, 0.6, 0.75, 0.9, 0.999, 1.0):
                assert torch.equal(_quantile_linear(x, q), torch.quantile(x, q)), (n, q)


def test_quantile_over_torch_limit():
    m = QUANTILE_MAX_ELEMENTS + 3
    with pytest.raises(RuntimeError):
        torch.quantile(torch.zeros(m), 0.5)  # the AdaSPEC reference code's failure this path avoids
    ordered = torch.arange(m, dtype=torch.float32)  # sorted oracle (above 2**24 float32 rounds: a few ties)
    x = ((torch.arange(m) * 7919) % m).float()  # a permutation of 0..m-1 (gcd(7919, m) = 1), cheaper than randperm
    keep = select_topk(x, torch.ones(m, dtype=torch.bool), 0.4)
    assert math.gcd(7919, m) == 1
    rank = torch.tensor(0.6, dtype=torch.float32) * (m - 1)
    threshold = torch.lerp(ordered[rank.long()], ordered[rank.ceil().long()], rank - rank.long())
    assert int(keep.sum()) == int((ordered >= threshold).sum())
    assert bool((x[keep] >= threshold).all()) and bool((x[~keep] < threshold).all())


# ---------------------------------------------------------------------------------------------- loss properties

def test_k1_equals_plain_kd_exactly():
    student, target, ref, labels = make_batch(seed=7)
    for reduction in ("num_items", "mean"):
        results = [grad_of(lambda: ours(student, target, r, labels, c), student) for r, c in (
            (ref, LossConfig(kind="adaspec", k=1.0, reduction=reduction)),
            (ref, LossConfig(kind="kd", k=0.3, reduction=reduction)),
            (None, LossConfig(kind="adaspec", k=0.3, reduction=reduction)))]
        for loss, g in results[1:]:
            assert torch.equal(loss, results[0][0]) and torch.equal(g, results[0][1])
    # and KD is the plain mean forward KL over valid tokens
    mask = labels[:, 1:] != IGNORE_INDEX
    kd = per_token_divergence(target[:, :-1][mask], student[:, :-1][mask]).mean()
    assert float(results[0][0]) == pytest.approx(float(kd.detach()), rel=1e-6)


def test_masked_tokens_never_selected_and_get_zero_grad():
    student, target, ref, labels = make_batch(seed=8)
    mask = labels[:, 1:] != IGNORE_INDEX
    with torch.no_grad():  # make the masked positions the worst tokens by far
        student[:, :-1][~mask] = 50 * torch.randn(int((~mask).sum()), student.shape[-1])
    cfg = LossConfig(k=0.3)
    _, g = grad_of(lambda: ours(student, target, ref, labels, cfg), student)
    assert g[:, :-1][~mask].abs().max() == 0
    assert g[:, -1].abs().max() == 0  # the unshifted last position never counts
    rows_with_grad = g[:, :-1].abs().sum(-1) > 0  # (B, T-1): exactly the kept tokens
    _, stats = ours(student, target, ref, labels, cfg)
    assert int(rows_with_grad.sum()) == stats["kept"] and not (rows_with_grad & ~mask).any()


def test_gradient_accumulation_split():
    """With num_items = the step's global valid count, splitting a batch into micro-batches is exact for k = 1
    (KD). For k < 1 the selection is per micro-batch (scope 'batch', as in the AdaSPEC reference code), so the accumulated loss
    and gradient equal the sum over micro-batches of the reference formula applied per micro-batch."""
    student, target, ref, labels = make_batch(B=4, seed=9)
    n_global = int((labels[:, 1:] != IGNORE_INDEX).sum())
    for k in (1.0, 0.4):
        cfg = LossConfig(k=k)
        full, g_full = grad_of(lambda: ours(student, target, ref, labels, cfg, n_global), student)
        for split in ([1, 3], [2, 2], [1, 1, 1, 1]):
            student.grad = None
            total, oracle, start = 0.0, 0.0, 0
            for size in split:
                sl = slice(start, start + size)
                loss, _ = ours(student[sl], target[sl], ref[sl], labels[sl], cfg, n_global)
                loss.backward()
                total += float(loss.detach())
                oracle += float(seed_compute_loss(student[sl].detach(), target[sl], ref[sl], labels[sl], k, n_global))
                start += size
            g_acc = student.grad.clone()
            student.grad = None
            assert total == pytest.approx(oracle, rel=1e-6)
            if k == 1.0:
                assert total == pytest.approx(float(full), rel=1e-6)
                assert rel(g_acc, g_full) <= 1e-6


def test_empty_batch_gives_connected_zero_loss():
    student, target, ref, labels = make_batch(seed=10)
    labels[:] = IGNORE_INDEX
    with pytest.raises(RuntimeError):  # the AdaSPEC reference code's torch.quantile raises on empty input
        seed_compute_loss(student, target, ref, labels, 0.4, 10)
    for reduction, num_items in (("num_items", None), ("num_items", 5), ("mean", None)):
        student.grad = None
        loss, stats = ours(student, target, ref, labels, LossConfig(k=0.4, reduction=reduction), num_items)
        assert float(loss.detach()) == 0.0 and loss.requires_grad and stats == {"kl": 0.0, "kept": 0.0, "valid": 0.0}
        loss.backward()
        assert student.grad is not None and student.grad.abs().max() == 0
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss, _ = chunked_adaspec_loss(h, w, torch.randn(6, 11), torch.randn(6, 11), torch.zeros(6, dtype=torch.bool),
                                   LossConfig())
    loss.backward()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits", "reference_logits"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_raise_naming_the_tensor(which, bad):
    student, target, ref, labels = make_batch(seed=11)
    tensors = {"student_logits": student, "teacher_logits": target, "reference_logits": ref}
    mask = labels[:, 1:] != IGNORE_INDEX
    b, t = mask.nonzero()[5].tolist()
    with torch.no_grad():
        tensors[which][b, t, 4] = bad
    with pytest.raises(AdaspecError, match=which):
        ours(student, target, ref, labels, LossConfig(k=0.4))


def test_nonfinite_at_masked_position_is_ignored():
    student, target, ref, labels = make_batch(seed=12)
    mask = labels[:, 1:] != IGNORE_INDEX
    b, t = (~mask).nonzero()[0].tolist()
    with torch.no_grad():
        student[b, t, 2] = float("nan")
    loss, _ = ours(student, target, ref, labels, LossConfig(k=0.4))
    assert torch.isfinite(loss)


def test_bf16_inputs_are_computed_in_fp32():
    student, target, ref, labels = make_batch(seed=13, dtype=torch.bfloat16)
    want = seed_compute_loss(student, target, ref, labels, 0.4, 50)
    got, stats = ours(student, target, ref, labels, LossConfig(k=0.4), 50)
    assert got.dtype == torch.float32 and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    got.backward()
    assert student.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- chunked path

@pytest.mark.parametrize("kind,divergence", [("kd", "forward_kl"), ("adaspec", "forward_kl"), ("adaspec", "jsd")])
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_chunked_hidden_path_equals_direct(kind, divergence, teacher_as):
    g = torch.Generator().manual_seed(14)
    N, H, V = 45, 16, 53
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = (0.5 * torch.randn(V, H, generator=g)).requires_grad_(True)
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_(True)
    th, tw = torch.randn(N, 12, generator=g), torch.randn(V, 12, generator=g)
    rh, rw = torch.randn(N, 12, generator=g), torch.randn(V, 12, generator=g)
    valid = torch.rand(N, generator=g) < 0.8
    cfg = LossConfig(kind=kind, k=0.4, divergence=divergence, chunk_size=8)
    t_logits, r_logits = F.linear(th, tw), F.linear(rh, rw)

    def run(direct):
        for p in (h, w, bias):
            p.grad = None
        if direct:
            loss, stats = adaspec_loss(F.linear(h, w, bias)[None], t_logits[None], r_logits[None], valid[None], cfg)
        else:
            teacher = t_logits if teacher_as == "logits" else (th, tw)
            reference = r_logits if teacher_as == "logits" else (rh, rw)
            loss, stats = chunked_adaspec_loss(h, w, teacher, reference, valid, cfg, student_bias=bias)
        loss.backward()
        return loss.detach(), stats, [p.grad.clone() for p in (h, w, bias)]

    l_d, s_d, g_d = run(True)
    l_c, s_c, g_c = run(False)
    assert float(l_c) == pytest.approx(float(l_d), rel=1e-6)
    assert s_c["kept"] == s_d["kept"] and s_c["valid"] == s_d["valid"]
    for a, b in zip(g_c, g_d):
        assert rel(a, b) <= 1e-5 and b.abs().sum() > 0
    assert g_c[0][~valid].abs().max() == 0


def test_chunked_rejects_misaligned_inputs():
    with pytest.raises(AdaspecError, match="teacher"):
        chunked_adaspec_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 11), None,
                             torch.ones(4, dtype=torch.bool), LossConfig())


@pytest.mark.parametrize("chunk_size", [5, 64, 4096])
@pytest.mark.parametrize("dtype,tau", [(torch.float32, 1.0), (torch.float32, 1.5), (torch.bfloat16, 1.0)])
def test_unshifted_logits_with_shifted_mask(chunk_size, dtype, tau):
    """Full (B, T, V) logits with mask[:, t] = labels[:, t+1] valid (last position False) is the same loss as the
    shifted views; it reads rows as slices/runs (contiguous input) instead of gathers. B=24 x T=6 makes > 16 runs."""
    for B, T in ((3, 19), (24, 6)):
        student, target, ref, labels = make_batch(B=B, T=T, seed=chunk_size + B, dtype=dtype)
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        cfg = LossConfig(k=0.4, chunk_size=chunk_size, temperature=tau)
        want, g_want = grad_of(lambda: ours(student, target, ref, labels, cfg), student)
        got, g_got = grad_of(lambda: adaspec_loss(student, target, ref, mask, cfg), student)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
        assert rel(g_got.float(), g_want.float()) <= 1e-6


# ---------------------------------------------------------------------------------------------- global scope

def _global_scope_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        deltas = [torch.randn(n, generator=torch.Generator().manual_seed(r)) for r, n in enumerate((37, 20))]
        mine = deltas[rank]
        keep = select_topk(mine, torch.ones_like(mine, dtype=torch.bool), 0.3, scope="global")
        threshold = torch.quantile(torch.cat(deltas), 0.7)  # over all ranks' tokens
        ok = torch.equal(keep, mine >= threshold)
        # the loss with scope "global" on a rank with no valid tokens must still take part in the collective
        student, target, ref, labels = make_batch(B=2, T=9, V=11, seed=rank)
        if rank == 1:
            labels[:] = IGNORE_INDEX
        loss, stats = ours(student, target, ref, labels, LossConfig(k=0.5, scope="global"))
        loss.backward()
        ok = ok and torch.isfinite(loss).item()
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(f"{ok} {stats['kept']} {stats['valid']}")
    finally:
        dist.destroy_process_group()


def test_global_scope_across_ranks(tmp_path):
    """Two gloo processes: the threshold is the quantile over both ranks' deltas (different counts); a rank with
    no valid tokens still joins the collective (no hang)."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_global_scope_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=world,
             join=True)
    results = [(tmp_path / f"res.{r}").read_text().split() for r in range(world)]
    assert all(r[0] == "True" for r in results), results
    assert float(results[1][2]) == 0.0 and float(results[0][2]) > 0


def test_top1_hits_counts_argmax_agreement_at_masked_positions():
    from adaspec_eagle.training.losses import top1_hits

    student = torch.tensor([[[0.0, 2.0], [3.0, 1.0], [0.0, 1.0]]])  # argmax 1, 0, 1
    teacher = torch.tensor([[[1.0, 5.0], [0.0, 1.0], [0.0, 9.0]]])  # argmax 1, 1, 1
    assert top1_hits(student, teacher) == (2, 3)
    assert top1_hits(student, teacher, torch.tensor([[True, True, False]])) == (1, 2)
