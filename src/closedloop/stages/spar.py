"""SPAR stages, one set per iteration (dvc.yaml: `foreach: ${spar.iterations}`), named
`spar_<step>@<iteration>`, plus `spar_init`, which places the starting actor and refiner.

    spar_sample  actor samples n responses per train prompt           data/spar/<it>/samples.jsonl
    spar_judge   refiner (or rules) judges each response, k votes      data/spar/<it>/judged.jsonl
    spar_refine  tree search from failing responses                    data/spar/<it>/trees.jsonl
    spar_pairs   DPO pairs (actor) + RFT set (refiner)                 data/spar/<it>/{dpo,refiner_sft}.jsonl
    spar_actor   DPO from the previous actor                           models/spar/<it>/actor
    spar_refiner SFT from the previous refiner                         models/spar/<it>/refiner
    spar_eval    actor on the held-out suite; refiner's judging vs rules; the iteration curve
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow

from closedloop.evaluate.instruction_following import METRICS as CURVE_KEYS
from closedloop.io import atomic_dir, read_jsonl, write_json, write_jsonl
from closedloop.methods import spar
from closedloop.verifiers.judge import make_judge

SECTIONS = ("seed", "spar")
BASE = Path("models/base")
TRAIN = Path("data/suite/train.jsonl")
EVAL = Path("data/suite/eval.jsonl")
BASE_METRICS = Path("data/eval/base/metrics.json")


def _split(stage: str) -> tuple[str, str]:
    step, _, name = stage.partition("@")
    return step, name


def _prev(params, name: str) -> str:
    return params.spar.iterations[name]


def _backend(path: Path, params, batch_size: int):
    from closedloop.generate import HFBackend
    from closedloop.models import load_model

    model, tok = load_model(path, dtype=params.model.dtype)
    return HFBackend(model, tok, batch_size=batch_size, share_prefix=True)


def _generator(backend, sampling, seed: int):
    return spar.SeededGenerator(backend, sampling.temperature, sampling.top_p, sampling.max_new_tokens, seed)


def _copy_model(src: Path, dst: Path) -> None:
    """Place a checkpoint copy at dst (hard links where possible: same bytes, no extra disk)."""
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)


def _tree_params(t, single_refinement: bool = False):
    """The search's TreeParams from spar.tree; the "no_tree" ablation keeps one refinement only."""
    from closedloop.search.tree import TreeParams

    if single_refinement:
        return TreeParams(t.strategy, 1, 1, 1, t.gate, t.budget)
    return TreeParams(t.strategy, t.width, t.branches, t.max_depth, t.gate, t.budget)


def run_init(params, root: Path) -> None:
    for role in ("actor", "refiner"):
        _copy_model(root / BASE, root / spar.model_dir("init", role))
    base = json.loads((root / BASE_METRICS).read_text())
    write_json(root / spar.data_dir("init") / "curve.json",
               [{"iteration": "init", **{k: base[k] for k in CURVE_KEYS}}])


def run_sample(params, root: Path, name: str) -> None:
    s = params.spar
    rows = read_jsonl(root / TRAIN)[: s.sample.max_prompts]
    backend = _backend(root / spar.model_dir(_prev(params, name), "actor"), params, s.batch_size)
    samples = spar.sample_responses(_generator(backend, s.sample, params.seed), rows, s.sample.num_samples)
    write_jsonl(root / spar.data_dir(name) / "samples.jsonl", samples)
    mlflow.log_metrics({"num_prompts": len(rows), "num_samples": len(samples),
                        "generated_tokens": backend.stats["generated_tokens"]})


def _judge(params, root: Path, name: str):
    s = params.spar
    if s.judge.mode == "rules":
        return make_judge("rules"), None
    backend = _backend(root / spar.model_dir(_prev(params, name), "refiner"), params, s.batch_size)
    return make_judge(s.judge.mode, _generator(backend, s.judge, params.seed + 1), s.judge.votes), backend


def run_judge(params, root: Path, name: str) -> None:
    from closedloop.methods.spar_data import judge_accuracy

    judge, _ = _judge(params, root, name)
    judged = spar.judge_samples(judge, read_jsonl(root / spar.data_dir(name) / "samples.jsonl"))
    acc = judge_accuracy([j["judge"]["decision"] for j in judged], [j["rule_verdict"] for j in judged])
    roots = spar.failing_roots(judged, params.spar.tree.roots_per_prompt)
    metrics = {f"judge_{k}": v for k, v in acc.items()} | {
        "failing_prompts": len({r["key"] for r in roots}),
        "unparseable_votes": sum(j["judge"]["unparseable"] for j in judged),
        "sample_rule_pass_rate": sum(j["rule_verdict"] for j in judged) / max(1, len(judged))}
    write_jsonl(root / spar.data_dir(name) / "judged.jsonl", judged)
    write_json(root / spar.data_dir(name) / "judge_metrics.json", metrics)
    mlflow.log_metrics(metrics)


