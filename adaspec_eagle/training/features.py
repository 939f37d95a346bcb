"""Target feature cache: run the frozen target once over a dataset and keep what head training needs on disk.

Stored per token, flattened over samples (memory-mapped numpy arrays, one file per key):
  input_ids (int32), loss_mask (uint8), features (T, H) = last hidden state after the final norm (EAGLE-1/2) and,
  for EAGLE-3, fused (T, 3H) = HF hidden_states at `models.feature_layer_ids`, in fp16 / bf16 / fp32.
  numpy has no bfloat16: bf16 is stored as its 16-bit pattern (int16) and viewed back.
No logits are stored ([T, 49152] per sample is far too big): the teacher distribution is recomputed as
target lm_head(features), exact for these post-final-norm features (up to the storage dtype).

`manifest.json` records the target identity (`models.target_identity`), a fingerprint of the data (ids and
masks), the dtype and the layout; it is written last, so a cache without it is incomplete. `open_cache` refuses
a cache built for another target (shapes, vocabulary or weights) or other data.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from adaspec_eagle import AdaspecError
from adaspec_eagle.data import collate
from adaspec_eagle.io import disk_errors, fsync_dir, fsync_tree
from adaspec_eagle.models import (
    identity_mismatch,
    target_forward_features,
    target_identity,
)

STORAGE = {"fp16": (np.float16, torch.float16), "bf16": (np.int16, torch.bfloat16), "fp32": (np.float32, torch.float32)}
FORMAT_VERSION = 1


def data_fingerprint(samples: Sequence[dict]) -> str:
    """sha256 (16 hex) over every sample's input_ids and loss_mask, in order."""
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s["input_ids"], dtype=np.int32).tobytes())
        h.update(np.asarray(s["loss_mask"], dtype=np.uint8).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def pad_batch(samples: Sequence[dict], pad_id: int = 0) -> dict:
    """`data.collate` (right-padded input_ids / attention_mask / loss_mask (B, T)) plus every float key of the
    samples, (T, D) each -> (B, T, D) zero-padded. Right padding keeps the heads' causal mask valid."""

    out = collate(samples, pad_id)
    B, T = out["input_ids"].shape
    for key, value in samples[0].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            x = torch.zeros(B, T, value.shape[-1], dtype=value.dtype)  # (B, T, D)
            for b, s in enumerate(samples):
                x[b, :len(s[key])] = s[key]
            out[key] = x
    return out


def reserve(path: Path) -> None:
    """Allocate a (sparse) file's blocks now, so a full disk is an ENOSPC here rather than a SIGBUS when the
    memory map writes into it. A no-op where the filesystem cannot preallocate."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return
            raise


def build_cache(target, samples: Sequence[dict], folder: str | os.PathLike, *, dtype: str = "fp16",
                fused: bool = False, batch_size: int = 8, pad_id: int = 0, progress: bool = True) -> "FeatureCache":
    """Run `target` (frozen) over `samples` ({"input_ids", "loss_mask"}) and write the cache to `folder`. A full
    disk is an AdaspecError and leaves no partial cache."""
    if dtype not in STORAGE:
        raise AdaspecError(f"feature cache dtype {dtype!r} is not one of {sorted(STORAGE)}.")
    if len(samples) == 0:
        raise AdaspecError("no samples to cache features for: the data slice is empty.")

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        with disk_errors("the target-feature cache", folder, "The partial cache was deleted; run the same command "
                                                              "again once there is room."):
            folder.mkdir(parents=True)
            _fill_cache(target, samples, folder, dtype, fused, batch_size, pad_id, progress)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FeatureCache(folder)


def _fill_cache(target, samples, folder: Path, dtype: str, fused: bool, batch_size: int, pad_id: int,
                progress: bool) -> None:

    np_dtype, torch_dtype = STORAGE[dtype]
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # (n + 1,)
    total, H = int(offsets[-1]), int(target.config.hidden_size)
    dims = {"features": H, **({"fused": 3 * H} if fused else {})}
    arrays = {k: np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=np_dtype, shape=(total, d))
              for k, d in dims.items()}
    for k in dims:  # a memory map grown past the free space dies with SIGBUS: claim the blocks now instead
        reserve(folder / f"{k}.npy")
    ids = np.concatenate([np.asarray(s["input_ids"], dtype=np.int32) for s in samples])
    mask = np.concatenate([np.asarray(s["loss_mask"], dtype=np.uint8) for s in samples])
    np.save(folder / "input_ids.npy", ids)
    np.save(folder / "loss_mask.npy", mask)
    np.save(folder / "offsets.npy", offsets)

    device = next(target.parameters()).device
    order = np.argsort(-lengths, kind="stable")  # long first: less padding, early out-of-memory
    bar = tqdm(total=total, desc="target features", unit="tok", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = pad_batch([samples[i] for i in idx], pad_id)
        with torch.no_grad():
            out = target_forward_features(target, batch["input_ids"].to(device),
                                          batch["attention_mask"].to(device), eagle3_layers=fused)
        for key in dims:
            x = out[key].to(torch_dtype).cpu()  # (B, T, D)
            for b, i in enumerate(idx):
                n = int(lengths[i])
                row = x[b, :n]  # (n, D)
                arrays[key][offsets[i]:offsets[i] + n] = row.view(torch.int16).numpy() if dtype == "bf16" else row.numpy()
        bar.update(int(lengths[idx].sum()))
    bar.close()
    for a in arrays.values():
        a.flush()
    manifest = {"format": FORMAT_VERSION, "target": target_identity(target), "data": data_fingerprint(samples),
                "dtype": dtype, "keys": dims, "samples": len(samples), "tokens": total}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync_tree(folder)  # the arrays reach the disk before the manifest says they are complete
    os.replace(tmp, folder / "manifest.json")  # last: its presence marks a complete cache
    fsync_dir(folder)


def cache_problem(folder: str | os.PathLike, target, samples: Sequence[dict] | None = None,
                  fused: bool = False) -> str | None:
    """Why the cache at `folder` cannot be used for `target` and `samples` (None if it can; 'missing' if absent)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return "missing"
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT_VERSION:
        return f"it has format {m.get('format')}, this version reads {FORMAT_VERSION}"
    want = target_identity(target)
    key = identity_mismatch(m["target"], want, ("hidden_size", "vocab_size", "num_hidden_layers", "fingerprint"))
    if key is not None:
        return (f"it was built for target {m['target'].get('name')!r} with {key}={m['target'].get(key)}, "
                f"the target now is {want['name']!r} with {key}={want[key]}")
    if samples is not None and m["data"] != data_fingerprint(samples):
        return "it was built from other data (the data fingerprint differs)"
    if fused and "fused" not in m["keys"]:
        return "it has no fused EAGLE-3 features"
    return None


def open_cache(folder: str | os.PathLike, target, samples: Sequence[dict] | None = None,
               fused: bool = False) -> "FeatureCache":
    """Open a complete cache built for `target` (and `samples` when given); refuse a stale one."""
    problem = cache_problem(folder, target, samples, fused)
    if problem == "missing":
        raise AdaspecError(f"no complete feature cache at {str(folder)!r} (manifest.json missing).")
    if problem:
        raise AdaspecError(f"the feature cache at {str(folder)!r} is stale: {problem}. Delete it (or rerun with "
                           "--overwrite) to rebuild it.")
    return FeatureCache(folder)


class FeatureCache:
    """A read-only, memory-mapped sequence of samples {"input_ids" (T,), "loss_mask" (T,), "features" (T, H)
    [, "fused" (T, 3H)]}, float keys as fp32 tensors."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / "manifest.json").read_text())
            self.offsets = np.load(self.folder / "offsets.npy")
            self.input_ids = np.load(self.folder / "input_ids.npy", mmap_mode="r")
            self.loss_mask = np.load(self.folder / "loss_mask.npy", mmap_mode="r")
            self.arrays = {k: np.load(self.folder / f"{k}.npy", mmap_mode="r") for k in self.manifest["keys"]}
            total = int(self.manifest["tokens"])
            bad = [k for k, a in {"input_ids": self.input_ids, "loss_mask": self.loss_mask, **self.arrays}.items()
                   if a.shape[0] != total or (k in self.arrays and a.shape[1] != int(self.manifest["keys"][k]))]
            if bad or int(self.offsets[-1]) != total:
                raise ValueError(f"{', '.join(bad) or 'offsets'} do not match the manifest's {total} tokens")
        except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
            raise AdaspecError(f"the feature cache at {str(self.folder)!r} is damaged ({e}); rerun with --overwrite "
                               "to rebuild it, or delete the folder.") from None
        self.dtype = self.manifest["dtype"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"input_ids": torch.from_numpy(self.input_ids[a:b].astype(np.int64)),
                "loss_mask": torch.from_numpy(self.loss_mask[a:b].astype(bool))}
        for key, arr in self.arrays.items():
            x = torch.from_numpy(np.array(arr[a:b]))
            if self.dtype == "bf16":
                x = x.view(torch.bfloat16)
            item[key] = x.float()  # (T, D)
        return item
