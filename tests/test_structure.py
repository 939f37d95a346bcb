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
