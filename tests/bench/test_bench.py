"""Benchmarks: metric arithmetic on hand-made step records, the record / Markdown / plot outputs, prompt files,
and one end-to-end `adaspec-eagle bench` run on tiny random models (no network)."""

import dataclasses
import json
import math

import pytest

from adaspec_eagle import AdaspecError
from adaspec_eagle.bench import runner as B
from adaspec_eagle.bench import metrics as M
from adaspec_eagle.bench import report as R
from adaspec_eagle.engine import factory as F
from adaspec_eagle.io import MARKER

# Four verification forwards of a greedy gamma=4 chain: all accepted, one, none, two.
CHAIN_STEPS = [{"accepted": 4, "drafted": 4}, {"accepted": 1, "drafted": 4},
               {"accepted": 0, "drafted": 4}, {"accepted": 2, "drafted": 4}]


def test_metrics_by_hand_on_chain_steps():
    # tau: (5 + 2 + 1 + 3) / 4 forwards, the bonus token counted in each.
    assert M.tau(CHAIN_STEPS) == pytest.approx(11 / 4)
    # paper alpha: 7 accepted; rounds 2, 3, 4 stopped early -> one rejection each, round 1 none: 7 / (7 + 3).
    assert M.paper_alpha(CHAIN_STEPS, gamma=4) == pytest.approx(0.7)
    # vLLM-style: 7 accepted of 16 drafted (drafts after a rejection count as drafted, not as rejected).
    assert M.drafted_acceptance(CHAIN_STEPS) == pytest.approx(7 / 16)
    # P(accepted >= j): j=1: 3 of 4 (4,1,2); j=2: 2 (4,2); j=3: 1; j=4: 1.
    assert M.acceptance_by_position(CHAIN_STEPS, 4) == pytest.approx([0.75, 0.5, 0.25, 0.25])
    assert M.accepted_length_histogram(CHAIN_STEPS, 4) == [1, 1, 1, 0, 1]


def test_tau_counts_the_tokens_kept():
    # The same four forwards in a generation that kept 9 tokens (EOS or max_new_tokens inside the last one).
    assert M.tau(CHAIN_STEPS, emitted=9) == pytest.approx(9 / 4)
    assert M.summarize_steps(CHAIN_STEPS, depth=4, emitted=9)["tau"] == pytest.approx(9 / 4)
    assert M.summarize_steps(CHAIN_STEPS, depth=4, emitted=9)["accepted_per_drafted"] == pytest.approx(7 / 16)


def test_alpha_counts_one_rejection_per_round_not_per_unverified_draft():
    # With gamma = 2 the same records read differently: rounds with accepted >= 2 have no rejection.
    steps = [{"accepted": 2, "drafted": 2}, {"accepted": 0, "drafted": 2}, {"accepted": 1, "drafted": 2}]
    assert M.paper_alpha(steps, gamma=2) == pytest.approx(3 / 5)
    assert M.tau(steps) == pytest.approx(6 / 3)
    assert M.drafted_acceptance(steps) == pytest.approx(3 / 6)
    # A tree step: 3 of 48 drafted tokens accepted.
    tree = [{"accepted": 3, "drafted": 48}, {"accepted": 5, "drafted": 48}]
    assert M.drafted_acceptance(tree) == pytest.approx(8 / 96)
    assert M.accepted_length_histogram(tree, 4) == [0, 0, 0, 1, 1]  # 5 > depth falls in the last bin


def test_summaries_of_nothing_are_null_not_nan():
    s = M.summarize_steps([], depth=3, gamma=4)
    assert s["tau"] is None and s["alpha"] is None and s["accepted_per_drafted"] is None
    assert s["acceptance_by_position"] == [None, None, None]
    assert M.summarize_steps(CHAIN_STEPS, depth=4)["alpha"] is None  # a tree has no paper alpha
    assert math.isnan(M.paper_alpha([]))


