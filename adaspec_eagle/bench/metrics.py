"""Benchmark metrics: pure functions of the engine's step records (INTERFACES.md "stats contract": one record
per target verification forward, {"accepted": draft tokens accepted, bonus excluded, "drafted": draft tokens
verified}) and of repeated timings. Definitions:

  tau    = tokens emitted per target forward, the bonus token included: the tokens a generation kept over its
           forwards (its last forward's verified tokens past max_new_tokens, EOS or a stop string are not
           emitted); mean(accepted + 1) over the forwards when the kept count is not given.
  alpha  = the paper's acceptance rate for greedy chain drafting with gamma = 4:
           sum(accepted) / (sum(accepted) + number of rounds with accepted < gamma)  (one rejection per round).
  accepted/drafted = sum(accepted) / sum(drafted), as vLLM reports acceptance.
  speedup = method tokens/s / plain-decoding tokens/s, same target, prompts, machine and run.
"""

from __future__ import annotations

import numpy as np

PAPER_GAMMA = 4


def tau(steps: list[dict], emitted: int | None = None) -> float:
    """Tokens emitted per target forward: `emitted` (the tokens the generations kept) / forwards, else the mean
    accepted length with the bonus token, mean(accepted + 1), which also counts a last forward's tokens past the
    generation's end."""
    if not steps:
        return float("nan")
    if emitted is not None:
        return emitted / len(steps)
    return sum(s["accepted"] + 1 for s in steps) / len(steps)


def paper_alpha(steps: list[dict], gamma: int = PAPER_GAMMA) -> float:
    """AdaSPEC's alpha for greedy chain drafting with `gamma` tokens a round: accepted / (accepted + rejected),
    where a round that accepts fewer than gamma drafts has exactly one rejection (drafts after the first
    rejected one are never judged)."""
    accepted = sum(s["accepted"] for s in steps)
    rejected = sum(1 for s in steps if s["accepted"] < gamma)
    return accepted / (accepted + rejected) if accepted + rejected else float("nan")


def drafted_acceptance(steps: list[dict]) -> float:
    """Accepted draft tokens over drafted (verified) draft tokens, as vLLM reports acceptance."""
    drafted = sum(s["drafted"] for s in steps)
    return sum(s["accepted"] for s in steps) / drafted if drafted else float("nan")


def acceptance_by_position(steps: list[dict], depth: int) -> list[float]:
    """[P(accepted >= j) for j = 1..depth]: the fraction of forwards whose accepted path reaches position j."""
    n = len(steps)
    return [sum(1 for s in steps if s["accepted"] >= j) / n if n else float("nan") for j in range(1, depth + 1)]


def accepted_length_histogram(steps: list[dict], depth: int) -> list[int]:
    """Counts of forwards by accepted draft length 0..depth (lengths above depth fall in the last bin)."""
    counts = [0] * (depth + 1)
    for s in steps:
        counts[min(int(s["accepted"]), depth)] += 1
    return counts


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def spread(values: list[float]) -> dict:
    """Median with min/max and the interquartile range of repeated measurements."""

    v = np.asarray([x for x in values if x == x], dtype=float)  # drop NaN
    if v.size == 0:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "min": float(v.min()), "max": float(v.max()), "q1": float(q1),
            "q3": float(q3), "n": int(v.size)}


def summarize_steps(steps: list[dict], depth: int, gamma: int | None = None, emitted: int | None = None) -> dict:
    """All acceptance metrics of one method on one suite. `gamma` is the chain length when the method drafts
    a greedy chain (alpha is only defined then); None for trees. `emitted`: the tokens the generations kept (tau);
    the acceptance metrics count what verification accepted."""
    return {
        "steps": len(steps),
        "tau": or_none(tau(steps, emitted)),
        "alpha": or_none(paper_alpha(steps, gamma)) if gamma else None,
        "alpha_gamma": gamma,
        "accepted_per_drafted": or_none(drafted_acceptance(steps)),
        "acceptance_by_position": [or_none(x) for x in acceptance_by_position(steps, depth)],
        "accepted_length_hist": accepted_length_histogram(steps, depth),
    }


def or_none(x: float) -> float | None:
    """JSON has no NaN: undefined figures are null."""
    return None if x != x else float(x)
