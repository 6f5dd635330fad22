"""Fact verification: is a claim true? Read off the model by label scoring, never by parsing text.

A claim is put to the model in one of a few named formats (`evaluate.claim_format`), and
P(true) is the probability of the true-label continuation, normalised over the two labels
(`closedloop.label_scoring`). The prediction is P(true) >= 0.5. One format serves the
evaluation, DCT's scoring of its graphs and DCT's training examples, so what DCT trains is
what the evaluation reads.

    fewshot  raw text: an instruction, four labelled examples, `Claim: ...` / `Answer:`, labels
             " true" / " false". The default: on SmolLM2-135M the chat formats put nearly every
             claim below 0.5. Even so its P(true) has signal on few claim families: on 940
             program-made and hand-written claims, AUC 0.65 on set membership, 0.52 on
             comparisons, 0.44-0.51 on the rest (each eval logs `fact_auc_<kind>`).
    chat     the chat template: a user question, labels "true" / "false" after the assistant header.

Metric: `fact_accuracy` (ratio of correct predictions; the per-kind breakdown in the report),
beside it the ROC AUC of P(true), overall and per claim kind (`fact_auc`, `fact_auc_<kind>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop.errors import UserError
from closedloop.evaluate.suites import register_suite

if TYPE_CHECKING:  # generate imports torch; loading params (and every light stage) must not
    from closedloop.generate import Prompt

# Four shots, two true and two false, none of them a kind of claim the program-made set words the
# same way (so no eval claim appears in the prompt).
_SHOTS = (
    "Label each claim as true or false.\n"
    "Claim: Three plus four equals seven.\nAnswer: true\n"
    "Claim: The Moon is larger than the Earth.\nAnswer: false\n"
    "Claim: January comes before March.\nAnswer: true\n"
    "Claim: Nine is an even number.\nAnswer: false\n"
)
_QUESTION = "Is the following claim true or false? Answer with one word: true or false.\nClaim: {claim}"

FORMATS = ("fewshot", "chat")


def labels(fmt: str) -> tuple[str, str]:
    """(true label, false label) as continuations of `claim_prompt(..., fmt)`."""
    # After raw text the model writes the space; after a chat header (ending in a newline) it does not.
    return (" true", " false") if fmt == "fewshot" else ("true", "false")


def claim_prompt(claim: str, fmt: str) -> Prompt:
    if fmt == "fewshot":
        return f"{_SHOTS}Claim: {claim}\nAnswer:"
    if fmt == "chat":
        return [{"role": "user", "content": _QUESTION.format(claim=claim)}]
    raise UserError(f"claim format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def p_true(model: Any, tokenizer: Any, claims: Sequence[str], fmt: str, batch_size: int = 32) -> list[float]:
    """P(true) per claim, normalised over the format's two labels."""
    from closedloop.label_scoring import score_labels

    if not claims:
        return []
    probs = score_labels(model, tokenizer, [claim_prompt(c, fmt) for c in claims], labels(fmt), batch_size)
    return [p[0] for p in probs]


def training_example(claim: str, label: bool, fmt: str) -> dict:
    """A TRL prompt-completion example teaching `label` for `claim` in the format the scoring reads."""
    answer = labels(fmt)[0 if label else 1]
    prompt = claim_prompt(claim, fmt)
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": answer}
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}


class FactVerification:
    """Accuracy of P(true) >= 0.5 on the labelled claims at `evaluate.claims`."""

    name = "fact_verification"
    metrics = ("fact_accuracy",)
    breakdown_label = "claim kind"

    def load(self, params: Any, root: Path) -> list[dict]:
        from closedloop.facts import load_claims
        from closedloop.suite import deterministic_subset

        e = params.evaluate
        rows = load_claims(root / e.claims, "evaluate.claims")
        return deterministic_subset(rows, e.limit, params.seed)

    def run(self, params: Any, rows: list[dict], backend: Any) -> list[dict]:
        e = params.evaluate
        probs = p_true(backend.model, backend.tokenizer, [r["claim"] for r in rows], e.claim_format, e.batch_size)
        out = []
        for r, p in zip(rows, probs):
            correct = float((p >= 0.5) == r["label"])
            kind = r.get("kind", "claim")
            out.append({"suite": self.name, "key": r["key"], "claim": r["claim"], "label": r["label"], "p_true": p,
                        "kind": kind, "scores": {"fact_accuracy": [correct, 1.0]},
                        "breakdown": {kind: [correct, 1.0]}})
        return out

    def summary(self, records: list[dict]) -> dict[str, float]:
        return auc_by_kind(records)


def auc_by_kind(records: list[dict]) -> dict[str, float]:
    """ROC AUC of P(true) for the labels, overall (`fact_auc`) and per claim kind (`fact_auc_<kind>`):
    0.5 is chance, whatever the threshold. A kind with one label only has no AUC and is left out."""
    from sklearn.metrics import roc_auc_score

    groups: dict[str, list[dict]] = {"": list(records)}
    for r in records:
        groups.setdefault(r.get("kind", "claim"), []).append(r)
    out = {}
    for kind, rows in groups.items():
        labels = [bool(r["label"]) for r in rows]
        if len(set(labels)) == 2:
            out[f"fact_auc_{kind}" if kind else "fact_auc"] = float(roc_auc_score(labels, [r["p_true"] for r in rows]))
    return out


register_suite(FactVerification())
