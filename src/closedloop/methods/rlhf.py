"""RLHF (InstructGPT: SFT -> reward model -> PPO with a per-token KL penalty) as a recipe over plain rows.

    search    the SFT policy samples responses (rollouts on the train prompts)
    verify    a scalar Bradley-Terry reward model (TRL RewardTrainer) trained on ranked pairs
    feedback  PPO against that reward minus beta * KL(pi || pi_SFT) per token (feedback/ppo.py, the one
              trainer written here: TRL 1.16 has none); GRPO or RLOO (TRL) with beta > 0 as
              alternatives (`algorithm`)

Preferences (`prefs.source`): `rules` ranks K sampled responses of a prompt by the IFEval rule
verifiers (RFT's scored samples); `ai_feedback` (RLAIF) ranks the same samples by a model judge's
label-scored P(yes); `pairs` / `hub` read TRL's prompt / chosen / rejected rows. For K ranked
responses of one prompt all C(K,2) pairs with different scores are kept, together: on one side of
the held-out split and side by side in the reward model's training order (InstructGPT trains on a
prompt's comparisons as one batch element, so that they do not overfit it one by one).

LLaMA 2's rejection sampling is not a variant here: it is the RFT unit with
`rft.verifier: reward_model` (best-of-N by the reward model, SFT on the winners); see the README.

The stages (stages/rlhf.py) read and write files; everything here is rows in, rows out.
A preference row: {"key", "group", "prompt", "chosen", "rejected", "margin"}.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from closedloop.config import FieldError, GRPOParams, PPOParams, RewardParams, bounds
from closedloop.errors import UserError
from closedloop.methods.rft import distinct_by_prompt


@dataclass
class RLHFPrefsParams:
    # rules: K sampled responses per prompt at `samples`, ranked by their rule-verifier score |
    # ai_feedback: the same samples ranked by `judge_model`'s label-scored P(yes) (RLAIF) |
    # pairs: a local jsonl of TRL prompt / chosen / rejected rows | hub: `hub_dataset`'s rows
    source: Literal["rules", "ai_feedback", "pairs", "hub"] = "rules"
    samples: str = field(default="data/rft/scored.jsonl", metadata=bounds(path=True))
    judge_model: str = field(default="models/base", metadata=bounds(path=True))  # ai_feedback's labeller
    pairs: str = field(default="data/seeds/spct_pairs.jsonl", metadata=bounds(path=True))
    hub_dataset: str | None = None  # e.g. trl-lib/ultrafeedback_binarized (needs HF_HUB_OFFLINE=0)
    hub_split: str = "train"
    eval_fraction: float = field(default=0.25, metadata=bounds(gt=0.0, le=0.9))  # prompts held out for RM accuracy
    max_pairs: int = field(default=24, metadata=bounds(ge=1))  # train pairs kept (whole prompts, in order)
    max_chars: int = field(default=240, metadata=bounds(ge=20))  # responses cut to this for the reward model

    def __post_init__(self) -> None:
        if self.source == "hub" and not self.hub_dataset:
            raise FieldError("hub_dataset", "expected a dataset id or path when rlhf.prefs.source is hub, got null")


@dataclass
class RLHFPolicyParams:
    # ppo: the project's PPO (per-token KL, GAE, clipped losses, value model from the RM) |
    # grpo / rloo: TRL's GRPOTrainer / RLOOTrainer against the same reward, KL coefficient `beta`
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    prompts: str = field(default="data/suite/train.jsonl", metadata=bounds(path=True))  # {"prompt"} rows
    max_prompts: int = field(default=48, metadata=bounds(ge=1))
    # demo size (a few PPO steps on 2 cores); PPOParams documents the published defaults
    ppo: PPOParams = field(default_factory=lambda: PPOParams(rollout_batch_size=4, batch_size=4, max_steps=3,
                                                            num_ppo_epochs=2, max_new_tokens=32,
                                                            missing_eos_penalty=1.0))
    # GRPO / RLOO: beta > 0 (TRL's GRPO default is 0: no KL); TRL's RLOO default is 0.05
    grpo: GRPOParams = field(default_factory=lambda: GRPOParams(beta=0.05, max_completion_length=32, max_steps=3))


@dataclass
class RLHFEvalParams:
    # the evaluate.models entry whose eval@ responses are the SFT model's
    sft_name: str = field(default="rft", metadata=bounds(model_name=True))
    policy_name: str = field(default="rlhf", metadata=bounds(model_name=True))  # the entry of this method's policy
    max_prompts: int = field(default=16, metadata=bounds(ge=1))  # held-out prompts scored by the RM
    kl_samples: int = field(default=1, metadata=bounds(ge=1, le=64))  # policy samples per prompt for KL(pi || SFT)
    kl_max_new_tokens: int = field(default=32, metadata=bounds(ge=1, le=100_000))


@dataclass
class RLHFConfig:
    sft_model: str = field(default="models/rft", metadata=bounds(path=True))  # the SFT policy (RFT's LoRA SFT)
    prefs: RLHFPrefsParams = field(default_factory=RLHFPrefsParams)
    rm: RewardParams = field(default_factory=RewardParams)
    policy: RLHFPolicyParams = field(default_factory=RLHFPolicyParams)
    eval: RLHFEvalParams = field(default_factory=RLHFEvalParams)
    batch_size: int = field(default=32, metadata=bounds(ge=1, le=4096))  # sequences per scoring batch


CONFIG = RLHFConfig


# ----------------------------------------------------------------------------------------------
# Preferences


def ranked_pairs(samples: Sequence[dict], score_key: str = "score") -> list[dict]:
    """All C(K,2) pairs of each prompt's distinct responses whose scores differ (ties dropped),
    better first; a prompt's pairs share its `group` and stay side by side (prompts in key order)."""
    out = []
    for key, rows in distinct_by_prompt(samples).items():
        n = 0
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                if a[score_key] == b[score_key]:
                    continue
                hi, lo = (a, b) if a[score_key] > b[score_key] else (b, a)
                out.append({"key": f"{key}-{n}", "group": key, "prompt": str(a["prompt"]), "chosen": hi["response"],
                            "rejected": lo["response"], "margin": float(hi[score_key] - lo[score_key])})
                n += 1
    return out


def split_pairs(pairs: Sequence[dict], eval_fraction: float, max_pairs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Held out by prompt (a prompt's pairs never straddle the split); train keeps whole prompts in
    a seeded group order, up to max_pairs."""
    prompts = sorted({p["prompt"] for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(prompts)
    n_eval = max(1, round(eval_fraction * len(prompts))) if len(prompts) > 1 else 0
    held = set(prompts[:n_eval])
    evalset = [p for p in pairs if p["prompt"] in held]
    train: list[dict] = []
    for prompt in prompts[n_eval:]:
        group = [p for p in pairs if p["prompt"] == prompt]
        if train and len(train) + len(group) > max_pairs:
            break
        train += group
    return train, evalset


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs the reward model orders right (a tie counts half)."""
    if not chosen:
        return 0.0
    return sum(win(c, r) for c, r in zip(chosen, rejected)) / len(chosen)


def win(a: float, b: float) -> float:
    """1 if a beats b, 0.5 on a tie, else 0 (the reward model as the judge)."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def check_pairs(pairs: Sequence[dict], where: str) -> None:
    if not pairs:
        raise UserError(f"{where}: no preference pairs (the rules source needs prompts whose samples differ in "
                        "score: raise rft.num_samples or prepare.num_train)")
