"""Small-batch CPU linear layers: the same products as F.linear (to float32 rounding), only where they apply,
installed and removed exactly, and used by the engine's forwards."""

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
        linear_routing.enabled()
    assert not any("forward" in m.__dict__ for m in plain)


def test_engine_forwards_run_through_it(monkeypatch):
    """speculative_generate and plain_generate route the target's and the draft's linears through
    linear_routing.linear, and greedy output still equals transformers' own greedy decoding (stock F.linear)."""
    target = tiny_model("llama", seed=0)
    ids = torch.randint(5, 100, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    hf = target.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(ids):].tolist()
    rows = []
    real = linear_routing.linear
    monkeypatch.setattr(linear_routing, "linear", lambda x, w, b=None: rows.append(x.numel() // x.shape[-1])
                        or real(x, w, b))
    out, _ = plain_generate(target, ids, 16, eos_token_id=[])
    assert out == hf and 1 in rows
    rows.clear()
    draft = tiny_model("llama", seed=0)
    spec, _ = speculative_generate(target, ids, DraftLMDrafter(draft), 16, eos_token_id=[],
                                   tree=TreeConfig(depth=3, topk=2, total_tokens=4))
    assert spec == hf and any(1 < r <= linear_routing.MAX_ROWS for r in rows)
    assert not any("forward" in m.__dict__ for m in target.modules())
