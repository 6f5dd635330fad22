"""DCT's consistency step: the most probable truth assignment of a claim graph, found exactly.

Nodes 0..n-1 carry the model's P(true) p_i; edges are `implies` (src true => dst true) and
`contradicts` (not both true); some nodes may have fixed labels. `solve` maximises
sum_i log(p_i if true else 1 - p_i) subject to every edge and fixed label.

Why a hand-written branch and bound rather than an ILP/MaxSAT solver from PyPI: graphs here are
small (tens of nodes), every constraint is a binary clause, so unit propagation decides each
forced label exactly and cheaply; we want a documented deterministic tie-break (below), which
generic solvers do not give; and it needs no dependency. Maximum-weight independent set reduces
to this problem (contradiction edges only), so no polynomial algorithm is expected: the search is
exact and its worst case exponential, which is why the DCT stage caps the graph size.

Search: minimise the cost of disagreeing with the model, cost_i = |log p_i - log(1 - p_i)| for a
node labelled against its own label (p_i >= 0.5 -> true). Branch on the costliest free node,
own label first; after each choice propagate the clauses; prune when the cost so far plus a lower
bound on the rest (a greedy set of node-disjoint conflicting edges among free nodes, each of which
must flip one end: the cheaper end's cost) exceeds the best found.

Ties: assignments whose log-probabilities differ by at most 1e-9 are ties; among them the one
with fewer flips of the model's own labels wins, then the lexicographically smallest label tuple
with True before False (true at the lowest index).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from closedloop.errors import UserError

IMPLIES = "implies"
CONTRADICTS = "contradicts"
Edge = tuple[int, int, str]
TOL = 1e-9
_EPS = 1e-6


class InfeasibleLabels(UserError):
    """The fixed labels of a graph contradict its edges."""


@dataclass
class Solution:
    labels: list[bool]
    log_prob: float  # sum of log p of the chosen labels (p clipped to [1e-6, 1 - 1e-6])
    flips: int  # free nodes labelled against the model's own label
    nodes_explored: int  # search nodes visited


def own_labels(p: Sequence[float]) -> list[bool]:
    return [q >= 0.5 for q in p]


def _edge_ok(labels: Sequence[bool], a: int, b: int, kind: str) -> bool:
    return not (labels[a] and labels[b]) if kind == CONTRADICTS else (not labels[a] or labels[b])


def satisfied_edges(labels: Sequence[bool], edges: Sequence[Sequence]) -> int:
    return sum(_edge_ok(labels, a, b, k) for a, b, k in edges)


def violations(labels: Sequence[bool], edges: Sequence[Sequence], fixed: Mapping[int, bool] | None = None) -> int:
    """Violated edges plus violated fixed labels."""
    return len(edges) - satisfied_edges(labels, edges) + sum(labels[i] != v for i, v in (fixed or {}).items())


def log_prob(p: Sequence[float], labels: Sequence[bool]) -> float:
    return sum(math.log(_clip(q) if lab else 1 - _clip(q)) for q, lab in zip(p, labels))


def _clip(q: float) -> float:
    return min(max(q, _EPS), 1 - _EPS)


def _check(p: Sequence[float], edges: Sequence[Sequence], fixed: Mapping[int, bool], graph: str) -> None:
    n = len(p)
    for i, q in enumerate(p):
        if not isinstance(q, (int, float)) or not math.isfinite(q) or not 0.0 <= q <= 1.0:
            raise ValueError(f"graph {graph!r}: node {i}: expected P(true) in [0, 1], got {q!r}")
    for e in edges:
        a, b, kind = e
        if kind not in (IMPLIES, CONTRADICTS):
            raise ValueError(f"graph {graph!r}: edge {list(e)}: expected kind {IMPLIES!r} or {CONTRADICTS!r}")
        if not (0 <= a < n and 0 <= b < n):
            raise ValueError(f"graph {graph!r}: edge {list(e)}: node out of range for {n} nodes")
        if a == b and kind == CONTRADICTS:
            raise ValueError(f"graph {graph!r}: edge {list(e)}: a claim cannot contradict itself")
    for i in fixed:
        if not 0 <= i < n:
            raise ValueError(f"graph {graph!r}: fixed label on node {i}: out of range for {n} nodes")


def _implications(n: int, edges: Sequence[Sequence]) -> list[list[tuple[int, bool, str]]]:
    """For each literal (node, value): the literals it forces, with the edge that forces them."""
    forced: list[list[tuple[int, bool, str]]] = [[] for _ in range(2 * n)]  # index 2*i + value
    for a, b, kind in edges:
        why = f"{a} {kind} {b}"
        if kind == IMPLIES:
            forced[2 * a + 1].append((b, True, why))  # a true -> b true
            forced[2 * b].append((a, False, why))  # b false -> a false
        else:
            forced[2 * a + 1].append((b, False, why))  # a true -> b false
            forced[2 * b + 1].append((a, False, why))  # b true -> a false
    return forced


def _propagate(labels: list[bool | None], start: list[int], forced: list[list[tuple[int, bool, str]]],
               trail: list[int]) -> str | None:
    """Unit propagation from the newly set nodes in `start`; appends every node it sets to `trail`.
    Returns the edge in conflict, or None."""
    queue = list(start)
    while queue:
        i = queue.pop()
        for j, value, why in forced[2 * i + int(bool(labels[i]))]:
            if labels[j] is None:
                labels[j] = value
                trail.append(j)
                queue.append(j)
            elif labels[j] != value:
                return why
    return None


def solve(p: Sequence[float], edges: Sequence[Sequence], fixed: Mapping[int, bool] | None = None,
          graph: str = "") -> Solution:
    fixed = dict(fixed or {})
    _check(p, edges, fixed, graph)
    n = len(p)
    own = own_labels(p)
    cost = [abs(math.log(_clip(q)) - math.log(1 - _clip(q))) for q in p]
    forced = _implications(n, edges)

    # Fixed labels first: all-false satisfies every edge, so propagation from the fixed labels
    # alone decides feasibility exactly.
    labels: list[bool | None] = [None] * n
    trail: list[int] = []
    for i, v in fixed.items():
        labels[i] = v
        trail.append(i)
    conflict = _propagate(labels, list(fixed), forced, trail)
    if conflict is not None:
        fixed_desc = ", ".join(f"node {i} {'true' if v else 'false'}" for i, v in sorted(fixed.items()))
        raise InfeasibleLabels(f"graph {graph!r}: fixed labels are inconsistent ({fixed_desc}): they force both "
                               f"values on a node through the edge {conflict}")

    free_nodes = set(range(n)) - set(fixed)
    order = sorted(range(n), key=lambda i: (-cost[i], i))
    conflicts = [(a, b) for a, b, k in edges
                 if (k == CONTRADICTS and own[a] and own[b]) or (k == IMPLIES and own[a] and not own[b])]

    def key(lab: list[bool], c: float) -> tuple:
        return (c, sum(lab[i] != own[i] for i in free_nodes), tuple(not x for x in lab))

    best: dict = {"key": None, "labels": None}
    explored = 0

    def spent() -> float:
        return sum(cost[i] for i in range(n) if labels[i] is not None and labels[i] != own[i])

    def bound() -> float:
        used: set[int] = set()
        extra = 0.0
        for a, b in conflicts:
            if labels[a] is None and labels[b] is None and a not in used and b not in used:
                used.update((a, b))
                extra += min(cost[a], cost[b])
        return extra

    def search() -> None:
        nonlocal explored
        explored += 1
        c = spent()
        if best["key"] is not None and c + bound() > best["key"][0] + TOL:
            return
        i = next((j for j in order if labels[j] is None), None)
        if i is None:
            full = [bool(x) for x in labels]
            # costs within TOL are ties: compare them as equal, then by flips and labels
            k = key(full, c)
            if best["key"] is None or k[0] < best["key"][0] - TOL or (abs(k[0] - best["key"][0]) <= TOL
                                                                       and k[1:] < best["key"][1:]):
                best["key"], best["labels"] = k, full
            return
        for value in (own[i], not own[i]):
            mark = len(trail)
            labels[i] = value
            trail.append(i)
            if _propagate(labels, [i], forced, trail) is None:
                search()
            for j in trail[mark:]:
                labels[j] = None
            del trail[mark:]

    search()
    result = best["labels"]
    return Solution(result, log_prob(p, result), sum(result[i] != own[i] for i in free_nodes), explored)
