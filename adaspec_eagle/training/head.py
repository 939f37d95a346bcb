"""`adaspec-eagle train-head`: EAGLE-style draft heads on a frozen target, trained in two stages.

Stage `reference` trains a head with plain KD (forward KL to the target) into OUT/reference; stage `draft` trains
a head from the same initialisation with the AdaSPEC loss against that reference into OUT/adaspec (or, with
`--loss kd`, plain KD into OUT/kd: the DistillSpec baseline at the same budget). Owns the head loss (EAGLE-1
alignment below), `evaluate_head` (held-out top-1 agreement with the target) and the pipeline's checks.

EAGLE-1 alignment. For tokens x_0..x_{T-1} with target features f_0..f_{T-1} (last hidden state after the final
norm), head position t = 0..T-2 reads (f_t, x_{t+1}) and outputs h_t, which regresses f_{t+1}; its logits
lm_head(h_t) predict x_{t+2}; the teacher is softmax(lm_head(f_{t+1})), the target's own distribution for x_{t+2}.
`loss_mask` is token-aligned (loss_mask[s]: x_s is a trainable, e.g. assistant, token), so position t counts iff
loss_mask[t+2] (and x_{t+2} is not padding); the last position T-2 never counts (x_T is not in the sample).
Loss = losses.chunked_adaspec_loss over the valid positions (student, teacher and reference logits formed chunk
by chunk from hidden states and the target's lm_head) + head.feature_loss_weight * smooth-L1(h_t, f_{t+1}).
With head.unroll_steps = n > 1 the EAGLE-1 head is also trained as it drafts (a training-time test, as HASS does
for EAGLE-2 heads): `TTTUnroll` feeds step j its own step j-1 outputs, step j at t predicts x_{t+2+j} and
regresses f_{t+1+j}, and step j's loss is weighted ttt_decay**j.

EAGLE-3 (head.kind=eagle3): hidden_in = fc(fused target layers); a `ttt_steps` training-time-test unroll in which
step j feeds the head its own step j-1 outputs with the tokens shifted by j (`TTTUnroll`, masks by `ttt_mask`),
loss weighted ttt_decay**j, over the draft vocabulary (d2t/t2d from the trainable-token counts of the training
data); no feature loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import DynamicCache

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import (
    HeadRecipe,
    LossConfig,
    add_key_flags,
    from_dict,
    key_overrides,
    load_recipe,
    save_resolved,
    to_dict,
)
from adaspec_eagle.data import build_dataset
from adaspec_eagle.data.regen import CACHE_NAME, self_distill_examples
from adaspec_eagle.engine.speculative import DEFAULT_DRAFT_VOCAB
from adaspec_eagle.io import (
    atomic_write,
    check_output_folder,
    disk_full,
    mark_output_folder,
    output_lock,
)
from adaspec_eagle.models import (
    check_samples_fit,
    embedding_rows,
    load_model,
    target_forward_features,
    target_identity,
)
from adaspec_eagle.models.heads import (
    build_head,
    check_head_folder,
    frequent_ids,
    load_head,
    save_head,
)
from adaspec_eagle.training.features import (
    build_cache,
    cache_problem,
    open_cache,
    pad_batch,
)
from adaspec_eagle.training.loop import (
    configure_deepspeed,
    latest_checkpoint,
    make_accelerator,
    prepare_frozen,
    train,
)
from adaspec_eagle.training.losses import adaspec_loss, chunked_adaspec_loss, top1_hits

STAGE_DIRS = {"reference": "reference", "adaspec": "adaspec", "kd": "kd"}


def load_target(name: str, precision: str = "fp32"):
    """(model, tokenizer) of a registry name / path / hub id / tiny-FAMILY name, frozen, in the training
    precision (the target only runs forward)."""

    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    model, tok = load_model(name, dtype=dtype)
    return model.requires_grad_(False).eval(), tok


# ----------------------------------------------------------------------------------------------------------
# The head loss


def head_valid_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
    """(B, T) token-aligned masks -> (B, T-1) head positions t whose prediction target x_{t+2+step} is trainable
    (step > 0: EAGLE-3 unroll step `step`)."""
    keep = loss_mask.bool() if attention_mask is None else loss_mask.bool() & attention_mask.bool()
    valid = torch.zeros_like(keep[:, 1:])  # (B, T-1)
    if keep.shape[1] > 2 + step:
        valid[:, :keep.shape[1] - 2 - step] = keep[:, 2 + step:]
    return valid


def ahead(x: torch.Tensor, k: int, n: int, fill=0) -> torch.Tensor:
    """x[:, t + k] for t = 0..n-1: x (B, T, ...) read k places on, `fill` past its end -> (B, n, ...). The one
    alignment of head position t with the token / feature / label j places later."""
    out = x[:, k:k + n]
    missing = n - out.shape[1]
    return F.pad(out, (0, 0) * (x.dim() - 2) + (0, missing), value=fill) if missing else out


def batch_features(batch: dict, target=None) -> torch.Tensor:
    """(B, T, H) target features: cached in the batch, or computed now by the frozen target (online mode)."""
    if "features" in batch:
        return batch["features"]

    with torch.no_grad():
        return target_forward_features(target, batch["input_ids"], batch["attention_mask"].long())["features"]


def head_forward(head, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """EAGLE-1 teacher-forced pass: (f_t, x_{t+1}) for t = 0..T-2 -> h_t (B, T-1, H)."""
    B, T = input_ids.shape
    position_ids = torch.arange(T - 1, device=input_ids.device).expand(B, -1)  # (B, T-1)
    return head(features[:, :-1], input_ids[:, 1:], position_ids)


def _lm_head_spec(lm_head, hidden: torch.Tensor) -> tuple:
    """(hidden (N, H), weight (V, H)[, bias (V,)]) for `losses.chunked_adaspec_loss`, in the lm_head's dtype."""
    w = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    return (hidden.to(w.dtype), w) if bias is None else (hidden.to(w.dtype), w, bias)


