"""RFT's stages (dvc.yaml `meta: {method: rft}`): search, verify, feedback.

    rft_sample  best-of-N from models/base on the train prompts      data/rft/samples.jsonl
    rft_verify  the verifier scores every sample; select the kept set data/rft/{scored,sft}.jsonl, metrics
    rft_train   SFT from models/base on the kept set                 models/rft (merged; adapter in models/rft/adapter)

The evaluation is the shared `eval@rft` (evaluate.models.rft: models/rft).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from closedloop import progress
from closedloop.chunks import CHUNK_BATCHES, in_chunks, resumable
from closedloop.errors import UserError
from closedloop.io import atomic_dir, read_jsonl, write_json, write_jsonl
from closedloop.methods import rft
from closedloop.stages.common import log_training, open_backend

DATA = Path("data/rft")
TRAIN = Path("data/suite/train.jsonl")


def _seed(params: Any) -> int:
    """RFT's sampling and training seed: rft.seed, or the global seed where it is null."""
    own, common = params.rft.seed, params.seed  # both declared, so both read
    return common if own is None else own


def run_sample(params: Any, root: Path, key: str | None) -> None:
    r = params.rft
    backend = open_backend(params, root, "models/base", r.batch_size)
    batches = list(enumerate(rft.search_batches(read_jsonl(root / TRAIN), r.num_samples, r.batch_size)))
    sampling = {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens}
    seed = _seed(params)

    def work(part: list, _: int) -> list[dict]:
        out = []
        for b, batch in part:
            progress.report(b, len(batches), "search batches")
            out += rft.sample_batch(backend, batch, b, r.num_samples, sampling, seed)
        return out

    with resumable(root, "rft_sample") as chunks:
        n = write_jsonl(root / DATA / "samples.jsonl", in_chunks(batches, CHUNK_BATCHES, work, chunks))
    stats = backend.stats
    mlflow.log_metrics({"num_samples": n, "generated_tokens": stats.get("generated_tokens", 0),
                        "generation_seconds": stats.get("seconds", 0.0)})
    if stats.get("seconds"):
        mlflow.log_metric("tokens_per_second", stats["generated_tokens"] / stats["seconds"])


def run_verify(params: Any, root: Path, key: str | None) -> None:
    import pandas as pd

    from closedloop.verifiers import get_verifier

    r = params.rft
    samples = read_jsonl(root / DATA / "samples.jsonl")
    scored = rft.score_samples(get_verifier(r.verifier, **r.verifier_args), samples)
    kept = rft.select(scored, r.threshold, r.max_per_prompt)
    prompts = {str(s["key"]) for s in samples}
    passing = [s for s in scored if s["passed"]]
    metrics = {
        "num_samples": len(samples),
        "sample_pass_rate": len(passing) / max(1, len(samples)),
        "prompt_pass_at_n": len({str(s["key"]) for s in passing}) / max(1, len(prompts)),
        "num_truncated": sum(map(rft.is_truncated, samples)),  # cut at rft.max_new_tokens: never kept
        "num_truncated_passing": sum(rft.is_truncated(s) for s in passing),
        "num_kept": len(kept),
        "prompts_kept": len({str(s["key"]) for s in kept}),
    }
    write_jsonl(root / DATA / "scored.jsonl", scored)
    write_jsonl(root / DATA / "sft.jsonl", kept)
    write_json(root / DATA / "verify_metrics.json", metrics)
    mlflow.log_metrics(metrics)
    mlflow.log_table(pd.DataFrame([{"key": s["key"], "prompt": s["prompt"], "response": s["response"],
                                    "passed": s["passed"], "score": s["score"]} for s in scored[:200]]),
                     "samples.json")


def run_train(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.sft import train_sft

    kept = read_jsonl(root / DATA / "sft.jsonl")
    if not kept:
        raise UserError(f"{DATA / 'sft.jsonl'}: no verified samples to train on; lower rft.threshold or raise "
                        "rft.num_samples")
    with atomic_dir(root / "models/rft") as tmp:
        metrics = train_sft(root / "models/base", rft.sft_examples(kept), tmp, params.rft.sft.value(),
                            seed=_seed(params), dtype=params.model.dtype)
        if (tmp / "adapter").is_dir():
            mlflow.log_artifacts(str(tmp / "adapter"), artifact_path="adapter")
    log_training(metrics, root / DATA / "train_metrics.json")


STAGES = {"rft_sample": run_sample, "rft_verify": run_verify, "rft_train": run_train}
