"""Label scoring: normalised label probabilities equal a direct, unbatched, teacher-forced computation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from closedloop.errors import UserError
from closedloop.generate import encode_prompt
from closedloop.label_scoring import label_logprobs, score_labels

from tiny_model import make_tiny_model_and_tokenizer

PROMPTS = [
    "the quick brown fox",
    "write a short poem about the sea and the sky please list three colors",
    "what",
    [{"role": "user", "content": "what is two plus two ?"}],
]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model_and_tokenizer()


def _direct(model, tok, prompt, labels) -> list[float]:
    """log P(label | prompt): one forward of prompt + label alone (no padding, no cache)."""
    ids = encode_prompt(tok, prompt)
    out = []
    with torch.inference_mode():
        for label in labels:
            lab = tok.encode(label, add_special_tokens=False)
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids + lab])).logits[0].float(), -1)
            out.append(sum(lp[len(ids) - 1 + k, t].item() for k, t in enumerate(lab)))
    return out


@pytest.mark.parametrize("labels", [["red", "blue"], ["red", "green and blue", "the sky", "four"]])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_equals_direct_computation(tiny, labels, batch_size):
    model, tok = tiny
    assert max(len(tok.encode(x, add_special_tokens=False)) for x in labels) == (1 if len(labels) == 2 else 3)
    lps = label_logprobs(model, tok, PROMPTS, labels, batch_size=batch_size)
    probs = score_labels(model, tok, PROMPTS, labels, batch_size=batch_size)
    for prompt, lp, p in zip(PROMPTS, lps, probs):
        ref = _direct(model, tok, prompt, labels)
        assert lp == pytest.approx(ref, abs=1e-4)
        assert p == pytest.approx(torch.softmax(torch.tensor(ref, dtype=torch.float64), -1).tolist(), abs=1e-5)
        assert sum(p) == pytest.approx(1.0, abs=1e-9) and len(p) == len(labels)


def test_multi_token_label_is_not_its_first_token(tiny):
    model, tok = tiny
    # "green and blue" and "green" share the first token: only teacher forcing tells them apart.
    lp = label_logprobs(model, tok, PROMPTS[:2], ["green", "green and blue"])
    for a, b in lp:
        assert b < a


def test_bad_labels(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="at least two"):
        score_labels(model, tok, PROMPTS, ["red"])
    with pytest.raises(UserError, match="distinct"):
        score_labels(model, tok, PROMPTS, ["red", "red"])
    with pytest.raises(UserError, match="empty"):
        score_labels(model, tok, PROMPTS, ["red", ""])


def test_model_mode_restored(tiny):
    model, tok = tiny
    model.train()
    score_labels(model, tok, PROMPTS[:1], ["red", "blue"])
    assert model.training
    model.eval()
