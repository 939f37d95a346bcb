"""Head-training and answer-regeneration throughput on this machine, before and after, in one run on the same data.

    OMP_NUM_THREADS=2 python scripts/cpu_speed.py train --samples 32 --steps 10 --out runs/cpu-speed.jsonl
    OMP_NUM_THREADS=2 python scripts/cpu_speed.py regen --prompts 32 --tokens 32 --out runs/cpu-speed.jsonl

train: one slice of ShareGPT (the target's own answers when --answers is given), a KD head trained for --steps
optimizer steps of batch --batch under each setting, tokens/s of the loop (`train.train`) as it reports them:
  online-full-fp32    the target recomputes features every step (no cache), whole-vocabulary loss, fp32
  cached-full-fp32    features cached once (what every epoch and both stages reuse), whole vocabulary, fp32
  cached-8192-fp32    + the token loss over the 8,192 most frequent answer tokens (head.train_vocab_size)
  cached-full-bf16    whole vocabulary, bf16 autocast (train.precision=bf16)
  cached-8192-bf16    both
The cache is built once, outside the timed loops (its cost is printed).
regen: the same prompts answered greedily by the target with data.regen_batch_size 1 and --batch, tokens/s of
each and how many answers are token-for-token the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {  # name: (features, train_vocab_size, precision)
    "online-full-fp32": ("online", 0, "fp32"),
    "cached-full-fp32": ("cached", 0, "fp32"),
    "cached-8192-fp32": ("cached", 8192, "fp32"),
    "cached-full-bf16": ("cached", 0, "bf16"),
    "cached-8192-bf16": ("cached", 8192, "bf16"),
}


def emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def samples_for(tok, n: int, max_length: int, answers: str | None):
    from adaspec_eagle.config import DataConfig
    from adaspec_eagle.data import build_dataset

    cfg = DataConfig(dataset="sharegpt", max_length=max_length, holdout=256, num_samples=n)
    examples = None
    if answers:
        from adaspec_eagle.data.regen import cached_answer_examples

        examples = cached_answer_examples(cfg, tok, answers)
    return list(build_dataset(cfg, tok, "train", examples))[:n]


def cmd_train(a) -> None:
    from adaspec_eagle.config import HeadConfig, LossConfig, OptimConfig, TrainConfig
    from adaspec_eagle.training.features import build_cache, open_cache, pad_batch
    from adaspec_eagle.models.heads import build_head
    from adaspec_eagle.models import load_model
    from adaspec_eagle.training.loop import make_accelerator, train
    from adaspec_eagle.training.head import head_loss, head_valid_mask, restricted_vocab, training_token_counts

    target, tok = load_model(a.target)
    target.requires_grad_(False).eval()
    data = samples_for(tok, a.samples, a.max_length, a.answers)
    counts = training_token_counts(data, target.get_input_embeddings().weight.shape[0])
    pad = tok.pad_token_id or 0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_cache(target, data, Path(tmp) / "features", dtype="fp16", batch_size=a.batch, pad_id=pad,
                    progress=False)
        cache_s = time.perf_counter() - start
        cached = open_cache(Path(tmp) / "features", target, data)
        tokens = sum(len(s["input_ids"]) for s in data)
        emit({"bench": "cpu-speed", "what": "feature cache", "samples": len(data), "tokens": tokens,
              "seconds": round(cache_s, 2), "tokens_per_s": round(tokens / cache_s, 1),
              "threads": torch.get_num_threads()}, a.out)
        for name in a.settings.split(","):
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)  # each setting its own mixed precision
            features, vocab, precision = SETTINGS[name]
            torch.manual_seed(0)
            head_cfg = HeadConfig(train_vocab_size=vocab)
            head = build_head(target, head_cfg)
            ids = restricted_vocab(head, counts, vocab)
            cfg = TrainConfig(batch_size=a.batch, max_steps=a.steps, precision=precision, save_every=10**6,
                              log_every=10**6)

            def loss_fn(model, batch, num_items, ids=ids):
                return head_loss(model, batch, target=target, loss_cfg=LossConfig(kind="kd"), num_items=num_items,
                                 feature_loss_weight=head_cfg.feature_loss_weight,
                                 token_loss_weight=head_cfg.token_loss_weight,
                                 feature_noise=head_cfg.feature_noise, vocab_ids=ids)

            run = train(head, cached if features == "cached" else data, loss_fn,
                        collate=lambda s: pad_batch(s, pad),
                        count_items=lambda b: int(head_valid_mask(b["loss_mask"], b["attention_mask"]).sum()),
                        train_cfg=cfg, optim_cfg=OptimConfig(lr=1e-3), out_dir=Path(tmp) / name,
                        accelerator=make_accelerator(cfg, cpu=True), desc=name, progress=False)
            emit({"bench": "cpu-speed", "what": "head training", "setting": name, "steps": run["steps"],
                  "batch": a.batch, "tokens": run["tokens"], "seconds": round(run["seconds"], 2),
                  "tokens_per_s": round(run["tokens_per_s"], 1), "loss_first": round(run["losses"][0], 4),
                  "loss_last": round(run["losses"][-1], 4), "threads": torch.get_num_threads()}, a.out)


def cmd_regen(a) -> None:
    from adaspec_eagle.config import DataConfig
    from adaspec_eagle.data import load_examples, split_order
    from adaspec_eagle.models import load_model
    from adaspec_eagle.data.regen import regenerate

    target, tok = load_model(a.target)
    cfg = DataConfig(dataset="sharegpt", max_length=a.max_length, holdout=256)
    examples, _ = load_examples(cfg, tok.eos_token or "")
    _, train_idx = split_order(len(examples), cfg.holdout, cfg.seed)
    chosen = train_idx[: a.prompts]
    answers = {}
    for batch in (1, a.batch):
        with tempfile.TemporaryDirectory() as tmp:
            got, stats = regenerate(target, tok, examples, chosen, Path(tmp) / "regen.jsonl", max_length=a.max_length,
                                    batch_size=batch, progress=False, answer_tokens=a.tokens)
        answers[batch] = got
        emit({"bench": "cpu-speed", "what": "regeneration", "regen_batch_size": batch, "prompts": len(chosen),
              "new_tokens": stats["new_tokens"], "seconds": round(stats["seconds"], 2),
              "tokens_per_s": round(stats["tokens_per_s"], 1), "threads": torch.get_num_threads()}, a.out)
    same = sum(answers[1][i] == answers[a.batch].get(i) for i in answers[1])
    emit({"bench": "cpu-speed", "what": "regeneration agreement", "identical_answers": same,
          "answers": len(answers[1]), "batch": a.batch}, a.out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--samples", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--answers", help="a regen.jsonl(.xz): train on the target's own answers")
    t.add_argument("--settings", default=",".join(SETTINGS))
    r = sub.add_parser("regen")
    r.add_argument("--prompts", type=int, default=32)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--max-length", type=int, default=512)
    for q in (t, r):
        q.add_argument("--target", default="smollm2-135m")
        q.add_argument("--out")
    a = p.parse_args()
    {"train": cmd_train, "regen": cmd_regen}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
