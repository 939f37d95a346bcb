"""scripts/heads_table.py, which generates the README's head-experiment tables from the runs' records."""

import json

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


def test_two_curves_print_one_difference_and_no_mean(tmp_path, capsys):
    specs = [f"KD={_record(tmp_path, 'kd', 'reference', [(10, 0.50, 2.0)])}",
             f"AdaSPEC={_record(tmp_path, 'ada', 'adaspec', [(10, 0.45, 1.9)])}"]
    _heads_table().curves_table(specs)
    out = capsys.readouterr().out
    assert "| AdaSPEC − KD | -5.0 / -0.100 |" in out and "mean" not in out
    _heads_table().curves_table(specs[:1] * 3)  # an odd number of curves: no differences at all
    assert "−" not in capsys.readouterr().out.split("\n", 2)[2]
