"""stable_toposort: the order check that skips the sort gives what the sort would."""
from __future__ import annotations

import random

import networkx as nx
import torch
import torch.fx as fx

from asrfx.passes import graph_utils
from asrfx.passes.graph_utils import stable_toposort


def _random_graph(rng: random.Random, n: int) -> fx.Graph:
    g = fx.Graph()
    made = [g.placeholder("x"), g.placeholder("y")]
    for _ in range(n):
        args = rng.sample(made, k=min(len(made), rng.choice((1, 2))))
        made.append(g.call_function(torch.add if len(args) == 2 else torch.neg, tuple(args)))
    g.output(made[-1])
    return g


def _sorted_by_networkx(graph: fx.Graph) -> list[fx.Node]:
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    return list(nx.lexicographical_topological_sort(
        graph_utils.to_networkx(graph),
        key=lambda n: (0 if n.op == "placeholder" else 2 if n.op == "output" else 1, index[n])))


def _valid(graph: fx.Graph) -> bool:
    seen: set[fx.Node] = set()
    for n in graph.nodes:
        if any(a not in seen for a in n.all_input_nodes):
            return False
        seen.add(n)
    return True


def test_stable_toposort_matches_the_lexicographic_sort():
    disordered = sum(_shuffled_and_sorted(random.Random(seed)) for seed in range(12))
    assert disordered >= 6  # the sort itself ran, not only the check that skips it


def _shuffled_and_sorted(rng: random.Random) -> bool:
    g = _random_graph(rng, 30)
    assert _sorted_by_networkx(g) == list(g.nodes)  # a traced order is already sorted
    stable_toposort(g)
    assert _valid(g)
    # move a few nodes to random places (as rewrites insert nodes where convenient)
    body = [n for n in g.nodes if n.op == "call_function"]
    for n in rng.sample(body, k=5):
        anchor = rng.choice([m for m in g.nodes if m.op == "call_function" and m is not n])
        anchor.append(n)
    expected = _sorted_by_networkx(g)
    was_valid = _valid(g)
    stable_toposort(g)
    assert list(g.nodes) == expected
    assert _valid(g)
    g.lint()
    return not was_valid


def test_in_order_refuses_each_kind_of_disorder():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    z = g.call_function(torch.zeros, (2,))
    a = g.call_function(torch.add, (x, z))
    b = g.call_function(torch.neg, (a,))
    g.output(b)
    nodes = list(g.nodes)

    def check(order):
        return graph_utils._in_order(order, {n: i for i, n in enumerate(order)})

    assert check(nodes)
    assert not check([x, z, y, a, b, nodes[-1]])  # a placeholder after an op
    assert not check([x, y, z, a, nodes[-1], b])  # the output not last
    assert not check([x, y, z, b, a, nodes[-1]])  # a node before its input
