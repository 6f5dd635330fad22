"""The refiner as a judge (SPaR, arXiv 2412.11605): prompts, verdict parsing, majority votes, judges.

A model judges a response k times ("votes"); the majority decides and `value` = yes-votes / k is
the score the refinement tree search gates on. The judges are registered verifiers:
`model_judge`, and `hybrid_judge` (IFEval rules where they apply, the model elsewhere); with
`ifeval_rules` (the rules as an oracle) they are chosen by name in params.

Prompts are a single user message (no system turn) because some small models' chat templates
(e.g. Gemma's) reject a system role, and the wording is short because small models follow short
instructions better.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from closedloop.errors import UserError
from closedloop.verifiers.base import Form, Granularity, Source, Verdict, Verifier, register_verifier
from closedloop.verifiers.ifeval_rules import INSTRUCTION_IDS, check

# generate_fn(list of chats, n) -> one list of n completion texts per chat.
GenerateFn = Callable[[list[list[dict]], int], list[list[str]]]

def judge_messages(prompt: str, response: str) -> list[dict]:
    """Chat asking for a compact check, one short line per constraint, ending in `Verdict: yes|no`.

    Compact so that a judgment fits a small vote cap with its verdict (the effect run samples 64
    tokens per vote): `rule_judgment_text` is the same format, which the starting refiner learns."""
    content = (
        "Does the response follow ALL constraints in the instruction?\n\n"
        f"### Instruction\n{prompt}\n\n### Response\n{response}\n\n"
        "### Task\n"
        "For each constraint write one short line: a few words naming it, then `: met` or `: not met`. "
        "Then write one final line, exactly `Verdict: yes` if the response follows every constraint, "
        "or `Verdict: no` if it breaks any."
    )
    return [{"role": "user", "content": content}]


# `verdict` as a word, then any markdown (**, __, `, #) or spaces, then a colon: `**Verdict:**`, `Verdict**:`.
_VERDICT = re.compile(r"\bverdict[\s*_`#]*:", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """The last `Verdict:` marker's yes/no; None if missing, empty, or both words on the verdict line.

    The verdict is the first non-blank line after the marker (a model may put it on the next line).
    Taking the LAST marker lets a judge quote the format ("answer Verdict: yes or no") before deciding.
    Never raises.
    """
    if not isinstance(text, str):
        return None
    marks = list(_VERDICT.finditer(text))
    if not marks:
        return None
    rest = text[marks[-1].end():]
    line = next((ln for ln in rest.splitlines() if ln.strip(" \t*_`#>")), "")
    words = {w.lower() for w in _YES_NO.findall(line)}
    if len(words) != 1:  # none, or "yes/no" echoed from the prompt
        return None
    return words == {"yes"}


def majority(votes: Sequence[bool | None]) -> tuple[bool | None, float, int]:
    """(decision, value, n_unparseable) of k votes.

    decision compares yes against no among the *parsed* votes (True if more yes, False if more no,
    None on a tie; callers drop ties), so a few garbled judgments do not flip a clear majority.
    value = yes / k over ALL k votes, so an unparseable vote counts as not-yes: the tree-search
    gate (value > 0.5) then needs a strict majority of all k votes to say yes. Empty -> (None, 0.0, 0).
    """
    k = len(votes)
    yes = sum(v is True for v in votes)
    no = sum(v is False for v in votes)
    decision = True if yes > no else False if no > yes else None
    return decision, (yes / k if k else 0.0), k - yes - no


def pick_judgment(texts: Sequence[str], decision: bool | None = False) -> str | None:
    """The first judgment text whose verdict equals `decision` (default: one explaining a failure)."""
    return next((t for t in texts if parse_verdict(t) is decision and decision is not None), None)


def refine_messages(prompt: str, response: str, judgment: str | None) -> list[dict]:
    """Chat asking for `Critique: ...` then `Refined response:` and a minimally changed, fixed response."""
    review = f"### Review of the response\n{judgment.strip()}\n\n" if judgment and judgment.strip() else ""
    content = (
        "The response below may break some constraints of the instruction.\n\n"
        f"### Instruction\n{prompt}\n\n### Response\n{response}\n\n{review}"
        "### Task\n"
        "Write `Critique:` and, briefly, which constraints the response does not meet. "
        "Then write `Refined response:` on a new line, followed by the complete improved response: "
        "fix every unmet constraint and change as little else as possible. Write nothing after it."
    )
    return [{"role": "user", "content": content}]


_REFINED = re.compile(r"[*_#`]*\s*\brefined[ \t]+response[\s*_`#]*:[ \t*_`]*\n?", re.IGNORECASE)
_CRITIQUE = re.compile(r"^[\s*_#`]*critique[\s*_`#]*:[ \t*_`]*", re.IGNORECASE)


def format_refinement(critique: str, refined: str) -> str:
    """The refiner's answer format; `parse_refinement` inverts it."""
    return f"Critique: {critique}\nRefined response: {refined}"


