"""The AdaSPEC loss exactly as the AdaSPEC reference code computes it (`AdaSPECTrainer.compute_loss`, with the
model calls replaced by given logits): the oracle the tests hold `adaspec_eagle.training.losses` to, and the baseline
`scripts/bench_loss.py` times."""

import torch
import torch.nn.functional as F
from torch.nn import KLDivLoss

IGNORE_INDEX = -100


def reference_loss(logits, target_logits, ref_logits, full_labels, k, num_items_in_batch=None):
    """Baseline: the body of the AdaSPEC reference code's AdaSPECTrainer.compute_loss with the model calls replaced by logits."""
    labels = full_labels[:, 1:]
    loss_fct = KLDivLoss(reduction="none")
    shift_logits = logits[..., :-1, :].contiguous()
    shift_target_logits = target_logits[..., :-1, :].contiguous()
    shift_ref_logits = ref_logits[..., :-1, :].contiguous()
    shift_logits = shift_logits.view(-1, shift_logits.shape[-1])
    shift_target_logits = shift_target_logits.view(-1, shift_target_logits.shape[-1])
    shift_ref_logits = shift_ref_logits.view(-1, shift_ref_logits.shape[-1])
    mask = labels.ne(IGNORE_INDEX).flatten().unsqueeze(-1)
    shift_logits = torch.masked_select(shift_logits, mask=mask).view(-1, shift_logits.shape[-1])
    shift_target_logits = torch.masked_select(shift_target_logits, mask=mask).view(-1, shift_target_logits.shape[-1])
    shift_ref_logits = torch.masked_select(shift_ref_logits, mask=mask).view(-1, shift_ref_logits.shape[-1])
    shift_logits = shift_logits.float()
    shift_target_logits = shift_target_logits.float()
    shift_ref_logits = shift_ref_logits.float()
    p = F.softmax(shift_target_logits, dim=-1)
    q_log = F.log_softmax(shift_logits, dim=-1)
    actual = loss_fct(q_log, p)
    q_log = F.log_softmax(shift_ref_logits, dim=-1)
    ref = loss_fct(q_log, p)
    actual = actual.sum(dim=-1)
    ref = ref.sum(dim=-1)
    delta = actual - ref
    mask = delta >= torch.quantile(delta, 1 - k, dim=0, keepdim=True)
    if num_items_in_batch is not None:
        loss = torch.masked_select(actual, mask=mask).sum()
        loss = loss / num_items_in_batch
    else:
        loss = torch.masked_select(actual, mask=mask).mean()
    return loss
