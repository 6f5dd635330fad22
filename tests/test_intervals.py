"""Results that survive a reviewer: intervals that resample seed tasks when prompts share one,
truncation counted from how each answer ended, and the difference among answers neither model cut."""

from __future__ import annotations

import numpy as np
import pytest

from closedloop.evaluate.bootstrap import cluster_sums, paired_difference
from closedloop.evaluate.compare import compare_suite, markdown
from closedloop.evaluate.instruction_following import InstructionFollowing
from closedloop.generate import Completion


def _clustered(n_tasks: int = 10, per_task: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A model that helps on some seed tasks and not others: every prompt of a task shares the outcome."""
    rng = np.random.default_rng(seed)
    task_gain = rng.random(n_tasks) < 0.5
    clusters = [t for t in range(n_tasks) for _ in range(per_task)]
    base = np.array([float(rng.random() < 0.4) for _ in clusters])
    tuned = np.array([1.0 if task_gain[t] else b for t, b in zip(clusters, base)])
    return tuned, base, clusters


def test_the_cluster_bootstrap_is_wider_when_prompts_of_a_task_share_an_outcome():
    tuned, base, clusters = _clustered()
    one = np.ones(len(base))
    plain = paired_difference(tuned, one, base, one, 4000, 0)
    nt, dt, nb, db = cluster_sums(clusters, tuned, one, base, one)
    clustered = paired_difference(nt, dt, nb, db, 4000, 0)
    assert clustered["value"] == pytest.approx(plain["value"])  # the same point estimate: a ratio of sums
    assert clustered["ci_high"] - clustered["ci_low"] > 1.5 * (plain["ci_high"] - plain["ci_low"])
    # pairing kept: a model against itself, clustered, has no spread at all
    assert paired_difference(nb, db, nb, db, 500, 0) == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "se": 0.0}


def test_cluster_sums_add_up_within_clusters_in_first_seen_order():
    num, den = cluster_sums(["b", "a", "b", "c"], np.array([1, 0, 1, 1.0]), np.array([1, 2, 1, 1.0]))
    assert num.tolist() == [2.0, 0.0, 1.0] and den.tolist() == [2.0, 2.0, 1.0]


def _records(outcomes, clusters=None, cut=None):
    return [{"suite": "s", "key": i, "scores": {"acc": [float(o), 1.0]}, "breakdown": {},
             **({"seed_id": clusters[i]} if clusters is not None else {}),
             **({"finish_reason": "length" if cut[i] else "stop"} if cut is not None else {})}
            for i, o in enumerate(outcomes)]


def test_compare_resamples_seed_tasks_when_the_records_name_them():
    tuned, base, clusters = _clustered()
    by_task = compare_suite({"base": _records(base, clusters), "tuned": _records(tuned, clusters)}, ("acc",), "base",
                            2000, 0)
    plain = compare_suite({"base": _records(base), "tuned": _records(tuned)}, ("acc",), "base", 2000, 0)
    assert by_task["interval"] == {"resamples": "seed_id", "clusters": 10}
    assert plain["interval"] == {"resamples": "example", "clusters": 100}
    d, p = by_task["models"]["tuned"]["diff"]["acc"], plain["models"]["tuned"]["diff"]["acc"]
    assert d["ci_high"] - d["ci_low"] > p["ci_high"] - p["ci_low"]
    assert "resampling 10 seed_id clusters" in markdown("s", by_task, "g")


def test_truncation_rate_comes_from_how_answers_ended():
    records = {"base": _records([1, 0, 0, 1], cut=[0, 1, 1, 0]), "tuned": _records([1, 1, 0, 1], cut=[0, 0, 1, 0])}
    result = compare_suite(records, ("acc",), "base", 100, 0)
    assert result["models"]["base"]["truncated"] == 0.5 and result["models"]["tuned"]["truncated"] == 0.25
    assert "| base | 4 | 50.0 |" in markdown("s", result, "g")
    assert compare_suite({"base": _records([1])}, ("acc",), "base", 10, 0)["models"]["base"]["truncated"] is None


class _Ends:
    """A backend whose answers end as told: what the suite records must be what it returned."""

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompts, params):
        return [[c] for c in self.completions]


def test_a_record_says_how_its_answer_ended():
    from types import SimpleNamespace

    params = SimpleNamespace(seed=0, evaluate=SimpleNamespace(temperature=0.0, max_new_tokens=8))
    rows = [{"key": k, "prompt": "Write one word.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
            for k in ("a", "b")]
    ends = [Completion("hello", 2, "stop"), Completion("hello there and the", 8, "length")]
    records = InstructionFollowing().run(params, rows, _Ends(ends))
    assert [(r["finish_reason"], r["num_tokens"]) for r in records] == [("stop", 2), ("length", 8)]


def _claims(p_true: list[float], labels: list[bool]) -> list[dict]:
    return [{"suite": "fact_verification", "key": i, "p_true": p, "label": y,
             "scores": {"fact_accuracy": [float((p >= 0.5) == y), 1.0]}, "breakdown": {}}
            for i, (p, y) in enumerate(zip(p_true, labels))]


def test_an_all_false_model_is_flagged_and_has_auc_one_half():
    from closedloop.effects import _label_checks, table

    rng = np.random.default_rng(0)
    labels = [bool(x) for x in rng.random(60) < 0.5]
    base = _claims([0.7 if y else 0.3 for y in labels], labels)  # separates the labels
    constant = _claims([0.2] * 60, labels)  # answers "false" to everything
    checks = _label_checks({"base": base, "seeds": constant}, "seeds", "base", 0)
    assert checks["true_share"] == 0.0 and checks["baseline_true_share"] == pytest.approx(sum(labels) / 60)
    assert checks["degenerate"] == ["seeds"]
    assert checks["auc"]["value"] == 0.5 and checks["auc"]["baseline_value"] == 1.0
    assert checks["auc"]["ci_high"] < 0  # the constant's AUC is worse, whatever its accuracy
    row = {"method": "dct", "metric": "m", "n": 60, "baseline": "base", "baseline_value": 0.5, "value": 0.5,
           "delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "se": 0.0, "wall_seconds": 60, "command": "c",
           "model": "seeds", **checks}
    assert "**degenerate**: `seeds`" in table([{"run": "dct", "rows": [row]}])


def test_coherence_without_its_trivial_part_is_not_100_for_an_all_false_model():
    from closedloop.stages.dct import coherence_records

    graphs = [{"graph": g, "nodes": [{"text": "seed"}, {"text": "a"}, {"text": "b"}],
               "edges": [[0, 1, "implies"], [0, 2, "contradicts"]]} for g in range(4)]
    all_false = coherence_records(graphs, [[0.1, 0.2, 0.3]] * 4)
    assert all(r["scores"]["coherent"] == [1.0, 1.0] for r in all_false)  # every edge holds...
    assert all(r["scores"]["coherent_seed_true"] == [0.0, 0.0] for r in all_false)  # ...but no seed is believed
    result = compare_suite({"base": all_false}, ("coherent", "coherent_seed_true", "seed_true"), "base", 10, 0)
    values = {m: v["value"] for m, v in result["models"]["base"]["metrics"].items()}
    assert values == {"coherent": 1.0, "coherent_seed_true": 0.0, "seed_true": 0.0}


def test_eval_records_keep_the_seed_task_the_intervals_resample(tmp_path):
    import json

    from closedloop.suite import load_eval_rows

    path = tmp_path / "eval.jsonl"
    rows = [{"key": f"eval-{i}", "prompt": "Write a line.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{}], "seed_id": f"task-{i % 2}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_eval_rows(path, None, 0)
    assert [r["seed_id"] for r in loaded] == ["task-0", "task-1", "task-0"]
    from types import SimpleNamespace

    params = SimpleNamespace(seed=0, evaluate=SimpleNamespace(temperature=0.0, max_new_tokens=8))
    records = InstructionFollowing().run(params, loaded, _Ends([Completion("a line", 2, "stop")] * 3))
    assert [r["seed_id"] for r in records] == ["task-0", "task-1", "task-0"]
    assert compare_suite({"base": records}, ("prompt_level_strict",), "base", 10, 0)["interval"] == {
        "resamples": "seed_id", "clusters": 2}


def test_a_result_from_an_uncommitted_tree_is_marked_in_the_table():
    from closedloop.effects import table

    row = {"method": "dct", "model": "dct", "metric": "m", "n": 1, "baseline": "base", "baseline_value": 0.5, "value": 0.5,
           "delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "se": 0.0, "wall_seconds": 60, "command": "closedloop effect dct"}
    dirty = table([{"run": "dct", "commit": "abc-dirty", **row}])
    assert "**produced from an uncommitted tree** (commit abc-dirty)" in dirty
    assert "uncommitted" not in table([{"run": "dct", "commit": "abc", **row}])


def test_a_pooled_row_averages_each_examples_score_over_the_seeds_and_the_table_names_them():
    from closedloop.effects import pool_over_seeds, table
    from closedloop.errors import UserError

    def run(passed: list[int]) -> list[dict]:
        return [{"key": f"k{i}", "seed_id": i // 2, "finish_reason": "stop",
                 "scores": {"prompt_level_strict": [p, 1]}} for i, p in enumerate(passed)]
    pooled = pool_over_seeds([run([1, 0, 1, 0]), run([1, 1, 0, 0])], "prompt_level_strict")
    assert [r["scores"]["prompt_level_strict"] for r in pooled] == [[1.0, 1], [0.5, 1], [0.5, 1], [0.0, 1]]
    assert all("finish_reason" not in r and r["seed_id"] == i // 2 for i, r in enumerate(pooled))
    # paired with the base, its difference is the mean of the seeds' differences
    base = run([0, 0, 1, 0])
    result = compare_suite({"base": base, "rft": pooled}, ("prompt_level_strict",), "base", 200, 0)
    assert result["models"]["rft"]["diff"]["prompt_level_strict"]["value"] == pytest.approx((0.25 + 0.25) / 2)
    with pytest.raises(UserError, match="same examples"):
        pool_over_seeds([run([1, 0]), run([1, 0, 1])], "prompt_level_strict")

    row = {"method": "rft", "model": "rft", "metric": "m", "n": 4, "baseline": "base", "baseline_value": 0.25,
           "value": 0.5, "delta": 0.25, "ci_low": 0.0, "ci_high": 0.5, "se": 0.1, "wall_seconds": 60,
           "command": "closedloop effect rft-seeds", "commit": "abc"}
    data = {"run": "rft-seeds", "seeds": {"param": "rft.seed", "values": [0, 1]}, **row,
            "rows": [{**row, "training_seed": "pooled"}, {**row, "training_seed": 0}, {**row, "training_seed": 1}]}
    lines = table([data]).splitlines()
    assert lines[2].startswith("| rft-seeds (rft, pooled over 2 seeds) |")
    assert lines[3].startswith("| rft-seeds (rft, seed 0) |") and lines[4].startswith("| rft-seeds (rft, seed 1) |")
