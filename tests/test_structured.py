"""Scaffolded generation (headers by construction, per-segment limits and stops) on both backends."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from closedloop.engine import EngineBackend
from closedloop.errors import UserError
from closedloop.generate import SamplingParams, render_prompt
from closedloop.hf_backend import HFBackend
from closedloop.structured import Segment, continue_prompt, generate_scaffold

from tiny_model import make_tiny_model_and_tokenizer

PROMPTS = ["the quick brown fox", [{"role": "user", "content": "what is two plus two ?"}], "what is"]
BACKENDS = {"engine": EngineBackend, "hf": HFBackend}


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model_and_tokenizer()


def _no_eos(model, tok) -> None:
    """Suppress every stop token, so that each segment runs to its own token limit."""
    head = model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        for i in EngineBackend(model, tok, show_progress=False).stop_ids:
            new.bias[i] = -1e4
    model.lm_head = new


@pytest.mark.parametrize("name", BACKENDS)
def test_format_holds_and_segment_limits(name):
    model, tok = make_tiny_model_and_tokenizer()
    _no_eos(model, tok)
    backend = BACKENDS[name](model, tok, batch_size=4, show_progress=False)
    segs = [Segment("Critique:", 3), Segment("Refined response:", 5), Segment("Score:", 1)]
    out = generate_scaffold(backend, PROMPTS, segs, SamplingParams(n=3, temperature=1.0, max_new_tokens=99, seed=3))
    assert [len(o) for o in out] == [3, 3, 3]
    for outs in out:
        for o in outs:
            assert o.text == "Critique:" + o.text[len("Critique:"):]
            assert o.text.index("\nRefined response:") < o.text.index("\nScore:")
            assert o.finish_reasons == ["length"] * 3 and o.num_tokens == 3 + 5 + 1
            # at most one word per token (special tokens such as <pad> decode to nothing)
            assert all(len(s.split()) <= n for s, n in zip(o.segments, (3, 5, 1)))
        assert len({o.segments[0] for o in outs}) > 1  # the n samples branched at segment 1


@pytest.mark.parametrize("name", BACKENDS)
def test_each_branch_continues_its_own_text(tiny, name):
    model, tok = tiny
    backend = BACKENDS[name](model, tok, batch_size=4, show_progress=False)
    segs = [Segment("Critique:", 4), Segment("Refined response:", 4)]
    out = generate_scaffold(backend, PROMPTS[:2], segs, SamplingParams(n=2, temperature=0.0, max_new_tokens=1))
    for prompt, outs in zip(PROMPTS[:2], out):
        o = outs[0]
        # Segment 2 is exactly what the model writes after the prompt + its own segment 1 + header 2.
        first = backend.generate([continue_prompt(prompt, "Critique:")],
                                 SamplingParams(temperature=0.0, max_new_tokens=4, stop=("Refined response:",)))[0][0]
        assert o.segments[0] == first.text.strip()
        so_far = "Critique:" + first.text + "\nRefined response:"
        second = backend.generate([continue_prompt(prompt, so_far)], SamplingParams(temperature=0.0, max_new_tokens=4))
        assert o.segments[1] == second[0][0].text.strip()
        assert o.text == so_far + second[0][0].text
        assert outs[1] == o  # greedy: the n copies agree


@pytest.mark.parametrize("name", BACKENDS)
def test_segment_ends_at_stop_string_split_across_tokens(tiny, name):
    model, tok = tiny
    backend = BACKENDS[name](model, tok, show_progress=False)
    prompt = PROMPTS[0]
    free = backend.generate([continue_prompt(prompt, "A:")], SamplingParams(temperature=0.0, max_new_tokens=10))[0][0]
    words = free.text.split()
    header = words[1][-1] + " " + words[2][:2]  # the next header, spanning two tokens of what the model writes
    segs = [Segment("A:", 10), Segment(header, 3)]
    o = generate_scaffold(backend, [prompt], segs, SamplingParams(temperature=0.0, max_new_tokens=1))[0][0]
    cut = free.text[: free.text.index(header)].strip()
    assert o.segments[0] == cut and o.finish_reasons[0] == "stop"
    so_far = "A:" + free.text[: free.text.index(header)].rstrip() + "\n" + header
    assert o.text.startswith(so_far)
    # Segment 2 continues exactly that text: on the engine the tokens past the cut left the cache
    # (masked, positions rewound) and the rest of the text and the header were fed in their place.
    after = backend.generate([continue_prompt(prompt, so_far)], SamplingParams(temperature=0.0, max_new_tokens=3))
    assert o.segments[1] == after[0][0].text.strip()


def test_engine_scaffold_prefills_each_distinct_prompt_once(tiny):
    """The engine writes every segment in one loop (the text so far is never re-encoded), and equal
    prompts in one call share a prefill."""
    model, tok = tiny
    segs = [Segment("Critique:", 4), Segment("Refined response:", 4), Segment("Score:", 2)]
    prompts = [PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    engine = EngineBackend(model, tok, batch_size=8, show_progress=False)
    out = generate_scaffold(engine, prompts, segs, SamplingParams(n=2, temperature=1.0, max_new_tokens=1, seed=1))
    assert [len(o) for o in out] == [2, 2, 2]
    assert len({o.text for outs in out[:2] for o in outs}) > 1  # duplicates are separate samples
    widest = max(len(tok.encode(render_prompt(tok, continue_prompt(p, "Critique:")), add_special_tokens=False))
                 for p in prompts)
    assert engine.stats["prefill_tokens"] <= 2 * widest  # two distinct prompts, one padded prefill
    hf = HFBackend(model, tok, batch_size=8, show_progress=False)
    generate_scaffold(hf, prompts, segs, SamplingParams(n=2, temperature=1.0, max_new_tokens=1, seed=1))
    assert hf.stats["prefill_tokens"] > 3 * engine.stats["prefill_tokens"]  # re-encoded per segment


def test_prefill_rendering_and_validation(tiny):
    _, tok = tiny
    chat = continue_prompt([{"role": "user", "content": "hi"}], "Critique:")
    assert render_prompt(tok, chat).endswith("<|im_start|>assistant\nCritique:")
    assert continue_prompt("raw ", "Critique:") == "raw Critique:"
    with pytest.raises(UserError, match="per Segment"):
        generate_scaffold(None, ["x"], [Segment("A:", 2)], SamplingParams(stop=("x",)))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="stop strings"):
        SamplingParams(stop=("",))
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]