def test_spread_median_quartiles():
    s = M.spread([4.0, 1.0, 3.0, 2.0, float("nan")])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (2.5, 1.0, 4.0, 1.75, 3.25, 4)
    assert M.spread([])["median"] is None


def _fake_record(mismatch: bool = False, engine: bool = False):
    """A record from hand-made runs: 2 prompts x 2 repeats; plain 10 tokens in 1 s a prompt; with `engine`, the
    engine's plain loop too, 10 tokens in 0.8 s a prompt."""
    plain = B.Method("plain-hf", "plain", None)
    spec = B.Method("head:x", "speculative", None, depth=4, info={"drafter": "head"})
    chain = B.Method("head:x [chain γ=4]", "speculative", None, depth=4, gamma=4)
    lookup = B.Method("prompt-lookup(10)", "prompt_lookup", None)
    ids = [list(range(10)), list(range(20, 30))]
    plain_runs = [[B.Run(ids[i], 1.0, target_forwards=10) for _ in range(2)] for i in range(2)]
    # speculative: 2 s total per repeat in repeat 0, 1 s in repeat 1 -> 10 and 20 tok/s vs plain 10 tok/s.
    # Its four forwards verify 11 tokens; the generation keeps 10 (the last forward runs past max_new_tokens).
    spec_runs = [[B.Run(ids[i], 1.0 if r == 0 else 0.5, steps=CHAIN_STEPS) for r in range(2)] for i in range(2)]
    chain_runs = [[B.Run(ids[i], 2.0, steps=CHAIN_STEPS) for _ in range(2)] for i in range(2)]
    wrong = list(ids[1][:3]) + [99] + ids[1][4:]
    lookup_runs = [[B.Run(ids[0], 0.5, target_forwards=5)] * 2,
                   [B.Run(wrong if mismatch else ids[1], 0.5, target_forwards=4)] * 2]
    methods = [plain, spec, chain, lookup]
    runs = {"toy": {"plain-hf": plain_runs, "head:x": spec_runs, "head:x [chain γ=4]": chain_runs,
                    "prompt-lookup(10)": lookup_runs}}
    if engine:
        methods.insert(1, B.Method(R.ENGINE_PLAIN, "plain", None))
        runs["toy"][R.ENGINE_PLAIN] = [[B.Run(ids[i], 0.8, target_forwards=10) for _ in range(2)] for i in range(2)]
    suites = [{"name": "toy", "source": "hand-made", "prompts": [[1, 2, 3], [4, 5]]}]
    cfg = B.BenchConfig(target="tiny-llama", drafters=["head:x"], suites=["toy"], repeats=2, depth=4)
    return R.make_record(cfg, suites, methods, runs)


def test_record_figures_by_hand():
    rec = _fake_record()
    res = rec["results"]["toy"]
    spec = res["head:x"]
    assert spec["tokens_per_s"]["median"] == pytest.approx(15.0)  # runs at 10 and 20 tok/s
    assert (spec["speedup"]["min"], spec["speedup"]["max"]) == pytest.approx((1.0, 2.0))
    # acceptance pools all prompts and repeats: the four chain records, four times over. tau counts the tokens
    # kept (10 a prompt in 4 forwards), not the 11 verified; the acceptance figures count the verified ones.
    assert spec["tau"] == pytest.approx(10 / 4) and spec["steps"] == 16
    assert spec["per_prompt"][0]["tau"] == pytest.approx(10 / 4)
    assert spec["accepted_per_drafted"] == pytest.approx(7 / 16)
    assert spec["alpha"] is None and res["head:x [chain γ=4]"]["alpha"] == pytest.approx(0.7)
    assert spec["per_prompt"][0]["accepted"] == [4, 1, 0, 2] and spec["per_prompt"][1]["drafted"] == [4] * 4
    assert res["plain-hf"]["speedup"]["median"] == pytest.approx(1.0)
    assert res["prompt-lookup(10)"]["tau"] == pytest.approx(20 / 9)  # new tokens / counted target forwards
    assert res["prompt-lookup(10)"]["speedup"]["median"] == pytest.approx(2.0)
    assert rec["lossless"] == {m["name"]: True for m in rec["methods"]}


