import json
from pathlib import Path

from adaspec_eagle.cli import main
from adaspec_eagle.cli.demo import DEFAULT_RECIPE


def test_demo_default_recipe_is_the_bundled_smollm2_on_sharegpt():
    from adaspec_eagle.config import HeadRecipe, load_recipe

    cfg = load_recipe(HeadRecipe, DEFAULT_RECIPE)
    assert cfg.target == "smollm2-135m" and cfg.data.dataset == "sharegpt" and cfg.stage == "both"


def test_demo_end_to_end_on_a_tiny_target(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--recipe", "recipes/heads/tiny.yaml", "--output-dir", str(out), "--prompts", "1",
                 "--max-new-tokens", "8", "train.max_steps=2", "data.num_samples=8", "data.holdout=4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out agreement with the target" in text
    record = json.loads((out / "bench" / "bench.json").read_text())
    assert all(record["lossless"][m] for m in record["lossless"])
    assert "adaspec+lookup(8)" in record["lossless"] and "reference+lookup(8)" in record["lossless"]
    assert "plain-engine" in record["lossless"]  # speculation's own gain, beside the small-batch products
    assert (Path(out) / "reference" / "model.safetensors").is_file()


def test_demo_refuses_another_run_in_its_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    base = ["demo", "--recipe", "recipes/heads/tiny.yaml", "--output-dir", str(out), "--no-bench",
            "train.max_steps=2", "data.num_samples=8", "data.holdout=4"]
    assert main(base) == 0
    assert main(base + ["optim.lr=1e-4"]) == 2  # e.g. a folder left by an older recipe
    assert "holds a different reference run" in capsys.readouterr().err
    assert main(base[:1] + ["--overwrite"] + base[1:] + ["optim.lr=1e-4"]) == 0
