"""DCT's stages (dvc.yaml `meta: {method: dct}`): seed, expand, score, solve, train, coherence.

    dct_seed         seed claims by dct.seeds.mode                   data/dct/seeds.jsonl
    dct_expand       one graph per seed, and per held-out claim: implied and contradicting claims
                     (models/base writes them)          data/dct/{graphs,heldout_graphs}.jsonl
    dct_score        P(true) of every node (models/base, label scoring) data/dct/scored.jsonl
    dct_solve        the most probable consistent assignment per graph data/dct/solved.jsonl, metrics
    dct_train        SFT from models/base on the assignment          models/dct
    dct_train_seeds  the same SFT on the seeds alone (the ablation)  models/dct-seeds
    dct_coherence    how often each model's own labels satisfy the held-out graphs
                                                                     data/dct/coherence/<model>/records.jsonl

The fact-verification accuracy of base vs DCT is the shared `eval@dct` (evaluate.models.dct:
models/dct) with the `fact_verification` suite, in the comparison report; the ablation's is
`eval@dct-seeds` where evaluate.models names it (the effect run, experiments/dct.yaml).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow

from closedloop.errors import UserError
from closedloop.io import atomic_dir, iter_param_jsonl, read_jsonl, write_json, write_jsonl
from closedloop.methods import dct
from closedloop.stages.common import log_training, open_backend

DATA = Path("data/dct")


def _texts(path: Path, key: str, where: str) -> list[str]:
    """The non-empty string `key` of every line of a jsonl file; one error naming file:line otherwise."""
    out = []
    for lineno, row in iter_param_jsonl(path, where):
        value = row.get(key) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: {path.name}:{lineno}: {key}: expected a non-empty string, got {value!r}")
        out.append(value.strip())
    if not out:
        raise UserError(f"{where}: {path.name}: no lines; expected one {{\"{key}\": ...}} object per line")
    return out


def _claim_generator(backend: Any, sampling: Any) -> dct.GenerateClaims:
    """Claims through a one-segment scaffold: the answer opens with `Statement:` (written by us)
    and ends at the first newline, so every output is one claim whatever the model writes."""
    from closedloop.generate import SamplingParams
    from closedloop.structured import Segment, generate_scaffold

    def generate(chats: list[list[dict]], n: int, seed: int) -> list[list[str]]:
        sp = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                            max_new_tokens=sampling.max_new_tokens, seed=seed)
        outs = generate_scaffold(backend, chats, [Segment(dct.CLAIM_HEADER, sampling.max_new_tokens, ("\n",))], sp)
        return [[dct.clean_claim(o.segments[0]) for o in per_chat] for per_chat in outs]

    return generate


def run_seed(params: Any, root: Path, key: str | None) -> None:
    from closedloop.facts import load_claims

    s = params.dct.seeds.value()  # the mode decides which keys matter; the stage declares them all
    # Read in every mode, as dvc.yaml declares them for the stage (one declared set, not one per mode).
    eval_claims, batch_size = params.evaluate.claims, params.dct.batch_size
    dtype, remote_code = params.model.dtype, params.model.trust_remote_code  # noqa: F841 - read for the record
    if s.mode == "unsupervised":
        topics = _texts(root / s.topics, "topic", "dct.seeds.topics")
        backend = open_backend(params, root, "models/base", batch_size)
        rows = dct.seeds_from_topics(topics, _claim_generator(backend, s), s.claims_per_topic, params.seed)
    elif s.mode == "supervised":
        rows = dct.seed_rows_from_claims(load_claims(root / s.claims, "dct.seeds.claims"), True, "supervised")
    elif s.mode == "transductive":  # the evaluation's claims, their labels never read
        rows = dct.seed_rows_from_claims(load_claims(root / eval_claims, "evaluate.claims"), False,
                                         "transductive")
    else:
        rows = dct.seed_rows_from_documents([{"text": t} for t in _texts(root / s.documents, "text",
                                                                           "dct.seeds.documents")])
    rows = dct.limit_seeds(rows, s.max_seeds, params.seed)
    if not rows:
        raise UserError(f"dct_seed: the model wrote no usable claim for the topics in {s.topics}; raise "
                        "dct.seeds.max_new_tokens or dct.seeds.claims_per_topic")
    write_jsonl(root / DATA / "seeds.jsonl", rows)
    mlflow.log_metrics({"seeds": len(rows), "fixed_seeds": sum(r["fixed"] for r in rows)})


def run_expand(params: Any, root: Path, key: str | None) -> None:
    """The training graphs from the seeds, and the held-out graphs (coherence's) from
    dct.heldout.claims, both expanded by models/base in the same way."""
    e = params.dct.expand.value()  # validity_threshold matters only with validate: declared and read whole
    h = params.dct.heldout
    seeds = read_jsonl(root / DATA / "seeds.jsonl")
    heldout = dct.heldout_seeds(_texts(root / h.claims, "claim", "dct.heldout.claims"), seeds, h.max_seeds,
                                params.seed)
    if not heldout:
        raise UserError(f"dct.heldout.claims: {h.claims}: every claim is a training seed; name claims that are not")
    backend = open_backend(params, root, "models/base", params.dct.batch_size)
    generate = _claim_generator(backend, e)

    def p_valid(chats: list[list[dict]]) -> list[float]:
        from closedloop.label_scoring import score_labels

        return [p[0] for p in score_labels(backend.model, backend.tokenizer, chats, [" yes", " no"],
                                           params.dct.batch_size)]

    metrics: dict[str, float] = {}
    for name, rows in (("graphs", seeds), ("heldout_graphs", heldout)):
        graphs = dct.build_graphs(rows, generate, e.num_implied, e.num_contradicted, params.seed)
        pruned = 0
        if e.validate:
            graphs, pruned = dct.prune_invalid(graphs, p_valid, e.validity_threshold)
        write_jsonl(root / DATA / f"{name}.jsonl", graphs)
        prefix = "" if name == "graphs" else "heldout_"
        metrics |= {f"{prefix}graphs": len(graphs), f"{prefix}nodes": sum(len(g["nodes"]) for g in graphs),
                    f"{prefix}edges": sum(len(g["edges"]) for g in graphs), f"{prefix}edges_pruned": pruned,
                    f"{prefix}graphs_without_edges": sum(not g["edges"] for g in graphs)}
    mlflow.log_metrics(metrics)


def _score_nodes(params: Any, root: Path, model_dir: str, graphs: list[dict]) -> list[list[float]]:
    """P(true) of every node of every graph under the model at model_dir (each distinct text once)."""
    from closedloop.evaluate.fact_verification import p_true
    from closedloop.models import load_model

    model, tok = load_model(root / model_dir, dtype=params.model.dtype,
                            trust_remote_code=params.model.trust_remote_code)
    texts = sorted({n["text"] for g in graphs for n in g["nodes"]})
    probs = dict(zip(texts, p_true(model, tok, texts, params.evaluate.claim_format, params.dct.batch_size)))
    return [[probs[n["text"]] for n in g["nodes"]] for g in graphs]


def run_score(params: Any, root: Path, key: str | None) -> None:
    graphs = read_jsonl(root / DATA / "graphs.jsonl")
    probs = _score_nodes(params, root, "models/base", graphs)
    scored = [{**g, "nodes": [{**n, "p_true": p} for n, p in zip(g["nodes"], ps)]} for g, ps in zip(graphs, probs)]
    write_jsonl(root / DATA / "scored.jsonl", scored)
    flat = [p for ps in probs for p in ps]
    mlflow.log_metrics({"nodes": len(flat), "mean_p_true": sum(flat) / max(1, len(flat)),
                        "own_true_fraction": sum(p >= 0.5 for p in flat) / max(1, len(flat))})


def run_solve(params: Any, root: Path, key: str | None) -> None:
    import pandas as pd

    c = params.dct.consistency
    graphs = read_jsonl(root / DATA / "scored.jsonl")
    start = time.perf_counter()
    solved, stats = [], []
    for g in graphs:
        try:
            out, st = dct.solve_graph(g, c.max_nodes, c.oversize)
        except UserError as err:
            raise UserError(f"{DATA / 'scored.jsonl'}: {err}") from None
        solved.append(out)
        stats.append(st)
    seconds = time.perf_counter() - start
    edges = sum(s["edges"] for s in stats)
    free = sum(s["free_nodes"] for s in stats)
    metrics = {
        "graphs": len(stats), "nodes": sum(s["nodes"] for s in stats), "edges": edges,
        "flips": sum(s["flips"] for s in stats),
        "flip_rate": sum(s["flips"] for s in stats) / max(1, free),  # of the nodes whose label was free
        "coherence_before": sum(s["consistent_before"] for s in stats) / max(1, len(stats)),
        "edge_satisfaction_before": sum(s["satisfied_before"] for s in stats) / max(1, edges),
        "edges_dropped_by_split": sum(s["edges_dropped_by_split"] for s in stats),
        "max_graph_nodes": max((s["nodes"] for s in stats), default=0),
        "solve_seconds": seconds,
    }
    write_jsonl(root / DATA / "solved.jsonl", solved)
    write_json(root / DATA / "solve_metrics.json", metrics)
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(root / DATA / "solved.jsonl"), artifact_path="graphs")
    mlflow.log_table(pd.DataFrame(stats), "graph_summary.json")


def _train(params: Any, root: Path, rows: list[dict], out: str, metrics_path: Path) -> None:
    """SFT from models/base on (claim, label) rows, in the evaluation's claim format, into `out`."""
    from closedloop.evaluate.fact_verification import training_example
    from closedloop.feedback.sft import train_sft

    fmt = params.evaluate.claim_format
    labelled = dct.balance(rows) if params.dct.balance_labels else rows
    examples = [training_example(r["claim"], r["label"], fmt) for r in labelled]
    with atomic_dir(root / out) as tmp:
        metrics = train_sft(root / "models/base", examples, tmp, params.dct.sft.value(), seed=params.seed,
                            dtype=params.model.dtype)
        if (tmp / "adapter").is_dir():
            mlflow.log_artifacts(str(tmp / "adapter"), artifact_path="adapter")
    metrics["true_fraction"] = sum(r["label"] for r in rows) / len(rows)
    log_training(metrics, metrics_path)


def run_train(params: Any, root: Path, key: str | None) -> None:
    rows = dct.training_rows(read_jsonl(root / DATA / "solved.jsonl"))
    if not rows:
        raise UserError(f"{DATA / 'solved.jsonl'}: no claims to train on; check dct_expand's output")
    _train(params, root, rows, "models/dct", root / DATA / "train_metrics.json")


def run_train_seeds(params: Any, root: Path, key: str | None) -> None:
    """The ablation: the same SFT on the seed claims alone (models/dct-seeds)."""
    rows = dct.seed_only_rows(read_jsonl(root / DATA / "scored.jsonl"))
    _train(params, root, rows, "models/dct-seeds", root / DATA / "train_seeds_metrics.json")


# The models coherence is measured for, by name (their records: data/dct/coherence/<name>/records.jsonl)
COHERENCE_MODELS = {"base": "models/base", "dct": "models/dct", "dct-seeds": "models/dct-seeds"}
COHERENCE = DATA / "coherence"


def coherence_records(graphs: list[dict], probs: list[list[float]]) -> list[dict]:
    """Per held-out graph, whether the model's own labels (P(true) >= 0.5) satisfy every edge, and
    how many edges they satisfy: records in the evaluation suites' shape, so the comparison and the
    effect runs pair them like any metric."""
    out = []
    for g, ps in zip(graphs, probs):
        own = [p >= 0.5 for p in ps]
        sat, n = dct.coherence([g], lambda _: own)[0]
        seed_true = own[0]  # node 0 is the seed; its edges reach every other node
        out.append({"suite": "coherence", "key": g["graph"], "scores": {
            "coherent": [float(sat == n), 1.0], "edge_satisfaction": [float(sat), float(n)],
            "own_true": [float(sum(own)), float(len(own))],
            # labelling everything false satisfies every edge of these stars: coherence without that
            # trivial part is coherence among the graphs whose seed the model labels true
            "coherent_seed_true": [float(sat == n and seed_true), float(seed_true)],
            "seed_true": [float(seed_true), 1.0]}, "breakdown": {}})
    return out


def run_coherence(params: Any, root: Path, key: str | None) -> None:
    """Coherence of base, DCT and the seeds-only ablation on the held-out graphs (paired bootstrap
    differences), and how much of its chosen labelling DCT learned on its training graphs."""
    import pandas as pd

    from closedloop.evaluate.compare import compare_suite

    graphs = [g for g in read_jsonl(root / DATA / "heldout_graphs.jsonl") if g["edges"]]
    if not graphs:
        raise UserError(f"{DATA / 'heldout_graphs.jsonl'}: no held-out graph has an edge; coherence is undefined")
    trained = read_jsonl(root / DATA / "solved.jsonl")
    # DCT's model is loaded once for both: the held-out graphs, then its own training graphs
    probs = {name: _score_nodes(params, root, model_dir, graphs + trained if name == "dct" else graphs)
             for name, model_dir in COHERENCE_MODELS.items()}
    own_after = probs["dct"][len(graphs):]
    by_model = {name: coherence_records(graphs, ps[:len(graphs)]) for name, ps in probs.items()}
    for name, records in by_model.items():
        write_jsonl(root / COHERENCE / name / "records.jsonl", records)
    metrics_of = ("coherent", "edge_satisfaction", "own_true", "coherent_seed_true", "seed_true")
    b, seed = params.evaluate.bootstrap, params.seed
    result = compare_suite(by_model, metrics_of, "base", b, seed)
    # all-false satisfies every graph: own_true shows whether coherence came from answering "false"
    metrics: dict[str, float] = {"heldout_graphs": len(graphs)} | {
        f"{m}_{name}": row["metrics"][m]["value"] for name, row in result["models"].items() for m in metrics_of}
    vs_ablation = compare_suite({k: by_model[k] for k in ("dct-seeds", "dct")}, ("coherent",), "dct-seeds", b, seed)
    for reference, res in (("base", result), ("dct-seeds", vs_ablation)):
        d = res["models"]["dct"]["diff"]["coherent"]
        metrics |= {f"coherence_diff_vs_{reference}": d["value"], f"coherence_diff_vs_{reference}_ci_low": d["ci_low"],
                    f"coherence_diff_vs_{reference}_ci_high": d["ci_high"]}
    agree = sum((p >= 0.5) == n["assigned"] for g, ps in zip(trained, own_after) for p, n in zip(ps, g["nodes"]))
    metrics["assignment_agreement_train"] = agree / max(1, sum(len(g["nodes"]) for g in trained))
    write_json(root / DATA / "coherence_metrics.json", metrics)
    mlflow.log_metrics(metrics)
    mlflow.log_table(pd.DataFrame([
        {"graph": g["graph"], "nodes": len(g["nodes"]), "edges": len(g["edges"]),
         **{f"coherent_{name}": bool(recs[i]["scores"]["coherent"][0]) for name, recs in by_model.items()}}
        for i, g in enumerate(graphs)]), "heldout_graph_summary.json")


STAGES = {"dct_seed": run_seed, "dct_expand": run_expand, "dct_score": run_score, "dct_solve": run_solve,
          "dct_train": run_train, "dct_train_seeds": run_train_seeds, "dct_coherence": run_coherence}