def test_speculation_share_against_the_engines_plain_loop():
    """With the engine's plain loop measured beside plain transformers, each speculative row also gets its speedup
    over that loop (speculation's own part); bench.md shows it as a column, and not without the engine row."""
    rec = _fake_record(engine=True)
    res = rec["results"]["toy"]
    assert res[R.ENGINE_PLAIN]["speedup"]["median"] == pytest.approx(1.25)  # the engine's own part
    over = res["head:x"]["speedup_over_engine"]  # 10 and 20 tok/s against 12.5
    assert (over["min"], over["max"]) == pytest.approx((0.8, 1.6))
    assert res["head:x"]["speedup"]["median"] == pytest.approx(over["median"] * 1.25)
    assert "speedup_over_engine" not in res[R.ENGINE_PLAIN] and "speedup_over_engine" not in res["prompt-lookup(10)"]
    md = R.markdown_table(rec)
    assert f"| speedup | over `{R.ENGINE_PLAIN}` | lossless |" in md
    assert "| toy | 2 | head:x | 2.50 | — | 0.438 | 15.0 [10.0–20.0] | 1.50 [1.00–2.00] | 1.20 [0.80–1.60] | yes |" in md
    assert "| toy | 2 | prompt-lookup(10) | 2.22 | — | — | 20.0 [20.0–20.0] | 2.00 [2.00–2.00] | — | yes |" in md
    plain_only = R.markdown_table(_fake_record())
    assert "| speedup | lossless |" in plain_only and "Over `" not in plain_only and "speedup_over_engine" not in _fake_record()["results"]["toy"]["head:x"]


def test_bench_tau_recounts_an_old_record(tmp_path):
    """scripts/bench_tau.py: a record whose engine rows counted verified tokens (mean(accepted + 1)) gets the
    tokens kept instead, overall and per prompt, and its bench.md rendered again; a second pass changes nothing."""
    from _helpers import load_script

    bench_tau = load_script("scripts/bench_tau.py")
    rec = _fake_record()
    for res in rec["results"]["toy"].values():  # as the old code wrote it
        if res["tau_source"] == bench_tau.SOURCE:
            res["tau"], res["tau_source"] = M.tau(CHAIN_STEPS), "engine step records"
            for row in res["per_prompt"]:
                row["tau"] = M.tau(CHAIN_STEPS)
    out = tmp_path / "b"
    R.write_outputs(rec, out)
    assert "| toy | 2 | head:x | 2.75 |" in (out / "bench.md").read_text()
    assert bench_tau.main([str(out)]) == 0
    new = json.loads((out / "bench.json").read_text())["results"]["toy"]
    assert new["head:x"]["tau"] == pytest.approx(10 / 4) and new["head:x"]["per_prompt"][1]["tau"] == pytest.approx(2.5)
    assert new["prompt-lookup(10)"]["tau"] == pytest.approx(20 / 9)  # not an engine row: unchanged
    assert "| toy | 2 | head:x | 2.50 |" in (out / "bench.md").read_text()
    before = (out / "bench.json").read_text()
    assert bench_tau.main([str(out)]) == 0 and (out / "bench.json").read_text() == before


def test_time_split_table_by_hand():
    rec = _fake_record()
    assert R.time_split_table(rec) == []  # no engine split recorded: no table
    # 16 steps over 2 prompts x 2 repeats; plain-hf runs at 10 tok/s (100 ms/token); tau 10/4.
    rec["results"]["toy"]["head:x"]["time_split_s"] = {"draft_time_s": 1.6, "verify_time_s": 3.2,
                                                      "prefill_time_s": 0.4, "wall_s": 3.0}
    lines = R.time_split_table(rec)
    # draft 100 ms/step, verify 200 ms/step, prefill 100 ms/prompt, bound 2.5 x 100 / 300 = 0.83
    assert lines[-1] == "| toy | head:x | 16 | 100.0 | 200.0 | 100 | 100.0 | 0.83 | 1.50 [1.00–2.00] |"
    assert "Where the time goes" in R.markdown_table(rec)


