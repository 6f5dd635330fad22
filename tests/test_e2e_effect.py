"""Effect runs the way the README runs them: `closedloop effect <run>` on a tiny model (the same
code path as the effect size, with `--set` shrinking the counts), then `closedloop results`.
SPAR's and DCT's effect configurations have their own files (test_e2e_effect_spar.py, _dct.py),
so that pytest-xdist can run them beside this one.
The experiment is listed by `dvc exp show`, its stages are MLflow runs under one parent named
after the run, the workspace's params.yaml is left as it was, and results/<run>.json holds the
paired difference the results table is made from."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest

from conftest import PROJECT, TINY_PARAMS, VENV_BIN, copy_project, project_env, set_params
from closedloop.effects import RESULT_KEYS, load_results, load_spec, render_readme, validate

pytestmark = pytest.mark.e2e

# The tiny sizes: TINY_PARAMS' counts again, over the effect file's.
TINY_RFT = ["prepare.num_train=8", "prepare.num_eval=6", "rft.num_samples=4"]


def run(root, env, *args, check=True):
    proc = subprocess.run([f"{VENV_BIN}/closedloop", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1500)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tiny_project(tmp_path_factory, tiny_model_dir, name: str):
    """A committed copy of the project at TINY_PARAMS, without the committed results (each test
    makes its own): (root, env)."""
    root = copy_project(tmp_path_factory.mktemp(name) / "project")
    (root / "results").mkdir(exist_ok=True)
    for old in (root / "results").glob("*.json"):
        old.unlink()
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    env = project_env(root, tmp_path_factory.mktemp("prefect_unused"))
    subprocess.run(["git", "commit", "-qam", "tiny params"], cwd=root, check=True, env={
        **env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    return root, env


def tiny_effect(tmp_path_factory, tiny_model_dir, name: str, sets: list[str]):
    """`closedloop effect <name> --set ...` in a tiny project: (root, env, params.yaml's bytes
    before the run, the process, the --set arguments)."""
    root, env = tiny_project(tmp_path_factory, tiny_model_dir, f"{name}_effect")
    params_before = (root / "params.yaml").read_bytes()
    args = [a for s in sets for a in ("--set", s)]
    return root, env, params_before, run(root, env, "effect", name, *args), args


@pytest.fixture(scope="module")
def effect(tmp_path_factory, tiny_model_dir):
    return tiny_effect(tmp_path_factory, tiny_model_dir, "rft", TINY_RFT)


def test_effect_run_writes_its_results_file(effect):
    root, _, _, _, args = effect
    data = json.loads((root / "results/rft.json").read_text())
    assert set(RESULT_KEYS) <= set(data)
    assert data["method"] == "rft" and data["baseline"] == "base"
    assert data["metric"] == "instruction_following.prompt_level_strict"
    assert data["n"] == 6  # the held-out prompts, as --set asked
    assert data["delta"] == pytest.approx(data["value"] - data["baseline_value"])
    assert data["ci_low"] <= data["delta"] <= data["ci_high"] and data["se"] >= 0
    assert data["command"] == " ".join(["closedloop", "effect", "rft", *args])
    assert data["wall_seconds"] > 0 and len(data["rows"]) == 1
    # the records it was computed from are the experiment's: the eval set has the asked size
    assert sum(1 for _ in open(root / "data/eval/rft/records.jsonl")) == 6


def test_workspace_params_are_left_as_they_were(effect):
    root, _, params_before, _, _ = effect
    assert (root / "params.yaml").read_bytes() == params_before


def test_dvc_exp_show_lists_the_run_with_its_overrides(effect):
    root, env, *_ = effect
    show = json.loads(subprocess.run([f"{VENV_BIN}/dvc", "exp", "show", "--json"], cwd=root, env=env,
                                     capture_output=True, text=True, check=True).stdout)
    names = {rev["name"]: rev["data"] for b in show for e in b.get("experiments") or [] for rev in e["revs"]
             if rev.get("name")}
    assert "rft" in names
    params = names["rft"]["params"]["params.yaml"]["data"]
    assert params["prepare"]["num_eval"] == 6 and params["rft"]["num_samples"] == 4
    assert params["evaluate"]["suites"] == ["instruction_following"]  # from experiments/rft.yaml


def test_stages_are_mlflow_runs_under_the_effect_runs_parent(effect):
    root, *_ = effect
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("closedloop")
    parents = mlflow.search_runs([exp.experiment_id], output_format="list",
                                 filter_string="tags.`closedloop.effect_run` = 'rft'")
    assert len(parents) == 1 and parents[0].info.run_name == "rft"
    assert "rft.delta" in parents[0].data.metrics
    children = mlflow.search_runs([exp.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {"prepare", "rft_sample", "rft_verify", "rft_train", "eval@base", "eval@rft"} <= {
        r.info.run_name for r in children}


def test_results_command_renders_and_checks_the_table(effect):
    root, env, *_ = effect
    assert run(root, env, "results", "--check", check=False).returncode == 2  # the new file is not in the table
    run(root, env, "results")
    table = (root / "README.md").read_text()
    assert "| rft | rft | instruction_following.prompt_level_strict | 6 |" in table
    assert run(root, env, "results", "--check").returncode == 0


def test_rft_verify_counts_truncated_samples(effect):
    root, *_ = effect
    metrics = json.loads((root / "data/rft/verify_metrics.json").read_text())
    samples = [json.loads(line) for line in open(root / "data/rft/samples.jsonl")]
    assert metrics["num_truncated"] == sum(s["finish_reason"] != "stop" for s in samples)
    kept = {(json.loads(line)["key"], json.loads(line)["response"]) for line in open(root / "data/rft/sft.jsonl")}
    assert kept and all(s["finish_reason"] == "stop" for s in samples if (s["key"], s["response"]) in kept)


def test_a_bad_override_is_one_error_before_any_compute(effect):
    root, env, *_ = effect
    proc = run(root, env, "effect", "rft", "--set", "rft.num_samples=zero", check=False)
    assert proc.returncode == 2 and "rft.num_samples" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(root, env, "effect", "nosuch", check=False)
    assert proc.returncode == 2 and "experiments/nosuch.yaml" in proc.stderr and "rft" in proc.stderr


def test_the_committed_effect_files_are_valid():
    for path in sorted((PROJECT / "experiments").glob("*.yaml")):
        spec = load_spec(PROJECT, path.stem)
        params = validate(PROJECT, spec)  # the overrides pass the params validator
        assert params.seed == 0 and spec.rows


def test_the_readmes_results_table_is_generated_from_the_committed_files():
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme, load_results(PROJECT)) == readme, "run `closedloop results`"


def test_an_edit_made_during_the_run_is_kept(tmp_path, monkeypatch, capsys):
    """The workspace's params.yaml comes back as it was only when it holds exactly the run's
    overrides (what `dvc exp run -S` wrote); a user's edit during the run is kept and reported.
    DVC is replaced by a stand-in here: what is tested is the restore rule, not DVC."""
    import yaml as _yaml

    from closedloop import effects

    (tmp_path / "params.yaml").write_text("# mine\nseed: 0\nprepare: {num_eval: 48}\n")
    spec = effects.EffectSpec("x", "rft", "d", ["eval@base"], {"prepare.num_eval": 200}, [])

    def fake_run(cmd, **kw):
        if cmd[1:3] == ["exp", "run"]:
            data = _yaml.safe_load((tmp_path / "params.yaml").read_text())
            data["prepare"]["num_eval"] = 200
            data.update(extra)
            (tmp_path / "params.yaml").write_text(_yaml.safe_dump(data))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(effects.subprocess, "run", fake_run)
    extra = {}
    effects.run_experiment(tmp_path, spec, {})
    assert (tmp_path / "params.yaml").read_text().startswith("# mine")  # restored, comments and all
    extra = {"seed": 5}  # the user changed the seed while the run went on
    effects.run_experiment(tmp_path, spec, {})
    assert _yaml.safe_load((tmp_path / "params.yaml").read_text())["seed"] == 5
    assert "edited while the effect run went on" in capsys.readouterr().err
