"""`closedloop` command line: run one DVC stage, verify responses, validate params."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from closedloop.env import set_offline_defaults
from closedloop.errors import UserError


def cmd_stage(args: argparse.Namespace) -> None:
    from closedloop.config import load_params
    from closedloop.io import is_main_process
    from closedloop.stage_params import ParamsView, declared_params
    from closedloop.stages import get_stage
    from closedloop.tracking import stage_run

    root = Path.cwd()
    fn, key = get_stage(args.name)  # unknown stage: error before anything else
    params = load_params(root / "params.yaml")
    declared = declared_params(root, args.name)
    view = ParamsView(params, declared)
    if not is_main_process():
        # Extra ranks of `accelerate launch`: train alongside rank 0; their MLflow calls go to a
        # throwaway store and closedloop.io discards their outputs, so only rank 0 records results.
        import tempfile

        import mlflow

        mlflow.set_tracking_uri(Path(tempfile.mkdtemp(prefix="closedloop-rank-")).as_uri())
        fn(view, root, key)
        return
    with stage_run(root, params, args.name, declared, view.reads):
        fn(view, root, key)


def cmd_verify(args: argparse.Namespace) -> None:
    from closedloop.verifiers.ifeval_rules import verify_jsonl

    src = Path(args.input)
    out = Path(args.output) if args.output else src.with_name(src.stem + ".verified.jsonl")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; -o expects a file path")
    if out.exists() and not args.force:
        raise UserError(f"{out}: already exists; pass --force to overwrite it or -o to choose another path")
    summary = verify_jsonl(src, out)
    print(f"wrote {out}: {summary}")


def cmd_params(args: argparse.Namespace) -> None:
    from closedloop.config import load_params

    load_params(args.params)
    print(f"{args.params}: ok")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="closedloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls); it reads params.yaml")
    p.add_argument("name")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("verify", help="IFEval rule verification of a JSONL of responses")
    p.add_argument("input", help="JSONL with prompt, instruction_id_list, kwargs, response per line")
    p.add_argument("-o", "--output", help="output JSONL (default: INPUT.verified.jsonl)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("params", help="validate params.yaml")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
