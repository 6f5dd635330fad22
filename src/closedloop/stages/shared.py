"""The stages every method shares (dvc.yaml `meta: {method: shared}`).

    base         model.base -> models/base (safetensors + tokenizer, in model.dtype)
    prepare      the synthetic instruction suite -> data/suite/{train,eval}.jsonl
    facts        labelled claims (program-checked + hand-written, or a hub set) -> data/facts/{train,eval}.jsonl
    eval@<name>  every suite in evaluate.suites on evaluate.models[<name>] -> data/eval/<name>/
    compare      every evaluated model as a row, paired intervals against evaluate.reference -> data/compare/
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import mlflow

from closedloop.errors import UserError
from closedloop.io import atomic_dir, read_jsonl, write_json, write_jsonl, write_text
from closedloop.stages.common import open_backend

TRAIN = Path("data/suite/train.jsonl")
EVAL = Path("data/suite/eval.jsonl")
FACTS = Path("data/facts")
EVAL_DIR = Path("data/eval")
COMPARE_DIR = Path("data/compare")


def run_base(params: Any, root: Path, key: str | None) -> None:
    from closedloop.models import materialise_base

    m = params.model
    with atomic_dir(root / "models/base") as tmp:
        info = materialise_base(root / m.base, tmp, trust_remote_code=m.trust_remote_code, dtype=m.dtype)
    mlflow.log_params({"base.source": info["source"], "base.architecture": info["architecture"]})
    mlflow.log_metric("num_parameters", info["num_parameters"])


def run_prepare(params: Any, root: Path, key: str | None) -> None:
    from closedloop.suite import build_suite, load_seed_tasks

    p = params.prepare
    try:
        seeds = load_seed_tasks(root / p.seeds)
    except UserError as e:
        raise UserError(f"prepare.seeds: {e}") from None
    train, evalset = build_suite(seeds, p.num_train, p.num_eval, p.min_constraints, p.max_constraints, params.seed)
    write_jsonl(root / TRAIN, train)
    write_jsonl(root / EVAL, evalset)
    ids = Counter(i for row in train for i in row["instruction_id_list"])
    mlflow.log_metrics({"num_train": len(train), "num_eval": len(evalset), "train_distinct_ids": len(ids)})


def run_facts(params: Any, root: Path, key: str | None) -> None:
    """Train and eval claim splits: program-made claims split by count, the hand-written ones
    alternately within each label (both splits get half, balanced); or a hub set split by count."""
    from closedloop import facts

    f = params.facts.value()  # the source decides which keys matter: declared and read whole
    if f.source == "hub":
        h = f.hub
        rows = facts.load_hub_claims(h.dataset, h.split, h.claim_column, h.label_column, h.config)
        train, evalset = facts.split_claims(rows, f.num_train, f.num_eval, params.seed)
    else:
        general = [r for r in facts.load_claims(root / f.general, "facts.general")
                   if f.kinds is None or facts.GENERAL in f.kinds]
        try:
            made = facts.program_claims(f.num_train + f.num_eval, params.seed, f.kinds)
        except ValueError as err:  # the kinds asked for cannot make that many distinct claims
            raise UserError(f"facts.kinds: {err}; add kinds or lower facts.num_train + facts.num_eval") from None
        train, evalset = facts.split_claims(made, f.num_train, f.num_eval, params.seed)
        by_label = [[r for r in general if r["label"] == v] for v in (True, False)]
        train += [r for rows in by_label for r in rows[1::2]]
        evalset += [r for rows in by_label for r in rows[0::2]]
    write_jsonl(root / FACTS / "train.jsonl", train)
    write_jsonl(root / FACTS / "eval.jsonl", evalset)
    mlflow.log_metrics({"num_train": len(train), "num_eval": len(evalset),
                        "eval_true_fraction": sum(r["label"] for r in evalset) / len(evalset)})


def run_eval(params: Any, root: Path, name: str | None) -> None:
    """One model through every suite: the same prompts and decoding for every model, so the
    metric names line up in MLflow's compare view and in the comparison report."""
    import pandas as pd

    from closedloop.chunks import resumable
    from closedloop.evaluate.suites import get_suite

    e = params.evaluate
    # inputs first: bad examples fail before the model loads
    suites = {n: (get_suite(n), get_suite(n).load(params, root)) for n in e.suites}
    try:
        backend = open_backend(params, root, e.models[name], e.batch_size)
    except UserError as err:
        raise UserError(f"evaluate.models.{name}: {err}") from None
    with resumable(root, f"eval@{name}") as chunks:
        records, metrics = _evaluate(params, suites, backend, chunks)
        write_jsonl(root / EVAL_DIR / name / "records.jsonl", records)
        write_json(root / EVAL_DIR / name / "metrics.json", metrics)
    mlflow.log_metrics(metrics)
    stats = getattr(backend, "stats", {})
    if stats.get("seconds"):
        mlflow.log_metric("tokens_per_second", stats["generated_tokens"] / stats["seconds"])
    mlflow.log_table(pd.DataFrame([{k: r.get(k) for k in ("suite", "key", "prompt", "response")} for r in records]),
                     "generations.json")


