"""Effect runs the way the README runs them: `closedloop effect <run>` on a tiny model (the same
code path as the effect size, with `--set` shrinking the counts), then `closedloop results`.
SPAR's and DCT's effect configurations have their own files (test_e2e_effect_spar.py, _dct.py),
so that pytest-xdist can run them beside this one.
The experiment is listed by `dvc exp show`, its stages are MLflow runs under one parent named
after the run, the workspace is never touched (the run is a `dvc exp run --temp`; `dvc exp
apply` brings its outputs in), and results/<run>.json holds the paired difference the results
table is made from. A run killed with SIGKILL resumes from a fresh clone sharing the DVC cache,
recomputing only what had not finished, to the same results; `closedloop status` follows it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import yaml
import pytest

from conftest import IFEVAL, PROJECT, TINY_PARAMS, VENV_BIN, copy_project, project_env, set_params
from closedloop.effects import RESULT_KEYS, load_results, load_spec, render_readme, validate
from closedloop.errors import UserError

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


def git_status(root, env) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, env=env,
                          capture_output=True, text=True, check=True).stdout


def tiny_effect(tmp_path_factory, tiny_model_dir, name: str, sets: list[str]):
    """`closedloop effect <name> --set ...` in a tiny project, then `dvc exp apply <name>` so the
    tests read its outputs: (root, env, `git status` of tracked files right after the run, the
    process, the --set arguments)."""
    root, env = tiny_project(tmp_path_factory, tiny_model_dir, f"{name}_effect")
    args = [a for s in sets for a in ("--set", s)]
    proc = run(root, env, "effect", name, *args)
    after = git_status(root, env)
    # exits non-zero for the outputs of stages the run did not need (dvc.lock holds the committed
    # hashes of those, which this copy's cache lacks); the run's own outputs are checked out
    subprocess.run([f"{VENV_BIN}/dvc", "exp", "apply", name], cwd=root, env=env, capture_output=True)
    return root, env, after, proc, args


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


def test_the_workspace_is_left_as_it_was(effect):
    _, _, status_after_run, _, _ = effect
    assert status_after_run == ""  # params.yaml, dvc.lock and every tracked file equal git's


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


@pytest.fixture(scope="module")
def seeded(effect, tmp_path_factory):
    """`closedloop effect rft-seeds` in a clone of the effect fixture's commit that shares its DVC
    cache: the base and its evaluation are restored from there, each seed's RFT stages run."""
    origin, env, _, _, args = effect
    root = tmp_path_factory.mktemp("seeded") / "project"
    subprocess.run(["git", "clone", "-q", str(origin), str(root)], check=True)
    env = env | {"CLOSEDLOOP_DVC_CACHE": str(origin / ".dvc" / "cache"), "PYTHONPATH": str(root / "src")}
    run(root, env, "effect", "rft-seeds", *args)
    return root, env, git_status(root, env)


def test_a_seeded_effect_run_has_a_row_per_seed_and_one_pooled(seeded):
    """experiments/rft-seeds.yaml: one DVC experiment per rft.seed, the held-out set fixed."""
    import dvc.api

    from closedloop.effects import exp_ref

    root, env, status_after_run = seeded
    assert status_after_run == ""
    data = json.loads((root / "results/rft-seeds.json").read_text())
    rows = data["rows"]
    assert [r["training_seed"] for r in rows] == ["pooled", 0, 1, 2]
    assert len({r["baseline_value"] for r in rows}) == 1 and all(r["n"] == 6 for r in rows)  # one base, one set
    # prompt-level scores have one denominator per prompt: the pooled value is the seeds' mean
    assert rows[0]["value"] == pytest.approx(sum(r["value"] for r in rows[1:]) / 3)
    assert rows[0]["ci_low"] <= rows[0]["delta"] <= rows[0]["ci_high"] and data["delta"] == rows[0]["delta"]
    assert set(data["stages"]) == {"seed 0", "seed 1", "seed 2"}
    # the stages the seeds share (prepare, base, eval@base) count once in the run's cost
    per_seed = {seed: sum(st["seconds"] or 0.0 for st in stages.values()) for seed, stages in data["stages"].items()}
    restored = [s for s in data["stages"]["seed 0"] if all(data["stages"][f"seed {k}"][s]["source"] == "cache"
                                                              for k in (1, 2))]
    assert {"prepare", "base", "eval@base"} <= set(restored) and "rft_sample" not in restored
    shared = sum(data["stages"]["seed 0"][s]["seconds"] for s in restored)
    assert data["wall_seconds"] == pytest.approx(sum(per_seed.values()) - 2 * shared, abs=0.2)
    samples = {k: dvc.api.read("data/rft/samples.jsonl", repo=str(root), rev=exp_ref(root, f"rft-seeds-seed{k}"))
               for k in (0, 1, 2)}
    assert len(set(samples.values())) == 3  # each seed sampled its own
    status = run(root, env, "status", "rft-seeds")  # follows the seed it ran last
    assert "eval@rft" in status.stdout and "finished" in status.stdout
    run(root, env, "results")
    assert "| rft-seeds (rft, pooled over 3 seeds) |" in (root / "README.md").read_text()


