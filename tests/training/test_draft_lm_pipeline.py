import json

import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.cli import main
from adaspec_eagle.config import DraftLMRecipe, load_recipe
from adaspec_eagle.training.draft_lm import run


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"prompt": f"Q{i}: add {i} and {i + 1}.\n", "completion": f"A: {2 * i + 1} done."} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(tmp_path, task_file, **extra):
    overrides = {"target": "tiny-llama-l3", "draft": "layers=1", "output_dir": str(tmp_path / "out"),
                 "data": {"dataset": str(task_file), "holdout": 8, "max_length": 64},
                 "train": {"batch_size": 4, "epochs": 1, "save_every": 3}, "optim": {"lr": 3e-3},
                 "stages": ["target", "reference", "draft"], "target_epochs": 1, "reference_epochs": 4,
                 "draft_epochs": 2}
    overrides.update(extra)
    return load_recipe(DraftLMRecipe, None, overrides)


def test_three_stages_chain_and_lower_the_loss(tmp_path, task_file):
    cfg = _cfg(tmp_path, task_file)
    summary = run(cfg, progress=False)
    out = tmp_path / "out"
    for stage in ("target", "reference", "adaspec"):
        assert (out / stage / "model.safetensors").is_file() and (out / stage / "adaspec.json").is_file()
    assert set(summary) == {"reference", "adaspec"}
    assert 0.0 <= summary["adaspec"]["agreement"] <= 1.0
    meta = json.loads((out / "adaspec" / "adaspec.json").read_text())
    assert meta["loss"] == "adaspec" and meta["k"] == 0.4 and meta["target"]["num_hidden_layers"] == 3
    # Distillation made the 1-layer draft agree with the fine-tuned target more than its initialisation did.
    from adaspec_eagle.data import build_dataset
    from adaspec_eagle.models.draft_lm import init_draft
    from adaspec_eagle.models import load_model
    from adaspec_eagle.training.draft_lm import top1_agreement
    target, tok = load_model(str(out / "target"))
    heldout = build_dataset(cfg.data, tok, "heldout")
    before = top1_agreement(init_draft("layers=1", target, tok), target, heldout, 102)
    assert summary["reference"]["agreement"] > before
    # A second run with the same config finds every stage complete and changes nothing.
    stamp = (out / "adaspec" / "model.safetensors").stat().st_mtime_ns
    run(cfg, progress=False)
    assert (out / "adaspec" / "model.safetensors").stat().st_mtime_ns == stamp


def test_kd_baseline_and_cli(tmp_path, task_file, capsys):
    code = main(["train-draft-lm", "--target", "tiny-qwen2-l2", "--draft", "layers=1", "--stages", "reference,draft",
                 "--loss", "kd", "--output-dir", str(tmp_path / "kd"), f"data.dataset={task_file}", "data.holdout=4",
                 "data.max_length=64", "train.batch_size=4", "train.max_steps=2"])
    assert code == 0
    assert (tmp_path / "kd" / "kd" / "model.safetensors").is_file()
    assert not (tmp_path / "kd" / "adaspec").exists()
    assert "held-out top-1 agreement" in capsys.readouterr().out


def test_refusals_before_anything_is_written(tmp_path, task_file, monkeypatch):
    out = tmp_path / "out"
    # Draft stage alone needs a reference.
    cfg = _cfg(tmp_path, task_file, stages=["draft"])
    with pytest.raises(AdaspecError, match="needs a reference LM"):
        run(cfg, progress=False)
    assert not out.exists()
    run(_cfg(tmp_path, task_file, stages=["target"]), progress=False)
    # An output folder holding a different run is refused, naming the key that differs.
    other = _cfg(tmp_path, task_file, stages=["target"], loss={"k": 0.2})
    with pytest.raises(AdaspecError, match="holds a different run .*loss.k"):
        run(other, progress=False)
    # A draft with another tokenizer is refused before the output folder exists.
    import adaspec_eagle.models.draft_lm as dl
    from adaspec_eagle.models import load_model, tiny_tokenizer
    bad_tok = tiny_tokenizer()
    bad_tok.add_tokens(["<x>"])
    monkeypatch.setattr(dl, "load_model", lambda *a, **k: (load_model("tiny-llama-s1", with_tokenizer=False), bad_tok))
    cfg = _cfg(tmp_path, task_file, draft="some-draft", output_dir=str(tmp_path / "fresh"))
    with pytest.raises(AdaspecError, match="tokenizers differ"):
        run(cfg, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_disk_full_while_saving_a_stage_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from adaspec_eagle.models import load_model
    from adaspec_eagle.training.draft_lm import save_model_atomic

    model, tok = load_model("tiny-llama-l1")
    folder = tmp_path / "reference"
    save_model_atomic(model, tok, folder, {"stage": "reference"})
    before = (folder / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", full)
    with pytest.raises(AdaspecError, match="could not write the reference model .*No space left"):
        save_model_atomic(model, tok, folder, {"stage": "reference"})
    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["reference"]


def test_samples_longer_than_the_context_are_refused_before_writing(tmp_path):
    long_task = tmp_path / "long.jsonl"
    long_task.write_text("\n".join(json.dumps({"prompt": "Q: say ab.\n", "completion": "ab " * 400})
                                   for _ in range(12)) + "\n")
    cfg = _cfg(tmp_path, long_task, data={"dataset": str(long_task), "holdout": 2, "max_length": 2048})
    with pytest.raises(AdaspecError, match="has a context of 1024 positions; set data.max_length=1024"):
        run(cfg, progress=False)  # the tiny targets have 1024 positions
    assert not (tmp_path / "out").exists()
