"""params.yaml validation: each class of bad value stops the run with one line naming it, writing nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from closedloop.config import Params, load_params, method_configs
from closedloop.errors import UserError
from conftest import PROJECT, copy_project, project_env, set_params


def test_project_params_are_valid():
    params = load_params(PROJECT / "params.yaml")
    assert params.model.base == "data/seeds/embedded-model.json" and (PROJECT / params.model.base).is_file()
    assert params.model.trust_remote_code is False
    assert params.rft.sft.lora.r == 16 and params.spar.judge.verifier == "hybrid_judge"


def test_dataclass_defaults_equal_params_yaml():
    """Every default documented in a params dataclass is the value params.yaml ships (one truth)."""
    shipped = load_params(PROJECT / "params.yaml").as_dict()
    defaults = Params(methods={name: cls() for name, cls in method_configs().items()}).as_dict()
    # The one exception: each method adds its model's row to evaluate.models (default: base alone).
    assert shipped["evaluate"].pop("models") == {"base": "models/base", "rft": "models/rft",
                                                 "spar-it1": "models/spar/it1/actor", "dct": "models/dct",
                                                 "rlhf": "models/rlhf/policy", "proxy-expert": "models/proxy/expert"}
    assert defaults["evaluate"].pop("models") == {"base": "models/base"}
    assert shipped == defaults


def test_every_method_module_with_a_config_is_a_section():
    assert {"rft", "spar", "dct"} <= set(method_configs())


@pytest.mark.parametrize("yaml_text, message", [
    ("rft: {num_samples: eight}", "params.yaml: rft.num_samples: expected an integer >= 1 and <= 1024, got 'eight'"),
    ("rft: {num_samples: 0}", "params.yaml: rft.num_samples: expected an integer >= 1 and <= 1024, got 0"),
    ("rft: {num_samples: 2.5}", "params.yaml: rft.num_samples: expected an integer >= 1 and <= 1024, got 2.5"),
    ("rft: {numsamples: 3}", "params.yaml: rft.numsamples: unknown key (expected one of: num_samples,"),
    ("colour: blue", "params.yaml: colour: unknown key"),
    ("rft: {top_p: 1.5}", "params.yaml: rft.top_p: expected a finite number > 0.0 and <= 1.0, got 1.5"),
    ("rft: {top_p: yes}", "params.yaml: rft.top_p: expected a finite number > 0.0 and <= 1.0, got 'yes'"),
    ("rft: {verifier_args: [strict]}", "params.yaml: rft.verifier_args: expected a mapping of names to"),
    ("model: {trust_remote_code: 'yes'}", "params.yaml: model.trust_remote_code: expected true or false, got 'yes'"),
    ("model: {trust_remote_code: on}", "params.yaml: model.trust_remote_code: expected true or false, got 'on'"),
    ("rft: {sft: {lora: {r: -1}}}", "params.yaml: rft.sft.lora.r: expected an integer >= 1 and <= 4096, got -1"),
    ("rft: {sft: {lora: 3}}", "params.yaml: rft.sft.lora: expected a mapping of keys, got 3"),
    ("rft: {sft: {learning_rate: .inf}}", "params.yaml: rft.sft.learning_rate: expected a finite number > 0.0"),
    ("rft: {temperature: .nan}", "params.yaml: rft.temperature: expected a finite number"),
    ("rft: {num_samples: 1000000000}", "params.yaml: rft.num_samples: expected an integer >= 1 and <= 1024"),
    ("prepare: {num_train: 1e9}", "params.yaml: prepare.num_train: expected an integer >= 1 and <= 10000000"),
    ("evaluate: {limit: many}", "params.yaml: evaluate.limit: expected an integer >= 1 and <= 10000000 or null, got 'many'"),
    ("evaluate: {reference: gpt}", "params.yaml: evaluate.reference: expected one of evaluate.models (base), got 'gpt'"),
    ("prepare: {min_constraints: 3, max_constraints: 2}", "params.yaml: prepare.min_constraints: expected <= prepare.max_constraints"),
    ("spar: {iterations: {it1: init, it2: it3}}", "params.yaml: spar.iterations.it2: expected 'it1' (the iteration before it)"),
    ("rft: [1, 2", "params.yaml:1: invalid YAML"),
    ("rft: {num_samples: 2}\nrft: {num_samples: 3}", "params.yaml:2: invalid YAML (duplicate key 'rft')"),
    ("", "params.yaml: empty"),
    ("# only a comment\n", "params.yaml: empty"),
    ("- a list", "params.yaml: top level: expected a mapping of sections, got list"),
])
def test_bad_values_give_one_clear_error(tmp_path, yaml_text, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as e:
        load_params(path)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_non_utf8_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("seed: 0\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"^params.yaml: expected UTF-8 text, got a byte 0xe9"):
        load_params(path)


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
    assert lines == ["error: params.yaml: rft.num_samples: expected an integer >= 1 and <= 1024, got 'eight'"]
    # nothing written: no outputs, no MLflow store, no Prefect home
    assert not (project / "data" / "suite").exists()
    assert not (project / "mlflow.db").exists()
    assert not (tmp_path / "prefect").exists()
