"""IFEval's 25 rule-checked instructions, as a program verifier.

The checks are Google's IFEval reference implementation (`instruction_following_eval`) as vendored
by the `if-verifiable` package: we import its checker classes and follow the reference
`evaluation_lib.py` for strict and loose verdicts. We do not use if-verifiable's own
`evaluate_instructions`, which strips the response (changing which lines the loose variants
drop), cuts `<think>` blocks and returns no verdicts for an empty response; the reference does
none of these.

Offline differences from the reference (each keeps verdicts deterministic and off the network):

* `length_constraints:number_sentences`: the reference counts sentences with NLTK's punkt model,
  which needs downloaded NLTK data (and NLTK >= 3.9 would load `punkt_tab`, not the pickle the
  reference names). We count with the reference's own regex splitter
  `instructions_util.split_into_sentences`, which the reference already uses elsewhere. Verdicts
  can differ near the threshold: punkt's English model knows abbreviations the regex does not
  (e.g. "vs.", "etc.", "approx." end a sentence for the regex), and the regex ends a sentence at
  every "?" and "!" ("Really?!" is two). Titles such as "Dr." and "Mr.", initials, "e.g.", decimals,
  "..." and web addresses are handled by both.
* `change_case:capital_word_frequency`: the reference counts all-uppercase tokens of
  `nltk.word_tokenize`, i.e. punkt sentences each tokenized by `NLTKWordTokenizer`. We run
  `NLTKWordTokenizer` over the whole text instead. Its only position-dependent rules act at the
  start and end of the string (an opening `"` becomes ``` `` ```, a final period is split off), and
  neither changes whether a token is uppercase: `"WORD."` and `"WORD"` are both `isupper()`, while
  `"."` and quote tokens never are. Tokenizing the regex splitter's sentences instead would be
  worse, because that splitter rewrites the text (`<prd>` markers, swapped `."`). On 100k random
  punctuation-heavy strings, whole-text counts matched per-sentence counts (sentences from an
  untrained punkt) in all but one; counting over regex-split sentences differed in 844.
* `language:response_language` (and the English check inside `change_case:english_*`) uses
  langdetect, which samples randomly; `DetectorFactory.seed = 0` is set once when the checkers are
  loaded, so the same text always gets the same verdict.
* `keywords:letter_frequency`: if-verifiable (like lm-evaluation-harness and some google-research
  versions) replaces a `letter` outside a-z with a *random* letter. Two IFEval prompts ask for "#"
  (key 1122) and "!" (key 1129); other google-research versions count the given character, which
  is what the prompt asks for. We count the given character.
* Stricter input validation: every kwarg a checker takes must be given with a valid value. Where
  the reference would silently draw a random value (a missing kwarg, a negative count, an
  out-of-range `nth_paragraph`, an empty keyword list) we raise `UserError`, because a random
  threshold makes a verdict irreproducible. Keywords must compile as regular expressions (the
  reference matches them with `re.search` and would crash mid-run otherwise).

The if-verifiable / NLTK / langdetect imports (~2 s) happen on first use, not at import.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from closedloop.errors import UserError
from closedloop.io import iter_jsonl, write_jsonl
from closedloop.verifiers.base import Form, Granularity, Source, Verdict, Verifier, register_verifier

INSTRUCTION_IDS: tuple[str, ...] = (
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "combination:repeat_prompt",
    "combination:two_responses",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:constrained_response",
    "detectable_format:json_format",
    "detectable_format:multiple_sections",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:title",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:nth_paragraph_first_word",
    "length_constraints:number_paragraphs",
    "length_constraints:number_sentences",
    "length_constraints:number_words",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
)

_RELATIONS = ("less than", "at least")  # the reference's _COMPARISON_RELATION


@functools.cache
def _checkers() -> dict[str, type]:
    """Load the reference checkers once, with the offline subclasses swapped in (see module docstring)."""
    import langdetect
    from if_verifiable.ifeval import instructions, instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    from nltk.tokenize import NLTKWordTokenizer

    langdetect.DetectorFactory.seed = 0  # langdetect is random per call unless seeded
    word_tokenizer = NLTKWordTokenizer()

    def compare(count: int, relation: str, threshold: int) -> bool:
        return count < threshold if relation == _RELATIONS[0] else count >= threshold

    class NumberOfSentences(instructions.NumberOfSentences):
        """Counts sentences with the reference's regex splitter instead of NLTK punkt."""

        def check_following(self, value: str) -> bool:
            n = len(instructions_util.split_into_sentences(value))
            return compare(n, self._comparison_relation, self._num_sentences_threshold)

    class CapitalWordFrequencyChecker(instructions.CapitalWordFrequencyChecker):
        """Counts uppercase tokens of NLTKWordTokenizer over the whole text (no punkt)."""

        def check_following(self, value: str) -> bool:
            n = sum(tok.isupper() for tok in word_tokenizer.tokenize(value))
            return compare(n, self._comparison_relation, self._frequency)

    class LetterFrequencyChecker(instructions.LetterFrequencyChecker):
        """Counts a given non a-z character (e.g. "#") instead of a random letter."""

        def build_description(self, *, letter=None, let_frequency=None, let_relation=None):
            odd = isinstance(letter, str) and len(letter) == 1 and not ("a" <= letter.lower() <= "z")
            # Pass a valid placeholder so the parent draws nothing from the global `random`.
            desc = super().build_description(
                letter="a" if odd else letter, let_frequency=let_frequency, let_relation=let_relation
            )
            if odd:
                self._letter = letter.lower()
                desc = self._description_pattern.format(
                    letter=self._letter, let_frequency=self._frequency, let_relation=self._comparison_relation
                )
            return desc

    table = {i: INSTRUCTION_DICT[i] for i in INSTRUCTION_IDS}
    table["length_constraints:number_sentences"] = NumberOfSentences
    table["change_case:capital_word_frequency"] = CapitalWordFrequencyChecker
    table["keywords:letter_frequency"] = LetterFrequencyChecker
    return table