def parse_refinement(text: str) -> tuple[str, str] | None:
    """(critique, refined response) split at the first `Refined response:`; None if absent or empty.

    The FIRST marker, because the refined response itself may legitimately contain the phrase.
    The critique may be empty (a model that skips it still gives a usable refinement).
    """
    if not isinstance(text, str):
        return None
    m = _REFINED.search(text)
    if m is None:
        return None
    refined = text[m.end():].strip()
    if not refined:
        return None
    critique = _CRITIQUE.sub("", text[: m.start()], count=1).strip()
    return critique, refined


@dataclass(frozen=True)
class JudgeResult:
    decision: bool | None  # majority; None = tie (callers drop it)
    value: float  # yes-votes / all votes, in [0, 1]
    votes: list[bool | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # raw judgments (empty for rules)
    unparseable: int = 0
    source: str = "model"  # "model" or "rules"


def rule_checkable(sample: dict) -> bool:
    """True when every instruction of the sample has an IFEval rule checker."""
    ids = sample.get("instruction_id_list")
    return isinstance(ids, list) and bool(ids) and all(i in INSTRUCTION_IDS for i in ids)


def rule_judgment(sample: dict, explain: bool = False) -> JudgeResult:
    """IFEval strict rules as an oracle: value 1.0 or 0.0, decision = all instructions followed.
    With `explain`, one judgment text in the judge's format (`rule_judgment_text`)."""
    result = check(sample["prompt"], sample["instruction_id_list"], sample["kwargs"], sample["response"])
    ok = result.strict_all
    texts = [rule_judgment_text(sample, result.strict)] if explain else []
    return JudgeResult(decision=ok, value=float(ok), votes=[ok], texts=texts, source="rules")


def constraint_label(instruction_id: str) -> str:
    """A few words naming an IFEval instruction: `punctuation:no_comma` -> `no comma`; keywords keep
    their group (`keywords frequency`), whose bare names would be ambiguous."""
    group, name = instruction_id.split(":", 1)
    words = name.replace("_", " ")
    return f"keywords {words}" if group == "keywords" else words


def rule_judgment_text(sample: dict, followed: Sequence[bool]) -> str:
    """What a judge that knows the rules writes, in `judge_messages`' format: one line per
    constraint, met or not, then the verdict (about 5 tokens a constraint). SPaR initialises its
    refiner by SFT on a stronger judge's judgments (GPT-4o in the paper); the rules play that
    judge for that initial data only."""
    lines = [f"{constraint_label(i)}: {'met' if ok else 'not met'}"
             for i, ok in zip(sample["instruction_id_list"], followed)]
    return "\n".join([*lines, f"Verdict: {'yes' if all(followed) else 'no'}"])


def as_verdict(r: JudgeResult) -> Verdict:
    """A judgment as the one Verifier currency; votes, texts and the tie-aware decision in details."""
    return Verdict(passed=r.decision is True, score=r.value,
                   details={"decision": r.decision, "votes": list(r.votes), "texts": list(r.texts),
                            "unparseable": r.unparseable, "source": r.source})


def from_verdict(v: Verdict) -> JudgeResult:
    """Any verifier's verdict as a judgment: a program verifier's pass/fail is a unanimous vote."""
    d = v.details
    if "decision" in d:
        return JudgeResult(d["decision"], v.score, d.get("votes", []), d.get("texts", []), d.get("unparseable", 0),
                           d.get("source", "model"))
    return JudgeResult(v.passed, float(v.passed), [v.passed], [], 0, "rules")


# score_fn(list of judge chats) -> P(yes) per chat (label scoring; see closedloop.label_scoring).
ScoreFn = Callable[[list[list[dict]]], list[float]]


def label_scored(model: object, tokenizer: object, batch_size: int) -> ScoreFn:
    """A score_fn: P(" yes") against P(" no") right after a prefilled `Verdict:` in the judge's answer."""
    from closedloop.label_scoring import score_labels

    def score(chats: list[list[dict]]) -> list[float]:
        prefilled = [[*c, {"role": "assistant", "content": "Verdict:"}] for c in chats]
        return [p[0] for p in score_labels(model, tokenizer, prefilled, [" yes", " no"], batch_size)]

    return score


class _Judge(Verifier):
    """generate_fn: k sampled judgments per sample, majority (`votes`); or score_fn: one
    label-scored P(yes) per sample, decision P(yes) > 0.5 (a tie at exactly 0.5 is None)."""

    granularity = Granularity.TRAJECTORY
    form = Form.BINARY
    source = Source.MODEL

    def __init__(self, generate_fn: GenerateFn | None = None, votes: int = 5, score_fn: ScoreFn | None = None) -> None:
        if (generate_fn is None) == (score_fn is None):
            raise UserError(f"{self.name}: give exactly one of generate_fn (sampled votes) or score_fn (label scoring)")
        if not callable(generate_fn or score_fn):
            raise UserError(f"{self.name}: generate_fn must be callable")
        if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
            raise UserError(f"{self.name}: votes must be a positive integer, got {votes!r}")
        self.generate_fn = generate_fn
        self.score_fn = score_fn
        self.votes = votes

    def judge_batch(self, samples: Sequence[dict]) -> list[JudgeResult]:
        raise NotImplementedError

    def verify(self, sample: dict) -> Verdict:
        return as_verdict(self.judge_batch([sample])[0])

    def verify_batch(self, samples: list[dict]) -> list[Verdict]:
        return [as_verdict(r) for r in self.judge_batch(samples)]


@register_verifier("model_judge")
class ModelJudge(_Judge):
    """A model judging whole responses by majority of `votes` sampled judgments (binary, trajectory);
    score = the yes-vote share, which SPAR's tree search gates on."""

    name = "model_judge"

    def judge_batch(self, samples: Sequence[dict]) -> list[JudgeResult]:
        """One generate_fn call for all samples, `votes` judgments each (or one score_fn call)."""
        if not samples:
            return []
        if self.score_fn is not None:
            chats = [judge_messages(s["prompt"], s["response"]) for s in samples]
            probs = self.score_fn(chats)
            return [JudgeResult(True if p > 0.5 else False if p < 0.5 else None, float(p), [], [], 0, "model")
                    for p in probs]
        outs = self.generate_fn([judge_messages(s["prompt"], s["response"]) for s in samples], self.votes)
        if len(outs) != len(samples) or any(len(o) != self.votes for o in outs):
            raise ValueError(f"generate_fn must return {self.votes} texts for each of {len(samples)} chats")
        results = []
        for texts in outs:
            votes = [parse_verdict(t) for t in texts]
            decision, value, bad = majority(votes)
            results.append(JudgeResult(decision, value, votes, list(texts), bad, "model"))
        return results


@register_verifier("hybrid_judge")
class HybridJudge(_Judge):
    """The IFEval rules where every instruction of a sample has a rule checker, the model judge
    for the rest (batched in one call)."""

    name = "hybrid_judge"

    def judge_batch(self, samples: Sequence[dict]) -> list[JudgeResult]:
        use_rules = [rule_checkable(s) for s in samples]
        to_model = [s for s, r in zip(samples, use_rules) if not r]
        model = ModelJudge(self.generate_fn, self.votes, self.score_fn)
        from_model = iter(model.judge_batch(to_model) if to_model else [])
        return [rule_judgment(s) if r else next(from_model) for s, r in zip(samples, use_rules)]
