"""SPaR data from a fixed refinement tree: DPO pairs, the refiner RFT set (caps, rule filter), judge accuracy."""

from __future__ import annotations

import json

import pytest

from closedloop.methods.spar_data import (
    balanced_judgments,
    best_worst_pairs,
    dpo_pairs,
    judge_accuracy,
    judging_scores,
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


def judged_sample(prompt: str, response: str, votes: list[bool | None]) -> dict:
    """An actor sample as spar_judge writes it (judged.jsonl), judged by the refiner's votes."""
    j = judgment(response) if not votes else JudgeResult(*majority(votes)[:2], votes, [
        f"{response} vote {i}.\nVerdict: {'yes' if v else 'no'}" for i, v in enumerate(votes)])
    return {"key": 7, "prompt": prompt, "response": response,
            "judge": {"decision": j.decision, "value": j.value, "votes": j.votes, "texts": j.texts,
                      "unparseable": 0, "source": "model"}}


def test_refiner_rft_set_takes_the_final_refinement_and_split_judgments():
    rec = make_record()
    out = refiner_rft_set([], [rec], max_refinement=10, max_judgment=100)
    kinds = [e["kind"] for e in out]
    # one refinement, the final step of the path 0 -> 2 -> 8 (the reference's final_node); the step
    # 0 -> 2 is a refinement the refiner's own judge rejected (r.1: 1 yes of 3), so it is no example
    assert kinds == ["refinement"] + ["judgment"] * 3
    assert out[0]["prompt"] == refine_messages("P", "r.1", "r.1 check 1.\nVerdict: no")
    assert out[0]["prompt"] == refine_messages_for("P", record_to_tree(rec).nodes[2])
    assert parse_refinement(out[0]["completion"][0]["content"]) == ("fix r.1.1", "r.1.1")
    # judgments only where the votes split: r (1 yes), r.1 (1 yes), r.1.1 (2 yes); r.0 is a tie
    # (dropped) and the other nodes are unanimous. The first text agreeing with the majority;
    # no and yes alternate.
    judged = [(e["prompt"], e["completion"][0]["content"], e["verdict"]) for e in out[1:]]
    assert judged == [(judge_messages("P", "r"), "r check 0.\nVerdict: no", False),
                      (judge_messages("P", "r.1.1"), "r.1.1 check 0.\nVerdict: yes", True),
                      (judge_messages("P", "r.1"), "r.1 check 1.\nVerdict: no", False)]
    assert all(e["prompt"][0]["role"] == "user" and e["source"] == "tree" for e in out)


def test_refiner_judgments_come_from_the_actors_samples_first_without_duplicates():
    """The reference's main judgment source: the actor's sampled responses on which the refiner's
    votes split. A sample that is also a tree's root gives one example, not two."""
    rec = make_record()
    samples = [judged_sample("P", "r", []),  # the tree's root: judged once, as a sample
               judged_sample("P", "s1", [True, True, False]),
               judged_sample("P", "s2", [True, True, True]),  # unanimous: nothing to learn
               judged_sample("P", "s3", [False, None, True])]  # tie
    out = [e for e in refiner_rft_set(samples, [rec], 10, 100) if e["kind"] == "judgment"]
    assert [(e["prompt"][0]["content"].split("### Response\n")[1].split("\n")[0], e["source"]) for e in out] == [
        ("r", "samples"), ("s1", "samples"), ("r.1", "tree"), ("r.1.1", "tree")]
    assert [e["verdict"] for e in out] == [False, True, False, True]


def test_judgments_are_balanced_between_yes_and_no_up_to_their_caps():
    cands = [("P", f"n{i}", "no.\nVerdict: no", False, "samples") for i in range(6)] + [
        ("P", f"y{i}", "ok.\nVerdict: yes", True, "samples") for i in range(2)]
    out = balanced_judgments(cands, cap=6)
    # at most 3 of each verdict: the scarce yes side keeps both of its examples
    assert [e["verdict"] for e in out] == [False, True, False, True, False]
    assert [e["verdict"] for e in balanced_judgments(cands, cap=100)] == [False, True, False, True] + [False] * 4
    assert balanced_judgments(cands, cap=0) == []
    assert len(balanced_judgments(cands, cap=1)) == 1


def test_refiner_rft_set_caps_and_order():
    recs = [make_record(), make_record({**ROW, "key": 8, "prompt": "Q"})]
    out = refiner_rft_set([], recs, max_refinement=1, max_judgment=2)
    assert [e["kind"] for e in out] == ["refinement"] + ["judgment"] * 2
    assert "### Instruction\nP" in out[0]["prompt"][0]["content"]  # the first record's final step
    assert [e["verdict"] for e in out[1:]] == [False, True]
    assert out == refiner_rft_set([], recs, max_refinement=1, max_judgment=2)  # deterministic
    assert refiner_rft_set([], recs, 0, 0) == []


def test_no_judgment_example_comes_from_the_rules():
    """Self-play: a node judged by the rules (a hybrid judge's rule-checkable node: one vote, no
    text) gives the refiner nothing to learn; only the refiner's own split votes do."""
    rec = make_record()
    for node in rec["nodes"]:
        if node["response"] in ("r", "r.1"):  # as the hybrid judge records a rule verdict
            node["judgment_texts"], node["decision"] = [], True
    rules_sample = {**judged_sample("P", "q", []), "judge": {"decision": True, "value": 1.0, "votes": [True],
                                                             "texts": [], "unparseable": 0, "source": "rules"}}
    judged = [e["prompt"][0]["content"] for e in refiner_rft_set([rules_sample], [rec], 10, 100)
              if e["kind"] == "judgment"]
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
    # correct: 0, 2, 5 (None is wrong). tp = 2 (0, 5), fp = 1 (1), fn = 2 (3: None, 4), tn = 1 (2).
    # passing responses judged right 2 of 4, failing 1 of 2; failures: found 1, said "no" 2, actual 2
    assert m == pytest.approx({"n": 6, "accuracy": 0.5, "precision": 2 / 3, "recall": 0.5, "f1": 4 / 7,
                               "coverage": 5 / 6, "balanced_accuracy": 0.5, "f1_fails": 0.5, "always_no": 2 / 6})
    assert judge_accuracy([], [])["accuracy"] == 0.0 and judge_accuracy([], [])["balanced_accuracy"] == 0.0
    assert judge_accuracy([None, None], [False, False])["precision"] == 0.0
    with pytest.raises(ValueError):
        judge_accuracy([True], [True, False])


def test_a_judge_that_always_says_no_is_seen_through():
    """7 of 10 responses fail: always "no" is 70% accurate, and no better than chance balanced."""
    gold = [False] * 7 + [True] * 3
    m = judge_accuracy([False] * 10, gold)
    assert m["accuracy"] == pytest.approx(0.7) == m["always_no"]
    assert m["balanced_accuracy"] == pytest.approx(0.5) and m["recall"] == 0.0
    better = judge_accuracy([False] * 6 + [True] * 4, gold)  # one failure let through, every pass found
    assert better["balanced_accuracy"] == pytest.approx((1.0 + 6 / 7) / 2)


def test_judging_scores_sum_to_the_judges_metrics():
    decisions = [True, True, False, None, False, True, False]
    gold = [True, False, False, True, True, True, False]
    scores = [judging_scores(d, g, gold) for d, g in zip(decisions, gold)]
    m = judge_accuracy(decisions, gold)
    for name, key in (("judge_accuracy", "accuracy"), ("judge_balanced_accuracy", "balanced_accuracy"),
                      ("judge_coverage", "coverage")):
        num, den = (sum(s[name][i] for s in scores) for i in (0, 1))
        assert num / den == pytest.approx(m[key]), name


def test_an_ablation_names_its_iteration_and_that_iterations_start():
    from closedloop.config import FieldError
    from closedloop.methods.spar import SparConfig

    iterations = {"it1": "init", "it2": "it1"}
    ok = SparConfig(iterations=iterations, ablations={"no_tree": {"of": "it2", "start": "it1"}})
    assert ok.ablations["no_tree"]["of"] == "it2"
    for bad, key in (({"no_search": {"of": "it1", "start": "init"}}, "ablations.no_search"),
                     ({"no_tree": {"of": "it3", "start": "it2"}}, "ablations.no_tree.of"),
                     ({"no_tree": {"of": "it2", "start": "init"}}, "ablations.no_tree.start"),
                     ({"no_refine": {"of": "it1"}}, "ablations.no_refine")):
        with pytest.raises(FieldError) as e:
            SparConfig(iterations=iterations, ablations=bad)
        assert e.value.key == key


def test_ablation_pairs_no_tree_from_its_trees_no_refine_best_against_worst():
    from closedloop.methods.spar import ablation_pairs

    rec = make_record()
    samples = [judged_sample("P", "s1", [True, True, False]), judged_sample("P", "s2", [False, False, True]),
               judged_sample("P", "s3", [True, None, False])]  # a tie: no decision, left out
    assert ablation_pairs(samples, [rec], "no_tree") == dpo_pairs([rec])
    assert [(p["chosen"], p["rejected"], p["source"]) for p in ablation_pairs(samples, [rec], "no_refine")] == [
        ("s1", "s2", "best_worst")]
