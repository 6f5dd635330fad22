"""The scalar reward model as a verifier: `reward_model` (SPCT's baseline; RLHF's reward).

Verdict.score = sigmoid(r(prompt, response)): in [0, 1], monotone in the reward, so best-of-N and
thresholds work on it as on any verifier; the raw reward is in `details["reward"]`.
"""

from __future__ import annotations

import math
from pathlib import Path

from closedloop.verifiers.base import Form, Granularity, Source, Verdict, Verifier, register_verifier


@register_verifier("reward_model")
class RewardModelVerifier(Verifier):
    name = "reward_model"
    form = Form.SCORE
    granularity = Granularity.TRAJECTORY
    source = Source.MODEL

    def __init__(self, model: str = "models/spct/rm", threshold: float = 0.0, batch_size: int = 16,
                 dtype: str = "float32", max_chars: int | None = None) -> None:
        from closedloop.feedback.reward_model import load_reward_model

        self.tok, self.model = load_reward_model(Path(model), dtype)
        self.threshold = threshold  # passed: reward >= threshold
        self.batch_size = batch_size
        # Responses cut to this many characters, as the RM's training pairs were (SPCT's
        # spct.data.max_chars): a reward model scores only the kind of text it was trained on.
        self.max_chars = max_chars

    def verify(self, sample: dict) -> Verdict:
        return self.verify_batch([sample])[0]

    def verify_batch(self, samples: list[dict]) -> list[Verdict]:
        from closedloop.feedback.reward_model import reward_scores

        rewards = reward_scores(self.model, self.tok, [s["prompt"] for s in samples],
                                [s["response"][: self.max_chars] for s in samples], self.batch_size)
        return [Verdict(r >= self.threshold, 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, r)))), {"reward": r})
                for r in rewards]
