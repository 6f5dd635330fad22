"""DCT's recipe (methods/dct.py) and the claim scoring it shares with the evaluation, on plain rows
and a tiny from-config model."""

from __future__ import annotations

import pytest
from tiny_model import make_tiny_model_and_tokenizer

from closedloop.errors import UserError
from closedloop.evaluate.fact_verification import claim_prompt, labels, p_true, training_example
from closedloop.methods import dct


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_model_and_tokenizer()


def fake_generate(outputs: dict[str, list[str]]):
    """A GenerateClaims that answers by the relation asked for (the prompt's wording)."""
    calls = []

    def generate(chats, n, seed):
        calls.append((len(chats), n, seed))
        out = []
        for chat in chats:
            text = chat[0]["content"]
            kind = "implies" if "must also be true" in text else "contradicts" if "cannot be true" in text else "topic"
            out.append(outputs[kind][:n])
        return out

    return generate, calls


def test_graphs_are_stars_of_distinct_claims():
    gen, calls = fake_generate({"implies": ["B holds.", "the seed claim", "B holds!"],
                                "contradicts": ["C holds.", ""]})
    seeds = [{"text": "The seed claim.", "fixed": True, "label": True}]
    (graph,) = dct.build_graphs(seeds, gen, num_implied=3, num_contradicted=2, seed=7)
    # the repeat of the seed, the near-duplicate "B holds!" and the empty claim are dropped
    assert [n["text"] for n in graph["nodes"]] == ["The seed claim.", "B holds.", "C holds."]
    assert graph["edges"] == [[0, 1, "implies"], [0, 2, "contradicts"]]
    assert graph["nodes"][0]["fixed"] and graph["nodes"][0]["label"] is True
    assert not any(n["fixed"] for n in graph["nodes"][1:])
    assert calls == [(1, 3, 7), (1, 2, 8)]  # one seeded batch per relation


def test_pruning_drops_rejected_edges_and_their_claims():
    graph = {"graph": "g0", "nodes": [{"id": i, "text": t} for i, t in enumerate(["A", "B", "C", "D"])],
             "edges": [[0, 1, "implies"], [0, 2, "contradicts"], [0, 3, "implies"]]}
    asked = []

    def p_valid(chats):
        asked.extend(chats)
        return [0.9, 0.1, 0.6]

    (out,), pruned = dct.prune_invalid([graph], p_valid, threshold=0.5)
    assert pruned == 1
    assert [n["text"] for n in out["nodes"]] == ["A", "B", "D"]
    assert out["edges"] == [[0, 1, "implies"], [0, 2, "implies"]]  # renumbered
    assert "must statement B be false" in asked[1][0]["content"]  # the contradiction is asked as one


def scored(p: list[float], edges: list, fixed: dict | None = None) -> dict:
    fixed = fixed or {}
    return {"graph": "g7", "edges": edges,
            "nodes": [{"id": i, "text": f"c{i}", "p_true": q, "fixed": i in fixed, "label": fixed.get(i)}
                      for i, q in enumerate(p)]}


def test_solve_graph_records_own_and_assigned_labels():
    # the seed (0.95) implies node 1 (0.3) and contradicts node 2 (0.8): keeping the seed true
    # (.95 * .3 * .2 = .057) beats dropping it (.05 * .7 * .8 = .028)
    g = scored([0.95, 0.3, 0.8], [[0, 1, "implies"], [0, 2, "contradicts"]])
    solved, stats = dct.solve_graph(g, max_nodes=24, oversize="error")
    assert [n["own"] for n in solved["nodes"]] == [True, False, True]
    assert [n["assigned"] for n in solved["nodes"]] == [True, True, False]
    assert stats["flips"] == 2 and not stats["consistent_before"] and stats["satisfied_before"] == 0


def test_oversized_graph_is_an_error_or_split_as_configured():
    g = scored([0.6] * 5, [[0, i, "implies"] for i in range(1, 5)])
    with pytest.raises(UserError, match=r"'g7'.*5 connected nodes.*max_nodes \(3\)"):
        dct.solve_graph(g, max_nodes=3, oversize="error")
    _, stats = dct.solve_graph(g, max_nodes=3, oversize="split")
    assert stats["edges_dropped_by_split"] == 2  # nodes 3 and 4 lost their edge to the seed, and it is counted
    # separate components are solved separately and never count as oversize
    two = scored([0.6] * 4, [[0, 1, "implies"], [2, 3, "implies"]])
    assert dct.solve_graph(two, max_nodes=2, oversize="error")[1]["edges_dropped_by_split"] == 0


