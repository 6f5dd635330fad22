"""`closedloop` command line: run one DVC stage, verify responses, validate params, run and watch
effect runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from closedloop.env import set_offline_defaults
from closedloop.errors import UserError, environment_error


def cmd_stage(args: argparse.Namespace) -> None:
    import time

    import mlflow

    from closedloop import progress
    from closedloop.config import check_model_names, load_params
    from closedloop.io import check_outputs_inside, is_main_process
    from closedloop.launch import relaunch, wants_launch
    from closedloop.stage_params import ParamsView, covered, declaration
    from closedloop.stages import get_stage
    from closedloop.tracking import stage_run

    root = Path.cwd()
    fn, key = get_stage(args.name)  # unknown stage: error before anything else
    if not sys.stderr.isatty():
        # A log, not a terminal (the flow, an effect run, captured output): transformers' "Loading
        # weights" bar would only add carriage-return noise there, above any one-line error.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    params = load_params(root / "params.yaml")
    stage = declaration(root, args.name)
    declared = stage.params
    check_model_names(params, "params.yaml", lambda k: covered(k, declared))
    check_outputs_inside(root, stage.outs)
    if wants_launch(params.launch, stage.meta):
        relaunch(params.launch, args.name, root)  # does not return: `accelerate launch` runs the stage
    view = ParamsView(params, declared)
    if not is_main_process():
        # Extra ranks of `accelerate launch`: train alongside rank 0; their MLflow calls go to a
        # throwaway store and closedloop.io discards their outputs, so only rank 0 records results.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="closedloop-rank-") as scratch:
            mlflow.set_tracking_uri(f"sqlite:///{scratch}/mlflow.db")  # MLflow 3 refuses a file store
            fn(view, root, key)
        return
    started = progress.stage_started(args.name)
    ok = False
    try:
        with stage_run(root, params, args.name, declared, view.reads):
            fn(view, root, key)
            ok = True
            mlflow.log_metric("stage_seconds", time.time() - started)
    finally:
        progress.stage_ended(args.name, started, ok)


def cmd_stage_server(args: argparse.Namespace) -> None:
    from closedloop.stage_server import serve

    serve(Path(args.socket))


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


def cmd_effect(args: argparse.Namespace) -> None:
    import shlex

    import yaml

    from closedloop.effects import run_effect

    extra = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set prepare.num_eval=200")
        extra[key] = yaml.safe_load(value)
    sets = [a for s in args.set or [] for a in ("--set", s)]
    command = shlex.join(["closedloop", "effect", args.run, *sets])
    if args.detach:
        _detach(args, extra, sets)
        return
    out = run_effect(Path.cwd(), args.run, extra, command, allow_dirty=args.allow_dirty)
    print(f"wrote {out.relative_to(Path.cwd())}; `closedloop results` updates the README's table; "
          f"`dvc exp apply {args.run}` brings its outputs into the workspace")


def _detach(args: argparse.Namespace, extra: dict, sets: list[str]) -> None:
    """Start the same effect run in its own session (it outlives the terminal), output to a log."""
    import subprocess

    from closedloop.effects import check_committed, console_script, load_spec, validate
    from closedloop.run_state import RunState

    root = Path.cwd()
    spec = load_spec(root, args.run, extra)
    validate(root, spec)  # bad input: one error here, not in a log nobody reads
    check_committed(root, args.allow_dirty)
    log = RunState.of(root, spec).dir / "runner.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [console_script("closedloop"), "effect", args.run, *sets, *(["--allow-dirty"] if args.allow_dirty else [])]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"effect run {args.run} started in the background (pid {proc.pid}); output: {log}\n"
          f"watch it: closedloop status {args.run}")


def cmd_status(args: argparse.Namespace) -> None:
    from closedloop.run_state import RunState, format_status

    print(format_status(RunState.latest(Path.cwd(), args.run).status()))


def cmd_cache(args: argparse.Namespace) -> None:
    from closedloop.cache import ensure_cache_dir

    print(f"DVC cache: {ensure_cache_dir(Path.cwd())}")


def cmd_results(args: argparse.Namespace) -> None:
    from closedloop.effects import load_results, render_readme

    root = Path.cwd()
    readme = root / "README.md"
    current = readme.read_text(encoding="utf-8")
    rendered = render_readme(current, load_results(root))
    if args.check:
        if rendered != current:
            raise UserError("README.md: the results table differs from results/*.json; run `closedloop results`")
        print("README.md: results table matches results/*.json")
    elif rendered != current:
        from closedloop.io import write_text

        write_text(readme, rendered)
        print("README.md: results table updated")


REPORT = Path("data/compare/report.md")


def cmd_report(args: argparse.Namespace) -> None:
    path = Path.cwd() / REPORT
    if not path.is_file():
        raise UserError(f"{REPORT}: not found; the compare stage writes it (`dvc repro compare`, or the flow)")
    print(path.read_text(encoding="utf-8"), end="")


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose help can end with text computed only when help is asked for."""

    def __init__(self, *args, more_help: Callable[[], str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.more_help = more_help

    def format_help(self) -> str:
        return super().format_help() + (self.more_help() if self.more_help else "")


def list_stages() -> str:
    """The stages of ./dvc.yaml by method, for `closedloop stage --help`."""
    import yaml

    try:
        stages = yaml.safe_load((Path.cwd() / "dvc.yaml").read_text())["stages"]
        by_method: dict[str, list[str]] = {}
        for name, st in stages.items():
            body = st.get("do", st)  # a foreach group: its stages are NAME@<key>
            method = (body.get("meta") or st.get("meta") or {}).get("method", "shared")
            by_method.setdefault(method, []).append(f"{name}@<key>" if "foreach" in st or "matrix" in st else name)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return "\n(no readable dvc.yaml here to list the stages of)\n"
    return "\nstages in ./dvc.yaml, by method:\n" + "".join(f"  {m}: {', '.join(n)}\n" for m, n in by_method.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="closedloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls); it reads params.yaml",
                       more_help=list_stages)
    p.add_argument("name", help="a stage of dvc.yaml (listed below), e.g. prepare or eval@base")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("stage-server", help="serve stage processes forked after the heavy imports; "
                                            "CLOSEDLOOP_STAGE_SERVER=SOCKET sends stages to it")
    p.add_argument("socket", help="the Unix socket to listen on (created; only this user may connect)")
    p.set_defaults(func=cmd_stage_server)
    p = sub.add_parser("verify", help="IFEval rule verification of a JSONL of responses")
    p.add_argument("input", help="JSONL with prompt, instruction_id_list, kwargs, response per line")
    p.add_argument("-o", "--output", help="output JSONL (default: INPUT.verified.jsonl)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("effect", help="run an effect run (experiments/RUN.yaml) as a DVC experiment; "
                                      "writes results/RUN.json")
    p.add_argument("run", help="the name of a file in experiments/, without .yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="one more params override on top of the run's (repeatable); recorded in its command")
    p.add_argument("--detach", action="store_true",
                   help="run in the background, output to a log; `closedloop status RUN` shows where it stands")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run with uncommitted changes to tracked files (the result's commit ends in -dirty)")
    p.set_defaults(func=cmd_effect)
    p = sub.add_parser("status", help="an effect run's stages: done, cached, running (with progress), pending, "
                                      "and the time left")
    p.add_argument("run", help="the effect run's name")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cache", help="set up DVC's cache outside the checkout (closedloop.cache) and print where")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("results", help="regenerate the README's results table from results/*.json")
    p.add_argument("--check", action="store_true", help="exit 2 if the README's table is not what the files give")
    p.set_defaults(func=cmd_results)
    p = sub.add_parser("report", help=f"print the last comparison report ({REPORT})")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("params", help="validate params.yaml")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_offline_defaults()
    args = build_parser().parse_args(argv)
    # a launcher's ranks run here, as it started them (closedloop.launch.launched, without its imports)
    if args.command == "stage" and "LOCAL_RANK" not in os.environ:
        from closedloop.stage_server import run_on_server

        code = run_on_server(["closedloop", *argv] if argv is not None else sys.argv)
        if code is not None:
            return code
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        refused = environment_error(e)
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
