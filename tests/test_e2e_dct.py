"""End to end, no mocks: DCT's update mode on a tiny from-config model through the Prefect flow
(`--target dct`): new documents taken as true, evaluated on their questions. The unsupervised mode
runs in the whole-graph test (test_e2e_pipeline.py), the supervised default in the DCT effect test."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_PARAMS, copy_project, project_env, set_params
from test_e2e_pipeline import pipeline_runs, run_flow, stages_run

pytestmark = pytest.mark.e2e


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_update_mode_takes_documents_as_true_and_evaluates_on_their_questions(tmp_path_factory, tiny_model_dir,
                                                                              prefect_home):
    root = copy_project(tmp_path_factory.mktemp("dct") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    set_params(root, {"dct": {"seeds": {"mode": "update"}},
                      "evaluate": {"claims": "data/seeds/dct_update_questions.jsonl"}})
    proc = run_flow(root, project_env(root, prefect_home), "--target", "dct")
    assert {"dct_seed", "eval@dct"} | {f"dct_{s}" for s in ("expand", "score", "solve", "train")} <= stages_run(proc)
    parents, children = pipeline_runs(root)
    assert all(r.info.status == "FINISHED" for r in children[parents[-1].info.run_id])
    docs = [r["text"] for r in _rows(root / "data/seeds/dct_update.jsonl")]
    seeds = _rows(root / "data/dct/seeds.jsonl")
    assert len(seeds) == 4 and {s["text"] for s in seeds} <= set(docs)  # dct.seeds.max_seeds: 4 of the 8
    assert all(s["fixed"] and s["label"] is True for s in seeds)
    for graph in _rows(root / "data/dct/solved.jsonl"):  # a document stays true through the solver
        assert graph["nodes"][0]["assigned"] is True
    assert json.loads((root / "data/eval/dct/metrics.json").read_text())["fact_verification_examples"] == 16
