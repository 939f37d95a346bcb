"""The train-head pipeline under DeepSpeed ZeRO-2 / ZeRO-3 through `accelerate launch` (one CPU process: the
configure/prepare paths, the frozen target inside a ZeRO-3 inference engine, the head loss on partitioned
lm_head weights). Skipped where deepspeed is not installed (`pip install -e .[deepspeed]`)."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _helpers import chat_file

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
ROOT = Path(__file__).resolve().parents[2]


def launch(tmp_path, stage: int, out: Path, *overrides: str):
    cfg = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"zero{stage}.yaml").read_text())
    cfg.update(num_processes=1, use_cpu=True, mixed_precision="no")
    config = tmp_path / f"zero{stage}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    data = chat_file(tmp_path / "chats.jsonl")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "adaspec_eagle",
           "train-head", "--recipe", str(ROOT / "recipes/heads/tiny.yaml"), "--output-dir", str(out), "--quiet",
           f"data.dataset={data}", "data.num_samples=12", "data.holdout=4", "data.max_length=64",
           "train.max_steps=3", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def plain(tmp_path, out: Path, *overrides: str):
    from adaspec_eagle.cli import main
    from test_head import tiny_args

    return main(tiny_args(chat_file(tmp_path / "chats.jsonl"), out, *overrides))


@pytest.mark.slow
def test_zero2_equals_a_plain_run_and_zero3_trains(tmp_path):
    assert plain(tmp_path, tmp_path / "plain", "optim.max_grad_norm=0.5") == 0
    res = launch(tmp_path, 2, tmp_path / "z2", "optim.max_grad_norm=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("reference", "adaspec"):  # fp32, one rank: ZeRO-2 changes where optimizer state lives, not the math
        a, b = (load_file(str(tmp_path / run / stage / "model.safetensors")) for run in ("plain", "z2"))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # ZeRO-3: the tiny target is created under zero.Init (other random weights than the plain run's), so this
    # run is checked for soundness, not equality
    res = launch(tmp_path, 3, tmp_path / "z3", "optim.max_grad_norm=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "z3" / "results.json").read_text())
    losses = results["train"]["reference"]
    assert losses["steps"] == 3 and all(0 <= e["top1"] <= 1 for e in results["eval"].values())
    # what the head records of its target is read through the shards: the vocabulary and the fingerprint of the
    # full embedding (an empty shard once gave vocab_size 0 and the hash of nothing)
    recorded = {run: json.loads((tmp_path / run / "reference" / "config.json").read_text())["adaspec"]["target"]
                for run in ("plain", "z3")}
    assert recorded["z3"]["vocab_size"] == recorded["plain"]["vocab_size"] > 0
    assert recorded["z3"]["fingerprint"] != hashlib.sha256(b"").hexdigest()[:16]
    counts = load_file(str(tmp_path / "z3" / "reference" / "token_counts.safetensors"))
    assert all(t.numel() == recorded["plain"]["vocab_size"] for t in counts.values())


def test_clipping_mismatch_is_refused(tmp_path):
    res = launch(tmp_path, 2, tmp_path / "bad")  # the config clips at 0.5, the recipe at 1.0
    assert res.returncode != 0
    assert "gradient_clipping" in res.stderr and "optim.max_grad_norm" in res.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was written
