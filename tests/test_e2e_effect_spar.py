"""`closedloop effect spar` at tiny sizes: SPAR's effect configuration, self-play judging."""

from __future__ import annotations

import json

import pytest

from closedloop.effects import RESULT_KEYS
from closedloop.methods.spar_data import judge_accuracy, record_to_tree, refine_messages_for
from closedloop.verifiers.judge import format_refinement, parse_verdict
from test_e2e_effect import tiny_effect

pytestmark = pytest.mark.e2e


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# SPAR's effect configuration at tiny sizes: the judge sizes back to TINY_PARAMS', the tree path on.
TINY_SPAR = ["prepare.num_train=8", "prepare.num_eval=6", "spar.judge.max_new_tokens=12", "spar.sample.max_prompts=4",
             "spar.init.max_prompts=4"]


@pytest.fixture(scope="module")
def spar_effect(tmp_path_factory, tiny_judging_model_dir):
    """The tiny model whose votes all parse and split like coin flips (tiny_model.save_tiny_judging_model)."""
    return tiny_effect(tmp_path_factory, tiny_judging_model_dir, "spar", TINY_SPAR)[0]


def test_spar_effect_reports_actor_and_judge_rows(spar_effect):
    data = json.loads((spar_effect / "results/spar.json").read_text())
    judging, strict = "refiner_judging.judge_", "instruction_following.prompt_level_strict"
    assert [(r["model"], r["baseline"], r["metric"]) for r in data["rows"]] == [
        ("spar-it2", "base", strict), ("spar-it1", "base", strict),
        ("spar-it1", "spar-no-tree", strict), ("spar-it1", "spar-no-refine", strict),
        ("init", "base", judging + "balanced_accuracy"), ("it1", "init", judging + "balanced_accuracy"),
        ("it2", "it1", judging + "balanced_accuracy"), ("it2", "init", judging + "balanced_accuracy"),
        ("it2", "init", judging + "accuracy"), ("init", "base", judging + "coverage"),
        ("it2", "init", judging + "coverage")]
    assert all(r["n"] == 6 and set(RESULT_KEYS) <= set(r) for r in data["rows"])
    records = _jsonl(spar_effect / "data/spar/judge/init/records.jsonl")
    gold = [r["gold"] for r in records]
    balanced = judge_accuracy([r["decision"] for r in records], gold)["balanced_accuracy"]
    assert data["rows"][4]["value"] == pytest.approx(balanced)


def test_spar_effect_iterations_judge_by_the_refiner_never_the_rules(spar_effect):
    """The rules write only the starting refiner's SFT data; every judgment of an iteration (its
    samples' and its trees' nodes') is the refiner's."""
    init = _jsonl(spar_effect / "data/spar/init/refiner_sft.jsonl")
    judgments = [e for e in init if e["kind"] == "judgment"]
    assert judgments and all(e["source"] == "rules" for e in judgments)
    for e in judgments:  # the compact format: a line per constraint, then the verdict
        *checks, verdict = e["completion"][0]["content"].splitlines()
        assert checks and all(c.endswith((": met", ": not met")) for c in checks)
        assert verdict == f"Verdict: {'yes' if e['verdict'] else 'no'}"
    for it in ("it1", "it2"):
        judged = _jsonl(spar_effect / f"data/spar/{it}/judged.jsonl")
        assert judged and all(j["judge"]["source"] == "model" and len(j["judge"]["texts"]) == 3 for j in judged)
        trees = _jsonl(spar_effect / f"data/spar/{it}/trees.jsonl")
        for tree in trees:
            assert all(len(n["judgment_texts"]) == 3 for n in tree["nodes"])
        # every judgment the refiner learns is one it wrote itself, on a sample or a tree node
        written = {t for j in judged for t in j["judge"]["texts"]} | {
            t for tree in trees for n in tree["nodes"] for t in n["judgment_texts"]}
        rft = _jsonl(spar_effect / f"data/spar/{it}/refiner_sft.jsonl")
        assert all(e["completion"][0]["content"] in written for e in rft if e["kind"] == "judgment")
        # one refinement per successful tree: its final step
        assert sum(e["kind"] == "refinement" for e in rft) == sum(t["success"] is not None for t in trees)
    trained = json.loads((spar_effect / "data/spar/init/refiner_train_metrics.json").read_text())
    assert trained["train_examples"] == len(init) > 0  # the starting refiner was fine-tuned, not copied


