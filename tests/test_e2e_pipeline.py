"""End to end, no mocks: the Prefect flow runs the real DVC graph on a tiny from-config model in a
temporary git repo copied from the project, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import IFEVAL, TINY_PARAMS, copy_project, project_env, set_params

pytestmark = pytest.mark.e2e

RFT_STAGES = {"base", "prepare", "rft_sample", "rft_verify", "rft_train", "eval_base", "eval_rft", "report"}
SPAR_STAGES = {"spar_init"} | {f"spar_{s}@it1" for s in ("sample", "judge", "refine", "pairs", "actor", "refiner", "eval")}
ALL_STAGES = RFT_STAGES | SPAR_STAGES
LINEAGE = ("closedloop.git_commit", "closedloop.dvc_stage", "closedloop.dvc_lock_md5",
           "closedloop.prefect_flow_run_id", "closedloop.base_model")


def run_flow(root, env, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "flows/pipeline.py", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def stages_run(proc) -> set[str]:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("stages run:")][-1]
    names = line.split(":", 1)[1].strip()
    return set() if names.startswith("none") else {s.strip() for s in names.split(",")}


def pipeline_runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("closedloop")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("closedloop.run_kind") == "pipeline"]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return parents, children


def dvc(root, env, *args) -> str:
    proc = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, prefect_home):
    root = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    params = dict(TINY_PARAMS, model={"base": str(tiny_model_dir)})
    if IFEVAL.is_file():  # held-out set: the real IFEval prompts (a deterministic subset)
        params["prepare"] = dict(params["prepare"], eval_source=str(IFEVAL), eval_limit=6)
    set_params(root, params)
    env = project_env(root, prefect_home)
    first = run_flow(root, env)
    return root, env, first


def test_flow_runs_whole_graph_with_mlflow_lineage(project):
    root, env, first = project
    assert stages_run(first) == ALL_STAGES
    assert "prompt_level_strict" in first.stdout  # the results table is printed
    assert "SPAR iteration" in first.stdout  # and the SPAR curve
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    parents, children = pipeline_runs(root)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["closedloop.prefect_flow_run_id"]
    nested = children[parent.info.run_id]
    assert {r.data.tags["closedloop.dvc_stage"] for r in nested} == ALL_STAGES
    for run in nested:
        assert run.info.status == "FINISHED"
        for tag in LINEAGE:
            assert run.data.tags.get(tag), (run.info.run_name, tag)
        assert run.data.tags["closedloop.prefect_flow_run_id"] == parent.data.tags["closedloop.prefect_flow_run_id"]
    by_stage = {r.data.tags["closedloop.dvc_stage"]: r for r in nested}
    assert "prompt_level_strict" in by_stage["eval_base"].data.metrics
    assert "prompt_level_strict_ci_low" in by_stage["eval_rft"].data.metrics
    assert "sample_pass_rate" in by_stage["rft_verify"].data.metrics
    assert "train_loss" in by_stage["rft_train"].data.metrics
    assert by_stage["rft_sample"].data.params["rft.num_samples"] == "2"
    # the lock hash tag matches what DVC locked for that stage
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == ALL_STAGES
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(by_stage["rft_train"].info.run_id)}
    assert "adapter" in artifacts
    adapter_files = {a.path for a in client.list_artifacts(by_stage["rft_train"].info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    eval_artifacts = {a.path for a in client.list_artifacts(by_stage["eval_rft"].info.run_id)}
    assert {"report.json", "per_instruction.png", "generations.json"} <= eval_artifacts
    # the held-out set is the IFEval subset, and the metrics file is what DVC reads
    metrics = dvc(root, env, "metrics", "show", "--json")
    assert "prompt_level_strict" in metrics


def test_second_run_executes_nothing_and_dvc_is_clean(project):
    root, env, _ = project
    assert "up to date" in dvc(root, env, "status")
    second = run_flow(root, env)
    assert stages_run(second) == set()
    parents, children = pipeline_runs(root)
    assert len(parents) == 2 and children[parents[-1].info.run_id] == []
    out = dvc(root, env, "repro")
    assert "Running stage" not in out


def test_changing_one_param_reruns_only_downstream(project):
    root, env, _ = project
    set_params(root, {"rft": {"num_samples": 3}})
    third = run_flow(root, env, "--target", "report")
    ran = stages_run(third)
    assert "rft_sample" in ran
    assert ran <= {"rft_sample", "rft_verify", "rft_train", "eval_rft", "report"}
    parents, children = pipeline_runs(root)
    assert {r.data.tags["closedloop.dvc_stage"] for r in children[parents[-1].info.run_id]} == ran
    assert "up to date" in dvc(root, env, "status")


def test_target_runs_only_its_ancestry(project):
    root, env, _ = project
    set_params(root, {"evaluate": {"max_new_tokens": 10}})
    proc = run_flow(root, env, "--target", "eval_base")
    assert stages_run(proc) == {"eval_base"}
    # eval_rft depends on the same param and is now stale, but was not a target
    assert "eval_rft" in dvc(root, env, "status")
