"""`closedloop effect spar` at tiny sizes: SPAR's effect configuration, self-play judging."""

from __future__ import annotations

import json

import pytest

from closedloop.effects import RESULT_KEYS
from test_e2e_effect import tiny_effect

pytestmark = pytest.mark.e2e


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# SPAR's effect configuration at tiny sizes: the judge sizes back to TINY_PARAMS', the tree path on.
TINY_SPAR = ["prepare.num_train=8", "prepare.num_eval=6", "spar.judge.max_new_tokens=12", "spar.sample.max_prompts=4",
             "spar.init.max_prompts=4", "spar.ablation=none"]


@pytest.fixture(scope="module")
def spar_effect(tmp_path_factory, tiny_model_dir):
    return tiny_effect(tmp_path_factory, tiny_model_dir, "spar", TINY_SPAR)[0]


def test_spar_effect_reports_actor_and_judge_rows(spar_effect):
    data = json.loads((spar_effect / "results/spar.json").read_text())
    assert [(r["model"], r["metric"]) for r in data["rows"]] == [
        ("spar-it2", "instruction_following.prompt_level_strict"),
        ("spar-it1", "instruction_following.prompt_level_strict"),
        ("it2", "refiner_judging.judge_accuracy"), ("it1", "refiner_judging.judge_accuracy"),
        ("init", "refiner_judging.judge_accuracy")]
    assert all(r["n"] == 6 and set(RESULT_KEYS) <= set(r) for r in data["rows"])


def test_spar_effect_iterations_judge_by_the_refiner_never_the_rules(spar_effect):
    """The rules write only the starting refiner's SFT data; every judgment of an iteration (its
    samples' and its trees' nodes') is the refiner's."""
    init = _jsonl(spar_effect / "data/spar/init/refiner_sft.jsonl")
    judgments = [e for e in init if e["kind"] == "judgment"]
    assert judgments and all(e["completion"][0]["content"].startswith("Constraints:") for e in judgments)
    assert {e["completion"][0]["content"].rsplit("Verdict: ", 1)[1] for e in judgments} <= {"yes", "no"}
    for it in ("it1", "it2"):
        judged = _jsonl(spar_effect / f"data/spar/{it}/judged.jsonl")
        assert judged and all(j["judge"]["source"] == "model" and len(j["judge"]["texts"]) == 3 for j in judged)
        for tree in _jsonl(spar_effect / f"data/spar/{it}/trees.jsonl"):
            assert all(len(n["judgment_texts"]) == 3 for n in tree["nodes"])
        rft = _jsonl(spar_effect / f"data/spar/{it}/refiner_sft.jsonl")
        assert not any(e["completion"][0]["content"].startswith("Constraints:") for e in rft)
    trained = json.loads((spar_effect / "data/spar/init/refiner_train_metrics.json").read_text())
    assert trained["train_examples"] == len(init) > 0  # the starting refiner was fine-tuned, not copied
