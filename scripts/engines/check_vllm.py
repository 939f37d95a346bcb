"""Our exported heads in vLLM itself (run in the vLLM venv; see scripts/engines.sh).

For each head (WORK/export/vllm-NAME, as `prepare.py` wrote it) vLLM generates greedily from the prompts of
WORK/reference.json with `speculative_config={"method": "eagle"|"eagle3", "num_speculative_tokens": gamma}`, and
once without speculation. Checks:
  - speculative output identical to vLLM's own plain greedy output, token for token;
  - vLLM's acceptance counters (vllm:spec_decode_*) against our engine's on the same prompts, chain length and
    head: acceptance at each draft position within TOLERANCE (absolute) of ours.
Each configuration runs in its own process (an `LLM` per process). Writes WORK/vllm.json; exit 1 on a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOLERANCE = 0.05  # acceptance rate per draft position, absolute
HEADS = {"kd": "eagle", "kd-bias": "eagle", "e3": "eagle3", "e3-full": "eagle3"}
CONTROL = "control"  # negative control: what the vLLM export guards against must fail these checks


def run_one(work: Path, name: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ref = json.loads((work / "reference.json").read_text())
    kwargs = {}
    if name == CONTROL:  # EAGLE's layout of the biased head: config "bias": true, fc.bias kept, nothing folded
        kwargs["speculative_config"] = {"method": "eagle", "model": str(work / "export" / "eagle-kd-bias"),
                                        "num_speculative_tokens": ref["gamma"]}
    elif name != "plain":
        kwargs["speculative_config"] = {"method": HEADS[name], "model": str(work / "export" / f"vllm-{name}"),
                                        "num_speculative_tokens": ref["gamma"]}
    start = time.perf_counter()
    llm = LLM(model=str(work / "target"), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              disable_log_stats=False, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=ref["max_new_tokens"])
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in ref["prompts"]], params, use_tqdm=False)
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "seconds": time.perf_counter() - start}
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            result["drafts"] = metric.value
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            result["draft_tokens"] = metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            result["accepted_tokens"] = metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            result["accepted_per_pos"] = list(metric.values)
    return result


def main() -> int:
    work = Path(sys.argv[1])
    if len(sys.argv) > 2:  # one configuration, in this process
        print("RESULT " + json.dumps(run_one(work, sys.argv[2])))
        return 0
    import vllm

    ref = json.loads((work / "reference.json").read_text())
    report = {"engine": "vllm", "version": vllm.__version__, "tolerance": TOLERANCE, "gamma": ref["gamma"],
              "prompts": len(ref["prompts"]), "max_new_tokens": ref["max_new_tokens"], "heads": {}}
    runs = {}
    names = ["plain", *[h for h in HEADS if h in ref["heads"]]]
    for name in names + ([CONTROL] if "kd-bias" in ref["heads"] else []):
        proc = subprocess.run([sys.executable, __file__, str(work), name], capture_output=True, text=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                                           "1")})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
            if name == CONTROL:  # refusing to load is catching it too
                report["negative_control"] = {"error": f"exit {proc.returncode}", "caught": True}
            else:
                report["heads"][name] = {"error": f"exit {proc.returncode}", "ok": False}
            continue
        runs[name] = json.loads(lines[-1][len("RESULT "):])
        print(f"vllm {name}: {runs[name]['seconds']:.0f} s", flush=True)
    plain = runs.get("plain")
    if plain:
        report["plain_identical_to_ours"] = sum(a == b for a, b in zip(plain["outputs"], ref["plain"]))
    for name, run in runs.items():
        if name == "plain":
            continue
        ours = ref["heads"]["kd-bias" if name == CONTROL else name]
        drafts = max(run.get("drafts", 0), 1)
        theirs = [a / drafts for a in run.get("accepted_per_pos", [0] * ref["gamma"])]
        gap = max(abs(a - b) for a, b in zip(theirs, ours["acceptance_per_pos"]))
        identical = plain is not None and run["outputs"] == plain["outputs"]
        row = {"identical_to_vllm_plain": identical, "drafts": run.get("drafts", 0),
               "acceptance_per_pos": theirs, "ours_acceptance_per_pos": ours["acceptance_per_pos"],
               "tau": 1 + run.get("accepted_tokens", 0) / drafts, "ours_tau": 1 + sum(ours["accepted_per_pos"])
               / ours["drafts"], "max_gap": gap, "ok": identical and gap <= TOLERANCE and run.get("drafts", 0) > 0}
        if name == CONTROL:
            report["negative_control"] = {**row, "what": "eagle-kd-bias (config bias: true, fc.bias not folded)",
                                          "caught": not row["ok"]}
            print(f"vllm negative control (EAGLE layout of the biased head: \"bias\": true, no fold): acceptance "
                  f"by position {' / '.join(f'{a:.3f}' for a in theirs)}; the check "
                  f"{'catches it' if not row['ok'] else 'DOES NOT catch it'}")
            continue
        report["heads"][name] = row
        print(f"vllm {name}: identical to plain {identical}; acceptance by position vLLM "
              f"{' / '.join(f'{a:.3f}' for a in theirs)} vs ours "
              f"{' / '.join(f'{a:.3f}' for a in ours['acceptance_per_pos'])} (max gap {gap:.3f}); "
              f"tau {row['tau']:.3f} vs {row['ours_tau']:.3f}: {'OK' if row['ok'] else 'FAIL'}")
    (work / "vllm.json").write_text(json.dumps(report, indent=2))
    ok = plain is not None and all(r.get("ok") for r in report["heads"].values())
    ok &= report.get("negative_control", {}).get("caught", True)
    if plain:
        print(f"vllm plain greedy identical to our plain greedy (transformers) on {report['plain_identical_to_ours']}"
              f"/{len(ref['prompts'])} prompts")
    print("vllm: all checks passed" if ok else "vllm: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
