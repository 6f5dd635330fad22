"""Batched sampling engine on a tiny from-config Llama and an in-memory tokenizer (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from closedloop.backends import make_backend
from closedloop.errors import UserError
from closedloop.generate import SamplingParams, render_prompt, stop_token_ids
from closedloop.hf_backend import HFBackend

from tiny_model import bias_lm_head, make_tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model_and_tokenizer()


PROMPTS = [
    "the quick brown fox",
    "write a short poem about the sea and the sky please list three colors",
    "what is",
    [{"role": "user", "content": "what is two plus two ?"}],
    "a model writes an answer",
]


def _texts(out):
    return [[c.text for c in comps] for comps in out]


def test_same_seed_identical_across_instances(tiny):
    model, tok = tiny
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    a = HFBackend(model, tok, batch_size=4, show_progress=False).generate(PROMPTS, params)
    torch.rand(5)  # unrelated RNG use in between must not matter
    b = HFBackend(model, tok, batch_size=4, show_progress=False).generate(PROMPTS, params)
    assert a == b


def test_different_seed_differs(tiny):
    model, tok = tiny
    backend = HFBackend(model, tok, batch_size=8, show_progress=False)
    p = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=16)
    a = backend.generate(PROMPTS, SamplingParams(seed=0, **p))
    b = backend.generate(PROMPTS, SamplingParams(seed=1, **p))
    assert _texts(a) != _texts(b)


def test_does_not_disturb_global_rng(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    HFBackend(model, tok, show_progress=False).generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))
    assert torch.equal(torch.rand(3), expected)


def test_n_completions_and_order_preserved(tiny):
    model, tok = tiny
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=6)
    # greedy: each prompt's output must not depend on its batch or position, only on the prompt
    batched = HFBackend(model, tok, batch_size=3, show_progress=False).generate(PROMPTS, params)
    assert len(batched) == len(PROMPTS)
    assert all(len(comps) == 3 for comps in batched)
    singles = [HFBackend(model, tok, batch_size=3, show_progress=False).generate([p], params)[0] for p in PROMPTS]
    assert batched == singles
    # the test prompts' token lengths differ, so sorting really reordered them
    lengths = [len(tok.encode(render_prompt(tok, p), add_special_tokens=False)) for p in PROMPTS]
    assert lengths != sorted(lengths, reverse=True)


def test_greedy_batched_matches_unbatched_generate(tiny):
    model, tok = tiny
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    backend = HFBackend(model, tok, batch_size=16, show_progress=False)
    out = backend.generate(PROMPTS, params)
    stops = backend.stop_ids
    for prompt, comps in zip(PROMPTS, out):
        text = render_prompt(tok, prompt)
        ids = torch.tensor([tok.encode(text, add_special_tokens=isinstance(prompt, str))])
        with torch.inference_mode():
            ref = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=10, eos_token_id=stops, pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
        assert comps[0].num_tokens == cut
        assert comps[0].text == tok.decode(ref[:cut], skip_special_tokens=True).rstrip()
    assert backend.stats["batches"] == 1
    assert backend.stats["generated_tokens"] == sum(c[0].num_tokens for c in out)
    assert backend.stats["padded_prompt_tokens"] > backend.stats["prompt_tokens"] > 0


def test_max_new_tokens_and_length_finish(tiny):
    model, tok = tiny
    # EOS suppressed via a large negative bias, so every sequence must run to the limit
    model2, _ = make_tiny_model_and_tokenizer()
    bias_lm_head(model2, {i: -1e4 for i in stop_token_ids(model2, tok)})
    out = HFBackend(model2, tok, batch_size=4, show_progress=False).generate(
        PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=5)
    )
    for comps in out:
        for c in comps:
            assert c.num_tokens == 5 and c.finish_reason == "length"


@pytest.mark.parametrize("stop_token", ["<|endoftext|>", "<|im_end|>"])
def test_stop_token_ends_generation(stop_token):
    model, tok = make_tiny_model_and_tokenizer()
    stop = tok.convert_tokens_to_ids(stop_token)
    bias_lm_head(model, {stop: 1e4})
    backend = HFBackend(model, tok, show_progress=False)
    assert stop in backend.stop_ids  # <|im_end|> comes from the chat template
    out = backend.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, max_new_tokens=8))
    assert all(c == out[0][0] for comps in out for c in comps)
    assert out[0][0].finish_reason == "stop" and out[0][0].num_tokens == 0 and out[0][0].text == ""


def test_stop_midway_in_mixed_batch():
    # A moderate EOS bias makes sequences stop at different steps within one batch.
    model, tok = make_tiny_model_and_tokenizer()
    eos = tok.eos_token_id
    bias_lm_head(model, {eos: 1.0})
    out = HFBackend(model, tok, batch_size=16, show_progress=False).generate(
        PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=20, seed=3)
    )
    flat = [c for comps in out for c in comps]
    assert {c.finish_reason for c in flat} == {"stop", "length"}
    for c in flat:
        assert (c.num_tokens < 20) == (c.finish_reason == "stop")


def test_chat_prompt_rendered_with_template(tiny):
    _, tok = tiny
    text = render_prompt(tok, [{"role": "system", "content": "you are a bot"}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nyou are a bot<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "raw text") == "raw text"


def test_tokenizer_and_model_left_untouched(tiny):
    model, tok = tiny
    side, pad = tok.padding_side, tok.pad_token
    model.train()
    HFBackend(model, tok, show_progress=False).generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))
    assert model.training and (tok.padding_side, tok.pad_token) == (side, pad)
    model.eval()


def test_make_backend():
    model, tok = make_tiny_model_and_tokenizer()
    assert isinstance(make_backend("hf", model, tok, batch_size=2, show_progress=False), HFBackend)
    with pytest.raises(UserError, match="unknown generation backend"):
        make_backend("nope", model, tok)
    with pytest.raises((UserError, NotImplementedError), match="vllm"):
        make_backend("vllm", model, tok)


def test_invalid_params():
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(UserError, match="n must"):
        SamplingParams(n=0)


def test_the_shared_helpers_pad_restore_modes_and_derive_seeds():
    from closedloop.generate import derived_seed, eval_mode, pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    training, frozen = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1).eval()
    with pytest.raises(RuntimeError), eval_mode(training, frozen):
        assert not training.training and not frozen.training
        raise RuntimeError("a failure inside the block")
    assert training.training and not frozen.training  # each back in its own mode, after an error too
    # the values every sampling stage has drawn with (changing them would change every output)
    assert [derived_seed(0, 3), derived_seed(2, 5)] == [3, 2_000_011]
