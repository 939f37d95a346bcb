"""Small-batch CPU linear layers: the same products as F.linear (to float32 rounding), only where they apply and
where this machine measured them faster, installed and removed exactly, and used by the engine's forwards."""

import pytest
import torch
import torch.nn.functional as F

from adaspec_eagle import AdaspecError
from adaspec_eagle.engine import linear_routing
from adaspec_eagle.config import TreeConfig
from adaspec_eagle.models import tiny_model
from adaspec_eagle.engine.speculative import DraftLMDrafter, plain_generate, speculative_generate


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(300, 96, generator=g), torch.randn(1, rows, 96, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    out = linear_routing.linear(x, w, b)
    assert out.shape == (1, rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    flat = linear_routing.linear(x[0], w, b)  # (rows, in) inputs too
    torch.testing.assert_close(flat, F.linear(x[0], w, b), rtol=1e-5, atol=1e-5)


def test_linear_leaves_other_inputs_to_f_linear(monkeypatch):
    """bf16, autograd and more than MAX_ROWS rows take F.linear itself (checked by intercepting torch.mm)."""
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    w = torch.randn(64, 32)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert torch.equal(linear_routing.linear(x, w.bfloat16()), F.linear(x, w.bfloat16()))
    x = torch.randn(linear_routing.MAX_ROWS + 1, 32)
    assert torch.equal(linear_routing.linear(x, w), F.linear(x, w))
    wg = w.clone().requires_grad_()
    y = linear_routing.linear(torch.randn(2, 32), wg)
    assert y.requires_grad and not calls
    linear_routing.linear(torch.randn(2, 32), w)
    assert calls  # the small fp32 case does use it


def test_small_batch_linears_patches_and_restores(monkeypatch):
    monkeypatch.setenv("ADASPEC_SMALL_BATCH_LINEAR", "1")
    model = tiny_model("llama", seed=0)
    plain = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    half = tiny_model("llama", seed=0).bfloat16()
    with linear_routing.small_batch_linears(model, None, half) as n:
        assert n == len(plain) and all("forward" in m.__dict__ for m in plain)
        assert not any("forward" in m.__dict__ for m in half.modules())  # bf16: untouched
        with linear_routing.small_batch_linears(model) as inner:  # re-entrant: nothing patched twice
            assert inner == 0
        assert all("forward" in m.__dict__ for m in plain)  # the inner exit keeps the outer's patches
    assert not any("forward" in m.__dict__ for m in plain)
    monkeypatch.setenv("ADASPEC_SMALL_BATCH_LINEAR", "0")
    with linear_routing.small_batch_linears(model) as n:
        assert n == 0
    monkeypatch.setenv("ADASPEC_SMALL_BATCH_LINEAR", "of")  # a typo is refused, not read as "on"
    with pytest.raises(AdaspecError, match="ADASPEC_SMALL_BATCH_LINEAR='of'"):
        linear_routing.mode()
    assert not any("forward" in m.__dict__ for m in plain)


def test_calibrate_routes_the_row_counts_measured_faster(monkeypatch):
    """The decision follows the timings: rows whose W @ x^T passes beat F.linear's by more than 5% are routed,
    ties and losses are not; each way is timed after a warm-up pass, alternating, and the fastest pass counts."""
    calls = []

    def fake_pass(weights, rows, routed, timer):
        calls.append((rows, routed))
        if len([c for c in calls if c == (rows, routed)]) == 1:
            return 0.001 if routed else 100.0  # the warm-up pass must not count either way
        stock = 1.0
        return {1: 0.5, 2: 0.5, 3: 0.94, 4: 0.97, 5: 1.5}.get(rows, 1.2) * stock if routed else stock

    monkeypatch.setattr(linear_routing, "_pass_seconds", fake_pass)
    weights = [torch.randn(64, 32), torch.randn(32, 64)]
    assert linear_routing.calibrate(weights, repeats=2) == frozenset({1, 2, 3})
    assert len(calls) == 8 * 2 * 3 and calls[:2] == [(1, True), (1, False)]
    assert linear_routing.calibrate([]) == frozenset()
    # at most CALIBRATION_BYTES of weights are timed (but always at least the first matrix)
    seen = []
    monkeypatch.setattr(linear_routing, "_pass_seconds", lambda w, r, routed, t: seen.append(len(w)) or 1.0)
    monkeypatch.setattr(linear_routing, "CALIBRATION_BYTES", 64 * 32 * 4 + 1)
    linear_routing.calibrate(weights * 3, repeats=1)
    assert set(seen) == {1}


def test_calibrate_on_real_products_and_routing_by_mode(monkeypatch):
    """auto measures once per model shape and thread count; 1 and 0 measure nothing; only the routed row counts
    go through W @ x^T (the rest through F.linear, seen by intercepting torch.mm)."""
    monkeypatch.setattr(linear_routing, "_CALIBRATED", {})
    model = tiny_model("llama", seed=0)
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    measured = linear_routing.calibrate([m.weight for m in modules], repeats=1)  # real timings: any subset
    assert measured <= linear_routing.ALL_ROWS
    counted = []
    monkeypatch.setattr(linear_routing, "calibrate", lambda w: counted.append(len(w)) or frozenset({2}))
    monkeypatch.delenv("ADASPEC_SMALL_BATCH_LINEAR", raising=False)
    assert linear_routing.mode() == "auto"
    assert linear_routing.routed_rows(modules) == {2} and linear_routing.routed_rows(modules) == {2}
    assert counted == [len(modules)]  # cached
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        linear_routing.routed_rows(modules)
    finally:
        torch.set_num_threads(threads)
    assert len(counted) == 2  # another thread count is measured anew
    for value, rows in (("1", linear_routing.ALL_ROWS), ("0", frozenset())):
        monkeypatch.setenv("ADASPEC_SMALL_BATCH_LINEAR", value)
        assert linear_routing.routed_rows(modules) == rows
    assert len(counted) == 2
    monkeypatch.setenv("ADASPEC_SMALL_BATCH_LINEAR", "auto")
    mm_rows = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: mm_rows.append(b.shape[1]) or real_mm(a, b))
    with linear_routing.small_batch_linears(model) as n:
        assert n == len(modules)
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
            assert not mm_rows  # 3 rows: F.linear
            model(torch.tensor([[5, 6]]))
            assert mm_rows and set(mm_rows) == {2}
    monkeypatch.setattr(linear_routing, "calibrate", lambda w: frozenset())
    monkeypatch.setattr(linear_routing, "_CALIBRATED", {})
    with linear_routing.small_batch_linears(model) as n:  # nothing measured faster: nothing patched
        assert n == 0 and not any("forward" in m.__dict__ for m in modules)
    monkeypatch.setattr(linear_routing, "_CALIBRATED", {})
    linear_routing.prepare(None, model)  # measures ahead of use, patches nothing
    assert len(linear_routing.calibrations()) == 1 and not any("forward" in m.__dict__ for m in modules)


def test_calibration_leaves_the_global_random_state_alone():
    w = [torch.randn(64, 32)]
    state = torch.get_rng_state()
    linear_routing.calibrate(w, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_engine_forwards_run_through_it(monkeypatch):
    """speculative_generate and plain_generate route the target's and the draft's linears through
    linear_routing.linear, and greedy output still equals transformers' own greedy decoding (stock F.linear)."""
    monkeypatch.setenv("ADASPEC_SMALL_BATCH_LINEAR", "1")  # every row count routed, whatever this machine measures
    target = tiny_model("llama", seed=0)
    ids = torch.randint(5, 100, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    hf = target.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(ids):].tolist()
    rows = []
    real = linear_routing.linear
    monkeypatch.setattr(linear_routing, "linear", lambda x, w, b=None, r=linear_routing.ALL_ROWS:
                        rows.append(x.numel() // x.shape[-1]) or real(x, w, b, r))
    out, _ = plain_generate(target, ids, 16, eos_token_id=[])
    assert out == hf and 1 in rows
    rows.clear()
    draft = tiny_model("llama", seed=0)
    spec, _ = speculative_generate(target, ids, DraftLMDrafter(draft), 16, eos_token_id=[],
                                   tree=TreeConfig(depth=3, topk=2, total_tokens=4))
    assert spec == hf and any(1 < r <= linear_routing.MAX_ROWS for r in rows)
    assert not any("forward" in m.__dict__ for m in target.modules())
