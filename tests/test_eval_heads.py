"""scripts/eval_heads.py's breakdown: the markdown comparison of heads from their position records."""

import torch
from _helpers import load_script


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def _records(top1, accepted):
    """Position records of 4 positions with target tokens 0-3: top-1 hits, and greedy chains of 2 whose depth-1
    acceptance is `accepted[0]`, depth 2 `accepted[1]` (reached where depth 1 was accepted); the token to draft at
    depth 2 is 10 + the position."""
    acc = torch.tensor(accepted, dtype=torch.bool)
    reached = torch.stack([torch.ones(4, dtype=torch.bool), acc[0]])
    return {"token": torch.arange(4), "hit": torch.tensor(top1, dtype=torch.bool), "kl": torch.rand(4),
            "confidence": torch.full((4,), 0.5), "reached": reached, "accepted": acc & reached,
            "chain_token": torch.stack([torch.arange(4), torch.arange(4) + 10])}


def test_chains_are_compared_where_both_heads_reached_the_depth():
    first = _records([1, 1, 0, 1], [[1, 1, 0, 1], [1, 0, 0, 0]])
    other = _records([1, 1, 1, 0], [[1, 1, 1, 0], [1, 1, 1, 0]])
    text = load_script("scripts/eval_heads.py").breakdown(["runs/kd", "runs/ada"], [first, other], None, _Tok())
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # depth 1: every position; depth 2: only positions 0 and 1 were reached by both (2 by ada only, 3 by kd only)
    assert rows["1"] == "| 1 | 4 | 75.0% | 75.0% | +0.0 |"
    assert rows["2"] == "| 2 | 2 | 50.0% | 100.0% | +50.0 |"
    wins = [line for line in text.splitlines() if line.startswith("- **") and "depths 2-2" in line]
    assert wins == ["- **ada right, kd wrong** (depths 2-2, net positions, by target token): 't11' 1",
                    "- **kd right, ada wrong** (depths 2-2, net positions, by target token): "]
    # without chain records the breakdown is the teacher-forced one alone
    plain = [{k: v for k, v in r.items() if k in ("token", "hit", "kl", "confidence")} for r in (first, other)]
    short = load_script("scripts/eval_heads.py").breakdown(["runs/kd", "runs/ada"], plain, None, _Tok())
    assert "Greedy chains" not in short and "Greedy chains" in text
