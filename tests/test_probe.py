"""The faults and hostile inputs of the reliability probe (issue 20): the output-folder rule (nothing foreign
is written into or deleted), a really full disk (a small tmpfs where this machine lets the test mount one), a
damaged feature cache, inputs refused before any model loads, files that are not UTF-8, duplicate YAML keys, and
a bounded fuzz of the argument parser and the recipe loader. docs/RELIABILITY.md names each test."""

import contextlib
import json
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from adaspec_eagle import AdaspecError
from adaspec_eagle.cli import main
from adaspec_eagle.config import DraftLMRecipe, HeadConfig, HeadRecipe, load_recipe
from adaspec_eagle.export import export_head
from adaspec_eagle.training.features import build_cache, open_cache
from adaspec_eagle.models.heads import build_head, load_head, save_head
from adaspec_eagle.io import MARKER
from adaspec_eagle.models import load_model, tiny_model
from _helpers import samples

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "heads" / "tiny.yaml")


def user_folder(path: Path) -> dict:
    """A folder of the user's own files; returns {relative path: bytes} to compare with later."""
    (path / "photos").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    return snapshot(path)


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model starts loading: every check must come first. Every module that binds
    `load_model` is imported first and patched where it uses the name; a module first imported under the patch
    would keep `refuse` after the test (the command modules are imported when `main` first builds its parser)."""
    import adaspec_eagle.bench.runner
    import adaspec_eagle.cli.generate
    import adaspec_eagle.export.layouts
    import adaspec_eagle.models
    import adaspec_eagle.models.draft_lm
    import adaspec_eagle.models.registry
    import adaspec_eagle.training.draft_lm

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in (adaspec_eagle.models, adaspec_eagle.models.registry, adaspec_eagle.models.draft_lm,
                   adaspec_eagle.training.draft_lm, adaspec_eagle.cli.generate, adaspec_eagle.bench.runner,
                   adaspec_eagle.export.layouts):
        monkeypatch.setattr(module, "load_model", refuse)


@contextlib.contextmanager
def small_fs(path: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` at `path` (root and a kernel that allows it); skips the test elsewhere."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def tiny_head_folder(tmp_path, fc_bias=False):
    target = tiny_model("llama")
    torch.manual_seed(0)
    return save_head(build_head(target, HeadConfig(fc_bias=fc_bias)), tmp_path / "head", {}, target_model=target)


# ----------------------------------------------------------------------------------------------------------
# The output-folder rule


def test_overwrite_never_deletes_a_users_files(tmp_path, capsys, no_model_load):
    before = user_folder(tmp_path / "u")
    base = ["train-draft-lm", "--target", "tiny-llama", "--draft", "layers=1", "--output-dir", str(tmp_path / "u"),
            "data.dataset=x.jsonl", "train.max_steps=2"]
    for extra in ([], ["--overwrite"]):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert "holds files adaspec-eagle did not make (photos, thesis.txt)" in err and "never deletes" in err
        assert snapshot(tmp_path / "u") == before and sorted(os.listdir(tmp_path / "u")) == ["photos", "thesis.txt"]


def test_train_head_refuses_a_folder_of_other_files(tmp_path, capsys, no_model_load):
    before = user_folder(tmp_path / "u")
    for extra in ([], ["--overwrite"]):
        assert main(["train-head", "--recipe", TINY, "--output-dir", str(tmp_path / "u"), *extra]) == 2
        assert "did not make" in capsys.readouterr().err
    assert snapshot(tmp_path / "u") == before and sorted(os.listdir(tmp_path / "u")) == ["photos", "thesis.txt"]


def test_output_paths_that_are_files_or_under_files(tmp_path, capsys, no_model_load):
    (tmp_path / "f").write_text("x")
    for out, says in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "lies under")):
        assert main(["train-head", "--recipe", TINY, "--output-dir", str(out)]) == 2
        assert says in capsys.readouterr().err
        assert main(["bench", "--target", "tiny-llama", "--out", str(out)]) == 2  # before the benchmark runs
        assert says in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


def test_export_force_replaces_only_an_export(tmp_path, capsys):
    head = tiny_head_folder(tmp_path)
    before = user_folder(tmp_path / "u")
    assert main(["export", str(head), "--format", "sglang", "--out", str(tmp_path / "u"), "--force"]) == 2
    assert "did not make" in capsys.readouterr().err and snapshot(tmp_path / "u") == before
    assert main(["export", str(head), "--format", "sglang", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / MARKER).is_file()
    assert main(["export", str(head), "--format", "vllm", "--out", str(tmp_path / "e")]) == 2  # not without --force
    assert main(["export", str(head), "--format", "vllm", "--out", str(tmp_path / "e"), "--force"]) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["adaspec"]["export"]["format"] == "vllm"


def test_overwrite_empties_a_run_folder_this_tool_made(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "old-checkpoint").write_text("stale")
    from adaspec_eagle.config import claim_output_dir

    cfg = load_recipe(DraftLMRecipe, None, [f"output_dir={out}"])
    with claim_output_dir(out, cfg, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == sorted([".lock", MARKER])


def test_written_heads_and_exports_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        head = tiny_head_folder(tmp_path)
        out = export_head(head, "vllm", tmp_path / "vl")
    finally:
        os.umask(old)
    for folder in (head, out):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_read_only_output_is_refused_before_anything_runs(tmp_path, capsys, no_model_load):
    with small_fs(tmp_path / "ro", "64k", read_only=True) as ro:
        assert main(["bench", "--target", "tiny-llama", "--out", str(ro / "b")]) == 2
        assert "cannot be written" in capsys.readouterr().err
        assert main(["export", str(tiny_head_folder(tmp_path)), "--format", "vllm", "--out", str(ro / "e")]) == 2
        assert "cannot be written" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# A full disk, for real


def test_feature_cache_on_a_full_disk_is_an_error_and_leaves_nothing(tmp_path):
    target = tiny_model("llama")
    data = samples(64, T=64)
    with small_fs(tmp_path / "small", "256k") as fs:
        with pytest.raises(AdaspecError, match="the disk is full: could not write the target-feature cache.*"
                                               "partial cache was deleted"):
            build_cache(target, data, fs / "features", dtype="fp32", progress=False)
        assert not (fs / "features").exists()


def test_export_on_a_full_disk_keeps_the_earlier_export(tmp_path, capsys):
    head = tiny_head_folder(tmp_path)
    with small_fs(tmp_path / "small", "320k") as fs:
        assert main(["export", str(head), "--format", "sglang", "--out", str(fs / "e")]) == 0
        before = snapshot(fs / "e")
        filler = fs / "filler"
        with contextlib.suppress(OSError):
            filler.write_bytes(b"\0" * (1 << 20))  # fill the rest of the disk
        assert main(["export", str(head), "--format", "vllm", "--out", str(fs / "e"), "--force"]) == 2
        assert "the disk is full" in capsys.readouterr().err
        assert snapshot(fs / "e") == before
        assert sorted(p.name for p in fs.iterdir()) == ["e", "filler"]  # no temporary folder left


def test_damaged_feature_cache_is_a_clear_error(tmp_path):
    target = tiny_model("llama")
    data = samples(6, T=16)
    build_cache(target, data, tmp_path / "features", progress=False)
    path = tmp_path / "features" / "features.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdaspecError, match="feature cache .* is damaged .*--overwrite"):
        open_cache(tmp_path / "features", target, data)


# ----------------------------------------------------------------------------------------------------------
# Inputs refused with a message, before any model loads


@pytest.mark.parametrize("flags,message", [
    (["--device", "cuda"], "CPU-only build" if torch.version.cuda is None else "CUDA"),
    (["--threads", "-1"], "--threads -1"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--stop", ""], 'empty stop string'),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--total-tokens", "many"], "--total-tokens"),
    (["--head", "/etc/hostname"], "is a file"),
])
def test_generate_flags_are_checked_before_the_model_loads(capsys, no_model_load, flags, message):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if flags[0] == "--head" and not Path(flags[1]).is_file():
        pytest.skip("no /etc/hostname here")
    assert main(["generate", "--target", "tiny-llama", *flags, "hi"]) == 2
    assert message in capsys.readouterr().err


def test_recipe_files_that_are_empty_not_utf8_or_repeat_a_key(tmp_path, capsys, no_model_load):
    cases = {"empty.yaml": (b"", "is empty"), "latin1.yaml": (b"target: caf\xe9\n", "byte 11 (0xe9)"),
             "twice.yaml": (b"train:\n  epochs: 1\ntrain:\n  epochs: 2\n", "'train' is given twice"),
             "nested.yaml": (b"train:\n  epochs: 1\n  epochs: 2\n", "'epochs' is given twice")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert main(["train-head", "--recipe", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err, name


def test_data_file_that_is_not_utf8(tmp_path):
    from adaspec_eagle.data import read_records

    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "\xff"}\n')
    with pytest.raises(AdaspecError, match=r"d.jsonl' is not UTF-8 text: byte 51 \(0xff\)"):
        read_records(str(tmp_path / "d.jsonl"))


def test_empty_stage_list_is_refused(capsys, no_model_load):
    assert main(["train-draft-lm", "--target", "tiny-llama", "--stages", ""]) == 2
    assert "stages" in capsys.readouterr().err


def test_loss_flag_and_recipe_agree(tmp_path, monkeypatch):
    """--loss sets loss.kind (so the saved config says what ran); without it the recipe's loss.kind holds."""
    import adaspec_eagle.training.draft_lm as tdl

    seen = {}
    monkeypatch.setattr(tdl, "run", lambda cfg, loss_kind, overwrite: seen.update(cfg=cfg, kind=loss_kind) or {})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: tiny-llama\nloss:\n  kind: kd\n")
    assert main(["train-draft-lm", "--recipe", str(recipe)]) == 0
    assert seen["kind"] == seen["cfg"].loss.kind == "kd"
    assert main(["train-draft-lm", "--recipe", str(recipe), "--loss", "adaspec"]) == 0
    assert seen["kind"] == seen["cfg"].loss.kind == "adaspec"


