"""`adaspec-eagle train-draft-lm`: the paper's standalone-draft pipeline on the shared training loop.

Stages (one command or stage by stage, each written to OUT/<stage> and skipped when already complete):
  target     optional supervised fine-tune of the target on the task (cross-entropy on answer tokens);
  reference  a draft distilled from the (fine-tuned) target with plain KD (forward KL, k = 1);
  draft      the same draft initialisation distilled with AdaSPEC against the reference (OUT/adaspec), or with
             plain KD at the same budget (`--loss kd`, the DistillSpec baseline, OUT/kd).

Alignment: logits at position t predict token t+1; a position counts when token t+1 is a target token
(`loss_mask[:, 1:]`, the AdaSPEC reference code's labels shifted by one). Logits are cut to the vocabulary both models share
(embedding tables may carry different padding rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import (
    DraftLMRecipe,
    LossConfig,
    add_key_flags,
    claim_output_dir,
    key_overrides,
    load_recipe,
    save_resolved,
)
from adaspec_eagle.data import build_dataset, collate
from adaspec_eagle.io import atomic_folder, check_output_folder
from adaspec_eagle.models import (
    check_samples_fit,
    embedding_rows,
    load_model,
    target_identity,
)
from adaspec_eagle.models.draft_lm import init_draft
from adaspec_eagle.training.loop import (
    configure_deepspeed,
    make_accelerator,
    prepare_frozen,
    train,
)
from adaspec_eagle.training.losses import adaspec_loss, top1_hits

STAGES = ("target", "reference", "draft")


def positions(batch: dict) -> torch.Tensor:
    """(B, T-1) bool: logits at t are trained when token t+1 is a real target token."""
    return batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()


def count_items(batch: dict) -> int:
    return int(positions(batch).sum())


def _logits(model, batch: dict, vocab: int) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, :-1, :vocab]  # (B, T-1, V)


def make_loss_fn(stage: str, vocab: int, loss_cfg: LossConfig, target=None, reference=None):
    """loss_fn(model, batch, num_items) -> (loss, stats) for the training loop (see train.train)."""

    def sft(model, batch, num_items):
        pos = positions(batch)  # (B, T-1)
        logits = _logits(model, batch, vocab)  # (B, T-1, V)
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                             reduction="none").view_as(pos)
        n = pos.sum()
        return (ce * pos).sum() / num_items, {"valid": float(n), "kept": float(n)}

    def distill(model, batch, num_items):
        pos = positions(batch)
        with torch.no_grad():
            teacher = _logits(target, batch, vocab)
            ref = _logits(reference, batch, vocab) if reference is not None else None
        student = _logits(model, batch, vocab)
        loss, stats = adaspec_loss(student, teacher, ref, pos, loss_cfg, num_items=num_items)
        return loss, {"valid": stats["valid"], "kept": stats["kept"], "kl_sum": stats["kl"] * stats["valid"]}

    return sft if stage == "target" else distill


@torch.no_grad()
def top1_agreement(draft, target, samples, vocab: int, batch_size: int = 8) -> float:
    """Fraction of held-out target-token positions where the draft's argmax equals the target's."""

    hits = total = 0
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i:i + batch_size], pad_id=0)
        batch = {k: v.to(target.device) for k, v in batch.items()}
        hit, n = top1_hits(_logits(draft, batch, vocab), _logits(target, batch, vocab), positions(batch))
        hits, total = hits + hit, total + n
    return hits / max(total, 1)


def save_model_atomic(model, tokenizer, folder: Path, meta: dict) -> None:
    """save_pretrained through `heads.atomic_folder` (temp folder, fsync, one rename): a crash or a full disk
    leaves the old folder (or none), never a half-written model that looks complete."""

    try:
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "adaspec.json").write_text(json.dumps(meta, indent=2))
    except OSError as e:
        raise AdaspecError(f"could not write the {meta.get('stage')} model to {str(folder)!r}: {e}. Free disk space "
                           "and rerun the same command: finished stages are kept, this one resumes from its last "
                           "checkpoint.") from None


def _stage_done(folder: Path) -> bool:
    return (folder / "adaspec.json").is_file()


def run(cfg: DraftLMRecipe, loss_kind: str = "adaspec", overwrite: bool = False, progress: bool = True) -> dict:
    """Run the configured stages; returns {stage: {"path", "agreement", "steps", "tokens_per_s"}}."""

    out = Path(cfg.output_dir)
    target, tok, train_set, heldout, vocab = _check_inputs(cfg, loss_kind, overwrite)
    acc = make_accelerator(cfg.train)
    configure_deepspeed(acc, cfg.train, cfg.optim)  # a DeepSpeed config at odds with the recipe is refused here
    with claim_output_dir(out, cfg, overwrite=overwrite, command="train-draft-lm"):
        save_resolved(cfg, out)
        stage = _StageTrainer(cfg, acc, tok, train_set, vocab, progress)
        results: dict = {}
        if "target" in cfg.stages:
            target = stage.fine_tune_target(target)
        target = prepare_frozen(acc, target)
        identity = target_identity(target, cfg.target)
        if "reference" in cfg.stages and not _stage_done(out / "reference"):
            results["reference"] = stage.distill("reference", "kd", target, identity)
        if "draft" in cfg.stages and not _stage_done(out / loss_kind):  # adaspec/ or kd/, as train-head names heads
            reference = None
            if loss_kind == "adaspec":
                reference = prepare_frozen(acc, load_model(str(out / "reference"), with_tokenizer=False))
            results[loss_kind] = stage.distill("draft", loss_kind, target, identity, reference)
        summary = {}
        for name in ("reference", "adaspec", "kd"):
            folder = out / name
            if _stage_done(folder):
                model = load_model(str(folder), with_tokenizer=False)
                agree = top1_agreement(model, target, heldout, vocab) if heldout else None
                summary[name] = {"path": str(folder), "agreement": agree,
                                 "steps": results.get(name, {}).get("steps"),
                                 "tokens_per_s": results.get(name, {}).get("tokens_per_s")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _check_inputs(cfg: DraftLMRecipe, loss_kind: str, overwrite: bool):
    """Everything that can fail, before anything is written: -> (target, tokenizer, train, heldout, vocab)."""

    out = Path(cfg.output_dir)
    check_output_folder(out, replace=overwrite)  # before the models load; claimed once all else is checked
    target, tok = load_model(cfg.target)
    train_set = build_dataset(cfg.data, tok, "train")
    heldout = build_dataset(cfg.data, tok, "heldout") if cfg.data.holdout else []
    probe = init_draft(cfg.draft, target, tok)
    check_samples_fit([*train_set, *heldout], target, f"target {cfg.target}")
    check_samples_fit([*train_set, *heldout], probe, f"draft {cfg.draft}")
    vocab = min(embedding_rows(target), embedding_rows(probe))
    if ("draft" in cfg.stages and loss_kind == "adaspec" and "reference" not in cfg.stages
            and not _stage_done(out / "reference")):
        raise AdaspecError(f"stage draft needs a reference LM in {out / 'reference'}; run the reference stage "
                           "first (stages=[reference, draft]).")
    return target, tok, train_set, heldout, vocab


class _StageTrainer:
    """Trains one stage of a draft-LM run and saves its model (OUT/<name>, atomically)."""

    def __init__(self, cfg: DraftLMRecipe, acc, tok, train_set, vocab: int, progress: bool):
        self.cfg, self.acc, self.tok, self.train_set, self.vocab, self.progress = (cfg, acc, tok, train_set, vocab,
                                                                                   progress)
        self.out = Path(cfg.output_dir)

    def _train(self, stage: str, model, loss_fn, name: str) -> dict:
        cfg = self.cfg
        epochs = {"target": cfg.target_epochs, "reference": cfg.reference_epochs, "draft": cfg.draft_epochs}[stage]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        return train(model, self.train_set, loss_fn, collate=lambda s: collate(s, pad), count_items=count_items,
                     train_cfg=dataclasses.replace(cfg.train, epochs=epochs or cfg.train.epochs),
                     optim_cfg=cfg.optim, out_dir=self.out / ".work" / name, accelerator=self.acc, desc=name,
                     progress=self.progress)

    def fine_tune_target(self, target):
        """The target fine-tuned on the task (OUT/target; skipped when already complete), loaded back."""
        folder = self.out / "target"
        if not _stage_done(folder):
            target.train().requires_grad_(True)
            record = self._train("target", target, make_loss_fn("target", self.vocab, self.cfg.loss), "target")
            target = record["model"].eval().requires_grad_(False)
            save_model_atomic(target, self.tok, folder, {"stage": "target", "base": self.cfg.target,
                                                         "steps": record["steps"]})
        return load_model(str(folder))[0]

    def distill(self, stage: str, loss_kind: str, target, identity: dict, reference=None) -> dict:
        """A draft from the recipe's initialisation distilled from the target: the reference (KD) or the draft
        stage (AdaSPEC against `reference`, or KD), saved to OUT/reference, OUT/adaspec or OUT/kd."""

        name = "reference" if stage == "reference" else loss_kind
        draft = init_draft(self.cfg.draft, target, self.tok).train()
        lcfg = dataclasses.replace(self.cfg.loss, kind=loss_kind)
        record = self._train(stage, draft, make_loss_fn(stage, self.vocab, lcfg, target, reference), name)
        meta = {"stage": name, "loss": loss_kind, "target": identity, "steps": record["steps"],
                "tokens_per_s": record["tokens_per_s"]}
        if stage == "draft":
            meta["k"] = self.cfg.loss.k
        save_model_atomic(record["model"], self.tok, self.out / name, meta)
        return record


# Shortcut flags for recipe keys (help and choices from the keys' own fields)
RECIPE_FLAGS = {"--target": "target", "--draft": "draft", "--stages": "stages", "--loss": "loss.kind",
                "--output-dir": "output_dir"}


def cmd_train_draft_lm(args) -> int:
    overrides = list(args.overrides) + key_overrides(args, DraftLMRecipe, RECIPE_FLAGS)
    cfg = load_recipe(DraftLMRecipe, args.recipe, overrides)
    summary = run(cfg, loss_kind=cfg.loss.kind, overwrite=args.overwrite)
    print(f"\nheld-out top-1 agreement with the target ({cfg.data.dataset}):")
    for name, row in summary.items():
        agree = "n/a" if row["agreement"] is None else f"{100 * row['agreement']:.1f}%"
        print(f"  {name:<10} {agree:>7}  {row['path']}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("train-draft-lm", help="target fine-tune -> reference LM (KD) -> AdaSPEC draft LM",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe (recipes/draft-lm/*.yaml)")
    add_key_flags(p, DraftLMRecipe, RECIPE_FLAGS)
    p.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds another run")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. loss.k=0.3 train.max_steps=10")
    p.set_defaults(func=cmd_train_draft_lm)