def run_refine(params, root: Path, name: str) -> None:
    s, t = params.spar, params.spar.tree
    judged = read_jsonl(root / spar.data_dir(name) / "judged.jsonl")
    roots = spar.failing_roots(judged, t.roots_per_prompt) if s.ablation != "no_refine" else []
    # Ablation "no tree search": a single refinement of each failing response.
    tree = _tree_params(t, single_refinement=s.ablation == "no_tree")
    judge, judge_backend = _judge(params, root, name)
    backend = judge_backend or _backend(root / spar.model_dir(_prev(params, name), "refiner"), params, s.batch_size)
    votes = 0 if s.judge.mode == "rules" else s.judge.votes  # rule checks cost no generations
    records = spar.refine_trees(roots, _generator(backend, t, params.seed + 2), judge, tree, votes) if roots else []
    ok = [r for r in records if r["success"] is not None]
    stats = backend.stats
    metrics = {"trees": len(records), "successful_trees": len(ok), "success_rate": len(ok) / max(1, len(records)),
               "generations": sum(r["generations"] for r in records),
               "prefill_tokens": stats.get("prefill_tokens", 0), "generated_tokens": stats["generated_tokens"],
               "tokens_per_second": stats["generated_tokens"] / stats["seconds"] if stats["seconds"] else 0.0}
    write_jsonl(root / spar.data_dir(name) / "trees.jsonl", records)
    write_json(root / spar.data_dir(name) / "refine_metrics.json", metrics)
    mlflow.log_metrics(metrics)


def run_pairs(params, root: Path, name: str) -> None:
    import pandas as pd

    s, d = params.spar, root / spar.data_dir(name)
    pairs, rft = spar.build_pairs(read_jsonl(d / "judged.jsonl"), read_jsonl(d / "trees.jsonl"), s.ablation,
                                  s.max_refinement_examples, s.max_judgment_examples)
    write_jsonl(d / "dpo.jsonl", pairs)
    write_jsonl(d / "refiner_sft.jsonl", rft)
    metrics = {"dpo_pairs": len(pairs), "refiner_refinements": sum(r["kind"] == "refinement" for r in rft),
               "refiner_judgments": sum(r["kind"] == "judgment" for r in rft)}
    write_json(d / "pairs_metrics.json", metrics)
    mlflow.log_metrics(metrics)
    if pairs:
        mlflow.log_table(pd.DataFrame(pairs)[["prompt", "chosen", "rejected"]], "dpo_pairs.json")


def _train(params, root: Path, name: str, role: str, train) -> None:
    """Train from the previous iteration's model; with no examples, carry that model forward unchanged."""
    start, out = root / spar.model_dir(_prev(params, name), role), root / spar.model_dir(name, role)
    examples = read_jsonl(root / spar.data_dir(name) / ("dpo.jsonl" if role == "actor" else "refiner_sft.jsonl"))
    if not examples:
        _copy_model(start, out)
        metrics: dict = {"train_examples": 0}
    else:
        with atomic_dir(out) as tmp:
            metrics = train(start, examples, tmp)
            for step, loss in metrics.pop("loss_history", []):
                mlflow.log_metric("train_loss", loss, step=step)
    write_json(root / spar.data_dir(name) / f"{role}_train_metrics.json", metrics)
    mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def run_actor(params, root: Path, name: str) -> None:
    from closedloop.feedback.dpo import train_dpo

    def train(start, pairs, out):
        return train_dpo(start, spar.dpo_examples(pairs), out, params.spar.dpo, seed=params.seed,
                         dtype=params.model.dtype)

    _train(params, root, name, "actor", train)