@functools.cache
def _loose_variants() -> Callable[[str], list[str]]:
    # if-verifiable's copy of the reference's 8 loose variants, in the reference's order.
    from if_verifiable.common import get_loose_transformations

    return get_loose_transformations


@functools.cache
def _params(cls: type) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(cls.build_description).parameters if p != "self")


# ---- kwarg validation: the value types the checkers expect, so errors name the kwarg -------------


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_regex(v: Any) -> bool:
    if not _is_text(v):
        return False
    try:
        re.compile(v)
    except re.error:
        return False
    return True


def _is_language(v: Any) -> bool:
    from if_verifiable.ifeval.instructions_util import LANGUAGE_CODES

    return v in LANGUAGE_CODES


_COUNT = (_is_count, "a non-negative integer")
_TEXT = (_is_text, "a non-empty string")
_WORDS = (
    lambda v: isinstance(v, list) and bool(v) and all(_is_regex(w) for w in v),
    "a non-empty list of non-empty strings (each used as a regular expression)",
)
_KWARG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        ["relation", "let_relation", "capital_relation"], (lambda v: v in _RELATIONS, "'less than' or 'at least'")
    ),
    **dict.fromkeys(
        ["num_sentences", "num_placeholders", "num_bullets", "num_highlights", "num_sections",
         "num_paragraphs", "nth_paragraph", "frequency", "num_words", "let_frequency", "capital_frequency"],
        _COUNT,
    ),
    **dict.fromkeys(["section_spliter", "postscript_marker", "end_phrase", "first_word", "prompt_to_repeat"], _TEXT),
    "keyword": (_is_regex, "a non-empty string (used as a regular expression)"),
    "keywords": _WORDS,
    "forbidden_words": _WORDS,
    "letter": (lambda v: isinstance(v, str) and len(v) == 1, "a single character"),
    "language": (_is_language, "an ISO 639-1 code that IFEval supports (e.g. 'en', 'fr', 'hi')"),
}


