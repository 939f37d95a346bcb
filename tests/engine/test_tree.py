"""Draft trees: ancestor masks, shapes, EAGLE-2 reranking and the expansion loop (with a scripted drafter)."""

import torch

from adaspec_eagle.config import TreeConfig
from adaspec_eagle.engine.tree import (DraftTree, ancestor_matrix, build_tree, path_to, prune, static_shape, top_budget,
                                tree_mask)


def test_ancestor_matrix_and_mask():
    #      0
    #    1   2
    #    3     4
    #          5
    parents = torch.tensor([-1, 0, 0, 1, 2, 4])
    anc = ancestor_matrix(parents)
    assert anc[5].nonzero().flatten().tolist() == [0, 2, 4, 5]
    assert anc[3].nonzero().flatten().tolist() == [0, 1, 3]
    assert anc[0].nonzero().flatten().tolist() == [0]
    mask = tree_mask(anc, prefix_len=3)
    assert mask.shape == (1, 1, 6, 9) and mask.dtype == torch.bool
    assert mask[0, 0, :, :3].all()  # the prefix is visible to every node
    assert mask[0, 0, 3, 3:].tolist() == [True, True, False, True, False, False]
    assert path_to(parents, 5) == [0, 2, 4, 5]


def test_static_shape_is_prefix_closed_and_chain_first():
    shape = static_shape(depth=4, topk=3, budget=10)
    assert len(shape) == 10
    assert all(p[:-1] in shape for p in shape if len(p) > 1)
    assert {(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)} <= shape  # the top-1 chain comes first
    assert all(max(p) < 3 and len(p) <= 4 for p in shape)
    assert static_shape(depth=3, topk=1, budget=10) == {(0,), (0, 0), (0, 0, 0)}


def test_top_budget_keeps_ancestors_on_ties():
    # node 2's child 3 has the same score as its parent (log p = 0): the parent must win the tie
    scores = torch.tensor([0.0, -1.0, -0.5, -0.5, -3.0])
    keep = top_budget(scores, 2)
    assert keep.tolist() == [0, 2, 3]
    tree = DraftTree(torch.arange(5), torch.tensor([-1, 0, 0, 2, 1]), torch.tensor([0, 1, 1, 2, 2]), scores,
                     torch.full((5,), -1))
    small = prune(tree, keep)
    assert small.parents.tolist() == [-1, 0, 1] and small.tokens.tolist() == [0, 2, 3]


