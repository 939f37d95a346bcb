"""Draft trees: the `DraftTree` record, tree attention masks from ancestors, position ids, the three tree shapes
(chain, static, dynamic) and the one expansion loop that grows any of them from any drafter.

Node 0 is the root: the last accepted token, whose target logits are not computed yet. Nodes are numbered in
topological order (a parent before its children). A node at depth d sits at position `start + d` where `start`
is the root's position, and attends to the cached prefix plus its ancestors and itself (SpecInfer / EAGLE).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

import torch

from adaspec_eagle.config import TreeConfig
from adaspec_eagle.models.heads import to_vocab


@dataclass
class DraftTree:
    """A draft token tree. All tensors are (N+1,) with node 0 the root; N draft tokens."""

    tokens: torch.Tensor  # (N+1,) long
    parents: torch.Tensor  # (N+1,) long, parents[0] = -1
    depth: torch.Tensor  # (N+1,) long, depth[0] = 0
    scores: torch.Tensor  # (N+1,) float, cumulative draft log-probability (root 0)
    slots: torch.Tensor  # (N+1,) long: offset of the node in the drafter's tree cache, -1 if never forwarded
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    """node -> the draft distribution (V,) its drafted children were *sampled* from; nodes absent here had their
    children picked deterministically (top-k), which selects the verification rule."""
    grafted: int = 0
    """The last `grafted` nodes came from prompt lookup (`graft_chain`): deterministic candidates wherever they
    hang, whatever `draft_probs` says of their parent."""

    @property
    def size(self) -> int:
        """Number of draft tokens (root excluded)."""
        return int(self.tokens.numel()) - 1

    @property
    def first_grafted(self) -> int:
        """Index of the first prompt-lookup node (`size + 1` when there is none)."""
        return self.size + 1 - self.grafted

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.size + 1)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            kids[p].append(i)
        return kids

    def ancestors(self) -> torch.Tensor:
        """(N+1, N+1) bool: [i, j] = node j is node i or one of its ancestors."""
        return ancestor_matrix(self.parents)

    @staticmethod
    def root_only(token: int) -> "DraftTree":
        z = torch.zeros(1, dtype=torch.long)
        return DraftTree(torch.tensor([token]), z - 1, z, torch.zeros(1), z - 1)


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """(N,) parents in topological order (-1 for roots) -> (N, N) bool, [i, j] = j is i or an ancestor of i."""
    n = int(parents.numel())
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            anc[i] |= anc[p]  # parent row is final: parents come first
    return anc


def tree_mask(visible: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(Q, M) bool visibility among tree tokens -> (1, 1, Q, prefix_len + M) bool: the prefix is always visible."""
    q = visible.shape[0]
    return torch.cat([torch.ones(q, prefix_len, dtype=torch.bool), visible], dim=1)[None, None]


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    """Node indices from the root down to `node`."""
    path, p = [], node
    plist = parents.tolist()
    while p >= 0:
        path.append(p)
        p = plist[p]
    return path[::-1]


def static_shape(depth: int, topk: int, budget: int) -> set[tuple[int, ...]]:
    """A fixed tree independent of draft scores: the `budget` rank paths (ranks < topk, length <= depth) with the
    smallest (sum of ranks, depth) — the top-1 chain first, then one-off deviations. Closed under prefixes."""
    heap = [(r, 1, (r,)) for r in range(topk)]
    heapq.heapify(heap)
    chosen: set[tuple[int, ...]] = set()
    while heap and len(chosen) < budget:
        cost, d, path = heapq.heappop(heap)
        chosen.add(path)
        if d < depth:
            for r in range(topk):
                heapq.heappush(heap, (cost + r, d + 1, path + (r,)))
    return chosen


