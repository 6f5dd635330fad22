"""Proxy tuning's decoding (engine/proxy.py): the logit arithmetic against direct forwards, the
identities it must satisfy, per-model prompt views, vocabularies, determinism; the small-pair
derivation and gap closed (methods/proxy.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from closedloop.engine.proxy import check_vocabularies, proxy_backend, proxy_combine
from closedloop.errors import UserError
from closedloop.backends import make_backend
from closedloop.generate import SamplingParams, encode_prompt, raw_prompt
from tiny_model import make_tiny_model_and_tokenizer

PROMPTS = ["the quick brown fox", [{"role": "user", "content": "what is two plus two ?"}],
           [{"role": "user", "content": "write a short poem about the sea and the sky"}], "what is"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def trio():
    (base, tok), (expert, _), (anti, _) = (make_tiny_model_and_tokenizer(seed=s) for s in (0, 1, 2))
    return base, expert, anti, tok


def _texts(backend, prompts=PROMPTS, params=GREEDY):
    return [[c.text for c in comps] for comps in backend.generate(prompts, params)]


def test_expert_equal_to_anti_expert_gives_the_base_for_any_alpha(trio):
    base, expert, _, tok = trio
    plain = _texts(make_backend("engine", base, tok, batch_size=3, show_progress=False))
    for alpha in (0.5, 1.0, 3.0):
        proxy = make_backend("proxy", [base, expert, expert], tok, alphas=[alpha], batch_size=3, show_progress=False)
        assert _texts(proxy) == plain


def test_base_equal_to_anti_expert_at_alpha_one_gives_the_expert(trio):
    base, expert, _, tok = trio
    plain = _texts(make_backend("engine", expert, tok, batch_size=3, show_progress=False))
    proxy = make_backend("proxy", [base, expert, base], tok, alphas=[1.0], batch_size=3, show_progress=False)
    assert _texts(proxy) == plain


def test_an_alpha_sweep_in_one_batch_equals_each_alpha_decoded_alone(trio):
    """per_prompt: the prompts repeated once per alpha, each copy combined with its own alpha, in
    one call; greedy, each copy's text is that alpha's own decode."""
    base, expert, anti, tok = trio
    alphas = [0.0, 0.7, 2.5]
    alone = [_texts(make_backend("proxy", [base, expert, anti], tok, alphas=[a], batch_size=3, show_progress=False))
             for a in alphas]
    swept = make_backend("proxy", [base, expert, anti], tok, alphas=[0.0], batch_size=5, show_progress=False,
                         per_prompt=[[a] for a in alphas for _ in PROMPTS])
    got = _texts(swept, PROMPTS * len(alphas))
    assert [got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] for i in range(len(alphas))] == alone
    assert alone[0] != alone[2]  # the alphas really steer differently
    with pytest.raises(UserError, match="per-prompt alphas need 1"):
        proxy_combine([1.0], per_prompt=[[1.0, 2.0]])


def test_combined_logits_equal_three_direct_forwards_with_per_model_views(trio):
    """Base and anti-expert see the raw prompt, the expert its chat template (different lengths,
    left padding, one cache each); every step's combined logits equal a direct computation from
    three uncached forwards over each model's own view, within 1e-5."""
    base, expert, anti, tok = trio
    alpha, steps = 0.8, 5
    templates = [False, True, False]
    seen = []
    combine = proxy_combine([alpha])

    def spy(logits, prompts):
        out = combine(logits, prompts)
        seen.append(out.clone())
        return out

    from closedloop.engine import EngineBackend

    eng = EngineBackend([base, expert, anti], tok, batch_size=2, combine=spy, templates=templates, show_progress=False)
    got = eng.generate(PROMPTS[1:3], SamplingParams(temperature=0.0, max_new_tokens=steps))
    stops = eng.stop_ids
    worst = 0.0
    with torch.inference_mode():
        for prompt, comps in zip(PROMPTS[1:3], got):
            views = [encode_prompt(tok, prompt if t else raw_prompt(prompt)) for t in templates]
            assert len({len(v) for v in views}) > 1  # the views really differ in length
            new: list[int] = []
            for _ in range(steps):
                per_model = [m(input_ids=torch.tensor([v + new])).logits[0, -1].float()
                             for m, v in zip((base, expert, anti), views)]
                direct = per_model[0] + alpha * (per_model[1] - per_model[2])
                # the engine's combined row for this step is one of the rows it saw: find the closest
                worst = max(worst, min(float((row - direct).abs().max()) for s in seen for row in s))
                new.append(int(direct.argmax()))
                if new[-1] in stops:
                    new.pop()
                    break
            assert comps[0].text == tok.decode(new, skip_special_tokens=True).rstrip()
    assert worst < 1e-5