def _build(instruction_id: str, kwargs: dict, prompt: str) -> tuple[Any, str]:
    cls = _checkers().get(instruction_id) if isinstance(instruction_id, str) else None
    if cls is None:
        raise UserError(f"unknown instruction id {instruction_id!r}; expected one of: {', '.join(INSTRUCTION_IDS)}")
    if not isinstance(kwargs, dict):
        raise UserError(f"{instruction_id}: kwargs must be a JSON object, got {type(kwargs).__name__}")
    given = {k: v for k, v in kwargs.items() if v is not None}  # None = unset (HF's IFEval copy pads with nulls)
    params = [p for p in _params(cls) if p != "prompt"]  # "prompt" is filled from the row, below
    expected = f"expected kwargs: {', '.join(params) or '(none)'}"
    for key, value in given.items():
        if key not in params:
            raise UserError(f"{instruction_id}: unknown kwarg {key!r}; {expected}")
        ok, what = _KWARG_RULES.get(key, (lambda v: True, ""))
        if not ok(value):
            raise UserError(f"{instruction_id}: kwarg {key!r} must be {what}, got {value!r}")
    for key in params:
        if key not in given:
            raise UserError(
                f"{instruction_id}: missing kwarg {key!r} ({expected}); "
                "the reference checker would draw a random value"
            )
    # The one cross-kwarg range the reference also "fixes" with a random draw.
    if "nth_paragraph" in given and not 1 <= given["nth_paragraph"] <= given["num_paragraphs"]:
        raise UserError(
            f"{instruction_id}: kwarg 'nth_paragraph' must be between 1 and num_paragraphs "
            f"({given['num_paragraphs']}), got {given['nth_paragraph']}"
        )
    checker = cls(instruction_id)
    try:
        description = checker.build_description(**given)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{instruction_id}: invalid kwargs {given}: {e}") from None
    args = checker.get_instruction_args()
    if args and "prompt" in args:  # reference behaviour for checkers that read the prompt
        checker.build_description(prompt=prompt)
    return checker, description


def build_checker(instruction_id: str, kwargs: dict, prompt: str) -> Any:
    """A built reference checker for one instruction; bad ids or kwargs raise UserError."""
    return _build(instruction_id, kwargs, prompt)[0]


def describe(instruction_id: str, kwargs: dict) -> str:
    """The instruction's natural-language text, as the reference's build_description writes it."""
    return _build(instruction_id, kwargs, "")[1]


@dataclass(frozen=True)
class IFEvalResult:
    strict: list[bool]
    loose: list[bool]

    @property
    def strict_all(self) -> bool:
        return all(self.strict)

    @property
    def loose_all(self) -> bool:
        return all(self.loose)


def _judge(checkers: list[Any], response: str) -> IFEvalResult:
    variants = _loose_variants()(response)
    strict, loose = [], []
    for checker in checkers:
        s = bool(response.strip() and checker.check_following(response))
        # variants[0] is the response itself, so a strict pass is a loose pass; skip repeats.
        ok, tried = s, {response}
        for v in variants[1:]:
            if ok:
                break
            if v not in tried:
                tried.add(v)
                ok = bool(v.strip() and checker.check_following(v))
        strict.append(s)
        loose.append(ok)
    return IFEvalResult(strict=strict, loose=loose)


def check(prompt: str, instruction_id_list: list[str], kwargs_list: list[dict], response: str) -> IFEvalResult:
    """Strict and loose verdicts per instruction, exactly as the reference evaluation_lib computes them."""
    return _judge(_prepare(prompt, instruction_id_list, kwargs_list, response), response)


def _prepare(prompt: Any, ids: Any, kwargs_list: Any, response: Any) -> list[Any]:
    """Validate one sample's fields and build one checker per instruction (reused for strict and loose)."""
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise UserError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise UserError(f"field 'instruction_id_list' must be a non-empty list of strings, got {ids!r}")
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise UserError(
            f"field 'kwargs' must be a list with one object per instruction ({len(ids)}), got {kwargs_list!r}"
        )
    return [build_checker(i, kw, prompt) for i, kw in zip(ids, kwargs_list)]


_FIELDS = ("prompt", "instruction_id_list", "kwargs", "response")


