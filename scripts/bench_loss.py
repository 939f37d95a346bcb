"""The AdaSPEC reference code's loss formula (`tests/_reference_loss.py`, the tests' oracle) against ours
(`losses.adaspec_loss`) on the same random inputs in one run: forward+backward time and peak extra memory.

    python scripts/bench_loss.py            # CPU defaults; --device cuda on a GPU, --json for a record

Measurements
- time: median wall time of `--reps` forward+backward runs after `--warmup` runs (CUDA synchronised).
- CUDA memory: torch.cuda.max_memory_allocated() minus the memory allocated before the run (inputs excluded).
- CPU memory: the kernel's resident-set high-water mark (VmHWM in /proc/self/status), reset before each
  measured run by writing 5 to /proc/self/clear_refs, minus the resident set just before the run (inputs
  excluded). glibc's free heap is trimmed (malloc_trim) first so that reused heap pages count as new. This is
  exact (no sampling). Where clear_refs is unavailable, RSS is sampled every 0.5 ms in a thread (psutil) and the
  report says so. The student-logits gradient counts as extra memory for both.
- On a CPU shared with other busy processes every multi-threaded op pays for waking its threads; ours runs
  more (smaller) ops than the AdaSPEC reference code, so `--threads 1` gives the cleaner comparison there.
Both losses see the raw model outputs (B, T, V) and labels (B, T) with -100 on prompt tokens; the AdaSPEC reference code shifts
inside, ours receives the unshifted logits with the shifted mask (last position False), which is the same loss.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import threading
import time

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _reference_loss import IGNORE_INDEX, reference_loss  # noqa: E402

from adaspec_eagle import AdaspecError  # noqa: E402
DEFAULTS = {"cpu": dict(B=4, T=512, V=49152, dtype="float32", chunk=256),
            "cuda": dict(B=16, T=512, V=51200, dtype="bfloat16", chunk=256)}


# ------------------------------------------------------------------------------------------------ CPU memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuPeak:
    """Peak resident memory above the current level during a `with` block, in bytes (see module docstring)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _status_kib("VmHWM")
            self.method = "kernel VmHWM high-water mark (reset via /proc/self/clear_refs), exact"
        except OSError:
            self.method = "RSS sampled every 0.5 ms with psutil (may miss short peaks)"
        self.peak = 0

    def __enter__(self):
        _trim()
        if self.method.startswith("kernel"):
            self.base = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            import psutil

            proc, self._stop, self._max = psutil.Process(), False, 0
            self.base = proc.memory_info().rss

            def sample():
                while not self._stop:
                    self._max = max(self._max, proc.memory_info().rss)
                    time.sleep(0.0005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.method.startswith("kernel"):
            top = _status_kib("VmHWM") * 1024
        else:
            self._stop = True
            self._thread.join()
            top = self._max
        self.peak = max(0, top - self.base)
        return False


# ------------------------------------------------------------------------------------------------ benchmark

def make_inputs(B, T, V, dtype, device, seed=0, prompt_frac=0.25):
    """Random student (leaf), target and reference logits (B, T, V) and labels (B, T) with masked prompts."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = g if torch.device(device).type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    out = []
    for scale in (2.0, 2.5, 2.0):
        x = torch.empty(B, T, V, dtype=dtype, device=device)
        for b in range(B):  # fill per sequence to keep the fp32 temporary small
            x[b] = (scale * torch.randn(T, V, generator=gd, device=device)).to(dtype)
        out.append(x)
    student, target, ref = out
    student.requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        labels[b, : max(1, int(prompt_frac * T * (0.5 + b / max(B, 1))))] = IGNORE_INDEX
    return student, target, ref, labels.to(device)


def run_bench(B, T, V, k=0.4, dtype="float32", device="cpu", chunk_size=256, reps=5, warmup=1, seed=0) -> dict:
    from adaspec_eagle.config import LossConfig
    from adaspec_eagle.training.losses import adaspec_loss

    if device == "cuda" and not torch.cuda.is_available():
        raise AdaspecError("--device cuda requested but CUDA is not available: use --device cpu.")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    student, target, ref, labels = make_inputs(B, T, V, tdtype, device, seed)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # shifted mask on unshifted logits: position t predicts t+1
    n_valid = int(mask.sum())
    cfg = LossConfig(kind="adaspec", k=k, reduction="num_items", chunk_size=chunk_size)
    methods = {
        "reference": lambda: reference_loss(student, target, ref, labels, k, n_valid),
        "ours": lambda: adaspec_loss(student, target, ref, mask, cfg, n_valid)[0],
    }
    cuda = device == "cuda"

    def once(fn):
        loss = fn()
        loss.backward()
        student.grad = None
        return float(loss.detach())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    result = {"device": device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
              "threads": torch.get_num_threads(), "B": B, "T": T, "V": V, "dtype": dtype, "k": k,
              "chunk_size": chunk_size, "valid_tokens": n_valid, "reps": reps, "warmup": warmup,
              "torch": torch.__version__}
    losses = {}
    for name, fn in methods.items():
        for _ in range(warmup):
            losses[name] = once(fn)
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            losses[name] = once(fn)
            sync()
            peak = torch.cuda.max_memory_allocated() - base
            result["memory_method"] = "torch.cuda.max_memory_allocated() minus allocated before the run"
        else:
            meter = CpuPeak()
            with meter:
                losses[name] = once(fn)
            peak = meter.peak
            result["memory_method"] = "CPU " + meter.method
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            once(fn)
            sync()
            times.append(time.perf_counter() - t0)
        result[name] = {"time_ms": 1000 * statistics.median(times), "peak_extra_bytes": int(peak),
                        "loss": losses[name]}
    result["time_ratio"] = result["ours"]["time_ms"] / result["reference"]["time_ms"]
    result["memory_ratio"] = result["ours"]["peak_extra_bytes"] / max(1, result["reference"]["peak_extra_bytes"])
    result["loss_rel_diff"] = abs(losses["ours"] - losses["reference"]) / max(abs(losses["reference"]), 1e-30)
    return result


def format_report(r: dict) -> str:
    gib = 2 ** 30
    lines = [f"bench-loss on {r['device_name']} ({r['threads']} threads), torch {r['torch']}: B={r['B']} T={r['T']} "
             f"V={r['V']} {r['dtype']} logits, k={r['k']}, chunk={r['chunk_size']}, valid tokens={r['valid_tokens']},"
             f" median of {r['reps']} after {r['warmup']} warm-up",
             f"memory: {r['memory_method']}",
             f"{'':8}{'fwd+bwd time':>14}{'peak extra memory':>20}{'loss':>14}"]
    for name in ("reference", "ours"):
        m = r[name]
        lines.append(f"{name:8}{m['time_ms']:>11.1f} ms{m['peak_extra_bytes'] / gib:>16.3f} GiB{m['loss']:>14.6f}")
    lines.append(f"{'ratio':8}{r['time_ratio']:>13.3f}x{r['memory_ratio']:>19.3f}x   (ours / reference)")
    lines.append(f"loss relative difference ours vs reference: {r['loss_rel_diff']:.2e}")
    return "\n".join(lines)


def cmd_bench_loss(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = DEFAULTS["cuda" if device == "cuda" else "cpu"]
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run_bench(B=args.batch_size or d["B"], T=args.seq_len or d["T"], V=args.vocab or d["V"], k=args.k,
                  dtype=args.dtype or d["dtype"], device=device, chunk_size=args.chunk_size or d["chunk"],
                  reps=args.reps, warmup=args.warmup, seed=args.seed)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-B", "--batch-size", type=int, help="sequences (default: 4 on CPU, 16 on CUDA)")
    p.add_argument("-T", "--seq-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("-V", "--vocab", type=int, help="vocabulary size (default: 49152 on CPU, 51200 on CUDA)")
    p.add_argument("--k", type=float, default=0.4, help="AdaSPEC kept fraction (default 0.4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="logits dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk of our loss (default 256)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    try:
        return cmd_bench_loss(p.parse_args(argv))
    except AdaspecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
