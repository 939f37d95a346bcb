"""Small-batch fp32 linear layers on the CPU: the matrix-product formulation the engine's forwards run in.

A decode or verify forward multiplies 1 to a few token rows by every weight matrix. On the CPU, PyTorch's
`F.linear(x, W)` hands that to the BLAS as x @ W^T with the large weight as the packed operand, which for a few rows
is far from the memory bandwidth the product needs: measured on this project's 2-core AMD EPYC (torch 2.13, MKL),
a whole SmolLM2-135M forward costs 40 ms for 1 token and 60-77 ms for 2-4 tokens with two threads. Written as
W @ x^T (the weight streamed, the few rows packed) the same forwards take 25-30 ms for 1-4 tokens (one thread:
34-46 ms against 41-81 ms): `python scripts/shape_costs.py infer --shape smollm2-135m --dtype fp32 --device cpu
--tokens 1 2 3 4 6 8`, with and without ADASPEC_SMALL_BATCH_LINEAR=0.

`small_batch_linears(*models)` routes the `nn.Linear` modules of the given models through `linear` while it is
active: fp32 CPU inputs of at most `MAX_ROWS` rows go through W @ x^T in balanced chunks of at most `CHUNK_ROWS`
rows (one row is padded to two: the one-row product is the slow one); everything else (more rows, other dtypes or
devices, autograd) calls `F.linear` unchanged. The results equal `F.linear`'s up to float32 rounding (another
summation order), like any change of batch size; the engine's greedy outputs are checked token for token against
plain decoding in the tests and in every benchmark row. `ADASPEC_SMALL_BATCH_LINEAR=0` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch
import torch.nn.functional as F

from adaspec_eagle import AdaspecError

MAX_ROWS = 8
"""Inputs with more rows use `F.linear`. Measured here: from 10 rows the chunks cost more than `F.linear` with one
thread (with two they still win up to 12 rows); 8 is where neither thread count loses."""
CHUNK_ROWS = 4
"""Rows per W @ x^T product: up to 4 rows cost about the same as one on this CPU; 5-8 rows run as two chunks."""


_ON, _OFF = ("1", "true", "on", "yes", ""), ("0", "false", "off", "no")


def enabled() -> bool:
    """The environment variable ADASPEC_SMALL_BATCH_LINEAR: unset or 1 / true / on / yes: True; 0 / false / off /
    no: False; anything else is refused (a typo must not silently leave it on)."""
    value = os.environ.get("ADASPEC_SMALL_BATCH_LINEAR", "1").strip().lower()
    if value not in _ON + _OFF:
        raise AdaspecError(f"ADASPEC_SMALL_BATCH_LINEAR={value!r}: expected 1 (small-batch linear layers on, the "
                           "default) or 0 (PyTorch's own F.linear); unset it or set one of those.")
    return value in _ON


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as W @ x^T for small fp32 CPU batches (see the module docstring)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 <= rows <= MAX_ROWS or not _applies(x, weight):
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


def _linear_forward(self, x):
    return linear(x, self.weight, self.bias)


def _patchable(module: torch.nn.Module) -> bool:
    # Skip modules whose forward something else already replaced (accelerate's offload hooks, DeepSpeed, ...).
    return (type(module) is torch.nn.Linear and "forward" not in module.__dict__
            and not hasattr(module, "_hf_hook") and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


@contextlib.contextmanager
def small_batch_linears(*models):
    """Within the block, the fp32 CPU `nn.Linear` modules of `models` (None entries ignored) run through `linear`.
    Re-entrant; restores exactly the modules it changed. A no-op when `enabled()` is False."""
    patched = []
    if enabled():
        for model in models:
            if model is None:
                continue
            for module in model.modules():
                if _patchable(module):
                    module.forward = types.MethodType(_linear_forward, module)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