def _is_partitioned(module) -> bool:
    """True when DeepSpeed ZeRO-3 holds the module's weight as a shard (its params carry `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def restricted_vocab(head, token_counts, size: int) -> torch.Tensor | None:
    """(Vd,) int64 target ids of a restricted training vocabulary: the `size` most frequent trainable tokens
    plus the EOS / BOS / PAD ids, exactly the ids `speculative.HeadDrafter(draft_vocab=size)` drafts over.
    None when `size` is 0 or covers the whole vocabulary."""

    counts = torch.as_tensor(token_counts)
    if size <= 0 or size >= counts.numel():
        return None
    return frequent_ids(head.config, counts, size)


def add_feature_noise(features: torch.Tensor, width: float) -> torch.Tensor:
    """features + U(-width/2, width/2) noise (EAGLE-1's training noise at a fixed width); unchanged at 0."""
    if width <= 0:
        return features
    return features + (torch.rand_like(features) - 0.5) * width


def _in_vocab(batch, valid, vocab_ids, vocab: int, n: int, device, step: int = 0) -> torch.Tensor:
    """(N,) the valid positions whose target token x_{t+2+step} is one of `vocab_ids` (all of them when None)."""
    if vocab_ids is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    labels = ahead(batch["input_ids"], 2 + step, valid.shape[1])[valid]  # (N,) x_{t+2+step}
    member = torch.zeros(vocab, dtype=torch.bool, device=device)
    member[vocab_ids] = True
    return member[labels]


def _sharded_token_loss(head, lm_head, h_v, f_next, ref_h, in_vocab, loss_cfg: LossConfig, num_items):
    """ZeRO-3: the lm_head weight is a shard; calling the module gathers it (its hooks run), raw weights would
    not. This path holds the [N, V] logits (chunked selection and backward all the same)."""

    dtype = lm_head.weight.dtype  # (DeepSpeed's ZeRO-3 linear does not autocast)
    with torch.no_grad():
        teacher = lm_head(f_next.to(dtype))[None]  # (1, N, V)
        ref = lm_head(ref_h.to(dtype))[None] if ref_h is not None else None
    student = getattr(head, "module", head).logits(h_v[None])  # (1, N, V); .module: a DDP/DeepSpeed wrapper
    return adaspec_loss(student, teacher, ref, in_vocab[None], loss_cfg, num_items=num_items, return_kept=True)


def _feature_loss(h_v, f_next, kept, loss_cfg: LossConfig, num_items) -> torch.Tensor:
    """Smooth-L1 of the head's output against the next target feature, at the `kept` positions, normalised as
    the token loss is."""
    per_pos = F.smooth_l1_loss(h_v.float(), f_next, reduction="none").mean(-1)  # (N,)
    denom = (num_items or per_pos.shape[0]) if loss_cfg.reduction == "num_items" else max(int(kept.sum()), 1)
    return (per_pos * kept).sum() / denom


def head_loss(head, batch: dict, *, target, loss_cfg: LossConfig, reference=None, feature_loss_weight: float = 0.0,
              num_items: float | None = None, token_loss_weight: float = 1.0, feature_noise: float = 0.0,
              vocab_ids: torch.Tensor | None = None, exclude_out_of_vocab: bool = True, unroll_steps: int = 1,
              unroll_decay: float = 1.0, feature_positions: str = "kept"):
    """token_loss_weight x AdaSPEC (or KD) loss of an EAGLE-1 head on a batch + feature_loss_weight x smooth-L1.

    batch: input_ids / attention_mask / loss_mask (B, T) and optionally cached features (B, T, H).
    Student, teacher and reference logits are lm_head(hidden) at the N valid positions only, evaluated chunkwise
    by `losses.chunked_adaspec_loss` (never an [N, V] fp32 tensor for all three at once).
    feature_noise: width of the uniform noise on the input features (student and reference read the same
    noisy input; the teacher and the regression target stay clean). vocab_ids (Vd,): the token loss over these
    target ids only (lm_head rows; the teacher renormalised over them), and with `exclude_out_of_vocab` only at
    positions whose target token x_{t+2} is one of them. The feature loss covers every valid position for KD;
    for AdaSPEC the positions its selection keeps (feature_positions 'kept') or every valid one ('all').
    unroll_steps > 1: `head` is a `TTTUnroll` of the head (the model the loop trains); step j (at t: the head's
    own step j-1 output and x_{t+1+j}) is scored as step 0 is, against x_{t+2+j} and f_{t+1+j}, weighted
    unroll_decay**j; num_items counts step-0 positions. The reference runs the same unroll.
    Returns (loss, stats) with stats {"kept", "valid", "kl_sum"} (floats, summed over steps, for the loop's logs)."""

    features = batch_features(batch, target).float()  # (B, T, H)
    inputs = add_feature_noise(features, feature_noise) if torch.is_grad_enabled() else features
    ids = batch["input_ids"]
    student = getattr(head, "module", head)  # .module: a DDP/DeepSpeed wrapper
    if unroll_steps > 1 and not isinstance(student, TTTUnroll):
        raise AdaspecError(f"head_loss with unroll_steps={unroll_steps} needs the head wrapped in TTTUnroll (the "
                           "model the loop trains), got a bare head.")
    outs = head(inputs, ids, unroll_steps) if unroll_steps > 1 else [head_forward(head, inputs, ids)]
    student = student.head if isinstance(student, TTTUnroll) else student
    ref_outs = None
    if reference is not None and loss_cfg.kind == "adaspec":
        with torch.no_grad():
            ref_outs = TTTUnroll(reference)(inputs, ids, unroll_steps) if unroll_steps > 1 else \
                [head_forward(reference, inputs, ids)]
    lm_head = target.get_output_embeddings()
    if vocab_ids is not None:
        vocab_ids = vocab_ids.to(features.device)
    loss, stats = 0.0, {"kept": 0.0, "valid": 0.0, "kl_sum": 0.0}
    for j, hidden in enumerate(outs):
        valid = head_valid_mask(batch["loss_mask"], batch.get("attention_mask"), j)  # (B, T-1)
        f_next = ahead(features, 1 + j, hidden.shape[1])[valid]  # (N, H) f_{t+1+j}
        ref_h = ref_outs[j][valid] if ref_outs is not None else None
        in_vocab = _in_vocab(batch, valid, vocab_ids if exclude_out_of_vocab else None, lm_head.weight.shape[0],
                             f_next.shape[0], f_next.device, j)  # (N,)
        step_loss, step_stats = _head_step_loss(student, lm_head, hidden[valid], f_next, ref_h, in_vocab, vocab_ids,
                                                loss_cfg, num_items, token_loss_weight, feature_loss_weight,
                                                feature_positions)
        loss = loss + unroll_decay ** j * step_loss
        for key in stats:
            stats[key] += step_stats[key]
    loss = loss + 0.0 * sum(h.sum() for h in outs)  # keeps every rank's graph connected when nothing is valid
    return loss, stats


def _head_step_loss(head, lm_head, h_v, f_next, ref_h, in_vocab, vocab_ids, loss_cfg: LossConfig, num_items,
                    token_loss_weight: float, feature_loss_weight: float, feature_positions: str):
    """One unroll step of `head_loss` at its N valid positions: h_v, f_next, ref_h (N, H) (ref_h None: KD)."""
    if _is_partitioned(lm_head):
        if vocab_ids is not None:
            raise AdaspecError("head.train_vocab_size under DeepSpeed ZeRO-3 is not supported (the lm_head weight "
                               "is a shard); set head.train_vocab_size=0 or use a DDP / ZeRO-2 config.")
        loss, stats = _sharded_token_loss(head, lm_head, h_v, f_next, ref_h, in_vocab, loss_cfg, num_items)
        kept_rows = stats.pop("kept_index")[1]  # (1, N) logits: the time index is the row
    else:
        w = lm_head.weight if vocab_ids is None else lm_head.weight[vocab_ids]  # (V or Vd, H)
        b = getattr(lm_head, "bias", None)
        b = b if b is None or vocab_ids is None else b[vocab_ids]
        spec = (lambda h: (h.to(w.dtype), w) if b is None else (h.to(w.dtype), w, b))
        ref = spec(ref_h) if ref_h is not None else None
        loss, stats = chunked_adaspec_loss(h_v.to(w.dtype), w, spec(f_next), ref, in_vocab, loss_cfg,
                                           num_items=num_items, student_bias=b, return_kept=True)
        kept_rows = stats.pop("kept_index")
    kept = torch.zeros_like(in_vocab)
    kept[kept_rows] = True
    loss = token_loss_weight * loss
    if feature_loss_weight > 0 and h_v.shape[0] > 0:
        if loss_cfg.kind == "kd" or feature_positions == "all":  # every position's feature, in the vocab or not
            kept = torch.ones_like(in_vocab)
        loss = loss + feature_loss_weight * _feature_loss(h_v, f_next, kept, loss_cfg, num_items)
    return loss, {"kept": float(stats["kept"]), "valid": float(stats["valid"]),
                  "kl_sum": float(stats["kl"]) * float(stats["valid"])}


# ----------------------------------------------------------------------------------------------------------
# EAGLE-3: training-time test


def ttt_mask(length: int, step: int, device=None) -> torch.Tensor:
    """(1, 1, T, (step+1) T) bool attention mask of unroll step `step` over the cached keys of steps 0..step.

    Query t of step j stands for draft position t+j of the chain that leaves the real prefix at t: it sees the
    step-0 keys of the real prefix 0..t (causal) and, of every later step i = 1..j, only its own key t (the
    diagonal): the tokens it drafted itself."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # (T, T)
    diag = torch.eye(length, dtype=torch.bool, device=device)  # (T, T)
    return torch.cat([causal] + [diag] * step, dim=-1)[None, None]


class TTTUnroll(torch.nn.Module):
    """Wraps a head so the whole unroll is one forward (one DDP/FSDP forward per micro-batch): an EAGLE-3 head's
    training-time test, an EAGLE-1 head's with head.unroll_steps > 1, and every head's held-out chains.

    forward(fused (B, T, 3H) or features (B, T, H), input_ids (B, T), steps) -> [h^0, ..., h^{steps-1}] each
    (B, T-1, H), where step j at index t reads (h^{j-1}_t, x_{t+1+j}) (h^{-1} = head.project(...)_t: fc(fused_t)
    for EAGLE-3, f_t for EAGLE-1) at position t+j and predicts x_{t+2+j}."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, fused, input_ids, steps: int):
        B, T = input_ids.shape
        n = T - 1
        hidden = self.head.project(fused[:, :-1])  # (B, n, H)
        cache, outs = DynamicCache(), []
        for j in range(steps):
            ids = ahead(input_ids, 1 + j, n)  # (B, n) x_{t+1+j}, 0-padded
            pos = (torch.arange(n, device=input_ids.device) + j).expand(B, -1)  # (B, n)
            mask = None if j == 0 else ttt_mask(n, j, input_ids.device)
            hidden = self.head(hidden, ids, pos, attention_mask=mask, cache=cache)  # (B, n, H)
            outs.append(hidden)
        return outs


def batch_fused(batch: dict, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, T, H), fused (B, T, 3H)): cached in the batch or computed now by the frozen target."""
    if "fused" in batch:
        return batch["features"], batch["fused"]

    with torch.no_grad():
        out = target_forward_features(target, batch["input_ids"], batch["attention_mask"].long(), eagle3_layers=True)
    return out["features"], out["fused"]


def eagle3_loss(unroll, batch: dict, *, target, loss_cfg: LossConfig, steps: int, decay: float, reference=None,
                num_items: float | None = None, exclude_out_of_vocab: bool = True):
    """sum_j decay^j * AdaSPEC/KD loss of unroll step j, over the draft vocabulary.

    The teacher is the target's distribution restricted to the draft vocabulary and renormalised (lm_head rows
    of the draft ids, as EAGLE-3 does); no feature loss. With `exclude_out_of_vocab`, positions whose target
    token x_{t+2+j} is outside the draft vocabulary are left out (EAGLE-3's position mask). num_items counts
    step-0 positions."""

    head = getattr(unroll, "module", unroll).head
    features, fused = batch_fused(batch, target)
    features, fused = features.float(), fused.float()
    lm_head = target.get_output_embeddings()
    ids = head.draft_ids
    w_t = lm_head.weight[ids]  # (V_d, H) the teacher restricted to the draft vocabulary
    b_t = lm_head.bias[ids] if getattr(lm_head, "bias", None) is not None else None
    outs = unroll(fused, batch["input_ids"], steps)
    ref_outs = None
    if reference is not None and loss_cfg.kind == "adaspec":
        with torch.no_grad():
            ref_outs = TTTUnroll(reference)(fused, batch["input_ids"], steps)
    total, stats_sum = 0.0, {"kept": 0.0, "valid": 0.0, "kl_sum": 0.0}
    for j, h in enumerate(outs):
        valid = head_valid_mask(batch["loss_mask"], batch.get("attention_mask"), j)  # (B, T-1)
        f_next = ahead(features, 1 + j, h.shape[1])[valid]  # (N_j, H) f_{t+1+j}
        f_next = f_next.to(w_t.dtype)
        teacher = (f_next, w_t) if b_t is None else (f_next, w_t, b_t)
        ref = None
        if ref_outs is not None:
            w_r = reference.lm_head.weight
            ref = (reference.norm(ref_outs[j][valid]).to(w_r.dtype), w_r)
        keep = torch.ones(f_next.shape[0], dtype=torch.bool, device=h.device)  # (N_j,)
        if exclude_out_of_vocab:
            labels = ahead(batch["input_ids"], 2 + j, h.shape[1])  # x_{t+2+j}
            keep = head.t2d.to(h.device)[labels[valid]]
        w_s = head.lm_head.weight
        loss, stats = chunked_adaspec_loss(head.norm(h[valid]).to(w_s.dtype), w_s, teacher, ref, keep, loss_cfg,
                                           num_items=num_items)
        total = total + decay ** j * loss
        for key, value in (("kept", stats["kept"]), ("valid", stats["valid"]),
                           ("kl_sum", stats["kl"] * stats["valid"])):
            stats_sum[key] += float(value)
    total = total + 0.0 * sum(h.sum() for h in outs)
    return total, stats_sum


def _argmax_rows(hidden: torch.Tensor, lm_head, ids=None, chunk: int = 1024) -> torch.Tensor:
    """(N, H) -> (N,) the target ids of argmax lm_head(hidden) over `ids` (all when None), in chunks of rows.
    A ZeRO-3 partitioned lm_head is called as a module (its hooks gather the weight)."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    sharded = _is_partitioned(lm_head)
    w = weight if ids is None or sharded else weight[ids]
    b = bias if bias is None or ids is None or sharded else bias[ids]
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start:start + chunk].to(weight.dtype)
        if sharded:
            logits = lm_head(rows)
            logits = logits if ids is None else logits[:, ids]
        else:
            logits = F.linear(rows, w, b)  # (c, V or Vd)
        best = logits.argmax(-1)
        out[start:start + chunk] = best if ids is None else ids[best]
    return out


