"""Our exported heads in the real engines (opt-in: `pytest -m engines`, or `bash scripts/engines.sh ENGINE`).

Each engine is installed from PyPI into its own venv under .engines/ (EAGLE's code from its repository) and runs
the shipped KD head, the same head with a non-zero fc bias, and an EAGLE-3 head (draft vocabulary of 8,192 ids,
and the whole vocabulary). The scripts under scripts/engines/ say what each check compares."""

import json
import subprocess
from pathlib import Path

import pytest

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
