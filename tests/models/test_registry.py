import importlib.util

import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle import models
from adaspec_eagle.cli import main


def test_unknown_name_suggests_close_names():
    with pytest.raises(AdaspecError, match=r"unknown model 'smollm2-135'.*'smollm2-135m'"):
        models.resolve("smollm2-135")
    with pytest.raises(AdaspecError, match="unknown model 'phi2'.*'phi-2'"):
        models.load_model("phi2")


def test_missing_path_and_gguf(tmp_path):
    with pytest.raises(AdaspecError, match="does not exist"):
        models.resolve(str(tmp_path / "missing-folder"))
    with pytest.raises(AdaspecError, match="GGUF file .* does not exist"):
        models.resolve(str(tmp_path / "model.gguf"))


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(AdaspecError, match="needs the `gguf` package: pip install gguf"):
        models.load_model(str(f))


def test_hub_ids_and_registry_sources():
    assert models.resolve("microsoft/phi-2") == models.Source("microsoft/phi-2", "microsoft/phi-2", None, False)
    src = models.resolve("phi-2")
    assert src.path == "microsoft/phi-2" and not src.local
    names = [row[0] for row in models.list_models()]
    for required in ("smollm2-135m", "phi-2", "pythia-31m", "pythia-1.4b", "codegen-350m-mono"):
        assert required in names
    assert any(models.REGISTRY[n].family == "qwen2" and models.REGISTRY[n].chat for n in names)
    assert any("llama-3" in n and models.REGISTRY[n].chat for n in names)


def test_list_models_cli(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "microsoft/phi-2" in out


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_tiny_models_features_match_logits(family):
    model, tok = models.load_model(f"tiny-{family}")
    assert model.config.vocab_size == models.TINY_VOCAB == len(tok)
    ids = torch.randint(5, models.TINY_VOCAB, (2, 10))
    out = models.target_forward_features(model, ids, eagle3_layers=True)
    h = model.config.hidden_size
    assert out["features"].shape == (2, 10, h) and out["fused"].shape == (2, 10, 3 * h)
    # The last hidden state is post-final-norm: the lm_head of it reproduces the logits.
    logits = model(ids).logits
    torch.testing.assert_close(model.get_output_embeddings()(out["features"]), logits)
    # Distributions are peaked but not degenerate, so speculative tests see accepts and rejects.
    top = logits.softmax(-1).max(-1).values.mean().item()
    assert 0.1 < top < 0.95


def test_tiny_names_are_deterministic():
    a = models.load_model("tiny-llama-s3-l1", with_tokenizer=False)
    b = models.load_model("tiny-llama-s3-l1", with_tokenizer=False)
    c = models.load_model("tiny-llama-s4-l1", with_tokenizer=False)
    assert a.config.num_hidden_layers == 1
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert models.target_identity(a)["fingerprint"] == models.target_identity(b)["fingerprint"]
    assert models.target_identity(a)["fingerprint"] != models.target_identity(c)["fingerprint"]


def test_tokenizer_compatibility():
    tok = models.tiny_tokenizer()
    models.check_tokenizers_compatible(tok, models.tiny_tokenizer(), 102, 128)  # padding rows are fine
    other = models.tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(AdaspecError, match=r"tokenizers differ: target has 102 tokens, draft has 103 tokens"):
        models.check_tokenizers_compatible(tok, other)
    with pytest.raises(AdaspecError, match="100 embedding rows but its tokenizer has 102"):
        models.check_tokenizers_compatible(tok, tok, 100, 102)


def test_target_identity_checks():
    model = models.tiny_model("llama", seed=0)
    recorded = models.target_identity(model)
    models.check_target_identity(recorded, model)
    with pytest.raises(AdaspecError, match="hidden_size=64.*hidden_size=32"):
        models.check_target_identity(recorded, models.tiny_model("llama", hidden_size=32))
    with pytest.warns(UserWarning, match="fingerprint differs"):
        models.check_target_identity(recorded, models.tiny_model("llama", seed=1))
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights in bf16 (a GPU-trained head's target): no warning
        models.check_target_identity(models.target_identity(copy.deepcopy(model).to(torch.bfloat16)), model)
        # heads saved by earlier builds recorded the fp32 fingerprint: still the same target
        models.check_target_identity({**recorded, "fingerprint": recorded["legacy_fingerprint"]}, model)


def test_unknown_dtype():
    with pytest.raises(AdaspecError, match="unknown dtype 'float8'"):
        models.load_model("tiny-llama", dtype="float8")


@pytest.mark.slow
def test_real_smollm2_loads_and_greedy_matches_generate(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.get_input_embeddings().weight.shape[0] == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    # The same greedy continuation by full recomputation without any cache.
    seq = ids
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    for _ in range(12):
        nxt = model(seq, use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        if nxt.item() in eos:
            break
    assert seq[0, ids.shape[1]:].tolist() == ref
    assert "Paris" in tok.decode(ref)
