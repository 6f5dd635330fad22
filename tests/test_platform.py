"""The method platform's contracts, without running a pipeline: params views, stage dispatch,
target selection, path params as DVC deps, RFT's selection and the paired comparison."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from closedloop.config import load_params, path_params
from closedloop.errors import UserError
from closedloop.evaluate.bootstrap import paired_difference, ratio_interval
from closedloop.evaluate.compare import compare_suite, markdown
from closedloop.methods.rft import select
from closedloop.stage_params import ParamsView, UndeclaredParam, declaration, leaf_keys
from closedloop.stages import get_stage, registry
from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "flows"))
from stage_graph import execution_order, resolve_targets, stage_graph  # noqa: E402


@pytest.fixture(scope="module")
def params():
    return load_params(PROJECT / "params.yaml")


@pytest.fixture(scope="module")
def graph():
    return stage_graph(PROJECT)


def test_view_reads_only_declared_params_and_records_them(params):
    view = ParamsView(params, {"seed", "rft.sft", "evaluate.models.rft"})
    assert view.seed == 0 and view.rft.sft.lora.r == 16
    assert view.evaluate.models["rft"] == "models/rft"
    with pytest.raises(UndeclaredParam, match="'model'"):
        view.model.dtype
    with pytest.raises(UndeclaredParam, match="'rft.num_samples'"):
        view.rft.num_samples
    with pytest.raises(UndeclaredParam, match="'evaluate.models.base'"):
        view.evaluate.models["base"]
    with pytest.raises(UndeclaredParam):
        list(view.evaluate.models)  # iterating needs the whole mapping declared
    assert view.reads == {"seed", "rft.sft.lora.r", "evaluate.models.rft"}
    whole = view.rft.sft.value()
    assert whole is params.rft.sft and "rft.sft" in view.reads
    assert "rft.sft.learning_rate" in leaf_keys(params, view.reads)
    with pytest.raises(AttributeError):
        view.seed = 3


def test_every_dvc_stage_dispatches_to_a_function(graph):
    upstream = graph.upstream
    for stage in upstream:
        fn, key = get_stage(stage)
        assert callable(fn)
        assert key == (stage.partition("@")[2] or None)
    assert {"base", "prepare", "eval", "compare", "rft_sample", "spar_sample"} <= set(registry())
    with pytest.raises(UserError, match="stage 'nope': unknown"):
        get_stage("nope")


def test_every_stage_is_tagged_with_its_method(graph):
    methods = graph.methods
    assert methods["base"] == methods["eval@rft"] == methods["compare"] == "shared"
    assert methods["rft_train"] == "rft" and methods["spar_refine@it1"] == "spar"


def test_a_param_naming_a_path_is_a_dep_of_every_stage_that_declares_it(params):
    from dvc.repo import Repo

    paths = path_params(params)
    assert {"model.base", "prepare.seeds", "evaluate.prompts"} <= set(paths)
    with Repo(str(PROJECT)) as repo:
        stages = list(repo.index.stages)
    checked = 0
    for stage in stages:
        declared = declaration(PROJECT, stage.addressing).params
        deps = {str(d.def_path) for d in stage.deps}
        for key, value in paths.items():
            if any(key == d or key.startswith(d + ".") for d in declared):
                assert value in deps, f"{stage.addressing} reads {key} = {value} but does not depend on it"
                checked += 1
    assert checked >= 3


GRAPH = {"base": [], "prepare": [], "a1": ["base", "prepare"], "a2": ["a1"], "b1": ["base"],
         "eval@base": ["base", "prepare"], "eval@a": ["a2", "prepare"], "eval@b": ["b1", "prepare"],
         "compare": ["eval@base", "eval@a", "eval@b"]}
METHODS = {"base": "shared", "prepare": "shared", "a1": "a", "a2": "a", "b1": "b", "eval@base": "shared",
           "eval@a": "shared", "eval@b": "shared", "compare": "shared"}


def test_execution_order_whole_graph_is_topological():
    order = execution_order(GRAPH, METHODS)
    assert set(order) == set(GRAPH)
    for s, ups in GRAPH.items():
        assert all(order.index(u) < order.index(s) for u in ups)


def test_a_method_target_selects_its_stages_and_its_evaluation_not_other_methods():
    everything_stale = set(GRAPH)
    order = execution_order(GRAPH, METHODS, ["a"], everything_stale)
    assert order == ["base", "prepare", "a1", "a2", "eval@a"]  # compare waits for b, which is stale
    # once the other methods are up to date, the method's target also refreshes the comparison
    assert "compare" in resolve_targets(GRAPH, METHODS, ["a"], {"a1"})


def test_a_method_reading_another_methods_output_holds_the_comparison_back_once_that_output_changes():
    graph = dict(GRAPH, c1=["a2"], compare=GRAPH["compare"] + ["c1"])  # method c reads a's output
    methods = dict(METHODS, c1="c")
    # a1's params changed: dvc status lists a1 alone, but c1 reruns too, so compare must wait for c
    assert "compare" not in resolve_targets(graph, methods, ["a"], {"a1"})
    assert "c1" not in execution_order(graph, methods, ["a"], {"a1"})


def test_stage_and_group_targets():
    assert execution_order(GRAPH, METHODS, ["base"]) == ["base"]  # no name-prefix surprises
    assert set(execution_order(GRAPH, METHODS, ["eval"])) == set(GRAPH) - {"compare"}
    with pytest.raises(UserError, match="no stage or method named 'c'"):
        execution_order(GRAPH, METHODS, ["c"])


def test_a_cycle_is_one_clear_error():
    with pytest.raises(UserError, match="cycle"):
        execution_order({"x": ["y"], "y": ["x"]})


def _row(key, idx, response, score, finish_reason="stop"):
    return {"key": key, "prompt": f"p{key}", "sample_idx": idx, "response": response, "score": score,
            "finish_reason": finish_reason}


def test_rft_select_keeps_best_distinct_passing_samples_per_prompt():
    scored = [_row(2, 0, "a", 1.0), _row(2, 1, "a", 1.0), _row(2, 2, "b", 0.5), _row(2, 3, "c", 1.0),
              _row(1, 0, "x", 0.4), _row(1, 1, "  ", 1.0), _row(1, 2, "y", 0.75)]
    kept = select(scored, threshold=0.5, max_per_prompt=2)
    assert [(r["key"], r["response"]) for r in kept] == [(1, "y"), (2, "a"), (2, "c")]
    assert select(scored, threshold=1.0, max_per_prompt=1) == [
        {"key": 2, "prompt": "p2", "response": "a", "score": 1.0, "sample_idx": 0}]


def test_rft_select_drops_a_passing_sample_cut_at_the_token_limit():
    scored = [_row(1, 0, "cut mid-sen", 1.0, "length"), _row(1, 1, "whole.", 1.0), _row(2, 0, "cut", 1.0, "length")]
    kept = select(scored, threshold=1.0, max_per_prompt=4)
    assert [(r["key"], r["response"]) for r in kept] == [(1, "whole.")]


def _records(flags: list[int]) -> list[dict]:
    return [{"suite": "s", "key": i, "scores": {"acc": [float(f), 1.0]}, "breakdown": {"g": [float(f), 1.0]}}
            for i, f in enumerate(flags)]


def test_paired_bootstrap_known_answers():
    a, b = np.array([1, 0, 1, 1, 0, 1, 0, 1.0]), np.ones(8)
    same = paired_difference(a, b, a, b, 500, 0)
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "se": 0.0}  # identical models: no uncertainty at all
    plus = np.minimum(a + 1, 1)  # b fixes every failure of a
    d = paired_difference(plus, b, a, b, 500, 0)
    assert d["value"] == pytest.approx(3 / 8) and 0 <= d["ci_low"] <= d["value"] <= d["ci_high"] <= 1
    # the same replicates by hand: resample indices once, difference of the two means
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 8, size=(256, 8))
    idx = np.concatenate([idx, rng.integers(0, 8, size=(244, 8))])
    boots = plus[idx].mean(axis=1) - a[idx].mean(axis=1)
    assert d["ci_low"] == pytest.approx(np.quantile(boots, 0.025)) and d["ci_high"] == pytest.approx(np.quantile(boots, 0.975))
    assert d["se"] == pytest.approx(boots.std(ddof=1))


def test_paired_interval_is_tighter_than_independent_ones():
    rng = np.random.default_rng(1)
    base = (rng.random(200) < 0.5).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:10]] = 1.0  # fixes 10 of the base's failures, 5 points
    one = np.ones(200)
    d = paired_difference(better, one, base, one, 2000, 0)
    width_paired = d["ci_high"] - d["ci_low"]
    ia, ib = ratio_interval(better, one, 2000, 0), ratio_interval(base, one, 2000, 0)
    assert d["ci_low"] > 0  # the paired interval excludes zero...
    assert ia["ci_low"] < ib["ci_high"]  # ...where the two independent intervals overlap
    assert width_paired < (ia["ci_high"] - ia["ci_low"]) / 2


def test_spct_target_runs_its_stages_and_what_they_read(graph):
    """`--target spct` on the real graph: SPCT's seven stages, plus the RFT samples its default data
    source reads, never another method's training or evaluation."""
    upstream, methods = graph.upstream, graph.methods
    order = execution_order(upstream, methods, ["spct"], set(upstream))  # a fresh clone: everything stale
    spct = [s for s in order if methods[s] == "spct"]
    assert spct == [f"spct_{s}" for s in ("data", "rejective", "rft", "grpo", "rm", "meta_rm", "eval")]
    assert {"rft_sample", "rft_verify", "base"} <= set(order)
    assert not {"rft_train", "eval@rft", "dct_train", "spar_actor@it1"} & set(order)


