"""Our exported heads in EAGLE's own code (SafeAILab/EAGLE, run in the EAGLE venv; see scripts/engines.sh).

For each head (WORK/export/eagle-kd, eagle-kd-bias: EAGLE-1 layout; eagle3-e3, eagle3-e3-full: EAGLE-3 layout)
EAGLE's `EaModel.from_pretrained` loads the target folder and the head, then `eagenerate` (EAGLE-2 dynamic tree:
total_token, depth, top_k as in WORK/reference.json's "tree") and `naivegenerate` (EAGLE's plain greedy loop) run
on the prompts of WORK/reference.json. Checks:
  - the head EaModel built has every exported weight (compared tensor by tensor) and the target's embedding;
  - `eagenerate` output identical to `naivegenerate`, token for token (both cut to max_new_tokens);
  - tau (tokens per target forward, as eagenerate counts them) reported next to our engine's with the same tree.
Writes WORK/eagle.json; exit 1 on a failure.

    PYTHONPATH=EAGLE_CHECKOUT python scripts/engines/check_eagle.py WORK
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HEADS = {"kd": ("eagle", False), "kd-bias": ("eagle", False), "e3": ("eagle3", True),
         "e3-full": ("eagle3", True)}


def loaded_weights_match(model, folder: Path) -> list[str]:
    """Names of exported tensors that EaModel's head does not hold (missing or different)."""
    from safetensors.torch import load_file

    exported = load_file(str(folder / "model.safetensors"))
    own = model.ea_layer.state_dict()
    bad = [k for k, v in exported.items() if k not in own or not torch.equal(own[k].float(), v.float())]
    target_emb = model.base_model.model.embed_tokens.weight
    if not torch.equal(model.ea_layer.embed_tokens.weight.float(), target_emb.float()):
        bad.append("embed_tokens.weight (not the target's)")
    return bad


def cut(tokens: list[int], n: int, eos: int) -> list[int]:
    """The first n tokens, up to and including the first EOS (both loops stop after a step that emits one, and a
    tree step can emit a few tokens past it)."""
    tokens = tokens[:n]
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def main() -> int:
    work = Path(sys.argv[1])
    from eagle.model.ea_model import EaModel
    import transformers

    torch.manual_seed(0)
    ref = json.loads((work / "reference.json").read_text())
    tree = ref["tree"]
    import subprocess

    import eagle

    src = Path(eagle.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    report = {"engine": "EAGLE", "commit": commit, "transformers": transformers.__version__, "tree": tree,
              "heads": {}}
    ok = True
    for name, (fmt, eagle3) in HEADS.items():
        if name not in ref["heads"]:
            continue
        start = time.perf_counter()
        model = EaModel.from_pretrained(base_model_path=str(work / "target"),
                                        ea_model_path=str(work / "export" / f"{fmt}-{name}"), use_eagle3=eagle3,
                                        total_token=tree["total_token"], depth=tree["depth"], top_k=tree["top_k"],
                                        torch_dtype=torch.float32)
        model.eval()
        bad = loaded_weights_match(model, work / "export" / f"{fmt}-{name}")
        n, eos = ref["max_new_tokens"], model.tokenizer.eos_token_id
        identical, steps, emitted = 0, 0, 0
        for ids in ref["prompts"]:
            x = torch.tensor([ids])
            with torch.no_grad():
                spec, new_tokens, idx = model.eagenerate(x, temperature=0.0, max_new_tokens=n, log=True)
                plain = model.naivegenerate(x, temperature=0.0, max_new_tokens=n)
            a, b = cut(spec[0, len(ids):].tolist(), n, eos), cut(plain[0, len(ids):].tolist(), n, eos)
            identical += a == b
            steps += int(idx) + 1
            emitted += int(new_tokens)
        tau = emitted / steps
        ours = ref["heads"][name]["tree_tau"]
        row = {"identical": identical, "prompts": len(ref["prompts"]), "tau": tau, "ours_tree_tau": ours,
               "weights_not_loaded": bad, "seconds": time.perf_counter() - start}
        row["ok"] = identical == len(ref["prompts"]) and not bad and tau > 1.0
        ok &= row["ok"]
        report["heads"][name] = row
        print(f"EAGLE {fmt}-{name}: eagenerate identical to naivegenerate on {identical}/{len(ref['prompts'])} "
              f"prompts; tau {tau:.3f} (ours, same tree: {ours:.3f}); weights not loaded: {bad or 'none'}: "
              f"{'OK' if row['ok'] else 'FAIL'}", flush=True)
        del model
    if "e3" in report["heads"]:  # negative control: the EAGLE-3 export as it was, with target_hidden_size
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            broken = Path(tmp) / "eagle3-e3"
            shutil.copytree(work / "export" / "eagle3-e3", broken)
            cfg = json.loads((broken / "config.json").read_text())
            (broken / "config.json").write_text(json.dumps({**cfg, "target_hidden_size": cfg["hidden_size"]}))
            model = EaModel.from_pretrained(base_model_path=str(work / "target"), ea_model_path=str(broken),
                                            use_eagle3=True, total_token=tree["total_token"], depth=tree["depth"],
                                            top_k=tree["top_k"], torch_dtype=torch.float32)
            bad = loaded_weights_match(model.eval(), broken)
        report["negative_control"] = {"config": "target_hidden_size written", "weights_not_loaded": bad,
                                      "caught": bool(bad)}
        ok &= bool(bad)
        print(f"EAGLE negative control (the old EAGLE-3 export's target_hidden_size): {bad or 'nothing wrong'}; the "
              f"check {'catches it' if bad else 'DOES NOT catch it'}", flush=True)
    (work / "eagle.json").write_text(json.dumps(report, indent=2))
    print("EAGLE: all checks passed" if ok else "EAGLE: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
