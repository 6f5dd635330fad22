"""Rejection-sampling fine-tuning (RFT): the baseline closed loop, as a recipe over plain rows.

    search   best-of-N: `num_samples` completions per train prompt
    verify   a registered verifier (IFEval rules by default) scores each sample; samples that
             ended on EOS and score at least `threshold` are kept, at most `max_per_prompt`
             distinct ones per prompt (a sample cut at `max_new_tokens` is never kept: SFT on it
             would teach the model to stop mid-sentence)
    feedback SFT on the kept (prompt, response) pairs (TRL, LoRA by default)

The stages (stages/rft.py) read and write files; everything here is rows in, rows out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from closedloop.config import SFTParams, bounds, check_verifier_args, check_verifier_name


@dataclass
class RFTConfig:
    # search: best-of-N sampling on the train prompts
    num_samples: int = field(default=4, metadata=bounds(ge=1, le=1024))
    temperature: float = field(default=0.9, metadata=bounds(ge=0.0, le=10.0))
    top_p: float = field(default=0.95, metadata=bounds(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=128, metadata=bounds(ge=1, le=100_000))
    batch_size: int = field(default=64, metadata=bounds(ge=1, le=4096))  # sequences per generation batch
    # verify: a registered verifier by name, built with verifier_args (ifeval_rules: mode strict |
    # loose); a sample is kept when its verdict's score (in [0, 1]) is >= threshold
    verifier: str = "ifeval_rules"
    verifier_args: dict[str, str | int | float | bool] = field(default_factory=lambda: {"mode": "strict"})
    threshold: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))
    max_per_prompt: int = field(default=4, metadata=bounds(ge=1, le=1024))
    # feedback: SFT on the kept samples
    sft: SFTParams = field(default_factory=lambda: SFTParams(learning_rate=6e-4))
    # the sampling and training seed; null: the global `seed`, which also draws the prompts (set this
    # one to vary RFT alone over the same held-out set: `seeds` in experiments/rft.yaml)
    seed: int | None = field(default=None, metadata=bounds(ge=0, le=2**31 - 1))

    def __post_init__(self) -> None:
        check_verifier_name(self.verifier)
        check_verifier_args(self.verifier, self.verifier_args)


CONFIG = RFTConfig


def search_batches(rows: Sequence[dict], num_samples: int, batch_size: int) -> list[list[dict]]:
    """The train prompts in generation batches of about `batch_size` sequences (`num_samples` each)."""
    per_batch = max(1, batch_size // num_samples)
    return [list(rows[i:i + per_batch]) for i in range(0, len(rows), per_batch)]


def sample_batch(backend: Any, batch: Sequence[dict], b: int, num_samples: int, sampling: dict,
                 seed: int) -> list[dict]:
    """Search: one row per (prompt, sample) of batch `b`, which has its own seed, so a run killed
    half-way and resumed gives the same rows as one that never died."""
    from closedloop.generate import SamplingParams, derived_seed

    params = SamplingParams(n=num_samples, seed=derived_seed(seed, b), **sampling)
    outs = backend.generate([[{"role": "user", "content": r["prompt"]}] for r in batch], params)
    return [{**row, "sample_idx": i, "response": c.text, "num_tokens": c.num_tokens, "finish_reason": c.finish_reason}
            for row, completions in zip(batch, outs) for i, c in enumerate(completions)]


def score_samples(verifier: Any, samples: Sequence[dict]) -> list[dict]:
    """Verify: each sample with its verdict (`passed`, `score` in [0, 1], the verifier's details)."""
    verdicts = verifier.verify_batch(list(samples))
    return [{**s, "passed": v.passed, "score": v.score, "details": v.details} for s, v in zip(samples, verdicts)]


def is_truncated(sample: dict) -> bool:
    """Whether generation stopped at the token limit instead of at EOS."""
    return sample["finish_reason"] != "stop"


def select(scored: Sequence[dict], threshold: float, max_per_prompt: int) -> list[dict]:
    """Feedback data: per prompt, up to `max_per_prompt` distinct non-empty responses that ended
    on EOS and score >= threshold, best first (ties: lower sample index first); prompts in key order."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in scored:
        if row["score"] >= threshold and not is_truncated(row):
            by_prompt[str(row["key"])].append(row)
    kept = []
    for key in sorted(by_prompt):
        seen: set[str] = set()
        for row in sorted(by_prompt[key], key=lambda r: (-r["score"], r["sample_idx"])):
            if row["response"].strip() and row["response"] not in seen and len(seen) < max_per_prompt:
                seen.add(row["response"])
                kept.append({"key": row["key"], "prompt": row["prompt"], "response": row["response"],
                             "score": row["score"], "sample_idx": row["sample_idx"]})
    return kept


def distinct_by_prompt(samples: Sequence[dict]) -> dict[str, list[dict]]:
    """Scored samples grouped by prompt key (keys in sorted order), each group's non-empty responses
    once (stripped text compared), in sample order: what the methods that rank RFT's samples
    (SPCT's reward data, RLHF's preferences) pair up."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_key[str(s["key"])].append(s)
    out: dict[str, list[dict]] = {}
    for key in sorted(by_key):
        seen: set[str] = set()
        rows = out[key] = []
        for s in sorted(by_key[key], key=lambda r: r.get("sample_idx", 0)):
            text = str(s["response"]).strip()
            if text and text not in seen:
                seen.add(text)
                rows.append(s)
    return out


def sft_examples(kept: Sequence[dict]) -> list[dict]:
    """Conversational prompt-completion examples (TRL computes the loss on the completion only)."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]} for r in kept]
