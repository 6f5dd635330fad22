"""IFEval rule checks: every instruction id, the offline subclasses, the real IFEval file, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from closedloop.errors import UserError
from closedloop.verifiers import ifeval_rules
from closedloop.verifiers.ifeval_rules import (
    INSTRUCTION_IDS,
    build_checker,
    check,
    describe,
    verify_jsonl,
    verify_row,
)

IFEVAL_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/ifeval/input_data.jsonl"
needs_ifeval = pytest.mark.skipif(not IFEVAL_FILE.is_file(), reason=f"IFEval input data not found at {IFEVAL_FILE}")

REPEAT = "Write a poem about cats."
FRENCH = "Bonjour, je suis très heureux de vous rencontrer aujourd'hui. Nous allons parler de la cuisine française."
ENGLISH = "Hello there, I am very happy to meet you today. We will talk about cooking and gardening."

# (id, kwargs, response, strict, loose); loose=None means "same as strict".
CASES = [
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}, "THE QUICK BROWN fox.", True, None),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}, "The QUICK brown fox.", False, None),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "Only ONE shout here.", True, None),
    ("change_case:english_capital", {}, "THIS IS A RESPONSE WRITTEN ENTIRELY IN CAPITAL LETTERS FOR THE TEST.", True, None),
    ("change_case:english_capital", {}, "This is mixed case text in English.", False, None),
    ("change_case:english_lowercase", {}, "this is a response written entirely in lowercase english letters.", True, None),
    ("change_case:english_lowercase", {}, "This has a capital letter at the start.", False, None),
    ("combination:repeat_prompt", {"prompt_to_repeat": REPEAT}, REPEAT + " Cats are soft and sleep all day.", True, None),
    ("combination:repeat_prompt", {"prompt_to_repeat": REPEAT}, "Here is a poem: cats are soft.", False, None),
    # A chatty first line breaks strict; loose drops the first line.
    ("combination:repeat_prompt", {"prompt_to_repeat": REPEAT}, "Sure!\n" + REPEAT + "\nCats are soft.", False, True),
    ("combination:two_responses", {}, "First answer here.\n******\nSecond answer here.", True, None),
    ("combination:two_responses", {}, "Only one answer.", False, None),
    ("combination:two_responses", {}, "Same answer.\n******\nSame answer.", False, None),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], I live at [address].", True, None),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], hello.", False, None),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text.\nP.S. See you soon.", True, None),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text only.", False, None),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Main text.\n\nP.P.S One more thing.", True, None),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, None),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False, None),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, None),
    ("detectable_format:json_format", {}, "a: 1", False, None),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nintro\nSection 2\nbody", True, None),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nonly one section", False, None),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, None),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* only one", False, None),
    # Exactly 2 bullets once the trailing bullet (last line) is dropped.
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* extra", False, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "This is *first* and *second*.", True, None),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Only *one* highlight.", False, None),
    ("detectable_format:title", {}, "<<My Title>>\nSome text.", True, None),
    ("detectable_format:title", {}, "My Title\nSome text.", False, None),
    ("detectable_format:title", {}, "<<   >>\nEmpty title.", False, None),
    ("keywords:existence", {"keywords": ["apple", "banana"]}, "I like Apple and banana.", True, None),
    ("keywords:existence", {"keywords": ["apple", "banana"]}, "I like apple only.", False, None),
    # Markdown bold splits the keyword; loose removes the asterisks.
    ("keywords:existence", {"keywords": ["bold text"]}, "This has **bold** text.", False, True),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "This is good, and a badge is fine.", True, None),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "This is BAD.", False, None),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "A cat and another Cat.", True, None),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "A cat.", False, None),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "A cat.", True, None),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "Zebras zigzag with zest.", True, None),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "A zebra.", False, None),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 2, "let_relation": "less than"}, "A zebra.", False, None),
    # Non a-z characters are counted as given (IFEval keys 1122 "#" and 1129 "!").
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#one #two", True, None),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#one and two", False, None),
    ("language:response_language", {"language": "fr"}, FRENCH, True, None),
    ("language:response_language", {"language": "fr"}, ENGLISH, False, None),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}, "First paragraph.\n\nHowever, the second one.", True, None),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}, "First paragraph.\n\nThe second one.", False, None),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}, "One.\n\nHowever two.\n\nThree.", False, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", True, None),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Just one paragraph.", False, None),
    # Dropping the last line leaves "One. *** Two. ***", i.e. two paragraphs.
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.\n***\nThree.", False, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two! Three?", True, None),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two.", False, None),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "Just one sentence here.", True, None),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three", True, None),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four five six", False, None),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", True, None),
    ("punctuation:no_comma", {}, "No commas here.", True, None),
    ("punctuation:no_comma", {}, "Yes, commas.", False, None),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Some text. Any other questions?", True, None),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? More text.", False, None),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Some text. Any other questions?\n-- Bot", False, True),
    ("startend:quotation", {}, '"Wrapped text."', True, None),
    ("startend:quotation", {}, "Not wrapped.", False, None),
    ("startend:quotation", {}, 'Here you go:\n"Wrapped text."', False, True),
]


def verdict(iid: str, kwargs: dict, response: str, prompt: str = "Write something.") -> tuple[bool, bool]:
    r = check(prompt, [iid], [kwargs], response)
    return r.strict[0], r.loose[0]


@pytest.mark.parametrize("iid,kwargs,response,strict,loose", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_case(iid, kwargs, response, strict, loose):
    assert verdict(iid, kwargs, response) == (strict, strict if loose is None else loose)


def test_every_id_has_a_positive_and_a_negative_case():
    assert len(INSTRUCTION_IDS) == 25 and list(INSTRUCTION_IDS) == sorted(INSTRUCTION_IDS)
    for iid in INSTRUCTION_IDS:
        outcomes = {c[3] for c in CASES if c[0] == iid}
        assert outcomes == {True, False}, iid


def test_ids_are_in_the_vendored_registry():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    assert set(INSTRUCTION_IDS) <= set(INSTRUCTION_DICT)


def test_empty_response_fails_strict_and_loose():
    # The reference counts an empty (or whitespace) response as not following, even for no_comma.
    for response in ("", "  \n "):
        r = check("p", ["punctuation:no_comma", "keywords:forbidden_words"], [{}, {"forbidden_words": ["x"]}], response)
        assert r.strict == [False, False] and r.loose == [False, False]
        assert not r.strict_all and not r.loose_all


def test_multi_instruction_result_and_think_blocks_are_not_stripped():
    r = check("p", ["punctuation:no_comma", "startend:quotation"], [{}, {}], '<think>a, b</think>\n"Done."')
    assert r.strict == [False, False]  # the reference judges the text as given
    assert r.loose == [True, True]  # dropping the first line leaves '"Done."'


# ---- the offline subclasses ------------------------------------------------------------------


def _largest_passing(iid: str, key: str, rel_key: str, text: str) -> int:
    ok = [k for k in range(40) if build_checker(iid, {key: k, rel_key: "at least"}, "").check_following(text)]
    return max(ok)


def sentences(text: str) -> int:
    return _largest_passing("length_constraints:number_sentences", "num_sentences", "relation", text)


def capital_words(text: str) -> int:
    return _largest_passing("change_case:capital_word_frequency", "capital_frequency", "capital_relation", text)


@pytest.mark.parametrize(
    "text,n",
    [
        ("One. Two! Three?", 3),
        ("Dr. Smith arrived. He sat down.", 2),  # titles are known to the regex splitter
        ("We met at 3.30 today. It was fine.", 2),  # decimals do not split
        ("For e.g. this one. And U.S. that.", 2),  # initials/acronyms do not split
        ("Wait... what?", 2),
        ("Visit example.com now. Ok.", 2),
        ("Title line\nLine one. Line two", 2),  # a newline alone does not end a sentence
        # Known difference from punkt: the regex does not know "vs." and splits "?!".
        ("Cats vs. dogs is an old debate.", 2),
        ("Really?! Yes.", 3),
        ("", 0),
    ],
)
def test_sentence_count_uses_regex_splitter(text, n):
    assert sentences(text) == n


@pytest.mark.parametrize(
    "text,n",
    [
        ("I am HAPPY. NASA and the U.S. agree.", 4),  # I, HAPPY, NASA, U.S.
        ("STATE-OF-THE-ART tools.", 1),  # hyphenated words are one token
        ('"WOW," she said. OK.', 2),
        ("DON'T STOP", 3),  # treebank splits DO + N'T
        ("nothing loud here.", 0),
    ],
)
def test_capital_word_frequency_counts_tokens(text, n):
    assert capital_words(text) == n


def test_subclassed_checkers_never_touch_nltk_data(monkeypatch):
    import nltk
    from if_verifiable.ifeval import instructions_util

    def boom(*a, **k):
        raise AssertionError("NLTK data or punkt was used")

    monkeypatch.setattr(instructions_util, "count_sentences", boom)
    monkeypatch.setattr(nltk, "word_tokenize", boom)
    monkeypatch.setattr(nltk.data, "load", boom)
    monkeypatch.setattr(nltk.data, "find", boom)
    for iid, kwargs, response, strict, loose in CASES:
        assert verdict(iid, kwargs, response)[0] == strict


def test_offline_fresh_process(tmp_path):
    # A clean interpreter with no NLTK data, hub offline and sockets disabled runs every id.
    script = textwrap.dedent(
        """
        import socket
        def no_net(*a, **k):
            raise RuntimeError("network access attempted")
        socket.socket.connect = no_net
        socket.create_connection = no_net
        import nltk.data
        nltk.data.load = nltk.data.find = no_net
        from closedloop.verifiers.ifeval_rules import INSTRUCTION_IDS, check
        import json, sys
        cases = json.load(sys.stdin)
        for iid, kwargs, response, strict, loose in cases:
            assert check("p", [iid], [kwargs], response).strict[0] == strict, iid
        print("ok", len(cases))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLTK_DATA": str(tmp_path / "no_nltk_data"), "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(CASES), env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"ok {len(CASES)}"


