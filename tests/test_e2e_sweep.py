"""Sweeps, the way the README runs them: `dvc exp run -S` in the workspace and a queued grid run
with `--run-all`, on a tiny model. `dvc exp show` lists every experiment with its metrics, and
each experiment's stages are MLflow runs in the project's store tagged with the experiment's name."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest

from conftest import TINY_PARAMS, copy_project, project_env, set_params

pytestmark = pytest.mark.e2e
METRICS = "data/eval/rft/metrics.json"
SWEPT = "rft.sft.learning_rate"


def dvc(root, env, *args) -> str:
    proc = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def experiments(show: list[dict]) -> dict[str, dict]:
    """{experiment name: its data} from `dvc exp show --json` (baseline rows excluded)."""
    out = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") and rev.get("data"):
                    out[rev["name"]] = rev["data"]
    return out


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir):
    root = copy_project(tmp_path_factory.mktemp("sweep") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    subprocess.run(["git", "commit", "-qam", "tiny params"], cwd=root, check=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": project_env(root, root)["PATH"]})
    env = project_env(root, tmp_path_factory.mktemp("prefect_unused"))
    # The stages fork from the tests' stage server, as docs/usage.md sets one up for `dvc exp run`
    # (11 stage processes here; each on its own spends 6-8 s on imports: test_kill_resume runs that path)
    dvc(root, env, "exp", "run", "-n", "lr3", "-S", f"{SWEPT}=0.0003", "eval@rft")
    # a grid of 2 experiments, as docs/usage.md sweeps SFT: sampling comes from DVC's run cache
    dvc(root, env, "exp", "run", "--queue", "-S", f"{SWEPT}=0.0001,0.0002", "eval@rft")
    dvc(root, env, "exp", "run", "--run-all", "-j", "1")
    show = json.loads(dvc(root, env, "exp", "show", "--json"))
    return root, experiments(show)


def test_exp_show_lists_each_experiment_with_its_params_and_metrics(swept):
    _, exps = swept
    assert len(exps) == 3, sorted(exps)
    seen = {}
    for name, data in exps.items():
        params = data["params"]["params.yaml"]["data"]
        seen[params["rft"]["sft"]["learning_rate"]] = name
        metrics = data["metrics"][METRICS]["data"]
        assert 0.0 <= metrics["prompt_level_strict"] <= 1.0
    assert sorted(seen) == [0.0001, 0.0002, 0.0003]
    assert seen[0.0003] == "lr3"


def test_each_experiments_stages_are_mlflow_runs_tagged_with_its_name(swept):
    root, exps = swept
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # the project's store, also for queued runs
    exp = mlflow.get_experiment_by_name("closedloop")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    for name, data in exps.items():
        runs = mlflow.search_runs([exp.experiment_id], output_format="list",
                                  filter_string=f"tags.`closedloop.dvc_exp` = '{name}'")
        by_stage = {r.info.run_name: r for r in runs}
        # the first experiment ran the whole ancestry; the queued ones only what the swept param feeds
        ran = {"rft_train", "eval@rft"} | ({"base", "prepare", "facts", "rft_sample", "rft_verify"} if name == "lr3" else set())
        assert set(by_stage) == ran, (name, sorted(by_stage))
        learning_rate = data["params"]["params.yaml"]["data"]["rft"]["sft"]["learning_rate"]
        assert float(by_stage["rft_train"].data.params[SWEPT]) == learning_rate
        assert all(r.info.status == "FINISHED" for r in runs)
