"""Deploy the pipeline to a Prefect work pool, for scale-out: workers (on this or other machines
with the project checked out at the same path) pick up its runs.

    make server                                              # terminal 1: the API + UI
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect work-pool create closedloop --type process       # once
    python flows/deploy.py --pool closedloop [--cron "0 3 * * *"] [--target rft]
    prefect worker start --pool closedloop                   # terminal 2 (one per machine)
    prefect deployment run closedloop-pipeline/closedloop    # or wait for the schedule

`flows/serve.py` is the one-process alternative: it serves the deployment and runs it itself.
"""

from __future__ import annotations

import argparse
import os
import sys

import _bootstrap  # noqa: F401

from pipeline import pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="a Prefect work pool (process type: `prefect work-pool create`)")
    ap.add_argument("--name", default="closedloop", help="the deployment's name (default: closedloop)")
    ap.add_argument("--cron", default=None, help="a cron schedule (default: none, runs on demand)")
    ap.add_argument("--target", action="append", default=None, help="what each run brings up to date (repeatable)")
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set; start `make server` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api (a work pool lives on a server)", file=sys.stderr)
        return 2
    # The code is loaded from this checkout (no image, nothing pushed): a process worker runs it in place.
    flow = pipeline.from_source(source=str(_bootstrap.ROOT), entrypoint="flows/pipeline.py:pipeline")
    flow.deploy(name=args.name, work_pool_name=args.pool, cron=args.cron, parameters={"targets": args.target},
                build=False, push=False, print_next_steps=False)
    print(f"deployed closedloop-pipeline/{args.name} to work pool {args.pool!r}; "
          f"start a worker: prefect worker start --pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
