"""Prefix sharing in HFBackend: n samples of one prompt reuse one prefill (tiny model, no hub)."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from closedloop.generate import SamplingParams, pad_batch
from closedloop.hf_backend import HFBackend

from tiny_model import make_tiny_model_and_tokenizer

# Different token lengths in one batch, so left padding is exercised (incl. a 1-token prompt).
PROMPTS = [
    "the quick brown fox",
    "write a short poem about the sea and the sky please list three colors",
    "what",
    [{"role": "user", "content": "what is two plus two ?"}],
    "a model writes an answer",
]
# top_p tiny: only the most likely token survives, i.e. greedy decoding through the sampling path.
NEAR_GREEDY = dict(n=3, temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=5)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model_and_tokenizer()


def _backend(tiny, share: bool, batch_size: int = 16) -> HFBackend:
    model, tok = tiny
    return HFBackend(model, tok, batch_size=batch_size, show_progress=False, share_prefix=share)


@pytest.mark.parametrize("batch_size", [16, 6])
def test_near_greedy_outputs_equal_with_and_without_sharing(tiny, batch_size):
    params = SamplingParams(**NEAR_GREEDY)
    shared = _backend(tiny, True, batch_size).generate(PROMPTS, params)
    plain = _backend(tiny, False, batch_size).generate(PROMPTS, params)
    assert shared == plain
    assert all(len(c) == 3 for c in shared)
    assert any(c[0].num_tokens > 0 for c in shared)  # something was actually generated


def test_first_token_logits_match(tiny):
    _, tok = tiny
    shared, plain = _backend(tiny, True), _backend(tiny, False)
    encoded = [shared._encode(p) for p in PROMPTS]
    assert len({len(e) for e in encoded}) > 2  # really left-padded
    ids, mask = pad_batch(encoded, shared.pad_id)
    kw = shared._generate_kwargs(SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=2), 3)
    extra = dict(output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        torch.manual_seed(0)
        a = shared._sample_batch(ids, mask, kw, 3, **extra)
        torch.manual_seed(0)
        b = plain._sample_batch(ids, mask, kw, 3, **extra)
        # Reference: one full forward per prompt alone (no padding, no cache).
        ref = torch.stack([shared.model(input_ids=torch.tensor([e])).logits[0, -1] for e in encoded])
    first_a, first_b = a.logits[0], b.logits[0]
    assert first_a.shape == first_b.shape == (len(PROMPTS) * 3, len(tok))
    torch.testing.assert_close(first_a, first_b, atol=1e-4, rtol=0)
    torch.testing.assert_close(first_a, ref.repeat_interleave(3, dim=0), atol=1e-4, rtol=0)
    # Same seed, same draws: the first sampled tokens agree, and so do the next step's logits
    # (the first decode step attending over the shared, repeated cache).
    assert torch.equal(a.sequences[:, ids.shape[1]], b.sequences[:, ids.shape[1]])
    torch.testing.assert_close(a.logits[1], b.logits[1], atol=1e-4, rtol=0)


def test_same_seed_identical_with_sharing(tiny):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=11)
    a = _backend(tiny, True, 6).generate(PROMPTS, params)
    torch.rand(3)  # unrelated RNG use in between must not matter
    b = _backend(tiny, True, 6).generate(PROMPTS, params)
    assert a == b
    c = _backend(tiny, True, 6).generate(PROMPTS, replace(params, seed=12))
    assert [[x.text for x in cs] for cs in a] != [[x.text for x in cs] for cs in c]


def test_prefill_token_counts(tiny):
    n = 3
    params = SamplingParams(n=n, temperature=1.0, top_p=0.9, max_new_tokens=3)
    shared, plain = _backend(tiny, True, 6), _backend(tiny, False, 6)
    encoded = [shared._encode(p) for p in PROMPTS]
    # Same batching as HFBackend.generate: longest first, batch_size // n prompts per batch.
    order = sorted(encoded, key=len, reverse=True)
    batches = [order[i : i + 6 // n] for i in range(0, len(order), 6 // n)]
    widths = [max(len(e) for e in b) for b in batches]
    expect_plain = sum(len(b) * n * w for b, w in zip(batches, widths))
    expect_shared = sum(len(b) * (w - 1) + len(b) * n for b, w in zip(batches, widths))
    shared.generate(PROMPTS, params)
    plain.generate(PROMPTS, params)
    assert plain.stats["prefill_tokens"] == expect_plain == plain.stats["padded_prompt_tokens"]
    assert shared.stats["prefill_tokens"] == expect_shared
    # The logical prompt counts do not depend on the mode.
    for key in ("prompt_tokens", "padded_prompt_tokens", "sequences", "batches"):
        assert shared.stats[key] == plain.stats[key]
    ratio = shared.stats["prefill_tokens"] / plain.stats["prefill_tokens"]
    assert ratio <= 1 / n + max(1 / w for w in widths) + 1e-9


def test_no_sharing_when_nothing_to_share(tiny):
    # n == 1 and greedy decode one sequence per prompt: sharing is a no-op and the counts agree.
    for params in (SamplingParams(n=1, temperature=1.0, max_new_tokens=3),
                   SamplingParams(n=3, temperature=0.0, max_new_tokens=3)):
        shared, plain = _backend(tiny, True), _backend(tiny, False)
        assert shared.generate(PROMPTS, params) == plain.generate(PROMPTS, params)
        assert shared.stats["prefill_tokens"] == plain.stats["prefill_tokens"] == plain.stats["padded_prompt_tokens"]


def test_single_token_batch_falls_back(tiny):
    # A batch whose padded width is 1 has no prefix to cache; it takes the plain path.
    params = SamplingParams(**NEAR_GREEDY)
    shared, plain = _backend(tiny, True), _backend(tiny, False)
    assert shared.generate(["what"], params) == plain.generate(["what"], params)
    assert shared.stats["prefill_tokens"] == plain.stats["prefill_tokens"] == 3


def test_model_really_computes_prompt_once(tiny):
    # Count what the model is fed (embedding lookups), not what the backend says it did.
    model, tok = tiny
    n = 3
    params = SamplingParams(n=n, temperature=1.0, top_p=0.9, max_new_tokens=4)
    encoded = [HFBackend(model, tok, show_progress=False)._encode(p) for p in PROMPTS]
    width = max(len(e) for e in encoded)
    for share in (True, False):
        shapes: list[tuple[int, ...]] = []
        embed = model.get_input_embeddings()
        hook = embed.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
        try:
            backend = _backend(tiny, share, batch_size=len(PROMPTS) * n)
            backend.generate(PROMPTS, params)
        finally:
            hook.remove()
        rows = len(PROMPTS) * n
        if share:
            # one prefill of the prompts minus their last token, then only the last token for each of the n rows
            assert shapes[:2] == [(len(PROMPTS), width - 1), (rows, 1)]
        else:
            assert shapes[0] == (rows, width)  # HF expands the prompts n times before prefilling
        assert all(s == (rows, 1) for s in shapes[(2 if share else 1):])  # decode steps
        prompt_positions = shapes[0][0] * shapes[0][1] + (shapes[1][0] if share else 0)
        assert backend.stats["prefill_tokens"] == prompt_positions
