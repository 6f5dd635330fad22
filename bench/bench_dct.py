"""Wall time of the DCT branch at demo size, per stage (the params in params.yaml).

Runs `dvc repro --force -s <stage>` for each DCT stage in order (and its evaluation, eval@dct),
in this project, alone on the machine; the shared stages it needs (base, prepare, facts) must be
up to date first (e.g. `dvc repro facts prepare base`):
    .venv/bin/python bench/bench_dct.py
Prints one line per stage and a JSON summary. Target: the branch adds at most 5 minutes to `make demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("dct_seed", "dct_expand", "dct_score", "dct_solve", "dct_train", "eval@dct", "dct_coherence")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="*", default=list(STAGES))
    args = ap.parse_args()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    times: dict[str, float] = {}
    for stage in args.stages:
        start = time.perf_counter()
        proc = subprocess.run(["dvc", "repro", "--force", "-s", stage], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        times[stage] = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"dvc repro -s {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"{stage:14s} {times[stage]:7.1f} s", flush=True)
    total = sum(times.values())
    print(f"{'total':14s} {total:7.1f} s ({total / 60:.1f} min)")
    print(json.dumps({k: round(v, 1) for k, v in times.items()} | {"total_s": round(total, 1)}))


if __name__ == "__main__":
    main()
