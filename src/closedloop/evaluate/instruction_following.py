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
from closedloop.io import atomic_path

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")
_CHUNK = 256  # bootstrap replicates per batch, so memory stays chunk x prompts


def _verdicts(row: Any, i: int, mode: str) -> list[bool]:
    try:
        v = row[mode]["follow_instruction_list"]
        ids = row["instruction_id_list"]
    except (KeyError, TypeError):
        raise UserError(f"result {i}: expected a verify_row output with '{mode}.follow_instruction_list'") from None
    if not isinstance(v, list) or not isinstance(ids, list) or len(v) != len(ids):
        raise UserError(f"result {i}: '{mode}.follow_instruction_list' must be a list as long as instruction_id_list")
    return [bool(x) for x in v]


def ifeval_report(results: list[dict], n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Point values, bootstrap CIs and per-instruction accuracy from `verify_row` outputs (JSON-serialisable)."""
    if not results:
        raise UserError("ifeval_report: no results to score")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"ifeval_report: confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 0:
        raise UserError(f"ifeval_report: n_bootstrap must be >= 0, got {n_bootstrap}")
    strict = [_verdicts(r, i, "strict") for i, r in enumerate(results)]
    loose = [_verdicts(r, i, "loose") for i, r in enumerate(results)]

    # Per-prompt sufficient statistics; every metric is a ratio of sums over prompts.
    n_inst = np.array([len(s) for s in strict], dtype=float)
    numer = {
        "prompt_level_strict": np.array([all(s) for s in strict], dtype=float),
        "prompt_level_loose": np.array([all(s) for s in loose], dtype=float),
        "instruction_level_strict": np.array([sum(s) for s in strict], dtype=float),
        "instruction_level_loose": np.array([sum(s) for s in loose], dtype=float),
    }
    denom = {m: (n_inst if m.startswith("instruction") else np.ones_like(n_inst)) for m in METRICS}

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    values = {m: float(ratio(numer[m].sum(keepdims=True), denom[m].sum(keepdims=True))[0]) for m in METRICS}
    boots: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    rng = np.random.default_rng(seed)
    n = len(results)
    for start in range(0, n_bootstrap, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, n_bootstrap - start), n))  # shared by all four metrics
        for m in METRICS:
            boots[m].append(ratio(numer[m][idx].sum(axis=1), denom[m][idx].sum(axis=1)))
    alpha = (1.0 - confidence) / 2
    report: dict[str, Any] = {}
    for m in METRICS:
        if n_bootstrap:
            lo, hi = np.quantile(np.concatenate(boots[m]), [alpha, 1.0 - alpha])
        else:  # no resampling asked for: a degenerate interval at the point value
            lo = hi = values[m]
        report[m] = {"value": values[m], "ci_low": float(lo), "ci_high": float(hi)}

    per: dict[str, dict[str, float]] = {}
    for row, s, lo_ in zip(results, strict, loose):
        for iid, a, b in zip(row["instruction_id_list"], s, lo_):
            d = per.setdefault(iid, {"strict": 0.0, "loose": 0.0, "count": 0})
            d["strict"] += a
            d["loose"] += b
            d["count"] += 1
    for d in per.values():
        d["strict"] /= d["count"]
        d["loose"] /= d["count"]
    report.update(
        num_prompts=n,
        num_instructions=int(n_inst.sum()),
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