def test_rlhf_and_proxy_targets_run_their_stages_and_what_they_read(graph):
    upstream, methods = graph.upstream, graph.methods
    order = execution_order(upstream, methods, ["rlhf"], set(upstream))
    assert [s for s in order if methods[s] == "rlhf"] == [f"rlhf_{s}" for s in ("prefs", "rm", "policy", "eval")]
    assert {"rft_train", "eval@rft", "eval@base", "eval@rlhf"} <= set(order)  # the SFT model and the rows it judges
    assert not {"spct_grpo", "dct_train", "spar_actor@it1", "proxy_eval"} & set(order)
    order = execution_order(upstream, methods, ["proxy"], set(upstream))
    assert [s for s in order if methods[s] == "proxy"] == [f"proxy_{s}" for s in ("small", "expert", "eval")]
    assert {"rft_verify", "eval@rft", "eval@proxy-expert"} <= set(order)
    assert not {"rlhf_policy", "spct_grpo", "dct_train"} & set(order)


def test_compare_table_rows_diffs_and_breakdown():
    records = {"base": _records([1, 0, 0, 1]), "tuned": _records([1, 1, 0, 1])[::-1]}  # order does not matter
    result = compare_suite(records, ("acc",), "base", 200, 0)
    assert result["models"]["base"]["metrics"]["acc"]["value"] == 0.5 and result["models"]["base"]["diff"] == {}
    assert result["models"]["tuned"]["diff"]["acc"]["value"] == pytest.approx(0.25)
    assert result["breakdown"] == {"g": {"base": 0.5, "tuned": 0.75}}
    table = markdown("s", result, "group")
    assert "| tuned | 4 | 75.0 [" in table and "Δ +25.0 [" in table
    with pytest.raises(UserError, match="different examples"):
        compare_suite({"base": _records([1, 0]), "x": _records([1])}, ("acc",), "base", 10, 0)


