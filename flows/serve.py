"""Serve the pipeline as a Prefect deployment on a cron schedule.

Schedules need a running Prefect server:
    prefect server start --host 127.0.0.1            # terminal 1
    export PREFECT_API_URL=http://127.0.0.1:4200/api  # terminal 2
    python flows/serve.py --cron "0 3 * * *"
"""

from __future__ import annotations

import argparse
import os
import sys

import _bootstrap  # noqa: F401

from pipeline import pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily at 03:00)")
    ap.add_argument("--name", default="closedloop-nightly")
    ap.add_argument("--target", action="append", default=None)
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set; start `prefect server start` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api (schedules need a running server)", file=sys.stderr)
        return 2
    pipeline.serve(name=args.name, cron=args.cron, parameters={"targets": args.target})
    return 0


if __name__ == "__main__":
    sys.exit(main())
