"""SPaR training data from refinement trees: DPO pairs for the actor, an RFT set for the refiner.

Trees are stored as JSON records (`tree_to_record`) so stages can write them to JSONL and later
stages can rebuild them (`record_to_tree`). A pair contrasts the refinement that passed the gate
with the original failing response, so the two differ mostly in the constraint that was fixed
(SPaR's point: fewer distracting differences than independently sampled best/worst pairs).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from closedloop.search.tree import Node, TreeResult
from closedloop.verifiers.judge import (
    format_refinement,
    judge_messages,
    parse_verdict,
    pick_judgment,
    refine_messages,
)


def tree_to_record(prompt_row: dict, result: TreeResult) -> dict:
    """A JSON-serialisable record: the prompt row plus the whole tree."""
    return {
        "prompt": prompt_row["prompt"],
        "row": prompt_row,
        "nodes": [asdict(n) for n in result.nodes],
        "success": result.success.id if result.success else None,
        "visit_order": list(result.visit_order),
        "generations": result.generations,
        "stopped": result.stopped,
        "unparseable": result.unparseable,
    }


def record_to_tree(record: dict) -> TreeResult:
    nodes = [Node(**n) for n in record["nodes"]]
    success = nodes[record["success"]] if record["success"] is not None else None
    return TreeResult(nodes, success, list(record["visit_order"]), record["generations"], record["stopped"],
                      record.get("unparseable", 0))


def refine_messages_for(prompt: str, node: Node) -> list[dict]:
    """The refine prompt for a node, with its first failing judgment as the review.

    Stages must build refine prompts with this, so `refiner_rft_set` reproduces them exactly."""
    return refine_messages(prompt, node.response, pick_judgment(node.judgment_texts, False))


def dpo_pairs(records: Iterable[dict]) -> list[dict]:
    """chosen = the successful refinement, rejected = the root (the actor's failing response)."""
    pairs = []
    for rec in records:
        if rec["success"] is None:
            continue
        root, win = rec["nodes"][0], rec["nodes"][rec["success"]]
        pairs.append({
            "prompt": rec["prompt"], "chosen": win["response"], "rejected": root["response"],
            "key": rec["row"].get("key"), "chosen_value": win["value"], "rejected_value": root["value"],
            "depth": win["depth"], "source": "refinement",
        })
    return pairs


def _value(r: Any) -> float:
    return float(r["value"] if isinstance(r, Mapping) else getattr(r, "value", r))


def best_worst_pairs(
    samples_by_prompt: Mapping[str, Sequence[str]], judge_results: Mapping[str, Sequence[Any]]
) -> list[dict]:
    """Ablation without refinement: chosen = highest-value sample, rejected = lowest (first on ties).

    judge_results[prompt][i] scores samples_by_prompt[prompt][i] (a JudgeResult, {"value": v} or a float).
    Prompts whose best and worst values are equal give no pair."""
    pairs = []
    for prompt, responses in samples_by_prompt.items():
        values = [_value(r) for r in judge_results[prompt]]
        if len(values) != len(responses):
            raise ValueError(f"{len(responses)} samples but {len(values)} judge results for prompt {prompt[:40]!r}")
        if not values:
            continue
        hi = max(range(len(values)), key=lambda i: (values[i], -i))
        lo = min(range(len(values)), key=lambda i: (values[i], i))
        if values[hi] > values[lo]:
            pairs.append({"prompt": prompt, "chosen": responses[hi], "rejected": responses[lo],
                          "chosen_value": values[hi], "rejected_value": values[lo], "source": "best_worst"})
    return pairs


def refiner_example(prompt: list[dict], completion: str, kind: str, **fields: Any) -> dict:
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}], "kind": kind, **fields}


def split_vote_text(texts: Sequence[str], decision: bool | None) -> str | None:
    """The judgment the refiner learns from when its votes split (some yes, some no): the first
    text agreeing with the majority. Unanimous votes teach nothing the refiner does not already do;
    a rule verdict has no text. None when there is no example."""
    verdicts = [parse_verdict(t) for t in texts]
    if decision is None or True not in verdicts or False not in verdicts:
        return None
    return next(t for t, v in zip(texts, verdicts) if v is decision)


def split_vote_judgment(node: Node) -> str | None:
    """`split_vote_text` of a tree node."""
    return split_vote_text(node.judgment_texts, node.decision)


def refinement_examples(records: Iterable[dict], cap: int) -> list[dict]:
    """One example per successful tree, its final step only: the parent's refine prompt -> the
    refinement that passed the gate. As the reference (thu-coai/SPaR, process_rft_data) builds it:
    the steps before it are refinements the refiner's own judge rejected."""
    out = []
    for rec in records:
        path = record_to_tree(rec).path()
        if len(path) >= 2:
            parent, child = path[-2], path[-1]
            out.append(refiner_example(refine_messages_for(rec["prompt"], parent),
                                       format_refinement(child.critique or "", child.response), "refinement",
                                       source="tree"))
    return out[:cap]


