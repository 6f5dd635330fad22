"""Wall time of one method's branch at demo size, per stage (the params in params.yaml).

Runs `dvc repro --force -s <stage>` for each of the method's stages (dvc.yaml `meta.method`) in
graph order, plus the shared `eval@` stages that read its outputs, in this project, alone on the
machine. The stages it needs from elsewhere (base, prepare, facts, RFT's samples for SPCT) must
be up to date first (e.g. `dvc repro rft_verify facts`):
    .venv/bin/python bench/bench_branch.py spct
    .venv/bin/python bench/bench_branch.py dct
Prints one line per stage and a JSON summary. Target: each method adds at most 5 minutes to `make demo`.
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
sys.path.insert(0, str(ROOT / "flows"))


def branch(method: str) -> list[str]:
    """The method's stages and the shared eval@ stages downstream of them, in execution order."""
    from stage_graph import execution_order, stage_graph

    graph = stage_graph(ROOT)
    upstream, methods = graph.upstream, graph.methods
    own = {s for s in upstream if methods[s] == method}
    if not own:
        sys.exit(f"no stage in dvc.yaml has meta.method {method!r} (methods: {', '.join(sorted(set(methods.values())))})")
    evals = {s for s in upstream if s.startswith("eval@") and set(upstream[s]) & own}
    return [s for s in execution_order(upstream, methods) if s in own | evals]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", help="a method name from dvc.yaml's meta.method (dct, spct, ...)")
    ap.add_argument("--stages", nargs="*", help="time only these stages (default: the whole branch)")
    args = ap.parse_args()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    times: dict[str, float] = {}
    for stage in args.stages or branch(args.method):
        start = time.perf_counter()
        proc = subprocess.run(["dvc", "repro", "--force", "-s", stage], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        times[stage] = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"dvc repro -s {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"{stage:16s} {times[stage]:7.1f} s", flush=True)
    total = sum(times.values())
    print(f"{'total':16s} {total:7.1f} s ({total / 60:.1f} min)")
    print(json.dumps({k: round(v, 1) for k, v in times.items()} | {"total_s": round(total, 1)}))


if __name__ == "__main__":
    main()
