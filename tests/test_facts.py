"""The claim sets: program-made claims re-checked from their text alone, the hand-written seed set,
user files and hub-style datasets, and the train/eval split."""

from __future__ import annotations

import calendar
import json
import re

import pytest

from closedloop.errors import UserError
from closedloop.facts import load_claims, load_hub_claims, program_claims, split_claims

PROJECT_SEEDS = __import__("pathlib").Path(__file__).resolve().parents[1] / "data/seeds/facts.jsonl"

# Written here, not imported: an independent reading of each claim's text.
MONTH = {m: i for i, m in enumerate(calendar.month_name) if m}
DAY = {d: i for i, d in enumerate(calendar.day_name)}
FACTOR = {("kilometres", "metres"): 1000, ("metres", "centimetres"): 100, ("hours", "minutes"): 60,
          ("minutes", "seconds"): 60, ("kilograms", "grams"): 1000, ("days", "hours"): 24}


def truth(claim: str) -> bool:
    if m := re.fullmatch(r"(\d+) ([+x-]) (\d+) = (-?\d+)\.", claim):
        a, op, b, v = int(m[1]), m[2], int(m[3]), int(m[4])
        return {"+": a + b, "-": a - b, "x": a * b}[op] == v
    if m := re.fullmatch(r"(\d+) is (greater|less) than (\d+)\.", claim):
        return int(m[1]) > int(m[3]) if m[2] == "greater" else int(m[1]) < int(m[3])
    if m := re.fullmatch(r"(\w+) comes (before|after) (\w+)\.", claim):
        return MONTH[m[1]] < MONTH[m[3]] if m[2] == "before" else MONTH[m[1]] > MONTH[m[3]]
    if m := re.fullmatch(r"The day (after|before) (\w+) is (\w+)\.", claim):
        return (DAY[m[2]] + (1 if m[1] == "after" else -1)) % 7 == DAY[m[3]]
    if m := re.fullmatch(r"(\d+) (\w+) is (\d+) (\w+)\.", claim):
        return int(m[1]) * FACTOR[(m[2], m[4])] == int(m[3])
    if m := re.fullmatch(r"(\d+) is a prime number\.", claim):
        k = int(m[1])
        return k > 1 and not any(k % d == 0 for d in range(2, k))
    if m := re.fullmatch(r"(\d+) is an even number\.", claim):
        return int(m[1]) % 2 == 0
    if m := re.fullmatch(r"The letter ([a-z]) is a vowel\.", claim):
        return m[1] in "aeiou"
    if m := re.fullmatch(r"(\w+) is one of the colours (\w+), (\w+) and (\w+)\.", claim):
        return m[1].lower() in (m[2], m[3], m[4])
    raise AssertionError(f"unparseable claim: {claim!r}")


def test_program_claims_are_labelled_truly():
    rows = program_claims(300, 0) + program_claims(300, 1)
    for r in rows:
        assert truth(r["claim"]) == r["label"], r


def test_program_claims_are_deterministic_balanced_and_distinct():
    rows = program_claims(120, 3)
    assert rows == program_claims(120, 3) and rows != program_claims(120, 4)
    assert sum(r["label"] for r in rows) == 60
    assert len({r["key"] for r in rows}) == len({r["claim"] for r in rows}) == 120
    assert {r["kind"] for r in rows} == {"arithmetic", "comparison", "month_order", "weekday_order",
                                         "unit_conversion", "set_membership"}
    with pytest.raises(ValueError):
        program_claims(0, 0)


def test_hand_written_seed_set_loads_balanced():
    rows = load_claims(PROJECT_SEEDS, "facts.general")
    assert len(rows) == 40 and sum(r["label"] for r in rows) == 20
    assert len({r["key"] for r in rows}) == 40


def write(tmp_path, lines) -> object:
    path = tmp_path / "claims.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_labels_are_normalised(tmp_path):
    path = write(tmp_path, [{"claim": "a", "label": "True"}, {"claim": "b", "label": "false"}, {"claim": "c", "label": 1},
                            {"claim": "d", "label": 0}, {"claim": "e", "label": True, "key": "k", "kind": "x"}])
    rows = load_claims(path, "evaluate.claims")
    assert [r["label"] for r in rows] == [True, False, True, False, True]
    assert rows[0]["key"] == "line-1" and rows[0]["kind"] == "user" and rows[4]["key"] == "k"


@pytest.mark.parametrize("lines,where", [
    ([{"claim": "a", "label": True}, {"claim": "b", "label": "maybe"}], "claims.jsonl:2: label"),
    ([{"label": True}], "claims.jsonl:1: claim"),
    ([{"claim": "a", "label": True}, "{oops"], "claims.jsonl:2"),
    ([{"claim": "a", "label": True, "key": "x"}, {"claim": "b", "label": True, "key": "x"}], "claims.jsonl:2: key 'x' repeats line 1"),
    ([], "claims.jsonl: no claims"),
])
def test_bad_claim_files_name_the_file_and_line(tmp_path, lines, where):
    with pytest.raises(UserError, match=re.escape(where)) as err:
        load_claims(write(tmp_path, lines), "evaluate.claims")
    assert str(err.value).startswith("evaluate.claims: ")


def test_hub_style_dataset_from_a_local_file(tmp_path):
    path = tmp_path / "creak.jsonl"
    path.write_text("".join(json.dumps({"sentence": s, "label": lab}) + "\n"
                            for s, lab in [("Cats can fly.", "false"), ("Water is wet.", "true")]))
    rows = load_hub_claims(str(path), "validation", "sentence", "label")
    assert [(r["claim"], r["label"]) for r in rows] == [("Cats can fly.", False), ("Water is wet.", True)]
    with pytest.raises(UserError, match=r"no column 'claim' \(columns: sentence, label\)"):
        load_hub_claims(str(path), "validation", "claim", "label")


def test_split_is_disjoint_and_deterministic():
    rows = program_claims(50, 0)
    train, evalset = split_claims(rows, 20, 30, seed=5)
    assert (train, evalset) == split_claims(rows, 20, 30, seed=5)
    assert len(train) == 20 and len(evalset) == 30
    assert not {r["key"] for r in train} & {r["key"] for r in evalset}
    with pytest.raises(UserError, match="50 claims available"):
        split_claims(rows, 40, 30, seed=5)


def test_program_claims_of_chosen_kinds_only():
    rows = program_claims(40, 0, kinds=["arithmetic", "comparison"])
    assert {r["kind"] for r in rows} == {"arithmetic", "comparison"} and sum(r["label"] for r in rows) == 20
    assert program_claims(40, 0) != rows


def test_the_kinds_param_is_checked_with_the_params():
    from closedloop.config import FactsParams, build_section

    assert build_section(FactsParams, {"kinds": ["general", "arithmetic"]}, "facts", "params.yaml").kinds
    for bad in (["nosuch"], ["general"], []):
        with pytest.raises(UserError, match="params.yaml: facts.kinds: expected null or a list of arithmetic"):
            build_section(FactsParams, {"kinds": bad}, "facts", "params.yaml")
