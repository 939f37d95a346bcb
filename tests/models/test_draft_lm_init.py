import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.models.draft_lm import derive_from_target, init_draft, parse_draft_init
from adaspec_eagle.models import TINY_FAMILIES, load_model, tiny_tokenizer


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layers_init_copies_the_right_weights(family):
    target, tok = load_model(f"tiny-{family}-l3")
    draft = init_draft("layers=2", target, tok)
    assert draft.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 3
    t_state, d_state = target.state_dict(), draft.state_dict()
    for key, value in d_state.items():
        assert key in t_state, key
        assert torch.equal(value, t_state[key]), key
    # Every target parameter outside layers >= 2 made it into the draft.
    import re
    kept = {k for k in t_state if not (m := re.search(r"\.(?:layers|h)\.(\d+)\.", k)) or int(m.group(1)) < 2}
    assert kept == set(d_state)
    # A copy, not a view: training the draft leaves the target alone.
    with torch.no_grad():
        next(draft.parameters()).add_(1.0)
    assert not torch.equal(next(draft.parameters()), next(target.parameters()))
    # With all layers the derived draft is the target itself.
    full = derive_from_target(target, 3)
    ids = torch.randint(5, 100, (1, 9))
    torch.testing.assert_close(full(ids).logits, target(ids).logits)


def test_bad_draft_inits():
    target, tok = load_model("tiny-llama")
    with pytest.raises(AdaspecError, match="has 2 decoder layers; choose 1..2"):
        init_draft("layers=5", target, tok)
    with pytest.raises(AdaspecError, match="expected layers=N"):
        parse_draft_init("layers=x")
    with pytest.raises(AdaspecError, match="needs at least hidden= and layers="):
        parse_draft_init("fresh:hidden=32")
    with pytest.raises(AdaspecError, match="unknown model"):
        init_draft("pythia-31", target, tok)


def test_fresh_draft_has_requested_size():
    target, tok = load_model("tiny-qwen2")
    draft = init_draft("fresh:hidden=32,layers=1,heads=2", target, tok)
    assert draft.config.hidden_size == 32 and draft.config.num_hidden_layers == 1
    assert draft(torch.randint(5, 100, (1, 5))).logits.shape == (1, 5, target.config.vocab_size)


def test_tokenizer_mismatch_refused_before_training(tmp_path, monkeypatch):
    target, tok = load_model("tiny-llama")
    other = tiny_tokenizer()
    other.add_tokens(["<new>"])
    import adaspec_eagle.models.draft_lm as dl
    monkeypatch.setattr(dl, "load_model", lambda *a, **k: (load_model("tiny-llama-s1", with_tokenizer=False), other))
    with pytest.raises(AdaspecError, match="tokenizers differ: target .* has 102 tokens, draft 'x' has 103"):
        init_draft("x", target, tok)


def test_bad_fresh_item_is_named_in_the_error():
    from adaspec_eagle import AdaspecError
    from adaspec_eagle.models.draft_lm import parse_draft_init

    with pytest.raises(AdaspecError, match=r"bad item 'hidden=x'"):
        parse_draft_init("fresh:hidden=x,layers=2")
