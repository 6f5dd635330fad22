"""End to end, no mocks: the Prefect flow runs the real DVC graph on a tiny from-config model in a
temporary git repo copied from the project, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from closedloop.tracking import experiment_url
from conftest import IFEVAL, TINY_PARAMS, VENV_BIN, copy_project, project_env, set_params
from servers import free_port, start, stop, wait_for

pytestmark = pytest.mark.e2e

RFT_STAGES = {"base", "prepare", "rft_sample", "rft_verify", "rft_train", "eval@base", "eval@rft", "compare"}
SPAR_STEPS = ("spar_sample", "spar_judge", "spar_refine", "spar_pairs", "spar_actor", "spar_refiner", "spar_eval")
SPAR_STAGES = {"spar_init", "spar_eval_init", "eval@spar-it1", "spar_ablation_data@no_refine",
               "spar_ablation_actor@no_refine"} | {f"{s}@it1" for s in SPAR_STEPS}
DCT_STAGES = {"facts", "eval@dct"} | {f"dct_{s}" for s in ("seed", "expand", "score", "solve", "train", "train_seeds",
                                                             "coherence")}
SPCT_STAGES = {f"spct_{s}" for s in ("data", "rejective", "rft", "grpo", "rm", "meta_rm", "eval")}
RLHF_STAGES = {"eval@rlhf"} | {f"rlhf_{s}" for s in ("prefs", "rm", "policy", "eval")}
PROXY_STAGES = {"eval@proxy-expert"} | {f"proxy_{s}" for s in ("small", "expert", "eval")}
ALL_STAGES = RFT_STAGES | SPAR_STAGES | DCT_STAGES | SPCT_STAGES | RLHF_STAGES | PROXY_STAGES
# Every stage that loads a model, so every one that must rerun when model.dtype changes (rlhf_prefs:
# its ai_feedback source's judge; spar_init: its rules_sft refiner).
MODEL_LOADERS = ALL_STAGES - {"prepare", "facts", "rft_verify", "spar_pairs@it1", "compare", "dct_solve", "spct_data"}
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
    tmp = tmp_path_factory.mktemp("e2e")
    root = copy_project(tmp / "project")
    # user files named by params, copied so the test can edit them: the model and the held-out prompts
    model = shutil.copytree(tiny_model_dir, tmp / "user-model")
    params = dict(TINY_PARAMS, model={"base": str(model)})
    if IFEVAL.is_file():  # held-out set: the real IFEval prompts (a deterministic subset)
        prompts = shutil.copy(IFEVAL, tmp / "ifeval.jsonl")
        params["evaluate"] = dict(params["evaluate"], prompts=str(prompts), limit=6)
    set_params(root, params)
    # DCT's unsupervised mode (the model writes its own seeds); the supervised default runs in the
    # DCT effect test (test_e2e_effect_dct.py), the update mode in test_e2e_dct.py
    set_params(root, {"dct": {"seeds": {"mode": "unsupervised"}}})
    env = project_env(root, prefect_home)
    first = run_flow(root, env)
    return root, env, first


def test_flow_runs_whole_graph_with_mlflow_lineage(project):
    root, env, first = project
    assert stages_run(first) == ALL_STAGES
    assert "prompt_level_strict" in first.stdout  # the comparison report is printed
    for row in ("| base |", "| rft |", "| spar-it1 |", "| dct |", "| rlhf |", "| proxy-expert |", "| proxy-a1 |"):
        assert row in first.stdout
    assert "Δ " in first.stdout  # with paired differences against the base
    # and held-out prompts with the base's and each method's answers side by side
    samples = first.stdout.split("### instruction_following: samples")[1].split("\n### ")[0]
    assert "| base | " in samples and "| rft | " in samples and "| spar-it1 | " in samples
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
    # one evaluation for every model: the same metric names on every eval run (MLflow's compare view)
    eval_metrics = [set(by_stage[s].data.metrics) for s in ("eval@base", "eval@rft", "eval@spar-it1", "eval@dct",
                                                            "eval@rlhf", "eval@proxy-expert")]
    assert {"prompt_level_strict_ci_low", "fact_accuracy_ci_low"} <= eval_metrics[0]
    assert all(m == eval_metrics[0] for m in eval_metrics)
    assert "rft/prompt_level_strict_diff_ci_low" in by_stage["compare"].data.metrics
    assert "sample_pass_rate" in by_stage["rft_verify"].data.metrics
    assert "train_loss" in by_stage["rft_train"].data.metrics
    assert by_stage["rft_sample"].data.params["rft.num_samples"] == str(TINY_PARAMS["rft"]["num_samples"])
    # the lock hash tag matches what DVC locked for that stage
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == ALL_STAGES
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(by_stage["rft_train"].info.run_id)}
    assert "adapter" in artifacts
    adapter_files = {a.path for a in client.list_artifacts(by_stage["rft_train"].info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    assert "generations.json" in {a.path for a in client.list_artifacts(by_stage["eval@rft"].info.run_id)}
    assert {"report.md", "instruction_following.png"} <= {
        a.path for a in client.list_artifacts(by_stage["compare"].info.run_id)}
    # SPCT: every judge is a row of the report's reward_accuracy table, paired against the base model
    report = json.loads((root / "data/compare/report.json").read_text())["reward_accuracy"]
    assert set(report["models"]) == {"base", "grm-rft", "grm", "grm-no-principles", "scalar-rm", "grm-vote4",
                                     "grm-meta4"}
    assert report["reference"] == "base" and "reward_accuracy" in report["models"]["grm"]["diff"]
    assert "### reward_accuracy" in first.stdout
    grpo = client.get_metric_history(by_stage["spct_grpo"].info.run_id, "reward")
    assert [m.step for m in grpo] == [1, 2] and all(-1.0 <= m.value <= 1.0 for m in grpo)
    differing = client.get_metric_history(by_stage["spct_grpo"].info.run_id, "groups_differing")
    assert [m.step for m in differing] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in differing)
    assert 0.0 <= by_stage["spct_grpo"].data.metrics["mean_groups_differing"] <= 1.0
    spct_eval = by_stage["spct_eval"].data.metrics
    assert {"accuracy/grm-vote4", "accuracy/scalar-rm", "parse_failure_rate/grm", "best_of_2/reward_model",
            "best_of_2/generative_rm", "best_of_2/ifeval_rules"} <= set(spct_eval)
    voting = json.loads((root / "data/spct/voting.json").read_text())
    assert {(r["variant"], r["k"]) for r in voting} == {(v, k) for v in ("voting", "meta_rm_voting") for k in (1, 2, 4)}
    assert "scaling.png" in {a.path for a in client.list_artifacts(by_stage["spct_eval"].info.run_id)}
    assert (root / "models/spct/rm/model.safetensors").is_file() and (root / "models/spct/grm/model.safetensors").is_file()
    # the meta RM learned from the final GRM's own judgments (num_samples per train example), not the base's
    train = (root / "data/spct/train.jsonl").read_text().splitlines()
    meta_traj = [json.loads(line) for line in (root / "data/spct/meta_trajectories.jsonl").read_text().splitlines()]
    assert len(meta_traj) == 4 * len(train) and {t["key"] for t in meta_traj} == {json.loads(t)["key"] for t in train}
    assert by_stage["spct_meta_rm"].data.metrics["trajectories"] == len(meta_traj)
    assert json.loads((root / "models/spct/meta_rm.json").read_text())["train_examples"] == len(meta_traj)
    # RLHF: PPO's per-step curves in MLflow, the RM's held-out accuracy, its win-rate table, the KL
    ppo = by_stage["rlhf_policy"]
    for name in ("score", "kl", "entropy", "response_length", "clip_frac", "value_loss", "approx_kl"):
        assert [m.step for m in client.get_metric_history(ppo.info.run_id, name)] == [1, 2], name
    assert abs(ppo.data.metrics["first_ratio_max_dev"]) < 1e-5  # the first mini-batch's ratio is exactly 1
    assert 0.0 <= by_stage["rlhf_rm"].data.metrics["eval_pairwise_accuracy"] <= 1.0
    rm_table = json.loads((root / "data/compare/report.json").read_text())["reward_model"]
    assert set(rm_table["models"]) == {"base", "rft", "rlhf"} and rm_table["reference"] == "base"
    assert rm_table["models"]["rft"]["metrics"]["win_rate_vs_sft"]["value"] == 0.5  # the SFT model against itself
    assert "kl_to_sft" in by_stage["rlhf_eval"].data.metrics
    assert (root / "models/rlhf/policy/model.safetensors").is_file()
    # Proxy tuning: its rows join the instruction_following table, paired against the base
    table = json.loads((root / "data/compare/report.json").read_text())["instruction_following"]
    assert {"proxy-a0.5", "proxy-a1", "proxy-expert", "rft"} <= set(table["models"])
    assert "prompt_level_strict" in table["models"]["proxy-a1"]["diff"]
    assert {"proxy_tokens_per_second", "base_tokens_per_second", "tuned_gain", "proxy-a1/prompt_level_strict"} <= set(
        by_stage["proxy_eval"].data.metrics)
    gap = json.loads((root / "data/proxy/eval_metrics.json").read_text())  # NaN when the tuned model gained nothing
    assert {"proxy-a0.5/gap_closed", "proxy-a1/gap_closed_ci_low", "proxy-a1/gap_closed_ci_high"} <= set(gap)
    assert gap["base/prompt_level_strict"] == mean_strict(root, "base")  # decoded there, as eval@base decodes it
    small = json.loads((root / "data/proxy/small_metrics.json").read_text())
    assert small["layers"] == 1 and small["base_layers"] == 2  # the more influential of the tiny model's 2 layers
    assert len(json.loads((root / "data/proxy/small_layers.json").read_text())["kept"]) == 1
    # the held-out set is the IFEval subset, and the metrics file is what DVC reads
    metrics = dvc(root, env, "metrics", "show", "--json")
    assert "prompt_level_strict" in metrics


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dct_through_the_flow(project):
    """DCT, unsupervised: consistent labels on the model's own claims, coherence on held-out graphs."""
    root, _, _ = project
    parents, children = pipeline_runs(root)
    by_stage = {r.data.tags["closedloop.dvc_stage"]: r for r in children[parents[0].info.run_id]}
    graphs = _rows(root / "data/dct/solved.jsonl")
    assert graphs and all(g["nodes"][0]["role"] == "seed" and not g["nodes"][0]["fixed"] for g in graphs)
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


