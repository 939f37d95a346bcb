"""scripts/gpu_heads.py: the run list's overrides resolved against the recipe."""

from pathlib import Path

from _helpers import load_script

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes/heads/smollm2-135m-gpu.yaml")  # batch 32, k 0.4


def test_kd_control_runs_at_the_adaspec_stages_batch():
    gh = load_script("scripts/gpu_heads.py")
    (extra,) = [r[3] for r in gh.RUNS if r[0] == "s0-kd-adaspec-batch"]
    assert gh.resolve_overrides(RECIPE, [], extra) == ["loss.kind=kd", "train.batch_size=80"]
    # the command line's batch and k carry into it (a rehearsal at batch 8: 8 / 0.4 = 20; k 0.2: 160)
    assert "train.batch_size=20" in gh.resolve_overrides(RECIPE, ["train.batch_size=8"], extra)
    assert "train.batch_size=160" in gh.resolve_overrides(RECIPE, ["loss.k=0.2"], extra)
    # runs without the placeholder are left as they are
    assert gh.resolve_overrides(RECIPE, [], ["loss.k=0.6"]) == ["loss.k=0.6"]


def test_feature_term_at_every_position_runs_at_k_times_the_weight():
    """s0-feature-all-k: the feature term over every position at k x the recipe's weight, about what the default
    term over the kept positions weighs per step, so positions and weight are separated."""
    gh = load_script("scripts/gpu_heads.py")
    (extra,) = [r[3] for r in gh.RUNS if r[0] == "s0-feature-all-k"]
    assert gh.resolve_overrides(RECIPE, [], extra) == ["head.feature_loss_positions=all",
                                                       "head.feature_loss_weight=0.4"]  # 0.4 x 1.0
    # the command line's k and weight carry into it
    assert gh.resolve_overrides(RECIPE, ["loss.k=0.2", "head.feature_loss_weight=0.5"], extra)[1] == \
        "head.feature_loss_weight=0.1"


def test_every_planned_run_is_a_valid_recipe():
    """A typo in a run's overrides would surface only on the lent GPU, minutes into its budget."""
    from adaspec_eagle.config import HeadRecipe, load_recipe

    gh = load_script("scripts/gpu_heads.py")
    for name, stage, _, extra in gh.RUNS:
        cfg = load_recipe(HeadRecipe, RECIPE, [*gh.resolve_overrides(RECIPE, [], extra), f"stage={stage}"])
        assert cfg.stage == stage, name
    (extra,) = [r[3] for r in gh.RUNS if r[0] == "s0-feature-all"]
    assert load_recipe(HeadRecipe, RECIPE, extra).head.feature_loss_positions == "all"
