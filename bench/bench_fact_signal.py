"""How much a model's P(true) knows per claim family: ROC AUC and accuracy by kind.

    .venv/bin/python bench/bench_fact_signal.py [--model models/base] [--n 900] [--seed 1]
Scores --n program-made claims (every family in rotation, half true) plus the hand-written set
(data/seeds/facts.jsonl) in `evaluate.claim_format`'s default (fewshot), and prints per kind the
AUC (0.5 is chance), the accuracy of P(true) >= 0.5 and the mean P(true). A family near 0.5 gives
DCT nothing to build on: `facts.kinds` picks the families with signal (experiments/dct.yaml).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from closedloop.evaluate.fact_verification import auc_by_kind, p_true
from closedloop.facts import load_claims, program_claims
from closedloop.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--n", type=int, default=900)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", default="fewshot")
    args = ap.parse_args()
    rows = program_claims(args.n, args.seed) + load_claims(Path("data/seeds/facts.jsonl"), "facts.general")
    model, tok = load_model(Path(args.model), dtype="float32", trust_remote_code=False)
    start = time.perf_counter()
    probs = p_true(model, tok, [r["claim"] for r in rows], args.format, 64)
    records = [{**r, "p_true": p} for r, p in zip(rows, probs)]
    print(f"{len(rows)} claims scored in {time.perf_counter() - start:.0f} s ({args.model}, {args.format})")
    print(f"{'kind':20s} {'n':>5s} {'AUC':>6s} {'acc':>6s} {'mean P(true)':>13s}")
    for key, auc in sorted(auc_by_kind(records).items()):
        kind = key.removeprefix("fact_auc").lstrip("_") or "all"
        sub = [r for r in records if kind == "all" or r["kind"] == kind]
        acc = sum((r["p_true"] >= 0.5) == r["label"] for r in sub) / len(sub)
        print(f"{kind:20s} {len(sub):5d} {auc:6.3f} {acc:6.3f} {sum(r['p_true'] for r in sub) / len(sub):13.2f}")


if __name__ == "__main__":
    main()
