"""SPaR's refinement tree search (arXiv 2412.11605): BFS or DFS over critique-and-refine steps.

The root is a response the judge failed. Expanding a node asks the refiner for `width` (critique,
refined response) children, sampled from one prompt (so a backend can share that prompt's prefix),
and the judge scores each child; the search stops at the first child whose value (fraction of
yes votes) is > `gate`. At most `branches` nodes are expanded per level (BFS) or per parent (DFS),
children go at most `max_depth` steps below the root, and an expansion is only started when the
nodes it creates fit the tree's `budget` of nodes (root included), as the reference implementation
counts them (thu-coai/SPaR: a node budget, 1000 by default). Generations (refinements + judge
votes) are counted and reported, not budgeted.

The search is written once, as a generator that yields its model requests, so `tree_search` can
drive one tree and `tree_search_many` can drive many in lockstep, batching every request of a round
into one refine call and one judge call (far better GPU use than one tree at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Candidate = tuple[str, str] | None  # (critique, refined response); None = unparseable refinement


class JudgeResultLike(Protocol):
    value: float
    decision: bool | None


@dataclass
class Node:
    id: int  # creation order; also the tie-breaker (lower id wins)
    parent: int | None
    depth: int
    response: str
    critique: str | None
    value: float | None = None
    decision: bool | None = None
    judgment_texts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TreeParams:
    strategy: Literal["bfs", "dfs"] = "bfs"
    width: int = 3  # children per expanded node, sampled from one prompt (n=width)
    branches: int = 2  # nodes expanded per level (BFS) / children explored per node (DFS)
    max_depth: int = 3  # deepest refinement, in steps below the root
    gate: float = 0.5  # success = value strictly above this
    budget: int = 1000  # nodes per tree, the root included (the reference's default)

    def __post_init__(self) -> None:
        if self.strategy not in ("bfs", "dfs"):
            raise ValueError(f"tree search: strategy must be 'bfs' or 'dfs', got {self.strategy!r}")
        for name in ("width", "branches", "max_depth", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"tree search: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.gate < 1.0:
            raise ValueError(f"tree search: gate must be in [0, 1), got {self.gate}")


@dataclass
class TreeResult:
    nodes: list[Node]  # nodes[i].id == i; nodes[0] is the root
    success: Node | None
    visit_order: list[int]  # ids in the order they were expanded
    generations: int  # refine generations + judge votes spent by this search (reported, not budgeted)
    stopped: str  # "gate" | "budget" | "exhausted" (max depth reached or no parseable children left)
    unparseable: int = 0  # refinements returned as None (skipped, but counted in generations)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def path(self, node: Node | None = None) -> list[Node]:
        """Root-to-node path (default: to the success node; [] without one)."""
        node = node or self.success
        out: list[Node] = []
        while node is not None:
            out.append(node)
            node = self.nodes[node.parent] if node.parent is not None else None
        return out[::-1]


# A request the search yields: ("refine", parents) -> list[list[Candidate]], or ("judge", responses) -> results.
Request = tuple[str, list[Any]]
_Search = Generator[Request, list[Any], TreeResult]


def _best(nodes: Sequence[Node], k: int) -> list[Node]:
    """The k highest-value nodes, ties to the lower id (deterministic)."""
    return sorted(nodes, key=lambda n: (-(n.value or 0.0), n.id))[:k]


def _apply(node: Node, result: JudgeResultLike) -> None:
    node.value = float(result.value)
    node.decision = result.decision
    node.judgment_texts = list(getattr(result, "texts", []) or [])


def _search(root_response: str, root_judgment: JudgeResultLike | None, p: TreeParams, votes: int) -> _Search:
    nodes = [Node(0, None, 0, root_response, None)]
    visit: list[int] = []
    gens = bad = 0
    if root_judgment is None:
        (root_judgment,) = yield ("judge", [root_response])
        gens += votes
    _apply(nodes[0], root_judgment)

    def expand(parents: list[Node]) -> Generator[Request, list[Any], list[Node]]:
        nonlocal gens, bad
        visit.extend(n.id for n in parents)
        cands = yield ("refine", parents)
        if len(cands) != len(parents) or any(len(c) != p.width for c in cands):
            raise ValueError(f"refine must return {p.width} candidates (or None) for each of {len(parents)} parents")
        gens += p.width * len(parents)
        children = []
        for parent, cs in zip(parents, cands):
            for c in cs:
                if c is None:
                    bad += 1
                    continue
                child = Node(len(nodes), parent.id, parent.depth + 1, c[1], c[0])
                nodes.append(child)
                children.append(child)
        if children:
            results = yield ("judge", [c.response for c in children])
            if len(results) != len(children):
                raise ValueError(f"judge must return one result per response ({len(children)})")
            gens += votes * len(children)
            for c, r in zip(children, results):
                _apply(c, r)
        return children

    def done(stopped: str, children: Sequence[Node] = ()) -> TreeResult:
        wins = [c for c in children if (c.value or 0.0) > p.gate]
        success = _best(wins, 1)[0] if wins else None
        return TreeResult(nodes, success, visit, gens, "gate" if success else stopped, bad)

    # The root is never a success candidate: it is the rejected response of the pair.
    if p.strategy == "bfs":
        frontier = [nodes[0]]
        while frontier and frontier[0].depth < p.max_depth:
            fits = (p.budget - len(nodes)) // p.width  # expansions whose children fit the node budget
            if fits < 1:
                return done("budget")
            # Expand the best `branches` of this level, fewer if the budget allows fewer.
            children = yield from expand(_best(frontier, min(p.branches, fits)))
            if any((c.value or 0.0) > p.gate for c in children):
                return done("gate", children)
            frontier = children
        return done("exhausted")

    stack = [nodes[0]]  # DFS: pop the best unexplored child first
    while stack:
        node = stack.pop()
        if len(nodes) + p.width > p.budget:
            return done("budget")
        children = yield from expand([node])
        if any((c.value or 0.0) > p.gate for c in children):
            return done("gate", children)
        if node.depth + 1 < p.max_depth:  # children at max_depth are never expanded
            stack.extend(reversed(_best(children, p.branches)))
    return done("exhausted")


RefineBatch = Callable[[list[tuple[int, list[Node]]]], list[list[list[Candidate]]]]
JudgeBatch = Callable[[list[tuple[int, list[str]]]], list[Sequence[JudgeResultLike]]]


def tree_search_many(
    roots: Sequence[tuple[str, JudgeResultLike | None]],
    refine: RefineBatch,
    judge: JudgeBatch,
    params: TreeParams,
    votes_per_judgment: int = 1,
) -> list[TreeResult]:
    """Search one tree per (root response, root judgment), in lockstep.

    Each round makes at most one `refine` call, with (tree index, parents) for every tree that wants
    to expand, then at most one `judge` call with (tree index, responses); the index lets the caller
    find each tree's prompt row. Results come back in the order of the requests.
    """
    searches = [_search(r, j, params, votes_per_judgment) for r, j in roots]
    results: list[TreeResult | None] = [None] * len(searches)
    pending: dict[int, Request] = {}

    def advance(i: int, reply: list[Any] | None) -> None:
        try:
            pending[i] = next(searches[i]) if reply is None else searches[i].send(reply)
        except StopIteration as stop:
            results[i] = stop.value
            pending.pop(i, None)

    for i in range(len(searches)):
        advance(i, None)
    while pending:
        for kind, fn in (("refine", refine), ("judge", judge)):
            ids = sorted(i for i, (k, _) in pending.items() if k == kind)
            if not ids:
                continue
            replies = fn([(i, pending[i][1]) for i in ids])
            if len(replies) != len(ids):
                raise ValueError(f"{kind} must return one reply per request ({len(ids)})")
            for i, reply in zip(ids, replies):
                advance(i, list(reply))
    return [r for r in results if r is not None]


def tree_search(
    prompt: str,
    root_response: str,
    refine: Callable[[str, list[Node]], list[list[Candidate]]],
    judge: Callable[[str, list[str]], Sequence[JudgeResultLike]],
    params: TreeParams,
    root_judgment: JudgeResultLike | None = None,
    votes_per_judgment: int = 1,
) -> TreeResult:
    """Search one tree. `refine(prompt, parents)` returns `width` candidates per parent (one call per
    expansion); `judge(prompt, responses)` one result per response. Without `root_judgment` the root
    is judged first (its votes are counted in `generations`)."""
    return tree_search_many(
        [(root_response, root_judgment)],
        lambda reqs: [refine(prompt, parents) for _, parents in reqs],
        lambda reqs: [judge(prompt, responses) for _, responses in reqs],
        params,
        votes_per_judgment,
    )[0]
