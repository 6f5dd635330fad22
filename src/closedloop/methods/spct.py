"""SPCT (self-principled critique tuning, DeepSeek-GRM, arXiv 2504.02495) as a recipe over plain rows.

    search    a generative reward model (GRM, verifiers/grm.py) writes N principle + critique + score
              trajectories per reward example, on shuffled response orders
    verify    rule-based: a trajectory is right when its predicted best is the labelled best (or its
              single score is the label)
    feedback  rejective fine-tuning (SFT on the right trajectories of examples that are not too easy),
              then online GRPO with a +1 / -1 reward and a KL penalty

At inference the GRM scales by voting over k sampled judgments; a meta RM keeps the k/2 it trusts
most. A scalar Bradley-Terry reward model trained on the same pairs is the baseline (and the
`reward_model` verifier other methods use).

Reward examples are `{"key", "prompt", "responses": [1-4 texts], "best": index | None, "score": 1-10
| None, "source"}`: ranked (best) or a single scored response (score).

The stages (stages/spct.py) read and write files; everything here is rows in, rows out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from closedloop.config import FieldError, GRPOParams, RewardParams, SFTParams, bounds
from closedloop.errors import UserError
from closedloop.methods.rft import distinct_by_prompt
from closedloop.verifiers.grm import MAX_RESPONSES, MAX_SCORE, MIN_SCORE, Judgment, credit, parse_scores, rule_reward, vote


@dataclass
class SPCTDataParams:
    # rules: the policy's sampled responses at `samples`, ranked by their rule-verifier score
    # (the fraction of IFEval constraints met; RFT's rft_verify writes them), ties dropped |
    # pairs: a local jsonl of preference pairs (TRL's prompt / chosen / rejected; RewardBench's
    # extra `subset` column is kept as the source) or scored single responses (prompt / response /
    # score 1-10) | hub: `hub.dataset` (a hub id, needs HF_HUB_OFFLINE=0, or a local data file)
    source: Literal["rules", "pairs", "hub"] = "rules"
    samples: str = field(default="data/rft/scored.jsonl", metadata=bounds(path=True))
    pairs: str = field(default="data/seeds/spct_pairs.jsonl", metadata=bounds(path=True))
    hub_dataset: str | None = None  # e.g. allenai/reward-bench (split filtered)
    hub_split: str = "filtered"
    max_pairs_per_prompt: int = field(default=2, metadata=bounds(ge=1, le=6))  # rules: widest score gaps first
    eval_fraction: float = field(default=0.5, metadata=bounds(gt=0.0, le=0.9))
    max_train: int = field(default=8, metadata=bounds(ge=1))
    max_eval: int = field(default=4, metadata=bounds(ge=1))
    max_chars: int = field(default=160, metadata=bounds(ge=20))  # each response is cut to this in the GRM prompt

    def __post_init__(self) -> None:
        if self.source == "hub" and not self.hub_dataset:
            raise FieldError("hub_dataset", "expected a dataset id or path when spct.data.source is hub, got null")


@dataclass
class GRMParams:
    principles: bool = True  # false: the no_principles ablation (critique and scores only), everywhere
    principles_tokens: int = field(default=12, metadata=bounds(ge=1, le=100_000))
    critique_tokens: int = field(default=20, metadata=bounds(ge=1, le=100_000))
    # labels: read each score's distribution over 1-10 by label scoring (never fails) | parse: the
    # model writes `\boxed{...}` and it is parsed (failures counted)
    score_mode: Literal["labels", "parse"] = "labels"
    temperature: float = field(default=0.5, metadata=bounds(ge=0.0, le=10.0))  # the paper's sampling temperature
    top_p: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))


@dataclass
class RejectiveParams:
    num_samples: int = field(default=4, metadata=bounds(ge=1, le=1024))  # N trajectories per example
    hinted: bool = False  # also sample N with the label stated in the prompt (kept only if right)
    max_per_example: int = field(default=2, metadata=bounds(ge=1, le=1024))  # right trajectories kept


@dataclass
class MetaRMParams:
    """A logistic-regression meta RM over features of a judgment's score distributions (margin,
    confidence, entropy, length), trained with BCE on right vs wrong judgments that the final GRM
    (models/spct/grm, whose votes it filters) samples on the train examples. The paper's meta RM is a
    text model; this one costs nothing to run, which voting@k needs on 2 cores."""
    num_samples: int = field(default=4, metadata=bounds(ge=1, le=1024))  # GRM judgments per train example
    steps: int = field(default=300, metadata=bounds(ge=1, le=1_000_000))
    learning_rate: float = field(default=0.05, metadata=bounds(gt=0.0, le=10.0))
    weight_decay: float = field(default=0.01, metadata=bounds(ge=0.0, le=10.0))


@dataclass
class SPCTEvalParams:
    votes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # voting@k; k samples at grm.temperature
    max_examples: int = field(default=4, metadata=bounds(ge=1))  # held-out examples for voting
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4])  # N for best-of-N on the policy's samples
    best_of_n_prompts: int = field(default=4, metadata=bounds(ge=1))
    selectors: list[str] = field(default_factory=lambda: ["ifeval_rules", "reward_model", "generative_rm"])

    def __post_init__(self) -> None:
        if not self.votes or any(k < 1 for k in self.votes):
            raise FieldError("votes", f"expected a non-empty list of integers >= 1, got {self.votes!r}")
        if not self.best_of_n or any(n < 1 for n in self.best_of_n):
            raise FieldError("best_of_n", f"expected a non-empty list of integers >= 1, got {self.best_of_n!r}")
        from closedloop.verifiers import list_verifiers

        if bad := [s for s in self.selectors if s not in list_verifiers()]:
            raise FieldError("selectors", f"expected registered verifiers ({', '.join(list_verifiers())}), got {bad}")


@dataclass
class SPCTConfig:
    data: SPCTDataParams = field(default_factory=SPCTDataParams)
    grm: GRMParams = field(default_factory=GRMParams)
    rejective: RejectiveParams = field(default_factory=RejectiveParams)
    sft: SFTParams = field(default_factory=lambda: SFTParams(learning_rate=2e-4, epochs=1.0, batch_size=4,
                                                             max_length=1024))
    grpo: GRPOParams = field(default_factory=lambda: GRPOParams(max_completion_length=32))
    rm: RewardParams = field(default_factory=RewardParams)
    meta_rm: MetaRMParams = field(default_factory=MetaRMParams)
    eval: SPCTEvalParams = field(default_factory=SPCTEvalParams)
    batch_size: int = field(default=32, metadata=bounds(ge=1, le=4096))  # sequences per generation / scoring batch


CONFIG = SPCTConfig


# ----------------------------------------------------------------------------------------------
# Reward data


def _shuffled(key: str, prompt: str, ranked: list[str], source: str, rng: random.Random) -> dict:
    """A ranked example whose best (ranked[0]) sits at a random position, so position is no cue."""
    order = list(range(len(ranked)))
    rng.shuffle(order)
    return {"key": key, "prompt": prompt, "responses": [ranked[i] for i in order], "best": order.index(0),
            "score": None, "source": source}


def examples_from_samples(samples: Sequence[dict], max_pairs_per_prompt: int, seed: int) -> list[dict]:
    """Pairs (better, worse) of one prompt's distinct sampled responses with different rule scores;
    the widest gaps first, each response in at most one pair per prompt."""
    rng = random.Random(seed)
    out = []
    for key, rows in distinct_by_prompt(samples).items():
        cands = sorted(((a, b) for a in rows for b in rows if a["score"] > b["score"]),
                       key=lambda ab: (-(ab[0]["score"] - ab[1]["score"]), ab[0].get("sample_idx", 0),
                                       ab[1].get("sample_idx", 0)))
        used: set[int] = set()
        n = 0
        for a, b in cands:
            if n == max_pairs_per_prompt or id(a) in used or id(b) in used:
                continue
            used |= {id(a), id(b)}
            out.append(_shuffled(f"{key}-{n}", str(a["prompt"]), [a["response"], b["response"]], "rules", rng))
            n += 1
    return out


def _text(value: Any) -> str | None:
    """A string, or the last message's content of a conversational (TRL) value."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    return None