def test_training_rows_take_each_claim_once_with_its_assigned_label():
    graphs = [{"graph": "a", "nodes": [{"text": "X is true.", "assigned": True}, {"text": "Y.", "assigned": False}]},
              {"graph": "b", "nodes": [{"text": "x is TRUE", "assigned": False}]}]
    assert dct.training_rows(graphs) == [{"claim": "X is true.", "label": True, "graph": "a"},
                                         {"claim": "Y.", "label": False, "graph": "a"}]


def test_clean_claim_keeps_one_line():
    assert dct.clean_claim(' **"Paris is in France."**\nMore text') == "Paris is in France."
    assert dct.clean_claim("   \n") == ""


@pytest.mark.parametrize("fmt", ["fewshot", "chat"])
def test_p_true_on_a_tiny_model_is_a_probability(tiny_model, fmt):
    from closedloop.label_scoring import score_labels

    model, tok = tiny_model
    claims = ["2 + 2 = 4.", "The Sun orbits the Earth.", "March comes before July."]
    probs = p_true(model, tok, claims, fmt, batch_size=2)
    assert len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs)
    pairs = score_labels(model, tok, [claim_prompt(c, fmt) for c in claims], labels(fmt))
    for p, (t, f) in zip(probs, pairs):
        assert p == pytest.approx(t) and t + f == pytest.approx(1.0)
    assert len({round(p, 6) for p in probs}) > 1  # the claim changes the score


def test_training_example_is_what_the_scoring_reads():
    ex = training_example("2 + 2 = 4.", True, "fewshot")
    assert ex == {"prompt": claim_prompt("2 + 2 = 4.", "fewshot"), "completion": " true"}
    chat = training_example("2 + 2 = 5.", False, "chat")
    assert chat["completion"] == [{"role": "assistant", "content": "false"}]
    with pytest.raises(UserError, match="claim format"):
        claim_prompt("x", "essay")


def test_balance_repeats_the_rarer_label():
    rows = [{"claim": f"f{i}", "label": False} for i in range(5)] + [{"claim": "t0", "label": True},
                                                                      {"claim": "t1", "label": True}]
    out = dct.balance(rows)
    assert sum(r["label"] for r in out) == sum(not r["label"] for r in out) == 5
    assert out[:7] == rows and [r["claim"] for r in out[7:]] == ["t0", "t1", "t0"]
    assert dct.balance(rows[:5]) == rows[:5]  # one label only: nothing to repeat


def test_heldout_seeds_exclude_every_training_seed():
    train = [{"text": "Paris is in France.", "fixed": True, "label": True}]
    rows = dct.heldout_seeds(["paris is in France", "Rome is in Italy.", "Rome is in Italy!", "Oslo is in Norway."],
                             train, max_seeds=10, seed=0)
    assert [r["text"] for r in rows] == ["Rome is in Italy.", "Oslo is in Norway."]
    assert all(not r["fixed"] and r["label"] is None for r in rows)
    assert len(dct.heldout_seeds([f"Claim {i}." for i in range(30)], train, max_seeds=5, seed=0)) == 5


def test_the_ablation_trains_on_seeds_alone_with_their_given_or_own_labels():
    graphs = [
        {"graph": "g0", "nodes": [{"text": "S0", "fixed": True, "label": False, "p_true": 0.9},
                                  {"text": "I0", "fixed": False, "label": None, "p_true": 0.8}]},
        {"graph": "g1", "nodes": [{"text": "S1", "fixed": False, "label": None, "p_true": 0.7}]},
    ]
    # no implied claim, and a fixed seed keeps its given label whatever the model believes
    assert dct.seed_only_rows(graphs) == [{"claim": "S0", "label": False, "graph": "g0"},
                                          {"claim": "S1", "label": True, "graph": "g1"}]


def test_coherence_records_pair_like_suite_records():
    from closedloop.stages.dct import coherence_records

    graphs = [{"graph": "g0", "edges": [[0, 1, "implies"]]}, {"graph": "g1", "edges": [[0, 1, "contradicts"]]}]
    recs = coherence_records(graphs, [[0.9, 0.2], [0.9, 0.1]])  # g0 breaks its implication; g1 holds
    assert [r["key"] for r in recs] == ["g0", "g1"]
    assert [r["scores"]["coherent"] for r in recs] == [[0.0, 1.0], [1.0, 1.0]]
    assert [r["scores"]["own_true"] for r in recs] == [[1.0, 2.0], [1.0, 2.0]]
