"""Stage `rft_verify` (verify): IFEval rule verifiers over every sample; keep the ones that pass.

The kept set (data/rft/sft.jsonl) holds, per prompt, at most `rft.max_per_prompt` distinct
responses whose fraction of satisfied constraints reaches `rft.threshold`, best first.
"""

from collections import defaultdict
from pathlib import Path

import mlflow
import pandas as pd

from closedloop.io import read_jsonl, write_json, write_jsonl
from closedloop.verifiers.ifeval_rules import verify_row

SECTIONS = ("rft",)
SAMPLES = Path("data/rft/samples.jsonl")
VERIFIED = Path("data/rft/verified.jsonl")
KEPT = Path("data/rft/sft.jsonl")
METRICS = Path("data/rft/verify_metrics.json")


def select(verified: list[dict], mode: str, threshold: float, max_per_prompt: int) -> list[dict]:
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in verified:
        flags = row[mode]["follow_instruction_list"]
        score = sum(flags) / len(flags) if flags else 0.0
        if score >= threshold:
            by_prompt[row["key"]].append({**row, "score": score})
    kept = []
    for key in sorted(by_prompt, key=str):
        seen: set[str] = set()
        for row in sorted(by_prompt[key], key=lambda r: (-r["score"], r["sample_idx"])):
            if row["response"].strip() and row["response"] not in seen and len(seen) < max_per_prompt:
                seen.add(row["response"])
                kept.append({"key": row["key"], "prompt": row["prompt"], "response": row["response"],
                             "score": row["score"], "sample_idx": row["sample_idx"]})
    return kept


def run(params, root: Path, stage: str) -> None:
    r = params.rft
    samples = read_jsonl(root / SAMPLES)
    verified = [verify_row(row) for row in samples]
    kept = select(verified, r.verifier_mode, r.threshold, r.max_per_prompt)
    prompts = {row["key"] for row in samples}
    passing = [row for row in verified if row[r.verifier_mode]["follow_all_instructions"]]
    metrics = {
        "num_samples": len(samples),
        "sample_pass_rate": len(passing) / max(1, len(samples)),
        "prompt_pass_at_n": len({row["key"] for row in passing}) / max(1, len(prompts)),
        "num_kept": len(kept),
        "prompts_kept": len({row["key"] for row in kept}),
    }
    write_jsonl(root / VERIFIED, verified)
    write_jsonl(root / KEPT, kept)
    write_json(root / METRICS, metrics)
    mlflow.log_metrics(metrics)
    table = pd.DataFrame([{"key": v["key"], "prompt": v["prompt"], "response": v["response"],
                           "strict": v["strict"]["follow_all_instructions"],
                           "loose": v["loose"]["follow_all_instructions"]} for v in verified[:200]])
    mlflow.log_table(table, "samples.json")
