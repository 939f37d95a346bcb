"""Small-batch fp32 linear layers on the CPU, used where this machine runs them faster than `F.linear`.

A decode or verify forward multiplies 1 to a few token rows by every weight matrix. On the CPU, PyTorch's
`F.linear(x, W)` hands that to the BLAS as x @ W^T with the large weight as the packed operand. Written as W @ x^T
(the weight streamed, the few rows packed) the same product can be much cheaper or much dearer, by machine:
`python scripts/shape_costs.py infer --shape smollm2-135m --dtype fp32 --device cpu --tokens 1 2 4 8`, with
ADASPEC_SMALL_BATCH_LINEAR=1 and =0, gave for a whole SmolLM2-135M forward with two threads (torch 2.13)
24.5-29.7 ms for 1-4 tokens against stock's 40-77 ms on a 2-core AMD EPYC, but 68-72 ms against stock's
32-50 ms on a 2-core Intel Xeon. So neither is a default: the routing is decided by measurement.

`small_batch_linears(*models)` routes the fp32 CPU `nn.Linear` modules of the given models through `linear`
while it is active, for the row counts where W @ x^T won on this machine. Under ADASPEC_SMALL_BATCH_LINEAR=auto
(the default) that is measured once per process for each model's set of weight shapes and thread count
(`calibrate`: about 0.4 s for SmolLM2-135M with two threads); `1` routes every row count from 1 to `MAX_ROWS`, `0`
none. Routed products go through W @ x^T in balanced chunks of at most `CHUNK_ROWS` rows (one row is padded to
two: the one-row product is the slow one); everything else (other row counts, more rows, other dtypes or
devices, autograd) calls `F.linear` unchanged. The results equal `F.linear`'s up to float32 rounding (another
summation order), like any change of batch size; the engine's greedy outputs are checked token for token against
plain decoding in the tests and in every benchmark row.
"""

from __future__ import annotations

import contextlib
import os
import time
import types
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from adaspec_eagle import AdaspecError

MAX_ROWS = 8
"""Inputs with more rows always use `F.linear`. Measured on the AMD machine: from 10 rows the chunks cost more than
`F.linear` with one thread (with two they still won up to 12 rows)."""
CHUNK_ROWS = 4
"""Rows per W @ x^T product: where the route wins, up to 4 rows cost about the same as one; 5-8 rows run as two."""
CALIBRATION_BYTES = 128 << 20
"""`calibrate` times passes over the model's first weight matrices, up to this many bytes: many matrices of the
model's real shapes, streamed one after the other as a forward streams them, in a fraction of a second a pass."""
ALL_ROWS = frozenset(range(1, MAX_ROWS + 1))

_MODES = {"auto": "auto", "": "auto", "1": "on", "true": "on", "on": "on", "yes": "on",
          "0": "off", "false": "off", "off": "off", "no": "off"}
_CALIBRATED: dict[tuple, frozenset[int]] = {}


def mode() -> str:
    """ADASPEC_SMALL_BATCH_LINEAR: unset, `auto` or empty: "auto" (measure, the default); 1 / true / on / yes: "on"
    (every row count routed); 0 / false / off / no: "off" (PyTorch's own F.linear). Anything else is refused: a typo
    must not silently pick one."""
    value = os.environ.get("ADASPEC_SMALL_BATCH_LINEAR", "auto").strip().lower()
    if value not in _MODES:
        raise AdaspecError(f"ADASPEC_SMALL_BATCH_LINEAR={value!r}: expected auto (measure on this machine which "
                           "row counts the small-batch products speed up, the default), 1 (always use them) or 0 "
                           "(PyTorch's own F.linear); unset it or set one of those.")
    return _MODES[value]


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           rows_routed: frozenset[int] = ALL_ROWS) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as W @ x^T for fp32 CPU inputs whose row count is in `rows_routed` (see the
    module docstring)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows not in rows_routed or not 1 <= rows <= MAX_ROWS or not _applies(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        x2 = torch.cat([x2, x2.new_zeros(x2.shape)])  # a real second row: a stride-0 copy would be slow again
    chunks = -(-x2.shape[0] // CHUNK_ROWS)
    parts = [torch.mm(weight, part.t()) for part in x2.tensor_split(chunks)]  # (out, r) each
    out = (parts[0] if chunks == 1 else torch.cat(parts, dim=1))[:, :rows].t()  # (rows, out)
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def _pass_seconds(weights: list[torch.Tensor], rows: int, routed: bool, timer: Callable[[], float]) -> float:
    """One pass of `rows`-row products over `weights`, the way the engine would run them (random inputs from a
    generator of its own: the global random state is left alone)."""
    g = torch.Generator().manual_seed(rows)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=g) for w in weights}
    route = ALL_ROWS if routed else frozenset()
    start = timer()
    for w in weights:
        linear(inputs[w.shape[1]], w, None, route)
    return timer() - start


