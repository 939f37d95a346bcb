"""Benchmark record and outputs: the JSON record (config, machine, versions, per-suite summaries and every
per-prompt figure) built from timed runs, the Markdown table, the PNG plots, each written atomically (a temporary
file renamed into place, so a reader never sees half a file and an interrupted run keeps the previous one)."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from adaspec_eagle import __version__
from adaspec_eagle.bench.metrics import (
    PAPER_GAMMA,
    drafted_acceptance,
    or_none,
    spread,
    summarize_steps,
    tau,
    tokens_per_second,
)
from adaspec_eagle.engine import linear_routing
from adaspec_eagle.io import atomic_write, mark_output_folder

if TYPE_CHECKING:
    from adaspec_eagle.bench.runner import BenchConfig, Method, Run

SCHEMA = "adaspec-eagle-bench/1"
ENGINE_PLAIN = "plain-engine"  # the engine's own plain loop, the baseline that isolates speculation's share
PLOTS = ("accepted_length_hist.png", "acceptance_by_position.png", "speedup_by_suite.png")


def machine_info(device: str) -> dict:
    """CPU model, cores, threads, device and library versions, recorded with every benchmark, and what the
    engine's small-batch linear routing measured on this machine (`linear_routing.calibrations`)."""

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = str(device)
    if torch.device(device).type == "cuda":
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": dev,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "adaspec_eagle": __version__,
            "small_batch_linear": {"mode": linear_routing.mode(), "calibrated": linear_routing.calibrations()}}


def _routing_line(mach: dict) -> str:
    """The engine's small-batch linear routing in a bench.md's machine line (records before it have none)."""
    routing = mach.get("small_batch_linear")
    if not routing:
        return ""
    measured = "; ".join(f"{c['params'] / 1e6:.1f}M-parameter model: "
                         + (", ".join(map(str, c["routed_rows"])) + " rows" if c["routed_rows"] else "none")
                         for c in routing["calibrated"])
    return (f" Small-batch linear routing: {routing['mode']}"
            + (f" (routed, as measured here: {measured})" if measured else "") + ".")


# ----------------------------------------------------------------------------------------------------------
# The record: every per-prompt figure, per-suite summaries, the config and the machine


def _repeat_tps(per_prompt_runs: list[list[Run]]) -> list[float]:
    """Tokens/s of each repeat over all prompts of a suite."""
    return [tokens_per_second(sum(p[r].new_tokens_len for p in per_prompt_runs),
                              sum(p[r].seconds for p in per_prompt_runs)) for r in range(len(per_prompt_runs[0]))]


def summarize_method(method: Method, per_prompt_runs: list[list[Run]], ref_runs: list[list[Run]],
                     greedy: bool, engine_runs: list[list[Run]] | None = None) -> dict:
    """One method on one suite. `per_prompt_runs[i][r]` is prompt i, repeat r; `ref_runs` the same for the
    speedup reference (plain decoding). Tokens/s and speedup are per repeat (all prompts of the suite), then
    median and spread; acceptance pools the step records of every prompt and repeat. With `engine_runs` (the
    engine's own plain loop, when it is measured and is not the reference) a speculative method also gets
    `speedup_over_engine`: the part of its speedup that speculation gives, the engine's own loop factored out."""
    tps = _repeat_tps(per_prompt_runs)
    out = {"kind": method.kind, **method.info,
           "new_tokens": sum(p[0].new_tokens_len for p in per_prompt_runs),
           "tokens_per_s": spread(tps), "speedup": spread([a / b for a, b in zip(tps, _repeat_tps(ref_runs))])}
    if engine_runs is not None and method.kind == "speculative":
        out["speedup_over_engine"] = spread([a / b for a, b in zip(tps, _repeat_tps(engine_runs))])
    steps = [st for p in per_prompt_runs for run in p for st in (run.steps or [])]
    if any(run.steps is not None for p in per_prompt_runs for run in p):
        emitted = sum(run.new_tokens_len for p in per_prompt_runs for run in p if run.steps is not None)
        out.update(summarize_steps(steps, method.depth, method.gamma, emitted),
                   tau_source="new tokens / engine step records")
        phases = [run.phases for p in per_prompt_runs for run in p if run.phases]
        if phases:  # where the engine's time went, summed over all prompts and repeats
            out["time_split_s"] = {k: sum(ph.get(k, 0.0) for ph in phases) for k in phases[0]}
            out["time_split_s"]["wall_s"] = sum(run.seconds for p in per_prompt_runs for run in p)
    else:
        forwards = sum(run.target_forwards or 0 for p in per_prompt_runs for run in p)
        emitted = sum(run.new_tokens_len for p in per_prompt_runs for run in p)
        out.update(steps=forwards, tau=or_none(emitted / forwards) if forwards else None, alpha=None,
                   alpha_gamma=None, accepted_per_drafted=None, acceptance_by_position=None,
                   accepted_length_hist=None, tau_source="new tokens / counted target forwards")
    rows = [prompt_row(i, p, ref[0].new_ids if greedy else None) for i, (p, ref) in
            enumerate(zip(per_prompt_runs, ref_runs))]
    mismatches = [{"prompt": r["prompt"], "first_difference_at": r.pop("first_difference_at")}
                  for r in rows if r["matches_plain"] is False]
    out.update(lossless=(not mismatches) if greedy else None, mismatches=mismatches, per_prompt=rows)
    return out