def chain_acceptance(draft: torch.Tensor, greedy: torch.Tensor, input_ids: torch.Tensor, start: torch.Tensor,
                     attention_mask: torch.Tensor | None = None):
    """Accepted draft tokens of greedy chains (teacher-forced, EAGLE decoding semantics).

    draft: (gamma, B, T-1) the head's chain token at step j from head position t (a guess for x_{t+2+j});
    greedy: (B, T) the target's argmax after each prefix (greedy[:, s] is its next token after x_0..x_s);
    input_ids: (B, T); start: (B, T-1) bool, the head positions where a chain starts; attention_mask (B, T):
    padding never counts as text the target followed.
    A chain from t starts where x_{t+1} is the target's own token (greedy[t]); step j is accepted when every
    earlier step was, the text followed the target there (x_{t+1+j} == greedy[t+j]) and draft j equals
    greedy[t+1+j]. Positions whose chain runs past T count as rejected there.
    Returns (accepted (gamma, B, T-1) bool, alive (gamma, B, T-1) bool: step j was reached)."""
    gamma, _, n = draft.shape
    alive = start.clone()
    accepted, reached = [], []
    for j in range(gamma):
        on_path = ahead(input_ids, 1 + j, n, -1) == ahead(greedy, j, n, -1)  # x_{t+1+j} is the target's token
        if attention_mask is not None:
            on_path = on_path & (ahead(attention_mask.long(), 1 + j, n, -1) == 1)
        alive = alive & on_path
        reached.append(alive)
        ok = alive & (draft[j] == ahead(greedy, 1 + j, n, -1)) & (ahead(greedy, 1 + j, n, -1) >= 0)
        accepted.append(ok)
        alive = ok
    return torch.stack(accepted), torch.stack(reached)


