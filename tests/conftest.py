"""Shared fixtures: a tiny model checkpoint and a temporary git+DVC copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_model import save_tiny_judging_model, save_tiny_model

PROJECT = Path(__file__).resolve().parents[1]
IFEVAL = PROJECT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
VENV_BIN = str(Path(sys.executable).parent)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Each project copy keeps its own DVC cache inside it, so no test restores what another computed
# and nothing lands in the user's ~/.cache (the tests of the shared cache give theirs explicitly).
os.environ["CLOSEDLOOP_DVC_CACHE"] = ".dvc/cache"
# Three test processes share the 2 cores (pytest -n 3): one compute thread each, since several torch
# processes with two threads each oversubscribe the cores, and OpenMP's spin-waits then make every
# op many times slower. The tiny models gain nothing from a second thread anyway.
if os.environ.get("PYTEST_XDIST_WORKER"):  # every subprocess (stages, flows) inherits these
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The slow files, slowest first, by their time (seconds at -n 3 on a fresh clone, 2 cores): files
# go to the workers in collection order (--dist loadfile --no-loadscope-reorder; xdist's default
# orders them by test count, which started the 640 s pipeline file behind files of many quick
# cases, and made it the suite's tail). Re-measure with `pytest --durations=0` when they move.
SLOWEST_FIRST = (
    "test_e2e_pipeline.py",  # 640
    "test_e2e_schedule.py",  # 228
    "test_e2e_faults.py",  # 225
    "test_e2e_sweep.py",  # 221
    "test_e2e_effect.py",  # 217
    "test_e2e_effect_spar.py",  # 145
    "test_stage_server.py",  # 89
    "test_engine.py",  # 85
    "test_e2e_dct.py",  # 74
    "test_launch.py",  # 70
    "test_e2e_plugin.py",  # 69
    "test_bad_input.py",  # 57
    "test_kill_resume.py",  # 48
    "test_e2e_effect_dct.py",  # 46
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def project_files() -> list[str]:
    """Files a clean clone would have (tracked, plus new files git does not ignore)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, capture_output=True,
                         text=True, check=True).stdout
    return [f for f in out.splitlines() if (PROJECT / f).is_file()]


def copy_project(dest: Path) -> Path:
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, target)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "copy"], cwd=dest, check=True, env=env)
    return dest


def set_params(root: Path, updates: dict) -> None:
    """Deep-merge `updates` into root/params.yaml."""
    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text())

    def merge(d: dict, u: dict) -> None:
        for k, v in u.items():
            if isinstance(v, dict):
                merge(d.setdefault(k, {}), v)
            else:
                d[k] = v

    merge(data, updates)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def project_env(root: Path, prefect_home: Path) -> dict[str, str]:
    # PYTHONPATH: the copy's own src/ shadows the editable install, so stages run the copy's code
    # (the plug-in test adds a method there).
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_URL": "", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root / "src")}


class StageServer:
    """A `closedloop stage-server` process and where it listens and logs."""

    def __init__(self, directory: Path):
        directory.chmod(0o700)
        self.socket, self.log = directory / "socket", directory / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "closedloop", "stage-server", str(self.socket)],
                                         stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session", autouse=True)
def stage_server(request, tmp_path_factory) -> StageServer | None:
    """One stage server per test process that runs end-to-end tests, which every stage the tests
    start is sent to (closedloop.stage_server): it saves each stage process 6-8 s of imports.
    Stages run in their own process until it listens, and wherever a test takes the variable out
    of their environment (a user's plain `dvc repro`: test_kill_resume; the flow's own server: test_e2e_plugin)."""
    if not any(item.get_closest_marker("e2e") for item in request.session.items):
        yield None  # unit tests run no stage
        return
    server = StageServer(tmp_path_factory.mktemp("stage-server"))
    os.environ["CLOSEDLOOP_STAGE_SERVER"] = str(server.socket)
    yield server
    os.environ.pop("CLOSEDLOOP_STAGE_SERVER", None)
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_judging_model_dir(tmp_path_factory) -> Path:
    """A tiny model whose votes all parse and split (tiny_model.save_tiny_judging_model): SPAR's trees grow."""
    return save_tiny_judging_model(tmp_path_factory.mktemp("tiny_judging") / "model")


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    # One Prefect home per test session: its database is migrated once (~75 s), then reused.
    return tmp_path_factory.mktemp("prefect_home")