def test_lossless_flag_and_mismatch_position():
    rec = _fake_record(mismatch=True)
    res = rec["results"]["toy"]["prompt-lookup(10)"]
    assert res["lossless"] is False and rec["lossless"]["prompt-lookup(10)"] is False
    assert res["mismatches"] == [{"prompt": 1, "first_difference_at": 3}]
    assert rec["lossless"]["head:x"] is True


def test_bench_cli_fails_when_a_greedy_row_is_not_lossless(tmp_path, monkeypatch, capsys):
    """Every output is written, the table says **no**, and the exit status is 1 with the reason on stderr."""
    from adaspec_eagle.cli import main

    monkeypatch.setattr(B, "run_bench", lambda cfg: _fake_record(mismatch=True))
    out = tmp_path / "bench"
    assert main(TINY + ["--out", str(out)]) == 1
    assert json.loads((out / "bench.json").read_text())["lossless"]["prompt-lookup(10)"] is False
    assert "| **no** |" in (out / "bench.md").read_text()
    assert "greedy output differs from plain-hf for ['prompt-lookup(10)']" in capsys.readouterr().err
    monkeypatch.setattr(B, "run_bench", lambda cfg: _fake_record())
    assert main(TINY + ["--out", str(tmp_path / "ok")]) == 0


REQUIRED = {
    "record": {"schema", "created", "config", "machine", "reference", "methods", "suites", "results", "lossless"},
    "machine": {"cpu", "cores", "torch_threads", "device", "torch", "transformers", "python"},
    "result": {"kind", "new_tokens", "tokens_per_s", "speedup", "steps", "tau", "alpha", "alpha_gamma",
               "accepted_per_drafted", "acceptance_by_position", "accepted_length_hist", "lossless",
               "mismatches", "per_prompt"},
    "spread": {"median", "min", "max", "q1", "q3", "n"},
    "per_prompt": {"prompt", "new_tokens", "seconds", "tokens_per_s", "matches_plain"},
}


def check_schema(rec: dict) -> None:
    assert REQUIRED["record"] <= set(rec) and rec["schema"] == R.SCHEMA
    assert REQUIRED["machine"] <= set(rec["machine"])
    assert {"target", "temperature", "tree", "max_new_tokens", "repeats", "warmup"} <= set(rec["config"])
    assert rec["reference"] == rec["methods"][0]["name"]
    for suite, by_method in rec["results"].items():
        assert set(by_method) == {m["name"] for m in rec["methods"]}
        assert len(rec["suites"][suite]["prompt_tokens"]) == rec["suites"][suite]["num_prompts"]
        for res in by_method.values():
            assert REQUIRED["result"] <= set(res)
            assert REQUIRED["spread"] <= set(res["tokens_per_s"]) and REQUIRED["spread"] <= set(res["speedup"])
            assert len(res["per_prompt"]) == rec["suites"][suite]["num_prompts"]
            for row in res["per_prompt"]:
                assert REQUIRED["per_prompt"] <= set(row)