def run_refiner(params, root: Path, name: str) -> None:
    import tempfile

    from closedloop.feedback.dpo import merge_adapter
    from closedloop.feedback.sft import train_sft

    sft = params.spar.refiner_sft

    def train(start, examples, out):
        examples = [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
        if not sft.lora.enabled:
            return train_sft(start, examples, out, sft, seed=params.seed, dtype=params.model.dtype)
        with tempfile.TemporaryDirectory(dir=out.parent) as adapter:
            metrics = train_sft(start, examples, Path(adapter), sft, seed=params.seed, dtype=params.model.dtype)
            merge_adapter(start, Path(adapter), out, dtype=params.model.dtype)
        return metrics

    _train(params, root, name, "refiner", train)


def run_eval(params, root: Path, name: str) -> None:
    from closedloop.evaluate.instruction_following import flat_metrics, ifeval_report
    from closedloop.generate import SamplingParams
    from closedloop.methods.spar_data import judge_accuracy
    from closedloop.verifiers.ifeval_rules import verify_row

    e, s, d = params.evaluate, params.spar, root / spar.data_dir(name)
    rows = read_jsonl(root / EVAL)
    actor = _backend(root / spar.model_dir(name, "actor"), params, e.batch_size)
    sp = SamplingParams(n=1, temperature=e.temperature, top_p=1.0, max_new_tokens=e.max_new_tokens, seed=params.seed)
    outs = actor.generate([[{"role": "user", "content": r["prompt"]}] for r in rows], sp)
    results = [verify_row({**r, "response": o[0].text}) for r, o in zip(rows, outs)]
    metrics = flat_metrics(ifeval_report(results, n_bootstrap=e.bootstrap, seed=params.seed))
    # The refiner's judging of these held-out responses, scored against the rule verifiers.
    refiner = _backend(root / spar.model_dir(name, "refiner"), params, s.batch_size)
    judge = make_judge("model", _generator(refiner, s.judge, params.seed + 3), s.judge.votes)
    judged = judge.judge_batch(results)
    acc = judge_accuracy([j.decision for j in judged], [r["strict"]["follow_all_instructions"] for r in results])
    metrics |= {f"refiner_judge_{k}": v for k, v in acc.items()}
    if s.eval_search:
        metrics |= _search_at_inference(params, results, judged, refiner, judge)
    curve = json.loads((root / spar.data_dir(_prev(params, name)) / "curve.json").read_text())
    curve.append({"iteration": name, **{k: metrics[k] for k in CURVE_KEYS}, "refiner_judge_f1": acc["f1"]})
    write_jsonl(d / "eval_generations.jsonl", results)
    write_json(d / "eval_metrics.json", metrics)
    write_json(d / "curve.json", curve)
    _plot_curve(curve, d / "curve.png")
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(d / "curve.png"))
    mlflow.log_dict({"curve": curve}, "curve.json")


def _search_at_inference(params, results: list[dict], judged: list, refiner, judge) -> dict:
    """The paper's "+search" row: held-out responses the refiner judges as failing are refined by
    tree search (the refiner judging, never the rules); the best node's response replaces them."""
    from dataclasses import asdict

    from closedloop.evaluate.instruction_following import flat_metrics, ifeval_report
    from closedloop.verifiers.ifeval_rules import verify_row

    s, t = params.spar, params.spar.tree
    roots = [{**r, "judge": asdict(j)} for r, j in zip(results, judged) if j.decision is False]
    tree = _tree_params(t)
    records = spar.refine_trees(roots, _generator(refiner, t, params.seed + 4), judge, tree, s.judge.votes)
    improved = {r["row"]["key"]: max(r["nodes"], key=lambda n: (n["value"] or 0.0, -n["id"]))["response"]
                for r in records}
    final = [verify_row({**r, "response": improved.get(r["key"], r["response"])}) for r in results]
    report = flat_metrics(ifeval_report(final, n_bootstrap=params.evaluate.bootstrap, seed=params.seed))
    return {f"search_{k}": report[k] for k in CURVE_KEYS} | {"search_trees": len(records)}


def _plot_curve(curve: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from closedloop.io import atomic_path

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    xs = [c["iteration"] for c in curve]
    for key in CURVE_KEYS:
        ax.plot(xs, [100 * c[key] for c in curve], marker="o", label=key)
    ax.set_xlabel("SPAR iteration")
    ax.set_ylabel("IFEval accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


STEPS = {"spar_sample": run_sample, "spar_judge": run_judge, "spar_refine": run_refine, "spar_pairs": run_pairs,
         "spar_actor": run_actor, "spar_refiner": run_refiner, "spar_eval": run_eval}


def run(params, root: Path, stage: str) -> None:
    step, name = _split(stage)
    if step == "spar_init":
        return run_init(params, root)
    from closedloop.errors import UserError

    if name not in params.spar.iterations:
        raise UserError(f"stage {stage!r}: params.yaml: spar.iterations has no iteration {name!r} "
                        f"(iterations: {', '.join(params.spar.iterations)})")
    STEPS[step](params, root, name)