def test_language_detection_is_deterministic():
    import langdetect

    ifeval_rules._checkers()
    assert langdetect.DetectorFactory.seed == 0
    # Short, ambiguous texts are where unseeded langdetect flips between calls.
    for text in ("Hello", "ok", "Si", FRENCH):
        runs = {verdict("language:response_language", {"language": "en"}, text) for _ in range(10)}
        assert len(runs) == 1, text
    assert verdict("language:response_language", {"language": "fr"}, FRENCH) == (True, True)


# ---- building checkers and describing instructions --------------------------------------------


def test_describe_is_deterministic_and_uses_kwargs():
    kw = {"keywords": ["zeta", "alpha"]}
    assert describe("keywords:existence", kw) == describe("keywords:existence", kw)
    assert describe("keywords:existence", kw) == "Include keywords ['alpha', 'zeta'] in the response."
    assert describe("punctuation:no_comma", {}) == "In your entire response, refrain from the use of any commas."
    assert "letter # should appear at least 4" in describe(
        "keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": "at least"}
    )


def test_none_kwargs_are_dropped():
    c = build_checker("punctuation:no_comma", {"num_words": None}, "p")
    assert c.check_following("no commas")


@pytest.mark.parametrize(
    "iid,kwargs,needle",
    [
        ("keywords:nope", {}, "unknown instruction id 'keywords:nope'"),
        ("punctuation:no_comma", {"num_words": 3}, "unknown kwarg 'num_words'"),
        ("length_constraints:number_words", {"num_words": 3, "relation": "more than"}, "kwarg 'relation' must be"),
        ("length_constraints:number_words", {"num_words": "3", "relation": "at least"}, "kwarg 'num_words' must be a non-negative integer"),
        ("length_constraints:number_words", {"num_words": -1, "relation": "at least"}, "kwarg 'num_words'"),
        ("length_constraints:number_words", {"relation": "at least"}, "missing kwarg 'num_words'"),
        ("language:response_language", {"language": "xx"}, "kwarg 'language'"),
        ("keywords:existence", {"keywords": []}, "kwarg 'keywords'"),
        ("keywords:existence", {"keywords": ["f(x"]}, "regular expression"),
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"}, "kwarg 'letter'"),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "so"},
            "kwarg 'nth_paragraph' must be between 1 and num_paragraphs (2), got 3",
        ),
        ("combination:repeat_prompt", {"prompt_to_repeat": ""}, "kwarg 'prompt_to_repeat'"),
    ],
)
def test_bad_ids_and_kwargs_are_user_errors(iid, kwargs, needle):
    with pytest.raises(UserError) as e:
        build_checker(iid, kwargs, "p")
    assert needle in str(e.value)
    if iid != "keywords:nope":
        assert iid in str(e.value)