def top_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (ascending) of the `budget` best draft nodes by cumulative score, root always kept.

    A child's score never exceeds its parent's, and a stable sort keeps the (earlier) parent first on ties, so
    the kept set is closed under ancestors (EAGLE-2's reranking)."""
    order = torch.sort(scores[1:], descending=True, stable=True).indices[:budget] + 1  # (budget,)
    return torch.cat([torch.zeros(1, dtype=torch.long), order.sort().values])


def prune(tree: DraftTree, keep: torch.Tensor) -> DraftTree:
    """The subtree of nodes `keep` (ascending, ancestor-closed, containing 0), renumbered."""
    remap = torch.full((tree.size + 1,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    parents = tree.parents[keep]
    parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
    probs = {int(remap[n]): q for n, q in tree.draft_probs.items() if remap[n] >= 0}
    grafted = int((keep >= tree.first_grafted).sum())
    return DraftTree(tree.tokens[keep], parents, tree.depth[keep], tree.scores[keep], tree.slots[keep], probs,
                     grafted)


# An expansion step: (tokens (n,), depth (n,), parent_slots (n,) with -1 = root, visible (n, S + n) bool over the
# S tree nodes already forwarded plus the n new ones) -> draft logits (n, V), or (n, Vd) over `vocab_ids`.
ExpandFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _children(frontier, frontier_logits, batched: bool, cfg: TreeConfig, vocab_ids, shape, ranks, sample, probs):
    """Per frontier node: (child tokens, their ranks, their draft log-probs)."""
    if batched:  # the top-k children of every frontier node, one device sync per level
        k = min(1 if cfg.shape == "chain" else cfg.topk, frontier_logits.shape[-1])
        top = torch.log_softmax(frontier_logits.float(), dim=-1).topk(k, dim=-1)  # (n, k) values and ids
        ids = top.indices.cpu() if vocab_ids is None else vocab_ids[top.indices.cpu()]
        return [(picks, range(k), logps) for picks, logps in zip(ids.tolist(), top.values.cpu().tolist())]
    children = []  # static ranks, or a sampled chain: node by node
    for node, logits in zip(frontier, frontier_logits):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        if shape is not None:
            want = [r for r in range(cfg.topk) if ranks[node] + (r,) in shape]
            picks = logp.topk(max(want) + 1).indices[want].tolist() if want else []
            child_ranks = want
        else:
            tok, probs[node] = sample(logits)
            picks, child_ranks = [tok], [0]
        children.append((picks, child_ranks, [float(logp[t]) for t in picks]))
    return children


def _next_frontier(level, shape, cfg: TreeConfig, ranks, scores, budget: int, d: int) -> list[int]:
    """The nodes of level d the next level expands."""
    if shape is not None:
        return [n for n in level if any(ranks[n] + (r,) in shape for r in range(cfg.topk))]
    if cfg.shape == "chain":
        return level
    # a child of the r-th best node of level d is kept only if d + r <= budget (`top_budget`)
    width = min(cfg.topk, len(level), budget - d)
    best = torch.tensor([scores[n] for n in level]).topk(width).indices
    return sorted(level[i] for i in best.tolist())


def _visibility(frontier, parents, slots, n_forwarded: int):
    """Visibility of the new nodes over the already-forwarded nodes and themselves (ancestors, by their drafter
    cache slots, and self; the new nodes get slots here) -> (visible (n, n_forwarded + n), parent slots (n,))."""
    n_new = len(frontier)
    visible = torch.zeros(n_new, n_forwarded + n_new, dtype=torch.bool)
    for i, node in enumerate(frontier):
        slots[node] = n_forwarded + i
        p = parents[node]
        while p > 0:
            visible[i, slots[p]] = True
            p = parents[p]
        visible[i, slots[node]] = True
    return visible, torch.tensor([slots[parents[n]] for n in frontier])


def build_tree(root_token: int, root_logits: torch.Tensor, expand: ExpandFn, cfg: TreeConfig,
               sample: Callable[[torch.Tensor], tuple[int, torch.Tensor]] | None = None,
               vocab_ids: torch.Tensor | None = None, vocab_size: int | None = None) -> DraftTree:
    """Grow a draft tree level by level with one batched drafter forward per level.

    root_logits: (V,) the drafter's logits for the token after the root ((Vd,) with `vocab_ids`).
    cfg.shape: 'chain' (one child per level, `depth` levels), 'static' (`static_shape`: fixed ranks), or
    'dynamic' (EAGLE-2: each level expands the `topk` best nodes of the previous level by cumulative log-prob,
    each into its `topk` best children; finally the `total_tokens` best nodes overall are kept). Level d expands
    at most `total_tokens - d` nodes: a kept child of the r-th best node at depth d comes with its d ancestors and
    the r - 1 better nodes at depth d, so r > total_tokens - d would be pruned anyway.
    sample: for a chain only, draw each child from the draft distribution instead of taking the argmax:
    logits (V,) -> (token, probs (V,) it was drawn from); recorded in `draft_probs` for stochastic verification.
    vocab_ids: the drafter's logits cover only these target ids (Vd,) (a restricted draft vocabulary, whose other
    ids would be -inf); the top-k children are picked over them and mapped back: the same choice, with softmax
    and top-k over Vd ids instead of the whole vocabulary. Static and sampled trees scatter them into the whole
    vocabulary (`vocab_size` ids) first, so `sample` always sees (V,) logits.
    """
    budget = cfg.total_tokens
    depth_max = cfg.draft_depth  # (a dynamic tree's kept set is ancestor-closed, `top_budget`)
    shape = static_shape(depth_max, cfg.topk, budget) if cfg.shape == "static" else None
    tokens, parents, depth, scores, slots = [root_token], [-1], [0], [0.0], [-1]
    ranks: list[tuple[int, ...]] = [()]
    probs: dict[int, torch.Tensor] = {}
    frontier, frontier_logits, n_forwarded = [0], root_logits[None], 0
    batched = shape is None and (sample is None or cfg.shape != "chain")
    if vocab_ids is not None and not batched:
        frontier_logits = to_vocab(frontier_logits, vocab_ids, vocab_size)
    for d in range(1, depth_max + 1):
        level = []
        children = _children(frontier, frontier_logits, batched, cfg, vocab_ids, shape, ranks, sample, probs)
        for node, (picks, child_ranks, logps) in zip(frontier, children):
            for tok, r, lp in zip(picks, child_ranks, logps):
                tokens.append(tok), parents.append(node), depth.append(d), slots.append(-1)
                scores.append(scores[node] + lp)
                ranks.append(ranks[node] + (r,))
                level.append(len(tokens) - 1)
        if d == depth_max or not level:
            break
        frontier = _next_frontier(level, shape, cfg, ranks, scores, budget, d)
        if not frontier:
            break
        n_new = len(frontier)
        visible, parent_slots = _visibility(frontier, parents, slots, n_forwarded)
        frontier_logits = expand(torch.tensor([tokens[n] for n in frontier]), torch.tensor([d] * n_new),
                                 parent_slots, visible)
        if vocab_ids is not None and not batched:
            frontier_logits = to_vocab(frontier_logits, vocab_ids, vocab_size)
        n_forwarded += n_new
    tree = DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depth), torch.tensor(scores),
                     torch.tensor(slots), probs)
    if tree.size > budget:
        tree = prune(tree, top_budget(tree.scores, budget))
    return tree


def graft_chain(tree: DraftTree, chain: list[int]) -> tuple[DraftTree, int]:
    """`tree` with the token chain `chain` hung from its root: follow existing children while they hold the
    chain's tokens, then append the rest as new nodes (slot -1: no drafter forwarded them; score -inf: ranked
    below every drafted node). Children of one parent stay distinct. Returns (tree, number of nodes added)."""
    if not chain:
        return tree, 0
    tokens, children = tree.tokens.tolist(), tree.children()
    node, i = 0, 0
    while i < len(chain):
        child = next((c for c in children[node] if tokens[c] == chain[i]), None)
        if child is None:
            break
        node, i = child, i + 1
    rest = chain[i:]
    if not rest:
        return tree, 0
    n0, k = len(tokens), len(rest)
    new_parents = torch.tensor([node] + list(range(n0, n0 + k - 1)))
    return DraftTree(torch.cat([tree.tokens, torch.tensor(rest, dtype=torch.long)]),
                     torch.cat([tree.parents, new_parents]),
                     torch.cat([tree.depth, int(tree.depth[node]) + torch.arange(1, k + 1)]),
                     torch.cat([tree.scores, torch.full((k,), float("-inf"))]),
                     torch.cat([tree.slots, torch.full((k,), -1, dtype=torch.long)]),
                     dict(tree.draft_probs), tree.grafted + k), k
