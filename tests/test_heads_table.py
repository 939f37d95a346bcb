"""scripts/heads_table.py, which generates the README's head-experiment tables from the runs' records."""

import json
from pathlib import Path

import pytest
from _helpers import load_script


def _heads_table():
    return load_script("scripts/heads_table.py")


def _record(tmp_path, name, stage, points):
    """A train-head results.json whose STAGE evaluated (step, top-1, tau) at each of `points`."""
    evals = [{"step": s, "top1": t, "tau": u} for s, t, u in points]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"eval": {}, "train": {stage: {"evals": evals}}}))
    return f"{path}:{stage}"


def test_curves_are_paired_and_the_differences_summarised(tmp_path, capsys):
    specs = [f"KD a={_record(tmp_path, 'kd-a', 'reference', [(10, 0.50, 2.0), (20, 0.60, 2.2)])}",
             f"Ada a={_record(tmp_path, 'ada-a', 'adaspec', [(10, 0.53, 2.1), (20, 0.61, 2.25)])}",
             f"KD b={_record(tmp_path, 'kd-b', 'reference', [(10, 0.52, 2.0), (20, 0.62, 2.3)])}",
             f"Ada b={_record(tmp_path, 'ada-b', 'adaspec', [(10, 0.53, 2.2)])}"]
    _heads_table().curves_table(specs)
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["Ada a − KD a"].endswith("| +3.0 / +0.100 | +1.0 / +0.050 |")
    assert rows["Ada b − KD b"].endswith("| +1.0 / +0.200 | — |")  # b's AdaSPEC curve has no step 20
    # the mean over pairs only where every pair has the step; ± half the range of the pair differences
    assert rows["mean of the 2 differences ± half their range"].endswith("| +2.0 ± 1.0 / +0.150 ± 0.050 | — |")
    _heads_table().curves_table(specs, mean=False)  # pairs that are different comparisons: no mean row
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["Ada b − KD b"].endswith("| +1.0 / +0.200 | — |") and not any("mean" in r for r in rows)


def test_two_curves_print_one_difference_and_no_mean(tmp_path, capsys):
    specs = [f"KD={_record(tmp_path, 'kd', 'reference', [(10, 0.50, 2.0)])}",
             f"AdaSPEC={_record(tmp_path, 'ada', 'adaspec', [(10, 0.45, 1.9)])}"]
    _heads_table().curves_table(specs)
    out = capsys.readouterr().out
    assert "| AdaSPEC − KD | -5.0 / -0.100 |" in out and "mean" not in out
    _heads_table().curves_table(specs[:1] * 3)  # an odd number of curves: no differences at all
    out = capsys.readouterr().out
    assert "−" not in out.split("\n", 2)[2]
    assert out.count("| KD |") == 1  # a curve given several times gets one row


def test_a_curve_in_two_pairs_gets_one_row_and_both_differences(tmp_path, capsys):
    kd, ada, alt = (f"{n}={_record(tmp_path, n, 'reference', [(10, t, u)])}"
                    for n, t, u in (("KD", 0.50, 2.0), ("Ada", 0.52, 2.1), ("Alt", 0.49, 2.05)))
    _heads_table().curves_table([kd, ada, alt, ada], mean=False)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == ["KD", "Ada", "Alt", "Ada − KD", "Ada − Alt"]
    assert lines[-1] == "| Ada − Alt | +3.0 / +0.050 |"


def _bench(path, taus):
    """A bench record folder whose drafters {name: (source, sharegpt tau, humaneval tau)} ran."""
    path.mkdir()
    rec = {"methods": [{"name": n, "source": src} for n, (src, _, _) in taus.items()],
           "results": {suite: {n: {"tau": t[i + 1]} for n, t in taus.items()} for i, suite in
                       enumerate(("sharegpt", "humaneval"))}}
    (path / "bench.json").write_text(json.dumps(rec))
    return str(path)


