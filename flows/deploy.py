"""Deploy the pipeline to a Prefect work pool, for scale-out: workers (on this or other machines
with the project checked out at the same path) pick up its runs.

    make server                                              # terminal 1: the API + UI
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect work-pool create closedloop --type process       # once
    python flows/deploy.py --pool closedloop [--cron "0 3 * * *"] [--target rft]
    prefect worker start --pool closedloop                   # terminal 2 (one per machine)
    prefect deployment run closedloop-pipeline/closedloop    # or wait for the schedule

Each worker runs the flow in place, in the checkout at this checkout's path on its machine. Where the
checkouts are at different paths, deploy with `--checkout '$CLOSEDLOOP_CHECKOUT'` and start each
worker with CLOSEDLOOP_CHECKOUT set to its own checkout (read by the worker when a run starts).

`flows/serve.py` is the one-process alternative: it serves the deployment and runs it itself.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import _bootstrap  # noqa: F401
from prefect.runner.storage import LocalStorage

from pipeline import pipeline


class CheckoutOnWorker(LocalStorage):
    """The code is this checkout's at deploy time; a run's working directory is the one the
    environment variable names on the worker that runs it. Prefect resolves `{{ $VAR }}` in a pull
    step from the flow-run process's environment (prefect.deployments.steps.core.run_step)."""

    def __init__(self, path: str, variable: str):
        super().__init__(path)
        self.variable = variable

    def to_pull_step(self) -> dict:
        return {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $%s }}" % self.variable}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="a Prefect work pool (process type: `prefect work-pool create`)")
    ap.add_argument("--name", default="closedloop", help="the deployment's name (default: closedloop)")
    ap.add_argument("--cron", default=None, help="a cron schedule (default: none, runs on demand)")
    ap.add_argument("--target", action="append", default=None, help="what each run brings up to date (repeatable)")
    ap.add_argument("--checkout", default=None, metavar="$VAR",
                    help="the environment variable that names each worker's checkout (default: this "
                         "checkout's path, the same on every machine)")
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set; start `make server` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api (a work pool lives on a server)", file=sys.stderr)
        return 2
    if args.checkout is not None and not re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", args.checkout):
        print(f"error: --checkout: expected an environment variable as $NAME, got {args.checkout!r}", file=sys.stderr)
        return 2
    # No image, nothing pushed: a process worker runs the code in place, in its checkout.
    source = (str(_bootstrap.ROOT) if args.checkout is None
              else CheckoutOnWorker(str(_bootstrap.ROOT), args.checkout.removeprefix("$")))
    flow = pipeline.from_source(source=source, entrypoint="flows/pipeline.py:pipeline")
    flow.deploy(name=args.name, work_pool_name=args.pool, cron=args.cron, parameters={"targets": args.target},
                build=False, push=False, print_next_steps=False)
    print(f"deployed closedloop-pipeline/{args.name} to work pool {args.pool!r}; "
          f"start a worker: prefect worker start --pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