def prompt_row(i: int, runs: list[Run], plain_ids: list[int] | None) -> dict:
    """Prompt i's figures over its repeats; with `plain_ids` (greedy) every repeat's output is compared with
    plain decoding's and the first differing position recorded."""
    first = runs[0]
    row = {"prompt": i, "new_tokens": first.new_tokens_len, "seconds": [run.seconds for run in runs],
           "tokens_per_s": spread([tokens_per_second(run.new_tokens_len, run.seconds) for run in runs])["median"],
           "matches_plain": None}
    if plain_ids is not None:
        bad = next((run.new_ids for run in runs if run.new_ids != plain_ids), None)
        row["matches_plain"] = bad is None
        if bad is not None:
            row["first_difference_at"] = next((j for j, (a, b) in enumerate(zip(bad, plain_ids)) if a != b),
                                              min(len(bad), len(plain_ids)))
    if first.steps is not None:
        row.update(steps=len(first.steps), tau=or_none(tau(first.steps, first.new_tokens_len)),
                   accepted_per_drafted=or_none(drafted_acceptance(first.steps)),
                   accepted=[int(st["accepted"]) for st in first.steps],
                   drafted=[int(st["drafted"]) for st in first.steps])
    elif first.target_forwards is not None:
        row.update(target_forwards=first.target_forwards,
                   tau=or_none(first.new_tokens_len / first.target_forwards) if first.target_forwards else None)
    return row


def make_record(cfg: BenchConfig, suites: list[dict], methods: list[Method], runs: dict,
                command: str | None = None) -> dict:
    """The benchmark record written to bench.json. `runs[suite][method][prompt]` is a list of `Run`s, one per
    repeat; the first method is the speedup reference."""
    greedy = cfg.temperature == 0
    ref = methods[0].name
    engine = ENGINE_PLAIN if any(m.name == ENGINE_PLAIN for m in methods[1:]) else None
    results = {}
    for s in suites:
        by_method = runs[s["name"]]
        results[s["name"]] = {m.name: summarize_method(m, by_method[m.name], by_method[ref], greedy,
                                                       by_method[engine] if engine else None)
                              for m in methods}
    lossless = {m.name: (all(results[s["name"]][m.name]["lossless"] for s in suites) if greedy else None)
                for m in methods}
    config = dataclasses.asdict(cfg)
    config["tree"] = {"shape": cfg.tree_shape, "depth": cfg.depth, "topk": cfg.topk, "total_tokens": cfg.total_tokens}
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": config,
        "machine": machine_info(cfg.device),
        "reference": ref,
        "methods": [{"name": m.name, "kind": m.kind, "depth": m.depth, "alpha_gamma": m.gamma, **m.info}
                    for m in methods],
        "suites": {s["name"]: {"source": s["source"], "num_prompts": len(s["prompts"]),
                               "prompt_tokens": [len(p) for p in s["prompts"]]} for s in suites},
        "results": results,
        "lossless": lossless,
    }


# ----------------------------------------------------------------------------------------------------------
# Outputs: bench.json, bench.md, plots; each written to a temporary file and renamed into place