TINY_PARAMS = {
    "prepare": {"num_train": 8, "num_eval": 6, "max_constraints": 2},
    # 4 samples of up to 24 tokens: enough of the random model's samples end on EOS (RFT keeps only those)
    "rft": {"num_samples": 4, "max_new_tokens": 24, "batch_size": 8, "threshold": 0.5,
            "sft": {"epochs": 1, "batch_size": 4, "max_length": 128, "lora": {"r": 4, "alpha": 8}}},
    "evaluate": {"max_new_tokens": 12, "batch_size": 8, "bootstrap": 50},
    "spar": {
        "sample": {"num_samples": 6, "max_new_tokens": 12, "max_prompts": 8},
        # votes: the tiny model's character-level tokenizer cannot tell " yes" from " no" as labels
        "judge": {"verifier": "hybrid_judge", "votes": 3, "max_new_tokens": 12, "scoring": "votes"},
        "tree": {"max_new_tokens": 12, "budget": 20},
        # the no_refine ablation beside it1 (pairs = best vs worst sample): the DPO path trains on
        # pairs, which a tiny random model's trees never give (it writes no passing refinement)
        "ablations": {"no_refine": {"of": "it1", "start": "init"}},
        "dpo": {"max_length": 128, "batch_size": 2},
        "refiner_sft": {"max_length": 128, "batch_size": 2},
        "eval_search": True,
        "batch_size": 8,  # trees searched in chunks of 2 roots (closedloop.chunks): the resumable path runs
    },
    "facts": {"num_train": 8, "num_eval": 8},
    "dct": {
        "seeds": {"claims_per_topic": 1, "max_seeds": 4, "max_new_tokens": 12},
        "expand": {"num_implied": 1, "num_contradicted": 1, "max_new_tokens": 12},
        "batch_size": 8,
        "sft": {"epochs": 1, "batch_size": 4, "max_length": 512, "lora": {"r": 4, "alpha": 8}},
    },
    "spct": {
        # the seed pairs: a tiny model's samples rarely differ in rule score, so `rules` may find no pair
        "data": {"source": "pairs", "max_train": 6, "max_eval": 4, "max_chars": 60},
        # labels (the default): the saved tiny model's tokenizer splits digits, so the box is read by
        # label scoring (parsing a random model's text never finds a box: no trajectory would survive)
        "grm": {"principles_tokens": 4, "critique_tokens": 4},
        "rejective": {"num_samples": 3},
        "sft": {"batch_size": 4, "max_length": 512, "lora": {"r": 4, "alpha": 8}},
        "grpo": {"num_generations": 2, "batch_size": 2, "max_steps": 2, "max_completion_length": 8,
                 "lora": {"r": 4, "alpha": 8}},
        "rm": {"batch_size": 2, "lora": {"r": 4, "alpha": 8}},
        "eval": {"votes": [1, 2, 4], "max_examples": 4, "best_of_n": [1, 2], "best_of_n_prompts": 3},
        "batch_size": 8,
    },
    "rlhf": {
        # the seed pairs: a tiny model's samples rarely differ in rule score (as for SPCT)
        "prefs": {"source": "pairs", "max_pairs": 8, "max_chars": 60},
        "rm": {"batch_size": 2, "max_length": 256, "lora": {"r": 4, "alpha": 8}},
        "policy": {"max_prompts": 4, "ppo": {"rollout_batch_size": 2, "batch_size": 2, "max_steps": 2,
                                             "num_ppo_epochs": 1, "max_new_tokens": 8, "lora": {"r": 4, "alpha": 8}}},
        "eval": {"max_prompts": 4, "kl_max_new_tokens": 8},
        "batch_size": 8,
    },
    "proxy": {
        "small": {"layers": 1, "max_prompts": 4, "max_new_tokens": 8,
                  "distill": {"epochs": 1, "batch_size": 4, "max_length": 128}},
        "expert_sft": {"epochs": 1, "batch_size": 4, "max_length": 128, "lora": {"r": 4, "alpha": 8}},
        "speed_prompts": 2, "speed_tokens": 4, "batch_size": 8,
    },
}