def test_the_committed_effect_files_are_valid():
    given = {"evaluate.prompts": str(IFEVAL)}  # what a run's `requires` asks the user for
    checked = 0
    for path in sorted((PROJECT / "experiments").glob("*.yaml")):
        requires = yaml.safe_load(path.read_text()).get("requires") or {}
        assert set(requires) <= set(given), f"{path.name}: give the test a value for {sorted(requires)}"
        if requires:
            with pytest.raises(UserError, match=rf"needs --set {next(iter(requires))}="):
                load_spec(PROJECT, path.stem)  # refused without the user's data
            if not IFEVAL.is_file():
                continue
        spec = load_spec(PROJECT, path.stem, {k: given[k] for k in requires})
        params = validate(PROJECT, spec)  # the overrides pass the params validator
        assert params.seed == 0 and spec.rows
        checked += 1
    assert checked >= 4


def test_the_readmes_results_table_is_generated_from_the_committed_files():
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme, load_results(PROJECT)) == readme, "run `closedloop results`"


# ---- a run killed with SIGKILL, resumed from a fresh clone that shares the DVC cache ----

VOLATILE = ("wall_seconds", "stages", "attempts")  # what may differ between attempts: the cost, not the result


def _kill_tree(pid: int) -> None:
    """SIGKILL the effect run and everything under it (DVC runs stage commands in their own session)."""
    import psutil

    try:
        runner = psutil.Process(pid)
        for p in [*runner.children(recursive=True), runner]:
            p.kill()
    except psutil.Error:
        pass


def _without(data: dict, keys=VOLATILE) -> dict:
    return {k: ([_without(r, keys) for r in v] if k == "rows" else v) for k, v in data.items() if k not in keys}


@pytest.fixture(scope="module")
def resumed(effect, tmp_path_factory):
    """Clone B of the effect fixture's commit, its DVC cache outside it: `closedloop effect rft
    --detach` (B's code edited meanwhile), watched with `closedloop status` and SIGKILLed once its
    fourth stage has started; then a fresh clone C on the same cache reruns it to the end."""
    import re
    import time

    import psutil

    from closedloop.run_state import RunState

    origin, env, _, _, args = effect
    tmp = tmp_path_factory.mktemp("resume")
    env = env | {"CLOSEDLOOP_DVC_CACHE": str(tmp / "shared" / "dvc")}
    b, c = tmp / "b", tmp / "c"
    subprocess.run(["git", "clone", "-q", str(origin), str(b)], check=True)
    # closedloop imported from clone B's src (as an editable install of it would be), whose code is
    # then edited while the run goes on: the run must keep running the code of its commit
    detached = run(b, env | {"PYTHONPATH": str(b / "src")}, "effect", "rft", *args, "--detach").stdout
    edited = b / "src/closedloop/stages/__init__.py"
    committed = edited.read_text()
    pid = int(re.search(r"pid (\d+)", detached).group(1))
    log = Path(re.search(r"output: (\S+)", detached).group(1))
    seen_running, st, states, deadline = None, None, [], time.time() + 900
    try:
        while time.time() < deadline and psutil.pid_exists(pid):
            try:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("CLOSEDLOOP_DVC_CACHE", env["CLOSEDLOOP_DVC_CACHE"])
                    st = RunState.latest(b, "rft").status()
            except UserError:  # the run has not recorded its first attempt yet
                time.sleep(0.05)
                continue
            states = [r["state"] for r in st["rows"]]
            if "running" in states and edited.read_text() == committed:  # the run is under way: now edit
                edited.write_text(committed + "\nraise SystemExit('edited after the effect run started')\n")
            if seen_running is None and "done" in states and "pending" in states and any(
                    r["state"] == "running" and r.get("progress") for r in st["rows"]):
                seen_running = st
            # a stage's end is recorded before DVC commits its outputs to the cache; DVC starts the
            # next stage only after that, so three ended and one started means three committed.
            # (DVC's order varies; the first three may be stages without progress to show.)
            if states.count("done") >= 3 and "running" in states and seen_running is not None:
                break
            time.sleep(0.02)
    finally:
        _kill_tree(pid)
        edited.write_text(committed)
    assert states.count("done") >= 3 and "pending" in states, (st, log.read_text()[-3000:])
    assert "edited after the effect run started" not in log.read_text()
    assert "Running stage" in log.read_text()  # the detached run's output went to its log
    killed = {r["stage"] for r in st["rows"] if r["state"] == "done"}
    status_text = run(b, env, "status", "rft").stdout
    subprocess.run(["git", "clone", "-q", str(origin), str(c)], check=True)
    resumed_proc = run(c, env, "effect", "rft", *args)
    return {"b": b, "c": c, "env": env, "args": args, "origin": origin, "status": seen_running,
            "killed_done": killed, "status_text": status_text, "proc": resumed_proc}