def balanced_judgments(candidates: Iterable[tuple[str, str, str, bool, str]], cap: int) -> list[dict]:
    """Judgment examples from (prompt, response, judgment text, verdict, source) candidates: the
    first of each (prompt, response), at most ceil(cap / 2) of each verdict (so neither "yes" nor
    "no" fills the set while the other is available, as the reference caps each), alternating
    no, yes, at most `cap` in all. Order follows `candidates`, so shuffle them (seeded) beforehand
    for a random subset."""
    seen: set[tuple[str, str]] = set()
    by_verdict: dict[bool, list[dict]] = {False: [], True: []}
    for prompt, response, text, verdict, source in candidates:
        if (prompt, response) in seen:
            continue
        seen.add((prompt, response))
        by_verdict[verdict].append(refiner_example(judge_messages(prompt, response), text, "judgment",
                                                   verdict=verdict, source=source))
    per = (cap + 1) // 2
    pairs = itertools.zip_longest(by_verdict[False][:per], by_verdict[True][:per])
    return [e for pair in pairs for e in pair if e][:cap]


def refiner_rft_set(judged: Sequence[dict], records: Sequence[dict], max_refinement: int,
                    max_judgment: int) -> list[dict]:
    """Chat prompt/completion examples for the refiner's RFT, from its own judging and tree search
    (self-play: no rule verdict enters): the final step of each successful tree
    (`refinement_examples`), then its judgments where its votes split, first on the actor's sampled
    responses (the reference's main source), then on tree nodes, balanced (`balanced_judgments`)."""
    candidates = []
    for s in judged:
        text = split_vote_text(s["judge"]["texts"], s["judge"]["decision"])
        if text is not None:
            candidates.append((s["prompt"], s["response"], text, s["judge"]["decision"], "samples"))
    for rec in records:
        for node in record_to_tree(rec).nodes:
            text = split_vote_judgment(node)
            if text is not None:
                candidates.append((rec["prompt"], node.response, text, node.decision, "tree"))
    return refinement_examples(records, max_refinement) + balanced_judgments(candidates, max_judgment)


def judge_accuracy(decisions: Sequence[bool | None], gold: Sequence[bool]) -> dict[str, float]:
    """Judge quality against gold labels; positive class = "follows all instructions".

    A None decision (unparseable or tie) is wrong for accuracy and never a positive prediction
    (so a None on a gold positive is a false negative); `coverage` says how many had a verdict.
    Most responses of a small model fail the rules, so accuracy alone flatters a judge that always
    says "no": `always_no` is that judge's accuracy, `balanced_accuracy` the mean of the accuracy
    on passing and on failing responses (0.5 for any constant judge), `f1_fails` the F1 of
    finding failures."""
    if len(decisions) != len(gold):
        raise ValueError(f"{len(decisions)} decisions but {len(gold)} gold labels")
    n = len(gold)
    pos = sum(bool(g) for g in gold)
    tp = sum(d is True and g for d, g in zip(decisions, gold))
    fp = sum(d is True and not g for d, g in zip(decisions, gold))
    fn = sum(d is not True and g for d, g in zip(decisions, gold))
    tn = sum(d is False and not g for d, g in zip(decisions, gold))  # failures found
    said_no = sum(d is False for d in decisions)

    def f1(hits: int, predicted: int, actual: int) -> float:
        return 2 * hits / (predicted + actual) if predicted + actual else 0.0

    class_acc = [x for x in (tp / pos if pos else None, tn / (n - pos) if n - pos else None) if x is not None]
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": f1(tp, tp + fp, pos),
        "coverage": sum(d is not None for d in decisions) / n if n else 0.0,
        "balanced_accuracy": sum(class_acc) / len(class_acc) if class_acc else 0.0,
        "f1_fails": f1(tn, said_no, n - pos),
        "always_no": (n - pos) / n if n else 0.0,
    }


def judging_scores(decision: bool | None, gold: bool, gold_labels: Sequence[bool]) -> dict[str, list[float]]:
    """One held-out response's scores as [numerator, denominator] (the paired bootstrap's ratio
    form): correct; correct weighted by 1 / (responses of its gold class), whose ratio over the
    set is `balanced_accuracy`; whether it got a verdict."""
    same_class = sum(bool(g) == bool(gold) for g in gold_labels)
    correct = float(decision is not None and decision == gold)
    return {"judge_accuracy": [correct, 1.0],
            "judge_balanced_accuracy": [correct / same_class, 1.0 / same_class],
            "judge_coverage": [float(decision is not None), 1.0]}
