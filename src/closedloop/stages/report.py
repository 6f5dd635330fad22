"""Stage `report`: the results table, base vs after-RFT, IFEval's four metrics with 95% intervals."""

from pathlib import Path

import mlflow

from closedloop.evaluate.instruction_following import METRICS

from closedloop.io import write_json, write_text

SECTIONS: tuple[str, ...] = ()
MODELS = {"base": Path("data/eval/base/metrics.json"), "rft": Path("data/eval/rft/metrics.json")}
VERIFY = Path("data/rft/verify_metrics.json")
OUT_MD = Path("data/report/results.md")
OUT_JSON = Path("data/report/results.json")


def results_table(metrics: dict[str, dict], verify: dict | None = None) -> str:
    """Markdown table: one row per metric, one column per model, gain in points."""
    names = list(metrics)
    lines = ["| metric | " + " | ".join(f"{n} (95% CI)" for n in names) + " | gain |",
             "|---|" + "---|" * len(names) + "---|"]
    for m in METRICS:
        cells = [f"{100 * v[m]:.1f} [{100 * v[m + '_ci_low']:.1f}, {100 * v[m + '_ci_high']:.1f}]"
                 for v in metrics.values()]
        gain = 100 * (metrics[names[-1]][m] - metrics[names[0]][m])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {gain:+.1f} |")
    if verify:
        lines.append("")
        lines.append(f"RFT data: {verify['num_kept']} verified samples kept from {verify['num_samples']} "
                     f"(sample pass rate {100 * verify['sample_pass_rate']:.1f}%, "
                     f"prompt pass@N {100 * verify['prompt_pass_at_n']:.1f}%).")
    return "\n".join(lines) + "\n"


def run(params, root: Path, stage: str) -> None:
    import json

    metrics = {name: json.loads((root / path).read_text()) for name, path in MODELS.items()}
    verify = json.loads((root / VERIFY).read_text())
    table = results_table(metrics, verify)
    write_text(root / OUT_MD, table)
    write_json(root / OUT_JSON, {"models": metrics, "rft_data": verify})
    for m in METRICS:
        mlflow.log_metric(f"gain_{m}", metrics["rft"][m] - metrics["base"][m])
    mlflow.log_artifact(str(root / OUT_MD))
    print(table)