def test_outputs_written_atomically(tmp_path):
    rec = _fake_record()
    written = R.write_outputs(rec, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["bench.json", "bench.md", *R.PLOTS,
                                                                           MARKER])
    loaded = json.loads((tmp_path / "out" / "bench.json").read_text())
    check_schema(loaded)
    for name in R.PLOTS:
        assert open(written[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| toy | 2 | head:x [chain γ=4] | 2.50 | 0.700 | 0.438 |" in md  # 10 tokens kept of 11 verified
    assert "| toy | 2 | head:x | 2.50 | — | 0.438 | 15.0 [10.0–20.0] | 1.50 [1.00–2.00] | yes |" in md


def test_prompt_file_formats_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "raw text"}\n\n{"messages": [{"role": "system", "content": "s"}, {"role": "user", '
                 '"content": "u1"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}, '
                 '{"role": "assistant", "content": "a2"}]}\n{"turns": ["t1", "t2"]}\n')
    prompts = B.read_prompt_file(str(f), 10)
    assert prompts[0] == "raw text"
    assert [m["content"] for m in prompts[1]] == ["s", "u1", "a", "u2"]  # up to the last user turn
    assert prompts[2] == [{"role": "user", "content": "t1"}]
    assert len(B.read_prompt_file(str(f), 2)) == 2
    f.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(AdaspecError, match="record 1"):
        B.read_prompt_file(str(f), 10)
    with pytest.raises(AdaspecError, match="unknown suite"):
        B.load_suite("gsm9k", None, 1)


def test_paper_task_suite_from_a_local_copy(tmp_path):
    from adaspec_eagle.models import tiny_tokenizer

    f = tmp_path / "gsm8k.jsonl"
    f.write_text('{"question": "Tom has 3 apples.", "answer": "3 #### 3"}\n' * 3)
    suite = B.load_suite(f"gsm8k:{f}", tiny_tokenizer(), 2)
    assert suite["name"] == "gsm8k" and len(suite["prompts"]) == 2
    text = tiny_tokenizer().decode(suite["prompts"][0])
    assert text.startswith("Tom has 3 apples.") and "step by step" in text  # the paper's GSM8K prompt


def test_encode_prompt_text_chat_and_ids():
    from adaspec_eagle.models import tiny_tokenizer

    tok = tiny_tokenizer()
    assert B.encode_prompt(tok, [5, 6, 7]) == [5, 6, 7]
    chat = B.encode_prompt(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(B.encode_prompt(tok, "hi")).endswith("hi")


def test_drafter_specs_and_config_errors():
    assert F.parse_drafter("head:runs/h/adaspec/") == F.DrafterSpec("head:adaspec", "head", "runs/h/adaspec/")
    assert F.parse_drafter("draft-lm:layers=4") == F.DrafterSpec("draft-lm:layers=4", "draft-lm", "layers=4")
    assert F.parse_drafter("kd=head:heads/kd") == F.DrafterSpec("kd", "head", "heads/kd")
    assert F.parse_drafter("lookup:10") == F.DrafterSpec("lookup:10", "lookup", "10")
    with pytest.raises(AdaspecError, match="head:PATH"):
        F.parse_drafter("eagle:foo")
    with pytest.raises(AdaspecError, match="lookup:N takes the number"):
        F.parse_drafter("lookup:many")
    with pytest.raises(AdaspecError, match="--lookup-tokens"):
        B.BenchConfig(lookup_tokens=-1)
    with pytest.raises(AdaspecError, match="--peers"):
        B.BenchConfig(peers=["medusa"])
    with pytest.raises(AdaspecError, match="--repeats"):
        B.BenchConfig(repeats=0)


def test_engine_step_records_checked_against_engine_stats():
    recorded = [{"accepted": 2, "drafted": 8}, {"accepted": 0, "drafted": 8}]
    assert B.engine_step_records({"steps": 2, "accepted_lengths": [3, 1]}, recorded) == recorded
    contract = [{"accepted": 1, "drafted": 4, "draft_time": 0.0, "verify_time": 0.0}]
    assert B.engine_step_records({"steps": contract}, []) == contract
    with pytest.raises(RuntimeError, match="disagree"):
        B.engine_step_records({"steps": 2, "accepted_lengths": [3, 2]}, recorded)


def _tiny_head(folder):
    from adaspec_eagle.config import HeadConfig
    from adaspec_eagle.models.heads import build_head, save_head
    from adaspec_eagle.models import load_model

    target = load_model("tiny-llama", with_tokenizer=False)
    save_head(build_head(target, HeadConfig(kind="eagle1")), folder, target_model=target)
    return folder


def _prompts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The quick brown fox"}\n'
                       '{"messages": [{"role": "user", "content": "Say something nice."}]}\n')
    return prompts


TINY = ["bench", "--target", "tiny-llama", "--num-prompts", "2", "--max-new-tokens", "12", "--depth", "3",
        "--topk", "2", "--total-tokens", "6", "--threads", "1", "--no-progress"]


def test_bench_cli_end_to_end_on_tiny_models(tmp_path):
    from adaspec_eagle.cli import main

    head, out = _tiny_head(tmp_path / "h"), tmp_path / "bench"
    rc = main(TINY + ["--drafter", "self=draft-lm:layers=1", "--drafter", f"head:{head}", "--drafter", "lookup:4",
                      "--suite", f"jsonl:{_prompts(tmp_path)}", "--repeats", "1", "--warmup", "0", "--alpha-protocol",
                      "--lookup-tokens", "3", "--baseline", "hf,engine", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "bench.json").read_text())
    check_schema(rec)
    names = [m["name"] for m in rec["methods"]]
    assert names == ["plain-hf", "plain-engine", "self", "self+lookup(3)", "self [chain γ=4]", "head:h",
                     "head:h+lookup(3)", "head:h [chain γ=4]", "lookup:4", "assisted:self",
                     "prompt-lookup(10)"]  # no assisted generation for a head
    trees = {m["name"]: m.get("tree", {}) for m in rec["methods"]}
    assert trees["self+lookup(3)"]["lookup_tokens"] == 3 and trees["self"]["lookup_tokens"] == 0
    assert trees["lookup:4"]["lookup_tokens"] == 4 and "--lookup-tokens 3" in rec["command"]
    assert all(rec["lossless"].values()), rec["lossless"]  # greedy: every method equals plain greedy
    res = rec["results"]["prompts"]
    # The record's alpha is the paper's, recomputed here from the per-prompt accepted lengths.
    chain = res["self [chain γ=4]"]
    acc = [a for row in chain["per_prompt"] for a in row["accepted"]]
    assert chain["alpha"] == pytest.approx(sum(acc) / (sum(acc) + sum(a < 4 for a in acc)))
    assert all(d == 4 for row in chain["per_prompt"] for d in row["drafted"])
    # A draft made of the target's first layer agrees with it sometimes: tau above 1.
    assert res["self"]["tau"] > 1.0 and res["self"]["accepted_per_drafted"] > 0
    assert res["plain-hf"]["tau"] == pytest.approx(1.0) and res["plain-engine"]["tau"] == pytest.approx(1.0)
    for name in R.PLOTS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    md = (out / "bench.md").read_text()
    assert "| prompts | 2 | head:h [chain γ=4] |" in md and "| prompts | head:h [chain γ=4] |" in md  # time split
    assert "`+lookup(N)` rows graft up to N tokens" in md and "| prompts | 2 | lookup:4 |" in md
    assert res["self"]["speedup_over_engine"]["median"] > 0 and f"over `{R.ENGINE_PLAIN}`" in md
    routing = rec["machine"]["small_batch_linear"]  # what the engine's linear routing measured in this run
    assert routing["mode"] in ("auto", "on", "off") and "Small-batch linear routing: " in md


def test_routing_line_in_the_machine_line():
    calibrated = [{"linears": 7, "params": 134_479_872, "threads": 2, "routed_rows": []},
                  {"linears": 3, "params": 4_202_496, "threads": 2, "routed_rows": [1, 2, 3, 4]}]
    line = R._routing_line({"small_batch_linear": {"mode": "auto", "calibrated": calibrated}})
    assert line == (" Small-batch linear routing: auto (routed, as measured here: 134.5M-parameter model: none; "
                    "4.2M-parameter model: 1, 2, 3, 4 rows).")
    assert R._routing_line({"small_batch_linear": {"mode": "off", "calibrated": []}}) == \
        " Small-batch linear routing: off."
    assert R._routing_line({"cpu": "x"}) == ""  # records written before it was kept


def test_bench_tunes_the_tree_per_suite(tmp_path, monkeypatch):
    """Each suite runs with the tree tuned on its own first prompt: the tuner (faked here, to give the two suites
    different budgets) is called once per suite, and every step of a suite's runs drafts that suite's budget."""
    from adaspec_eagle.cli import main

    calls = []

    def fake_tune(target, drafter, prompt_ids, tree, **kwargs):
        calls.append(list(prompt_ids))
        n = 1 if len(calls) % 2 else 4  # first suite: 1 token, second: 4
        return {"total_tokens": n, "depth": min(tree.depth, n), "lookup_tokens": 0, "summary": f"fake {n}"}

    monkeypatch.setattr("adaspec_eagle.engine.speculative.tune_tree_budget", fake_tune)
    code = tmp_path / "code.jsonl"
    code.write_text('{"prompt": "def add(a, b):\\n    return a + b\\n"}\n{"prompt": "for i in range(10):"}\n')
    out = tmp_path / "bench"
    rc = main(TINY + ["--drafter", "self=draft-lm:layers=1", "--suite", f"jsonl:{_prompts(tmp_path)}", "--suite",
                      f"jsonl:{code}", "--repeats", "1", "--warmup", "0", "--total-tokens", "auto", "--peers", "none",
                      "--out", str(out)])
    assert rc == 0 and len(calls) == 2 and calls[0] != calls[1]
    rec = json.loads((out / "bench.json").read_text())
    method = next(m for m in rec["methods"] if m["name"] == "self")
    assert {k: v["total_tokens"] for k, v in method["tuned_tree"].items()} == {"prompts": 1, "code": 4}
    assert {k: v["total_tokens"] for k, v in method["trees"].items()} == {"prompts": 1, "code": 4}
    for suite, budget in (("prompts", 1), ("code", 4)):
        drafted = [d for row in rec["results"][suite]["self"]["per_prompt"] for d in row["drafted"]]
        assert drafted and set(drafted) == {budget}, (suite, drafted)
    assert all(rec["lossless"].values())
    assert "(self: prompts 1 token, depth 1 / code 4 tokens, depth 3)" in (out / "bench.md").read_text()


def test_alpha_gamma_only_when_every_suite_drafts_the_same_chain():
    from adaspec_eagle.config import TreeConfig

    def chain(depth, lookup=0):
        return TreeConfig(shape="chain", depth=depth, topk=1, total_tokens=depth, lookup_tokens=lookup)

    def gamma(tree):
        return B.engine_method("m", None, None, None, tree, 8, 0.0, 1.0, eos_ids=[]).gamma

    assert gamma(chain(4)) == 4 and gamma({"a": chain(4), "b": chain(4)}) == 4
    # a chain of depth 4 with a budget of 2 tokens drafts 2 a step (build_tree): its alpha is gamma 2's
    assert gamma(TreeConfig(shape="chain", depth=4, topk=1, total_tokens=2)) == 2
    assert gamma({"a": chain(2), "b": chain(4)}) is None  # tuned per suite to different lengths: no single gamma
    assert gamma({"a": chain(4), "b": chain(4, lookup=2)}) is None  # lookup nodes are not drafted
    assert gamma({"a": chain(4), "b": TreeConfig(depth=4, topk=2, total_tokens=4)}) is None


def test_bench_tunes_the_tree_per_drafter(tmp_path):
    from adaspec_eagle.cli import main
    from adaspec_eagle.engine.speculative import AUTO_BUDGETS

    head, out = _tiny_head(tmp_path / "h"), tmp_path / "bench"
    rc = main(TINY + ["--drafter", "self=draft-lm:layers=1", "--drafter", f"head:{head}", "--suite",
                      f"jsonl:{_prompts(tmp_path)}", "--repeats", "1", "--warmup", "0", "--total-tokens", "auto",
                      "--peers", "none", "--alpha-protocol", "--lookup-tokens", "4", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "bench.json").read_text())
    assert rec["config"]["tree"]["total_tokens"] == "auto" and all(rec["lossless"].values())
    chains = [m for m in rec["methods"] if m.get("protocol") == "paper alpha"]
    assert len(chains) == 2 and all("tuned_tree" not in m and m["tree"]["shape"] == "chain" for m in chains)
    looked = [m for m in rec["methods"] if m["name"].endswith("+lookup(4)")]
    assert len(looked) == 2 and all(m["tree"]["lookup_tokens"] == 4 and m["tuned_tree"] for m in looked)
    for m in rec["methods"][1:]:
        if m in chains:
            continue
        tuned = m["tuned_tree"]["prompts"]  # per suite; one suite here
        assert tuned["total_tokens"] in AUTO_BUDGETS and tuned["depth"] <= tuned["total_tokens"]
        assert m["tree"]["total_tokens"] == tuned["total_tokens"] and m["tree"]["depth"] == tuned["depth"]
        assert m["trees"]["prompts"] == m["tree"]
    assert "tuned per drafter and suite on the suite's first prompt, which is measured too (self: prompts " in (out / "bench.md").read_text()
    assert "--total-tokens auto" in rec["command"]
    with pytest.raises(AdaspecError, match="--total-tokens 'x'"):
        B.BenchConfig(total_tokens="x")


def test_bench_cli_sampling_and_errors(tmp_path, capsys):
    from adaspec_eagle.cli import main

    out = tmp_path / "bench"
    rc = main(TINY + ["--drafter", f"head:{_tiny_head(tmp_path / 'h')}", "--suite", f"jsonl:{_prompts(tmp_path)}",
                      "--temperature", "0.8", "--repeats", "2", "--warmup", "0", "--peers", "none", "--out",
                      str(out)])
    assert rc == 0
    rec = json.loads((out / "bench.json").read_text())
    assert [m["name"] for m in rec["methods"]] == ["plain-hf", "head:h"]
    assert rec["lossless"] == {"plain-hf": None, "head:h": None}  # no token-for-token check when sampling
    assert rec["results"]["prompts"]["head:h"]["tokens_per_s"]["n"] == 2
    assert main(TINY + ["--suite", "jsonl:missing.jsonl", "--out", str(out)]) == 2
    assert main(TINY + ["--suite", f"jsonl:{_prompts(tmp_path)}", "--temperature", "0.5", "--baseline", "engine",
                        "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "greedy only" in err


def test_bench_flags_come_from_the_config_and_the_recorded_command_gives_it_back():
    """Every BenchConfig field is a flag (config.add_flags), and the command bench.json records parses back to the
    same config: one definition per option."""
    import shlex

    from adaspec_eagle.cli import build_parser
    from adaspec_eagle.config import from_flags

    cfg = B.BenchConfig(drafters=["kd=head:heads/kd", "lookup:4"], suites=["sharegpt", "humaneval"],
                        total_tokens="auto", draft_vocab="0", peers=[], baseline=["hf", "engine"],
                        alpha_protocol=True, threads=2, progress=False)
    argv = shlex.split(B.command_line(cfg))[1:]
    again = from_flags(B.BenchConfig, build_parser().parse_args(argv))
    assert again == dataclasses.replace(cfg, progress=True)
    defaults = from_flags(B.BenchConfig, build_parser().parse_args(["bench"]))
    assert defaults == B.BenchConfig()
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions}
    assert {f.name for f in dataclasses.fields(B.BenchConfig)} <= flags