def example_from_row(row: Any, index: int, where: str, rng: random.Random) -> dict:
    """One preference row (prompt/chosen/rejected[, subset]) or scored row (prompt/response/score)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object, got {type(row).__name__}")
    prompt = _text(row.get("prompt"))
    if not prompt:
        raise UserError(f"{where}: prompt: expected a non-empty string or chat, got {row.get('prompt')!r}")
    source = str(row.get("subset") or row.get("source") or "pairs")
    key = str(row.get("id", row.get("key", index)))
    if "chosen" in row or "rejected" in row:
        chosen, rejected = _text(row.get("chosen")), _text(row.get("rejected"))
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value or not value.strip():
                raise UserError(f"{where}: {name}: expected a non-empty string or chat, got {row.get(name)!r}")
        return _shuffled(key, prompt, [chosen, rejected], source, rng)
    response, score = _text(row.get("response")), row.get("score")
    if not response or not isinstance(score, int) or isinstance(score, bool) or not MIN_SCORE <= score <= MAX_SCORE:
        raise UserError(f"{where}: expected chosen/rejected, or response with an integer score "
                        f"{MIN_SCORE}-{MAX_SCORE}; got keys {sorted(row)}")
    return {"key": key, "prompt": prompt, "responses": [response], "best": None, "score": score, "source": source}


def load_pair_file(path: Path, where: str, seed: int) -> list[dict]:
    from closedloop.io import iter_param_jsonl

    rng = random.Random(seed)
    out = [example_from_row(row, i, f"{where}: {path.name}:{lineno}", rng)
           for i, (lineno, row) in enumerate(iter_param_jsonl(path, where))]
    if not out:
        raise UserError(f"{where}: {path.name}: no examples; expected one JSON object per line")
    return out


def preference_pairs(examples: Sequence[dict]) -> list[dict]:
    """Reward examples (responses + best) as preference rows, the best against each other response
    (single-response examples have none): the scalar RM's data, here and in RLHF."""
    out = []
    for e in examples:
        if e.get("best") is None:
            continue
        for i, r in enumerate(e["responses"]):
            if i != e["best"]:
                out.append({"key": f"{e['key']}-{i}", "group": str(e["key"]), "prompt": e["prompt"],
                            "chosen": e["responses"][e["best"]], "rejected": r, "margin": 1.0})
    return out