def test_padded_vocabulary_is_cut_and_a_different_one_is_refused(trio):
    base, expert, anti, tok = trio
    wide = torch.nn.Linear(anti.lm_head.in_features, anti.lm_head.out_features + 7, bias=False)
    with torch.no_grad():
        wide.weight[: anti.lm_head.out_features] = anti.lm_head.weight
    padded = make_tiny_model_and_tokenizer(seed=2)[0]
    padded.lm_head = wide
    a = _texts(make_backend("proxy", [base, expert, anti], tok, alphas=[1.0], batch_size=2, show_progress=False))
    b = _texts(make_backend("proxy", [base, expert, padded], tok, alphas=[1.0], batch_size=2, show_progress=False))
    assert a == b  # the 7 padding rows are cut off before the arithmetic
    check_vocabularies(["base", "expert", "anti"], [tok, tok, tok], [base, expert, padded])

    class Other:
        def get_vocab(self):
            return {**tok.get_vocab(), "extra-token": 10_000}

    with pytest.raises(UserError, match="expert's tokenizer differs from base's"):
        check_vocabularies(["base", "expert"], [tok, Other()], [base, expert])
    short = make_tiny_model_and_tokenizer(seed=3)[0]
    short.lm_head = torch.nn.Linear(short.lm_head.in_features, 5, bias=False)
    with pytest.raises(UserError, match="output rows"):
        check_vocabularies(["base", "anti"], [tok, tok], [base, short])
    with pytest.raises(UserError, match="pair per alpha"):
        proxy_backend([base, expert], tok, alphas=[1.0])


def test_sampled_proxy_decoding_is_deterministic_by_seed(trio):
    base, expert, anti, tok = trio
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)

    def run(seed):
        backend = proxy_backend([base, expert, anti], tok, alphas=[0.5], templates=[False, True, False], batch_size=3,
                                show_progress=False)
        return _texts(backend, params=SamplingParams(**{**params.__dict__, "seed": seed}))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_raw_prompt_renders_messages_without_a_template():
    assert raw_prompt("as is") == "as is"
    assert raw_prompt([{"role": "user", "content": "q"}]) == "q\n"
    assert raw_prompt([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A:"}]) == "q\nA:"


def test_small_model_keeps_the_most_influential_layers_with_their_weights(trio):
    from closedloop.methods.proxy import block_influence, derive_small, most_influential

    base, _, _, tok = trio
    enc = tok(["the quick brown fox", "what is two plus two"], return_tensors="pt", padding=True)
    influence = block_influence(base, enc["input_ids"], enc["attention_mask"])
    assert len(influence) == base.config.num_hidden_layers and all(-1e-6 <= x <= 2.0 for x in influence)
    assert most_influential([0.1, 0.9, 0.05, 0.5], 2) == [1, 3]  # model order, not influence order
    assert most_influential([0.2, 0.2, 0.2], 1) == [0]  # ties: the earlier layer
    with pytest.raises(UserError, match=r"params.yaml: proxy.small.layers: expected 1 to 2"):
        most_influential(influence, len(influence) + 1)
    keep = most_influential(influence, 1)
    small = derive_small(base, keep)
    assert small.config.num_hidden_layers == 1
    assert torch.equal(small.model.layers[0].mlp.down_proj.weight, base.model.layers[keep[0]].mlp.down_proj.weight)
    assert torch.equal(small.lm_head.weight, base.lm_head.weight)


def test_gap_closed_interval_is_fiellers_and_unbounded_when_the_tuned_gain_is_unclear():
    import numpy as np

    from closedloop.methods.proxy import gap_closed

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float)
    tuned = np.maximum(base, rng.random(400) < 0.4)  # a clear gain: about 0.2
    proxy = np.where(rng.random(400) < 0.5, tuned, base)  # about half of it
    gap = gap_closed(base, tuned, proxy)
    assert gap["bounded"] == 1.0 and gap["ci_low"] < gap["value"] < gap["ci_high"]
    assert gap["value"] == pytest.approx((proxy - base).mean() / (tuned - base).mean())
    # at the set's ends the paired difference's mean is exactly t standard errors from 0
    t_quantile = 1.965927  # Student's t, 399 degrees of freedom, 0.975
    for r in (gap["ci_low"], gap["ci_high"]):
        d = (proxy - base) - r * (tuned - base)
        assert abs(d.mean()) / (d.std(ddof=1) / np.sqrt(len(d))) == pytest.approx(t_quantile, rel=1e-5)
    # the proxy equal to the tuned model on every example: exactly 1, the set shrinks to it
    same = gap_closed(base, tuned, tuned)
    assert same["bounded"] == 1.0 and same["ci_low"] == pytest.approx(1.0) == same["ci_high"]
    assert gap_closed([0.0], [1.0], [1.0])["bounded"] == 0.0  # one example: no standard error
    # two prompts of tuned gain in 48: no ratio is ruled out (a bootstrap that drops the zero-gain
    # resamples reported [-200%, 300%] here)
    base, tuned = np.zeros(48), np.zeros(48)
    tuned[:2] = 1.0
    proxy = tuned.copy()
    small = gap_closed(base, tuned, proxy)
    assert small["value"] == 1.0 and small["bounded"] == 0.0
    assert small["ci_low"] == -np.inf and small["ci_high"] == np.inf
    assert gap_closed(base, base, proxy)["defined"] == 0.0
