"""Our exported heads in the real engines (opt-in: `pytest -m engines`, or `bash scripts/engines.sh ENGINE`).

Each engine is installed from PyPI into its own venv under .engines/ (EAGLE's code from its repository) and runs
the shipped KD head, the same head with a non-zero fc bias, and an EAGLE-3 head (draft vocabulary of 8,192 ids,
and the whole vocabulary). The scripts under scripts/engines/ say what each check compares."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from _helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["vllm", "sglang", "eagle"])
def test_exports_run_in_the_engine(engine):
    proc = subprocess.run(["bash", "scripts/engines.sh", engine], cwd=ROOT)
    assert proc.returncode == 0
    report = json.loads((ROOT / ".engines" / "work" / f"{engine}.json").read_text())
    assert set(report["heads"]) == {"kd", "kd-bias", "e3", "e3-full"}
    assert all(row["ok"] for row in report["heads"].values())
    assert report.get("negative_control", {"caught": True})["caught"]


def _table_module():
    return load_script("scripts/engines/table.py")


def _table_with_shipped(tmp_path, monkeypatch):
    """table.py with heads/' KD weights replaced by a file of ours; the sha256 of those and of other weights."""
    table = _table_module()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights shipped now")
    monkeypatch.setattr(table, "SHIPPED_KD", weights)
    now, before = (hashlib.sha256(b).hexdigest() for b in (b"weights shipped now", b"weights shipped before"))
    return table, now, before


def test_table_names_the_kd_head_that_ran(tmp_path, monkeypatch):
    """The README calls a record's KD head "shipped" only while heads/ still holds those weights."""
    table, now, before = _table_with_shipped(tmp_path, monkeypatch)
    assert table.head_label({"kd_head_sha256": now}, "kd") == "EAGLE-1: shipped KD head"
    old = table.head_label({"kd_head_sha256": before, "kd_head": "the GPU head"}, "kd")
    assert old.startswith("EAGLE-1: the GPU head, not the one shipped now") and before[:12] in old
    assert "not recorded" in table.head_label({}, "kd")
    assert "not the one shipped now" in table.kd_head({"kd_head_sha256": before}, short=True)


def test_prepare_remakes_the_kd_head_when_heads_changed(tmp_path):
    """The work folder caches the KD head and what is made from it; a new shipped head must not be checked as
    the old one (the cache had kept the GPU head after heads/ changed)."""
    prepare = load_script("scripts/engines/prepare.py")
    work, kd = tmp_path / "work", tmp_path / "kd"
    kd.mkdir()
    (kd / "model.safetensors").write_bytes(b"new weights")
    made = [work / "heads" / "kd", work / "heads" / "kd-bias", work / "export" / "vllm-kd",
            work / "export" / "eagle-kd-bias"]
    kept = [work / "heads" / "e3", work / "export" / "vllm-e3"]
    for folder in made + kept:
        folder.mkdir(parents=True)
    (work / "heads" / "kd" / "model.safetensors").write_bytes(b"new weights")
    (work / "reference.json").write_text("{}")
    assert not prepare.drop_stale_kd(work, kd)
    assert all(folder.exists() for folder in made + kept) and (work / "reference.json").exists()
    (kd / "model.safetensors").write_bytes(b"newer weights")
    assert prepare.drop_stale_kd(work, kd)
    assert not any(folder.exists() for folder in made) and not (work / "reference.json").exists()
    assert all(folder.exists() for folder in kept)


def test_summary_header_names_the_kd_head_only_when_every_engine_ran_it(tmp_path, monkeypatch):
    table, now, before = _table_with_shipped(tmp_path, monkeypatch)
    folder = ROOT / "docs" / "records" / "engines"
    for engine, sha in (("vllm", now), ("sglang", now), ("eagle", before)):
        record = json.loads((folder / f"{engine}.json").read_text())
        record["kd_head_sha256"] = sha
        (tmp_path / f"{engine}.json").write_text(json.dumps(record))
    assert "not the same KD head in every engine" in table.summary(tmp_path).splitlines()[0]
    record = json.loads((tmp_path / "eagle.json").read_text())
    record["kd_head_sha256"] = now
    (tmp_path / "eagle.json").write_text(json.dumps(record))
    assert "(shipped KD head;" in table.summary(tmp_path).splitlines()[0]