def _batch_chains(head, steps, features, batch, valid, lm_head, ids):
    """(accepted, reached, greedy) of greedy chains drafted from every valid position of one batch
    (`chain_acceptance`): step j's draft is the head's argmax (over `ids` when given) on its own j-th unrolled
    output; greedy (B, T) the target's argmax after each prefix (-1 at padding)."""
    B, T = batch["input_ids"].shape
    device = features.device
    real = batch["attention_mask"].bool()  # (B, T)
    greedy = torch.full((B, T), -1, dtype=torch.long, device=device)
    greedy[real] = _argmax_rows(features[real], lm_head)
    draft = torch.full((len(steps), B, T - 1), -2, dtype=torch.long, device=device)
    for j, h in enumerate(steps):
        if getattr(head, "uses_fused", False):
            logits = head.logits(h[valid][None])[0]  # (N, V): -inf outside the draft vocabulary
            draft[j][valid] = logits.argmax(-1) if ids is None else ids[logits[:, ids].argmax(-1)]
        else:
            draft[j][valid] = _argmax_rows(h[valid], lm_head, ids)
    return (*chain_acceptance(draft, greedy, batch["input_ids"], valid, batch["attention_mask"]), greedy)


def _heldout_batches(head, target, heldout, batch_size: int, pad_id: int, chain: int):
    """Per held-out batch with a valid position: (batch, valid (B, T-1), unrolled head outputs, target features
    (B, T, H), student logits (N, V), teacher logits (N, V)) at the N valid positions, in a fixed order (the
    samples' order, each sample's positions left to right)."""
    device = next(target.parameters()).device
    head.eval()
    lm_head = target.get_output_embeddings()
    for start in range(0, len(heldout), batch_size):
        batch = pad_batch([heldout[i] for i in range(start, min(len(heldout), start + batch_size))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        valid = head_valid_mask(batch["loss_mask"], batch["attention_mask"])  # (B, T-1)
        if not valid.any():
            continue
        if getattr(head, "uses_fused", False):  # EAGLE-3: the first unroll step
            features, fused = (x.float() for x in batch_fused(batch, target))
        else:
            features = batch_features(batch, target).float()  # (B, T, H)
            fused = features
        steps = TTTUnroll(head)(fused, batch["input_ids"], max(chain, 1))  # [(B, T-1, H)] * steps
        student = head.logits(steps[0][valid][None])[0].float()  # (N, V)
        teacher = lm_head(features[:, 1:][valid].to(lm_head.weight.dtype)).float()  # (N, V)
        yield batch, valid, steps, features, student, teacher


def _forward_kl_rows(head, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(N,) KL(target || head) per position; an EAGLE-3 head's over its draft vocabulary (the teacher
    renormalised on it)."""
    if getattr(head, "uses_fused", False):
        teacher, student = teacher[:, head.draft_ids], student[:, head.draft_ids]
    log_p = teacher.log_softmax(-1)
    return (log_p.exp() * (log_p - student.log_softmax(-1))).sum(-1)


@torch.no_grad()
def evaluate_head(head, target, heldout, batch_size: int = 8, pad_id: int = 0, chain: int = 0,
                  vocab_ids: torch.Tensor | None = None) -> dict:
    """Held-out agreement of a head with its target at the valid (loss) positions.

    heldout: samples {"input_ids", "loss_mask"[, "features"]} (a list or a FeatureCache).
    Returns {"top1": fraction where argmax(head logits) == argmax(target logits), "kl": mean forward
    KL(target || head), "positions": N}. chain = gamma > 0 adds "chain": greedy chain drafting of gamma tokens from
    every valid position (`chain_acceptance`; the head reads its own outputs from step 1 on, as when drafting,
    through the training-time-test unroll), {"gamma", "tau": 1 + mean accepted tokens per chain (the mean
    accepted length of chain speculation), "accept_by_depth": P(step j accepted | step j reached), "chains"};
    drafts rank over `vocab_ids` (the drafter's restricted vocabulary) when given."""

    lm_head = target.get_output_embeddings()
    hits, kl_sum, total = 0, 0.0, 0
    acc_sum = torch.zeros(max(chain, 1), dtype=torch.float64)
    reach_sum = torch.zeros(max(chain, 1), dtype=torch.float64)
    ids = None if vocab_ids is None else vocab_ids.to(lm_head.weight.device)
    for batch, valid, steps, features, student, teacher in _heldout_batches(head, target, heldout, batch_size,
                                                                            pad_id, chain):
        hits += top1_hits(student, teacher)[0]
        kl_sum += float(_forward_kl_rows(head, student, teacher).sum())
        total += int(valid.sum())
        if chain:
            accepted, reached, _ = _batch_chains(head, steps, features, batch, valid, lm_head, ids)
            acc_sum += accepted.sum((1, 2)).double().cpu()
            reach_sum += reached.sum((1, 2)).double().cpu()
    out = {"top1": hits / max(total, 1), "kl": kl_sum / max(total, 1), "positions": total}
    if chain:
        chains = float(reach_sum[0])
        out["chain"] = {"gamma": chain, "tau": 1.0 + float(acc_sum.sum()) / max(chains, 1.0),
                        "accept_by_depth": [float(a / r) if r else 0.0 for a, r in zip(acc_sum, reach_sum)],
                        "chains": int(chains)}
    return out


@torch.no_grad()
def position_records(head, target, heldout, batch_size: int = 8, pad_id: int = 0, chain: int = 0,
                     vocab_ids: torch.Tensor | None = None) -> dict:
    """Per valid held-out position (the order of `evaluate_head`, so two heads' records align position by
    position): {"token": (N,) the target's argmax, "hit": (N,) bool, the head's argmax equals it (top-1),
    "kl": (N,) KL(target || head), "confidence": (N,) the target's probability of its argmax}. For per-token
    comparisons of heads (which tokens one head gets right and another not).

    chain = gamma > 0 adds the greedy chain from every position, as `evaluate_head` drafts it (over `vocab_ids`
    when given): "reached" and "accepted" (gamma, N) bool, step j was reached / accepted (their sums over
    positions are `evaluate_head`'s acceptance by depth), and "chain_token" (gamma, N) the target's token step j
    had to draft (-1 past the sample's end)."""
    keys = ["token", "hit", "kl", "confidence"] + (["reached", "accepted", "chain_token"] if chain else [])
    parts: dict[str, list] = {k: [] for k in keys}
    lm_head = target.get_output_embeddings()
    ids = None if vocab_ids is None else vocab_ids.to(lm_head.weight.device)
    for batch, valid, steps, features, student, teacher in _heldout_batches(head, target, heldout, batch_size,
                                                                            pad_id, chain):
        best = teacher.argmax(-1)
        parts["token"].append(best.cpu())
        parts["hit"].append((student.argmax(-1) == best).cpu())
        parts["kl"].append(_forward_kl_rows(head, student, teacher).cpu())
        parts["confidence"].append(teacher.softmax(-1).gather(-1, best[:, None])[:, 0].cpu())
        if chain:
            accepted, reached, greedy = _batch_chains(head, steps, features, batch, valid, lm_head, ids)
            n = valid.shape[1]
            parts["reached"].append(reached[:, valid].cpu())
            parts["accepted"].append(accepted[:, valid].cpu())
            parts["chain_token"].append(torch.stack([ahead(greedy, 1 + j, n, -1)[valid]
                                                     for j in range(chain)]).cpu())
    return {k: torch.cat(v, -1) if v else torch.empty(0) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def load_samples(cfg: HeadRecipe, tokenizer, target=None, accelerator=None, fresh: bool = False,
                 progress: bool = True, log=print):
    """(train, heldout) lists of {"input_ids", "loss_mask"} from the recipe's data section.

    data.self_distill: both splits carry the target's greedy answers (regen.py; the main process generates
    them into OUT/regen.jsonl, resumable; `fresh` starts that cache over). The held-out answers are regenerated
    too, so held-out agreement is measured on the target's own outputs, as acceptance is."""

    examples = None
    if cfg.data.self_distill:

        main = accelerator is None or accelerator.is_main_process
        kw = dict(batch_size=cfg.data.regen_batch_size, log=log)
        if main:
            examples = self_distill_examples(cfg.data, tokenizer, target, Path(cfg.output_dir) / CACHE_NAME,
                                             progress=progress, fresh=fresh, **kw)
        if accelerator is not None and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()
            if not main:  # every answer is in the cache now
                examples = self_distill_examples(cfg.data, tokenizer, target, Path(cfg.output_dir) / CACHE_NAME,
                                                 progress=False, **kw)
    train = build_dataset(cfg.data, tokenizer, "train", examples)
    heldout = build_dataset(cfg.data, tokenizer, "heldout", examples) if cfg.data.holdout > 0 else []
    return train, heldout


def training_token_counts(samples, vocab: int) -> torch.Tensor:
    """(vocab,) int64 counts of the loss-masked (assistant) target tokens of `samples`."""
    counts = torch.zeros(vocab, dtype=torch.int64)
    for s in samples:
        ids = torch.as_tensor(s["input_ids"])[torch.as_tensor(s["loss_mask"]).bool()]
        counts += torch.bincount(ids, minlength=vocab)[:vocab]
    return counts


def stages_to_run(cfg: HeadRecipe) -> list[str]:
    """Output stages in order: 'reference', then 'adaspec' or 'kd'."""
    draft = "kd" if cfg.loss.kind == "kd" else "adaspec"
    return {"both": ["reference", draft], "reference": ["reference"], "draft": [draft]}[cfg.stage]


def run_key(cfg: HeadRecipe, stage: str) -> dict:
    """The config entries that decide a stage's output (compared to refuse a folder holding another run)."""
    d = json.loads(json.dumps(to_dict(cfg)))
    for key in ("stage", "reference", "output_dir"):
        d.pop(key)
    if stage != "adaspec":  # KD stages ignore the selection settings
        for key in ("kind", "k", "scope", "budget"):
            d["loss"].pop(key)
    return d


REFERENCE_DIGEST = "reference.sha256"
"""In runs/adaspec/ (runs/kd/): the weights digest of the reference head an AdaSPEC stage distils against (a KD
baseline takes its step count from) (`head_digest`)."""


def head_digest(folder) -> str:
    """sha256 (16 hex) over a head folder's weight files, in name order: the same for a copy of the head at
    another path, different for other weights."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth") and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def check_outputs(cfg: HeadRecipe, stages: list[str], resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds a different run unless --resume or --overwrite. An AdaSPEC stage, and a
    KD baseline held to a reference's step count, is a different run when its reference head's weights differ (the
    path may differ: a copy is the same reference)."""

    if resume or overwrite:
        return
    for stage in stages:
        saved = Path(cfg.output_dir) / "runs" / stage / "config.yaml"
        if not saved.is_file():
            continue
        previous, now = run_key(from_dict(HeadRecipe, yaml.safe_load(saved.read_text())), stage), run_key(cfg, stage)
        if previous != now:
            diff = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
            raise AdaspecError(f"{cfg.output_dir!r} holds a different {stage} run (config differs in {diff}). Pass "
                               "--resume to continue it with the new config, --overwrite to replace it, or choose "
                               "another --output-dir.")
        digest = saved.parent / REFERENCE_DIGEST
        if stage in ("adaspec", "kd") and cfg.reference and digest.is_file():
            before, given = digest.read_text().strip(), head_digest(cfg.reference)
            if before != given:
                article = "an" if stage == "adaspec" else "a"
                raise AdaspecError(f"{cfg.output_dir!r} holds {article} {stage} run against another reference head "
                                   f"(weights sha256 {before}; {cfg.reference!r} has {given}). Pass the reference it "
                                   "was started with, --resume to continue it against this one, --overwrite to "
                                   "replace it, or choose another --output-dir.")


CHAIN_GAMMA = 4
"""Chain length of the held-out acceptance evaluation (the AdaSPEC paper's alpha uses gamma = 4)."""


def stage_budget(cfg: HeadRecipe, stage: str, ref_steps: int | None):
    """The TrainConfig a stage runs with (`loss.budget`).

    Reference stage: cfg.train. AdaSPEC stage, 'equal_tokens': batch round(B / k), epochs E * B' / B, so that
    each step trains on about as many kept tokens as a reference step and the step count is the same.
    AdaSPEC (both protocols) and KD-baseline stages: when the reference's step count is known (trained in this
    run, or recorded in its head), the stage runs exactly that many steps (a time-capped reference caps it too)
    and has no time cap of its own; a smaller `train.max_steps` still caps it (a short trial run), and
    `budget_note` says so."""

    train_cfg = cfg.train
    if stage == "reference":
        return train_cfg
    if stage == "adaspec" and cfg.loss.budget == "equal_tokens" and cfg.loss.k < 1.0:
        batch = max(1, round(train_cfg.batch_size / cfg.loss.k))
        train_cfg = dataclasses.replace(train_cfg, batch_size=batch,
                                        epochs=train_cfg.epochs * batch / train_cfg.batch_size)
    if ref_steps:
        steps = min(int(ref_steps), train_cfg.max_steps or int(ref_steps))
        train_cfg = dataclasses.replace(train_cfg, max_steps=steps, max_minutes=None)
    return train_cfg


def budget_note(stage: str, train_cfg, ref_steps: int | None) -> str | None:
    """A line for the log when train.max_steps cut a stage below its reference's step count (no longer an
    equal-budget comparison), else None."""
    if stage != "reference" and ref_steps and train_cfg.max_steps < ref_steps:
        return (f"stage {stage}: train.max_steps={train_cfg.max_steps} runs fewer steps than its reference "
                f"({ref_steps}); the two are not at the same budget.")
    return None


def reference_steps(records: dict, reference) -> int | None:
    """Optimizer steps the reference stage ran: from this run's record, else from the loaded head's meta."""
    if "reference" in records and records["reference"].get("steps"):
        return int(records["reference"]["steps"])
    steps = (getattr(reference, "meta", None) or {}).get("steps")
    return int(steps) if steps else None


class BestHeadKeeper:
    """The loop's `evaluate` hook for a head stage: held-out chain acceptance (`evaluate_head`, gamma =
    CHAIN_GAMMA, drafting over the engine's default restricted vocabulary when the head has token counts), and
    the head with the best chain tau so far saved to `folder` (atomically, its scores in its own meta).

    Resume: a kept head from a step later than the checkpoint the stage resumes from belongs to a trajectory that
    was lost with the run; it is discarded (`resume_step`: the resumed checkpoint's step, 0 for a fresh start)."""

    def __init__(self, folder, target, heldout, batch_size, pad_id, token_counts, meta, resume_step: int = 0):
        self.folder, self.target, self.heldout = Path(folder), target, heldout
        self.batch_size, self.pad_id, self.token_counts, self.meta = batch_size, pad_id, token_counts, meta
        self.best, self.ids = None, False  # ids: the drafting vocabulary, found at the first evaluation
        saved = self.folder / "config.json"
        if saved.is_file():
            best = json.loads(saved.read_text()).get("adaspec", {}).get("meta", {}).get("best")
            if best and 0 < best["step"] <= resume_step:
                self.best = best
            else:
                shutil.rmtree(self.folder, ignore_errors=True)

    def __call__(self, model, step: int) -> dict:
        head = model.head if isinstance(model, TTTUnroll) else model
        if self.ids is False:  # the same for every evaluation of the stage
            self.ids = None if head.uses_fused else restricted_vocab(head, self.token_counts, DEFAULT_DRAFT_VOCAB)
        e = evaluate_head(head, self.target, self.heldout, self.batch_size, self.pad_id, chain=CHAIN_GAMMA,
                          vocab_ids=self.ids)
        record = {"top1": e["top1"], "kl": e["kl"], "tau": e["chain"]["tau"],
                  "accept_by_depth": e["chain"]["accept_by_depth"]}
        rank = (record["tau"], record["top1"], -record["kl"])  # ties (e.g. early, all-rejecting heads): top-1, KL
        if self.best is None or rank > (self.best["tau"], self.best["top1"], -self.best["kl"]):
            self.best = {"step": step, **record}
            save_head(head, self.folder, {**self.meta, "steps": step, "best": self.best},
                      token_counts=self.token_counts)  # atomic: weights and scores together
        return {k: v for k, v in record.items() if k != "accept_by_depth"} | {
            f"accept_depth{j + 1}": a for j, a in enumerate(record["accept_by_depth"])}


def resumed_step(run_dir: Path) -> int:
    """The step of the checkpoint a stage in `run_dir` resumes from (0: none)."""

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return 0
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def run_pipeline(cfg: HeadRecipe, resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
                 progress: bool = True, log=print) -> dict:
    """Train the stages of `cfg`; return {"train": {stage: record}, "eval": {stage: evaluate_head(...)},
    "stopped": bool}.

    Layout of OUT = cfg.output_dir: config.yaml (resolved), features/ (cache), reference/ adaspec/ kd/ (heads,
    `heads.save_head`), runs/<stage>/ (config.yaml, checkpoints/, tb/, result.json once complete),
    results.json, .lock. Every check a user can fail happens before anything is written; then the main process
    locks OUT (`io.output_lock`) until it returns, so a second run into OUT is refused, not interleaved."""

    def claim():
        held.enter_context(output_lock(cfg.output_dir))
        mark_output_folder(cfg.output_dir, "train-head")

    with contextlib.ExitStack() as held:
        return _run_pipeline(cfg, resume, overwrite, stop_at, progress, log, claim=claim)


@dataclass
class _Pipeline:
    """What the stages of one `run_pipeline` share, filled in by `_check_inputs` and `_start_writing`."""

    cfg: HeadRecipe
    stages: list
    out: Path
    accelerator: object
    target: object
    tokenizer: object
    train_set: list
    heldout: object
    token_counts: torch.Tensor
    reference: object
    ref_path: Path | None
    eagle3: bool
    init: object = None
    dataset: object = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def _run_pipeline(cfg: HeadRecipe, resume, overwrite, stop_at, progress, log, claim) -> dict:
    p = _check_inputs(cfg, resume, overwrite, progress, log, claim)
    _start_writing(p, overwrite, progress, log, claim)
    records, evals = {}, {}
    for stage in p.stages:
        head_dir, run_dir = p.out / STAGE_DIRS[stage], p.out / "runs" / stage
        if (run_dir / "result.json").is_file() and (head_dir / "config.json").is_file():
            log(f"stage {stage}: already complete in {head_dir}, skipped")
            records[stage] = json.loads((run_dir / "result.json").read_text())
        else:
            run = _train_stage(p, stage, records, stop_at, progress)
            if run["steps"] < run["total_steps"]:  # stopped by stop_at: resumable, not complete
                records[stage] = run
                return {"train": records, "eval": evals, "stopped": True, "main": p.main}
        trained = load_head(str(head_dir), p.target)
        if stage == "reference":
            p.reference = trained
        if p.heldout:
            evals[stage] = _evaluate_stage(p, stage, trained, log)
    if p.main:
        (p.out / "results.json").write_text(json.dumps(_summary(p.out, records, evals), indent=1))
    return {"train": records, "eval": evals, "stopped": False, "main": p.main}


def _summary(out: Path, records: dict, evals: dict) -> dict:
    """results.json: this run's stages (their records without the per-step losses) after the complete stages
    an earlier run into OUT recorded there, so that a recipe run one stage at a time keeps every stage's record."""

    try:
        earlier = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        earlier = {}
    kept = [s for s in earlier.get("train", {}) if s not in records and (out / "runs" / s / "result.json").is_file()]
    train = {s: earlier["train"][s] for s in kept}
    train.update({s: {k: v for k, v in r.items() if k != "losses"} for s, r in records.items()})
    evals = {**{s: earlier["eval"][s] for s in kept if s in earlier.get("eval", {})}, **evals}
    return {"eval": evals, "train": train}


def _check_inputs(cfg: HeadRecipe, resume, overwrite, progress, log, claim) -> _Pipeline:
    """Everything a user can get wrong, before anything is written (except self-distillation's answer cache,
    written under the folder's lock once the folder is checked)."""

    stages = stages_to_run(cfg)
    out = Path(cfg.output_dir)
    check_output_folder(out, replace=overwrite)  # files this tool did not make: refused, never deleted
    ref_path = _reference_path(cfg, stages)
    if cfg.init_head:
        check_head_folder(cfg.init_head)
    accelerator = make_accelerator(cfg.train)
    configure_deepspeed(accelerator, cfg.train, cfg.optim)  # a DeepSpeed config at odds with the recipe: refused
    target, tokenizer = load_target(cfg.target, cfg.train.precision)
    target = prepare_frozen(accelerator, target)
    target_identity(target)  # every rank: under ZeRO-3 this gathers (collective); main-only checks reuse it
    partitioned = _is_partitioned(target.get_output_embeddings())
    if cfg.data.self_distill:  # the target answers the prompts now (OUT/regen.jsonl, resumable): the one write
        # before the checks below, which need the answered data; so check the folder and hold its lock first
        if accelerator.num_processes > 1 and partitioned:
            raise AdaspecError("data.self_distill under multi-process ZeRO-3 is not supported (the main process "
                               "alone generates the answers); use a DDP / ZeRO-2 config.")
        check_outputs(cfg, stages, resume, overwrite)
        if accelerator.is_main_process:
            claim()
    train_set, heldout = load_samples(cfg, tokenizer, target, accelerator, fresh=overwrite, progress=progress,
                                      log=log if accelerator.is_main_process else (lambda m: None))
    check_samples_fit([*train_set, *heldout], target, f"target {cfg.target}")
    _check_training_setup(cfg, accelerator, partitioned, train_set, heldout)
    # Trainable target-token frequencies: EAGLE-3's draft vocabulary, and saved with every head for the
    # frequency-restricted drafting of `speculative.HeadDrafter(draft_vocab=N)`.
    token_counts = training_token_counts(train_set, embedding_rows(target))
    reference = _check_reference(cfg, ref_path, target, token_counts)
    init = _check_init(cfg, target, token_counts)
    check_outputs(cfg, stages, resume, overwrite)
    p = _Pipeline(cfg, stages, out, accelerator, target, tokenizer, train_set, heldout, token_counts, reference,
                  ref_path, cfg.head.kind == "eagle3", init)
    if cfg.features == "cached":
        _check_feature_cache(p, overwrite, partitioned)
    return p


def _reference_path(cfg: HeadRecipe, stages) -> Path | None:
    """The reference head of a draft stage run alone: required for AdaSPEC (its loss); optional for the KD
    baseline, which then runs the reference's step count (`stage_budget`) without using its weights."""
    if "reference" in stages:
        return None
    if not cfg.reference:
        if "adaspec" not in stages:
            return None
        raise AdaspecError("--stage draft with the AdaSPEC loss needs --reference PATH (a head trained by "
                           "--stage reference), or use --loss kd for the KD baseline.")
    ref_path = Path(cfg.reference)
    if not ref_path.is_dir():
        raise AdaspecError(f"reference head {str(ref_path)!r} does not exist; train one with --stage reference.")
    return ref_path


def _check_training_setup(cfg: HeadRecipe, accelerator, partitioned: bool, train_set, heldout) -> None:
    if accelerator.num_processes > 1 and partitioned and cfg.train.eval_every:
        # the main process alone would gather shards: a collective the others skip
        raise AdaspecError("train.eval_every under multi-process ZeRO-3 is not supported (the held-out evaluation "
                           "runs on the main process alone); drop it, or use a DDP / ZeRO-2 config.")
    if partitioned and cfg.head.train_vocab_size and cfg.head.kind == "eagle1":
        raise AdaspecError("head.train_vocab_size under DeepSpeed ZeRO-3 is not supported (the lm_head weight is a "
                           "shard); set head.train_vocab_size=0 or use a DDP / ZeRO-2 config.")
    if cfg.train.eval_every and not heldout:
        raise AdaspecError("train.eval_every selects heads by held-out acceptance but data.holdout=0; set "
                           "data.holdout (e.g. 64) or drop train.eval_every.")
    n_valid = sum(int(head_valid_mask(torch.as_tensor(s["loss_mask"])[None]).sum()) for s in train_set)
    if n_valid == 0:
        raise AdaspecError(f"the training data slice has no trainable head positions ({len(train_set)} samples; a "
                           "head position needs a target token two places on); raise data.num_samples or "
                           "data.max_length.")


def _recipe_head(cfg: HeadRecipe, target, token_counts):
    """A fresh head as this recipe builds it (an EAGLE-3 head's draft vocabulary from the data's token counts),
    for checking a given head against it."""
    return build_head(target, cfg.head, token_counts if cfg.head.kind == "eagle3" else None)


def _same_draft_vocab(head, fresh) -> bool:
    return torch.equal(head.draft_ids.cpu(), fresh.draft_ids.cpu())


def _check_reference(cfg: HeadRecipe, ref_path, target, token_counts):
    """The reference head given with --stage draft, checked against this run's head kind and vocabulary."""
    if ref_path is None:
        return None
    reference = load_head(str(ref_path), target)
    if reference.kind != cfg.head.kind:
        raise AdaspecError(f"reference head {str(ref_path)!r} is an {reference.kind} head but head.kind="
                           f"{cfg.head.kind!r}; train the reference with the same head kind.")
    if (cfg.head.kind == "eagle3" and cfg.loss.kind == "adaspec"
            and not _same_draft_vocab(reference, _recipe_head(cfg, target, token_counts))):
        raise AdaspecError(f"reference head {str(ref_path)!r} has another draft vocabulary than this data gives; "
                           "train the reference on the same data and head.draft_vocab_size.")
    return reference


def _check_init(cfg: HeadRecipe, target, token_counts):
    """The head given as init_head, loaded and checked to fit the head this recipe builds (same parameters and
    shapes; for EAGLE-3 the same draft vocabulary), so a mismatch is named before any training."""
    if not cfg.init_head:
        return None
    init = load_head(str(cfg.init_head), target)
    fresh = _recipe_head(cfg, target, token_counts)
    have = {k: tuple(v.shape) for k, v in init.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:4]
        raise AdaspecError(f"init_head {str(cfg.init_head)!r} does not fit the head this recipe trains (head.kind="
                           f"{cfg.head.kind!r}, head.fc_bias={cfg.head.fc_bias}); differing parameters: {diff}. Set "
                           "head.kind / head.fc_bias to match the head, or leave init_head unset.")
    if cfg.head.kind == "eagle3" and not _same_draft_vocab(init, fresh):
        raise AdaspecError(f"init_head {str(cfg.init_head)!r} drafts over another vocabulary than this data gives "
                           "(head.draft_vocab_size and the training tokens); continue it on the data it was "
                           "trained on, or leave init_head unset.")
    return init


def _check_feature_cache(p: _Pipeline, overwrite: bool, partitioned: bool) -> None:
    cache_dir = p.out / "features"
    problem = "missing" if overwrite else cache_problem(cache_dir, p.target, p.train_set, fused=p.eagle3)
    if problem not in (None, "missing"):
        raise AdaspecError(f"the feature cache at {str(cache_dir)!r} is stale: {problem}. Pass --overwrite to "
                           "rebuild it, or choose another --output-dir.")
    if problem and p.accelerator.num_processes > 1 and partitioned:
        # the cache is built by the main process alone; a ZeRO-3 target needs every rank in its forward
        raise AdaspecError("features=cached under multi-process ZeRO-3 needs a feature cache built beforehand "
                           "(by a single-process run into the same --output-dir); use features=online.")


def _start_writing(p: _Pipeline, overwrite: bool, progress: bool, log, claim) -> None:
    """Claim OUT (self-distillation claimed it already), clear a replaced run, write the resolved config and
    the feature caches (train and held-out); sets p.dataset and p.heldout."""
    if p.main and not p.cfg.data.self_distill:
        claim()
    if overwrite and p.main:
        for name in ["features", "features-heldout", "runs", *STAGE_DIRS.values(), "config.yaml", "results.json"]:
            path = p.out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    p.accelerator.wait_for_everyone()
    if p.main:
        save_resolved(p.cfg, p.out)
    p.dataset = p.train_set
    if p.cfg.features == "cached":
        p.dataset = _cached(p, p.train_set, p.out / "features", progress, log)
        if p.heldout:  # the held-out features too: every head is evaluated on them without rerunning the target
            p.heldout = _cached(p, p.heldout, p.out / "features-heldout", progress, None)


def _cached(p: _Pipeline, samples, folder: Path, progress: bool, log):
    if p.main and cache_problem(folder, p.target, samples, fused=p.eagle3) is not None:
        if log:
            log(f"caching target features of {len(samples)} samples in {folder}")
        build_cache(p.target, samples, folder, dtype=p.cfg.feature_dtype, fused=p.eagle3,
                    batch_size=p.cfg.train.batch_size, pad_id=p.pad_id, progress=progress)
    p.accelerator.wait_for_everyone()
    return open_cache(folder, p.target, samples, fused=p.eagle3)


def _stage_loss(p: _Pipeline, loss_cfg: LossConfig, reference, vocab_ids):
    hc = p.cfg.head

    def loss_fn(model, batch, num_items):
        if p.eagle3:
            return eagle3_loss(model, batch, target=p.target, loss_cfg=loss_cfg, steps=hc.ttt_steps,
                               decay=hc.ttt_decay, reference=reference, num_items=num_items,
                               exclude_out_of_vocab=hc.exclude_out_of_vocab)
        return head_loss(model, batch, target=p.target, loss_cfg=loss_cfg, reference=reference,
                         feature_loss_weight=hc.feature_loss_weight, num_items=num_items,
                         token_loss_weight=hc.token_loss_weight, feature_noise=hc.feature_noise,
                         vocab_ids=vocab_ids, exclude_out_of_vocab=hc.exclude_out_of_vocab,
                         unroll_steps=hc.unroll_steps, unroll_decay=hc.ttt_decay,
                         feature_positions=hc.feature_loss_positions)

    return loss_fn


def _train_stage(p: _Pipeline, stage: str, records: dict, stop_at, progress) -> dict:
    """Train one stage (resuming its checkpoints) and, once complete, save its head; records[stage] is set."""

    cfg, run_dir = p.cfg, p.out / "runs" / stage
    if p.main:
        save_resolved(cfg, run_dir)
        if stage in ("adaspec", "kd") and p.ref_path is not None:  # what check_outputs compares on a rerun
            atomic_write(run_dir / REFERENCE_DIGEST, head_digest(p.ref_path) + "\n")
    loss_cfg = cfg.loss if stage == "adaspec" else LossConfig(**{**to_dict(cfg.loss), "kind": "kd", "k": 1.0})
    ref_steps = reference_steps(records, p.reference)
    stage_train = stage_budget(cfg, stage, ref_steps)
    note = budget_note(stage, stage_train, ref_steps)
    if note and p.main:
        print(note, file=sys.stderr)
    torch.manual_seed(cfg.train.seed)  # every stage starts from the same head initialisation
    head = build_head(p.target, cfg.head, p.token_counts if p.eagle3 else None)
    if p.init is not None:  # continued training: the given head's weights (checked to fit in _check_init)
        head.load_state_dict(p.init.state_dict())
    vocab_ids = None if p.eagle3 else restricted_vocab(head, p.token_counts, cfg.head.train_vocab_size)
    if p.reference is not None and stage == "adaspec":  # (a KD baseline only reads its step count)
        p.reference = p.reference.to(p.accelerator.device).requires_grad_(False).eval()
    meta = {"stage": stage, "loss": loss_cfg.kind, "k": loss_cfg.k, "divergence": loss_cfg.divergence,
            "budget": cfg.loss.budget if stage == "adaspec" else None, "batch_size": stage_train.batch_size,
            "data": {**to_dict(cfg.data), "samples": len(p.train_set)},
            "reference": str(p.ref_path or p.out / "reference") if stage == "adaspec" else None}
    if stage == "kd" and ref_steps:  # the KD baseline held to a reference's step count
        meta["steps_of"] = str(p.ref_path or p.out / "reference")
    evaluate = None
    if cfg.train.eval_every and p.main:  # (the loop evaluates on the main process only)
        evaluate = BestHeadKeeper(run_dir / "best", p.target, p.heldout, cfg.train.batch_size, p.pad_id,
                                  p.token_counts, meta, resume_step=resumed_step(run_dir))
    run = train(TTTUnroll(head) if p.eagle3 or cfg.head.unroll_steps > 1 else head, p.dataset,
                _stage_loss(p, loss_cfg, p.reference if stage == "adaspec" else None, vocab_ids),
                collate=lambda samples: pad_batch(samples, p.pad_id),
                count_items=lambda batch: int(head_valid_mask(batch["loss_mask"], batch["attention_mask"]).sum()),
                train_cfg=stage_train, optim_cfg=cfg.optim, out_dir=run_dir, accelerator=p.accelerator,
                desc=stage, stop_at=stop_at, progress=progress, evaluate=evaluate)
    head = run.pop("model")
    head = head.head if isinstance(head, TTTUnroll) else head
    if run["steps"] < run["total_steps"]:
        return run
    records[stage] = {k: run[k] for k in ("steps", "tokens", "seconds", "tokens_per_s", "losses", "budget_steps",
                                          "planned_steps", "evals")}
    records[stage]["batch_size"] = stage_train.batch_size
    if p.main:
        _save_stage_head(p, stage, head, {**meta, "steps": run["steps"], "tokens": run["tokens"]}, evaluate,
                         records[stage])
    p.accelerator.wait_for_everyone()
    return run


def _save_stage_head(p: _Pipeline, stage: str, head, meta: dict, evaluate, record: dict) -> None:
    """The stage's head (the best held-out one when selecting), its config and its result, which marks the
    stage complete; a full disk leaves nothing half-written and the stage resumable."""

    head_dir, run_dir = p.out / STAGE_DIRS[stage], p.out / "runs" / stage
    if evaluate is not None and evaluate.best is not None:  # the best held-out tau, not the last
        head = load_head(str(run_dir / "best"), p.target).to(p.accelerator.device)
        meta["selected"] = record["selected"] = {"by": "held-out chain tau", **evaluate.best}
    try:
        save_head(head, head_dir, meta, token_counts=p.token_counts)
    except (OSError, RuntimeError) as e:  # disk full: save_head wrote into a temp folder, now deleted
        if isinstance(e, RuntimeError) and not disk_full(e):
            raise
        raise AdaspecError(f"could not write the {stage} head to {str(head_dir)!r} ({e}); nothing half-written "
                           "was left there. Free disk space and run the same command again: it resumes from the "
                           "stage's last checkpoint.") from e
    save_resolved(p.cfg, head_dir, "adaspec_config.yaml")
    (run_dir / "result.json").write_text(json.dumps(record))


def _evaluate_stage(p: _Pipeline, stage: str, trained, log) -> dict:
    ids = None if p.eagle3 else restricted_vocab(trained, p.token_counts, DEFAULT_DRAFT_VOCAB)
    e = evaluate_head(trained, p.target, p.heldout, p.cfg.train.batch_size, p.pad_id, chain=CHAIN_GAMMA,
                      vocab_ids=ids)
    if p.main:
        depth = " / ".join(f"{a:.2f}" for a in e["chain"]["accept_by_depth"])
        log(f"stage {stage}: held-out top-1 agreement with the target {e['top1']:.2%} (KL {e['kl']:.3f}, "
            f"{e['positions']} positions); chain of {CHAIN_GAMMA}: tau {e['chain']['tau']:.3f}, acceptance by "
            f"depth {depth}")
    return e


# ----------------------------------------------------------------------------------------------------------
# CLI


# Shortcut flags for recipe keys (help and choices from the keys' own fields)
RECIPE_FLAGS = {"--target": "target", "--stage": "stage", "--reference": "reference", "--init-head": "init_head",
                "--loss": "loss.kind", "--output-dir": "output_dir"}


def cmd_train_head(args) -> int:
    overrides = list(args.overrides) + key_overrides(args, HeadRecipe, RECIPE_FLAGS)
    cfg = load_recipe(HeadRecipe, args.recipe, overrides)
    result = run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                          log=lambda msg: print(msg, file=sys.stderr))
    if not result["eval"] or not result["main"]:
        return 0
    rows = [f"{stage:<10} top-1 {e['top1']:.2%}  KL {e['kl']:.3f}  ({e['positions']} held-out positions)"
            for stage, e in result["eval"].items()]
    print("\n".join(["held-out agreement with the target:", *rows]))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("train-head", help="train an EAGLE-style reference head (KD) and an AdaSPEC head",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples (key=value overrides go last):\n"
                              "  adaspec-eagle train-head --recipe recipes/heads/tiny.yaml\n"
                              "  adaspec-eagle train-head --recipe recipes/heads/smollm2-135m.yaml loss.k=0.3\n"
                              "  adaspec-eagle train-head --recipe R --stage draft --reference OUT/reference "
                              "--output-dir OUT2\n"
                              "  adaspec-eagle train-head --recipe R --stage draft --loss kd   # DistillSpec baseline\n"
                              "  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m adaspec_eagle "
                              "train-head --recipe R   # 2 CPU processes (gloo)")
    p.add_argument("--recipe", help="YAML recipe (recipes/heads/*.yaml)")
    add_key_flags(p, HeadRecipe, RECIPE_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue a run whose config changed")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. loss.k=0.3")
    p.set_defaults(func=cmd_train_head)
