"""Everything the real-engine checks compare against, made with adaspec-eagle (run in the project's venv):

  WORK/target/            the bundled SmolLM2-135M as a plain transformers folder (fp32, sharded with an index:
                          EAGLE reads the target's embedding through model.safetensors.index.json)
  WORK/heads/NAME/        the heads under test (our layout)
  WORK/export/FMT-NAME/   their exports (`adaspec_eagle.export.export_head`)
  WORK/reference.json     prompts, plain greedy outputs, and per head our engine's greedy chain run (output ids,
                          drafts, accepted drafts by position, tau) with the head drafting over the whole vocabulary
  WORK/logits/NAME.safetensors   one teacher-forced step of each head on a prompt: input ids, the target
                          features it reads, its output hidden states and its own lm_head's logits

Heads: `kd` is the shipped KD head (EAGLE-1, no fc bias); `kd-bias` is the same head with a random non-zero fc
bias (the case vLLM's bias-free fc cannot hold unless the export folds it); `e3` is an EAGLE-3 head over a
draft vocabulary of 8,192 ids (d2t/t2d written), trained here for a few minutes unless --e3 names one;
`e3-full` is that head with its lm_head widened to the whole vocabulary (no d2t/t2d; the rows added are zeros).

    python scripts/engines/prepare.py --work .engines/work
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adaspec_eagle.bench.runner import load_suite  # noqa: E402
from adaspec_eagle.config import TreeConfig  # noqa: E402
from adaspec_eagle.export import export_head  # noqa: E402
from adaspec_eagle.models.heads import load_head, save_head  # noqa: E402
from adaspec_eagle.models import load_model, target_forward_features  # noqa: E402
from adaspec_eagle.engine.speculative import HeadDrafter, speculative_generate  # noqa: E402

FORMATS = {"kd": ("vllm", "sglang", "eagle"), "kd-bias": ("vllm", "sglang", "eagle"),
           "e3": ("vllm", "sglang", "eagle3"), "e3-full": ("vllm", "sglang", "eagle3")}


def save_target(model, tokenizer, out: Path) -> None:
    """A GGUF-loaded model cannot be saved by transformers; its dequantized weights in a fresh model can."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return
    config = model.config
    config.architectures = ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, max_shard_size="300MB")
    tokenizer.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))  # what transformers 4 (EAGLE) reads
    cfg.pop("_adaspec_source", None)
    cfg.pop("quantization_config", None)  # the GGUF it was read from; these weights are plain fp32
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    slow_tokenizer_files(tmp)
    if not (tmp / "model.safetensors.index.json").exists():
        raise SystemExit("the target was saved unsharded; EAGLE needs model.safetensors.index.json")
    tmp.rename(out)


def slow_tokenizer_files(folder: Path) -> None:
    """transformers 5 saves tokenizer.json with tokenizer_class "TokenizersBackend", which transformers 4 (EAGLE)
    does not know, and EaModel asks for the slow tokenizer: add GPT-2's vocab.json and merges.txt from the same
    BPE model and name the class (SmolLM2's own is GPT2Tokenizer)."""
    bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def drop_stale_kd(work: Path, kd: Path) -> bool:
    """WORK keeps its heads between runs; when --kd now holds other weights than the cached `kd` head, remove
    that head, its biased copy, their exports and the reference runs, so that they are made again from --kd.
    True when something was removed."""
    cached = work / "heads" / "kd" / "model.safetensors"
    if not cached.exists() or cached.read_bytes() == (kd / "model.safetensors").read_bytes():
        return False
    for name in ("kd", "kd-bias"):
        shutil.rmtree(work / "heads" / name, ignore_errors=True)
        for fmt in FORMATS[name]:
            shutil.rmtree(work / "export" / f"{fmt}-{name}", ignore_errors=True)
    (work / "reference.json").unlink(missing_ok=True)
    return True


def make_heads(target, work: Path, kd: Path, e3: Path | None) -> list[str]:
    """The heads under test that exist (the EAGLE-3 ones only with an EAGLE-3 head to start from)."""
    heads = work / "heads"
    names = [n for n in FORMATS if (heads / n / "config.json").exists()]
    if names == list(FORMATS) or (e3 is None and names == ["kd", "kd-bias"]):
        return names
    heads.mkdir(parents=True, exist_ok=True)
    shutil.copytree(kd, heads / "kd", dirs_exist_ok=True)
    head = load_head(kd, target)
    biased = type(head)(head.config, target.get_input_embeddings(), target.get_output_embeddings(), fc_bias=True)
    state = dict(head.state_dict())
    state["fc.bias"] = 0.05 * torch.randn(head.config.hidden_size, generator=torch.Generator().manual_seed(0))
    biased.load_state_dict(state)
    save_head(biased, heads / "kd-bias", {"data": "the shipped KD head with a random fc bias (engine checks)"},
              target_model=target)
    if e3 is None:
        return ["kd", "kd-bias"]
    shutil.copytree(e3, heads / "e3", dirs_exist_ok=True)
    small = load_head(e3, target)
    vocab = int(target.config.vocab_size)
    full = type(small)(small.config, target.get_input_embeddings(), draft_vocab_size=vocab)
    state = dict(small.state_dict())
    weight = torch.zeros(vocab, small.config.hidden_size)
    weight[small.draft_ids] = small.lm_head.weight.detach()
    state.update({"lm_head.weight": weight, "d2t": torch.zeros(vocab, dtype=torch.int64),
                  "t2d": torch.ones(vocab, dtype=torch.bool)})
    full.load_state_dict(state)
    full.target_layer_ids = small.target_layer_ids
    save_head(full, heads / "e3-full", {"data": "the e3 head over the whole vocabulary (engine checks)"},
              target_model=target)
    return list(FORMATS)


