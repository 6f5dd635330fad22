"""RLHF's recipe pieces: ranked pairs (all C(K,2), ties dropped, kept together), the held-out split,
the reward model trained in order, the RM as a TRL reward, and LLaMA 2's rejection sampling as a
configuration of the RFT unit (best-of-N by the reward model)."""

from __future__ import annotations

import json
import os
import subprocess
from itertools import combinations

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

from closedloop.feedback.reward_model import conversational_pairs
from closedloop.methods import rlhf, spct
from conftest import copy_project, project_env


def _samples(scores_by_prompt: dict[str, list[float]]) -> list[dict]:
    return [{"key": k, "prompt": f"prompt {k}", "response": f"{k} answer {i}", "sample_idx": i, "score": s}
            for k, scores in scores_by_prompt.items() for i, s in enumerate(scores)]


def test_ranked_pairs_keep_every_ordered_pair_and_drop_ties():
    samples = _samples({"a": [0.0, 1.0, 0.5, 1.0], "b": [0.5, 0.5]})
    samples.append({**samples[0], "sample_idx": 9})  # a duplicate response counts once
    pairs = rlhf.ranked_pairs(samples)
    a = [p for p in pairs if p["group"] == "a"]
    # 4 distinct responses: C(4,2) = 6 pairs, minus the tie (1.0, 1.0)
    assert len(a) == 5 and not [p for p in pairs if p["group"] == "b"]
    scores = {f"a answer {i}": s for i, s in enumerate([0.0, 1.0, 0.5, 1.0])}
    assert all(scores[p["chosen"]] > scores[p["rejected"]] for p in a)
    assert {(p["chosen"], p["rejected"]) for p in a} == {
        (x, y) if scores[x] > scores[y] else (y, x) for x, y in combinations(scores, 2) if scores[x] != scores[y]}
    assert all(p["margin"] == scores[p["chosen"]] - scores[p["rejected"]] for p in a)


def test_split_holds_out_whole_prompts_and_keeps_a_prompts_pairs_side_by_side():
    pairs = rlhf.ranked_pairs(_samples({k: [0.0, 0.5, 1.0] for k in "abcdefgh"}))
    train, held = rlhf.split_pairs(pairs, 0.25, max_pairs=100, seed=3)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held})
    assert len({p["prompt"] for p in held}) == 2 and len(train) + len(held) == len(pairs)
    groups = [p["group"] for p in train]
    assert all(groups.index(g) + groups.count(g) - 1 == max(i for i, x in enumerate(groups) if x == g)
               for g in set(groups))  # each group is one contiguous run
    capped, _ = rlhf.split_pairs(pairs, 0.25, max_pairs=7, seed=3)
    assert len(capped) == 6  # whole prompts only: two of three pairs each, not a cut group
    assert rlhf.split_pairs(pairs, 0.25, 100, seed=3) == (train, held)  # seeded


def test_pairs_from_examples_and_the_metrics():
    ex = [{"key": "x", "prompt": "q", "responses": ["bad", "good", "worse"], "best": 1},
          {"key": "y", "prompt": "q2", "responses": ["only"], "best": None, "score": 7}]
    pairs = spct.preference_pairs(ex)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good", "bad"), ("good", "worse")]
    assert rlhf.pairwise_accuracy([2.0, 1.0, 0.0], [1.0, 1.0, 3.0]) == pytest.approx(0.5)
    assert (rlhf.win(1.0, 0.0), rlhf.win(0.0, 0.0), rlhf.win(-1.0, 0.0)) == (1.0, 0.5, 0.0)
    rows = conversational_pairs(pairs, max_chars=3)
    assert rows[0] == {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "goo"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]}


