"""SPAR on a model that cannot follow the refine format: the scaffold makes every refinement
parseable, and the label-scored judge turns the refiner's P(" yes") into a score verdict."""

from __future__ import annotations

import pytest
import torch

from closedloop.backends import make_backend
from closedloop.label_scoring import score_labels
from closedloop.methods.spar import ScaffoldedRefiner, SeededGenerator
from closedloop.verifiers.judge import judge_messages, parse_refinement, refine_messages
from tiny_model import make_tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def backend():
    model, tok = make_tiny_model_and_tokenizer()
    return make_backend("hf", model, tok, batch_size=8, show_progress=False)


def test_scaffolded_refinements_always_parse_where_free_ones_do_not(backend):
    chats = [refine_messages("write a short poem about the sea", "the quick brown fox", None),
             refine_messages("please list three colors", "red", "Verdict: no")]
    free = SeededGenerator(backend, 1.0, 1.0, 12, seed=0)(chats, 3)
    assert all(parse_refinement(t) is None for texts in free for t in texts)  # a random model never writes it
    scaffolded = ScaffoldedRefiner(backend, 1.0, 1.0, critique_tokens=6, max_new_tokens=10, seed=0)
    texts = scaffolded(chats, 3)
    assert [len(t) for t in texts] == [3, 3]
    for t in (t for per_chat in texts for t in per_chat):
        assert t.startswith("Critique:") and "\nRefined response:" in t
    assert texts == ScaffoldedRefiner(backend, 1.0, 1.0, 6, 10, seed=0)(chats, 3)  # deterministic by seed
    parsed = [parse_refinement(t) for per_chat in texts for t in per_chat]
    # the format holds by construction; a refinement is unusable only if its response part is empty
    assert sum(p is not None for p in parsed) >= 5


def test_label_scored_p_yes_equals_a_direct_forward(backend):
    model, tok = backend.model, backend.tokenizer
    chat = [*judge_messages("what is two plus two ?", "it is four ."), {"role": "assistant", "content": "Verdict:"}]
    # the tiny WordLevel vocabulary has no yes/no: two of its words stand in for the labels
    (p_yes, p_no), = score_labels(model, tok, [chat], ["four", "red"])
    assert p_yes + p_no == pytest.approx(1.0)
    text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    yes, no = tok.encode("four", add_special_tokens=False)[0], tok.encode("red", add_special_tokens=False)[0]
    expected = torch.softmax(logits[[yes, no]], -1)
    assert p_yes == pytest.approx(expected[0].item(), abs=1e-5)
