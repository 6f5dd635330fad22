"""DCT's exact consistency solver: constraints, ties, infeasible labels, and brute force agreement."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from closedloop.errors import UserError
from closedloop.methods.dct_solver import InfeasibleLabels, log_prob, own_labels, solve, violations

I, C = "implies", "contradicts"


def brute_force(p, edges, fixed):
    """The best feasible assignment under the documented key (log-prob within 1e-9, then fewer
    flips, then true at the lowest index), or None when nothing is feasible."""
    own = own_labels(p)
    best = None
    for labels in itertools.product([True, False], repeat=len(p)):
        if violations(labels, edges, fixed):
            continue
        key = (-log_prob(p, labels), sum(labels[i] != own[i] for i in range(len(p)) if i not in fixed),
               tuple(not x for x in labels))
        if best is None or key[0] < best[0][0] - 1e-9 or (abs(key[0] - best[0][0]) <= 1e-9 and key[1:] < best[0][1:]):
            best = (key, list(labels))
    return best


def test_implication_flips_the_cheaper_end():
    # premise 0.9, conclusion 0.2: T,T = .9*.2 = .18; F,F = .1*.8 = .08; F,T = .02 -> conclusion becomes true
    assert solve([0.9, 0.2], [(0, 1, I)]).labels == [True, True]
    # premise 0.6, conclusion 0.1: T,T = .06; F,F = .36 -> premise becomes false
    sol = solve([0.6, 0.1], [(0, 1, I)])
    assert sol.labels == [False, False] and sol.flips == 1
    assert sol.log_prob == pytest.approx(math.log(0.4 * 0.9))


def test_contradiction_keeps_the_more_confident_claim():
    sol = solve([0.95, 0.7], [(0, 1, C)])
    assert sol.labels == [True, False] and sol.flips == 1
    assert solve([0.7, 0.95], [(1, 0, C)]).labels == [False, True]


def test_fixed_labels_override_the_model_and_propagate():
    assert solve([0.99], [], {0: False}).labels == [False]
    sol = solve([0.9, 0.05, 0.05], [(0, 1, I), (1, 2, I)], {0: True})
    assert sol.labels == [True, True, True] and sol.flips == 2  # the fixed node is not a flip


def test_ties_break_by_fewer_flips_then_true_first():
    # both one-true assignments have the same probability (.25): true at the lowest index wins
    assert solve([0.5, 0.5], [(0, 1, C)]).labels == [True, False]
    # [T, F] and [F, T] are equally probable (.8 * .2 each), but only [F, T] keeps the model's own labels
    sol = solve([0.2, 0.8], [])
    assert sol.labels == [False, True] and sol.flips == 0
    # a genuine tie in probability with different flips: p = .5 counts as own-true
    sol = solve([0.5, 0.9], [(0, 1, C)])  # [F, T] = .45 beats [T, F] = .05
    assert sol.labels == [False, True]


@pytest.mark.parametrize("edges,fixed", [([(0, 1, C)], {0: True, 1: True}),
                                         ([(0, 1, I), (1, 2, I)], {0: True, 2: False})])
def test_infeasible_fixed_labels_name_the_graph(edges, fixed):
    with pytest.raises(InfeasibleLabels, match=r"graph 'g3': fixed labels are inconsistent") as err:
        solve([0.5, 0.5, 0.5], edges, fixed, graph="g3")
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize("p,edges,message", [([0.5, 0.5], [(0, 2, I)], "out of range"),
                                             ([0.5, 0.5], [(0, 1, "entails")], "kind"),
                                             ([1.5, 0.5], [], r"P\(true\) in \[0, 1\]"),
                                             ([0.5], [(0, 0, C)], "contradict itself")])
def test_bad_graphs_are_named(p, edges, message):
    with pytest.raises(ValueError, match=message) as err:
        solve(p, edges, graph="g9")
    assert "'g9'" in str(err.value)


def test_random_graphs_match_brute_force():
    rng = random.Random(0)
    infeasible = 0
    for t in range(300):
        n = rng.randint(1, 14)
        p = [rng.choice([0.0, 1.0, 0.5, 0.3, rng.random(), rng.random()]) for _ in range(n)]
        edges = [(a, b, rng.choice([I, C])) for a, b in ((rng.randrange(n), rng.randrange(n))
                                                         for _ in range(rng.randint(0, 2 * n))) if a != b]
        fixed = {i: rng.random() < 0.5 for i in range(n) if rng.random() < 0.15} if t % 3 == 0 else {}
        best = brute_force(p, edges, fixed)
        if best is None:
            infeasible += 1
            with pytest.raises(InfeasibleLabels):
                solve(p, edges, fixed, graph=f"t{t}")
            continue
        sol = solve(p, edges, fixed, graph=f"t{t}")
        assert violations(sol.labels, edges, fixed) == 0, t
        assert sol.log_prob >= -best[0][0] - 1e-9, t  # nothing feasible is more probable
        assert sol.labels == best[1], t  # and the tie-break is the documented one
    assert infeasible > 0  # the corpus exercised the infeasible branch too


def test_a_dct_shaped_20_node_graph_is_exact():
    rng = random.Random(1)
    n = 20
    p = [rng.random() for _ in range(n)]
    edges = [(0, i, I if i % 2 else C) for i in range(1, n)]
    edges += [e for e in ((rng.randrange(1, n), rng.randrange(1, n), C) for _ in range(6)) if e[0] != e[1]]
    sol = solve(p, edges)
    assert violations(sol.labels, edges) == 0
    # brute force over 2^20 is slow in Python; the seed decides the star: enumerate both seed values
    # with every other node free and check no feasible assignment beats the solver
    best = -math.inf
    for seed_label in (True, False):
        for rest in itertools.product([True, False], repeat=n - 1):
            labels = (seed_label, *rest)
            if seed_label and not all(labels[i] for i in range(1, n, 2)):
                continue  # the seed implies every odd node: prune early
            if not violations(labels, edges):
                best = max(best, log_prob(p, labels))
    assert sol.log_prob == pytest.approx(best, abs=1e-9)