def test_every_stage_reads_exactly_the_params_it_declares(project):
    """Recorded, not hand-listed: the keys each stage's code read (its MLflow tag) against the
    keys its dvc.yaml entry declares, expanded to leaves. Reading an undeclared key fails the stage."""
    from closedloop.config import load_params
    from closedloop.stage_params import declaration, leaf_keys

    root, _, _ = project
    params = load_params(root / "params.yaml")
    parents, children = pipeline_runs(root)
    mismatches = {}
    for run in children[parents[0].info.run_id]:
        stage = run.data.tags["closedloop.dvc_stage"]
        read = set(filter(None, run.data.tags["closedloop.params_read"].split(",")))
        declared = leaf_keys(params, declaration(root, stage).params)
        if read != declared:
            mismatches[stage] = {"declared, not read": sorted(declared - read), "read, not declared": sorted(read - declared)}
    assert mismatches == {}


def test_second_run_executes_nothing_and_dvc_is_clean(project):
    root, env, _ = project
    assert "up to date" in dvc(root, env, "status")
    second = run_flow(root, env)
    assert stages_run(second) == set()
    parents, children = pipeline_runs(root)
    assert len(parents) == 2 and children[parents[-1].info.run_id] == []
    out = dvc(root, env, "repro")
    assert "Running stage" not in out


