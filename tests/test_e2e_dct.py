"""End to end, no mocks: DCT on a tiny from-config model through the Prefect flow (`--target dct`),
with MLflow runs per stage and DVC outputs: unsupervised, then the update mode rerunning from its
seeds on. The supervised mode (the default) runs in the whole-graph test (test_e2e_pipeline.py)."""

from __future__ import annotations

import json

import mlflow
import pytest
from conftest import TINY_PARAMS, copy_project, project_env, set_params
from test_e2e_pipeline import pipeline_runs, run_flow, stages_run

pytestmark = pytest.mark.e2e

STEPS = {f"dct_{s}" for s in ("seed", "expand", "score", "solve", "train", "train_seeds", "coherence")}


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dct_project(tmp_path_factory, tiny_model_dir, prefect_home):
    root = copy_project(tmp_path_factory.mktemp("dct") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    set_params(root, {"dct": {"seeds": {"mode": "unsupervised"}}})  # the model writes its own seeds
    env = project_env(root, prefect_home)
    return root, env, run_flow(root, env, "--target", "dct")


def test_dct_branch_through_the_flow(dct_project):
    root, _, proc = dct_project
    expected = {"base", "prepare", "facts", "eval@dct"} | STEPS
    assert stages_run(proc) == expected
    parents, children = pipeline_runs(root)
    by_stage = {r.data.tags["closedloop.dvc_stage"]: r for r in children[parents[-1].info.run_id]}
    assert set(by_stage) == expected
    assert all(r.info.status == "FINISHED" for r in by_stage.values())

    graphs = _rows(root / "data/dct/solved.jsonl")
    assert graphs and all(g["nodes"][0]["role"] == "seed" for g in graphs)
    for g in graphs:  # every chosen assignment satisfies its graph
        labels = [n["assigned"] for n in g["nodes"]]
        for a, b, kind in g["edges"]:
            assert not (labels[a] and labels[b]) if kind == "contradicts" else (not labels[a] or labels[b])
        assert all(0.0 <= n["p_true"] <= 1.0 for n in g["nodes"])
    solve = by_stage["dct_solve"]
    assert {"flips", "flip_rate", "coherence_before", "edges"} <= set(solve.data.metrics)
    client = mlflow.MlflowClient()
    assert "graphs/solved.jsonl" in {a.path for a in client.list_artifacts(solve.info.run_id, "graphs")}
    # coherence is measured on held-out graphs, whose seeds no model trained on
    heldout = _rows(root / "data/dct/heldout_graphs.jsonl")
    trained_on = {g["nodes"][0]["text"] for g in graphs}
    assert heldout and not {g["nodes"][0]["text"] for g in heldout} & trained_on
    coherence = by_stage["dct_coherence"]
    assert {"coherent_base", "coherent_dct", "coherent_dct-seeds", "coherence_diff_vs_base_ci_low",
            "coherence_diff_vs_dct-seeds", "assignment_agreement_train"} <= set(coherence.data.metrics)
    with_edges = [g for g in heldout if g["edges"]]
    for name in ("base", "dct", "dct-seeds"):
        records = _rows(root / f"data/dct/coherence/{name}/records.jsonl")
        assert [r["key"] for r in records] == [g["graph"] for g in with_edges]
    table = client.load_table(coherence.info.experiment_id, "heldout_graph_summary.json", [coherence.info.run_id])
    assert {"nodes", "edges", "coherent_base", "coherent_dct", "coherent_dct-seeds"} <= set(table.columns)
    assert by_stage["dct_train"].data.metrics["train_examples"] >= len(graphs)
    # the ablation trained on the seeds alone: one example per graph, at most doubled by label balancing
    assert len(graphs) <= by_stage["dct_train_seeds"].data.metrics["train_examples"] <= 2 * len(graphs)
    assert (root / "models/dct/model.safetensors").is_file() and (root / "models/dct-seeds/model.safetensors").is_file()
    # the shared evaluation scored the DCT model on the held-out claims
    metrics = json.loads((root / "data/eval/dct/metrics.json").read_text())
    assert 0.0 <= metrics["fact_accuracy"] <= 1.0 and metrics["fact_verification_examples"] > 0


def test_update_mode_takes_documents_as_true_and_evaluates_on_their_questions(dct_project):
    root, env, _ = dct_project
    set_params(root, {"dct": {"seeds": {"mode": "update"}},
                      "evaluate": {"claims": "data/seeds/dct_update_questions.jsonl"}})
    proc = run_flow(root, env, "--target", "dct")
    assert {"dct_seed", "eval@dct"} <= stages_run(proc)
    docs = [r["text"] for r in _rows(root / "data/seeds/dct_update.jsonl")]
    seeds = _rows(root / "data/dct/seeds.jsonl")
    assert len(seeds) == 4 and {s["text"] for s in seeds} <= set(docs)  # dct.seeds.max_seeds: 4 of the 8
    assert all(s["fixed"] and s["label"] is True for s in seeds)
    assert json.loads((root / "data/eval/dct/metrics.json").read_text())["fact_verification_examples"] == 16