def _prepare_row(row: Any) -> list[Any]:
    if not isinstance(row, dict):
        raise UserError(f"expected a JSON object, got {type(row).__name__}")
    missing = [f for f in _FIELDS if f not in row]
    if missing:
        raise UserError(f"missing field {missing[0]!r} (each row needs {', '.join(_FIELDS)})")
    return _prepare(row["prompt"], row["instruction_id_list"], row["kwargs"], row["response"])


def _with_verdicts(row: dict, result: IFEvalResult) -> dict:
    # IFEval's own output field names, so the rows read like the reference's eval_results_*.jsonl.
    return {
        **row,
        "strict": {"follow_all_instructions": result.strict_all, "follow_instruction_list": result.strict},
        "loose": {"follow_all_instructions": result.loose_all, "follow_instruction_list": result.loose},
    }


def verify_row(row: dict) -> dict:
    """The row (extra fields kept) plus IFEval's `strict` and `loose` verdict blocks."""
    return _with_verdicts(row, _judge(_prepare_row(row), row["response"]))


def _summary(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode in ("strict", "loose"):
        lists = [r[mode]["follow_instruction_list"] for r in rows]
        out[f"prompt_level_{mode}"] = sum(all(x) for x in lists) / len(lists) if lists else 0.0
        n = sum(len(x) for x in lists)
        out[f"instruction_level_{mode}"] = sum(sum(x) for x in lists) / n if n else 0.0
    return out


def verify_jsonl(in_path: str | Path, out_path: str | Path | None = None) -> dict:
    """Verify every row of a JSONL file; write rows with verdicts to `out_path` atomically.

    All rows are validated before anything is checked or written; a bad row raises
    UserError "FILE:LINE: ...". `out_path` defaults to INPUT.verified.jsonl beside the input.
    """
    in_path = Path(in_path)
    out_path = Path(out_path) if out_path is not None else in_path.with_suffix(".verified.jsonl")
    numbered = list(iter_jsonl(in_path))
    if not numbered:
        raise UserError(f"{in_path}: no rows (expected one JSON object per line)")
    linenos, rows = [n for n, _ in numbered], [r for _, r in numbered]
    prepared = []
    for lineno, row in zip(linenos, rows):
        try:
            prepared.append(_prepare_row(row))
        except UserError as e:
            raise UserError(f"{in_path}:{lineno}: {e}") from None
    from tqdm import tqdm

    # A progress bar on a terminal (a large file takes a minute); nothing when piped.
    checks = tqdm(zip(rows, prepared), total=len(rows), desc=f"verify {in_path.name}", unit="row", disable=None)
    results = [_with_verdicts(row, _judge(c, row["response"])) for row, c in checks]
    write_jsonl(out_path, results)
    return {"input": str(in_path), "output": str(out_path), "num_rows": len(results), **_summary(results)}


@register_verifier("ifeval_rules")
class IFEvalRuleVerifier(Verifier):
    """IFEval rules as a trajectory-level binary program verifier.

    score = fraction of the sample's instructions followed (strict or loose verdicts);
    passed = score >= threshold (threshold 1.0: all instructions, IFEval's prompt-level metric).
    """

    name = "ifeval_rules"
    form = Form.BINARY
    granularity = Granularity.TRAJECTORY
    source = Source.PROGRAM

    def __init__(self, mode: str = "strict", threshold: float = 1.0) -> None:
        if mode not in ("strict", "loose"):
            raise UserError(f"ifeval_rules: mode must be 'strict' or 'loose', got {mode!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise UserError(f"ifeval_rules: threshold must be a number in [0, 1], got {threshold!r}")
        self.mode = mode
        self.threshold = float(threshold)

    def verify(self, sample: dict) -> Verdict:
        result = _judge(_prepare_row(sample), sample["response"])
        verdicts = result.strict if self.mode == "strict" else result.loose
        score = sum(verdicts) / len(verdicts)
        return Verdict(
            passed=score >= self.threshold, score=score, details={"strict": result.strict, "loose": result.loose}
        )
