"""train.py (the loop), features.py (the cache) and train_head.py (the `train-head` pipeline) on tiny targets."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.cli import main
from adaspec_eagle.config import HeadConfig, HeadRecipe, LossConfig, OptimConfig, TrainConfig, load_recipe
from adaspec_eagle.training.features import build_cache, data_fingerprint, open_cache, pad_batch
from adaspec_eagle.models.heads import build_head, save_head
from adaspec_eagle.models import TINY_FAMILIES, load_model, target_forward_features, tiny_model
from _helpers import chat_file, samples
from adaspec_eagle.training.loop import lr_multiplier, micro_batch_indices, train
from adaspec_eagle.training import head as H
from adaspec_eagle.training.head import evaluate_head, head_loss, head_valid_mask

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "heads" / "tiny.yaml")



def head_setup(family="llama", loss=None, fl=0.1):
    target = tiny_model(family).requires_grad_(False)
    torch.manual_seed(0)
    head = build_head(target, HeadConfig())
    loss = loss or LossConfig(kind="kd")

    def loss_fn(model, batch, num_items):
        return head_loss(model, batch, target=target, loss_cfg=loss, feature_loss_weight=fl, num_items=num_items)

    return target, head, loss_fn


def count_items(batch):
    return int(head_valid_mask(batch["loss_mask"], batch["attention_mask"]).sum())


def run_train(head, data, loss_fn, tmp, **kw):
    stop_at = kw.pop("stop_at", None)
    tcfg = TrainConfig(**{"batch_size": 4, "max_steps": 6, "save_every": 3, "log_every": 1, **kw})
    return train(head, data, loss_fn, collate=lambda s: pad_batch(s, 0), count_items=count_items, train_cfg=tcfg,
                 optim_cfg=OptimConfig(lr=3e-3, warmup_steps=1), out_dir=tmp, stop_at=stop_at, progress=False)


def test_valid_mask_alignment():
    # head position t predicts x_{t+2}: it counts iff loss_mask[t+2] (and x_{t+2} is not padding)
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert head_valid_mask(loss_mask).tolist() == [[1, 1, 0, 1, 0]]
    assert head_valid_mask(loss_mask, attn).tolist() == [[1, 1, 0, 0, 0]]


def test_schedule_and_data_order():
    cfg = OptimConfig(warmup_steps=2, schedule="cosine")
    assert [round(lr_multiplier(s, 10, cfg), 3) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    assert lr_multiplier(6, 10, OptimConfig(warmup_steps=2, schedule="linear")) == pytest.approx(0.5)
    # two ranks with batch 2 see exactly the samples one rank with batch 4 sees, epoch by epoch
    one = [sorted(micro_batch_indices(m, 10, 4, seed=3)) for m in range(6)]
    two = [sorted(micro_batch_indices(m, 10, 2, 3, 0, 2) + micro_batch_indices(m, 10, 2, 3, 1, 2)) for m in range(6)]
    assert one == two
    epoch = [i for m in range(3) for i in micro_batch_indices(m, 10, 4, 3)]  # 10 samples, 2 wrapped around
    assert len(epoch) == 12 and set(epoch) == set(range(10))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_few_steps_lower_loss(family, tmp_path):
    target, head, loss_fn = head_setup(family)
    data = samples(4)
    # the teacher lm_head(features) is exactly the target's logits (features are post-final-norm) in every family
    ids = torch.stack([s["input_ids"][:22] for s in data])
    out = target_forward_features(target, ids)
    assert "logits" not in out  # the lm_head runs on the last position only
    torch.testing.assert_close(target.get_output_embeddings()(out["features"]), target(ids).logits, atol=1e-4,
                               rtol=1e-4)
    run = run_train(head, data, loss_fn, tmp_path, max_steps=8)
    assert run["steps"] == 8 and len(run["losses"]) == 8
    assert run["losses"][-1] < 0.8 * run["losses"][0], run["losses"]
    assert (tmp_path / "checkpoints").is_dir() and glob.glob(str(tmp_path / "tb" / "events.*"))


def test_cached_features_equal_online(tmp_path):
    target, head, _ = head_setup()
    data = samples(6)
    cache = build_cache(target, data, tmp_path / "c32", dtype="fp32", batch_size=4, progress=False)
    cache16 = build_cache(target, data, tmp_path / "c16", dtype="bf16", batch_size=4, progress=False)
    assert len(cache) == 6 and cache.manifest["data"] == data_fingerprint(data)
    cfg = LossConfig(kind="adaspec", k=0.5)
    torch.manual_seed(1)
    reference = build_head(target, HeadConfig())
    results = []
    for items in ([data[i] for i in range(6)], [cache[i] for i in range(6)], [cache16[i] for i in range(6)]):
        batch = pad_batch(items, 0)
        assert ("features" in batch) == (items is not None and "features" in items[0])
        loss, stats = head_loss(head, batch, target=target, loss_cfg=cfg, reference=reference,
                                feature_loss_weight=0.1, num_items=50.0)
        results.append(loss.item())
    assert results[0] == pytest.approx(results[1], abs=1e-5)
    assert results[0] == pytest.approx(results[2], rel=2e-2)  # bf16 storage: close, not equal
    assert stats["kept"] < stats["valid"]
    # a stale cache is refused: another target (same shapes, other weights) or other data
    with pytest.raises(AdaspecError, match="stale.*fingerprint"):
        open_cache(tmp_path / "c32", tiny_model("llama", seed=1), data)
    with pytest.raises(AdaspecError, match="stale.*other data"):
        open_cache(tmp_path / "c32", target, samples(6, seed=5))
    with pytest.raises(AdaspecError, match="no complete feature cache"):
        open_cache(tmp_path / "missing", target)
    # a cache an earlier build wrote (it recorded the fp32-row fingerprint) still opens for the same target
    manifest = tmp_path / "c32" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["target"]["fingerprint"] = m["target"].pop("legacy_fingerprint")
    manifest.write_text(json.dumps(m))
    assert len(open_cache(tmp_path / "c32", target, data)) == 6


def test_resume_continues_with_identical_losses(tmp_path):
    data = samples(10)
    kw = dict(max_steps=7, save_every=3, grad_accum=2, batch_size=2)
    full = run_train(head_setup()[1], data, head_setup()[2], tmp_path / "full", **kw)
    # "killed" after step 5: steps 4-5 are lost, the newest checkpoint is step 3
    target, head, loss_fn = head_setup()
    part = run_train(head, data, loss_fn, tmp_path / "cut", stop_at=5, **kw)
    assert part["steps"] == 5
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-0000003"]
    target, head, loss_fn = head_setup()
    resumed = run_train(head, data, loss_fn, tmp_path / "cut", **kw)
    assert resumed["steps"] == 7
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)
    torch.testing.assert_close(resumed["model"].state_dict(), full["model"].state_dict())


def test_time_budget_never_exceeds_max_steps(tmp_path):
    # the probe fires on the last planned step: the cut may not add a step past max_steps
    run = run_train(head_setup()[1], samples(8), head_setup()[2], tmp_path, max_steps=20, max_minutes=60.0)
    assert run["steps"] == 20 and run["budget_steps"] == 20


def test_time_budget_cuts_steps_and_resume_keeps_the_cut(tmp_path):
    data = samples(8)
    kw = dict(max_steps=40, save_every=5, max_minutes=1e-6)  # a budget spent before the rate is even measured
    target, head, loss_fn = head_setup()
    part = run_train(head, data, loss_fn, tmp_path, stop_at=21, **kw)
    assert part["budget_steps"] == 21 and part["total_steps"] == 21  # cut to one step past the 20-step probe
    assert part["planned_steps"] == 40  # the schedule before the cut, so a record can say the cap bound
    target, head, loss_fn = head_setup()
    resumed = run_train(head, data, loss_fn, tmp_path, max_steps=40, save_every=5)  # the cut survives a resume
    assert resumed["steps"] == 21 and resumed["total_steps"] == 21 and resumed["planned_steps"] == 40
    free = run_train(head_setup()[1], data, head_setup()[2], tmp_path / "free", max_steps=25, max_minutes=60.0)
    assert free["steps"] == 25 and free["budget_steps"] == 25  # a budget that fits leaves the steps alone
    assert free["planned_steps"] == 25


def test_grad_accumulation_matches_full_batch(tmp_path):
    # sum over every valid token / the step's valid count, whatever the micro-batch split
    data = samples(8)
    a = run_train(head_setup()[1], data, head_setup()[2], tmp_path / "a", batch_size=8, grad_accum=1, max_steps=2)
    b = run_train(head_setup()[1], data, head_setup()[2], tmp_path / "b", batch_size=2, grad_accum=4, max_steps=2)
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    torch.testing.assert_close(a["model"].state_dict(), b["model"].state_dict(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The CLI pipeline


def tiny_args(data, out, *extra):
    """The tiny recipe shrunk further; `extra` flags go before the key=value overrides (argparse)."""
    flags = [e for i, e in enumerate(extra) if e.startswith("--") or (i and extra[i - 1] in ("--stage", "--reference",
                                                                                              "--loss", "--target"))]
    overrides = [e for e in extra if e not in flags]
    return ["train-head", "--recipe", TINY, "--output-dir", str(out), "--quiet", *flags, f"data.dataset={data}",
            "data.num_samples=12", "data.holdout=4", "data.max_length=64", "train.max_steps=3", "train.save_every=2",
            *overrides]


@pytest.mark.parametrize("features", ["online", "cached"])
def test_bf16_target_trains_and_evaluates(tmp_path, capsys, features):
    """The GPU recipe's precision: a bf16 target feeding an fp32 head under autocast, through evaluation."""
    from accelerate.state import AcceleratorState

    data = chat_file(tmp_path / "chats.jsonl")
    AcceleratorState._reset_state()  # accelerate keeps one mixed-precision setting per process: the other tests' fp32
    try:
        assert main(tiny_args(data, tmp_path / "out", "train.precision=bf16", f"features={features}")) == 0
    finally:
        AcceleratorState._reset_state()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["eval"]) == {"reference", "adaspec"}
    assert all(0.0 <= e["top1"] <= 1.0 and e["positions"] > 0 for e in results["eval"].values())


