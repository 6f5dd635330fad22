"""IFEval's four metrics, bootstrap CIs, flat metric names and the per-instruction plot."""

from __future__ import annotations

import json
import posixpath
import re

import pytest

from closedloop.errors import UserError
from closedloop.evaluate.instruction_following import (
    METRICS,
    flat_metrics,
    ifeval_report,
    per_instruction_rows,
    plot_per_instruction,
)
from closedloop.verifiers import verify_row

A, B, C, D = "punctuation:no_comma", "startend:quotation", "detectable_format:title", "keywords:existence"


def result(ids: list[str], strict: list[bool], loose: list[bool]) -> dict:
    return {
        "prompt": "p",
        "instruction_id_list": ids,
        "kwargs": [{} for _ in ids],
        "response": "r",
        "strict": {"follow_all_instructions": all(strict), "follow_instruction_list": strict},
        "loose": {"follow_all_instructions": all(loose), "follow_instruction_list": loose},
    }


# Hand-computed:
#   prompt-level strict  = 1/3 (only P1 all true)      loose = 2/3 (P1, P3)
#   instruction strict   = (2 + 1 + 0) / 6 = 1/2        loose = (2 + 2 + 1) / 6 = 5/6
RESULTS = [
    result([A, B], [True, True], [True, True]),
    result([A, C, D], [True, False, False], [True, True, False]),
    result([B], [False], [True]),
]


def test_values_by_hand():
    r = ifeval_report(RESULTS, n_bootstrap=200)
    assert r["prompt_level_strict"]["value"] == pytest.approx(1 / 3)
    assert r["prompt_level_loose"]["value"] == pytest.approx(2 / 3)
    assert r["instruction_level_strict"]["value"] == pytest.approx(1 / 2)
    assert r["instruction_level_loose"]["value"] == pytest.approx(5 / 6)
    assert r["num_prompts"] == 3 and r["num_instructions"] == 6
    assert r["per_instruction"] == {
        A: {"strict": 1.0, "loose": 1.0, "count": 2},
        B: {"strict": 0.5, "loose": 1.0, "count": 2},
        C: {"strict": 0.0, "loose": 1.0, "count": 1},
        D: {"strict": 0.0, "loose": 0.0, "count": 1},
    }
    json.dumps(r)  # JSON-serialisable


def test_ci_contains_value_and_is_deterministic():
    many = RESULTS * 20
    r1 = ifeval_report(many, n_bootstrap=500, seed=3)
    assert r1 == ifeval_report(many, n_bootstrap=500, seed=3)
    assert r1 != ifeval_report(many, n_bootstrap=500, seed=4)
    for m in METRICS:
        lo, v, hi = r1[m]["ci_low"], r1[m]["value"], r1[m]["ci_high"]
        assert 0.0 <= lo < v < hi <= 1.0, m
    narrow = ifeval_report(many, n_bootstrap=500, seed=3, confidence=0.5)
    assert narrow["prompt_level_strict"]["ci_high"] - narrow["prompt_level_strict"]["ci_low"] < (
        r1["prompt_level_strict"]["ci_high"] - r1["prompt_level_strict"]["ci_low"]
    )


def test_degenerate_intervals():
    same = [RESULTS[0]] * 5
    r = ifeval_report(same, n_bootstrap=100)
    assert r["prompt_level_strict"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    r0 = ifeval_report(RESULTS, n_bootstrap=0)
    assert all(r0[m]["ci_low"] == r0[m]["value"] == r0[m]["ci_high"] for m in METRICS)


def test_bad_input():
    with pytest.raises(UserError, match="no results"):
        ifeval_report([])
    with pytest.raises(UserError, match="result 1"):
        ifeval_report([RESULTS[0], {"prompt": "p"}])
    with pytest.raises(UserError, match="confidence"):
        ifeval_report(RESULTS, confidence=1.0)


def test_works_on_verify_row_output():
    row = {"prompt": "p", "instruction_id_list": [A], "kwargs": [{}], "response": "no commas"}
    r = ifeval_report([verify_row(row)], n_bootstrap=10)
    assert r["prompt_level_strict"]["value"] == 1.0


def test_flat_metrics_names():
    flat = flat_metrics(ifeval_report(RESULTS, n_bootstrap=50))
    main = {f"{m}{s}" for m in METRICS for s in ("", "_ci_low", "_ci_high")} | {"num_prompts", "num_instructions"}
    per = {f"per_instruction/{i.replace(':', '.')}/{mode}" for i in (A, B, C, D) for mode in ("strict", "loose")}
    assert set(flat) == main | per
    assert flat["prompt_level_strict"] == pytest.approx(1 / 3) and flat["num_instructions"] == 6.0
    for k, v in flat.items():
        # MLflow's portable (Windows) metric-name rule, and names must not normalise to another path.
        assert re.fullmatch(r"[/\w.\- ]+", k) and posixpath.normpath(k) == k, k
        assert isinstance(v, float)


def test_per_instruction_rows():
    rows = per_instruction_rows(ifeval_report(RESULTS, n_bootstrap=10))
    assert [r["instruction_id"] for r in rows] == sorted([A, B, C, D])
    assert rows[0] == {"instruction_id": C, "strict": 0.0, "loose": 1.0, "count": 1}


def test_plot_is_png(tmp_path):
    path = tmp_path / "plots" / "per_instruction.png"
    assert plot_per_instruction(ifeval_report(RESULTS, n_bootstrap=10), path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["per_instruction.png"]  # no temp file left


def test_fact_auc_overall_and_per_kind():
    from closedloop.evaluate.fact_verification import auc_by_kind

    recs = [{"label": True, "p_true": 0.9, "kind": "a"}, {"label": False, "p_true": 0.1, "kind": "a"},
            {"label": True, "p_true": 0.2, "kind": "b"}, {"label": False, "p_true": 0.8, "kind": "b"},
            {"label": True, "p_true": 0.5, "kind": "c"}]  # kind c has one label: no AUC
    auc = auc_by_kind(recs)
    assert auc["fact_auc_a"] == 1.0 and auc["fact_auc_b"] == 0.0 and "fact_auc_c" not in auc
    assert 0.0 < auc["fact_auc"] < 1.0
