"""Synthetic IFEval-style suite: sampling, conflicts, determinism, seed/eval loading."""

from __future__ import annotations

import inspect
import json
import random
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from closedloop import suite
from closedloop.errors import UserError
from closedloop.verifiers import ifeval_rules

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "data/seeds/instructions.jsonl"
IFEVAL = ROOT.parent / "shared/data/ifeval/input_data.jsonl"

# Pairs that must never share a row, listed here independently of suite.py's table.
MUST_NOT_PAIR = [
    ("change_case:english_capital", "change_case:english_lowercase"),
    ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
    ("language:response_language", "keywords:existence"),
    ("language:response_language", "keywords:frequency"),
    ("language:response_language", "keywords:forbidden_words"),
    ("language:response_language", "keywords:letter_frequency"),
    ("language:response_language", "change_case:capital_word_frequency"),
    ("language:response_language", "change_case:english_capital"),
    ("language:response_language", "change_case:english_lowercase"),
    ("language:response_language", "startend:end_checker"),
]
EXCLUSIVE_ALLOWED = {  # the only partners these ids may have (IFEval's conflict table)
    "detectable_format:constrained_response": set(),
    "detectable_format:json_format": {"keywords:forbidden_words", "keywords:existence"},
    "combination:two_responses": {"keywords:forbidden_words", "keywords:existence",
                                  "language:response_language", "detectable_format:title",
                                  "punctuation:no_comma"},
    "combination:repeat_prompt": {"keywords:existence", "detectable_format:title",
                                  "punctuation:no_comma"},
}


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    return suite.load_seed_tasks(SEEDS)


@pytest.fixture(scope="module")
def built(tasks) -> tuple[list[dict], list[dict]]:
    return suite.build_suite(tasks, 200, 60, 1, 3, seed=7)


def test_seed_file(tasks):
    assert len(tasks) >= 100
    assert SEEDS.stat().st_size < 30_000
    assert len({t["task"] for t in tasks}) == len(tasks)


def test_suite_ids_match_rules():
    assert set(suite.SUITE_IDS) == set(ifeval_rules.INSTRUCTION_IDS)
    assert len(suite.SUITE_IDS) == 25


def test_deterministic(tasks):
    a = suite.build_suite(tasks, 40, 10, 1, 3, seed=1)
    assert a == suite.build_suite(tasks, 40, 10, 1, 3, seed=1)
    assert a != suite.build_suite(tasks, 40, 10, 1, 3, seed=2)


def test_counts_keys_and_disjoint_tasks(built, tasks):
    train, evals = built
    assert len(train) == 200 and len(evals) == 60
    assert train[0]["key"] == "train-0001" and evals[-1]["key"] == "eval-0060"
    keys = [r["key"] for r in train + evals]
    assert len(set(keys)) == len(keys)
    train_seeds, eval_seeds = {r["seed_id"] for r in train}, {r["seed_id"] for r in evals}
    assert not train_seeds & eval_seeds
    by_id = {t["id"]: t["task"] for t in tasks}
    for row in train + evals:
        assert set(row) == {"key", "prompt", "instruction_id_list", "kwargs", "seed_id"}
        assert row["prompt"].startswith(by_id[row["seed_id"]] + " ")
        n = len(row["instruction_id_list"])
        assert n == len(row["kwargs"]) and 1 <= n <= 3


def test_no_train_or_no_eval(tasks):
    train, evals = suite.build_suite(tasks, 5, 0, 1, 2, seed=0)
    assert len(train) == 5 and evals == []
    train, evals = suite.build_suite(tasks, 0, 5, 1, 2, seed=0)
    assert train == [] and len(evals) == 5


def test_all_ids_covered_in_each_split(built):
    for rows in built:
        assert {i for r in rows for i in r["instruction_id_list"]} == set(ifeval_rules.INSTRUCTION_IDS)


def test_rows_pass_checkers_and_describe_in_prompt(built):
    for row in built[0] + built[1]:
        for iid, kw in zip(row["instruction_id_list"], row["kwargs"]):
            ifeval_rules.build_checker(iid, kw, row["prompt"])
            assert ifeval_rules.describe(iid, kw) in row["prompt"]
            if iid == "combination:repeat_prompt":
                assert row["prompt"].startswith(kw["prompt_to_repeat"])
                assert row["instruction_id_list"][-1] == iid  # "does not include this sentence"


def test_no_conflicts_over_many_seeds(tasks):
    seen: Counter[int] = Counter()
    for seed in range(12):
        train, evals = suite.build_suite(tasks, 60, 15, 2, 4, seed=seed)
        for row in train + evals:
            ids = row["instruction_id_list"]
            seen[len(ids)] += 1
            assert len(set(ids)) == len(ids)
            for a, b in combinations(ids, 2):
                assert not suite.conflicts(a, b)
                assert (a, b) not in MUST_NOT_PAIR and (b, a) not in MUST_NOT_PAIR
            for iid, allowed in EXCLUSIVE_ALLOWED.items():
                if iid in ids:
                    assert set(ids) - {iid} <= allowed, ids
            if len(ids) < 2:  # only an exclusive lead may fall short of min_constraints
                assert ids[0] in EXCLUSIVE_ALLOWED
            if "length_constraints:nth_paragraph_first_word" in ids:
                assert "length_constraints:number_paragraphs" not in ids
    assert set(seen) >= {2, 3, 4}


