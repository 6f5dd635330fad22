"""Stage `rft_sample` (search): best-of-N sampling from the base model on the train prompts.

Rows are streamed into the temporary output one generation batch at a time; each batch has its
own seed, so a run killed half-way and re-run gives the same file as one that never died.
"""

from pathlib import Path

import mlflow
from tqdm import tqdm

from closedloop.generate import HFBackend, SamplingParams
from closedloop.io import read_jsonl, write_jsonl
from closedloop.models import load_model

SECTIONS = ("seed", "rft")
BASE = Path("models/base")
TRAIN = Path("data/suite/train.jsonl")
OUT = Path("data/rft/samples.jsonl")


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def sample_rows(backend, rows: list[dict], num_samples: int, sp: dict, seed: int, batch_size: int):
    """Yield one row per (prompt, sample), batch by batch."""
    per_batch = max(1, batch_size // num_samples)
    starts = range(0, len(rows), per_batch)
    for b, start in enumerate(tqdm(starts, desc="rft_sample", unit="batch")):
        chunk = rows[start : start + per_batch]
        params = SamplingParams(n=num_samples, seed=seed * 1_000_003 + b, **sp)
        outs = backend.generate([chat(r["prompt"]) for r in chunk], params)
        for row, completions in zip(chunk, outs):
            for i, c in enumerate(completions):
                yield {**row, "sample_idx": i, "response": c.text, "num_tokens": c.num_tokens,
                       "finish_reason": c.finish_reason}


def run(params, root: Path, stage: str) -> None:
    r = params.rft
    model, tok = load_model(root / BASE, dtype=params.model.dtype)
    backend = HFBackend(model, tok, batch_size=r.batch_size, show_progress=False)
    rows = read_jsonl(root / TRAIN)
    sp = {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens}
    n = write_jsonl(root / OUT, sample_rows(backend, rows, r.num_samples, sp, params.seed, r.batch_size))
    stats = backend.stats
    mlflow.log_metrics({"num_samples": n, "generated_tokens": stats.get("generated_tokens", 0),
                        "generation_seconds": stats.get("seconds", 0.0)})
    if stats.get("seconds"):
        mlflow.log_metric("tokens_per_second", stats["generated_tokens"] / stats["seconds"])