def test_independent_branches_run_at_once_with_the_records_of_a_serial_run(project, tmp_path):
    """launch.parallel_stages: 2 in a fresh copy of the project, bringing DCT up to date (its
    training and its ablation's, its evaluation and its coherence are independent pairs):
    independent stages run at the same time, and DVC records what the serial run recorded (the
    module's project, same params: launch declares nothing)."""
    root, env, _ = project
    copy = copy_project(tmp_path / "parallel")
    shutil.copy(root / "params.yaml", copy / "params.yaml")
    set_params(copy, {"launch": {"parallel_stages": 2}})
    copy_env = project_env(copy, Path(env["PREFECT_HOME"]))
    proc = run_flow(copy, copy_env, "--target", "dct")
    ran = stages_run(proc)
    assert DCT_STAGES <= ran  # and what they read (base, prepare)
    serial = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    parallel = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]
    # the stages it ran have the entries the serial run wrote: the same deps, params and output hashes
    # (metrics files aside: a trainer's holds its seconds)
    def entries(lock):
        return {s: {**lock[s], "outs": [o for o in lock[s].get("outs", []) if not o["path"].endswith("metrics.json")]}
                for s in ran}
    assert entries(parallel) == entries(serial)
    assert "up to date" in dvc(copy, copy_env, "status", *sorted(ran))
    parents, children = pipeline_runs(copy)
    assert len(parents) == 1
    runs = children[parents[0].info.run_id]  # one run per stage, each under the flow's one parent
    assert sorted(r.data.tags["closedloop.dvc_stage"] for r in runs) == sorted(ran)
    # each stage's `dvc repro` as the flow saw it start and end (the stage's own MLflow run covers
    # only its compute: a second or less on the tiny model, beside DVC's few seconds of checks)
    spans = {r.data.tags["closedloop.dvc_stage"]: (float(r.data.tags["closedloop.flow_started"]),
                                                   float(r.data.tags["closedloop.flow_ended"])) for r in runs}
    # two stages ran at the same time (only independent ones can: each starts once its upstream ended)
    overlapping = [(a, b) for a in ran for b in ran if a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlapping, spans


def instruction_records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r for r in rows if r["suite"] == "instruction_following"), key=lambda r: str(r["key"]))


