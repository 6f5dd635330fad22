"""`closedloop effect dct` at tiny sizes: DCT against base and its seeds-only ablation."""

from __future__ import annotations

import json

import pytest

from test_e2e_effect import tiny_effect

pytestmark = pytest.mark.e2e


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# DCT's effect configuration at tiny sizes: TINY_PARAMS' counts over the effect file's.
TINY_DCT = ["facts.num_train=8", "facts.num_eval=8", "dct.seeds.max_seeds=4", "dct.heldout.max_seeds=4"]


@pytest.fixture(scope="module")
def dct_effect(tmp_path_factory, tiny_model_dir):
    return tiny_effect(tmp_path_factory, tiny_model_dir, "dct", TINY_DCT)[0]


def test_dct_effect_compares_with_the_seeds_only_ablation(dct_effect):
    data = json.loads((dct_effect / "results/dct.json").read_text())
    assert [(r["model"], r["baseline"], r["metric"]) for r in data["rows"]] == [
        ("dct", "base", "fact_verification.fact_accuracy"), ("dct-seeds", "base", "fact_verification.fact_accuracy"),
        ("dct", "dct-seeds", "fact_verification.fact_accuracy"), ("dct", "base", "coherence.coherent"),
        ("dct", "dct-seeds", "coherence.coherent"), ("dct", "base", "coherence.coherent_seed_true")]
    assert [r["n"] for r in data["rows"][:3]] == [8, 8, 8]  # the held-out claims, as --set asked
    for row in data["rows"][:3]:  # fact rows: the share labelled true, the flag, the threshold-free AUC
        assert 0 <= row["true_share"] <= 1 and isinstance(row["degenerate"], list)
        assert row["auc"]["ci_low"] <= row["auc"]["delta"] <= row["auc"]["ci_high"]
    assert all("auc" not in row for row in data["rows"][3:])  # coherence records hold no P(true)
    # only the families the effect file names, and the ablation's eval is the experiment's own row
    claims = _jsonl(dct_effect / "data/facts/eval.jsonl")
    assert {c["kind"] for c in claims} <= {"set_membership", "comparison"}
    metrics = json.loads((dct_effect / "data/eval/base/metrics.json").read_text())
    assert "fact_auc" in metrics and {k for k in metrics if k.startswith("fact_auc_")} <= {
        "fact_auc_set_membership", "fact_auc_comparison"}
    seeds = {r["text"] for r in _jsonl(dct_effect / "data/dct/seeds.jsonl")}
    heldout = {g["nodes"][0]["text"] for g in _jsonl(dct_effect / "data/dct/heldout_graphs.jsonl")}
    assert len(seeds) == 4 and len(heldout) == 4 and not seeds & heldout
    # supervised (the effect's mode, the default): every seed keeps its labelled truth through the solver
    train = {r["claim"]: r["label"] for r in _jsonl(dct_effect / "data/facts/train.jsonl")}
    for graph in _jsonl(dct_effect / "data/dct/solved.jsonl"):
        seed = graph["nodes"][0]
        assert seed["fixed"] and seed["assigned"] == seed["label"] == train[seed["text"]]