def load_hub_pairs(dataset: str, split: str, seed: int) -> list[dict]:
    """A hub dataset (or local data file) with TRL / RewardBench columns."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing split, bad file: one line naming the param
        raise UserError(f"spct.data.hub_dataset: cannot load {dataset!r} split {split!r}: {e}") from None
    rng = random.Random(seed)
    return [example_from_row(row, i, f"spct.data.hub_dataset: {dataset} row {i}", rng) for i, row in enumerate(rows)]


def split_examples(examples: Sequence[dict], eval_fraction: float, max_train: int, max_eval: int,
                   seed: int) -> tuple[list[dict], list[dict]]:
    """Held out by prompt (no prompt on both sides): a seeded shuffle of the distinct prompts."""
    prompts = sorted({e["prompt"] for e in examples})
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(eval_fraction * len(prompts))) if len(prompts) > 1 else 0
    held = set(prompts[:n_eval])
    train = [e for e in examples if e["prompt"] not in held][:max_train]
    evalset = [e for e in examples if e["prompt"] in held][:max_eval]
    return train, evalset


# ----------------------------------------------------------------------------------------------
# Rejective sampling and the RL reward


def rejective_filter(example: dict, judgments: Sequence[Judgment], max_keep: int) -> tuple[str, list[Judgment]]:
    """("too_easy" | "all_wrong" | "kept", right judgments to train on). All N right: too easy, dropped."""
    right = [j for j in judgments if rule_reward(example, j.scores) > 0]
    if judgments and len(right) == len(judgments):
        return "too_easy", []
    if not right:
        return "all_wrong", []
    return "kept", right[:max_keep]


def integer_scores(judgment: Judgment) -> list[int]:
    """The scores as the GRM writes them (shown order): rounded to 1-10, then, if rounding tied the
    judgment's own best with another response, the best raised (or the others lowered) by one, so
    the text ranks the responses as the judgment did."""
    scores = judgment.scores or []
    ints = [min(MAX_SCORE, max(MIN_SCORE, round(s))) for s in scores]
    best = max(range(len(scores)), key=scores.__getitem__) if scores else None
    if best is not None and len(ints) > 1 and sum(v >= ints[best] for v in ints) > 1:
        top = max(ints)
        if top < MAX_SCORE:
            ints[best] = top + 1
        else:
            ints = [v if i == best else min(v, MAX_SCORE - 1) for i, v in enumerate(ints)]
            ints[best] = MAX_SCORE
    return [ints[i] for i in judgment.order]


def training_text(judgment: Judgment) -> str:
    """The answer to train on: the judgment's text up to its scores, then its integer scores."""
    from closedloop.verifiers.grm import SCORES, format_scores

    head = judgment.text.rsplit(SCORES, 1)[0].rstrip()
    return f"{head}\n{format_scores(integer_scores(judgment))}"


