"""Helpers shared by test files (tests/ is on sys.path under pytest's default import mode)."""

import importlib.util
import json
import random
from pathlib import Path

import torch


def samples(n=8, T=24, seed=0, vocab=102):
    """Random token sequences; the second half of each is 'assistant' (loss) tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = T - (i % 3)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 2:] = True
        out.append({"input_ids": torch.randint(5, vocab, (length,), generator=g), "loss_mask": mask})
    return out


def chat_file(path, n=24, seed=0, assistant=True):
    """A JSONL file of n short random chats (user turn, then an assistant turn unless `assistant=False`)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "yes", "no", "maybe"]
    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=4))}]
            if assistant:
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=8))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def load_script(relpath):
    """A script under the repository root (e.g. "scripts/heads_table.py") imported as a module, for its tests."""
    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
