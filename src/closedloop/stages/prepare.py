"""Stage `prepare`: the synthetic verifiable instruction suite (train + held-out eval)."""

from collections import Counter
from pathlib import Path

import mlflow

from closedloop.io import write_jsonl
from closedloop.suite import build_suite, load_eval_source, load_seed_tasks

SECTIONS = ("seed", "prepare")
TRAIN = Path("data/suite/train.jsonl")
EVAL = Path("data/suite/eval.jsonl")


def run(params, root: Path, stage: str) -> None:
    p = params.prepare
    seeds = load_seed_tasks(root / p.seeds)
    train, evalset = build_suite(seeds, p.num_train, p.num_eval, p.min_constraints, p.max_constraints, params.seed)
    if p.eval_source != "synthetic":
        source = p.eval_source if p.eval_source.startswith("hf:") else str(root / p.eval_source)
        evalset = load_eval_source(source, p.eval_limit, params.seed)
    elif p.eval_limit is not None:
        evalset = evalset[: p.eval_limit]
    write_jsonl(root / TRAIN, train)
    write_jsonl(root / EVAL, evalset)
    ids = Counter(i for row in train for i in row["instruction_id_list"])
    mlflow.log_metrics({"num_train": len(train), "num_eval": len(evalset), "train_distinct_ids": len(ids)})
