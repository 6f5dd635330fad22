"""SPCT's pieces on hand-written cases and a tiny model: the GRM's score parsing and label-scored
distributions, voting with ties and shuffled orders, the rejective filters, the +1/-1 reward, the
meta-RM filter, and the reward data builders."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_model import make_tiny_model_and_tokenizer

from closedloop.errors import UserError
from closedloop.methods import spct
from closedloop.verifiers.grm import (
    Judgment,
    box_distributions,
    credit,
    grm_messages,
    judge,
    parse_scores,
    rule_reward,
    vote,
)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model_and_tokenizer(split_digits=True)


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,k,expected", [
    ("Scores: \\boxed{7,3}", 2, [7, 3]),
    ("Scores: \\boxed{ 10 , 1 }", 2, [10, 1]),
    ("quoted \\boxed{1,1} first, then Scores: \\boxed{4}", 1, [4]),  # the last box counts
    ("Scores: 7, 3", 2, None),  # no box
    ("Scores: \\boxed{7}", 2, None),  # too few
    ("Scores: \\boxed{7,3,5}", 2, None),  # too many
    ("Scores: \\boxed{0,3}", 2, None),  # below range
    ("Scores: \\boxed{11,3}", 2, None),  # above range
    ("Scores: \\boxed{7.5,3}", 2, None),  # not an integer
    ("Scores: \\boxed{seven,3}", 2, None),
    ("Scores: \\boxed{}", 1, None),
])
def test_parse_scores_counts_every_malformed_box_as_a_failure(text, k, expected):
    assert parse_scores(text, k) == expected


def test_parse_scores_never_raises_on_junk():
    assert parse_scores(None, 2) is None  # type: ignore[arg-type]
    assert parse_scores("\\boxed{", 1) is None


# ---------------------------------------------------------------------------------------------- label scoring


def _reference_dist(model, ids: list[int], digits: list[int]) -> list[float]:
    """P(score = 1..10) from full forwards, no cache: the definition box_distributions implements."""
    with torch.inference_mode():
        first = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)[digits]
        p0 = torch.softmax(model(input_ids=torch.tensor([ids + [digits[1]]])).logits[0, -1].float(), -1)[digits[0]]
    probs = torch.cat([(first[1] * (1 - p0))[None], first[2:10], (first[1] * p0)[None]])
    return (probs / probs.sum()).tolist()


ASK = {"role": "user", "content": "two plus two"}


@pytest.mark.parametrize("prompts", [
    ["scores : \\ boxed {", "red green blue scores : \\ boxed {",
     [ASK, {"role": "assistant", "content": "scores : \\ boxed {"}]],
    # one judging request, three answers: the request is prefilled once for the batch
    [[ASK, {"role": "assistant", "content": a + "scores : \\ boxed {"}] for a in ("", "red green ", "blue ")],
], ids=["distinct", "shared-prefix"])
def test_box_distributions_match_full_forwards_for_every_score(tiny, prompts):
    from closedloop.generate import encode_prompt

    model, tok = tiny
    digits = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    comma = tok.encode(",", add_special_tokens=False)
    counts = [2, 1, 3]  # different lengths, left padding, one row finishing early
    got = box_distributions(model, tok, prompts, counts, batch_size=8)
    assert [len(d) for d in got] == counts
    for prompt, count, dists in zip(prompts, counts, got):
        ids = encode_prompt(tok, prompt)
        for j in range(count):
            ref = _reference_dist(model, ids, digits)
            assert dists[j] == pytest.approx(ref, abs=1e-5)
            assert sum(dists[j]) == pytest.approx(1.0, abs=1e-6)
            best = max(range(10), key=dists[j].__getitem__) + 1  # the next score is read after this one
            ids = ids + [digits[int(c)] for c in str(best)] + comma


def test_box_distributions_refuse_a_tokenizer_that_merges_digits(tiny):
    model, _ = tiny

    class Merging:
        def encode(self, text, add_special_tokens=False):
            return [100 + int(text)] if text.isdigit() else [1]

    with pytest.raises(UserError, match="score_mode: parse"):
        box_distributions(model, Merging(), ["x"], [1])


@pytest.mark.parametrize("mode", ["labels", "parse"])
def test_judge_returns_scores_in_the_examples_order(tiny, mode):
    from closedloop.engine import EngineBackend

    model, tok = tiny
    backend = EngineBackend(model, tok, batch_size=8)
    examples = [{"prompt": "two plus two", "responses": ["it is four", "red", "blue"], "best": 0, "score": None},
                {"prompt": "a poem", "responses": ["the sea and the sky"], "best": None, "score": 7}]
    out = judge(backend, examples, n=3, temperature=0.9, top_p=1.0, principles_tokens=4, critique_tokens=4,
                principles=True, score_mode=mode, seed=0, max_chars=50)
    assert [len(per) for per in out] == [3, 3]
    for ex, per in zip(examples, out):
        for j in per:
            assert sorted(j.order) == list(range(len(ex["responses"])))
            assert "Critique:" in j.text and j.text.startswith("Principles:")
            if mode == "labels":  # label scoring never fails; each score is an expectation in [1, 10]
                assert j.scores is not None and all(1.0 <= s <= 10.0 for s in j.scores)
                assert len(j.dists) == len(ex["responses"])
                shown = parse_scores(j.text, len(ex["responses"]))  # the text carries the argmax integers
                assert shown is not None
                for pos, i in enumerate(j.order):  # shown position pos is example response i
                    assert shown[pos] == max(range(10), key=j.dists[i].__getitem__) + 1
    # three samples of the 3-response example were shown in more than one order
    assert len({tuple(j.order) for j in out[0]}) > 1


def test_engine_reads_the_box_as_a_second_prefill_does(tiny):
    """Labels mode on the engine reads each score off the generation's own KV cache (BoxReader:
    forced header, speculative "1" dropped again); on the HF backend the answer is re-encoded and
    read by box_distributions. Greedy, so both write the same text: the distributions must agree."""
    from closedloop.engine import EngineBackend
    from closedloop.hf_backend import HFBackend

    model, tok = tiny
    examples = [{"prompt": "two plus two", "responses": ["it is four", "red", "blue"], "best": 0, "score": None},
                {"prompt": "a poem", "responses": ["the sea and the sky"], "best": None, "score": 7},
                {"prompt": "red or blue", "responses": ["red", "blue"], "best": 1, "score": None}]
    kw = dict(n=2, temperature=0.0, top_p=1.0, principles_tokens=3, critique_tokens=5, principles=True,
              score_mode="labels", seed=0, max_chars=50, shuffle=False)
    engine = judge(EngineBackend(model, tok, batch_size=8, show_progress=False), examples, **kw)
    hf = judge(HFBackend(model, tok, batch_size=8, show_progress=False), examples, **kw)
    for per_e, per_h in zip(engine, hf):
        for a, b in zip(per_e, per_h):
            assert a.text == b.text and a.order == b.order
            for da, db in zip(a.dists, b.dists):
                assert da == pytest.approx(db, abs=1e-5)


def test_no_principles_ablation_drops_the_segment_and_the_request(tiny):
    from closedloop.engine import EngineBackend

    model, tok = tiny
    msg = grm_messages("q", ["a", "b"], principles=False)[0]["content"]
    assert "principles" not in msg.lower() and "\\boxed{s1, s2}" in msg
    ex = [{"prompt": "q", "responses": ["a", "b"], "best": 1, "score": None}]
    (per,) = judge(EngineBackend(model, tok, batch_size=4), ex, n=1, temperature=0.0, top_p=1.0, principles_tokens=4,
                   critique_tokens=4, principles=False, score_mode="labels", seed=0)
    assert per[0].text.startswith("Critique:") and "Principles:" not in per[0].text


# ---------------------------------------------------------------------------------------------- voting, credit, reward


def _j(scores, order=None, tokens=10, dists=None):
    order = order or list(range(len(scores) if scores else 2))
    return Judgment("", order, scores, tokens, dists)


def test_vote_sums_scores_in_the_examples_order_and_skips_failures():
    a = _j([7.0, 3.0], order=[1, 0])  # scores are already unshuffled: index = example response
    b = _j([2.0, 9.0], order=[0, 1])
    c = _j(None)
    assert vote([a, b, c]) == [9.0, 12.0]
    assert vote([c]) is None


def test_credit_counts_ties_as_a_fair_coin():
    ex = {"best": 1, "score": None}
    assert credit(ex, [3.0, 8.0]) == 1.0
    assert credit(ex, [8.0, 3.0]) == 0.0
    assert credit(ex, [5.0, 5.0]) == 0.5
    assert credit({"best": 0, "score": None}, [6.0, 6.0, 6.0]) == pytest.approx(1 / 3)
    assert credit(ex, None) == 0.0
    assert credit({"best": None, "score": 7}, [6.6]) == 1.0 and credit({"best": None, "score": 7}, [6.4]) == 0.0


def test_rule_reward_is_plus_one_only_for_a_unique_right_best():
    ex = {"best": 0, "score": None}
    assert rule_reward(ex, [9.0, 2.0]) == 1.0
    assert rule_reward(ex, [2.0, 9.0]) == -1.0
    assert rule_reward(ex, [5.0, 5.0]) == -1.0  # a tie does not say which is best
    assert rule_reward(ex, None) == -1.0  # a parse failure
    assert rule_reward({"best": None, "score": 4}, [4.0]) == 1.0
    assert rule_reward({"best": None, "score": 4}, [6.0]) == -1.0


def test_grpo_reward_parses_completions_in_the_shown_order():
    # order [1, 0]: Response 1 shown is the example's response 1, the labelled best
    texts = ["crit\nScores: \\boxed{8,2}", "Scores: \\boxed{2,8}", "no box", "Scores: \\boxed{5,5}"]
    got = spct.grpo_reward(prompts=[""] * 4, completions=texts, best=[1] * 4, score=[-1] * 4, order=[[1, 0]] * 4)
    assert got == [1.0, -1.0, -1.0, -1.0]
    assert spct.grpo_reward(prompts=[""], completions=["\\boxed{6}"], best=[-1], score=[6], order=[[0]]) == [1.0]


def test_rejective_filter_drops_too_easy_and_all_wrong_examples():
    ex = {"best": 0, "score": None}
    right, wrong = _j([8.0, 2.0]), _j([2.0, 8.0])
    assert spct.rejective_filter(ex, [right, right, right], 2) == ("too_easy", [])
    assert spct.rejective_filter(ex, [wrong, _j(None)], 2) == ("all_wrong", [])
    status, kept = spct.rejective_filter(ex, [wrong, right, right, right], 2)
    assert status == "kept" and kept == [right, right]


def test_training_text_keeps_the_judgments_ranking_after_rounding():
    j = Judgment("Principles: p\nCritique: c\nScores: \\boxed{3,3}", [1, 0], [3.2, 2.9], 5)
    text = spct.training_text(j)
    assert text.startswith("Principles: p\nCritique: c\nScores:")
    shown = parse_scores(text, 2)
    assert shown == [3, 4]  # shown order [1, 0]: the example's response 0 (3.2) must stay on top
    top = Judgment("x\nScores: \\boxed{10,10}", [0, 1], [9.8, 9.6], 5)
    assert parse_scores(spct.training_text(top), 2) == [10, 9]


def test_meta_rm_keeps_the_top_half_it_scores_highest():
    ex = {"best": 0, "score": None}
    sure_right = [_j([9.0, 1.0], dists=[[0.0] * 8 + [1.0, 0.0], [1.0] + [0.0] * 9]) for _ in range(2)]
    unsure_wrong = [_j([3.0, 7.0], dists=[[0.1] * 10, [0.1] * 10]) for _ in range(6)]
    pool = unsure_wrong + sure_right  # plain voting over 8: 2x(9,1) + 6x(3,7) = (36, 44): response 1 wins
    assert spct.voting_credit(ex, pool, 8) == 0.0
    feats = [spct.judgment_features(j) for j in pool]
    meta = spct.train_meta_rm(feats, [0.0] * 6 + [1.0] * 2, spct.MetaRMParams(), seed=0)
    assert meta["train_accuracy"] == 1.0
    scores = [spct.meta_score(meta, j) for j in pool]
    assert min(scores[6:]) > max(scores[:6])
    assert spct.voting_credit(ex, pool, 8, meta) == 1.0  # keeps the 4 it trusts most: both sure ones lead
    assert spct.voting_credit(ex, pool, 1, meta) == 0.0  # k=1 keeps its one judgment


def test_meta_rm_with_one_class_is_constant():
    meta = spct.train_meta_rm([[0.1, 0.5, 0.2, 0.3], [0.3, 0.1, 0.4, 0.2]], [1.0, 1.0], spct.MetaRMParams(), 0)
    assert meta["weights"] == [0.0] * 4


# ---------------------------------------------------------------------------------------------- data


def _sample(key, idx, response, score):
    return {"key": key, "prompt": f"prompt {key}", "response": response, "score": score, "sample_idx": idx}


def test_examples_from_samples_pairs_widest_gaps_and_drops_ties():
    samples = [_sample("a", 0, "x", 0.5), _sample("a", 1, "y", 1.0), _sample("a", 2, "z", 0.0),
               _sample("a", 3, "w", 0.0), _sample("b", 0, "p", 0.5), _sample("b", 1, "q", 0.5),  # b: all tied
               _sample("c", 0, "same", 1.0), _sample("c", 1, "same", 0.0)]  # c: one distinct text
    out = spct.examples_from_samples(samples, max_pairs_per_prompt=2, seed=0)
    assert {e["key"].rsplit("-", 1)[0] for e in out} == {"a"}
    first, second = out
    assert sorted(first["responses"]) == ["y", "z"] and first["responses"][first["best"]] == "y"
    assert sorted(second["responses"]) == ["w", "x"] and second["responses"][second["best"]] == "x"
    many = spct.examples_from_samples([_sample(str(i), j, f"r{j}", j / 2) for i in range(40) for j in range(2)], 1, 0)
    positions = [e["best"] for e in many]
    assert 0 < sum(positions) < len(positions)  # the better response is not always first


def test_pair_file_accepts_trl_and_rewardbench_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "q1", "chosen": "good", "rejected": "bad", "subset": "chat"},
            {"prompt": [{"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]},
            {"prompt": "q3", "response": "fine", "score": 6}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = spct.load_pair_file(path, "spct.data.pairs", seed=0)
    assert [e["source"] for e in out] == ["chat", "pairs", "pairs"]
    assert out[0]["responses"][out[0]["best"]] == "good" and out[1]["responses"][out[1]["best"]] == "yes"
    assert out[1]["prompt"] == "q2" and out[2]["responses"] == ["fine"] and out[2]["score"] == 6


@pytest.mark.parametrize("row,match", [
    ({"chosen": "a", "rejected": "b"}, "pairs.jsonl:2: prompt"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "pairs.jsonl:2: chosen"),
    ({"prompt": "q", "response": "r", "score": 11}, "pairs.jsonl:2: expected chosen/rejected"),
])
def test_pair_file_errors_name_the_line(tmp_path, row, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        spct.load_pair_file(path, "spct.data.pairs", seed=0)


def test_split_holds_out_whole_prompts():
    rng = random.Random(0)
    examples = [{"key": f"{p}-{i}", "prompt": f"p{p}", "responses": ["a", "b"], "best": rng.randint(0, 1),
                 "score": None} for p in range(10) for i in range(2)]
    train, evalset = spct.split_examples(examples, 0.5, 100, 100, seed=0)
    assert train and evalset and not {e["prompt"] for e in train} & {e["prompt"] for e in evalset}
    assert len(train) + len(evalset) == len(examples)


def test_grpo_trains_with_the_papers_loss_unless_told_otherwise(tmp_path):
    """TRL's GRPOConfig defaults loss_type to "dapo"; GRPO (DeepSeekMath, SPCT) averages each
    completion's token losses, then the completions: "grpo", set explicitly. RLOO has its own loss."""
    import dataclasses

    from closedloop.config import GRPOParams
    from closedloop.feedback.grpo import online_rl_config

    p = GRPOParams()
    grpo = online_rl_config("grpo", tmp_path, p, seed=0)
    assert (grpo.loss_type, grpo.beta, grpo.num_generations, grpo.epsilon) == ("grpo", 0.08, 4, 0.2)
    assert online_rl_config("grpo", tmp_path, dataclasses.replace(p, loss_type="dr_grpo"), seed=0).loss_type == "dr_grpo"
    assert type(online_rl_config("rloo", tmp_path, p, seed=0)).__name__ == "RLOOConfig"
    with pytest.raises(ValueError, match="unknown online RL algorithm 'ppo'"):
        online_rl_config("ppo", tmp_path, p, seed=0)
