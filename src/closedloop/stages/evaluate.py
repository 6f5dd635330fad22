"""Stages `eval_base` and `eval_rft`: greedy generation on the held-out suite, IFEval's four
metrics with bootstrap intervals, per-instruction accuracy (metrics JSON, plot data, PNG)."""

from pathlib import Path

import mlflow
import pandas as pd

from closedloop.evaluate.instruction_following import (
    flat_metrics, ifeval_report, per_instruction_rows, plot_per_instruction)
from closedloop.generate import HFBackend, SamplingParams
from closedloop.io import read_jsonl, write_json, write_jsonl
from closedloop.models import load_model
from closedloop.verifiers.ifeval_rules import verify_row

SECTIONS = ("seed", "evaluate")
BASE = Path("models/base")
EVAL = Path("data/suite/eval.jsonl")
ADAPTERS = {"eval_base": None, "eval_rft": Path("models/rft")}


def out_dir(stage: str) -> Path:
    return Path("data/eval") / stage.removeprefix("eval_")


def run(params, root: Path, stage: str) -> None:
    e = params.evaluate
    adapter = ADAPTERS[stage]
    model, tok = load_model(root / BASE, adapter=root / adapter if adapter else None, dtype=params.model.dtype)
    rows = read_jsonl(root / EVAL)
    backend = HFBackend(model, tok, batch_size=e.batch_size)
    sp = SamplingParams(n=1, temperature=e.temperature, top_p=1.0, max_new_tokens=e.max_new_tokens, seed=params.seed)
    outs = backend.generate([[{"role": "user", "content": r["prompt"]}] for r in rows], sp)
    results = [verify_row({**r, "response": o[0].text}) for r, o in zip(rows, outs)]
    report = ifeval_report(results, n_bootstrap=e.bootstrap, seed=params.seed)
    metrics = flat_metrics(report)
    d = root / out_dir(stage)
    write_jsonl(d / "generations.jsonl", results)
    write_json(d / "report.json", report)
    write_json(d / "per_instruction.json", per_instruction_rows(report))
    plot_per_instruction(report, d / "per_instruction.png")
    write_json(d / "metrics.json", metrics)
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(d / "report.json"))
    mlflow.log_artifact(str(d / "per_instruction.png"))
    mlflow.log_table(pd.DataFrame([{"key": r["key"], "prompt": r["prompt"], "response": r["response"],
                                    "strict": r["strict"]["follow_all_instructions"]} for r in results]),
                     "generations.json")
