"""SPaR data from a fixed refinement tree: DPO pairs, the refiner RFT set (caps, rule filter), judge accuracy."""

from __future__ import annotations

import json

import pytest

from closedloop.methods.spar_data import (
    best_worst_pairs,
    dpo_pairs,
    judge_accuracy,
    record_to_tree,
    refine_messages_for,
    refiner_rft_set,
    tree_to_record,
)
from closedloop.search.tree import Node, TreeParams, tree_search
from closedloop.verifiers.judge import JudgeResult, judge_messages, majority, parse_refinement, refine_messages

ROW = {"key": 7, "prompt": "P", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}

# Votes per response (unscripted: 3 x no). "r.1.1" passes (2/3 > 0.5); "r.0" is a tie (dropped).
VOTES = {
    "r": [False, False, True],
    "r.0": [True, None, False],
    "r.1": [True, False, False],
    "r.1.1": [True, True, False],
}


def judgment(response: str) -> JudgeResult:
    votes = VOTES.get(response, [False, False, False])
    texts = [f"{response}: garbled" if v is None else f"{response} check {i}.\nVerdict: {'yes' if v else 'no'}"
             for i, v in enumerate(votes)]
    decision, value, bad = majority(votes)
    return JudgeResult(decision, value, votes, texts, bad)


def refine(prompt, parents: list[Node]):
    return [[(f"fix {p.response}.{j}", f"{p.response}.{j}") for j in range(3)] for p in parents]


def make_record(row=ROW, root="r") -> dict:
    res = tree_search(row["prompt"], root, refine, lambda p, rs: [judgment(r) for r in rs], TreeParams(),
                      judgment(root), votes_per_judgment=3)
    return json.loads(json.dumps(tree_to_record(row, res)))  # as read back from JSONL


def test_record_roundtrip_and_fixed_tree():
    rec = make_record()
    tree = record_to_tree(rec)
    assert [n.response for n in tree.nodes] == ["r", "r.0", "r.1", "r.2", "r.0.0", "r.0.1", "r.0.2", "r.1.0", "r.1.1", "r.1.2"]
    # r.0 and r.1 tie at 1/3, so r.0 (lower id) is expanded first.
    assert (tree.success.id, tree.stopped, tree.visit_order) == (8, "gate", [0, 1, 2])
    assert [n.id for n in tree.path()] == [0, 2, 8]
    assert tree_to_record(ROW, tree) == rec


def test_dpo_pairs():
    failed = make_record({**ROW, "key": 8, "prompt": "Q"}, root="x")  # no success: no pair
    assert record_to_tree(failed).success is None
    pairs = dpo_pairs([make_record(), failed])
    assert pairs == [{"prompt": "P", "chosen": "r.1.1", "rejected": "r", "key": 7, "chosen_value": pytest.approx(2 / 3),
                      "rejected_value": pytest.approx(1 / 3), "depth": 2, "source": "refinement"}]


def test_refiner_rft_set():
    rec = make_record()
    out = refiner_rft_set([rec], max_refinement=10, max_judgment=100)
    kinds = [e["kind"] for e in out]
    # judgments only where the votes split: r (1 yes), r.1 (1 yes), r.1.1 (2 yes); r.0 is a tie
    # (dropped) and the other nodes are unanimous
    assert kinds == ["refinement"] * 2 + ["judgment"] * 3
    # Refinement steps along the path 0 -> 2 -> 8, prompted with the parent's first "no" judgment.
    r0 = out[0]
    assert r0["prompt"] == refine_messages("P", "r", "r check 0.\nVerdict: no")
    assert r0["completion"] == [{"role": "assistant", "content": "Critique: fix r.1\nRefined response: r.1"}]
    assert out[1]["prompt"] == refine_messages("P", "r.1", "r.1 check 1.\nVerdict: no")
    assert parse_refinement(out[1]["completion"][0]["content"]) == ("fix r.1.1", "r.1.1")
    assert out[1]["prompt"] == refine_messages_for("P", record_to_tree(rec).nodes[2])
    # Judgments: the first text agreeing with the majority, node order.
    judged = [(e["prompt"], e["completion"][0]["content"]) for e in out[2:]]
    assert judged == [(judge_messages("P", "r"), "r check 0.\nVerdict: no"),
                      (judge_messages("P", "r.1"), "r.1 check 1.\nVerdict: no"),
                      (judge_messages("P", "r.1.1"), "r.1.1 check 0.\nVerdict: yes")]
    assert all(e["prompt"][0]["role"] == "user" for e in out)


def test_refiner_rft_set_caps_and_order():
    recs = [make_record(), make_record({**ROW, "key": 8, "prompt": "Q"})]
    out = refiner_rft_set(recs, max_refinement=3, max_judgment=2)
    assert [e["kind"] for e in out] == ["refinement"] * 3 + ["judgment"] * 2
    assert [e["prompt"][0]["content"].split("### Response\n")[1][:3] for e in out[:3]] == ["r\n\n", "r.1", "r\n\n"]
    assert "### Instruction\nQ" in out[2]["prompt"][0]["content"]  # second record's first step
    assert out == refiner_rft_set(recs, max_refinement=3, max_judgment=2)  # deterministic
    assert refiner_rft_set(recs, 0, 0) == []


def test_no_judgment_example_comes_from_the_rules():
    """Self-play: a node judged by the rules (a hybrid judge's rule-checkable node: one vote, no
    text) gives the refiner nothing to learn; only the refiner's own split votes do."""
    rec = make_record()
    for node in rec["nodes"]:
        if node["response"] in ("r", "r.1"):  # as the hybrid judge records a rule verdict
            node["judgment_texts"], node["decision"] = [], True
    judged = [e["prompt"][0]["content"] for e in refiner_rft_set([rec], 10, 100) if e["kind"] == "judgment"]
    assert judged == [judge_messages("P", "r.1.1")[0]["content"]]


def test_best_worst_pairs():
    samples = {"p1": ["a", "b", "c"], "p2": ["x", "y"], "p3": ["z"], "p4": ["a", "b", "c", "d"], "p5": []}
    results = {
        "p1": [0.4, JudgeResult(True, 1.0), {"value": 0.0}],
        "p2": [0.5, 0.5],  # equal: no pair
        "p3": [1.0],
        "p4": [1.0, 1.0, 0.0, 0.0],  # ties: first best, first worst
        "p5": [],
    }
    assert best_worst_pairs(samples, results) == [
        {"prompt": "p1", "chosen": "b", "rejected": "c", "chosen_value": 1.0, "rejected_value": 0.0, "source": "best_worst"},
        {"prompt": "p4", "chosen": "a", "rejected": "c", "chosen_value": 1.0, "rejected_value": 0.0, "source": "best_worst"},
    ]
    with pytest.raises(ValueError, match="2 samples but 1"):
        best_worst_pairs({"p": ["a", "b"]}, {"p": [1.0]})


def test_judge_accuracy_hand_example():
    decisions = [True, True, False, None, False, True]
    gold = [True, False, False, True, True, True]
    m = judge_accuracy(decisions, gold)
    # correct: 0, 2, 5 (None is wrong). tp = 2 (0, 5), fp = 1 (1), fn = 2 (3: None, 4).
    assert m == pytest.approx({"n": 6, "accuracy": 0.5, "precision": 2 / 3, "recall": 0.5, "f1": 4 / 7, "coverage": 5 / 6})
    assert judge_accuracy([], []) == {"n": 0, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "coverage": 0.0}
    assert judge_accuracy([None, None], [False, False])["precision"] == 0.0
    with pytest.raises(ValueError):
        judge_accuracy([True], [True, False])
