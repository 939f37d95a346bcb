"""The one training loop, on 🤗 Accelerate, for draft heads and draft LMs.

Owns: the optimizer (AdamW over trainable parameters), the LR schedule (warmup + constant/linear/cosine, a pure
function of the step), gradient clipping, gradient accumulation with correct token normalisation, mixed
precision (Accelerator mixed_precision), the deterministic data order, atomic checkpoints with exact resume,
the progress bar and TensorBoard logs. What a step computes is the caller's `loss_fn`.

Normalisation (`reduction='num_items'`, the AdaSPEC reference code's `num_items_in_batch`). One optimizer step sees `grad_accum`
micro-batches on each of `world` processes. The loop counts the valid tokens N of all of them (all-reduced) and
passes `num_items = N / (world * grad_accum)` to `loss_fn`, which returns sum(per-token loss) / num_items.
`accelerator.backward` divides by grad_accum and DDP averages over ranks, so the gradient is exactly that of
sum over every kept token of the step / N, whatever the split into micro-batches and processes.

Data order: the loop does its own sharding instead of a prepared DataLoader. Epoch e uses the permutation
`randperm(n, seed + e)`, padded by wrap-around to a multiple of world * batch_size; process r takes every
world-th batch. The micro-batch stream is a pure function of (seed, n, batch_size, world), so a resumed run
continues from micro-batch step * grad_accum with the same data as an uninterrupted one.

Checkpoints: every `save_every` steps, `accelerator.save_state` into `checkpoints/.tmp-step-N`, every file
fsynced, then one `os.replace` to `checkpoints/step-N` (a crash or SIGKILL mid-save leaves only a tmp folder,
ignored and cleaned; a full disk raises an AdaspecError and leaves the previous checkpoint), then older
checkpoints are deleted. Resume loads the newest complete one (model, optimizer, RNG states, fp16 scaler) and
the loop state (`trainer_state.json`: step, losses so far, tokens); an unreadable one is an AdaspecError.

Faults: SIGINT/SIGTERM end the current step, save a checkpoint and raise `TrainingInterrupted` (an
AdaspecError: exit status 2, "run the same command again to resume"); a second signal stops at once (the last
complete checkpoint stays). A non-finite loss (or, outside fp16, gradient norm) raises an AdaspecError naming
the step, before anything of that step is saved.

Frozen models (the target, a reference): `prepare_frozen` places them; under DeepSpeed ZeRO-3 it wraps them in
an inference-only DeepSpeed engine (parameters partitioned across ranks, gathered layer by layer in forward), the
same recipe TRL's `prepare_deepspeed` uses for reference models. Not exercised here: deepspeed is not installed
on the build machine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from adaspec_eagle import AdaspecError
from adaspec_eagle.config import OptimConfig, TrainConfig
from adaspec_eagle.io import disk_full, fsync_dir, fsync_tree

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(train_cfg: TrainConfig, cpu: bool | None = None):
    """An Accelerator for `train_cfg` (mixed precision, gradient accumulation). `accelerate launch` settings
    (processes, DeepSpeed/FSDP plugins) come from the environment as usual."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    kwargs = {"cpu": cpu} if cpu is not None else {}
    acc = Accelerator(gradient_accumulation_steps=train_cfg.grad_accum,
                      mixed_precision=PRECISION[train_cfg.precision], **kwargs)
    set_seed(train_cfg.seed)
    return acc


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen model (no grad, eval) for inference inside the loop. Under DeepSpeed ZeRO-3 it becomes an
    inference-only DeepSpeed engine so its weights stay partitioned like the trained model's."""
    model.requires_grad_(False).eval()
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:

        import deepspeed

        ds_cfg = copy.deepcopy(plugin.deepspeed_config)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        ds_cfg.pop("optimizer", None), ds_cfg.pop("scheduler", None)
        ds_cfg["train_micro_batch_size_per_gpu"] = ds_cfg.get("train_micro_batch_size_per_gpu", 1)
        if isinstance(ds_cfg.get("train_micro_batch_size_per_gpu"), str):  # accelerate's "auto"
            ds_cfg["train_micro_batch_size_per_gpu"] = 1
        ds_cfg.pop("train_batch_size", None), ds_cfg.pop("gradient_accumulation_steps", None)
        if hidden:
            zero = ds_cfg.setdefault("zero_optimization", {})
            zero.update({"stage": 3, "reduce_bucket_size": hidden * hidden,
                         "stage3_param_persistence_threshold": 10 * hidden,
                         "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
        engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
        return engine.module.eval()
    return model.to(accelerator.device)


# ----------------------------------------------------------------------------------------------------------
# Pure pieces: schedule and data order


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup to 1, then constant / linear / cosine to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Micro-batches per process per epoch (the last global batch is completed by wrap-around)."""
    return max(1, math.ceil(n / (batch_size * world)))


def micro_batch_indices(m: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Sample indices of micro-batch `m` (0-based over the whole run, epochs concatenated) on process `rank`."""
    per_epoch = batches_per_epoch(n, batch_size, world)
    epoch, pos = divmod(m, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))  # (n,)
    need = per_epoch * batch_size * world
    perm = perm.repeat(math.ceil(need / n))[:need]  # wrap-around padding
    start = (pos * world + rank) * batch_size
    return perm[start:start + batch_size].tolist()


def configure_deepspeed(acc, train_cfg: TrainConfig, optim_cfg: OptimConfig) -> None:
    """Fill the DeepSpeed config (under `accelerate launch` with a DeepSpeed plugin) from the recipe: the loop
    feeds its own batches, so accelerate cannot infer the micro-batch size from a dataloader; clipping is
    DeepSpeed's own, so a config value other than optim.max_grad_norm is refused rather than silently used."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    ds["gradient_accumulation_steps"] = train_cfg.grad_accum
    ds.pop("train_batch_size", None)  # DeepSpeed derives it (micro-batch x accumulation x data-parallel ranks)
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        ds["gradient_clipping"] = optim_cfg.max_grad_norm
    elif float(clip) != float(optim_cfg.max_grad_norm):
        raise AdaspecError(f"the DeepSpeed config clips gradients at {clip} but optim.max_grad_norm="
                           f"{optim_cfg.max_grad_norm}; set one to the other (the accelerate config's "
                           "gradient_clipping, or the override optim.max_grad_norm=...).")


BUDGET_PROBE_STEPS = 20


def budget_steps(acc, steps: int, done: int, step0: int, rate_t0: float, spent_s: float, budget_s: float) -> int:
    """`steps` cut to what fits `budget_s` seconds of training: the rate is that of the steps since the third of
    this call (from `rate_t0`), `spent_s` the stage's seconds so far. One more step than `done` at least, `steps`
    at most. Every rank gets the same answer (the smallest of the ranks' own), or they would part ways."""
    rate = (done - step0 - 2) / max(time.perf_counter() - rate_t0, 1e-9)  # steps per second
    cut = min(steps, max(done + 1, done + int((budget_s - spent_s) * rate)))
    if acc.num_processes > 1:
        cut = int(acc.gather(torch.tensor([cut], device=acc.device, dtype=torch.int64)).min().item())
    return cut


def total_steps(n: int, cfg: TrainConfig, world: int) -> int:
    """Optimizer steps of a stage: `max_steps`, else `epochs` passes over n samples."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch(n, cfg.batch_size, world) / cfg.grad_accum))


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `folder` (one holding trainer_state.json), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(accelerator, folder: Path, state: dict) -> Path:
    """Atomic: write into a tmp folder, fsync, rename, then delete older checkpoints. A failed write (disk full)
    deletes the tmp folder and raises an AdaspecError; the previous checkpoint is untouched."""
    step = state["step"]
    tmp, final = folder / f".tmp-step-{step:07d}", folder / f"step-{step:07d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # torch.save, not safetensors: heads share (tied) target tensors, which safetensors refuses.
        accelerator.save_state(str(tmp), safe_serialization=False)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if isinstance(e, RuntimeError) and not disk_full(e):
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(folder)
        kept = f"the previous checkpoint {str(previous)!r} is intact" if previous else "no earlier checkpoint exists"
        raise AdaspecError(f"could not write the step-{step} checkpoint into {str(folder)!r} ({e}); {kept}. Free "
                           "disk space (or fix the folder's permissions) and run the same command again to resume."
                           ) from e
    if accelerator.is_main_process:
        for old in folder.iterdir():
            if old != final and (old.name.startswith("step-") or old.name.startswith(".tmp-step-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path) -> dict:
    """Load model/optimizer/RNG states of `ckpt` into the prepared objects; return its loop state. An unreadable
    (corrupt, truncated, foreign) checkpoint is an AdaspecError naming it and the way out."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("trainer_state.json has no integer 'step'")
        accelerator.load_state(str(ckpt))
    except Exception as e:  # torch.load / json / shape mismatches all mean: this checkpoint cannot be resumed
        raise AdaspecError(f"cannot resume from checkpoint {str(ckpt)!r}: it is corrupt, truncated or from another "
                           f"model ({type(e).__name__}: {str(e)[:300]}). Delete that folder to start the stage "
                           "afresh (or pass --overwrite to restart the whole run).") from None
    return state


@contextlib.contextmanager
def _closing(*things):
    """Close the progress bar and the TensorBoard writer (flushing its events) also when training raises."""
    try:
        yield
    finally:
        for thing in things:
            if thing is not None:
                thing.close()


class TrainingInterrupted(AdaspecError):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved; rerunning the command resumes."""


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (the first signal); a second signal
    raises KeyboardInterrupt at once. Only in the main thread (where Python delivers signals)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------------------
# The loop

def check_finite(loss: float, grad_norm, step: int, steps: int, desc: str, ckpt_dir: Path, precision: str) -> None:
    """AdaspecError if the step's loss (or, outside fp16, whose scaler skips such steps, its gradient norm) is
    NaN/inf. Raised before the step is recorded or saved: the newest checkpoint stays the last good one."""
    what = None
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    elif grad_norm is not None and precision != "fp16" and not math.isfinite(float(grad_norm)):
        what = f"the gradient norm is {float(grad_norm)}"
    if what is None:
        return
    last = latest_checkpoint(ckpt_dir)
    kept = (f"the last good checkpoint is {str(last)!r}" if last is not None else "no checkpoint was saved yet")
    raise AdaspecError(f"training ({desc}) diverged: {what} at step {step} of {steps}; stopped without saving that "
                       f"step ({kept}). Resuming with the same settings will likely diverge again: lower optim.lr, "
                       "raise optim.warmup_steps, set optim.max_grad_norm, use precision bf16/fp32 instead of fp16, "
                       "or check the training data.")


LossFn = Callable[[torch.nn.Module, dict, float], "tuple[torch.Tensor, dict]"]


def train(model: torch.nn.Module, dataset: Sequence, loss_fn: LossFn, *, collate: Callable, count_items: Callable,
          train_cfg: TrainConfig, optim_cfg: OptimConfig, out_dir: str | os.PathLike, accelerator=None,
          desc: str = "train", stop_at: int | None = None, progress: bool = True,
          evaluate: Callable | None = None) -> dict:
    """Train `model` (its parameters with requires_grad) on `dataset` and return the run's record.

    loss_fn(model, batch, num_items) -> (loss, stats): loss normalised by `num_items` (see the module
    docstring); stats floats summed over micro-batches and ranks ("kept", "valid", "kl_sum", ...).
    count_items(batch) -> int: valid (loss) tokens of a batch, for num_items.
    evaluate(model, step) -> dict of floats: called on the main process every `train_cfg.eval_every` steps and
    after the last one (the caller keeps what it needs, e.g. the best head so far); its records are kept in the
    loop state (so a resumed run has them) and returned as "evals".
    out_dir gets `checkpoints/` (resumed from) and `tb/`. `stop_at` ends the call after that step without a final
    checkpoint (as a kill would), for tests of resume. Returns {"model" (unwrapped), "steps", "total_steps",
    "planned_steps" (the schedule's steps before a `max_minutes` cut), "budget_steps" (the cut, None without a time
    budget), "losses" (one per step, from the first also after a resume), "tokens" (non-padding tokens seen), "stats"
    (last step), "seconds", "tokens_per_s"}."""

    acc = accelerator or make_accelerator(train_cfg)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    model, optimizer, params, state = _prepare(acc, model, train_cfg, optim_cfg, ckpt_dir, len(dataset))
    steps = state["total_steps"]
    writer = _tensorboard(acc, out_dir / "tb")
    bar = tqdm(total=steps, initial=state["step"], desc=desc, disable=not (progress and acc.is_main_process),
               dynamic_ncols=True)
    t0, tokens0, seconds0, stats_out = time.perf_counter(), state["tokens"], state.get("seconds", 0.0), {}
    step0, rate_t0 = state["step"], t0
    model.train()
    with _StopSignals() as stop, _closing(bar, writer):
        while state["step"] < steps and (stop_at is None or state["step"] < stop_at):
            step = state["step"]
            micro, num_items = _micro_batches(acc, dataset, step, train_cfg, collate, count_items)
            for group in optimizer.param_groups:
                group["lr"] = optim_cfg.lr * lr_multiplier(step, steps, optim_cfg)
            loss_sum, tokens, sums, grad_norm = _accumulate(acc, model, optimizer, params, micro, loss_fn, num_items,
                                                            optim_cfg)
            step_loss, step_tokens, interrupted, totals = _reduce_step(acc, loss_sum, tokens, stop, sums)
            check_finite(step_loss, grad_norm, step + 1, steps, desc, ckpt_dir, train_cfg.precision)
            state["tokens"] += step_tokens
            state["losses"].append(step_loss)
            state["step"] = step + 1
            elapsed = time.perf_counter() - t0
            steps, rate_t0 = _time_budget(acc, train_cfg, state, steps, step0, rate_t0, seconds0 + elapsed, bar)
            tok_s = (state["tokens"] - tokens0) / max(elapsed, 1e-9)
            stats_out = _step_stats(step_loss, optimizer.param_groups[0]["lr"], tok_s, totals, grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", kept=f"{stats_out.get('kept_frac', 1.0):.2f}",
                            tok_s=f"{tok_s:.0f}", refresh=False)
            _log_and_evaluate(acc, model, writer, state, steps, stats_out, train_cfg, evaluate, desc)
            if state["step"] % train_cfg.save_every == 0 or state["step"] == steps or interrupted:
                state["seconds"] = seconds0 + elapsed
                saved = save_checkpoint(acc, ckpt_dir, state)
            if interrupted:  # (also after the last step: the rerun finds the stage's steps done and goes on)
                by = stop.received or "a signal on another process"
                raise TrainingInterrupted(f"training ({desc}) interrupted by {by} after step {state['step']} of "
                                          f"{steps}; a checkpoint is saved in {str(saved)!r}. Run the same command "
                                          "again to resume from it.")
    return _finish(acc, model, state, steps, stats_out, seconds0, tokens0, time.perf_counter() - t0)


def _finish(acc, model, state: dict, steps: int, stats_out: dict, seconds0: float, tokens0: int,
            elapsed: float) -> dict:
    model.eval()
    unwrapped = acc.unwrap_model(model)
    acc.wait_for_everyone()
    acc.free_memory()  # forget this stage's model/optimizer so a next stage checkpoints only its own
    return {"model": unwrapped, "steps": state["step"], "total_steps": steps, "losses": state["losses"],
            "budget_steps": state.get("budget_steps"), "planned_steps": state.get("planned_steps", steps),
            "evals": state.get("evals", []),
            "tokens": state["tokens"], "stats": stats_out, "seconds": seconds0 + elapsed,
            "tokens_per_s": (state["tokens"] - tokens0) / max(elapsed, 1e-9)}


def _prepare(acc, model, train_cfg: TrainConfig, optim_cfg: OptimConfig, ckpt_dir: Path, n: int):
    """(model, optimizer) prepared by Accelerate, the trainable parameters, and the loop state: fresh, or that of
    the newest checkpoint (a stage a time budget cut keeps that schedule)."""
    steps = total_steps(n, train_cfg, acc.num_processes)
    configure_deepspeed(acc, train_cfg, optim_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                  weight_decay=optim_cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    state = {"step": 0, "losses": [], "tokens": 0, "total_steps": steps, "planned_steps": steps, "seconds": 0.0}
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        state = load_checkpoint(acc, last)
        state.setdefault("planned_steps", steps)
        if state.get("budget_steps"):
            steps = min(steps, state["budget_steps"])
        state["total_steps"] = steps
    return model, optimizer, params, state


def _tensorboard(acc, folder: Path):
    """The main process's TensorBoard writer (None elsewhere)."""
    if not acc.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def _time_budget(acc, train_cfg: TrainConfig, state: dict, steps: int, step0: int, rate_t0: float, seconds: float,
                 bar) -> tuple[int, float]:
    """train.max_minutes: once BUDGET_PROBE_STEPS steps are measured, the stage's step count is fitted to the
    time left (recorded in the state, so a resume keeps the schedule). -> (steps, start of the rate window)."""
    if train_cfg.max_minutes and not state.get("budget_steps") and state["step"] - step0 >= BUDGET_PROBE_STEPS:
        steps = state["budget_steps"] = budget_steps(acc, steps, state["step"], step0, rate_t0, seconds,
                                                     train_cfg.max_minutes * 60)
        state["total_steps"] = bar.total = steps
    if state["step"] - step0 == 2:  # the rate is measured from here (the first steps warm kernels up)
        rate_t0 = time.perf_counter()
    return steps, rate_t0


def _micro_batches(acc, dataset, step: int, train_cfg: TrainConfig, collate, count_items):
    """This rank's micro-batches of optimizer step `step` (on the device) and num_items: the valid tokens of the
    whole step over every rank, per micro-batch and rank (the loss normalisation, see the module docstring)."""
    world, gas, n = acc.num_processes, train_cfg.grad_accum, len(dataset)
    micro = [to_device(collate([dataset[i] for i in micro_batch_indices(
        step * gas + j, n, train_cfg.batch_size, train_cfg.seed, acc.process_index, world)]), acc.device)
        for j in range(gas)]
    counts = torch.tensor([float(sum(count_items(b) for b in micro))], device=acc.device)
    total = acc.reduce(counts, reduction="sum").item() if world > 1 else counts.item()
    return micro, max(total, 1.0) / (world * gas)


def _accumulate(acc, model, optimizer, params, micro, loss_fn, num_items: float, optim_cfg: OptimConfig):
    """One optimizer step over the micro-batches -> (this rank's loss, its non-padding tokens, its summed
    stats, the clipped gradient norm or None)."""
    sums: dict[str, float] = {}
    loss_sum, tokens, grad_norm = 0.0, 0, None
    for batch in micro:
        with acc.accumulate(model):
            with acc.autocast():
                loss, stats = loss_fn(model, batch, num_items)
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients and optim_cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(params, optim_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float().item() / len(micro)
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return loss_sum, tokens, sums, grad_norm


def _reduce_step(acc, loss_sum: float, tokens: int, stop, sums: dict):
    """One reduce over the ranks: every rank sees the same loss, token count, stop decision and stat totals."""
    world = acc.num_processes
    keys = sorted(sums)
    packed = torch.tensor([loss_sum, float(tokens), float(stop.received is not None)] + [sums[k] for k in keys],
                          device=acc.device, dtype=torch.float64)
    if world > 1:
        packed = acc.reduce(packed, reduction="sum")
    step_loss = packed[0].item() / world  # each rank's loss_sum is its share of the global mean
    return step_loss, int(packed[1].item()), packed[2].item() > 0, dict(zip(keys, packed[3:].tolist()))


def _step_stats(step_loss: float, lr: float, tok_s: float, totals: dict, grad_norm) -> dict:
    out = {"loss": step_loss, "lr": lr, "tokens_per_s": tok_s}
    if totals.get("valid"):
        out["kept_frac"] = totals.get("kept", totals["valid"]) / totals["valid"]
        if "kl_sum" in totals:
            out["kl"] = totals["kl_sum"] / totals["valid"]
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


def _log_and_evaluate(acc, model, writer, state: dict, steps: int, stats_out: dict, train_cfg: TrainConfig,
                      evaluate, desc: str) -> None:
    """TensorBoard scalars every log_every steps; the held-out evaluation every eval_every steps and at the end
    (main process), its record kept in the loop state."""
    step = state["step"]
    if writer is not None and (step % train_cfg.log_every == 0 or step == steps):
        for key, value in stats_out.items():
            writer.add_scalar(f"{desc}/{key}", value, step)
    if not (evaluate is not None and acc.is_main_process and train_cfg.eval_every
            and (step % train_cfg.eval_every == 0 or step == steps)):
        return
    model.eval()
    record = {"step": step, **evaluate(acc.unwrap_model(model), step)}
    model.train()
    state.setdefault("evals", []).append(record)
    if writer is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(f"{desc}/heldout_{key}", value, step)
