"""params.yaml validation: each class of bad value stops the run with one line naming it, writing nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from closedloop.config import load_params
from closedloop.errors import UserError
from conftest import PROJECT, copy_project, project_env, set_params


def test_project_params_are_valid():
    params = load_params(PROJECT / "params.yaml")
    assert params.model.base == "embedded"
    assert params.model.trust_remote_code is False


@pytest.mark.parametrize("yaml_text, message", [
    ("rft: {num_samples: eight}", "params.yaml: rft.num_samples: expected an integer >= 1, got 'eight'"),
    ("rft: {num_samples: 0}", "params.yaml: rft.num_samples: expected an integer >= 1, got 0"),
    ("rft: {num_samples: 2.5}", "params.yaml: rft.num_samples: expected an integer >= 1, got 2.5"),
    ("rft: {numsamples: 3}", "params.yaml: rft.numsamples: unknown key (expected one of: num_samples,"),
    ("colour: blue", "params.yaml: colour: unknown key"),
    ("rft: {top_p: 1.5}", "params.yaml: rft.top_p: expected a number > 0.0 and <= 1.0, got 1.5"),
    ("rft: {top_p: yes}", "params.yaml: rft.top_p: expected a number > 0.0 and <= 1.0, got True"),
    ("rft: {verifier_mode: lenient}", "params.yaml: rft.verifier_mode: expected one of 'strict', 'loose', got 'lenient'"),
    ("model: {trust_remote_code: 'yes'}", "params.yaml: model.trust_remote_code: expected true or false, got 'yes'"),
    ("sft: {lora: {r: -1}}", "params.yaml: sft.lora.r: expected an integer >= 1, got -1"),
    ("sft: {lora: 3}", "params.yaml: sft.lora: expected a mapping of keys, got 3"),
    ("prepare: {eval_limit: many}", "params.yaml: prepare.eval_limit: expected an integer >= 1 or null, got 'many'"),
    ("prepare: {min_constraints: 3, max_constraints: 2}", "params.yaml: prepare.min_constraints: expected <= prepare.max_constraints"),
    ("rft: [1, 2", "params.yaml:1: invalid YAML"),
])
def test_bad_values_give_one_clear_error(tmp_path, yaml_text, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as e:
        load_params(path)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="params.yaml: file not found"):
        load_params(tmp_path / "params.yaml")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("params") / "project")


@pytest.mark.parametrize("command", [["closedloop", "stage", "prepare"], [sys.executable, "flows/pipeline.py"]])
def test_bad_params_stop_stage_and_flow_before_any_compute(project, tmp_path, command):
    set_params(project, {"rft": {"num_samples": "eight"}})
    env = project_env(project, tmp_path / "prefect")
    proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["error: params.yaml: rft.num_samples: expected an integer >= 1, got 'eight'"]
    # nothing written: no outputs, no MLflow store, no Prefect home
    assert not (project / "data" / "suite").exists()
    assert not (project / "mlflow.db").exists()
    assert not (tmp_path / "prefect").exists()