def test_spar_effect_ablations_share_the_iterations_samples_and_train_their_own_actors(spar_effect):
    """The paper's ablation table: each ablation of it1 on it1's own judged samples, its actor
    trained from it1's start, evaluated on the same held-out prompts as spar-it1."""
    judged = {(j["prompt"], j["response"]) for j in _jsonl(spar_effect / "data/spar/it1/judged.jsonl")}
    for kind in ("no_tree", "no_refine"):
        pairs = _jsonl(spar_effect / f"data/spar/ablations/{kind}/dpo.jsonl")
        assert all((p["prompt"], p["rejected"]) in judged for p in pairs)  # a sample the iteration judged
        trees = _jsonl(spar_effect / f"data/spar/ablations/{kind}/trees.jsonl")
        assert all(len(t["nodes"]) <= 2 for t in trees) if kind == "no_tree" else trees == []  # one refinement
        assert (spar_effect / f"models/spar/ablations/{kind}/actor/model.safetensors").is_file()
    keys = {name: [r["key"] for r in _jsonl(spar_effect / f"data/eval/{name}/records.jsonl")]
            for name in ("spar-it1", "spar-no-tree", "spar-no-refine")}
    assert keys["spar-it1"] == keys["spar-no-tree"] == keys["spar-no-refine"] and len(keys["spar-it1"]) == 6


def test_spar_trees_grow_past_their_first_level_and_become_pairs_and_refiner_data(spar_effect):
    """Votes that parse and split make the trees SPAR's: a failing root, `width` refinements per
    expanded node, levels until a node passes the gate; each successful tree is one DPO pair
    (its gate-passing node against the root) and one refiner example (that node's step only)."""
    width, gate, max_depth = 3, 0.5, 3  # params.yaml's spar.tree (the effect run sets only the budget)
    deepest, success_depths = 0, []
    for it in ("it1", "it2"):
        d = spar_effect / f"data/spar/{it}"
        judged = _jsonl(d / "judged.jsonl")
        assert all(v is not None for j in judged for v in j["judge"]["votes"])  # every vote parsed
        trees = _jsonl(d / "trees.jsonl")
        assert trees
        for rec in trees:
            nodes = rec["nodes"]
            root = nodes[0]
            assert root["depth"] == 0 and root["decision"] is False and root["value"] <= gate
            children: dict[int, int] = {}
            for n in nodes[1:]:
                assert n["depth"] == nodes[n["parent"]]["depth"] + 1 <= max_depth
                assert [parse_verdict(t) for t in n["judgment_texts"]].count(None) == 0
                children[n["parent"]] = children.get(n["parent"], 0) + 1
            assert set(children.values()) == {width}  # the scaffold makes every refinement parse
            deepest = max(deepest, max(n["depth"] for n in nodes))
            win = rec["success"]
            # the search stops at the first node above the gate: none before it passed
            assert all(n["value"] <= gate for n in nodes[1:win])
            if win is not None:
                assert nodes[win]["value"] > gate
                success_depths.append(nodes[win]["depth"])
        ok = [t for t in trees if t["success"] is not None]
        metrics = json.loads((d / "refine_metrics.json").read_text())
        assert [metrics[f"success_depth_{k}"] for k in (1, 2, 3)] == [
            sum(t["nodes"][t["success"]]["depth"] == k for t in ok) for k in (1, 2, 3)]
        pairs = _jsonl(d / "dpo.jsonl")
        assert [(p["chosen"], p["rejected"], p["depth"]) for p in pairs] == [
            (t["nodes"][t["success"]]["response"], t["nodes"][0]["response"], t["nodes"][t["success"]]["depth"])
            for t in ok]
        rft = _jsonl(d / "refiner_sft.jsonl")
        refinements = [e for e in rft if e["kind"] == "refinement"]
        for e, t in zip(refinements, ok, strict=True):
            tree = record_to_tree(t)
            assert e["prompt"] == refine_messages_for(t["prompt"], tree.path()[-2])  # the final step only
            assert e["completion"][0]["content"] == format_refinement(tree.success.critique or "",
                                                                      tree.success.response)
        sources = {e["source"] for e in rft if e["kind"] == "judgment"}
        assert sources == {"samples", "tree"}  # split votes on the actor's samples and on tree nodes
    # seeded draws: should a library change them so that no tree passes below depth 1, move
    # tiny_model.save_tiny_judging_model's yes_logit (-0.7: 2 of 4 trees at depth 1, 1 at depth 2)
    assert deepest >= 2 and any(k >= 2 for k in success_depths), (deepest, success_depths)
