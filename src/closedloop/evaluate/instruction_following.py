"""IFEval's four metrics with percentile-bootstrap confidence intervals.

Prompt-level accuracy is the fraction of prompts whose instructions are all followed;
instruction-level accuracy pools every instruction of every prompt (as the reference
`evaluation_lib.print_report` does). The bootstrap resamples *prompts* for all four metrics,
since a prompt's instructions are judged on one response and are not independent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from closedloop.errors import UserError
from closedloop.evaluate.bootstrap import ratio_interval
from closedloop.evaluate.suites import register_suite
from closedloop.io import atomic_path

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")


def _verdicts(row: Any, i: int, mode: str) -> list[bool]:
    try:
        v = row[mode]["follow_instruction_list"]
        ids = row["instruction_id_list"]
    except (KeyError, TypeError):
        raise UserError(f"result {i}: expected a verify_row output with '{mode}.follow_instruction_list'") from None
    if not isinstance(v, list) or not isinstance(ids, list) or len(v) != len(ids):
        raise UserError(f"result {i}: '{mode}.follow_instruction_list' must be a list as long as instruction_id_list")
    return [bool(x) for x in v]


def scores(row: dict, i: int = 0) -> dict[str, list[float]]:
    """{metric: [numerator, denominator]} of one verified row (see evaluate.bootstrap)."""
    strict, loose = _verdicts(row, i, "strict"), _verdicts(row, i, "loose")
    n = float(len(strict))
    return {"prompt_level_strict": [float(all(strict)), 1.0], "prompt_level_loose": [float(all(loose)), 1.0],
            "instruction_level_strict": [float(sum(strict)), n], "instruction_level_loose": [float(sum(loose)), n]}


def breakdown(row: dict, i: int = 0) -> dict[str, list[float]]:
    """{instruction id: [strict followed, count]}: summed over rows, the per-id accuracy."""
    out: dict[str, list[float]] = {}
    for iid, ok in zip(row["instruction_id_list"], _verdicts(row, i, "strict")):
        cell = out.setdefault(iid, [0.0, 0.0])
        cell[0] += float(ok)
        cell[1] += 1.0
    return out


def ifeval_report(results: list[dict], n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Point values, bootstrap CIs and per-instruction accuracy from `verify_row` outputs (JSON-serialisable)."""
    if not results:
        raise UserError("ifeval_report: no results to score")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"ifeval_report: confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 0:
        raise UserError(f"ifeval_report: n_bootstrap must be >= 0, got {n_bootstrap}")
    per_row = [scores(r, i) for i, r in enumerate(results)]
    report: dict[str, Any] = {}
    for m in METRICS:
        num = np.array([s[m][0] for s in per_row])
        den = np.array([s[m][1] for s in per_row])
        report[m] = ratio_interval(num, den, n_bootstrap, seed, confidence)
    per: dict[str, dict[str, float]] = {}
    for i, row in enumerate(results):
        for iid, a, b in zip(row["instruction_id_list"], _verdicts(row, i, "strict"), _verdicts(row, i, "loose")):
            d = per.setdefault(iid, {"strict": 0.0, "loose": 0.0, "count": 0})
            d["strict"] += a
            d["loose"] += b
            d["count"] += 1
    for d in per.values():
        d["strict"] /= d["count"]
        d["loose"] /= d["count"]
    report.update(
        num_prompts=len(results),
        num_instructions=int(sum(s["instruction_level_strict"][1] for s in per_row)),
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
        per_instruction=dict(sorted(per.items())),
    )
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    """One flat name -> number dict for `dvc metrics` and MLflow.

    Names use only letters, digits, `_`, `.` and `/` (valid MLflow metric names on every OS;
    the ':' in instruction ids becomes '.').
    """
    out: dict[str, float] = {}
    for m in METRICS:
        out[m] = float(report[m]["value"])
        out[f"{m}_ci_low"] = float(report[m]["ci_low"])
        out[f"{m}_ci_high"] = float(report[m]["ci_high"])
    out["num_prompts"] = float(report["num_prompts"])
    out["num_instructions"] = float(report["num_instructions"])
    for iid, d in report.get("per_instruction", {}).items():
        key = iid.replace(":", ".")
        out[f"per_instruction/{key}/strict"] = float(d["strict"])
        out[f"per_instruction/{key}/loose"] = float(d["loose"])
    return out


def per_instruction_rows(report: dict) -> list[dict]:
    """Rows for a DVC plots CSV/JSON: one per instruction id, sorted by id."""
    return [
        {"instruction_id": iid, "strict": d["strict"], "loose": d["loose"], "count": d["count"]}
        for iid, d in sorted(report["per_instruction"].items())
    ]


def plot_per_instruction(report: dict, path: str | Path) -> Path:
    """Horizontal bars of per-instruction strict and loose accuracy, written atomically as PNG."""
    # The object API with the Agg canvas: no pyplot global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = per_instruction_rows(report)
    labels = [f"{r['instruction_id']} (n={r['count']})" for r in rows]
    y = np.arange(len(rows))
    fig = Figure(figsize=(9, 1.5 + 0.32 * max(len(rows), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    h = 0.4
    ax.barh(y - h / 2, [r["strict"] for r in rows], height=h, label="strict")
    ax.barh(y + h / 2, [r["loose"] for r in rows], height=h, label="loose")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # first id at the top
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ps, pl = report["prompt_level_strict"]["value"], report["prompt_level_loose"]["value"]
    ax.set_title(f"IFEval per instruction (prompt-level strict {ps:.3f}, loose {pl:.3f})", fontsize=10)
    ax.legend(loc="lower right")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


class InstructionFollowing:
    """IFEval's four metrics on `evaluate.prompts` (greedy by default), per-id breakdown."""

    name = "instruction_following"
    metrics = METRICS
    breakdown_label = "instruction id"

    def load(self, params: Any, root: Path) -> list[dict]:
        from closedloop.suite import load_eval_rows

        e = params.evaluate
        try:
            return load_eval_rows(root / e.prompts, e.limit, params.seed)
        except UserError as err:
            raise UserError(f"evaluate.prompts: {err}") from None

    def run(self, params: Any, rows: list[dict], backend: Any) -> list[dict]:
        from closedloop.generate import SamplingParams
        from closedloop.verifiers.ifeval_rules import verify_row

        e = params.evaluate
        sp = SamplingParams(n=1, temperature=e.temperature, top_p=1.0, max_new_tokens=e.max_new_tokens,
                            seed=params.seed)
        outs = backend.generate([[{"role": "user", "content": r["prompt"]}] for r in rows], sp)
        results = [verify_row({**r, "response": o[0].text}) for r, o in zip(rows, outs)]
        # how each answer ended: "length" = cut at max_new_tokens (the report's truncation rate)
        return [{"suite": self.name, **r, "finish_reason": o[0].finish_reason, "num_tokens": o[0].num_tokens,
                 "scores": scores(r, i), "breakdown": breakdown(r, i)}
                for i, (r, o) in enumerate(zip(results, outs))]

    def summary(self, records: list[dict]) -> dict[str, float]:
        return {}


register_suite(InstructionFollowing())
