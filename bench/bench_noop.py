"""Wall time of a no-op `dvc repro` and of a no-op Prefect flow run over the full graph.

Run after the pipeline has completed once (e.g. `make demo`), so that everything is up to date:
    .venv/bin/python bench/bench_noop.py [--repeats 3]
Prints one line per measurement and a JSON summary. Targets: dvc <= 3 s, flow <= 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    results: dict[str, list[float]] = {"dvc_repro_noop_s": [], "prefect_flow_noop_s": []}
    for _ in range(args.repeats):
        t, out = timed(["dvc", "repro"], env)
        if "Running stage" in out:
            sys.exit("dvc repro ran a stage: run the pipeline to completion first, then benchmark")
        results["dvc_repro_noop_s"].append(t)
        t, out = timed([sys.executable, "flows/pipeline.py"], env)
        if "stages run: none" not in out:
            sys.exit("the flow ran a stage: run the pipeline to completion first, then benchmark")
        results["prefect_flow_noop_s"].append(t)
    summary = {k: round(statistics.median(v), 2) for k, v in results.items()}
    for k, v in results.items():
        print(f"{k:24s} median {statistics.median(v):6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
