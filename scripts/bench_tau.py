"""Recount τ in `adaspec-eagle bench` records written before τ counted the tokens kept.

Until then an engine row's τ was mean(accepted + 1) over its target forwards, which also counts the tokens the
last forward of each prompt verified past max_new_tokens or EOS (never emitted). The records keep what is needed to
recount it: each prompt's new tokens and steps. This rewrites, in each given bench output folder, bench.json (every
engine row's τ, overall and per prompt, and its `tau_source`) and bench.md (rendered again from the record), and
prints each changed row. Only greedy records are recounted (their repeats are identical; a sampled record with
several repeats keeps only the first repeat's counts and is refused).

    python scripts/bench_tau.py docs/records/heads/bench-headline [more folders]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaspec_eagle.bench import report as R

SOURCE = "new tokens / engine step records"


def recount(record: dict) -> list[tuple[str, str, float, float]]:
    """Recount τ of every engine row in place; returns (suite, method, old τ, new τ) for each row recounted."""
    if record["config"].get("temperature", 0.0) > 0 and record["config"].get("repeats", 1) > 1:
        raise SystemExit("a sampled record with several repeats: its per-prompt counts are the first repeat's, "
                         "so its pooled τ cannot be recounted; rerun the bench instead.")
    changed = []
    for suite, by_method in record["results"].items():
        for name, res in by_method.items():
            rows = res.get("per_prompt") or []
            if res.get("tau_source") == SOURCE or not rows or "steps" not in rows[0]:
                continue  # counted the new way already, or not an engine row
            steps = sum(row["steps"] for row in rows)
            kept = sum(row["new_tokens"] for row in rows)
            old = res["tau"]
            res["tau"] = kept / steps if steps else None
            for row in rows:
                row["tau"] = row["new_tokens"] / row["steps"] if row["steps"] else None
            res["tau_source"] = SOURCE
            changed.append((suite, name, old, res["tau"]))
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="bench output folders (bench.json, bench.md)")
    a = p.parse_args(argv)
    for folder in map(Path, a.folders):
        record = json.loads((folder / "bench.json").read_text())
        changed = recount(record)
        for suite, name, old, new in changed:
            print(f"{folder}: {suite} {name}: tau {old:.3f} -> {new:.3f}")
        if changed:
            R.write_record(record, folder)
        else:
            print(f"{folder}: nothing to recount")
    return 0


if __name__ == "__main__":
    sys.exit(main())
