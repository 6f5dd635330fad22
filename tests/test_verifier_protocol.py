"""The Verifier protocol, its registry, and the IFEval verifier's threshold semantics."""

from __future__ import annotations

import dataclasses

import pytest

from closedloop.errors import UserError
from closedloop.verifiers import (
    Form,
    Granularity,
    IFEvalRuleVerifier,
    Source,
    Verdict,
    Verifier,
    get_verifier,
    list_verifiers,
    register_verifier,
)
from closedloop.verifiers import base

# 3 instructions: no_comma passes, quotation passes only loose (chatty first line), title fails.
SAMPLE = {
    "prompt": "Write a quote.",
    "instruction_id_list": ["punctuation:no_comma", "startend:quotation", "detectable_format:title"],
    "kwargs": [{}, {}, {}],
    "response": 'Here it is:\n"Stay curious and kind."',
}


def test_enums_are_strings():
    assert Form.BINARY == "binary" and Granularity.TRAJECTORY == "trajectory" and Source.PROGRAM == "program"
    assert {f.value for f in Form} == {"binary", "score", "rank", "text"}
    assert {g.value for g in Granularity} == {"trajectory", "step", "token"}
    assert {s.value for s in Source} == {"program", "model"}


def test_verdict_is_frozen_with_default_details():
    v = Verdict(passed=True, score=1.0)
    assert v.details == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.passed = False  # type: ignore[misc]
    with pytest.raises(ValueError):
        Verdict(passed=True, score=1.5)


def test_registry_builds_ifeval_verifier():
    assert "ifeval_rules" in list_verifiers()
    v = get_verifier("ifeval_rules", mode="loose", threshold=0.5)
    assert isinstance(v, IFEvalRuleVerifier) and isinstance(v, Verifier)
    assert (v.name, v.form, v.granularity, v.source) == ("ifeval_rules", Form.BINARY, Granularity.TRAJECTORY, Source.PROGRAM)
    assert (v.mode, v.threshold) == ("loose", 0.5)


def test_unknown_verifier_lists_known_names():
    with pytest.raises(UserError, match="unknown verifier 'nope'.*ifeval_rules"):
        get_verifier("nope")


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"bogus": 1}, "bogus"), ({"mode": "lenient"}, "mode"), ({"threshold": 1.5}, "threshold"), ({"threshold": "1"}, "threshold")],
)
def test_bad_constructor_args_are_user_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        get_verifier("ifeval_rules", **kwargs)


def test_register_custom_verifier(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register_verifier("length_ok")
    class LengthOk:
        name = "length_ok"
        form = Form.SCORE
        granularity = Granularity.TRAJECTORY
        source = Source.PROGRAM

        def __init__(self, max_chars: int = 10):
            self.max_chars = max_chars

        def verify(self, sample: dict) -> Verdict:
            ok = len(sample["response"]) <= self.max_chars
            return Verdict(passed=ok, score=float(ok))

        def verify_batch(self, samples: list[dict]) -> list[Verdict]:
            return base.verify_batch(self, samples)

    v = get_verifier("length_ok", max_chars=3)
    assert isinstance(v, Verifier)
    assert [x.passed for x in v.verify_batch([{"prompt": "", "response": "abc"}, {"prompt": "", "response": "abcd"}])] == [True, False]
    assert "length_ok" in list_verifiers()

    with pytest.raises(ValueError, match="already registered"):

        @register_verifier("length_ok")
        class Other(LengthOk):
            pass


def test_ifeval_verifier_threshold_semantics():
    strict_all = IFEvalRuleVerifier()
    v = strict_all.verify(SAMPLE)
    assert v.details == {"strict": [True, False, False], "loose": [True, True, False]}
    assert v.score == pytest.approx(1 / 3) and not v.passed

    assert IFEvalRuleVerifier(threshold=1 / 3).verify(SAMPLE).passed  # score >= threshold, equality passes
    assert not IFEvalRuleVerifier(threshold=0.5).verify(SAMPLE).passed
    assert IFEvalRuleVerifier(threshold=0.0).verify(SAMPLE).passed

    loose = IFEvalRuleVerifier(mode="loose", threshold=0.5).verify(SAMPLE)
    assert loose.score == pytest.approx(2 / 3) and loose.passed
    assert not IFEvalRuleVerifier(mode="loose").verify(SAMPLE).passed

    good = {**SAMPLE, "response": '"<<Title>> Stay curious."'}
    assert IFEvalRuleVerifier().verify(good) == Verdict(True, 1.0, {"strict": [True] * 3, "loose": [True] * 3})


def test_verify_batch_default_and_errors():
    v = get_verifier("ifeval_rules")
    out = v.verify_batch([SAMPLE, {**SAMPLE, "response": '"<<T>>"'}])
    assert [x.passed for x in out] == [False, True]
    with pytest.raises(UserError, match="missing field 'response'"):
        v.verify({k: x for k, x in SAMPLE.items() if k != "response"})