def mean_strict(root, model: str) -> float:
    strict = [r["scores"]["prompt_level_strict"] for r in instruction_records(root / f"data/eval/{model}/records.jsonl")]
    return sum(p / t for p, t in strict) / len(strict)


def test_proxy_tuning_takes_its_differences_from_the_base_it_is_given(project):
    """proxy.base overridden: proxy_eval's base is that model, decoded there (the held-out set fits
    one batch in both stages, so its answers are eval@rft's), not eval@<evaluate.reference>'s."""
    root, env, _ = project

    def answers(path):
        return [r["response"] for r in instruction_records(path)]
    assert answers(root / "data/proxy/base_records.jsonl") == answers(root / "data/eval/base/records.jsonl")
    rft = answers(root / "data/eval/rft/records.jsonl")
    assert rft != answers(root / "data/eval/base/records.jsonl")  # else the test could not tell them apart
    set_params(root, {"proxy": {"base": "models/rft"}})
    try:
        dvc(root, env, "repro", "proxy_eval")
        assert answers(root / "data/proxy/base_records.jsonl") == rft
        gap = json.loads((root / "data/proxy/eval_metrics.json").read_text())
        assert gap["base/prompt_level_strict"] == mean_strict(root, "rft")
    finally:
        set_params(root, {"proxy": {"base": None}})
    assert "Running stage" not in dvc(root, env, "repro", "proxy_eval")  # the earlier outputs, from the run cache