def test_reward_model_trained_in_order_uses_a_sequential_sampler(tmp_path, tiny_model_dir, monkeypatch):
    """in_order=True: the Trainer's sampler is sequential, so one prompt's pairs train together."""
    import trl
    from torch.utils.data import SequentialSampler

    from closedloop.config import LoraParams, RewardParams
    from closedloop.feedback.reward_model import train_reward_model

    samplers = []
    real = trl.RewardTrainer._get_train_sampler

    def spy(self, *args, **kwargs):
        samplers.append(real(self, *args, **kwargs))
        return samplers[-1]

    monkeypatch.setattr(trl.RewardTrainer, "_get_train_sampler", spy)
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]} for i in range(4)]
    p = RewardParams(batch_size=2, lora=LoraParams(r=2, alpha=4))
    m = train_reward_model(tiny_model_dir, pairs, tmp_path / "rm", p, seed=0, in_order=True)
    assert m["train_pairs"] == 4 and (tmp_path / "rm" / "model.safetensors").is_file()
    assert samplers and all(isinstance(x, SequentialSampler) for x in samplers)
    train_reward_model(tiny_model_dir, pairs, tmp_path / "rm2", p, seed=0)  # SPCT's: shuffled
    assert not isinstance(samplers[-1], SequentialSampler)


def test_rejection_sampling_is_rft_with_the_reward_model_verifier(tmp_path, tiny_model_dir, prefect_home):
    """LLaMA 2's rejection sampling: best-of-N by the reward model, SFT on the winners. It is the RFT
    unit configured with `rft.verifier: reward_model` (no copy of RFT): its verify stage keeps, per
    prompt, the sample the reward model scores highest."""
    from closedloop.feedback.reward_model import load_reward_model, reward_scores

    tok, rm = load_reward_model(tiny_model_dir)  # a reward model checkpoint: the score head saved with it
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    root = copy_project(tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["rft"] |= {"verifier": "reward_model", "verifier_args": {"model": str(tmp_path / "rm")},  # replaces {mode}
                      "threshold": 1e-9, "max_per_prompt": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    samples = [{"key": k, "prompt": f"write about {k}", "instruction_id_list": [], "kwargs": [], "sample_idx": i,
                "response": r, "num_tokens": 3, "finish_reason": "stop"}
               for k in ("sea", "sky") for i, r in enumerate(["the sea and the sky", "red green blue", "two plus two"])]
    (root / "data/rft").mkdir(parents=True)
    (root / "data/rft/samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    proc = subprocess.run(["closedloop", "stage", "rft_verify"], cwd=root, env=project_env(root, prefect_home),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = {r["key"]: r["response"] for r in map(json.loads, (root / "data/rft/sft.jsonl").read_text().splitlines())}
    tok, rm = load_reward_model(tmp_path / "rm")
    for k in ("sea", "sky"):
        mine = [s for s in samples if s["key"] == k]
        r = reward_scores(rm, tok, [s["prompt"] for s in mine], [s["response"] for s in mine])
        assert len(set(r)) == len(r)  # no tie: the best is well defined
        assert kept[k] == mine[max(range(len(mine)), key=r.__getitem__)]["response"]


def test_the_reward_model_verifier_scores_what_its_model_was_trained_on(tmp_path, tiny_model_dir):
    """SPCT's scalar RM learns from responses cut to spct.data.max_chars; its best-of-N scores them
    cut the same way (max_chars), not whole."""
    from closedloop.feedback.reward_model import load_reward_model, reward_scores
    from closedloop.verifiers import get_verifier

    tok, rm = load_reward_model(tiny_model_dir)
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    long = "the sea and the sky " * 6
    samples = [{"prompt": "write about the sea", "response": r} for r in (long, "red green blue")]
    cut = get_verifier("reward_model", model=str(tmp_path / "rm"), max_chars=20).verify_batch(samples)
    whole = get_verifier("reward_model", model=str(tmp_path / "rm")).verify_batch(samples)
    tok, rm = load_reward_model(tmp_path / "rm")
    expected = reward_scores(rm, tok, [s["prompt"] for s in samples], [s["response"][:20] for s in samples])
    assert [v.details["reward"] for v in cut] == pytest.approx(expected, abs=1e-5)
    assert cut[0].details["reward"] != pytest.approx(whole[0].details["reward"], abs=1e-5)  # the cut matters
    assert cut[1].details["reward"] == pytest.approx(whole[1].details["reward"], abs=1e-5)  # a short one is whole
