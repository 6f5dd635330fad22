"""The project's PPO trainer: its loss pieces on hand-computed values, the rollout layout (left-padded
prompts, right-padded responses, the score on the EOS), temperature-consistent log-probs, an exact
ratio of 1 before the first update (dropout configured on), determinism, and a tiny model that
learns a programmatic reward with its KL to the reference bounded."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from closedloop.config import LoraParams, build_section
from closedloop.errors import UserError
from closedloop.feedback import ppo
from closedloop.feedback.ppo import (PPOParams, build_batch, gae, kl_estimate, logprobs_from_logits,
                                     penalise_missing_eos, per_token_rewards, policy_loss, response_logprobs,
                                     response_values, train_ppo, value_loss, whiten)
from tiny_model import make_tiny_model_and_tokenizer, save_tiny_model

EOS = 2  # the tiny tokenizer's <|endoftext|>
PAD = 1
PROMPTS = [[{"role": "user", "content": q}] for q in
           ["what is two plus two ?", "please list three colors", "write a short poem about the sea",
            "is the claim true or false ?"]]
TARGET = "blue"
ALL_LINEAR_AND_HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def target_fraction(prompts, responses):
    """The programmatic reward: the share of a response's words that are TARGET."""
    return [r.split().count(TARGET) / max(1, len(r.split())) for r in responses]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny checkpoint with the plain word-level tokenizer (no digits): the learning test's
    settings were checked on it across seeds 0-5."""
    return save_tiny_model(tmp_path_factory.mktemp("ppo-tiny") / "model", split_digits=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation (and on a busy 2-core machine OpenMP's
    # spin-waits make every op ~50x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def m(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- pure functions


def test_gae_and_returns_by_hand():
    rewards = t([0.0, 0.0, 1.0], [0.1, 2.0, 5.0])  # row 2's third token is padding: its 5.0 and 9.0 are ignored
    values = t([0.5, 0.2, 0.4], [1.0, 0.5, 9.0])
    mask = m([1, 1, 1], [1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # gamma 1: row 1  d2 = 1 - 0.4 = 0.6; d1 = 0.4 - 0.2 = 0.2, A1 = 0.2 + 0.95 * 0.6 = 0.77;
    #                 d0 = 0.2 - 0.5 = -0.3, A0 = -0.3 + 0.95 * 0.77 = 0.4315
    #          row 2  d1 = 2 - 0.5 = 1.5; d0 = 0.1 + 0.5 - 1 = -0.4, A0 = -0.4 + 0.95 * 1.5 = 1.025
    assert torch.allclose(adv, t([0.4315, 0.77, 0.6], [1.025, 1.5, 0.0]), atol=1e-6)
    assert torch.allclose(ret, t([0.9315, 0.97, 1.0], [2.025, 2.0, 0.0]), atol=1e-6)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # gamma 0.9, gamma * lam = 0.855:
    #   row 1  A2 = 0.6; d1 = 0.9 * 0.4 - 0.2 = 0.16, A1 = 0.16 + 0.855 * 0.6 = 0.673;
    #          d0 = 0.9 * 0.2 - 0.5 = -0.32, A0 = -0.32 + 0.855 * 0.673 = 0.255415
    #   row 2  A1 = 1.5; d0 = 0.1 + 0.9 * 0.5 - 1 = -0.45, A0 = -0.45 + 0.855 * 1.5 = 0.8325
    assert torch.allclose(adv, t([0.255415, 0.673, 0.6], [0.8325, 1.5, 0.0]), atol=1e-6)
    assert torch.allclose(ret, t([0.755415, 0.873, 1.0], [1.8325, 2.0, 0.0]), atol=1e-6)


def test_policy_loss_clips_where_the_ratio_leaves_the_trust_region():
    old = t([0.0, 0.0, 0.0])
    new = torch.tensor([[math.log(1.5), math.log(0.5), 3.0]], requires_grad=True)  # third token masked
    mask = m([1, 1, 0])
    loss, clip_frac, approx_kl = policy_loss(new, old, t([1.0, 1.0, 100.0]), mask, clip=0.2)
    # A = 1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped binds); ratio 0.5 -> max(-0.5, -0.8) = -0.5
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert clip_frac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    loss.backward()
    # The clipped token passes no gradient; the other one d/dlogp (-A r) / 2 = -0.5 / 2.
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.25, 0.0])
    # A = -1: now the ratio 0.5 token is clipped (max(0.5, 0.8) = 0.8), the 1.5 one is not (1.5 > 1.2).
    loss, clip_frac, _ = policy_loss(new.detach(), old, t([-1.0, -1.0, 100.0]), mask, clip=0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2) and clip_frac.item() == pytest.approx(0.5)
    # Inside the region nothing is clipped and the loss is -A r.
    loss, clip_frac, approx_kl = policy_loss(t([math.log(1.1)]), t([0.0]), t([2.0]), m([1]), clip=0.2)
    assert loss.item() == pytest.approx(-2.2) and clip_frac.item() == 0.0 and approx_kl.item() > 0


def test_value_loss_clips_around_the_rollout_values():
    old, returns, mask = t([0.0, 0.0, 0.0]), t([1.0, -1.0, 50.0]), m([1, 1, 0])
    new = t([0.5, 0.1, -50.0])
    loss, clip_frac = value_loss(new, old, returns, mask, clip_value=0.2)
    # token 0: v 0.5 -> clipped 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clip binds); token 1: 0.1 in range: 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clip_frac.item() == pytest.approx(0.5)
    loss, clip_frac = value_loss(t([0.1]), t([0.0]), t([1.0]), m([1]), clip_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81) and clip_frac.item() == 0.0


def test_kl_estimators_values_signs_and_expectation():
    logp = torch.log(t([0.5, 0.25, 0.3]))
    ref = torch.log(t([0.25, 0.5, 0.3]))
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    assert k1.tolist()[0] == pytest.approx([math.log(2), -math.log(2), 0.0], abs=1e-6)  # k1 goes negative
    # r = p_ref / p = 0.5, 2, 1: (r - 1) - log r
    assert k3.tolist()[0] == pytest.approx([-0.5 + math.log(2), 1 - math.log(2), 0.0], abs=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_estimate(a, b, "k3") >= 0).all() and (kl_estimate(a, b, "k1") < 0).any()
    assert kl_estimate(a, a, "k1").abs().max() == 0 and kl_estimate(a, a, "k3").abs().max() == 0
    # Both are unbiased: their expectation under the policy is KL(p || p_ref).
    p, q = t(0.1, 0.2, 0.3, 0.4), t(0.4, 0.3, 0.2, 0.1)
    kl = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        assert (p * kl_estimate(p.log(), q.log(), est)).sum().item() == pytest.approx(kl.item(), abs=1e-6)
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(a, b, "k2")


def test_whiten_uses_only_masked_entries():
    x, mask = t([2.0, 4.0, 6.0, 100.0]), m([1, 1, 1, 0])
    # mean 4, unbiased variance (4 + 0 + 4) / 2 = 4
    assert whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([3.0, 4.0, 5.0, 0.0], abs=1e-6)


def test_score_lands_on_the_eos_with_left_padded_prompts_and_right_padded_responses():
    batch = build_batch([[5, 6, 7], [8]], [[10, 11, EOS], [12, EOS]], PAD, [EOS, 4])
    assert batch.input_ids.tolist() == [[5, 6, 7, 10, 11, EOS], [PAD, PAD, 8, 12, EOS, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert batch.position_ids.tolist()[1][2:5] == [0, 1, 2]  # real tokens count from 0 after the left pads
    assert batch.eos_index.tolist() == [2, 1] and batch.has_eos.tolist() == [True, True]
    assert batch.mask.tolist() == [[True, True, True], [True, True, False]]
    kl = torch.ones(2, 3)
    rewards = per_token_rewards(t(1.0, 2.0), kl, batch.eos_index, kl_coef=0.1)
    assert torch.allclose(rewards, t([-0.1, -0.1, 0.9], [-0.1, 1.9, 0.0]))  # on the EOS, not one slot after it


def test_missing_eos_is_penalised_and_scored_on_the_last_token():
    batch = build_batch([[5], [6, 7]], [[10, 11, 12], [13, EOS]], PAD, [EOS])
    assert batch.has_eos.tolist() == [False, True] and batch.eos_index.tolist() == [2, 1]
    scores = penalise_missing_eos(t(1.0, 2.0), batch.has_eos, 0.5)
    assert scores.tolist() == [0.5, 2.0]  # TRL 0.19: score - penalty
    assert penalise_missing_eos(t(1.0, 2.0), batch.has_eos, None).tolist() == [1.0, 2.0]
    rewards = per_token_rewards(scores, torch.zeros(2, 3), batch.eos_index, kl_coef=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 0.5], [0.0, 2.0, 0.0]]


def test_pad_id_is_never_a_stop_token():
    from closedloop.generate import stop_token_ids

    model, tok = make_tiny_model_and_tokenizer()
    stops = stop_token_ids(model, tok)
    assert ppo.pad_token_id(tok, stops) == PAD
    tok.pad_token = tok.eos_token  # as SmolLM2 (and load_for_training without a pad token) have it
    pad = ppo.pad_token_id(tok, stops)
    assert pad not in stops and pad == tok.unk_token_id


def test_recomputed_logprobs_are_the_sampling_distribution():
    """The engine samples by inverse CDF from one uniform per row: over a fine grid of uniforms each
    token's share of the grid is its sampling probability, which the log-probs must give back."""
    from closedloop.engine import sample_next

    logits = t(2.0, 1.0, 0.5, -1.0, 0.0)
    n = 200_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = sample_next(logits.expand(n, 5), 0.7, 1.0, u)
    freq = torch.bincount(picks, minlength=5).double() / n
    probs = logprobs_from_logits(logits.expand(5, 5), torch.arange(5), 0.7).exp().double()
    assert torch.allclose(freq, probs, atol=1e-4)
    # At another temperature they would not match: the test tells them apart.
    assert (logprobs_from_logits(logits.expand(5, 5), torch.arange(5), 1.0).exp().double() - freq).abs().max() > 0.02