# ---- rows and files ---------------------------------------------------------------------------

ROW = {
    "key": 7,
    "prompt": "Say hi without commas.",
    "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
    "kwargs": [{}, {}],
    "response": '"hi there"',
    "model": "m1",
}


def test_verify_row_shape_keeps_extra_fields():
    out = verify_row(dict(ROW))
    assert out["model"] == "m1" and out["key"] == 7
    assert out["strict"] == {"follow_all_instructions": True, "follow_instruction_list": [True, True]}
    assert out["loose"] == {"follow_all_instructions": True, "follow_instruction_list": [True, True]}


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"response": None}, "field 'response' must be a string"),
        ({"prompt": 3}, "field 'prompt' must be a string"),
        ({"instruction_id_list": "punctuation:no_comma"}, "field 'instruction_id_list'"),
        ({"instruction_id_list": []}, "field 'instruction_id_list'"),
        ({"kwargs": [{}]}, "field 'kwargs'"),
        ({"kwargs": [{}, 5]}, "kwargs must be a JSON object"),
    ],
)
def test_verify_row_field_errors(patch, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        verify_row({**ROW, **patch})


def test_verify_row_missing_field():
    row = {k: v for k, v in ROW.items() if k != "response"}
    with pytest.raises(UserError, match="missing field 'response'"):
        verify_row(row)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _bad(row_patch: dict | None = None, drop: str | None = None) -> str:
    row = {**ROW, **(row_patch or {})}
    if drop:
        row.pop(drop)
    return json.dumps(row)


@pytest.mark.parametrize(
    "lines,lineno,needle",
    [
        ([json.dumps(ROW), json.dumps(ROW), '{"prompt": "broken', json.dumps(ROW)], 3, "invalid JSON"),
        ([json.dumps(ROW), _bad(drop="response"), json.dumps(ROW)], 2, "missing field 'response'"),
        # The blank line 2 still counts, so the bad row is line 4.
        ([json.dumps(ROW), "", json.dumps(ROW), _bad({"instruction_id_list": ["nope:x", "startend:quotation"]})], 4, "unknown instruction id"),
        ([json.dumps(ROW), json.dumps(ROW), _bad({"kwargs": [{"bogus": 1}, {}]})], 3, "unknown kwarg 'bogus'"),
    ],
)
def test_verify_jsonl_bad_line_names_line_and_writes_nothing(tmp_path, lines, lineno, needle):
    src = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError) as e:
        verify_jsonl(src, out)
    assert f"{src}:{lineno}: " in str(e.value) and needle in str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no temp files left either


