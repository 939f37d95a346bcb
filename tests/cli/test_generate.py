"""`adaspec-eagle generate` end to end on a tiny target: the streamed text equals plain greedy decoding's, the
statistics close the output, the tree budget can be tuned, and bad flags fail with a message naming the fix."""

import re

import pytest
import torch

from adaspec_eagle.cli import main
from adaspec_eagle.config import HeadConfig
from adaspec_eagle.models.heads import build_head, save_head
from adaspec_eagle.models import load_model
from adaspec_eagle.engine.speculative import plain_generate

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    target, tok = load_model("tiny-llama")
    folder = tmp_path_factory.mktemp("gen") / "head"
    torch.manual_seed(0)
    counts = torch.arange(target.config.vocab_size, dtype=torch.int64)
    save_head(build_head(target, HeadConfig(kind="eagle1")), folder, target_model=target, token_counts=counts)
    ids = tok(PROMPT)["input_ids"]
    plain, _ = plain_generate(target, ids, 10, eos_token_id=[])
    return folder, tok.decode(plain, skip_special_tokens=True)


def run(capsys, *args):
    rc = main(["generate", "--target", "tiny-llama", "--no-chat", "--max-new-tokens", "10", "--threads", "1",
               *args, PROMPT])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("flag", ["--head", "--drafter"])
@pytest.mark.parametrize("extra", [[], ["--draft-vocab", "40", "--tree-shape", "chain", "--depth", "3"],
                                   ["--total-tokens", "auto", "--depth", "4"]])
def test_generate_streams_plain_greedy_text_then_statistics(tiny, capsys, monkeypatch, extra, flag):
    folder, expected = tiny
    monkeypatch.setattr("adaspec_eagle.engine.speculative._eos_set", lambda target, eos: set())  # exactly 10 tokens
    rc, out, err = run(capsys, flag, str(folder) if flag == "--head" else f"head:{folder}", *extra)
    assert rc == 0, err
    text, _, stats = out.rpartition("\n\nsteps ")
    assert text == expected  # streamed pieces add up to the plain greedy text
    assert re.match(r"\d+  new tokens 10  tau ", stats) and "tok/s" in stats and "tree " in stats
    if "--draft-vocab" in extra:
        assert "draft_vocab=40" in stats
    if "auto" in extra:
        assert "[auto tree budget:" in err


def test_generate_plain_and_draft_lm(tiny, capsys, monkeypatch):
    _, expected = tiny
    monkeypatch.setattr("adaspec_eagle.engine.speculative._eos_set", lambda target, eos: set())
    for extra in ([], ["--draft-lm", "layers=1"], ["--lookup-tokens", "5"], ["--drafter", "draft-lm:layers=1"],
                  ["--drafter", "lookup:5"],
                  ["--draft-lm", "layers=1", "--lookup-tokens", "5", "--tree-shape", "chain", "--depth", "2"]):
        rc, out, err = run(capsys, *extra)
        assert rc == 0, err
        text, _, stats = out.rpartition("\n\nsteps ")
        assert text == expected, extra
        if "--lookup-tokens" in extra or "lookup:5" in extra:
            assert "lookup_tokens=5" in stats


def test_generate_bad_flags(tiny, capsys):
    folder, _ = tiny
    rc, _, err = run(capsys, "--head", str(folder), "--draft-vocab", "many")
    assert rc != 0 and "--draft-vocab 'many'" in err
    rc, _, err = run(capsys, "--head", str(folder), "--total-tokens", "lots")
    assert rc != 0 and "--total-tokens 'lots'" in err
    rc, _, err = run(capsys, "--temperature", "0.7")
    assert rc != 0 and "give --head, --draft-lm or --lookup-tokens to sample" in err
    rc, _, err = run(capsys, "--lookup-tokens", "-2")
    assert rc != 0 and "--lookup-tokens -2" in err


def test_streamer_holds_back_characters_split_across_tokens(smollm2):
    """SmolLM2's byte-level BPE splits 🦉 and CJK characters over several tokens: fed one token at a time, the
    streamer prints exactly the decoded text (no U+FFFD, nothing lost after it)."""
    import io

    from adaspec_eagle.cli.generate import Streamer

    _, tok = smollm2
    text = "Écris un haïku sur les hiboux 🦉 — 日本語でも書いて"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # some prefix ends mid-character
    out = io.StringIO()
    stream = Streamer(tok, out)
    for t in ids:
        stream([t])
        assert "\ufffd" not in out.getvalue()
    stream.finish()
    assert out.getvalue() == tok.decode(ids) == text
