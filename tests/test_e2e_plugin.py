"""A method is one unit: adding one to a copy of the project touches only new files plus
params.yaml and dvc.yaml, and the flow runs it, `--target` selects it, and the comparison report
shows its row. No mocks: real Prefect flow, DVC graph, MLflow store, tiny model."""

from __future__ import annotations

import re
import subprocess
import textwrap

import psutil
import pytest
import yaml

from conftest import TINY_PARAMS, copy_project, project_env, set_params
from test_e2e_pipeline import pipeline_runs, run_flow, stages_run

pytestmark = pytest.mark.e2e

RECIPE = '''
"""Toy: a "method" whose feedback is to keep the base model's weights scaled by `scale`."""

from dataclasses import dataclass, field

from closedloop.config import bounds


@dataclass
class ToyConfig:
    scale: float = field(default=1.0, metadata=bounds(gt=0.0, le=2.0))  # 1.0: the base unchanged


CONFIG = ToyConfig


def scaled(state: dict, scale: float) -> dict:
    return {k: v * scale for k, v in state.items()}
'''

STAGES = '''
"""Toy's one stage: models/base -> models/toy."""

from pathlib import Path

import mlflow

from closedloop.io import atomic_dir
from closedloop.methods import toy


def run_make(params, root: Path, key):
    from safetensors.torch import load_file, save_file

    scale = params.toy.scale
    with atomic_dir(root / "models/toy") as tmp:
        for f in (root / "models/base").iterdir():
            if f.name == "model.safetensors":
                save_file(toy.scaled(load_file(f), scale), tmp / f.name, metadata={"format": "pt"})
            elif f.is_file():
                (tmp / f.name).write_bytes(f.read_bytes())
    mlflow.log_metric("scale", scale)


STAGES = {"toy_make": run_make}
'''

DVC_STAGE = {"cmd": "closedloop stage toy_make", "meta": {"method": "toy"},
             "deps": ["models/base", "src/closedloop/stages/toy.py", "src/closedloop/methods/toy.py"],
             "params": ["toy.scale"], "outs": ["models/toy"]}


@pytest.fixture(scope="module")
def plugged(tmp_path_factory, tiny_model_dir, prefect_home):
    root = copy_project(tmp_path_factory.mktemp("plugin") / "project")
    (root / "src/closedloop/methods/toy.py").write_text(textwrap.dedent(RECIPE))
    (root / "src/closedloop/stages/toy.py").write_text(textwrap.dedent(STAGES))
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    # this method's row alone (see evaluate.models below): the other methods' stages go, so that their
    # reports (compare's inputs under data/eval) do not hold the comparison back
    dvc_yaml["stages"] = {name: st for name, st in dvc_yaml["stages"].items()
                          if st.get("meta", {}).get("method", "shared") == "shared"}
    dvc_yaml["stages"]["toy_make"] = DVC_STAGE
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}, toy={"scale": 1.0}))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["models"] = {"base": "models/base", "toy": "models/toy"}  # only this method's row
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(root, prefect_home)
    env.pop("CLOSEDLOOP_STAGE_SERVER")  # as a user runs it: the flow starts its own stage server
    return root, env


def test_a_new_method_touches_only_new_files_params_and_dvc_yaml(plugged):
    root, _ = plugged
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    changed = sorted(line[3:] for line in status.splitlines())
    assert changed == ["dvc.yaml", "params.yaml", "src/closedloop/methods/toy.py", "src/closedloop/stages/toy.py"]


def test_the_flow_runs_the_new_method_by_target_and_reports_its_row(plugged):
    root, env = plugged
    proc = run_flow(root, env, "--target", "toy")
    # its stage, its evaluation and the comparison (whose other inputs are shared); no other method's stages
    assert stages_run(proc) == {"base", "prepare", "facts", "toy_make", "eval@toy", "eval@base", "compare"}
    parents, children = pipeline_runs(root)
    assert {r.data.tags["closedloop.dvc_stage"] for r in children[parents[-1].info.run_id]} == stages_run(proc)
    assert "| toy |" in proc.stdout and "| base |" in proc.stdout
    # scale 1.0 keeps the base's weights: the paired difference is exactly zero
    assert "Δ +0.0 [+0.0, +0.0]" in proc.stdout
    assert (root / "models/toy/model.safetensors").is_file()
    # every stage forked from the flow's own stage server (the new method's too: closedloop is
    # imported from the copy's src, where the method lives), and the server ended with the flow
    log = (root / ".dvc/tmp/closedloop-state/stage-server.log").read_text()
    assert sorted(re.findall(r"\['stage', '([^']+)'\] in pid", log)) == sorted(stages_run(proc))
    assert not psutil.pid_exists(int(re.search(r"ready on .* \(pid (\d+)\)", log).group(1)))