def test_the_report_shows_prompts_where_the_models_differ_with_each_answer_side_by_side():
    from closedloop.evaluate.compare import SAMPLE_CHARS, samples_markdown

    def answered(flags: list[int], word: str) -> list[dict]:
        return [{**r, "prompt": f"prompt {r['key']}", "response": f"{word} {r['key']}"} for r in _records(flags)]

    long = "x|y\n" * SAMPLE_CHARS
    records = {"tuned": answered([1, 1, 0, 1, 1], "tuned"), "base": answered([1, 0, 0, 0, 1], "base"),
               "claims": _records([1, 0, 1, 0, 1])}  # a model without answers is left out
    records["tuned"][3]["response"] = long
    text = samples_markdown("s", records, "base", "acc")
    assert [line.split("**")[1] for line in text.splitlines() if line.startswith("**")] == ["1", "3", "0"]
    assert "| base | 0/1 | base 1 |" in text and "| tuned | 1/1 | tuned 1 |" in text  # the reference first
    assert text.index("| base | 0/1 | base 1 |") < text.index("| tuned | 1/1 | tuned 1 |")
    assert "claims" not in text
    assert samples_markdown("s", {"base": _records([1])}, "base", "acc") == ""  # no answers: no section
    records["base"][0]["prompt"] = "Title it <<joy & sorrow>>.\r\nThen"  # IFEval's titles are in double angular brackets
    assert "**0**: Title it &lt;&lt;joy &amp; sorrow&gt;&gt;.<br>Then" in samples_markdown("s", records, "base", "acc")
    # a long answer: cut, its length said, its pipes and newlines kept inside the table's one row
    row = next(line for line in text.splitlines() if line.startswith("| tuned | 1/1 | x"))
    assert row.endswith(f"… ({len(long)} characters) |") and "x\\|y<br>x" in row


def test_secret_named_params_are_never_logged_but_token_counts_are():
    from closedloop.tracking import flatten, is_secret

    assert is_secret("hf_token") and is_secret("api_key") and is_secret("password") and is_secret("token")
    assert not is_secret("max_new_tokens") and not is_secret("critique_tokens")
    assert flatten({"a": {"hf_token": "x", "max_new_tokens": 3}}) == {"a.max_new_tokens": 3}
