"""SPaR tree search with a scripted refiner and judge: visit orders, gate, budget, depth, unparseable."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from closedloop.search.tree import Node, TreeParams, tree_search, tree_search_many
from closedloop.verifiers.judge import JudgeResult, ModelJudge

# A child's response is its parent's plus ".j" (j = 0..width-1), so the root "r" has children
# "r.0", "r.1", "r.2" and "r.1.0" is the first child of "r.1". Unscripted responses score 0.
VALUES = {"r.0": 0.2, "r.1": 0.4, "r.2": 0.4, "r.1.0": 0.1, "r.2.1": 0.3}
ROOT = JudgeResult(False, 0.0, [False], ["Verdict: no"], 0, "model")


class Script:
    def __init__(self, values: dict[str, float], bad: tuple[int, ...] = (), width: int = 3):
        self.values, self.bad, self.width = values, bad, width
        self.refine_calls: list[list[int]] = []
        self.judge_calls: list[list[str]] = []

    def refine(self, prompt: str, parents: list[Node]):
        assert prompt == "P"
        self.refine_calls.append([p.id for p in parents])
        return [[None if j in self.bad else (f"crit {p.response}.{j}", f"{p.response}.{j}") for j in range(self.width)]
                for p in parents]

    def judge(self, prompt: str, responses: list[str]):
        self.judge_calls.append(list(responses))
        return [JudgeResult(None, self.values.get(r, 0.0), texts=[f"judged {r}"]) for r in responses]


def run(values=VALUES, root_judgment=ROOT, bad=(), votes=1, **kw):
    s = Script(values, bad, kw.get("width", 3))
    return tree_search("P", "r", s.refine, s.judge, TreeParams(**kw), root_judgment, votes), s


def test_bfs_visit_order_and_tree():
    res, s = run()
    # Level 1: r.1 (id 2) and r.2 (id 3) tie at 0.4 and beat r.0 (0.2); lower id first.
    # Level 2: r.2.1 (id 8, 0.3) then r.1.0 (id 4, 0.1). Their children are at max depth 3.
    assert res.visit_order == [0, 2, 3, 8, 4]
    assert s.refine_calls == [[0], [2, 3], [8, 4]]  # one batched refine call per level
    assert [len(c) for c in s.judge_calls] == [3, 6, 6]  # children judged as one batch per level
    assert (res.stopped, res.success, res.generations, res.unparseable) == ("exhausted", None, 30, 0)
    assert len(res.nodes) == 16 and [n.id for n in res.nodes] == list(range(16))
    assert [n.response for n in res.nodes[:5]] == ["r", "r.0", "r.1", "r.2", "r.1.0"]
    assert (res.nodes[8].response, res.nodes[8].parent, res.nodes[8].depth, res.nodes[8].critique) == (
        "r.2.1", 3, 2, "crit r.2.1")
    assert max(n.depth for n in res.nodes) == 3
    assert res.nodes[2].value == 0.4 and res.nodes[2].judgment_texts == ["judged r.1"]


def test_dfs_visit_order_differs():
    res, s = run(strategy="dfs")
    # Best child first, depth first: 0 -> r.1 (2) -> r.1.0 (4) -> r.1.1 (5); back up to r.2 (3) ->
    # r.2.1 (14) -> r.2.0 (13). Nodes at depth 3 are never expanded; only 2 children per node are explored.
    assert res.visit_order == [0, 2, 4, 5, 3, 14, 13]
    assert s.refine_calls == [[i] for i in res.visit_order]
    assert (res.stopped, res.success, res.generations) == ("exhausted", None, 42)
    assert res.nodes[14].response == "r.2.1" and max(n.depth for n in res.nodes) == 3
    assert res.visit_order != run()[0].visit_order


@pytest.mark.parametrize("strategy,visits,success", [("bfs", [0, 2, 3], 5), ("dfs", [0, 2], 5)])
def test_gate_stops_strictly_above(strategy, visits, success):
    res, _ = run({**VALUES, "r.1.1": 0.6}, strategy=strategy)
    assert (res.stopped, res.success.id, res.success.response, res.visit_order) == ("gate", success, "r.1.1", visits)
    assert res.path() == [res.nodes[0], res.nodes[2], res.nodes[5]]
    # Exactly at the gate is not a success: the search goes on.
    same, _ = run({**VALUES, "r.1.1": 0.5}, strategy=strategy)
    assert same.success is None and same.stopped == "exhausted"
    # A custom gate.
    low, _ = run({**VALUES, "r.1.1": 0.5}, strategy=strategy, gate=0.45)
    assert low.success.response == "r.1.1"


def test_gate_picks_best_of_batch_ties_to_lower_id():
    res, _ = run({**VALUES, "r.1.1": 0.6, "r.2.0": 0.8, "r.2.2": 0.8})
    assert (res.success.id, res.success.response) == (7, "r.2.0")
    res, _ = run({**VALUES, "r.1": 0.9, "r.0": 0.9})  # already at level 1
    assert (res.success.id, res.visit_order, res.generations) == (1, [0], 6)


def test_root_is_never_the_success_and_is_judged_when_not_given():
    res, s = run(root_judgment=None, values={**VALUES, "r": 1.0}, votes=2, max_depth=1)
    assert s.judge_calls[0] == ["r"] and res.root.value == 1.0
    assert res.success is None and res.generations == 2 + 3 * (1 + 2)  # root votes + one expansion


def test_budget_counts_nodes_and_is_never_exceeded():
    # width 3: an expansion adds 3 nodes; the root is node 1 of the budget.
    res, _ = run(budget=3)
    assert (res.stopped, res.visit_order, res.generations, len(res.nodes)) == ("budget", [], 0, 1)
    res, _ = run(budget=6)  # level 1 (4 nodes); neither level-2 parent fits
    assert (res.stopped, res.visit_order, len(res.nodes)) == ("budget", [0], 4)
    res, s = run(budget=7)  # room for only one of the two level-2 parents
    assert (res.stopped, res.visit_order, len(res.nodes)) == ("budget", [0, 2], 7)
    assert s.refine_calls == [[0], [2]]
    res, _ = run(strategy="dfs", budget=10)
    assert (res.stopped, res.visit_order, len(res.nodes)) == ("budget", [0, 2, 4], 10)
    # judge votes are counted in generations, not budgeted: 3 root votes + 2 expansions of 3 * (1 + 3)
    res, _ = run(root_judgment=None, votes=3, budget=7)
    assert (res.stopped, res.visit_order, res.generations) == ("budget", [0, 2], 3 + 2 * 12)
    for strategy in ("bfs", "dfs"):
        for budget in range(1, 70):
            assert len(run(strategy=strategy, budget=budget)[0].nodes) <= budget


@pytest.mark.parametrize("strategy", ["bfs", "dfs"])
def test_the_default_budgets_let_a_tree_reach_max_depth(strategy):
    """The search's default (the reference's 1000 nodes) and SPAR's default (the demo's) both leave
    room for a tree that never passes the gate to refine down to max_depth, with votes."""
    from closedloop.methods.spar import SparTreeConfig

    for cfg in (TreeParams(), SparTreeConfig()):
        res, _ = run(values={}, votes=5, strategy=strategy, width=cfg.width, branches=cfg.branches,
                     max_depth=cfg.max_depth, budget=cfg.budget)
        assert max(n.depth for n in res.nodes) == cfg.max_depth == 3, (cfg.budget, res.stopped)


@pytest.mark.parametrize("strategy", ["bfs", "dfs"])
def test_max_depth(strategy):
    res, _ = run(strategy=strategy, max_depth=1)
    assert (res.visit_order, res.stopped, len(res.nodes)) == ([0], "exhausted", 4)
    res, _ = run(strategy=strategy, max_depth=2)
    assert max(n.depth for n in res.nodes) == 2
    assert res.visit_order == [0, 2, 3]  # both: the root, then its two best children (leaves at depth 2)


def test_unparseable_refinements_skipped_and_counted():
    res, s = run(bad=(1,))  # every parent's second candidate is garbage
    assert res.unparseable == 1 + 2 + 2  # one per expanded parent
    assert [n.response for n in res.nodes[:3]] == ["r", "r.0", "r.2"]
    assert res.visit_order == [0, 2, 1, 3, 4]
    assert all(n.id == i for i, n in enumerate(res.nodes)) and [len(c) for c in s.judge_calls] == [2, 4, 4]
    assert res.generations == 5 * 3 + 10  # all refinements generated, only parsed ones judged
    res, s = run(bad=(0, 1, 2))
    assert (res.stopped, res.visit_order, res.generations, res.unparseable, s.judge_calls) == ("exhausted", [0], 3, 3, [])


def test_value_from_model_judge_majority():
    def generate(chats, n):  # 2 of 3 votes yes for responses containing "fixed"; garbage otherwise
        return [["Verdict: yes", "**Verdict:** Yes", "Verdict: no"] if "fixed" in c[0]["content"] else
                ["Verdict: no", "???", "Verdict: yes"] for c in chats]

    mj = ModelJudge(generate, votes=3)
    judge = lambda p, rs: mj.judge_batch([{"prompt": p, "response": r} for r in rs])  # noqa: E731
    refine = lambda p, parents: [[("c", f"{n.response} fixed" if j == 2 else f"{n.response}+") for j in range(3)]  # noqa: E731
                                 for n in parents]
    res = tree_search("P", "r", refine, judge, TreeParams(), votes_per_judgment=3)
    assert res.root.value == pytest.approx(1 / 3) and res.root.decision is None  # tie with one unparseable
    assert (res.success.id, res.success.value, res.success.decision) == (3, pytest.approx(2 / 3), True)
    assert res.generations == 3 + 3 * (1 + 3) and len(res.success.judgment_texts) == 3


def test_deterministic_and_lockstep_matches_single():
    values2 = {"r.1": 0.9}
    singles = [run()[0], run({**VALUES, "r.1.1": 0.6})[0], run(values2)[0]]
    assert asdict(run()[0]) == asdict(singles[0])

    tables = [VALUES, {**VALUES, "r.1.1": 0.6}, values2]
    calls = {"refine": 0, "judge": 0}

    def refine(reqs):
        calls["refine"] += 1
        return [Script(tables[i]).refine("P", parents) for i, parents in reqs]

    def judge(reqs):
        calls["judge"] += 1
        return [Script(tables[i]).judge("P", responses) for i, responses in reqs]

    many = tree_search_many([("r", ROOT)] * 3, refine, judge, TreeParams())
    assert [asdict(m) for m in many] == [asdict(s) for s in singles]
    assert calls == {"refine": 3, "judge": 3}  # one call per round across all trees, not per tree


def test_bad_params_and_callables():
    with pytest.raises(ValueError, match="strategy"):
        TreeParams(strategy="mcts")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        TreeParams(width=0)
    with pytest.raises(ValueError, match="gate"):
        TreeParams(gate=1.0)
    s = Script(VALUES, width=2)
    with pytest.raises(ValueError, match="3 candidates"):
        tree_search("P", "r", s.refine, s.judge, TreeParams(), ROOT)
    with pytest.raises(ValueError, match="one result per response"):
        tree_search("P", "r", Script(VALUES).refine, lambda p, rs: [], TreeParams(), ROOT)
