"""Helpers shared by test files (tests/ is on sys.path under pytest's default import mode)."""

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