def test_cli_both_stages_chain(tmp_path, capsys):
    data = chat_file(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    assert main(tiny_args(data, out)) == 0
    printed = capsys.readouterr().out
    assert "reference  top-1" in printed and "adaspec    top-1" in printed
    for stage in ("reference", "adaspec"):
        cfg = json.loads((out / stage / "config.json").read_text())
        assert cfg["adaspec"]["meta"]["stage"] == stage and cfg["adaspec"]["meta"]["steps"] == 3
        assert (out / "runs" / stage / "result.json").is_file()
    assert json.loads((out / "adaspec" / "config.json").read_text())["adaspec"]["meta"]["loss"] == "adaspec"
    # both heads carry the trained-on (loss-masked) token counts that rank a restricted draft vocabulary
    from adaspec_eagle.models.heads import read_token_counts

    counts = read_token_counts(out / "reference")
    assert counts is not None and counts.numel() == 102 and 0 < int(counts.sum())
    assert torch.equal(counts, read_token_counts(out / "adaspec"))
    train_ids = np.load(out / "features" / "input_ids.npy")[np.load(out / "features" / "loss_mask.npy").astype(bool)]
    assert torch.equal(counts, torch.bincount(torch.as_tensor(train_ids, dtype=torch.long), minlength=102))
    assert (out / "features" / "manifest.json").is_file() and (out / "config.yaml").is_file()
    results = json.loads((out / "results.json").read_text())
    assert set(results["eval"]) == {"reference", "adaspec"} and results["eval"]["adaspec"]["positions"] > 0
    # rerunning the same command finds both stages complete
    assert main(tiny_args(data, out)) == 0
    assert "already complete" in capsys.readouterr().err
    # the draft stage alone against that reference (online features), and the KD baseline into OUT/kd
    out2 = tmp_path / "run2"
    assert main(tiny_args(data, out2, "--stage", "draft", "--reference", str(out / "reference"), "features=online",
                          "--target", "tiny-llama")) == 0
    assert (out2 / "adaspec" / "model.safetensors").is_file() and not (out2 / "reference").exists()
    draft2 = ["--stage", "draft", "features=online", "--target", "tiny-llama"]
    # rerun against a copy of that reference at another path: the same run (complete); against other weights
    # (the AdaSPEC head itself): refused, naming both digests, before anything is written
    shutil.copytree(out / "reference", tmp_path / "ref-copy")
    assert main(tiny_args(data, out2, *draft2, "--reference", str(tmp_path / "ref-copy"))) == 0
    assert "already complete" in capsys.readouterr().err
    before = (out2 / "adaspec" / "model.safetensors").read_bytes()
    assert main(tiny_args(data, out2, *draft2, "--reference", str(out / "adaspec"))) == 2
    err = capsys.readouterr().err
    assert "holds an adaspec run against another reference head" in err and H.head_digest(out / "reference") in err
    assert (out2 / "adaspec" / "model.safetensors").read_bytes() == before
    assert main(tiny_args(data, out, "--stage", "draft", "--loss", "kd")) == 0
    assert json.loads((out / "kd" / "config.json").read_text())["adaspec"]["meta"]["loss"] == "kd"
    # results.json keeps the stages the first run recorded beside the KD stage run alone
    kept = json.loads((out / "results.json").read_text())
    assert list(kept["train"]) == ["reference", "adaspec", "kd"] and kept["eval"]["kd"]["positions"] > 0
    assert kept["eval"]["adaspec"] == results["eval"]["adaspec"] and "losses" not in kept["train"]["kd"]
    # a different run in the same folder is refused, unless --overwrite
    assert main(tiny_args(data, out, "optim.lr=1e-4")) == 2
    assert "holds a different reference run" in capsys.readouterr().err
    assert main(tiny_args(data, out, "optim.lr=1e-4", "--stage", "reference", "--overwrite")) == 0
    assert not (out / "adaspec").exists() and (out / "reference").is_dir()


def test_kd_baseline_runs_the_given_references_steps(tmp_path, capsys):
    """--stage draft --loss kd with --reference: the KD baseline runs the reference's step count at its own batch
    (the control at AdaSPEC's forwarded sequences); without a reference, its own epochs."""
    data = chat_file(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    assert main(tiny_args(data, out, "--stage", "reference", "train.max_steps=5")) == 0
    own = ["--stage", "draft", "--loss", "kd", "train.max_steps=null", "train.batch_size=8", "train.epochs=1"]
    assert main(tiny_args(data, tmp_path / "kd-own", *own)) == 0
    meta = json.loads((tmp_path / "kd-own" / "kd" / "config.json").read_text())["adaspec"]["meta"]
    assert meta["steps"] < 5 and "steps_of" not in meta  # one epoch of the 8 training samples at batch 8
    assert main(tiny_args(data, tmp_path / "kd-pinned", *own, "--reference", str(out / "reference"))) == 0
    meta = json.loads((tmp_path / "kd-pinned" / "kd" / "config.json").read_text())["adaspec"]["meta"]
    assert meta["steps"] == 5 and meta["batch_size"] == 8 and meta["steps_of"] == str(out / "reference")
    assert meta["loss"] == "kd" and meta["reference"] is None
    # rerun against a reference of another step count: refused (it would resume to the wrong budget), nothing lost
    assert main(tiny_args(data, tmp_path / "ref3", "--stage", "reference", "train.max_steps=3")) == 0
    before = (tmp_path / "kd-pinned" / "kd" / "model.safetensors").read_bytes()
    assert main(tiny_args(data, tmp_path / "kd-pinned", *own, "--reference", str(tmp_path / "ref3" / "reference"))) == 2
    assert "holds a kd run against another reference head" in capsys.readouterr().err
    assert (tmp_path / "kd-pinned" / "kd" / "model.safetensors").read_bytes() == before
    assert main(tiny_args(data, tmp_path / "kd-pinned", *own, "--reference", str(out / "reference"))) == 0
    assert "already complete" in capsys.readouterr().err


def test_cli_bad_inputs_fail_before_writing(tmp_path, capsys):
    data = chat_file(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    assert main(tiny_args(data, out, "loss.k=1.5")) == 2
    assert "loss.k=1.5 is out of range" in capsys.readouterr().err
    empty = chat_file(tmp_path / "empty.jsonl", assistant=False)
    assert main(tiny_args(empty, out)) == 2
    assert "no trainable tokens" in capsys.readouterr().err
    # a reference head trained for another target (hidden size 32, not 64)
    other = tiny_model("llama", hidden_size=32)
    save_head(build_head(other, HeadConfig()), tmp_path / "ref32", {"stage": "reference"})
    assert main(tiny_args(data, out, "--stage", "draft", "--reference", str(tmp_path / "ref32"))) == 2
    assert "hidden_size=32" in capsys.readouterr().err
    assert main(tiny_args(data, out, "--stage", "draft")) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_recipes_load():
    from accelerate.commands.config.config_args import load_config_from_file

    heads = sorted(glob.glob(str(ROOT / "recipes" / "heads" / "*.yaml")))
    assert {"tiny", "smollm2-135m", "phi-2"} <= {Path(p).stem for p in heads}  # and every recipe there loads
    for path in heads:
        load_recipe(HeadRecipe, path)
    kinds = {Path(p).stem: load_config_from_file(p).distributed_type.value
             for p in glob.glob(str(ROOT / "recipes" / "accelerate" / "*.yaml"))}
    assert kinds == {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}


def test_evaluate_head_agreement():
    target, head, _ = head_setup()
    data = samples(4)
    result = evaluate_head(head, target, data, batch_size=3)
    assert result["positions"] == sum(int(head_valid_mask(s["loss_mask"][None]).sum()) for s in data)
    assert 0.0 <= result["top1"] < 0.5  # an untrained head rarely agrees


# ----------------------------------------------------------------------------------------------------------
# Two processes (gloo) through accelerate launch

DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path[:0] = [{tests!r}, {helpers!r}]
    from test_head import head_setup, samples, run_train
    from accelerate import PartialState
    out = sys.argv[1]
    batch = int(sys.argv[2])
    target, head, loss_fn = head_setup()
    budget = dict(max_steps=60, max_minutes=float(sys.argv[4])) if len(sys.argv) > 4 else dict(max_steps=4)
    run = run_train(head, samples(10), loss_fn, out, batch_size=batch, grad_accum=2, **budget)
    rank = PartialState().process_index
    assert PartialState().num_processes == int(sys.argv[3])
    torch.save({{"state": run["model"].state_dict(), "losses": run["losses"]}}, f"{{out}}/rank{{rank}}.pt")
""")


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests" / "training"),
                                         helpers=str(ROOT / "tests")))
    # `accelerate launch --cpu` runs a single process unless under MPI; torchrun (--multi_gpu) with
    # ACCELERATE_USE_CPU=1 gives two CPU processes on gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "29533"]
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    for cmd in (launch + ["--multi_gpu", "--num_processes", "2", str(script), str(two), "2", "2"],
                launch + ["--num_processes", "1", str(script), str(one), "4", "1"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    r0, r1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    torch.testing.assert_close(r0["state"], single["state"], atol=1e-5, rtol=1e-4)
    assert r0["losses"] == pytest.approx(single["losses"], abs=1e-5)


@pytest.mark.slow
def test_two_process_time_budget_agrees_across_ranks(tmp_path):
    """Each rank measures its own clock; the cut must still be one step count for both, or one rank leaves the
    loop while the other waits in a collective (a hang)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests" / "training"),
                                         helpers=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29534", "--multi_gpu", "--num_processes", "2",
           str(script), str(tmp_path), "2", "2", "0.01"]  # a 0.6 s budget: ranks measure about 38 vs 41 steps
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert 20 < len(r0["losses"]) < 60 and r0["losses"] == r1["losses"]
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key


# ----------------------------------------------------------------------------------------------------------
# EAGLE-3: training-time test


def test_ttt_unroll_equals_sequential_drafting():
    from transformers import DynamicCache

    from adaspec_eagle.training.head import TTTUnroll, ttt_mask

    assert ttt_mask(3, 2)[0, 0].int().tolist() == [[1, 0, 0, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0, 0, 1, 0],
                                                   [1, 1, 1, 0, 0, 1, 0, 0, 1]]
    target = tiny_model("qwen2")
    torch.manual_seed(0)
    head = build_head(target, HeadConfig(kind="eagle3", draft_vocab_size=40), token_counts=torch.arange(102.0))
    ids = torch.randint(5, 102, (2, 12), generator=torch.Generator().manual_seed(0))
    fused = target_forward_features(target, ids, eagle3_layers=True)["fused"]
    with torch.no_grad():
        outs = TTTUnroll(head)(fused, ids, 3)
        t = 5  # the chain leaving the real prefix at index t, drafted token by token with a cache
        cache = DynamicCache()
        h = head(head.project(fused[:, :t + 1]), ids[:, 1:t + 2], torch.arange(t + 1)[None].expand(2, -1), cache=cache)
        torch.testing.assert_close(h[:, t], outs[0][:, t])
        h = h[:, t:t + 1]
        for j in (1, 2):
            h = head(h, ids[:, t + 1 + j:t + 2 + j], torch.full((2, 1), t + j), cache=cache)
            torch.testing.assert_close(h[:, 0], outs[j][:, t], atol=1e-5, rtol=1e-4)


def test_eagle3_cli_both_stages(tmp_path, capsys):
    data = chat_file(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    assert main(tiny_args(data, out, "head.kind=eagle3", "head.draft_vocab_size=48", "head.ttt_steps=3",
                          "train.max_steps=6", "optim.lr=5e-3")) == 0
    cfg = json.loads((out / "adaspec" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 48 and cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    losses = json.loads((out / "runs" / "reference" / "result.json").read_text())["losses"]
    assert losses[-1] < losses[0]
    assert "fused" in json.loads((out / "features" / "manifest.json").read_text())["keys"]
    assert "adaspec    top-1" in capsys.readouterr().out


def test_pipeline_resume_after_stop(tmp_path):
    from adaspec_eagle.training.head import run_pipeline

    data = chat_file(tmp_path / "chats.jsonl")

    def cfg(out):
        return load_recipe(HeadRecipe, TINY, [f"output_dir={out}", f"data.dataset={data}", "data.num_samples=12",
                                              "data.holdout=4", "data.max_length=64", "train.max_steps=4",
                                              "train.save_every=2", "stage=reference"])

    quiet = dict(progress=False, log=lambda m: None)
    full = run_pipeline(cfg(tmp_path / "full"), **quiet)
    cut = run_pipeline(cfg(tmp_path / "cut"), stop_at=3, **quiet)  # killed after step 3: step 3 is lost
    assert cut["stopped"] and not (tmp_path / "cut" / "reference").exists()
    resumed = run_pipeline(cfg(tmp_path / "cut"), **quiet)
    assert resumed["train"]["reference"]["losses"] == pytest.approx(full["train"]["reference"]["losses"], abs=1e-6)
    chain, chain_full = resumed["eval"]["reference"].pop("chain"), full["eval"]["reference"].pop("chain")
    assert resumed["eval"]["reference"] == pytest.approx(full["eval"]["reference"])
    assert chain["chains"] == chain_full["chains"] and chain["tau"] == pytest.approx(chain_full["tau"])
    assert chain["accept_by_depth"] == pytest.approx(chain_full["accept_by_depth"])
