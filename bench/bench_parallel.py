"""Wall time of independent branches through the flow: one stage at a time against several at once
(`launch.parallel_stages`).

    .venv/bin/python bench/bench_parallel.py [--parallel 2] [--target dct --target proxy]

Two throwaway copies of the project on the tests' tiny model and sizes (tests/conftest.TINY_PARAMS),
one per setting. In each, the flow first brings the shared stages up to date (base, prepare, facts,
and RFT's, whose model and data proxy tuning reads), so the timed flow runs only the branches; both
timed runs pay the same flow start. Prints each wall time and the ratio, then a JSON line. Run it
alone: on 2 cores anything beside it skews both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SHARED = ["facts", "eval@rft"]  # and their ancestry: base, prepare, RFT's stages


def project(dest: Path, model: Path, parallel: int) -> Path:
    from conftest import TINY_PARAMS, copy_project, set_params

    root = copy_project(dest)
    set_params(root, dict(TINY_PARAMS, model={"base": str(model)}, launch={"parallel_stages": parallel}))
    return root


def flow(root: Path, env: dict, targets: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "flows/pipeline.py", *[a for t in targets for a in ("--target", t)]],
                          cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the flow failed in {root}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--target", action="append", default=None, help="the branches (default: dct, proxy)")
    args = ap.parse_args()
    targets = args.target or ["dct", "proxy"]
    from tiny_model import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = save_tiny_model(tmp / "model")
        env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
               "HF_HUB_OFFLINE": "1", "CLOSEDLOOP_DVC_CACHE": ".dvc/cache", "PREFECT_HOME": str(tmp / "prefect"),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread per stage, as two share 2 cores
        env.pop("PREFECT_API_URL", None)
        seconds = {}
        for parallel in (1, args.parallel):
            root = project(tmp / f"parallel-{parallel}", model, parallel)
            flow(root, env, SHARED)  # the shared stages, untimed (the first also migrates Prefect's database)
            seconds[parallel] = flow(root, env, targets)
            print(f"parallel_stages {parallel}: {seconds[parallel]:7.1f} s  ({' + '.join(targets)})", flush=True)
            shutil.rmtree(root)
        ratio = seconds[1] / seconds[args.parallel]
        print(f"speed-up {ratio:.2f}x")
        print(json.dumps({"targets": targets, "seconds": seconds, "speedup": round(ratio, 3),
                          "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
