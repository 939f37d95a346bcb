"""The package's shape: imports flow one way (the import-linter contracts in pyproject.toml), and every module
the CLI registers exists."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_every_subcommand_registers():
    from adaspec_eagle.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "list-models", "data-stats", "data-tokenize", "train-draft-lm", "train-head",
                             "generate", "bench", "export"}


def test_no_function_is_longer_than_60_lines():
    import ast

    long = []
    for path in sorted((ROOT / "adaspec_eagle").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


# Imports that may stay inside functions, and why; every other import sits at the top of its module, so a reader
# sees a module's dependencies in one place (and the import-linter contracts see them all).
LAZY_IMPORTS = {
    "deepspeed": "optional extra, only on the DeepSpeed path",
    "accelerate": "about a second to import; the parser imports every command module, so every command would pay",
    "datasets": "slow to import (pyarrow); only for Hugging Face hub datasets",
    "matplotlib": "optional, only for bench plots",
    "torch.utils.tensorboard": "needs the tensorboard package; only when training logs are written",
    "torch.distributed": "only under a multi-process launch",
    "fcntl": "POSIX only",
}


def test_imports_sit_at_the_top_of_their_module():
    import ast

    inside = []
    for path in sorted((ROOT / "adaspec_eagle").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if not any(module == m or module.startswith(m + ".") for m in LAZY_IMPORTS):
                        inside.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    assert not inside, inside


def test_every_command_the_docs_give_parses():
    """Each `adaspec-eagle ...` command in the README, docs/ and the head cards is one our parser accepts (placeholders like
    {a,b} and bare command names aside): docs that name a flag the CLI does not have fail here."""
    import contextlib
    import io
    import re
    import shlex

    from adaspec_eagle.cli import build_parser

    commands = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "heads").glob("*/README.md"))]:
        text = path.read_text()
        commands += [(path.name, c) for c in re.findall(r"`(adaspec-eagle [^`]+)`", text)]
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("adaspec-eagle "):
                    commands.append((path.name, line))
    bad = []
    for name, command in commands:
        argv = shlex.split(command)[1:]
        if "{" in command or "..." in command or len(argv) < 2:
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                bad.append(f"{name}: {command}")
    assert len(commands) >= 15 and not bad, bad