class ScriptedDrafter:
    """Logits depend only on the token fed (a bigram table), so the best tree is known in advance. Records the
    arguments of every expansion to check masks and slots."""

    def __init__(self, vocab=6, seed=0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
        self.calls = []

    def expand(self, tokens, depth, parent_slots, visible):
        self.calls.append((tokens.clone(), depth.clone(), parent_slots.clone(), visible.clone()))
        return self.table[tokens]


def _brute_force_best(table, root, depth, topk, budget):
    """EAGLE-2 by hand: level-wise candidates, expand the top-k per level, rerank all."""
    logp = torch.log_softmax(table, -1)
    nodes = []  # (score, path)
    frontier = [(0.0, (root,))]
    for d in range(depth):
        level = []
        for score, path in frontier:
            top = logp[path[-1]].topk(topk)
            level += [(score + float(v), path + (int(t),)) for v, t in zip(top.values, top.indices)]
        nodes += level
        frontier = sorted(level, key=lambda x: -x[0])[:topk]
    best = sorted(nodes, key=lambda x: -x[0])[:budget]
    return sorted(p[1:] for _, p in best)


def test_dynamic_tree_matches_eagle2_selection_and_masks():
    drafter = ScriptedDrafter()
    cfg = TreeConfig(depth=3, topk=2, total_tokens=5, shape="dynamic")
    tree = build_tree(1, drafter.table[1], drafter.expand, cfg)
    assert tree.size == 5
    got = sorted(tuple(tree.tokens[path_to(tree.parents, n)[1:]].tolist()) for n in range(1, 6))
    assert got == _brute_force_best(drafter.table, 1, 3, 2, 5)
    assert len(drafter.calls) == 2  # depth 3: the root logits + one forward per deeper level
    # second expansion: 2 new nodes see the 2 forwarded depth-1 nodes only through their own parent
    tokens, depth, parent_slots, visible = drafter.calls[1]
    assert depth.tolist() == [2, 2] and visible.shape == (2, 4)
    for i in range(2):
        assert visible[i, parent_slots[i]] and visible[i, 2 + i] and visible[i].sum() == 2
    assert (tree.scores[1:] <= tree.scores[tree.parents[1:]]).all()


def test_dynamic_tree_stops_at_the_budget_depth():
    """A budget of n keeps an ancestor-closed set, so nothing deeper than n: levels past it are not drafted, and
    the tree equals the one drafted to the full depth and pruned."""
    for budget in (1, 2, 3):
        deep, cut = ScriptedDrafter(seed=3), ScriptedDrafter(seed=3)
        full = build_tree(1, deep.table[1], deep.expand, TreeConfig(depth=6, topk=2, total_tokens=budget))
        assert len(deep.calls) == budget - 1  # root logits + (budget - 1) deeper levels
        assert sorted(tuple(full.tokens[path_to(full.parents, n)[1:]].tolist()) for n in range(1, budget + 1)) == \
            _brute_force_best(deep.table, 1, 6, 2, budget)
        assert int(full.depth.max()) <= budget


def test_dynamic_tree_expands_only_nodes_whose_children_can_be_kept():
    """Level d expands at most budget - d nodes (a child of the r-th best node at depth d needs d + r kept
    nodes), and the tree still equals EAGLE-2's full top-k expansion reranked to the budget."""
    for seed in range(12):
        for topk in (2, 3, 4):
            for budget in (2, 3, 4, 6, 9):
                drafter = ScriptedDrafter(vocab=8, seed=seed)
                cfg = TreeConfig(depth=5, topk=topk, total_tokens=budget)
                tree = build_tree(1, drafter.table[1], drafter.expand, cfg)
                got = sorted(tuple(tree.tokens[path_to(tree.parents, n)[1:]].tolist())
                             for n in range(1, tree.size + 1))
                assert got == _brute_force_best(drafter.table, 1, min(5, budget), topk, budget)
                for tokens, depth, _, _ in drafter.calls:  # the frontier nodes of depth d, fed for their children
                    assert len(tokens) <= min(topk, budget - int(depth[0]))
    # budget 4, top-4: the levels expand 3, 2 and 1 nodes instead of 4, 4 and 4
    drafter = ScriptedDrafter(vocab=8, seed=0)
    build_tree(1, drafter.table[1], drafter.expand, TreeConfig(depth=4, topk=4, total_tokens=4))
    assert [len(c[0]) for c in drafter.calls] == [3, 2, 1]


def test_budget_and_depth_cuts_of_a_profiled_tree_equal_building_the_smaller_tree():
    """What the tuner assumes (`speculative.accepted_within_budget`): cutting one big profiled tree to n nodes at
    most d levels deep keeps exactly what building the (n, d) tree keeps, so every accepted path of the big
    tree is accepted by the smaller one up to its first missing node."""
    from adaspec_eagle.engine.speculative import accepted_within_budget

    for seed in range(8):
        for topk in (2, 4):
            drafter = ScriptedDrafter(vocab=8, seed=seed)
            big = build_tree(1, drafter.table[1], drafter.expand, TreeConfig(depth=5, topk=topk, total_tokens=64))
            paths = {n: tuple(big.tokens[path_to(big.parents, n)[1:]].tolist()) for n in range(1, big.size + 1)}
            for budget in (1, 2, 3, 4, 6):
                for depth in range(1, min(5, budget) + 1):
                    small = build_tree(1, drafter.table[1], ScriptedDrafter(vocab=8, seed=seed).expand,
                                       TreeConfig(depth=depth, topk=topk, total_tokens=budget))
                    kept = {tuple(small.tokens[path_to(small.parents, n)[1:]].tolist())
                            for n in range(1, small.size + 1)}
                    for node, tokens in paths.items():
                        want = next((i for i in range(len(tokens)) if tokens[:i + 1] not in kept), len(tokens))
                        got = accepted_within_budget(big, path_to(big.parents, node), budget, max_depth=depth)
                        assert got == want, (seed, topk, budget, depth, tokens)


def test_chain_and_static_trees():
    drafter = ScriptedDrafter(seed=1)
    chain = build_tree(2, drafter.table[2], drafter.expand, TreeConfig(depth=4, topk=3, total_tokens=9, shape="chain"))
    assert chain.parents.tolist() == [-1, 0, 1, 2, 3]
    expect, tok = [], 2
    for _ in range(4):
        tok = int(drafter.table[tok].argmax())
        expect.append(tok)
    assert chain.tokens[1:].tolist() == expect
    drafter = ScriptedDrafter(seed=1)
    static = build_tree(2, drafter.table[2], drafter.expand, TreeConfig(depth=3, topk=3, total_tokens=7,
                                                                        shape="static"))
    assert static.size == 7
    # (rank sum, depth) order: the top-1 chain, then rank-1 deviations; depth 1 holds the root's top-2
    assert static.depth.tolist() == [0, 1, 1, 2, 2, 2, 3, 3]  # 0,1 | 00,01,10 | 000,001
    assert static.tokens[1:3].tolist() == drafter.table[2].topk(2).indices.tolist()
    chain = build_tree(2, drafter.table[2], drafter.expand, TreeConfig(depth=6, topk=1, total_tokens=3, shape="chain"))
    assert chain.size == 3  # the budget caps a chain


def test_sampled_chain_records_draft_distribution():
    drafter = ScriptedDrafter(seed=2)

    def sample(logits):
        q = torch.softmax(logits, -1)
        return int(q.argmin()), q  # any rule; the tree must record what it sampled from

    tree = build_tree(0, drafter.table[0], drafter.expand, TreeConfig(depth=3, shape="chain"), sample)
    assert sorted(tree.draft_probs) == [0, 1, 2]
    assert int(tree.tokens[1]) == int(torch.softmax(drafter.table[0], -1).argmin())


def test_graft_chain_follows_existing_children_then_appends():
    from adaspec_eagle.engine.tree import graft_chain, prune

    #      root(9) -> 4 -> 6 ; root -> 5
    tree = DraftTree(torch.tensor([9, 4, 5, 6]), torch.tensor([-1, 0, 0, 1]), torch.tensor([0, 1, 1, 2]),
                     torch.tensor([0.0, -0.1, -0.5, -0.3]), torch.tensor([-1, 0, 1, -1]))
    same, added = graft_chain(tree, [4, 6])
    assert added == 0 and same is tree  # the chain is already in the tree
    grown, added = graft_chain(tree, [4, 6, 7, 8])  # follows 4 -> 6, hangs 7 -> 8 below 6
    assert added == 2 and grown.grafted == 2
    assert grown.tokens.tolist() == [9, 4, 5, 6, 7, 8] and grown.parents.tolist() == [-1, 0, 0, 1, 3, 4]
    assert grown.depth.tolist() == [0, 1, 1, 2, 3, 4] and grown.slots.tolist()[-2:] == [-1, -1]
    assert torch.isinf(grown.scores[-2:]).all()
    side, added = graft_chain(grown, [4, 3])  # a new sibling under 4
    assert added == 1 and side.grafted == 3 and side.parents.tolist()[-1] == 1
    for node, kids in enumerate(side.children()):  # children of one parent stay distinct
        assert len({int(side.tokens[k]) for k in kids}) == len(kids), node
    cut = prune(side, torch.tensor([0, 1, 3, 4, 6]))  # drop the root's other child and the 8
    assert cut.grafted == 2 and cut.tokens.tolist() == [9, 4, 6, 7, 3]
    assert graft_chain(tree, [])[1] == 0