def test_changing_one_param_reruns_only_downstream(project):
    root, env, _ = project
    set_params(root, {"rft": {"num_samples": 6}})
    third = run_flow(root, env, "--target", "rft")
    ran = stages_run(third)
    assert "rft_sample" in ran
    assert ran <= {"rft_sample", "rft_verify", "rft_train", "eval@rft", "compare"}
    parents, children = pipeline_runs(root)
    assert {r.data.tags["closedloop.dvc_stage"] for r in children[parents[-1].info.run_id]} == ran
    # RFT's own stages are up to date; the methods that read RFT's outputs (RLHF its model as the
    # SFT policy, proxy tuning its kept samples) are stale now, and the comparison waits for them
    status = set(dvc(root, env, "status").split())
    assert not {"rft_sample:", "rft_verify:", "rft_train:", "eval@rft:"} & status
    assert {"rlhf_rm:", "proxy_expert:", "compare:"} <= status
    # back to the first run's param: DVC's run cache restores RFT's earlier outputs, running nothing,
    # and the methods downstream of them are up to date again
    set_params(root, {"rft": {"num_samples": TINY_PARAMS["rft"]["num_samples"]}})
    assert "Running stage" not in dvc(root, env, "repro")
    assert changed_stages(root, env) == set()


def test_target_runs_only_its_ancestry(project):
    root, env, _ = project
    set_params(root, {"evaluate": {"max_new_tokens": 10}})
    proc = run_flow(root, env, "--target", "eval@base")
    assert stages_run(proc) == {"eval@base"}
    # eval@rft depends on the same param and is now stale, but was not a target
    assert "eval@rft" in dvc(root, env, "status")
    set_params(root, {"evaluate": {"max_new_tokens": TINY_PARAMS["evaluate"]["max_new_tokens"]}})
    assert "Running stage" not in dvc(root, env, "repro")  # eval@base's earlier outputs, from the run cache
    assert changed_stages(root, env) == set()


def changed_stages(root, env) -> set[str]:
    return set(json.loads(dvc(root, env, "status", "--json")))


def test_changing_the_dtype_reruns_every_stage_that_loads_a_model(project):
    root, env, _ = project
    assert changed_stages(root, env) == set()
    set_params(root, {"model": {"dtype": "bfloat16"}})
    try:
        assert changed_stages(root, env) == MODEL_LOADERS
    finally:  # the module's later tests share this project: a failure here must not cascade
        set_params(root, {"model": {"dtype": "float32"}})
    assert changed_stages(root, env) == set()


@pytest.mark.skipif(not IFEVAL.is_file(), reason="shared IFEval copy not present")
def test_editing_a_file_a_param_names_reruns_the_stages_that_read_it(project):
    from closedloop.config import load_params

    root, env, _ = project
    params = load_params(root / "params.yaml")
    prompts, weights = Path(params.evaluate.prompts), Path(params.model.base) / "config.json"
    original = prompts.read_text(), weights.read_text()
    try:
        prompts.write_text(original[0] + "\n")  # the same rows, but not the same file
        assert changed_stages(root, env) == {"eval@base", "eval@rft", "eval@spar-it1", "eval@dct", "eval@rlhf",
                                             "eval@proxy-expert", "proxy_eval"}
        prompts.write_text(original[0])
        weights.write_text(original[1] + "\n")
        assert "base" in changed_stages(root, env)
    finally:
        prompts.write_text(original[0])
        weights.write_text(original[1])
    assert changed_stages(root, env) == set()


def test_a_forced_rerun_of_training_gives_the_same_bytes(project):
    """Same params and seed, same bytes: a forced rerun of rft_train leaves eval@rft up to date."""
    root, env, _ = project
    dvc(root, env, "repro", "-f", "-s", "rft_train")
    assert changed_stages(root, env) == set()