def calibrate(weights: Iterable[torch.Tensor], *, repeats: int = 2,
              timer: Callable[[], float] = time.perf_counter) -> frozenset[int]:
    """The row counts (1 to MAX_ROWS) for which W @ x^T beats F.linear on this machine over `weights` (a model's
    fp32 CPU linear weights, in forward order): each row count timed both ways in alternation, `repeats` passes
    each after one warm-up pass, the fastest pass of each compared. The route must win by 5% to be taken."""
    picked, total = [], 0
    for w in weights:  # a prefix of the model's layers, up to CALIBRATION_BYTES
        if total and total + w.numel() * 4 > CALIBRATION_BYTES:
            break
        picked.append(w)
        total += w.numel() * 4
    if not picked:
        return frozenset()
    routed = []
    with torch.no_grad():
        for rows in sorted(ALL_ROWS):
            best = {True: float("inf"), False: float("inf")}
            for i in range(repeats + 1):
                for way in (True, False):
                    seconds = _pass_seconds(picked, rows, way, timer)
                    if i:  # the first pass of each way warms up
                        best[way] = min(best[way], seconds)
            if best[True] < 0.95 * best[False]:
                routed.append(rows)
    return frozenset(routed)


def _patchable(module: torch.nn.Module) -> bool:
    # Skip modules whose forward something else already replaced (accelerate's offload hooks, DeepSpeed, ...).
    return (type(module) is torch.nn.Linear and "forward" not in module.__dict__
            and not hasattr(module, "_hf_hook") and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


def calibrations() -> list[dict]:
    """What `auto` measured in this process, one entry per model shape and thread count: the number of linear
    weights, their parameters, the thread count and the routed row counts (benchmark records keep it)."""
    return [{"linears": len(shapes), "params": sum(o * i for o, i in shapes), "threads": threads,
             "routed_rows": sorted(rows)} for (threads, shapes), rows in _CALIBRATED.items()]


def routed_rows(modules: list[torch.nn.Module]) -> frozenset[int]:
    """The row counts to route for these linear modules (one model's) under ADASPEC_SMALL_BATCH_LINEAR; auto
    measures once per process for each set of weight shapes and thread count."""
    setting = mode()
    if setting != "auto" or not modules:
        return ALL_ROWS if setting == "on" else frozenset()
    key = (torch.get_num_threads(), tuple(tuple(m.weight.shape) for m in modules))
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrate([m.weight for m in modules])
    return _CALIBRATED[key]


def _model_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if _patchable(m)]


def prepare(*models) -> None:
    """Measure now what `small_batch_linears` would measure at its first use with these models (None entries
    ignored), e.g. before timing anything."""
    for model in models:
        if model is not None:
            routed_rows(_model_linears(model))


def _routed_forward(rows_routed: frozenset[int]):
    def forward(self, x):
        return linear(x, self.weight, self.bias, rows_routed)
    return forward


@contextlib.contextmanager
def small_batch_linears(*models):
    """Within the block, the fp32 CPU `nn.Linear` modules of `models` (None entries ignored) run through `linear`
    for the row counts `routed_rows` gives for each model. Re-entrant; restores exactly the modules it changed. A
    no-op where no row count is routed. Yields the number of modules patched."""
    patched = []
    for model in models:
        if model is None:
            continue
        modules = _model_linears(model)
        rows = routed_rows(modules)
        if not rows:
            continue
        forward = _routed_forward(rows)
        for module in modules:
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
