"""Wall time of one `closedloop stage NAME` on a tiny model: a process of its own against one forked
by the stage server (closedloop.stage_server), whose only difference is the imports it skips.

    .venv/bin/python bench/bench_stage_start.py [--repeats 3]

Builds a throwaway copy of the project with the tests' tiny from-config model (no download), runs
`prepare` and `eval@base` once with DVC, then times each stage both ways. Prints one line per
stage and way, and a JSON summary. Run it alone: on 2 cores anything beside it skews both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from closedloop.stage_server import ENV, serving

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
STAGES = ("prepare", "eval@base")


def project(tmp: Path) -> Path:
    import yaml
    from tiny_model import save_tiny_model

    root = tmp / "project"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        if (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["base"] = str(save_tiny_model(tmp / "model"))
    params["prepare"].update(num_train=8, num_eval=6)
    params["evaluate"].update(max_new_tokens=12, batch_size=8, bootstrap=50)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                                                                "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def timed(root: Path, env: dict, stage: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["closedloop", "stage", stage], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"closedloop stage {stage} failed:\n{proc.stderr}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    # the stages' environment is also the server's (closedloop.stage_server compares them)
    os.environ.pop(ENV, None)
    os.environ.update(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], HF_HUB_OFFLINE="1",
                      CLOSEDLOOP_DVC_CACHE=".dvc/cache")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = project(tmp)
        env = dict(os.environ)  # after project(): its torch import sets variables (KMP_*) the server will have
        subprocess.run(["dvc", "repro", "-q", "eval@base"], cwd=root, env=env, check=True, capture_output=True)
        started = time.perf_counter()
        with serving(tmp / "server.log") as server_env:
            if not server_env:
                sys.exit(f"the stage server did not start: {(tmp / 'server.log').read_text()}")
            print(f"{'server start':24s} {time.perf_counter() - started:6.2f} s (once)")
            served = env | server_env
            results: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for stage in STAGES:
                    results.setdefault(f"{stage} alone_s", []).append(timed(root, env, stage))
                    results.setdefault(f"{stage} served_s", []).append(timed(root, served, stage))
        log = (tmp / "server.log").read_text()
        if "runs alone" in log:
            sys.exit(f"a stage was not served, the figures compare nothing:\n{log}")
    for k, v in results.items():
        print(f"{k:24s} median {statistics.median(v):6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    print(json.dumps({k: round(statistics.median(v), 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