def test_padded_batch_forward_equals_each_sequence_alone():
    """Explicit position ids and masks: a left-padded batch gives each response the log-probs and
    values of its own unpadded forward."""
    from transformers import LlamaForSequenceClassification

    model, tok = make_tiny_model_and_tokenizer()
    torch.manual_seed(0)
    critic = LlamaForSequenceClassification(model.config).eval()
    prompts, responses = [[3, 9, 10, 11, 12], [3, 13]], [[14, 15, EOS], [16, 17, 18, 19]]
    batch = build_batch(prompts, responses, PAD, [EOS])
    with torch.no_grad():
        logp, _ = response_logprobs(model, batch, 0.7)
        values = response_values(critic, batch)
        for i, (q, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([q + r])
            logits = model(input_ids=ids).logits[0, len(q) - 1: -1]
            alone = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(logp[i, : len(r)], alone, atol=1e-5)
            hidden = critic.model(input_ids=ids).last_hidden_state[0, len(q) - 1: -1]
            assert torch.allclose(values[i, : len(r)], critic.score(hidden).squeeze(-1), atol=1e-5)


def test_params_are_validated():
    assert PPOParams().kl_coef == 0.05 and PPOParams().rollout_batch_size == 8
    with pytest.raises(Exception, match="num_mini_batches") as e:
        PPOParams(rollout_batch_size=6, num_mini_batches=4)
    assert e.value.key == "rollout_batch_size"
    with pytest.raises(Exception, match="batch_size \\* grad_accum") as e:
        PPOParams(rollout_batch_size=8, num_mini_batches=2, batch_size=4, grad_accum=2)
    assert e.value.key == "batch_size"
    PPOParams(rollout_batch_size=8, num_mini_batches=2, batch_size=2, grad_accum=2)
    with pytest.raises(UserError, match=r"rlhf\.ppo\.kl_estimator: expected one of 'k1', 'k3', got 'k2'"):
        build_section(PPOParams, {"kl_estimator": "k2"}, "rlhf.ppo", "params.yaml")
    with pytest.raises(UserError, match=r"rlhf\.ppo\.batch_size: expected batch_size \* grad_accum"):
        build_section(PPOParams, {"batch_size": 3}, "rlhf.ppo", "params.yaml")


# ---------------------------------------------------------------------------------------------- the trainer


def _params(**kw) -> PPOParams:
    base = dict(max_steps=1, rollout_batch_size=4, num_mini_batches=1, batch_size=2, grad_accum=2, max_new_tokens=8,
                num_ppo_epochs=2, learning_rate=1e-2, temperature=0.7, lora=LoraParams(r=4, alpha=8))
    return PPOParams(**{**base, **kw})


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint with attention dropout configured on (0.5): the trainer must turn it off."""
    model, tok = make_tiny_model_and_tokenizer()
    model.config.attention_dropout = 0.5
    path = tmp_path_factory.mktemp("dropout") / "model"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_reference_equals_policy_and_first_ratio_is_one(dropout_model_dir, tmp_path):
    p = _params(lora=LoraParams(r=4, alpha=8, dropout=0.5))
    m = train_ppo(dropout_model_dir, dropout_model_dir, PROMPTS, target_fraction, tmp_path / "out", p, seed=0)
    h = m["history"][0]
    assert h["ref_max_dev"] == 0.0 and h["kl"] == 0.0  # adapter disabled == the untouched policy
    assert h["first_ratio_max_dev"] < 1e-6
    assert h["approx_kl"] > 0  # the later mini-batches did move the policy


def test_first_ratio_check_catches_dropout_left_on(dropout_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "disable_dropout", lambda model: None)
    p = _params(lora=LoraParams(r=4, alpha=8, dropout=0.5))
    m = train_ppo(dropout_model_dir, dropout_model_dir, PROMPTS, target_fraction, tmp_path / "out", p, seed=0)
    assert m["history"][0]["first_ratio_max_dev"] > 1e-3


def test_full_finetune_is_deterministic_with_every_option(tiny_model_dir, tmp_path):
    p = _params(max_steps=2, num_mini_batches=2, batch_size=1, grad_accum=2, kl_estimator="k3", whiten_rewards=True,
                missing_eos_penalty=1.0, lora=LoraParams(enabled=False))
    runs = [train_ppo(tiny_model_dir, tiny_model_dir, PROMPTS, target_fraction, tmp_path / f"out{i}", p, seed=7)
            for i in range(2)]
    def untimed(history):  # the per-step wall times are the only thing allowed to differ
        return [{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in history]

    assert untimed(runs[0]["history"]) == untimed(runs[1]["history"])
    assert runs[0]["saved"] == "full" and runs[0]["train_steps"] == 2 and runs[0]["optimizer_steps"] == 2 * 2 * 2
    h = runs[0]["history"]
    assert h[0]["kl"] == 0.0 and h[0]["first_ratio_max_dev"] < 1e-6 and h[1]["kl"] >= 0.0  # k3 >= 0
    assert all(math.isfinite(x["policy_loss"]) and math.isfinite(x["value_loss"]) for x in h)
    a, b = (load_file(tmp_path / f"out{i}" / "model.safetensors") for i in range(2))
    base = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in base) and not (tmp_path / "out0" / "adapter").exists()


def test_reward_fn_must_score_every_response(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="4 finite scores"):
        train_ppo(tiny_model_dir, tiny_model_dir, PROMPTS, lambda q, r: [0.0], tmp_path / "out", _params(), seed=0)


@pytest.fixture(scope="module")
def learned(tiny_model_dir, tmp_path_factory):
    """10 PPO steps toward writing TARGET. LoRA covers lm_head too: the random tiny model's frozen
    output layer alone cannot make one word much likelier (its logits span ~1 nat)."""
    out = tmp_path_factory.mktemp("ppo") / "out"
    p = PPOParams(max_steps=10, rollout_batch_size=16, num_mini_batches=2, batch_size=8, grad_accum=1,
                  max_new_tokens=12, temperature=1.0, learning_rate=2e-2, kl_coef=0.01,
                  lora=LoraParams(r=8, alpha=16, target_modules=ALL_LINEAR_AND_HEAD))
    seen: list[tuple[int, dict]] = []
    metrics = train_ppo(tiny_model_dir, tiny_model_dir, PROMPTS, target_fraction, out, p, seed=1,
                        on_step=lambda step, mm: seen.append((step, mm)))
    return out, metrics, seen


def _sampled_reward(model_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from closedloop.engine import EngineBackend
    from closedloop.generate import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    outs = EngineBackend(model, tok, batch_size=64, show_progress=False).generate(
        PROMPTS, SamplingParams(n=16, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=123))
    scores = [s for o in outs for s in target_fraction(None, [c.text for c in o])]
    return sum(scores) / len(scores)


def test_ppo_raises_the_reward_with_bounded_kl(learned, tiny_model_dir):
    out, m, seen = learned
    h = m["history"]
    assert [s for s, _ in seen] == list(range(1, 11)) and [x for _, x in seen] == h
    first, last = (sum(x["score"] for x in part) / 3 for part in (h[:3], h[-3:]))
    assert last > first + 0.08, [x["score"] for x in h]
    assert h[0]["kl"] == 0.0 and 0.0 < m["final_kl"] == h[-1]["kl"]
    assert max(x["kl"] for x in h) < 60.0  # summed over <= 12 tokens: the policy moved, within bounds
    assert all(x["first_ratio_max_dev"] < 1e-6 for x in h)  # every rollout is scored by the weights that made it
    for key in ("non_score_reward", "entropy", "response_length", "clip_frac", "value_loss", "policy_loss",
                "approx_kl"):
        assert all(math.isfinite(x[key]) for x in h), key
    assert h[-1]["entropy"] < h[0]["entropy"]  # the policy concentrated on TARGET
    # The saved (merged) policy samples TARGET far more often than the SFT model, same seeds.
    base, trained = _sampled_reward(tiny_model_dir), _sampled_reward(out)
    assert trained > base + 0.1, (base, trained)


def test_ppo_saves_a_merged_safetensors_policy(learned, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, m, _ = learned
    assert m["saved"] == "merged"
    assert (out / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not [f for f in out.rglob("*") if f.suffix in (".bin", ".pt", ".pkl", ".pth")]
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert set(merged.state_dict()) == set(base)  # a plain model: no LoRA keys left
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert moved and all("proj" in k or "lm_head" in k for k in moved)
    assert AutoTokenizer.from_pretrained(out).chat_template
