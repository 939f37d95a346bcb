import pytest
import yaml

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import (HeadRecipe, DraftLMRecipe, LossConfig, load_recipe, parse_overrides,
                                  save_resolved)


def test_defaults_and_overrides():
    cfg = load_recipe(HeadRecipe, None, ["loss.k=0.25", "optim.lr=1e-4", "train.max_steps=5", "data.path=null"])
    assert cfg.loss.k == 0.25 and cfg.optim.lr == 1e-4 and cfg.train.max_steps == 5 and cfg.data.path is None
    assert LossConfig().k == 0.4 and LossConfig().divergence == "forward_kl"


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("target: tiny-llama\nloss:\n  k: 0.3\noptim:\n  lr: 3e-4\n")  # YAML reads 3e-4 as a string
    cfg = load_recipe(HeadRecipe, p, ["loss.k=0.5"])
    assert cfg.target == "tiny-llama" and cfg.loss.k == 0.5 and cfg.optim.lr == 3e-4


@pytest.mark.parametrize("override,message", [
    ("loss.kk=1", "unknown config key 'loss.kk'. Did you mean 'loss.k'?"),
    ("trian.epochs=1", "unknown config key 'trian'. Did you mean 'train'?"),
    ("loss.k=0", r"loss.k=0.0 is out of range: expected 0 < k <= 1"),
    ("loss.k=1.5", r"loss.k=1.5 is out of range"),
    ("optim.lr=-1", r"optim.lr=-1.0 is out of range"),
    ("train.batch_size=two", "config key 'train.batch_size' has value 'two' of the wrong type; expected int"),
    ("loss.divergence=kl", "expected one of \\['forward_kl', 'reverse_kl', 'tvd', 'jsd'\\]"),
    ("tree.total_tokens=5", "unknown config key 'tree'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(AdaspecError, match=message):
        load_recipe(HeadRecipe, None, [override])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(AdaspecError, match="does not exist"):
        load_recipe(HeadRecipe, tmp_path / "none.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("loss:\n  k: 0.4\n  bogus: 1\n")
    with pytest.raises(AdaspecError, match="unknown config key 'loss.bogus'"):
        load_recipe(HeadRecipe, p)
    p.write_text("- a list\n")
    with pytest.raises(AdaspecError, match="must be a mapping"):
        load_recipe(HeadRecipe, p)
    with pytest.raises(AdaspecError, match="not of the form key=value"):
        parse_overrides(["loss.k"])
    with pytest.raises(AdaspecError, match="stages"):
        load_recipe(DraftLMRecipe, None, {"stages": ["draft", "finetune"]})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_recipe(HeadRecipe, None, ["loss.k=0.3"])
    path = save_resolved(cfg, tmp_path / "out")
    again = load_recipe(HeadRecipe, path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["loss"]["k"] == 0.3


def test_shortcut_flags_are_defined_by_their_recipe_keys():
    """train-head's and train-draft-lm's flags take help and choices from the recipe fields they set, and give
    back exactly the overrides the recipe keys would."""
    import argparse

    from adaspec_eagle.config import DraftLMRecipe, HeadRecipe, add_key_flags, field_docs, key_overrides, LossConfig
    from adaspec_eagle.training import draft_lm, head

    p = argparse.ArgumentParser()
    add_key_flags(p, HeadRecipe, head.RECIPE_FLAGS)
    loss = next(a for a in p._actions if a.dest == "loss")
    assert loss.choices == ["adaspec", "kd"] and field_docs(LossConfig)["kind"] in loss.help
    assert next(a for a in p._actions if a.dest == "stage").choices == ["both", "reference", "draft"]
    args = p.parse_args(["--loss", "kd", "--init-head", "h", "--output-dir", "o"])
    assert key_overrides(args, HeadRecipe, head.RECIPE_FLAGS) == ["init_head=h", "loss.kind=kd", "output_dir=o"]
    assert key_overrides(p.parse_args([]), HeadRecipe, head.RECIPE_FLAGS) == []  # the recipe's values stand

    p = argparse.ArgumentParser()
    add_key_flags(p, DraftLMRecipe, draft_lm.RECIPE_FLAGS)
    args = p.parse_args(["--stages", "reference,draft", "--draft", "layers=2"])
    over = key_overrides(args, DraftLMRecipe, draft_lm.RECIPE_FLAGS)
    assert over == ["draft=layers=2", "stages=[reference,draft]"]
    cfg = load_recipe(DraftLMRecipe, None, over)
    assert cfg.stages == ["reference", "draft"] and cfg.draft == "layers=2"
    assert field_docs(DraftLMRecipe)["draft"] in next(a for a in p._actions if a.dest == "draft").help