def test_pairs_table_joins_eval_lines_and_bench_records(tmp_path, capsys):
    lines = [{"head": "h/kd1-evaluated", "top1": 0.60, "kl": 1.0, "chain_tau": 2.0},
             {"head": "h/ada1", "top1": 0.62, "kl": 0.9, "chain_tau": 2.1},
             {"head": "h/kd2", "top1": 0.58, "kl": 1.1, "chain_tau": 1.9},
             {"head": "h/ada2", "top1": 0.59, "kl": 1.0, "chain_tau": 2.0}]
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(x) for x in lines))
    srcs = {"kd1": "h/kd1-copy", "ada1": "h/ada1", "kd2": "h/kd2", "ada2": "h/ada2"}
    tuned = _bench(tmp_path / "tuned", {n: (srcs[n], *t) for n, t in
                                        {"kd1": (1.5, 1.4), "ada1": (1.6, 1.4), "kd2": (1.5, 1.5), "ada2": (1.5, 1.3)}.items()})
    b32 = _bench(tmp_path / "b32", {n: (srcs[n], *t) for n, t in
                                     {"kd1": (2.5, 2.0), "ada1": (2.7, 2.1), "kd2": (2.6, 2.2), "ada2": (2.6, 2.3)}.items()})
    table = _heads_table()
    table.pairs_table(["kd1,ada1", "kd2,ada2"], str(ev), tuned, b32, {"h/kd1-copy": "h/kd1-evaluated"})
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["kd1"] == "| kd1 | `h/kd1-copy` | 60.00% | 1.000 | 2.000 | 1.50 | 1.40 | 2.50 | 2.00 |"
    assert rows["ada1 − kd1"] == "| ada1 − kd1 | | +2.00 | -0.100 | +0.100 | +0.10 | +0.00 | +0.20 | +0.10 |"
    assert rows["ada2 − kd2"] == "| ada2 − kd2 | | +1.00 | -0.100 | +0.100 | +0.00 | -0.20 | +0.00 | +0.10 |"
    assert rows["mean of the 2 differences ± half their range"].endswith(
        "| +1.50 ± 0.50 | -0.100 ± 0.000 | +0.100 ± 0.000 | +0.05 ± 0.05 | -0.10 ± 0.10 | +0.10 ± 0.10 | +0.10 ± 0.00 |")
    # a head with no eval line (the copy not mapped) is named, with the fix
    with pytest.raises(SystemExit, match="no --eval line for 'h/kd1-copy'.*eval_heads.py"):
        table.pairs_table(["kd1,ada1"], str(ev), tuned, b32)
    with pytest.raises(SystemExit, match="drafter 'kd9' is not in"):
        table.pairs_table(["kd9,ada1"], str(ev), tuned, b32)


def test_readme_pairs_table_is_the_generated_one(capsys):
    """The README's KD/AdaSPEC pairs table is what the script prints from the committed records, line for line."""
    root = Path(__file__).resolve().parents[1]
    rec = root / "docs/records/heads"
    _heads_table().pairs_table(["kd-p1,adaspec-p1", "kd-p2,adaspec-p2"], str(rec / "eval-heads.jsonl"),
                               str(rec / "bench-pairs-wide-auto"), str(rec / "bench-pairs-wide-32"),
                               {"runs/kd-8ep": "runs/head-smollm2-135m-cpu/reference"})
    lines = capsys.readouterr().out.splitlines()
    readme = (root / "README.md").read_text()
    assert len(lines) == 9 and all(line in readme for line in lines)


def test_results_data_control_curves_are_the_generated_ones(capsys):
    """docs/RESULTS.md's curves of KD at batch 32, KD at AdaSPEC's batch 80 and AdaSPEC are what the script prints
    from the committed records (the batch-80 run's loop state included), line for line."""
    root = Path(__file__).resolve().parents[1]
    rec = root / "docs/records/heads"
    kd80 = f"KD, batch 80={rec / 'cpu-kd-batch80-state.json'}"
    _heads_table().curves_table([f"KD, batch 32={rec / 'cpu-continue-results.json'}", kd80, kd80,
                                 f"AdaSPEC, batch 80={rec / 'cpu-adaspec-results.json'}:adaspec"], mean=False)
    lines = capsys.readouterr().out.splitlines()
    results = (root / "docs/RESULTS.md").read_text()
    assert len(lines) == 7 and all(line in results for line in lines)


def test_results_feature_positions_curves_are_the_generated_ones(capsys):
    """docs/RESULTS.md's curves of AdaSPEC with its feature term at every position (at weight 1.0 and 0.4), against
    KD at batch 80 and AdaSPEC with the term at its kept positions, are what the script prints from the committed
    records, line for line."""
    root = Path(__file__).resolve().parents[1]
    rec = root / "docs/records/heads"
    kd = f"KD, batch 80={rec / 'cpu-kd-batch80-state.json'}"
    every = f"AdaSPEC, features at all positions={rec / 'cpu-ada-featall-state.json'}"
    light = f"AdaSPEC, features at all positions, weight 0.4={rec / 'cpu-ada-featall-w04-state.json'}"
    kept = f"AdaSPEC, features at kept positions={rec / 'cpu-adaspec-results.json'}:adaspec"
    _heads_table().curves_table([kd, every, kd, light, kept, light, light, every], mean=False)
    lines = capsys.readouterr().out.splitlines()
    results = (root / "docs/RESULTS.md").read_text()
    assert len(lines) == 10 and all(line in results for line in lines)
