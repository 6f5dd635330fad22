"""SPaR training data from refinement trees: DPO pairs for the actor, an RFT set for the refiner.

Trees are stored as JSON records (`tree_to_record`) so stages can write them to JSONL and later
stages can rebuild them (`record_to_tree`). A pair contrasts the refinement that passed the gate
with the original failing response, so the two differ mostly in the constraint that was fixed
(SPaR's point: fewer distracting differences than independently sampled best/worst pairs).
"""

from __future__ import annotations

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


def refiner_example(prompt: list[dict], completion: str, kind: str) -> dict:
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}], "kind": kind}


def split_vote_judgment(node: Node) -> str | None:
    """The judgment the refiner learns from at a node whose votes split (some yes, some no): the
    first text agreeing with the majority. Unanimous nodes teach nothing the refiner does not
    already do; rule-judged nodes have no texts. None when the node gives no example."""
    verdicts = [parse_verdict(t) for t in node.judgment_texts]
    if node.decision is None or True not in verdicts or False not in verdicts:
        return None
    return next(t for t, v in zip(node.judgment_texts, verdicts) if v is node.decision)


def refiner_rft_set(records: Sequence[dict], max_refinement: int, max_judgment: int) -> list[dict]:
    """Chat prompt/completion examples for the refiner's RFT, from its own tree search (self-play:
    no rule verdict enters): refinements first, then judgments, each capped.

    Refinements: every step on a root-to-success path (the parent's refine prompt -> the child's
    "Critique: ...\nRefined response: ..."). Judgments: one per node whose votes split
    (`split_vote_judgment`). Order: records, then node id; caps keep the first examples, so
    shuffle `records` (seeded) beforehand for a random subset.
    """
    refinements: list[dict] = []
    judgments: list[dict] = []
    for rec in records:
        tree = record_to_tree(rec)
        path = tree.path()
        for parent, child in zip(path, path[1:]):
            refinements.append(refiner_example(refine_messages_for(rec["prompt"], parent),
                                        format_refinement(child.critique or "", child.response), "refinement"))
        for node in tree.nodes:
            text = split_vote_judgment(node)
            if text is not None:
                judgments.append(refiner_example(judge_messages(rec["prompt"], node.response), text, "judgment"))
    return refinements[:max_refinement] + judgments[:max_judgment]


def judge_accuracy(decisions: Sequence[bool | None], gold: Sequence[bool]) -> dict[str, float]:
    """Judge quality against gold labels; positive class = "follows all instructions".

    A None decision (unparseable or tie) is wrong for accuracy and never a positive prediction
    (so a None on a gold positive is a false negative)."""
    if len(decisions) != len(gold):
        raise ValueError(f"{len(decisions)} decisions but {len(gold)} gold labels")
    n = len(gold)
    tp = sum(d is True and g for d, g in zip(decisions, gold))
    fp = sum(d is True and not g for d, g in zip(decisions, gold))
    fn = sum(d is not True and g for d, g in zip(decisions, gold))
    correct = sum(d is not None and d == g for d, g in zip(decisions, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "coverage": sum(d is not None for d in decisions) / n if n else 0.0,
    }