def grpo_reward(prompts: list, completions: list, best: list, score: list, order: list, **_: Any) -> list[float]:
    """TRL reward function: +1 / -1 by `rule_reward` on the scores parsed from each completion."""
    from closedloop.verifiers.grm import _unshuffle

    out = []
    for text, b, s, o in zip(completions, best, score, order):
        shown = parse_scores(text if isinstance(text, str) else _text(text) or "", len(o))
        scores = None if shown is None else _unshuffle([float(v) for v in shown], o)
        out.append(rule_reward({"best": None if b < 0 else b, "score": None if s < 0 else s}, scores))
    return out


class LabelScoredReward:
    """The same +1 / -1 reward when scores are read by label scoring (grm.score_mode: labels): each
    completion is cut at `Scores:` and the box is read off the policy being trained (`bind`), as the
    evaluation reads it. So the RL shapes the principles and critique that lead to the scores,
    and a model that never writes the box still gets a signal."""

    __name__ = "grm_rule_reward"

    def __init__(self, tokenizer: Any, batch_size: int) -> None:
        self.tokenizer, self.batch_size, self.model = tokenizer, batch_size, None

    def bind(self, model: Any) -> None:
        self.model = model

    def __call__(self, prompts: list, completions: list, best: list, score: list, order: list, **_: Any) -> list[float]:
        from closedloop.verifiers.grm import BOX, SCORES, _unshuffle, box_distributions, expected_score

        texts = [p + c.split(SCORES)[0].rstrip() + "\n" + SCORES + BOX for p, c in zip(prompts, completions)]
        dists = box_distributions(self.model, self.tokenizer, texts, [len(o) for o in order], self.batch_size)
        return [rule_reward({"best": None if b < 0 else b, "score": None if s < 0 else s},
                            _unshuffle([expected_score(d) for d in ds], o))
                for ds, b, s, o in zip(dists, best, score, order)]


# ----------------------------------------------------------------------------------------------
# Meta RM and voting


def judgment_features(j: Judgment) -> list[float]:
    """[margin, confidence, entropy, length]: what a judgment's own numbers say about its reliability."""
    if j.scores is None:
        return [0.0, 0.0, 1.0, j.num_tokens / 100]
    top = sorted(j.scores, reverse=True)
    margin = (top[0] - top[1]) / (MAX_SCORE - MIN_SCORE) if len(top) > 1 else 0.0
    if j.dists:
        conf = sum(max(d) for d in j.dists) / len(j.dists)
        ent = sum(-sum(p * math.log(p) for p in d if p > 0) for d in j.dists) / len(j.dists) / math.log(len(j.dists[0]))
    else:
        conf, ent = 1.0, 0.0
    return [margin, conf, ent, j.num_tokens / 100]


def train_meta_rm(features: list[list[float]], labels: list[float], p: MetaRMParams, seed: int) -> dict:
    """Logistic regression with BCE (torch); features standardised. One class only: a constant model."""
    import torch

    torch.manual_seed(seed)
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    if 0 < float(y.sum()) < len(labels):
        opt = torch.optim.Adam([w, b], lr=p.learning_rate, weight_decay=p.weight_decay)
        for _ in range(p.steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits((x - mean) / std @ w + b, y)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = (x - mean) / std @ w + b
        acc = float(((logits > 0).double() == y).double().mean()) if labels else 0.0
    return {"mean": mean.tolist(), "std": std.tolist(), "weights": w.detach().tolist(), "bias": float(b.detach()),
            "train_examples": len(labels), "train_positive": float(y.sum()), "train_accuracy": acc}


def meta_score(model: dict, j: Judgment) -> float:
    f = judgment_features(j)
    return model["bias"] + sum(w * (v - m) / s for w, v, m, s in zip(model["weights"], f, model["mean"], model["std"]))


def voting_credit(example: dict, judgments: Sequence[Judgment], k: int, meta: dict | None = None) -> float:
    """Credit of voting over the first k judgments; with a meta RM, over the max(1, k // 2) it scores highest."""
    pool = list(judgments[:k])
    if meta is not None:
        pool = sorted(pool, key=lambda j: -meta_score(meta, j))[: max(1, k // 2)]
    return credit(example, vote(pool))


def check_examples(examples: Sequence[dict], where: str) -> None:
    for e in examples:
        if not 1 <= len(e["responses"]) <= MAX_RESPONSES:
            raise UserError(f"{where}: example {e['key']}: expected 1-{MAX_RESPONSES} responses, got {len(e['responses'])}")
