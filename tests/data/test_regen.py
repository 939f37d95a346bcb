"""regen.py (training data from the target itself) and `data.self_distill` in the train-head pipeline."""

import json
from pathlib import Path

import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.data import regen
from adaspec_eagle.config import HeadRecipe, load_recipe
from adaspec_eagle.data import encode_example
from adaspec_eagle.models import load_model, target_identity, tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "heads" / "tiny.yaml")
EOS = 3  # <|im_end|> of the tiny tokenizer

EXAMPLES = [
    {"messages": ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"})},
    {"messages": ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, please."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Red."})},
    {"prompt": "2 + 2 =", "completion": " 4<|im_end|>"},
    {"messages": ({"role": "user", "content": "x" * 90}, {"role": "assistant", "content": "too long"})},
    {"messages": ({"role": "user", "content": "Count: one two"}, {"role": "assistant", "content": "three"})},
]



@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-llama")
    return model.eval(), tok


def greedy_reference(model, ids, limit):
    """Unbatched, unpadded greedy decoding with plain forwards: the target's own continuation (ids, eos?)."""
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(limit):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == EOS:
                return new, True
            seq.append(nxt)
            new.append(nxt)
    return new, False


def count_generate(model, monkeypatch):
    rows = []
    real = model.generate

    def counting(*args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return rows


def test_answers_are_the_targets_greedy_continuation(tiny, tmp_path):
    model, tok = tiny
    max_length = 72
    answered, stats = regen.regenerate(model, tok, EXAMPLES, range(len(EXAMPLES)), tmp_path / "r.jsonl",
                                       max_length=max_length, batch_size=3, progress=False)
    assert sorted(answered) == [0, 1, 2, 4] and stats["too_long"] == 1  # example 3's prompt exceeds max_length
    for i, ex in answered.items():
        ids = regen.prompt_ids(tok, EXAMPLES[i])
        want, _ = greedy_reference(model, ids, max_length - len(ids))
        if "messages" in ex:  # first user turn only, one assistant turn: the target's answer
            roles = [m["role"] for m in ex["messages"]]
            assert roles == (["system", "user", "assistant"] if i == 1 else ["user", "assistant"])
            answer = ex["messages"][-1]["content"]
        else:
            assert ex["prompt"] == EXAMPLES[i]["prompt"] and ex["completion"].endswith("<|im_end|>")
            answer = ex["completion"][: -len("<|im_end|>")]
        assert tok(answer, add_special_tokens=False)["input_ids"] == want
        # the encoded sample is the prompt, then the continuation, with the loss on the answer tokens
        full, mask = encode_example(tok, ex)
        assert full[: len(ids) + len(want)] == ids + want
        assert all(mask[len(ids): len(ids) + len(want)]) and not any(mask[: len(ids)])
    assert stats["generated"] == 4 and stats["new_tokens"] > 0


def test_answer_stops_at_eos(tiny, tmp_path, monkeypatch):
    # the random tiny target never emits <|im_end|>; declare a token it does emit an EOS of the target
    model, tok = tiny
    ids = regen.prompt_ids(tok, EXAMPLES[0])
    free, _ = greedy_reference(model, ids, 20)
    stop = free[3]  # its 4th greedy token (the answer is cut before its first occurrence)
    monkeypatch.setattr(model.generation_config, "eos_token_id", [EOS, stop])
    answered, stats = regen.regenerate(model, tok, EXAMPLES, [0], tmp_path / "r.jsonl", max_length=72,
                                       progress=False)
    answer = answered[0]["messages"][-1]["content"]
    assert tok(answer, add_special_tokens=False)["input_ids"] == free[: free.index(stop)] and stats["eos"] == 1


def test_resume_skips_finished_records(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    path = tmp_path / "r.jsonl"
    rows = count_generate(model, monkeypatch)
    first, _ = regen.regenerate(model, tok, EXAMPLES, [0, 1], path, max_length=72, batch_size=8, progress=False)
    assert rows == [2]
    with open(path, "a") as f:  # a run killed mid-write leaves a torn line
        f.write('{"index": 4, "key": "tr')
    rows.clear()
    both, stats = regen.regenerate(model, tok, EXAMPLES, [0, 1, 2, 4], path, max_length=72, batch_size=8,
                                   progress=False)
    assert rows == [2] and stats["cached"] == 2 and stats["generated"] == 2  # only 2 and 4 were answered
    assert both[0] == first[0] and both[1] == first[1]
    rows.clear()
    again, stats = regen.regenerate(model, tok, EXAMPLES, [0, 1, 2, 4], path, max_length=72, progress=False)
    assert rows == [] and stats["cached"] == 4 and again == both
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["regen"] == 1 and len(lines) == 5  # header + 4 records, the torn line dropped
    rows.clear()  # another max_length changes each record's key: answered again
    regen.regenerate(model, tok, EXAMPLES, [0], path, max_length=60, progress=False)
    assert rows == [1]


def test_cache_of_another_target_is_refused(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "r.jsonl"
    regen.regenerate(model, tok, EXAMPLES, [0], path, max_length=40, progress=False)
    other = tiny_model("llama", seed=1).eval()
    with pytest.raises(AdaspecError, match="another target"):
        regen.regenerate(other, tok, EXAMPLES, [0], path, max_length=40, progress=False)
    with pytest.raises(AdaspecError, match="--overwrite"):
        regen.check_cache(path, other)
    regen.check_cache(path, model)  # the same target passes
    _, stats = regen.regenerate(other, tok, EXAMPLES, [0], path, max_length=40, progress=False, fresh=True)
    assert stats["generated"] == 1 and list(regen.read_cache(path, target_identity(other))) == [0]


def chat_file(path, n=16):
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "one", "two", "yes", "no"]
    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=3))},
                    {"role": "assistant", "content": " ".join(rng.choices(words, k=6))},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "done"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def test_train_head_self_distill_end_to_end(tmp_path, monkeypatch):
    from adaspec_eagle.training.head import load_samples, load_target, run_pipeline

    data, out = chat_file(tmp_path / "chats.jsonl"), tmp_path / "run"
    cfg = load_recipe(HeadRecipe, TINY, [f"output_dir={out}", f"data.dataset={data}", "data.num_samples=6",
                                         "data.holdout=3", "data.max_length=64", "data.self_distill=true",
                                         "train.max_steps=2", "train.save_every=2"])
    calls = []
    real = regen.greedy_batch
    monkeypatch.setattr(regen, "greedy_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    quiet = dict(progress=False, log=lambda m: None)
    result = run_pipeline(cfg, **quiet)
    assert set(result["eval"]) == {"reference", "adaspec"} and result["eval"]["adaspec"]["positions"] > 0
    lines = (out / "regen.jsonl").read_text().splitlines()
    assert sum(calls) == len(lines) - 1 == 9  # 6 train + 3 held-out prompts answered, once each
    # the cached features were built from the regenerated answers: the samples hold the target's text
    target, tok = load_target("tiny-llama")
    train, heldout = load_samples(cfg, tok, target, progress=False, log=lambda m: None)
    answers = {json.loads(x)["answer"] for x in lines[1:]}
    for s in list(train) + list(heldout):
        text = tok.decode(s["input_ids"][s["loss_mask"]].tolist())
        assert any(text in (a, a + "<|im_end|>") for a in answers)  # one turn: the target's answer
    assert len(train) == 6 and len(heldout) == 3
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest  # features were cached from these samples
    calls.clear()  # a rerun finds every answer cached and every stage complete
    again = run_pipeline(cfg, **quiet)
    assert calls == []
    for stage, e in result["eval"].items():  # the same heads, evaluated again: the same numbers
        assert {k: v for k, v in again["eval"][stage].items() if k != "chain"} == pytest.approx(
            {k: v for k, v in e.items() if k != "chain"})
        assert again["eval"][stage]["chain"]["tau"] == pytest.approx(e["chain"]["tau"])


def test_answer_tokens_caps_each_answer_and_is_part_of_the_cache_key(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "r.jsonl"
    capped, stats = regen.regenerate(model, tok, EXAMPLES, [0, 4], path, max_length=72, batch_size=2,
                                     progress=False, answer_tokens=5)
    for i, ex in capped.items():
        ids = regen.prompt_ids(tok, EXAMPLES[i])
        want, _ = greedy_reference(model, ids, 5)
        assert tok(ex["messages"][-1]["content"], add_special_tokens=False)["input_ids"] == want  # the first 5
    assert stats["new_tokens"] == 10
    longer, stats = regen.regenerate(model, tok, EXAMPLES, [0, 4], path, max_length=72, batch_size=2,
                                     progress=False, answer_tokens=8)
    assert stats["generated"] == 2 and stats["new_tokens"] == 16  # another cap: answered again, not reused


def test_regen_batch_size_sets_the_generate_batches(tmp_path, monkeypatch):
    from adaspec_eagle.training.head import load_samples

    model, tok = load_model("tiny-llama")
    rows = count_generate(model, monkeypatch)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": "a"}]}) + "\n"
                             for i in range(7)))
    cfg = load_recipe(HeadRecipe, TINY, [f"output_dir={tmp_path / 'out'}", f"data.dataset={chats}",
                                         "data.self_distill=true", "data.regen_batch_size=3", "data.holdout=1",
                                         "data.answer_tokens=4", "train.batch_size=1"])
    train, held = load_samples(cfg, tok, model, progress=False, log=lambda m: None)
    assert rows == [3, 3, 1] and len(train) == 6 and len(held) == 1


def test_cached_answers_replace_the_examples_answers_without_a_target(tiny, tmp_path):
    import lzma

    model, tok = tiny
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": list(ex["messages"])}) + "\n"
                             for ex in EXAMPLES if "messages" in ex))
    cfg = load_recipe(HeadRecipe, TINY, [f"data.dataset={chats}"]).data
    from adaspec_eagle.data import load_examples

    examples, _ = load_examples(cfg, tok.eos_token)
    answered, _ = regen.regenerate(model, tok, examples, [0, 3], tmp_path / "r.jsonl", max_length=72,
                                   progress=False, answer_tokens=4)
    packed = tmp_path / "r.jsonl.xz"
    packed.write_bytes(lzma.compress((tmp_path / "r.jsonl").read_bytes()))
    for path in (tmp_path / "r.jsonl", packed):
        got, source = regen.cached_answer_examples(cfg, tok, path)
        assert got[0] == answered[0] and got[3] == answered[3]
        assert got[1] is None and got[2] is None and len(got) == len(examples) and source is not None