def reference_runs(target, tokenizer, work: Path, names, prompts: int, tokens: int, gamma: int) -> None:
    suite = load_suite("sharegpt", tokenizer, prompts)
    eos = target.generation_config.eos_token_id
    tree = TreeConfig(depth=gamma, topk=1, total_tokens=gamma, shape="chain")
    eagle_tree = {"total_token": 60, "depth": 7, "top_k": 10}  # EaModel's defaults (60 nodes with the root)
    dynamic = TreeConfig(depth=eagle_tree["depth"], topk=eagle_tree["top_k"], total_tokens=eagle_tree["total_token"] - 1)
    ref = {"prompts": suite["prompts"], "max_new_tokens": tokens, "gamma": gamma, "eos_token_id": eos,
           "tree": eagle_tree, "plain": [], "heads": {}}
    for ids in suite["prompts"]:
        with torch.no_grad():
            out = target.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos if isinstance(eos, int) else eos[0])
        ref["plain"].append(out[0, len(ids):].tolist())
    for name in names:
        drafter = HeadDrafter(load_head(work / "heads" / name, target), draft_vocab=None)
        run = {"outputs": [], "drafts": 0, "draft_tokens": 0, "accepted_per_pos": [0] * gamma, "emitted": 0}
        for ids in suite["prompts"]:
            new, stats = speculative_generate(target, ids, drafter, max_new_tokens=tokens, tree=tree,
                                              eos_token_id=eos)
            run["outputs"].append(list(new))
            for length in stats["accepted_lengths"]:
                run["drafts"] += 1
                run["draft_tokens"] += gamma
                for pos in range(length - 1):
                    run["accepted_per_pos"][pos] += 1
            run["emitted"] += sum(stats["accepted_lengths"])
        run["tau"] = run["emitted"] / run["drafts"]
        run["acceptance_per_pos"] = [a / run["drafts"] for a in run["accepted_per_pos"]]
        run["identical_to_plain"] = run["outputs"] == ref["plain"]
        steps = emitted = 0
        for ids, plain in zip(suite["prompts"], ref["plain"]):  # the tree EAGLE's eagenerate uses, for its tau
            new, stats = speculative_generate(target, ids, drafter, max_new_tokens=tokens, tree=dynamic,
                                              eos_token_id=eos)
            steps, emitted = steps + stats["steps"], emitted + sum(stats["accepted_lengths"])
            run["identical_to_plain"] &= list(new) == plain
        run["tree_tau"] = emitted / steps
        ref["heads"][name] = run
        print(f"ours {name}: tau {run['tau']:.3f}, acceptance by position "
              f"{' / '.join(f'{a:.3f}' for a in run['acceptance_per_pos'])}, tau with EAGLE's tree "
              f"{run['tree_tau']:.3f}, identical to plain greedy: "
              f"{run['identical_to_plain']}")
    (work / "reference.json").write_text(json.dumps(ref))


def head_logits(target, work: Path, names, prompt_ids: list[int]) -> None:
    """One teacher-forced step of each head: what an engine's draft forward must reproduce."""
    from safetensors.torch import save_file

    (work / "logits").mkdir(exist_ok=True)
    ids = torch.tensor([prompt_ids[:24]])
    feats = target_forward_features(target, ids, eagle3_layers=True)
    for name in names:
        head = load_head(work / "heads" / name, target)
        source = feats["fused"] if head.uses_fused else feats["features"]
        with torch.no_grad():
            hidden = head(head.project(source[:, :-1]), ids[:, 1:])
            if head.kind == "eagle3":
                logits = head.lm_head(head.norm(hidden))  # over the draft vocabulary
            else:
                logits = head.logits(hidden)
        save_file({"input_ids": ids[:, 1:].contiguous(), "features": source[:, :-1].contiguous().float(),
                   "hidden": hidden.contiguous(), "logits": logits.contiguous()},
                  str(work / "logits" / f"{name}.safetensors"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / ".engines" / "work"))
    p.add_argument("--kd", default=str(ROOT / "heads" / "smollm2-135m-kd"))
    p.add_argument("--e3", default=None, help="a trained EAGLE-3 head folder for SmolLM2-135M (without one, only "
                                               "the EAGLE-1 heads are checked)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=3)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    target, tokenizer = load_model("smollm2-135m")
    save_target(target, tokenizer, work / "target")
    if drop_stale_kd(work, Path(args.kd)):
        print(f"{args.kd} differs from the cached kd head: its heads, exports and reference runs are made again")
    names = make_heads(target, work, Path(args.kd), Path(args.e3) if args.e3 else None)
    for name in names:
        for fmt in FORMATS[name]:
            out = work / "export" / f"{fmt}-{name}"
            if not out.exists():
                export_head(work / "heads" / name, fmt, out)
    path = work / "reference.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if (sorted(done.get("heads", {})) != sorted(names) or len(done.get("prompts", [])) != args.prompts
            or done.get("max_new_tokens") != args.tokens or done.get("gamma") != args.gamma):
        reference_runs(target, tokenizer, work, names, args.prompts, args.tokens, args.gamma)
    head_logits(target, work, names, json.loads((work / "reference.json").read_text())["prompts"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