def test_verify_jsonl_default_output_and_summary(tmp_path):
    bad = {**ROW, "response": "hi, there"}
    src = _write(tmp_path / "gen.jsonl", [json.dumps(ROW), json.dumps(bad)])
    summary = verify_jsonl(src)
    assert summary["output"] == str(tmp_path / "gen.verified.jsonl")
    assert summary["num_rows"] == 2
    assert summary["prompt_level_strict"] == 0.5
    assert summary["instruction_level_strict"] == 0.5  # 2 of 4 instructions


# ---- the real IFEval file ---------------------------------------------------------------------


@needs_ifeval
def test_every_ifeval_row_builds():
    rows = [json.loads(line) for line in IFEVAL_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 541
    seen = set()
    for row in rows:
        for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            build_checker(iid, kw, row["prompt"])
            assert describe(iid, kw)
            seen.add(iid)
    assert seen == set(INSTRUCTION_IDS)


@needs_ifeval
def test_verify_jsonl_on_all_ifeval_rows(tmp_path):
    lines = IFEVAL_FILE.read_text(encoding="utf-8").splitlines()
    src = tmp_path / "responses.jsonl"
    responses = ["Hello WORLD. A reply, with *stars*.\nSecond line!", '"quoted"', ""]
    with open(src, "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            row = json.loads(line)
            f.write(json.dumps({**row, "response": responses[i % 3], "extra": i}) + "\n")
    out = tmp_path / "verified.jsonl"
    summary = verify_jsonl(src, out)
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert summary["num_rows"] == len(got) == 541
    for i, (line, row) in enumerate(zip(lines, got)):
        original = json.loads(line)
        assert row["extra"] == i and row["key"] == original["key"]
        n = len(original["instruction_id_list"])
        for mode in ("strict", "loose"):
            v = row[mode]["follow_instruction_list"]
            assert len(v) == n and all(isinstance(x, bool) for x in v)
            assert row[mode]["follow_all_instructions"] == all(v)
        # loose is an upper bound of strict, instruction by instruction
        assert all(s <= lo for s, lo in zip(row["strict"]["follow_instruction_list"], row["loose"]["follow_instruction_list"]))
        if row["response"] == "":
            assert not any(row["loose"]["follow_instruction_list"])
    assert 0.0 <= summary["prompt_level_strict"] <= summary["prompt_level_loose"] <= 1.0