def test_export_of_a_folder_without_config_json(tmp_path, capsys):
    head = tiny_head_folder(tmp_path)
    (head / "config.json").unlink()
    assert main(["export", str(head), "--format", "eagle", "--out", str(tmp_path / "e")]) == 2
    assert "has no config.json" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_hidden_size_error_names_the_heads_size(tmp_path):
    head = tiny_head_folder(tmp_path)
    cfg = json.loads((head / "config.json").read_text())
    cfg["hidden_size"] = 1024
    del cfg["adaspec"]
    (head / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaspecError, match="has hidden size 1024 but the target 'tiny-llama' has 64"):
        load_head(head, load_model("tiny-llama", with_tokenizer=False))


def test_records_dropped_as_malformed_are_reported(tmp_path):
    from adaspec_eagle.config import DataConfig
    from adaspec_eagle.data import build_dataset
    from adaspec_eagle.models import tiny_tokenizer

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] * 6 + [{"messages": "not a list"}]) + "\n")
    with pytest.warns(UserWarning, match="dropped 1 malformed"):
        build_dataset(DataConfig(dataset=str(path), holdout=1, num_samples=4), tiny_tokenizer(), "train")


# ----------------------------------------------------------------------------------------------------------
# Fuzz: the argument parser and the recipe loader never raise anything but a clear error


