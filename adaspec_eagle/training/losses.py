"""The AdaSPEC loss: per-token divergences, top-k token selection, reductions, and a
memory-efficient chunked path. Owns everything between "logits (or hidden states + lm_head)" and "scalar loss".

Notation (AdaSPEC, Hu et al., NeurIPS 2025; the paper's text is not in this repository, so the equations are
labelled (A1)-(A4) here and follow the AdaSPEC README's "How AdaSPEC Works" and the AdaSPEC reference code), per valid token t:
  (A1) L_draft(t) = D(p_target(t) || p_draft(t)),   L_ref(t) = D(p_target(t) || p_ref(t))
  (A2) delta(t)   = L_draft(t) - L_ref(t)                      ("loss gap"; large = easy to learn)
  (A3) keep(t)    = delta(t) >= Quantile_{1-k}(delta over the selection scope)        (top-k fraction)
  (A4) loss       = sum_{kept t} L_draft(t) / num_items    or    mean_{kept t} L_draft(t)
The AdaSPEC reference code (`AdaSPECTrainer.compute_loss`) uses D = forward KL(target || draft), the micro-batch as the scope,
torch.quantile's linear interpolation, and `>=` so that *every* token tied with the threshold is kept (possibly
more than a k fraction when deltas tie). We keep those semantics exactly.

Public API
- `per_token_divergence(teacher_logits (N,V), student_logits (N,V), kind, temperature, beta) -> (N,) fp32`
- `quantile_threshold(values (M,), k, scope="batch") -> 0-dim tensor or None`
- `select_topk(delta (N,), valid (N,) bool, k, scope="batch") -> keep (N,) bool`
- `adaspec_loss(student_logits, teacher_logits, reference_logits, loss_mask, cfg, num_items=None)`
    -> (loss 0-dim fp32, stats {"kl", "kept", "valid"} floats); inputs aligned (B,T,V), loss_mask (B,T) bool.
- `chunked_adaspec_loss(student_hidden (N,H), student_weight (V,H), teacher, reference, valid (N,) bool, cfg,
    num_items=None, student_bias=None)` -> same as adaspec_loss; teacher/reference are either logits (N,V)
    in any dtype or a tuple (hidden (N,H), weight (V,H)[, bias (V,)]); reference may be None.

Both loss functions are chunked (cfg.chunk_size tokens at a time): a no-grad pass computes every valid token's
divergences (the deltas), the selection follows, and the backward pass recomputes the student's gradient only
for the kept tokens, chunk by chunk (custom autograd.Function). At most a few [chunk, V] fp32 tensors are alive
at once; the only [tokens, V] tensor created is the gradient of the student logits (logits path; the hidden
path creates none). Target and reference are constants (no gradient flows to them).

Conventions
- Temperature tau divides all three logits before the softmax; no tau**2 factor is applied (scale the loss
  yourself if you want Hinton's convention).
- Only valid positions are read; NaN/inf there raises AdaspecError naming the tensor. Mask vocabulary entries
  with a large finite negative value (e.g. -1e9), not -inf (the AdaSPEC reference code's formula gives NaN there too).
- num_items (reduction "num_items"): defaults to this call's valid-token count. For exact gradient-accumulation
  and multi-rank invariance pass the global valid count of the optimizer step (sum over micro-batches and
  ranks); we do not multiply by the world size (the Trainer's `average_tokens_across_devices` does that).
- Gradient accumulation: with scope "batch" the selection is per call, as in the AdaSPEC reference code. Hence splitting a batch
  into micro-batches gives exactly the full-batch result for k = 1 (plain KD), and for k < 1 it equals the
  sum over micro-batches of each micro-batch's own top-k selection, normalised by the global num_items.
  Scope "global" takes the threshold over all ranks' tokens of the current call (torch.distributed all_gather,
  when initialised; a single process behaves as "batch").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import LossConfig

DIVERGENCES = ("forward_kl", "reverse_kl", "tvd", "jsd")
QUANTILE_MAX_ELEMENTS = 2 ** 24  # torch.quantile raises "input tensor is too large" above this


# ----------------------------------------------------------------------------------------------- divergences

def top1_hits(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> tuple[int, int]:
    """(positions where the student's argmax equals the teacher's, positions counted): logits (..., V), `mask`
    (...) selecting the positions (all when None). The one top-1 agreement of heads and draft LMs."""
    same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    if mask is None:
        return int(same.sum()), same.numel()
    return int((same & mask).sum()), int(mask.sum())


def _check_kind(kind: str, beta: float, temperature: float) -> None:
    if kind not in DIVERGENCES:
        raise AdaspecError(f"unknown divergence {kind!r}: use one of {', '.join(DIVERGENCES)}.")
    if not 0.0 <= beta <= 1.0:
        raise AdaspecError(f"jsd beta={beta} is out of range: use 0 <= beta <= 1.")
    if not temperature > 0:
        raise AdaspecError(f"temperature={temperature} is out of range: use temperature > 0.")


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    x = logits.float()  # (N, V) fp32
    return x / temperature if temperature != 1.0 else x


def _divergence_from_logprobs(lt: Tensor, ls: Tensor, kind: str, beta: float, pt: Tensor | None = None) -> Tensor:
    """lt, ls: (N, V) fp32 log-probabilities of teacher and student -> (N,) divergence."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":  # KL(teacher || student) = sum_v p_t (log p_t - log p_s)   (A1)
        pt = lt.exp() if pt is None else pt
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse_kl":  # KL(student || teacher)
        ps = ls.exp()
        return (ps * (ls - lt)).sum(-1)
    if kind == "tvd":  # total variation 1/2 sum_v |p_s - p_t|
        pt = lt.exp() if pt is None else pt
        return 0.5 * (ls.exp() - pt).abs().sum(-1)
    # Generalized JSD (GKD, Agarwal et al. 2024; TRL's generalized_jsd_loss):
    # m = beta p_t + (1 - beta) p_s;  JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m).
    pt = lt.exp() if pt is None else pt
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # (N, V) log m
    kl_t = (pt * (lt - lm)).sum(-1)
    kl_s = (ls.exp() * (ls - lm)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def per_token_divergence(teacher_logits: Tensor, student_logits: Tensor, kind: str = "forward_kl",
                         temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Divergence between teacher (target) and student per token, computed in fp32 (differentiable).

    teacher_logits, student_logits: (N, V) any float dtype -> (N,) fp32.
    kind: "forward_kl" KL(teacher||student) (the AdaSPEC reference code's, (A1)), "reverse_kl" KL(student||teacher),
    "tvd" (1/2 L1), "jsd" generalized JSD(beta) with m = beta p_teacher + (1-beta) p_student. As in GKD/TRL the
    endpoints are defined by their normalised limits: beta = 0 gives forward KL(teacher||student) (= lim
    JSD_beta / beta as beta -> 0) and beta = 1 gives reverse KL(student||teacher) (= lim JSD_beta / (1-beta)).
    """
    _check_kind(kind, beta, temperature)
    if teacher_logits.shape != student_logits.shape:
        raise AdaspecError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                           f"{tuple(student_logits.shape)} differ in shape: align them (same tokens, same vocab).")
    lt = torch.log_softmax(_scaled(teacher_logits, temperature), dim=-1)  # (N, V)
    ls = torch.log_softmax(_scaled(student_logits, temperature), dim=-1)  # (N, V)
    return _divergence_from_logprobs(lt, ls, kind, beta)


# ------------------------------------------------------------------------------------------------- selection

def _gather_across_ranks(values: Tensor) -> Tensor:
    """(M,) local values -> (sum_r M_r,) values of all ranks (identity without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    n = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    if longest == 0:
        return values
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    parts = [values.new_empty(longest) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _quantile_linear(values: Tensor, q: float) -> Tensor:
    """torch.quantile(values, q) (linear interpolation) for any size, via a sort. values: (M,), M > 0.

    Mirrors torch's arithmetic: rank = q * (M - 1) in the input dtype, below = trunc(rank), above = ceil(rank),
    result = lerp(sorted[below], sorted[above], rank - below). Bit-identical to torch.quantile where it works.
    (A full sort rather than torch.kthvalue: CPU kthvalue is quadratic on descending input.)
    """
    m = values.numel()
    rank = torch.tensor(q, dtype=values.dtype, device=values.device) * (m - 1)
    below = rank.long()  # trunc, as torch.quantile
    above = rank.ceil().long()
    ordered = values.sort().values  # (M,)
    return torch.lerp(ordered[below], ordered[above], rank - below)


def quantile_threshold(values: Tensor, k: float, scope: str = "batch") -> Tensor | None:
    """Threshold of the top-k fraction: quantile(values, 1 - k) with linear interpolation (A3).

    values: (M,) finite deltas of valid tokens. scope "global" gathers all ranks' values first (collective: every
    rank must call it). Returns a 0-dim tensor, or None when there are no values (in any rank).
    """
    if not 0.0 < k <= 1.0:
        raise AdaspecError(f"k={k} is out of range: the kept fraction must satisfy 0 < k <= 1.")
    if scope not in ("batch", "global"):
        raise AdaspecError(f"unknown selection scope {scope!r}: use 'batch' or 'global'.")
    if scope == "global":
        values = _gather_across_ranks(values)
    if values.numel() == 0:
        return None
    if values.numel() <= QUANTILE_MAX_ELEMENTS:
        return torch.quantile(values, 1.0 - k)
    return _quantile_linear(values, 1.0 - k)


def select_topk(delta: Tensor, valid: Tensor, k: float, scope: str = "batch") -> Tensor:
    """Keep the valid tokens whose delta is at least the (1 - k) quantile of the valid deltas (seed semantics).

    delta: (N,) float; valid: (N,) bool -> keep (N,) bool. Ties: every token equal to the threshold is kept (the
    the AdaSPEC reference code's `>=`), so more than a k fraction may be kept when deltas tie. No valid tokens -> all False.
    Non-finite valid deltas raise AdaspecError. Masked (invalid) tokens are never kept.
    """
    if delta.shape != valid.shape or delta.dim() != 1:
        raise AdaspecError(f"delta {tuple(delta.shape)} and valid {tuple(valid.shape)} must be equal 1-D shapes.")
    dv = delta[valid]  # (M,)
    if not bool(torch.isfinite(dv).all()):
        raise AdaspecError("delta (L_draft - L_ref) contains NaN or inf at valid tokens: check the logits "
                           "(fp16 overflow? -inf vocabulary masks?) and use finite values.")
    threshold = quantile_threshold(dv, k, scope)
    if threshold is None:
        return torch.zeros_like(valid)
    return valid & (delta >= threshold)


# ------------------------------------------------------------------------------------------------- core passes

def _is_forward_kl(cfg: LossConfig) -> bool:
    return cfg.divergence == "forward_kl" or (cfg.divergence == "jsd" and cfg.beta == 0.0)


class _Rows:
    """Rows of logits for valid tokens: from logits (..., V) indexed by `pos` (a tuple of index tensors) or from
    (hidden, weight[, bias]) with logits = F.linear(hidden[pos], weight, bias) in the input dtype."""

    def __init__(self, spec, pos: tuple[Tensor, ...]):
        self.pos, self.flat, self.flat_pos, self.host_pos = pos, None, None, None
        if isinstance(spec, (tuple, list)):
            self.hidden, self.weight = spec[0].detach(), spec[1].detach()
            self.bias = spec[2].detach() if len(spec) > 2 and spec[2] is not None else None
            self.logits = None
            return
        self.logits = spec.detach()
        try:  # row-major (B, T) layout: runs of consecutive valid tokens are plain slices (no gather)
            self.flat = self.logits.view(-1, self.logits.shape[-1])  # (B*T, V)
            self.flat_pos = pos[0] * self.logits.shape[1] + pos[1] if len(pos) == 2 else pos[0]  # (n,)
        except RuntimeError:
            pass

    def __call__(self, sl: Tensor) -> Tensor:
        """sl: (c,) indices into the valid-token list -> (c, V) logits in the input dtype."""
        if self.logits is None:
            return F.linear(self.hidden[tuple(p[sl] for p in self.pos)], self.weight, self.bias)
        return self.logits[tuple(p[sl] for p in self.pos)]

    def fetch(self, sl: Tensor, out: Tensor, temperature: float, span: tuple[int, int] | None = None) -> Tensor:
        """fp32 rows / temperature for the valid-list indices sl (c,): a read-only view of the input where possible,
        else written into the buffer out (c, V). span = (start, end) when sl is that consecutive range."""
        if self.flat is not None and span is not None:
            if self.host_pos is None:
                self.host_pos = self.flat_pos.tolist()  # one host sync per call
            hp = self.host_pos[span[0]:span[1]]
            runs, begin = [], 0  # (offset in chunk, first flat row, length) of consecutive rows
            for i in range(1, len(hp) + 1):
                if i == len(hp) or hp[i] != hp[i - 1] + 1:
                    runs.append((begin, hp[begin], i - begin))
                    begin = i
            if len(runs) == 1 and self.flat.dtype == torch.float32 and temperature == 1.0:
                return self.flat[hp[0]:hp[0] + len(hp)]  # (c, V) view, no copy
            if len(runs) <= 16:  # few large copies (many tiny ops are slow on a busy CPU)
                for dst, src, length in runs:
                    out[dst:dst + length].copy_(self.flat[src:src + length])
                return out.div_(temperature) if temperature != 1.0 else out
        rows = self(sl)  # (c, V) one gather (or the student's F.linear)
        if rows.dtype == torch.float32 and temperature == 1.0:
            return rows
        out.copy_(rows)
        return out.div_(temperature) if temperature != 1.0 else out


class _Buffers:
    """Reusable (chunk, V) fp32 work buffers: no page-faulting fresh allocations per chunk."""

    def __init__(self, count: int, rows: int, vocab: int, device):
        self.bufs = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(count)]

    def take(self, c: int) -> list[Tensor]:
        return [b[:c] for b in self.bufs]


def _divergence_pass(student: _Rows, teacher: _Rows, reference: _Rows | None, n: int, vocab: int,
                     cfg: LossConfig, device) -> tuple[Tensor, Tensor | None]:
    """No-grad pass over the n valid tokens in chunks -> (L_draft (n,), L_ref (n,) or None), fp32."""
    actual = torch.empty(n, dtype=torch.float32, device=device)
    ref = torch.empty(n, dtype=torch.float32, device=device) if reference is not None else None
    tau, kind, beta, cs = cfg.temperature, cfg.divergence, cfg.beta, cfg.chunk_size
    fast = _is_forward_kl(cfg)
    bufs = _Buffers(4, min(cs, n), vocab, device) if fast else None
    with torch.no_grad():
        for start in range(0, n, cs):
            sl = torch.arange(start, min(start + cs, n), device=device)  # (c,)
            if fast:  # forward KL with 4 reused buffers; same arithmetic as _divergence_from_logprobs
                span = (start, start + sl.numel())
                x, lt, pt, tmp = bufs.take(sl.numel())  # (c, V) each
                torch.log_softmax(teacher.fetch(sl, x, tau, span), -1, out=lt)
                torch.exp(lt, out=pt)
                for rows, out in ((student, actual), (reference, ref)):
                    if rows is None:
                        continue
                    torch.log_softmax(rows.fetch(sl, x, tau, span), -1, out=tmp)
                    torch.sub(lt, tmp, out=tmp).mul_(pt)
                    out[sl] = tmp.sum(-1)
                continue
            lt = torch.log_softmax(_scaled(teacher(sl), tau), dim=-1)  # (c, V)
            pt = lt.exp() if kind in ("forward_kl", "tvd", "jsd") else None
            ls = torch.log_softmax(_scaled(student(sl), tau), dim=-1)
            actual[sl] = _divergence_from_logprobs(lt, ls, kind, beta, pt)
            del ls
            if reference is not None:
                lr = torch.log_softmax(_scaled(reference(sl), tau), dim=-1)
                ref[sl] = _divergence_from_logprobs(lt, lr, kind, beta, pt)
                del lr
    return actual, ref


def _check_finite_rows(actual: Tensor, delta: Tensor | None, sources: dict, n: int, chunk: int) -> None:
    """Raise AdaspecError naming the input tensor that holds NaN/inf at a valid token (checked only on failure)."""
    ok = torch.isfinite(actual).all()
    if delta is not None:
        ok = ok & torch.isfinite(delta).all()
    if bool(ok):
        return
    for name, rows in sources.items():
        if rows is None:
            continue
        for start in range(0, n, chunk):
            sl = torch.arange(start, min(start + chunk, n), device=actual.device)
            bad = ~torch.isfinite(rows(sl)).all(-1)  # (c,)
            if bool(bad.any()):
                first = start + int(bad.nonzero()[0, 0])
                raise AdaspecError(f"{name} contains NaN or inf at valid token #{first} (counting only tokens "
                                   f"with loss_mask=True): fix the model's numerics (bf16 instead of fp16) or "
                                   f"mask vocabulary entries with a large finite negative value, not -inf.")
    raise AdaspecError("the per-token divergence overflowed to NaN/inf although the logits are finite: the logits "
                       "are too extreme for fp32; lower their scale or raise the temperature.")


def _select(actual: Tensor, ref: Tensor | None, cfg: LossConfig) -> Tensor:
    """(n,) divergences -> keep (n,) bool. kind 'kd', no reference or k = 1: keep every valid token."""
    n = actual.numel()
    if cfg.kind == "kd" or ref is None or cfg.k >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=actual.device)
    delta = actual - ref  # (n,)  (A2)
    threshold = quantile_threshold(delta, cfg.k, cfg.scope)
    if threshold is None:
        return torch.zeros(n, dtype=torch.bool, device=actual.device)
    return delta >= threshold


def _forward_common(ctx, student: _Rows, teacher: _Rows, reference: _Rows | None, n: int, vocab: int,
                    cfg: LossConfig, stats: dict, device, names: dict) -> Tensor:
    """Shared forward: divergences, finiteness, selection. Returns sum over kept tokens of L_draft (0-dim)."""
    ctx.cfg, ctx.vocab = cfg, vocab
    use_ref = reference if (cfg.kind != "kd" and cfg.k < 1.0) else None
    if n == 0:
        if use_ref is not None and cfg.scope == "global":
            quantile_threshold(torch.empty(0, device=device), cfg.k, "global")  # take part in the collective
        ctx.kept = torch.empty(0, dtype=torch.long, device=device)
        stats.update(kl=0.0, kept=0.0, valid=0.0, kept_index=ctx.kept)
        return torch.zeros((), dtype=torch.float32, device=device)
    actual, ref = _divergence_pass(student, teacher, use_ref, n, vocab, cfg, device)
    _check_finite_rows(actual, ref, {names["student"]: student, names["teacher"]: teacher,
                                     names["reference"]: use_ref}, n, cfg.chunk_size)
    keep = _select(actual, ref, cfg)  # (n,) bool
    ctx.kept = keep.nonzero().squeeze(1)  # (n_kept,) indices into the valid-token list
    loss_sum = actual[ctx.kept].sum()
    stats.update(kl=actual.sum().item() / n, kept=float(ctx.kept.numel()), valid=float(n))
    stats["kept_index"] = ctx.kept  # (popped by the public losses unless their caller asks for it)
    return loss_sum


def _backward_chunks(ctx, student: _Rows, teacher: _Rows, grad_out: Tensor):
    """Yield (kept indices into the valid list (c,), d loss_sum / d student logits rows (c, V) fp32 times
    grad_out). The yielded tensor is a reused buffer: consume it before the next iteration."""
    kept, cfg, tau = ctx.kept, ctx.cfg, ctx.cfg.temperature
    cs = cfg.chunk_size
    fast = _is_forward_kl(cfg)
    bufs = _Buffers(3, min(cs, kept.numel()), ctx.vocab, grad_out.device) if fast and kept.numel() else None
    for start in range(0, kept.numel(), cs):
        idx = kept[start:start + cs]  # (c,)
        if fast:  # d KL(p_t || softmax(s / tau)) / ds = (softmax(s / tau) - p_t) / tau
            x, ps, pt = bufs.take(idx.numel())
            torch.softmax(student.fetch(idx, x, tau), -1, out=ps)
            torch.softmax(teacher.fetch(idx, x, tau), -1, out=pt)
            g = ps.sub_(pt)
            if tau != 1.0:
                g.div_(tau)
        else:
            with torch.enable_grad():
                s = student(idx).detach().float().requires_grad_(True)
                d = per_token_divergence(teacher(idx), s, cfg.divergence, tau, cfg.beta)
                (g,) = torch.autograd.grad(d.sum(), s)
        yield idx, g.mul_(grad_out)


class _LogitsLoss(torch.autograd.Function):
    """Sum over kept tokens of L_draft, from aligned logits; gradient only wrt the student logits."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, reference_logits, pos, cfg, stats):
        ctx.pos = pos
        ctx.teacher = teacher_logits.detach()
        ctx.save_for_backward(student_logits)
        names = {"student": "student_logits", "teacher": "teacher_logits", "reference": "reference_logits"}
        ref = _Rows(reference_logits, pos) if reference_logits is not None else None
        return _forward_common(ctx, _Rows(student_logits, pos), _Rows(teacher_logits, pos), ref, pos[0].numel(),
                               student_logits.shape[-1], cfg, stats, student_logits.device, names)

    @staticmethod
    def backward(ctx, grad_out):
        (student_logits,) = ctx.saved_tensors
        grad = torch.zeros_like(student_logits, memory_format=torch.contiguous_format)  # (B, T, V)
        flat = grad.view(-1, grad.shape[-1])  # (B*T, V)
        flat_pos = ctx.pos[0] * grad.shape[1] + ctx.pos[1]  # (n,)
        for idx, g in _backward_chunks(ctx, _Rows(student_logits, ctx.pos), _Rows(ctx.teacher, ctx.pos), grad_out):
            flat.index_copy_(0, flat_pos[idx], g if g.dtype == flat.dtype else g.to(flat.dtype))
        return grad, None, None, None, None, None


class _HiddenLoss(torch.autograd.Function):
    """As _LogitsLoss, with student logits = F.linear(hidden, weight, bias) recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, reference, pos, cfg, stats):
        ctx.pos, ctx.teacher = pos, teacher
        ctx.save_for_backward(hidden, weight, bias)
        names = {"student": "student logits (student_hidden @ student_weight.T)", "teacher": "teacher",
                 "reference": "reference"}
        ref = _Rows(reference, pos) if reference is not None else None
        return _forward_common(ctx, _Rows((hidden, weight, bias), pos), _Rows(teacher, pos), ref, pos[0].numel(),
                               weight.shape[0], cfg, stats, hidden.device, names)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H) accumulated in fp32
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for idx, g in _backward_chunks(ctx, _Rows((hidden, weight, bias), ctx.pos), _Rows(ctx.teacher, ctx.pos),
                                       grad_out):
            rows = ctx.pos[0][idx]  # (c,) token indices
            g = g.to(hidden.dtype)  # (c, V) as autograd would cast the grad of the low-precision logits
            if grad_h is not None:
                grad_h[rows] = g @ weight  # (c, H)
            if grad_w is not None:
                grad_w.add_(g.t() @ hidden[rows])  # (V, H)
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


# ------------------------------------------------------------------------------------------------- public losses

def _reduce(loss_sum: Tensor, stats: dict, cfg: LossConfig, num_items) -> Tensor:
    """Sum over kept tokens -> the configured reduction (A4). Zero but connected when nothing is kept."""
    if cfg.reduction not in ("num_items", "mean"):
        raise AdaspecError(f"unknown reduction {cfg.reduction!r}: use 'num_items' or 'mean'.")
    if stats["kept"] == 0:
        return loss_sum * 0.0
    if cfg.reduction == "mean":
        return loss_sum / stats["kept"]
    if num_items is None:
        num_items = stats["valid"]
    if not isinstance(num_items, Tensor) and num_items <= 0:
        raise AdaspecError(f"num_items={num_items} but this batch has {int(stats['valid'])} valid tokens: pass "
                           "the number of valid tokens of the whole optimizer step (all micro-batches and ranks).")
    return loss_sum / num_items


def _check_cfg(cfg: LossConfig) -> None:
    _check_kind(cfg.divergence, cfg.beta, cfg.temperature)
    if cfg.kind not in ("adaspec", "kd"):
        raise AdaspecError(f"unknown loss kind {cfg.kind!r}: use 'adaspec' or 'kd'.")


def adaspec_loss(student_logits: Tensor, teacher_logits: Tensor, reference_logits: Tensor | None,
                 loss_mask: Tensor, cfg: LossConfig, num_items=None, return_kept: bool = False) -> tuple[Tensor, dict]:
    """AdaSPEC selective distillation loss from aligned logits ((A1)-(A4); seed semantics).

    student_logits, teacher_logits, reference_logits: (B, T, V), any float dtype, position t of all three
    predicting the same token (the caller shifts). Views such as logits[:, :-1] work (rows are gathered per
    chunk), but autograd's slice backward then adds a [B, T, V] copy; cheaper: pass the unshifted logits with the
    mask shifted instead (loss_mask[:, t] = labels[:, t + 1] != -100, last column False), the same loss.
    loss_mask: (B, T) bool, True where the token counts. reference_logits None or cfg.kind == "kd": plain KD.
    num_items: int or 0-dim tensor (reduction "num_items"), default = valid tokens in this call.
    Returns (loss 0-dim fp32, {"kl": mean L_draft over valid tokens, "kept": n, "valid": n} as floats); with
    `return_kept`, stats["kept_index"] is ((n_kept,), (n_kept,)): the batch and time indices of the kept tokens
    (every valid one for KD).
    Memory: chunked (cfg.chunk_size tokens), only the student-logits gradient is [B, T, V].
    """
    _check_cfg(cfg)
    if student_logits.dim() != 3:
        raise AdaspecError(f"student_logits must be (B, T, V), got {tuple(student_logits.shape)}.")
    for name, t in (("teacher_logits", teacher_logits), ("reference_logits", reference_logits)):
        if t is not None and t.shape != student_logits.shape:
            raise AdaspecError(f"{name} {tuple(t.shape)} differs from student_logits {tuple(student_logits.shape)}:"
                               " pass aligned logits over the same vocabulary.")
    if loss_mask.shape != student_logits.shape[:2]:
        raise AdaspecError(f"loss_mask {tuple(loss_mask.shape)} must be (B, T) = {tuple(student_logits.shape[:2])}.")
    pos = tuple(loss_mask.to(torch.bool).nonzero().unbind(1))  # ((n,), (n,)) batch and time indices
    stats: dict = {}
    loss_sum = _LogitsLoss.apply(student_logits, teacher_logits, reference_logits, pos, cfg, stats)
    kept = stats.pop("kept_index", None)
    if return_kept:
        stats["kept_index"] = tuple(p[kept] if kept is not None else p[:0] for p in pos)
    return _reduce(loss_sum, stats, cfg, num_items), stats


def chunked_adaspec_loss(student_hidden: Tensor, student_weight: Tensor, teacher, reference, valid: Tensor,
                         cfg: LossConfig, num_items=None, student_bias: Tensor | None = None,
                         return_kept: bool = False) -> tuple[Tensor, dict]:
    """AdaSPEC loss from the student's hidden states and lm_head, never materialising its [N, V] logits.

    student_hidden: (N, H) (flatten and shift (B, T, H) yourself); student_weight: (V, H); student_bias: (V,)|None.
    teacher, reference: logits (N, V) in any dtype (e.g. bf16 precomputed), or (hidden (N, H'), weight (V, H')
    [, bias]) tuples computed chunkwise; reference may be None (plain KD). valid: (N,) bool.
    Student logits per chunk are F.linear(hidden, weight, bias) in the input dtype, then fp32, exactly like the
    direct path `adaspec_loss(F.linear(h, W, b)[None], ...)`, whose loss and gradients (wrt hidden, weight,
    bias) this reproduces. Returns (loss, stats) as adaspec_loss; with `return_kept`, stats["kept"] is
    joined by stats["kept_index"] (n_kept,): the kept tokens as indices into the N rows.
    """
    _check_cfg(cfg)
    if student_hidden.dim() != 2 or student_weight.dim() != 2 or student_hidden.shape[1] != student_weight.shape[1]:
        raise AdaspecError(f"student_hidden must be (N, H) and student_weight (V, H); got "
                           f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}.")
    n, v = student_hidden.shape[0], student_weight.shape[0]
    for name, spec in (("teacher", teacher), ("reference", reference)):
        if spec is None:
            continue
        rows = spec[0].shape[0] if isinstance(spec, (tuple, list)) else spec.shape[0]
        vocab = spec[1].shape[0] if isinstance(spec, (tuple, list)) else spec.shape[-1]
        if rows != n or vocab != v:
            raise AdaspecError(f"{name} covers {rows} tokens x {vocab} vocab but the student {n} x {v}: align them.")
    if valid.shape != (n,):
        raise AdaspecError(f"valid must be (N,) = ({n},), got {tuple(valid.shape)}.")
    pos = (valid.to(torch.bool).nonzero().squeeze(1),)  # ((n_valid,),)
    stats: dict = {}
    loss_sum = _HiddenLoss.apply(student_hidden, student_weight, student_bias, teacher, reference, pos, cfg, stats)
    kept = stats.pop("kept_index", None)
    if return_kept:
        stats["kept_index"] = pos[0][kept] if kept is not None else pos[0][:0]
    return _reduce(loss_sum, stats, cfg, num_items), stats