def _evaluate(params: Any, suites: dict, backend: Any, chunks: Any) -> tuple[list[dict], dict]:
    """Every suite's records and metrics. Examples go in chunks of a few batches that outlive a
    kill (closedloop.chunks); a suite's records are per example, so chunks concatenate to the
    whole (each chunk is one call with the run's seed: for sampled decoding, chunks share streams)."""
    from closedloop.chunks import CHUNK_BATCHES, in_chunks
    from closedloop.evaluate.bootstrap import ratio_interval

    e = params.evaluate
    records, metrics = [], {}
    for suite_name, (suite, examples) in suites.items():
        rows = in_chunks(examples, CHUNK_BATCHES * e.batch_size,
                         lambda part, _, suite=suite: suite.run(params, part, backend), chunks, suite_name)
        records += rows
        for m in suite.metrics:
            num = [r["scores"][m][0] for r in rows]
            den = [r["scores"][m][1] for r in rows]
            iv = ratio_interval(num, den, e.bootstrap, params.seed)
            metrics |= {m: iv["value"], f"{m}_ci_low": iv["ci_low"], f"{m}_ci_high": iv["ci_high"]}
        metrics |= suite.summary(rows)
        metrics[f"{suite_name}_examples"] = len(rows)
    return records, metrics


def run_compare(params: Any, root: Path, key: str | None) -> None:
    from closedloop.evaluate import compare
    from closedloop.evaluate.suites import get_suite

    e = params.evaluate
    names = list(e.models)
    missing = [n for n in names if not (root / EVAL_DIR / n / "records.jsonl").is_file()]
    if missing:
        raise UserError(f"compare: no evaluation for {', '.join(missing)} in {EVAL_DIR}/ (run eval@{missing[0]} first)")
    records = {n: read_jsonl(root / EVAL_DIR / n / "records.jsonl") for n in names}
    # Method reports: a method stage may write data/eval/<method>/records.jsonl whose records name
    # their row (`model`): rows of a shared suite join its table (e.g. proxy decoding's
    # instruction_following), rows of a suite of its own get one table (e.g. SPCT's reward_accuracy).
    extra: dict[str, dict[str, list[dict]]] = {}
    for path in sorted((root / EVAL_DIR).glob("*/records.jsonl")):
        if path.parent.name in names:
            continue
        for suite_name, by_model in _method_report(path).items():
            table = extra.setdefault(suite_name, {})
            taken = set(table) | (set(names) if suite_name in e.suites else set())  # a shared suite has eval@ rows
            if clash := sorted(taken & set(by_model)):
                raise UserError(f"compare: {path}: rows {clash} of suite {suite_name} are already rows of another report")
            table.update(by_model)
    sections, results, rows, deltas = [], {}, [], {}
    for suite_name in [*e.suites, *sorted(set(extra) - set(e.suites))]:
        if suite_name in e.suites:
            suite = get_suite(suite_name)
            metrics, label = suite.metrics, suite.breakdown_label
            by_model = {n: [r for r in recs if r["suite"] == suite_name] for n, recs in records.items()}
        else:
            metrics, label, by_model = tuple(next(iter(extra[suite_name].values()))[0]["scores"]), "source", {}
        by_model |= extra.get(suite_name, {})
        ref = e.reference if e.reference in by_model else next(iter(by_model))
        result = compare.compare_suite(by_model, metrics, ref, e.bootstrap, params.seed)
        results[suite_name] = result
        sections.append(compare.markdown(suite_name, result, label))
        if samples := compare.samples_markdown(suite_name, by_model, ref, metrics[0]):
            sections.append(samples)
        rows += compare.plot_rows(suite_name, result)
        deltas[suite_name] = _log_deltas(result)
        if suite_name in e.suites:
            compare.plot(suite_name, result, root / COMPARE_DIR / f"{suite_name}.png")
            mlflow.log_artifact(str(root / COMPARE_DIR / f"{suite_name}.png"))
    report = "\n".join(sections)
    write_text(root / COMPARE_DIR / "report.md", report)
    write_json(root / COMPARE_DIR / "report.json", results)
    write_json(root / COMPARE_DIR / "plot.json", rows)
    # The paired differences as DVC metrics: `dvc exp show` puts each sweep point's gain beside its params.
    write_json(root / COMPARE_DIR / "metrics.json", deltas)
    mlflow.log_artifact(str(root / COMPARE_DIR / "report.md"))
    print(report)


def _log_deltas(result: dict) -> dict:
    """{model: {metric: value and paired difference}} of one suite's result, also logged to MLflow."""
    out = {}
    for n, entry in result["models"].items():
        out[n] = {m: {"value": entry["metrics"][m]["value"], "diff": d["value"], "diff_ci_low": d["ci_low"],
                      "diff_ci_high": d["ci_high"]} for m, d in entry["diff"].items()}
        for m, d in entry["diff"].items():
            mlflow.log_metrics({f"{n}/{m}": entry["metrics"][m]["value"], f"{n}/{m}_diff": d["value"],
                                f"{n}/{m}_diff_ci_low": d["ci_low"], f"{n}/{m}_diff_ci_high": d["ci_high"]})
    return out


def _method_report(path: Path) -> dict[str, dict[str, list[dict]]]:
    """{suite: {row name: records}} of a method's report file; every record must name its `model`."""
    out: dict[str, dict[str, list[dict]]] = {}
    for r in read_jsonl(path):
        if "model" not in r or "suite" not in r:
            raise UserError(f"compare: {path}: expected records with `suite` and `model` (a method's report rows)")
        out.setdefault(r["suite"], {}).setdefault(r["model"], []).append(r)
    return out


STAGES = {"base": run_base, "prepare": run_prepare, "facts": run_facts, "eval": run_eval, "compare": run_compare}