@pytest.fixture
def s3_server(tmp_path):
    """A local S3-compatible server (moto's server mode) on a free 127.0.0.1 port, with one bucket;
    the credentials are moto's placeholders."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    (tmp_path / "moto").mkdir()
    proc = start([str(Path(VENV_BIN) / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto",
                 os.environ.copy())
    try:
        wait_for("moto's S3 server", lambda: urllib.request.urlopen(endpoint, timeout=5).status == 200, 120, [proc])
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(Bucket="closedloop")
        yield endpoint, creds
    finally:
        stop(proc)


def use_remote(root, env, kind: str, where) -> None:
    """Point the clone's default remote at `where`, this clone only (`dvc remote ... --local`), as
    docs/usage.md shows: a directory, or an S3 bucket at an endpoint with its credentials."""
    if kind == "local":
        dvc(root, env, "remote", "modify", "--local", "local", "url", str(where))
        return
    endpoint, creds = where
    dvc(root, env, "remote", "add", "--local", "--default", "s3", "s3://closedloop/project")
    dvc(root, env, "remote", "modify", "--local", "s3", "endpointurl", endpoint)
    for key, value in creds.items():
        dvc(root, env, "remote", "modify", "--local", "s3", key.removeprefix("aws_"), value)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_dvc_push_and_pull_move_a_reproduction_to_another_clone(project, tmp_path, kind, request):
    """dvc.lock (committed) says what a reproduction produced; the remote carries it: the default
    directory remote, overridden per clone, or an S3 bucket (a real S3 protocol server, moto's)."""
    root, env, _ = project
    where = tmp_path / "remote" if kind == "local" else request.getfixturevalue("s3_server")
    use_remote(root, env, kind, where)
    try:
        dvc(root, env, "push")
    finally:
        if kind == "s3":  # the module's project keeps its default remote for the tests after this one
            dvc(root, env, "remote", "remove", "--local", "s3")
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(root), str(other)], check=True)
    for name in ("params.yaml", "dvc.lock"):  # what a commit of this reproduction would hold
        shutil.copy(root / name, other / name)
    use_remote(other, env, kind, where)
    assert changed_stages(other, env)  # nothing there yet
    dvc(other, env, "pull")
    assert changed_stages(other, env) == set()  # every output, metrics included, and no recompute
    for rel in ("models/rft/model.safetensors", "data/compare/metrics.json", "data/eval/rft/metrics.json"):
        assert (other / rel).read_bytes() == (root / rel).read_bytes(), rel


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Headless, and nothing that reaches out of the machine (its connections are refused here).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=20000", "--window-size=1500,900"]


def render(url: str, profile: Path, screenshot: Path) -> str:
    """The page's DOM after Chromium has run its scripts, and a screenshot of it."""
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs Debian's "
                                             "chromium when it can; apt-get install chromium)")
def test_the_mlflow_ui_opens_on_the_runs_and_compares_the_evaluations(project, tmp_path):
    root, env, first = project
    port = free_port()
    ui = start([str(Path(VENV_BIN) / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], root, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("the MLflow UI", lambda: urllib.request.urlopen(base + "/health", timeout=5).status == 200, 180, [ui])
        exp = mlflow.get_experiment_by_name("closedloop")
        url = experiment_url(base, exp.experiment_id)
        # the flow prints the page to open (on `mlflow ui`'s default port)
        assert experiment_url("http://127.0.0.1:5000", exp.experiment_id) in first.stdout
        runs_page = render(url, tmp_path / "profile", tmp_path / "runs.png")
        assert "Run Name" in runs_page and "matching runs" in runs_page  # the runs table, not GenAI's Overview
        assert "No data available" not in runs_page
        assert "pipeline" in runs_page  # each flow run's parent; its stages are nested under it

        parents, children = pipeline_runs(root)
        evals = [r for r in children[parents[0].info.run_id] if r.info.run_name.startswith("eval@")]
        assert {r.info.run_name for r in evals} == {"eval@base", "eval@rft", "eval@spar-it1", "eval@dct", "eval@rlhf",
                                                    "eval@proxy-expert"}
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in evals]))
        compare = f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}"
        compare_page = render(compare, tmp_path / "profile", tmp_path / "compare.png")
        for r in evals:
            assert r.info.run_name in compare_page
        assert "prompt_level_strict" in compare_page  # the metrics the runs are compared on
    finally:
        stop(ui)