def test_status_showed_the_run_in_progress(resumed):
    st = resumed["status"]
    assert st is not None, "never saw a stage running with progress beside done and pending ones"
    running = [r for r in st["rows"] if r["state"] == "running"]
    assert len(running) == 1 and running[0]["progress"]["done"] <= (running[0]["progress"]["total"] or 1e9)
    assert st["state"] == "running"
    text = resumed["status_text"]  # the command, once the run was killed
    assert "effect run rft: attempt 1, killed" in text
    assert all(f"{stage} " in text for stage in resumed["killed_done"]) and " done " in text and " pending" in text


def test_a_killed_run_resumes_from_a_fresh_clone_to_the_same_result(resumed, effect):
    c, origin = resumed["c"], resumed["origin"]
    out = resumed["proc"].stdout
    for stage in resumed["killed_done"]:  # restored, not run again
        assert f"Stage '{stage}' is cached - skipping run" in out, stage
        assert f"Running stage '{stage}'" not in out
    fresh = json.loads((c / "results/rft.json").read_text())
    uninterrupted = json.loads((origin / "results/rft.json").read_text())
    assert _without(fresh) == _without(uninterrupted)
    assert fresh["commit"] == uninterrupted["commit"] and not fresh["commit"].endswith("-dirty")
    # the cost: every stage's seconds, those of the killed attempt counted once, from it
    stages = fresh["stages"]
    # (a stage ending between the last status read and the kill is an earlier attempt's too)
    assert {s for s, v in stages.items() if v["source"] == "earlier attempt"} >= resumed["killed_done"]
    assert all(v["seconds"] > 0 for v in stages.values())
    assert fresh["wall_seconds"] == pytest.approx(sum(v["seconds"] for v in stages.values()), abs=0.2)
    assert [a["status"] for a in fresh["attempts"]] == ["killed", "finished"]
    for clone in (resumed["b"], c):
        assert git_status(clone, resumed["env"]) == ""  # params.yaml and dvc.lock equal git's


def test_a_rerun_with_every_stage_cached_and_a_dirty_checkout(resumed):
    """Back in the killed clone: a tracked file edited is refused; with --allow-dirty the rerun
    restores every stage from the shared cache, marks the commit dirty and the killed attempt's
    MLflow run KILLED."""
    b, env, args = resumed["b"], resumed["env"], resumed["args"]
    readme = b / "README.md"
    readme.write_text(readme.read_text() + "\nedited\n")
    for detach in ([], ["--detach"]):  # refused before anything starts, in the background too
        proc = run(b, env, "effect", "rft", *args, *detach, check=False)
        assert proc.returncode == 2 and "README.md" in proc.stderr and "--allow-dirty" in proc.stderr
    assert not (b / "results/rft.json").exists()
    proc = run(b, env, "effect", "rft", *args, "--allow-dirty")
    assert "Running stage" not in proc.stdout  # all restored
    data = json.loads((b / "results/rft.json").read_text())
    assert data["commit"].endswith("-dirty")
    assert _without(data, VOLATILE + ("commit",)) == _without(
        json.loads((resumed["c"] / "results/rft.json").read_text()), VOLATILE + ("commit",))
    assert {v["source"] for v in data["stages"].values()} <= {"cache", "earlier attempt"}
    mlflow.set_tracking_uri(f"sqlite:///{b / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("closedloop")
    parents = mlflow.search_runs([exp.experiment_id], output_format="list",
                                 filter_string="tags.`closedloop.effect_run` = 'rft'", order_by=["attributes.start_time"])
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