def _checker_arg_names(iid: str) -> set[str]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    params = inspect.signature(INSTRUCTION_DICT[iid].build_description).parameters
    return {p for p in params if p != "self"}


@pytest.mark.parametrize("iid", suite.SUITE_IDS)
def test_sample_kwargs_complete_and_described(iid):
    task = "Write a short poem about a very good dog."
    rng = random.Random(iid)
    for _ in range(20):
        kw = suite.sample_kwargs(iid, rng, task)
        assert set(kw) == _checker_arg_names(iid)
        ifeval_rules.build_checker(iid, kw, task)
        text = ifeval_rules.describe(iid, kw)
        assert text and text == ifeval_rules.describe(iid, kw)
        if iid == "keywords:forbidden_words":  # never forbid a word the task needs
            assert not {"very", "good"} & set(kw["forbidden_words"])
        if iid == "language:response_language":
            assert kw["language"] != "en"
        if iid == "combination:repeat_prompt":
            assert kw == {"prompt_to_repeat": task}


def test_sample_kwargs_ranges():
    rng = random.Random(0)
    for _ in range(200):
        words = suite.sample_kwargs("length_constraints:number_words", rng, "t")
        assert 30 <= words["num_words"] <= 200 and words["relation"] in ("less than", "at least")
        assert 2 <= suite.sample_kwargs("length_constraints:number_sentences", rng, "t")["num_sentences"] <= 8
        assert 2 <= suite.sample_kwargs("length_constraints:number_paragraphs", rng, "t")["num_paragraphs"] <= 4
        nth = suite.sample_kwargs("length_constraints:nth_paragraph_first_word", rng, "t")
        assert 1 <= nth["nth_paragraph"] <= nth["num_paragraphs"] <= 4
        sec = suite.sample_kwargs("detectable_format:multiple_sections", rng, "t")
        assert sec["section_spliter"] in ("Section", "SECTION") and 2 <= sec["num_sections"] <= 4
        assert 2 <= suite.sample_kwargs("detectable_format:number_bullet_lists", rng, "t")["num_bullets"] <= 5
        cap = suite.sample_kwargs("change_case:capital_word_frequency", rng, "t")
        assert 2 <= cap["capital_frequency"] <= 10


def test_unknown_id_rejected():
    with pytest.raises(UserError, match="unknown instruction id"):
        suite.sample_kwargs("nope:nothing", random.Random(0), "t")


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"id": "a", "task": "x"}', '{"id": "b", "task": '], r":2: expected a JSON object"),
        (['{"id": "a", "task": "x"}', "", '{"id": "b"}'], r":3: expected a non-empty string field 'task'"),
        (['{"task": "x"}'], r":1: expected a non-empty string field 'id'"),
        (['{"id": "a", "task": "x"}', '{"id": "b", "task": "y"}', '{"id": "a", "task": "z"}'],
         r":3: duplicate id 'a' \(first on line 1\)"),
        (["[1, 2]"], r":1: expected a JSON object, got list"),
    ],
)
def test_load_seed_tasks_errors(tmp_path, lines, match):
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=re.escape(str(path)) + match):
        suite.load_seed_tasks(path)


def test_build_suite_argument_errors(tasks):
    with pytest.raises(UserError):
        suite.build_suite(tasks, 5, 5, 3, 2, seed=0)
    with pytest.raises(UserError):
        suite.build_suite(tasks[:1], 5, 5, 1, 2, seed=0)


def test_load_eval_rows_rejects_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        suite.load_eval_rows(tmp_path, None, 0)


@pytest.mark.skipif(not IFEVAL.is_file(), reason="shared IFEval copy not present")
def test_load_eval_rows_ifeval_file():
    rows = suite.load_eval_rows(IFEVAL, None, 0)
    assert len(rows) == 541
    assert all(set(r) == {"key", "prompt", "instruction_id_list", "kwargs"} for r in rows)
    sub = suite.load_eval_rows(IFEVAL, 20, 0)
    assert len(sub) == 20 and sub == suite.load_eval_rows(IFEVAL, 20, 0)
    assert sub != suite.load_eval_rows(IFEVAL, 20, 1)
    assert {r["key"] for r in sub} <= {r["key"] for r in rows}


GOOD_ROW = {"key": 1, "prompt": "Write a poem.", "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}]}


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", r":2: expected a JSON object"),
        (json.dumps({**GOOD_ROW, "kwargs": []}), r":2: 'instruction_id_list' has 1 entries"),
        (json.dumps({k: v for k, v in GOOD_ROW.items() if k != "prompt"}), r":2: missing field"),
        (json.dumps({**GOOD_ROW, "instruction_id_list": ["nope:x"]}), r":2: unknown instruction id"),
    ],
)
def test_load_eval_rows_errors(tmp_path, bad, match):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + bad + "\n")
    with pytest.raises(UserError, match=re.escape(str(path)) + match):
        suite.load_eval_rows(path, None, 0)


def test_load_eval_rows_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        suite.load_eval_rows(tmp_path / "absent.jsonl", 5, 0)
