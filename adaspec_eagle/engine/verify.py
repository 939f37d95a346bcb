"""Verification of a draft tree against the target's logits: pure functions.

- Greedy: the longest root-to-node path whose every token equals the target's argmax at its parent, plus the
  target's argmax after that path (the bonus token). Output equals plain greedy decoding token for token.
- Stochastic: multi-candidate recursive rejection sampling from the root down. At a node with target distribution
  p and candidate children c_1..c_m, try the candidates in order:
    * children sampled i.i.d. from the draft distribution q (SpecInfer, Miao et al. 2024, Alg. 2): accept c_i with
      probability min(1, p(c_i) / q(c_i)); on rejection p <- norm(max(p - q, 0));
    * deterministic (top-k or prompt-lookup) children (a point-mass draft): accept c_i with probability p(c_i); on
      rejection p <- norm(p with c_i zeroed).
  When every candidate is rejected, the emitted token is drawn from the residual p. Each trial is one speculative
  sampling step against the current residual with a proposal drawn independently of the earlier trials, so the
  two rules can be mixed among one node's children (a sampled child, then a lookup child) and still emit
  exactly p.
"""

from __future__ import annotations

import torch

from adaspec_eagle.engine.tree import DraftTree, path_to


def warp_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (..., V) fp32 probabilities at `temperature` (> 0), restricted to the smallest set of
    tokens whose mass reaches `top_p` (nucleus sampling) and renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep a token if the mass strictly before it is below top_p (the top token always stays)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def greedy_verify(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """target_logits: (N+1, V), row i predicting the token after node i.

    Returns (accepted path of node indices from the root, bonus token)."""
    argmax = target_logits.argmax(-1)  # (N+1,)
    match = torch.ones(tree.size + 1, dtype=torch.bool)
    match[1:] = tree.tokens[1:] == argmax[tree.parents[1:]]  # (N+1,) node agrees with the target at its parent
    # a node is accepted iff it and all its ancestors match: propagate in topological order
    ok = match.clone()
    for i, p in enumerate(tree.parents.tolist()[1:], start=1):
        ok[i] &= ok[p]
    depth = torch.where(ok, tree.depth, -1)
    last = int(depth.argmax())  # deepest accepted node (children of one parent hold distinct tokens)
    return path_to(tree.parents, last), int(argmax[last])


def accept_candidates(p: torch.Tensor, candidates: list[int], q,
                      generator: torch.Generator | None = None) -> tuple[int, int]:
    """One node of recursive rejection sampling.

    p: (V,) target probabilities; candidates: the child tokens in trial order; q: (V,) the draft distribution the
    candidates were sampled from i.i.d., None for deterministic candidates, or a list giving either per candidate.
    Returns (index of the accepted candidate, its token) or (-1, token drawn from the residual distribution)."""
    p = p.float().clone()
    qs = q if isinstance(q, list) else [q] * len(candidates)
    for i, (c, q) in enumerate(zip(candidates, qs)):
        u = float(torch.rand((), generator=generator))
        if q is None:
            if u < float(p[c]):
                return i, c
            residual = p.clone()
            residual[c] = 0.0
        else:
            if float(q[c]) * u < float(p[c]):  # u < p/q without dividing by a zero q
                return i, c
            residual = (p - q.float()).clamp(min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p was all on the rejected mass; cannot happen in exact arithmetic
            break
        p = residual / total
    return -1, int(torch.multinomial(p, 1, generator=generator))


def stochastic_verify(tree: DraftTree, target_logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """target_logits: (N+1, V). Walks the tree from the root with `accept_candidates`.

    Returns (accepted path of node indices from the root, the next token drawn at the path's end)."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        p = warp_probs(target_logits[node], temperature, top_p)  # (V,)
        kids = children[node]
        if not kids:
            return path, int(torch.multinomial(p, 1, generator=generator))
        q = tree.draft_probs.get(node)
        k, tok = accept_candidates(p, [tokens[c] for c in kids],
                                   [None if c >= tree.first_grafted else q for c in kids], generator)
        if k < 0:
            return path, tok
        node = kids[k]
        path.append(node)
