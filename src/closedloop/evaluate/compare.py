"""The comparison report: every evaluated model as a row, per suite, against the reference model.

For each model: each metric with its bootstrap 95% interval, and the **paired** bootstrap
difference from the reference over the same examples; plus the per-group (e.g. per instruction
id) accuracy, and the share of answers cut at the token limit (records with `finish_reason`).
Examples that share a seed task (records with `seed_id`, as the synthetic suite writes them) are
resampled by seed task: a cluster bootstrap. Rendered as markdown, JSON, DVC plot rows and a PNG;
the markdown also shows a few held-out prompts with every model's answer side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from closedloop.errors import UserError
from closedloop.evaluate.bootstrap import cluster_sums, paired_difference, ratio_interval

CLUSTER_KEY = "seed_id"  # the synthetic suite's seed task: prompts built from one task share an outcome


def _arrays(records: list[dict], metric: str, clusters: list | None = None) -> list[np.ndarray]:
    num = np.array([r["scores"][metric][0] for r in records], dtype=float)
    den = np.array([r["scores"][metric][1] for r in records], dtype=float)
    return cluster_sums(clusters, num, den) if clusters is not None else [num, den]


def truncation_rate(records: list[dict]) -> float | None:
    """The share of answers cut at the token limit, or None when the records do not say."""
    if not records or any("finish_reason" not in r for r in records):
        return None
    return sum(r["finish_reason"] == "length" for r in records) / len(records)


def compare_suite(records: dict[str, list[dict]], metrics: tuple[str, ...], reference: str, n_bootstrap: int,
                  seed: int, cluster_key: str | None = CLUSTER_KEY) -> dict[str, Any]:
    """{"reference", "metrics", "interval", "models": {name: {"n", "truncated", "metrics": {m: interval},
    "diff": {m: interval}}}, "breakdown": {group: {name: accuracy}}} for one suite's records per model.
    Intervals resample clusters (`cluster_key`'s values) when every reference record has one,
    examples otherwise; `interval` says which."""
    if reference not in records:
        raise UserError(f"compare: the reference model {reference!r} has no evaluation records")
    ref_keys = [str(r["key"]) for r in records[reference]]
    ref_by_key = {str(r["key"]): r for r in records[reference]}
    clusters = ([ref_by_key[k][cluster_key] for k in ref_keys]
                if cluster_key and ref_keys and all(cluster_key in r for r in records[reference]) else None)
    interval = ({"resamples": cluster_key, "clusters": len(set(clusters))} if clusters is not None
                else {"resamples": "example", "clusters": len(ref_keys)})
    out: dict[str, Any] = {"reference": reference, "metrics": list(metrics), "interval": interval, "models": {},
                           "breakdown": {}}
    for name, rows in records.items():
        by_key = {str(r["key"]): r for r in rows}
        if set(by_key) != set(ref_keys):
            raise UserError(f"compare: model {name!r} was evaluated on different examples than {reference!r} "
                            f"({len(by_key)} vs {len(ref_keys)}); rerun its eval stage")
        aligned = [by_key[k] for k in ref_keys]  # row i of every model is the same example
        ref = [ref_by_key[k] for k in ref_keys]
        entry: dict[str, Any] = {"n": len(aligned), "truncated": truncation_rate(aligned), "metrics": {}, "diff": {}}
        for m in metrics:
            num, den = _arrays(aligned, m, clusters)
            entry["metrics"][m] = ratio_interval(num, den, n_bootstrap, seed)
            if name != reference:
                entry["diff"][m] = paired_difference(num, den, *_arrays(ref, m, clusters), n_bootstrap, seed)
        out["models"][name] = entry
        totals: dict[str, list[float]] = {}
        for r in aligned:
            for group, (num, den) in r.get("breakdown", {}).items():
                t = totals.setdefault(group, [0.0, 0.0])
                t[0] += num
                t[1] += den
        for group, (num, den) in sorted(totals.items()):
            out["breakdown"].setdefault(group, {})[name] = num / den if den else 0.0
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(suite: str, result: dict[str, Any], breakdown_label: str) -> str:
    """Two tables: metrics (value [95% CI]) and paired differences from the reference; then per-group accuracy."""
    metrics, ref = result["metrics"], result["reference"]
    how = result.get("interval", {})
    over = (f"resampling {how['clusters']} {how['resamples']} clusters" if how.get("resamples") not in (None, "example")
            else "resampling examples")
    truncated = any(e.get("truncated") is not None for e in result["models"].values())
    lines = [f"### {suite}: % with 95% bootstrap CI ({over}); Δ = paired difference from `{ref}` (points)", "",
             "| model | n | " + ("cut at the token limit | " if truncated else "") + " | ".join(metrics) + " |",
             "|---|---|" + ("---|" if truncated else "") + "---|" * len(metrics)]
    for name, e in result["models"].items():
        cells = []
        for m in metrics:
            v = e["metrics"][m]
            cell = f"{_pct(v['value'])} [{_pct(v['ci_low'])}, {_pct(v['ci_high'])}]"
            if m in e["diff"]:
                d = e["diff"][m]
                cell += f"<br>Δ {100 * d['value']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
            cells.append(cell)
        cut = "" if not truncated else ("- | " if e.get("truncated") is None else f"{_pct(e['truncated'])} | ")
        lines.append(f"| {name} | {e['n']} | {cut}" + " | ".join(cells) + " |")
    if result["breakdown"]:
        names = list(result["models"])
        lines += ["", f"Accuracy (%) per {breakdown_label}:", "",
                  f"| {breakdown_label} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for group, accs in result["breakdown"].items():
            lines.append(f"| {group} | " + " | ".join(_pct(accs[n]) if n in accs else "-" for n in names) + " |")
    return "\n".join(lines) + "\n"


SAMPLES, SAMPLE_CHARS = 3, 600  # prompts shown side by side; an answer is cut to this many characters


def samples_markdown(suite: str, records: dict[str, list[dict]], reference: str, metric: str) -> str:
    """A few held-out prompts with every model's answer side by side (the reference first) and its
    `metric` score: what a table of rates cannot show. The first SAMPLES keys, in the reference's
    order, that every model answered, those on which the models' scores differ first. Models whose
    records hold no prompt and response are left out; "" when the reference's hold none (fact
    verification scores claims)."""
    def answered(rows: list[dict]) -> bool:
        return bool(rows) and all("prompt" in r and "response" in r for r in rows)

    if not answered(records.get(reference, [])):
        return ""
    names = [reference, *(n for n in records if n != reference and answered(records[n]))]
    by_key = {n: {str(r["key"]): r for r in records[n]} for n in names}
    ref_rows = records[reference]
    keys = [str(r["key"]) for r in ref_rows if all(str(r["key"]) in by_key[n] for n in names)]

    def differ(key: str) -> bool:
        return len({tuple(by_key[n][key]["scores"][metric]) for n in names}) > 1

    shown = sorted(keys, key=lambda k: not differ(k))[:SAMPLES]  # stable: the reference's order within each

    def cell(text: str) -> str:
        cut = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + f" … ({len(text)} characters)"
        # HTML, as markdown tables render it: IFEval asks for titles in <<double angular brackets>>
        cut = cut.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        return cut.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>") or "(empty)"

    lines = [f"### {suite}: samples ({metric} per answer; answers cut to {SAMPLE_CHARS} characters here)"]
    for key in shown:
        lines += ["", f"**{key}**: {cell(by_key[reference][key]['prompt'])}", "", f"| model | {metric} | answer |",
                  "|---|---|---|"]
        for n in names:
            r = by_key[n][key]
            num, den = r["scores"][metric]
            lines.append(f"| {n} | {num:g}/{den:g} | {cell(r['response'])} |")
    return "\n".join(lines) + "\n"


def plot_rows(suite: str, result: dict[str, Any]) -> list[dict]:
    """Rows for DVC plots: one per (model, metric), with the paired difference from the reference."""
    rows = []
    for name, e in result["models"].items():
        for m in result["metrics"]:
            v, d = e["metrics"][m], e["diff"].get(m, {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0})
            rows.append({"suite": suite, "model": name, "metric": m, "value": v["value"], "ci_low": v["ci_low"],
                         "ci_high": v["ci_high"], "diff": d["value"], "diff_ci_low": d["ci_low"],
                         "diff_ci_high": d["ci_high"]})
    return rows


def plot(suite: str, result: dict[str, Any], path: Path) -> None:
    """Grouped bars with 95% intervals: one group per metric, one bar per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from closedloop.io import atomic_path

    names, metrics = list(result["models"]), result["metrics"]
    fig = Figure(figsize=(max(6, 1.2 * len(metrics) * max(1, len(names)) / 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    x = np.arange(len(metrics))
    for j, name in enumerate(names):
        vals = [result["models"][name]["metrics"][m] for m in metrics]
        y = np.array([100 * v["value"] for v in vals])
        err = np.array([[y[i] - 100 * v["ci_low"], 100 * v["ci_high"] - y[i]] for i, v in enumerate(vals)]).T
        ax.bar(x + (j - (len(names) - 1) / 2) * width, y, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x, metrics, fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"{suite}: models with 95% bootstrap intervals", fontsize=10)
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
