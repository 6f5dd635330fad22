"""End to end, no mocks: SPAR iterations on a tiny from-config model through the Prefect flow, with
MLflow runs per stage and DVC outputs; an added iteration reruns nothing before it."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY_PARAMS, copy_project, project_env, set_params
from test_e2e_pipeline import pipeline_runs, run_flow, stages_run

pytestmark = pytest.mark.e2e

STEPS = ("spar_sample", "spar_judge", "spar_refine", "spar_pairs", "spar_actor", "spar_refiner", "spar_eval")

@pytest.fixture(scope="module")
def spar_project(tmp_path_factory, tiny_model_dir, prefect_home):
    root = copy_project(tmp_path_factory.mktemp("spar") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    env = project_env(root, prefect_home)
    return root, env, run_flow(root, env, "--target", "spar")


def test_one_iteration_through_the_flow(spar_project):
    root, env, proc = spar_project
    # eval@base: its held-out responses are the fixed set every judge (spar_eval_init, spar_eval) judges
    expected = ({"base", "prepare", "facts", "spar_init", "spar_eval_init", "eval@base", "eval@spar-it1"}
                | {f"{s}@it1" for s in STEPS})
    assert stages_run(proc) == expected
    parents, children = pipeline_runs(root)
    nested = children[parents[-1].info.run_id]
    assert {r.data.tags["closedloop.dvc_stage"] for r in nested} == expected
    for run in nested:
        assert run.data.tags["closedloop.dvc_lock_md5"]
    by_stage = {r.data.tags["closedloop.dvc_stage"]: r for r in nested}
    assert "judge_f1" in by_stage["spar_judge@it1"].data.metrics
    eval_metrics = by_stage["spar_eval@it1"].data.metrics
    assert "refiner_judge_f1" in eval_metrics
    assert "search_prompt_level_strict" in eval_metrics  # the "+search" row (spar.eval_search)
    refine = by_stage["spar_refine@it1"].data.metrics
    assert sum(refine[f"success_depth_{d}"] for d in (1, 2, 3)) == refine["successful_trees"]
    judges = {name: [json.loads(line) for line in (root / f"data/spar/judge/{name}/records.jsonl").open()]
              for name in ("base", "init", "it1")}
    assert len({tuple(r["key"] for r in rows) for rows in judges.values()}) == 1  # the same responses, paired
    assert "heldout_judge_accuracy" in eval_metrics
    assert by_stage["spar_pairs@it1"].data.metrics["dpo_pairs"] >= 1
    assert by_stage["spar_actor@it1"].data.metrics["train_pairs"] >= 1  # the actor really trained with DPO

    data = root / "data/spar/it1"
    pairs = [json.loads(line) for line in (data / "dpo.jsonl").read_text().splitlines()]
    assert all(p["chosen_value"] > p["rejected_value"] for p in pairs)
    actor_eval = json.loads((root / "data/eval/spar-it1/metrics.json").read_text())
    assert 0.0 <= actor_eval["prompt_level_strict"] <= 1.0  # the shared evaluation scored the actor
    assert (root / "models/spar/it1/actor/model.safetensors").is_file()
    assert (root / "models/spar/it1/refiner/model.safetensors").is_file()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {f"{s}@it1" for s in STEPS} <= set(lock)


def test_added_iteration_reruns_nothing_before_it(spar_project):
    root, env, _ = spar_project
    set_params(root, {"spar": {"iterations": {"it1": "init", "it2": "it1"}},
                      "evaluate": {"models": {"spar-it2": "models/spar/it2/actor"}}})
    proc = run_flow(root, env, "--target", "spar")
    assert stages_run(proc) == {f"{s}@it2" for s in STEPS} | {"eval@spar-it2"}
    assert (root / "data/eval/spar-it2/metrics.json").is_file()