FUZZ_ARGS = ["train-head", "train-draft-lm", "generate", "bench", "export", "data-stats", "--recipe", "--target",
             "--overwrite", "--resume", "--stage", "reference", "draft", "both", "--format", "vllm", "--out",
             "--threads", "-3", "0", "1e9", "--device", "cuda:7", "--temperature", "nan", "inf", "--top-p", "--head",
             "--draft", "layers=0", "fresh:hidden=x", "--stages", "", ",", "loss.k=2", "train.max_steps=-1",
             "head.kind=eagle9", "data.holdout=abc", "=", "a.b.c=1", "--total-tokens", "auto", "x", "é", "\x00",
             "--max-new-tokens", "-1", "--stop", "--loss", "kd", "--suite", "jsonl:/nope", "--help"]


def test_fuzz_cli_arguments_exit_0_or_2_without_a_traceback(tmp_path, monkeypatch, no_model_load):
    """Random argument lists: argparse exits 0 (help) or 2, a command refuses with status 2 before any model
    loads, or (a valid command line) reaches the model load, which the fixture turns into a known assertion."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    for _ in range(300):
        argv = [rng.choice(FUZZ_ARGS) for _ in range(rng.randint(1, 7))]
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
        except AssertionError as e:
            assert "a model was loaded" in str(e), argv
            continue
        assert status in (0, 1, 2), (argv, status)
    assert not any(tmp_path.iterdir())  # nothing written by a refused command


def test_fuzz_recipe_loader_refuses_clearly(tmp_path):
    rng = random.Random(1)
    seed = (ROOT / "recipes" / "heads" / "smollm2-135m.yaml").read_bytes()
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(300):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            op, pos = rng.randrange(3), rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos:pos + rng.randint(1, 20)]
            else:
                data[pos:pos] = rng.choice([b":", b"\n  ", b"- ", b"{", b"'", b"\xff", b"train:", b"&a *a"])
        path = tmp_path / f"r{i}.yaml"
        path.write_bytes(bytes(data))
        try:
            load_recipe(HeadRecipe, path)
            outcomes["loaded"] += 1
        except AdaspecError:
            outcomes["refused"] += 1
    assert outcomes["loaded"] and outcomes["refused"], outcomes  # the mutations reach both sides


def test_benchmark_results_on_a_full_disk_are_printed_not_lost(tmp_path, capsys, monkeypatch):
    import errno

    import adaspec_eagle.bench.runner as bench

    def full(record, out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bench, "run_bench", lambda cfg: {"fake": True})
    monkeypatch.setattr(bench, "markdown_table", lambda record: "| the table |")
    monkeypatch.setattr(bench, "write_outputs", full)
    assert main(["bench", "--target", "tiny-llama", "--out", str(tmp_path / "b")]) == 2
    captured = capsys.readouterr()
    assert "| the table |" in captured.out and "the disk is full" in captured.err