def _fmt(x, digits=2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _fmt_spread(s: dict, digits=2) -> str:
    if not s or s.get("median") is None:
        return "—"
    if s["n"] == 1:
        return _fmt(s["median"], digits)
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def _tuned(suite: str, tuned: dict) -> str:
    """One suite's tuned tree for the bench.md header: 'sharegpt 3 tokens, depth 3, lookup 0'."""
    n = tuned["total_tokens"]
    return (f"{suite} {n} token{'s' if n != 1 else ''}, depth {tuned['depth']}"
            + (f", lookup {tuned['lookup_tokens']}" if "lookup_tokens" in tuned else ""))


def markdown_table(record: dict) -> str:
    """The suite × method table of a benchmark record, with a header stating target, tree, temperature, data
    and machine."""
    cfg, mach = record["config"], record["machine"]
    tree = cfg["tree"]
    vocabs = {str(m["draft_vocab"]) for m in record["methods"] if m.get("draft_vocab")}
    lines = [f"Command: `{record['command']}`", ""] if record.get("command") else []
    lines += [
        f"Target `{cfg['target']}` ({cfg['dtype']}, {mach['device']}), temperature {cfg['temperature']}"
        + (f", top-p {cfg['top_p']}" if cfg["temperature"] > 0 else "")
        + f", max {cfg['max_new_tokens']} new tokens, {cfg['repeats']} repeat(s) after {cfg['warmup']} warm-up.",
        f"Draft tree: {tree['shape']}, depth {tree['depth']}, top-k {tree['topk']}, " + (
            f"{tree['total_tokens']} tokens a step." if tree["total_tokens"] != "auto" else
            "budget and depth (and lookup length) tuned per drafter and suite on the suite's first prompt, which "
            "is measured too ("
            + "; ".join(f"{m['name']}: " + " / ".join(_tuned(suite, t) for suite, t in m["tuned_tree"].items())
                        for m in record["methods"] if m.get("tuned_tree")) + ").")
        + (f" Heads draft from the {', '.join(sorted(vocabs))} most frequent training tokens "
                     "(lossless; the target verifies every token)." if vocabs else "")
        + (" Prompt lookup in the engine: `+lookup(N)` rows graft up to N tokens (what followed the latest earlier "
           "occurrence of the last 3- or 2-gram; under auto tuning, the tuned length) onto the drafter's own tree; "
           "`lookup:N` rows verify such a chain alone."
           if any(m.get("lookup_tokens") for m in record["methods"]) else "")
        + (f" α: the paper's, from {'greedy' if cfg['temperature'] == 0 else 'sampled'} chain drafting with "
           f"γ={PAPER_GAMMA} (rows marked chain)."
                      if any(m.get("alpha_gamma") for m in record["methods"]) else ""),
        f"Speedup: tokens/s over `{record['reference']}` in the same run, same prompts (median [min–max] over "
        "repeats). τ: new tokens / target forwards, the bonus token included (a generation's last forward counts "
        "the tokens it kept, not those verified past max_new_tokens or EOS).",
        f"Machine: {mach['cpu']}, {mach['cores']} cores ({mach['torch_threads']} torch threads), torch "
        f"{mach['torch']}, transformers {mach['transformers']}." + _routing_line(mach),
    ]
    split = any("speedup_over_engine" in res for by_method in record["results"].values()
                for res in by_method.values())
    if split:
        lines.append(f"Over `{ENGINE_PLAIN}`: tokens/s over the engine's own plain loop in the same run, the part of "
                     f"the speedup that speculation gives (`{ENGINE_PLAIN}`'s own speedup is the engine's part).")
    lines += ["", "| suite | prompts | method | τ | α | accepted/drafted | tokens/s | speedup | "
              + (f"over `{ENGINE_PLAIN}` | " if split else "") + "lossless |",
              "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if split else "") + ":---:|"]
    for suite, by_method in record["results"].items():
        n = record["suites"][suite]["num_prompts"]
        for name, res in by_method.items():
            lossless = {True: "yes", False: "**no**", None: "n/a"}[res["lossless"]]
            alpha = _fmt(res["alpha"], 3) + (f" (γ={res['alpha_gamma']})" if res["alpha"] is not None
                                              and res["alpha_gamma"] != PAPER_GAMMA else "")
            lines.append(f"| {suite} | {n} | {name} | {_fmt(res['tau'])} | {alpha} | "
                         f"{_fmt(res['accepted_per_drafted'], 3)} | {_fmt_spread(res['tokens_per_s'], 1)} | "
                         f"{_fmt_spread(res['speedup'])} | "
                         + (f"{_fmt_spread(res.get('speedup_over_engine'))} | " if split else "")
                         + f"{lossless} |")
    return "\n".join(lines + time_split_table(record)) + "\n"


def time_split_table(record: dict) -> list[str]:
    """Markdown lines: where each engine method's time went (draft and verify per step, prefill), against the
    reference's time per token; `bound` = τ × reference ms/token / (draft + verify ms/step), the speedup the
    step costs allow before prefill and loop overhead (empty when no method has a split)."""
    rows = []
    for suite, by_method in record["results"].items():
        ref = by_method.get(record["reference"]) or {}
        ref_tps = (ref.get("tokens_per_s") or {}).get("median")
        ref_ms = 1000.0 / ref_tps if ref_tps else None
        for name, res in by_method.items():
            split, steps = res.get("time_split_s"), res.get("steps")
            if not split or not steps:
                continue
            runs = sum(len(row["seconds"]) for row in res["per_prompt"])  # prompts x repeats
            draft = 1000.0 * split.get("draft_time_s", 0.0) / steps  # steps and split: all prompts and repeats
            verify = 1000.0 * split.get("verify_time_s", 0.0) / steps
            prefill = 1000.0 * split.get("prefill_time_s", 0.0) / max(1, runs)
            bound = res["tau"] * ref_ms / (draft + verify) if (ref_ms and res.get("tau") and draft + verify) else None
            rows.append(f"| {suite} | {name} | {steps} | {_fmt(draft, 1)} | {_fmt(verify, 1)} | {_fmt(prefill, 0)} | "
                        f"{_fmt(ref_ms, 1)} | {_fmt(bound)} | {_fmt_spread(res['speedup'])} |")
    if not rows:
        return []
    return ["", f"Where the time goes (engine methods, all prompts and repeats; bound = τ × reference ms/token / "
                f"(draft + verify ms/step); reference `{record['reference']}`):", "",
            "| suite | method | steps | draft ms/step | verify ms/step | prefill ms/prompt | reference ms/token | "
            "bound | speedup |", "|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows]


def _speculative(record: dict) -> list[str]:
    return [m["name"] for m in record["methods"] if m["kind"] == "speculative"]


def plot_figures(record: dict) -> dict[str, bytes]:
    """PNG bytes of the three plots: accepted-length histogram and acceptance by draft position (one panel per
    suite, one series per speculative method) and speedup by suite (median with min–max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites, spec = list(record["results"]), _speculative(record)
    figures = {}

    def save(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    for fname, key, ylabel in (("accepted_length_hist.png", "accepted_length_hist", "fraction of target forwards"),
                               ("acceptance_by_position.png", "acceptance_by_position", "P(accepted length ≥ j)")):
        fig, axes = plt.subplots(1, len(suites), figsize=(4.5 * len(suites), 3.6), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            width = 0.8 / max(1, len(spec))
            for k, name in enumerate(spec):
                values = record["results"][suite][name][key] or []
                if key == "accepted_length_hist":
                    total = sum(values) or 1
                    offset = (k - (len(spec) - 1) / 2) * width  # bars of one length side by side, centred
                    ax.bar([x + offset for x in range(len(values))], [v / total for v in values], width,
                           label=name)
                    ax.set_xlabel("accepted draft tokens per forward")
                else:
                    ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
                    ax.set_xlabel("draft position j")
                    ax.set_ylim(0, 1.02)
            ax.set_title(suite)
            ax.set_ylabel(ylabel)
            if spec:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no speculative method", ha="center", va="center", transform=ax.transAxes)
        figures[fname] = save(fig)

    names = [m["name"] for m in record["methods"]][1:]  # all but the reference
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(suites) * max(1, len(names))), 3.8))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        sp = [record["results"][s][name]["speedup"] for s in suites]
        med = [x["median"] or 0 for x in sp]
        err = [[m - (x["min"] or m) for m, x in zip(med, sp)], [(x["max"] or m) - m for m, x in zip(med, sp)]]
        ax.bar([i + k * width for i in range(len(suites))], med, width, yerr=err, capsize=3, label=name)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(suites))], suites)
    ax.set_title(f"speedup by suite (temperature {record['config']['temperature']}; median, min–max over repeats)",
                 fontsize=9)
    ax.set_ylabel(f"speedup over {record['reference']}")
    if names:
        ax.legend(fontsize=7)
    figures["speedup_by_suite.png"] = save(fig)
    return figures


def write_record(record: dict, out: Path) -> None:
    """bench.json and bench.md of `record` in the folder `out` (each written atomically)."""
    atomic_write(out / "bench.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    atomic_write(out / "bench.md", markdown_table(record))


def write_outputs(record: dict, out: str | Path) -> dict[str, str]:
    """bench.json, bench.md and the PNG plots in `out`; returns {name: path}."""
    out = Path(out)
    written = {}
    mark_output_folder(out, "bench")
    write_record(record, out)
    for name, png in plot_figures(record).items():
        atomic_write(out / name, png)
    for name in ("bench.json", "bench.md", *PLOTS):
        written[name] = str(out / name)
    return written