# SPAR's iterations, on the whole graph's project. These two stay last in the module: the second
# adds an iteration, which the tests above do not expect.
def test_spar_iteration_through_the_flow(project):
    root, _, _ = project
    parents, children = pipeline_runs(root)
    by_stage = {r.data.tags["closedloop.dvc_stage"]: r for r in children[parents[0].info.run_id]}
    assert "judge_f1" in by_stage["spar_judge@it1"].data.metrics
    eval_metrics = by_stage["spar_eval@it1"].data.metrics
    assert "refiner_judge_f1" in eval_metrics
    assert "search_prompt_level_strict" in eval_metrics  # the "+search" row (spar.eval_search)
    assert "heldout_judge_accuracy" in eval_metrics
    refine = by_stage["spar_refine@it1"].data.metrics
    assert sum(refine[f"success_depth_{d}"] for d in (1, 2, 3)) == refine["successful_trees"]
    # eval@base's held-out responses are the fixed set every judge (spar_eval_init, spar_eval) judges
    judges = {name: [json.loads(line) for line in (root / f"data/spar/judge/{name}/records.jsonl").open()]
              for name in ("base", "init", "it1")}
    assert len({tuple(r["key"] for r in rows) for rows in judges.values()}) == 1  # the same responses, paired
    # the no_refine ablation beside it1, on it1's judged samples: its own pairs and actor (DPO)
    assert by_stage["spar_ablation_data@no_refine"].data.metrics["dpo_pairs"] >= 1
    assert by_stage["spar_ablation_actor@no_refine"].data.metrics["train_pairs"] >= 1
    pairs = [json.loads(line) for line in (root / "data/spar/ablations/no_refine/dpo.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_value"] > p["rejected_value"] and p["source"] == "best_worst" for p in pairs)
    judged = {(j["prompt"], j["response"]) for j in map(json.loads, (root / "data/spar/it1/judged.jsonl").open())}
    assert all((p["prompt"], p["chosen"]) in judged and (p["prompt"], p["rejected"]) in judged for p in pairs)
    # the rules' verdicts on each side of the pairs, reported (the judged samples carry them already)
    verdict = {(j["prompt"], j["response"]): j["rule_verdict"]
               for j in map(json.loads, (root / "data/spar/it1/judged.jsonl").open())}
    ablation = by_stage["spar_ablation_data@no_refine"].data.metrics
    for side in ("chosen", "rejected"):
        assert ablation[f"pairs_{side}_rule_pass"] == sum(verdict[p["prompt"], p[side]] for p in pairs) / len(pairs)
    assert (root / "models/spar/ablations/no_refine/actor/model.safetensors").is_file()
    actor_eval = json.loads((root / "data/eval/spar-it1/metrics.json").read_text())
    assert 0.0 <= actor_eval["prompt_level_strict"] <= 1.0  # the shared evaluation scored the actor
    assert (root / "models/spar/it1/actor/model.safetensors").is_file()
    assert (root / "models/spar/it1/refiner/model.safetensors").is_file()


def test_an_added_spar_iteration_reruns_nothing_before_it(project):
    root, env, _ = project
    set_params(root, {"spar": {"iterations": {"it1": "init", "it2": "it1"}},
                      "evaluate": {"models": {"spar-it2": "models/spar/it2/actor"}}})
    proc = run_flow(root, env, "--target", "spar")
    # every other method is up to date here, so the comparison takes the new row in as well
    assert stages_run(proc) == {f"{s}@it2" for s in SPAR_STEPS} | {"eval@spar-it2", "compare"}
    assert (root / "data/eval/spar-it2/metrics.json").is_file()
    assert "spar-it2" in (root / "data/compare/report.md").read_text()
    assert {f"{s}@it2" for s in SPAR_STEPS} <= set(yaml.safe_load((root / "dvc.lock").read_text())["stages"])
