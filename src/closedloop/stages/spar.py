"""SPAR's stages (dvc.yaml `meta: {method: spar}`), one set per iteration (`foreach:
${spar.iterations}`), named `spar_<step>@<iteration>`, plus `spar_init`.

    spar_init     the starting actor (models/base) and refiner (SFT on the rules' judgments and
                  refinements, or a copy of models/base)               models/spar/init/{actor,refiner}
    spar_eval_init  models/base and the starting refiner judge the held-out responses
                                                                       data/spar/judge/{base,init}/
    spar_sample   actor samples n responses per train prompt           data/spar/<it>/samples.jsonl
    spar_judge    the judge verifier scores each response (k votes)    data/spar/<it>/judged.jsonl
    spar_refine   tree search from failing responses                   data/spar/<it>/trees.jsonl
    spar_pairs    DPO pairs (actor) + RFT set (refiner)                data/spar/<it>/{dpo,refiner_sft}.jsonl
    spar_actor    DPO from the previous actor                          models/spar/<it>/actor
    spar_refiner  SFT from the previous refiner                        models/spar/<it>/refiner
    spar_eval     the refiner's judging of the actor's held-out responses (from eval@spar-<it>)
                  and of the reference model's (data/spar/judge/<it>/), scored against the rules;
                  with spar.eval_search, the "+search" metrics

and one pair per ablation (`foreach: ${spar.ablations}`), beside the iteration it ablates:

    spar_ablation_data   the ablation's DPO pairs from that iteration's judged samples
                                                                       data/spar/ablations/<kind>/{trees,dpo}.jsonl
    spar_ablation_actor  DPO from the iteration's starting actor        models/spar/ablations/<kind>/actor

The actor's held-out evaluation is the shared `eval@spar-<it>`; the iteration curve is the rows
base, spar-it1, spar-it2, ... of the comparison report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from closedloop.evaluate.instruction_following import METRICS
from closedloop.io import atomic_dir, read_jsonl, write_json, write_jsonl
from closedloop.methods import spar
from closedloop.stages.common import copy_model, log_training, open_backend

TRAIN = Path("data/suite/train.jsonl")
JUDGE_DIR = Path("data/spar/judge")  # <judge>/records.jsonl: each judge on the same held-out responses


def _prev(params: Any, name: str) -> str:
    return params.spar.iterations[name]


def _generator(backend: Any, sampling: Any, seed: int) -> spar.SeededGenerator:
    return spar.SeededGenerator(backend, sampling.temperature, sampling.top_p, sampling.max_new_tokens, seed)


def _tree_params(t: Any, single_refinement: bool = False):
    """The search's TreeParams from spar.tree; the "no_tree" ablation keeps one refinement only."""
    from closedloop.search.tree import TreeParams

    if single_refinement:
        return TreeParams(t.strategy, 1, 1, 1, t.gate, t.budget)
    return TreeParams(t.strategy, t.width, t.branches, t.max_depth, t.gate, t.budget)


def _refiner(backend: Any, t: Any, seed: int):
    """The refine generator: scaffolded (`Critique:` / `Refined response:` written by us) or free."""
    if t.scaffold:
        return spar.ScaffoldedRefiner(backend, t.temperature, t.top_p, t.critique_tokens, t.max_new_tokens, seed)
    return _generator(backend, t, seed)


def _model_judge_args(params: Any, backend: Any, seed: int) -> tuple[dict, int]:
    """(kwargs for a model judge over `backend`, generations one judgment costs): sampled votes,
    or label scoring of " yes"/" no" after a prefilled "Verdict:" (spar.judge.scoring)."""
    j = params.spar.judge
    if j.scoring == "labels":
        from closedloop.verifiers.judge import label_scored

        return {"score_fn": label_scored(backend.model, backend.tokenizer, params.spar.batch_size)}, 1
    return {"generate_fn": _generator(backend, j, seed), "votes": j.votes}, j.votes


def _judge(params: Any, root: Path, refiner_dir: Path, seed: int):
    """(the judge verifier named by spar.judge.verifier, the refiner's backend or None, generations a
    judgment costs)."""
    from closedloop.verifiers import Source, verifier_class

    model_judge = verifier_class(params.spar.judge.verifier).source == Source.MODEL
    backend = open_backend(params, root, refiner_dir, params.spar.batch_size) if model_judge else None
    return _judge_with(params, backend, seed)


def _judge_with(params: Any, backend: Any, seed: int):
    """(the judge verifier over `backend` (None: a rule verifier), `backend`, generations a judgment costs)."""
    from closedloop.verifiers import get_verifier

    if backend is None:
        return get_verifier(params.spar.judge.verifier), None, 0  # rule checks cost no generations
    kwargs, cost = _model_judge_args(params, backend, seed)
    return get_verifier(params.spar.judge.verifier, **kwargs), backend, cost


def run_init(params: Any, root: Path, key: str | None) -> None:
    """The starting actor (the base) and refiner: the base, or (spar.init.refiner: rules_sft) the
    base fine-tuned on the rules' judgments and on refinements found with the rules judging."""
    s, i = params.spar, params.spar.init.value()
    sample, tree, sft = s.sample.value(), s.tree.value(), s.refiner_sft.value()  # read in either mode
    caps, seed, dtype, batch = (s.max_refinement_examples, s.max_judgment_examples), params.seed, params.model.dtype, s.batch_size
    _ = params.model.trust_remote_code  # open_backend's, read in copy mode too (declared for rules_sft)
    copy_model(root / "models/base", root / spar.model_dir("init", "actor"))
    out = root / spar.data_dir("init")
    if i.refiner == "copy":
        copy_model(root / "models/base", root / spar.model_dir("init", "refiner"))
        write_jsonl(out / "refiner_sft.jsonl", [])
        log_training({"train_examples": 0}, out / "refiner_train_metrics.json")
        return
    from closedloop.chunks import CHUNK_BATCHES, in_chunks, resumable

    rows = read_jsonl(root / TRAIN)[-i.max_prompts:]
    backend = open_backend(params, root, "models/base", batch)
    rules = spar.ExplainedRules()
    # sampling and the rules-judged trees in chunks that outlive a kill (closedloop.chunks), each
    # with its own seeds; then only the refiner's training is lost to a kill
    with resumable(root, "spar_init") as store:
        samples = in_chunks(rows, max(1, CHUNK_BATCHES * batch // i.num_samples),
                            lambda part, index: spar.sample_responses(
                                _generator(backend, sample, seed + 5 + 1000 * index), part, i.num_samples),
                            store, "samples")
        judged = spar.judge_samples(rules, samples)
        roots = spar.failing_roots(judged, tree.roots_per_prompt)
        trees = in_chunks(roots, _roots_per_chunk(batch, tree.width),
                          lambda part, index: spar.refine_trees(
                              part, _refiner(backend, tree, seed + 6 + 1000 * index), rules, _tree_params(tree), 1),
                          store, "trees")
        examples = spar.init_refiner_examples(judged, trees, *caps)
        write_jsonl(out / "refiner_sft.jsonl", examples)
        with atomic_dir(root / spar.model_dir("init", "refiner")) as tmp:
            metrics = train_refiner(root / "models/base", examples, tmp, sft, seed, dtype)
    metrics |= {"init_samples": len(samples), "init_sample_pass_rate": sum(j["rule_verdict"] for j in judged) / len(judged),
                "init_trees": len(trees), "init_successful_trees": sum(t["success"] is not None for t in trees),
                "init_refinements": sum(e["kind"] == "refinement" for e in examples),
                "init_judgments": sum(e["kind"] == "judgment" for e in examples),
                "init_judgments_yes": sum(e.get("verdict") is True for e in examples)}
    log_training(metrics, out / "refiner_train_metrics.json")


def run_sample(params: Any, root: Path, name: str) -> None:
    s = params.spar
    rows = read_jsonl(root / TRAIN)[: s.sample.max_prompts]
    backend = open_backend(params, root, spar.model_dir(_prev(params, name), "actor"), s.batch_size)
    samples = spar.sample_responses(_generator(backend, s.sample, params.seed), rows, s.sample.num_samples)
    write_jsonl(root / spar.data_dir(name) / "samples.jsonl", samples)
    mlflow.log_metrics({"num_prompts": len(rows), "num_samples": len(samples),
                        "generated_tokens": backend.stats["generated_tokens"]})


def run_judge(params: Any, root: Path, name: str) -> None:
    from closedloop.methods.spar_data import judge_accuracy

    judge, _, _ = _judge(params, root, spar.model_dir(_prev(params, name), "refiner"), params.seed + 1)
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


def _roots_per_chunk(batch_size: int, width: int) -> int:
    """Refinement trees per chunk: their first level alone is CHUNK_BATCHES / 4 batches of `width`
    refinements (~21 roots at a batch of 64)."""
    from closedloop.chunks import CHUNK_BATCHES

    return max(1, CHUNK_BATCHES * batch_size // (4 * width))


def _search(params: Any, root: Path, store: Any, name: str, single_refinement: bool,
            seed: int) -> tuple[list[dict], dict]:
    """Refinement trees from the failing responses of iteration `name`'s judged samples, with the
    refiner it starts from: (tree records, metrics). The roots go in chunks that outlive a kill
    (closedloop.chunks: `store`), each searched with its own seeds."""
    from closedloop.chunks import in_chunks

    s, t = params.spar, params.spar.tree
    judged = read_jsonl(root / spar.data_dir(name) / "judged.jsonl")
    roots = spar.failing_roots(judged, t.roots_per_prompt)
    tree = _tree_params(t, single_refinement)
    refiner = spar.model_dir(_prev(params, name), "refiner")
    _, judge_backend, votes = _judge(params, root, refiner, seed + 1)
    backend = judge_backend or open_backend(params, root, refiner, s.batch_size)

    def work(part: list[dict], index: int) -> list[dict]:
        chunk_seed = seed + 1000 * index
        judge = _judge_with(params, judge_backend, chunk_seed + 1)[0]
        return spar.refine_trees(part, _refiner(backend, t, chunk_seed + 2), judge, tree, votes)

    records = in_chunks(roots, _roots_per_chunk(s.batch_size, t.width), work, store)
    ok = [r for r in records if r["success"] is not None]
    stats = backend.stats
    metrics = {"trees": len(records), "successful_trees": len(ok), "success_rate": len(ok) / max(1, len(records)),
               **spar.success_depths(records, tree.max_depth),
               "generations": sum(r["generations"] for r in records),
               "unparseable_refinements": sum(r.get("unparseable", 0) for r in records),
               "prefill_tokens": stats.get("prefill_tokens", 0), "generated_tokens": stats["generated_tokens"],
               "tokens_per_second": stats["generated_tokens"] / stats["seconds"] if stats["seconds"] else 0.0}
    return records, metrics


def run_refine(params: Any, root: Path, name: str) -> None:
    from closedloop.chunks import resumable

    with resumable(root, f"spar_refine@{name}") as store:
        records, metrics = _search(params, root, store, name, single_refinement=False, seed=params.seed)
        write_jsonl(root / spar.data_dir(name) / "trees.jsonl", records)
        write_json(root / spar.data_dir(name) / "refine_metrics.json", metrics)
    mlflow.log_metrics(metrics)


def _rule_agreement(pairs: list[dict], judged: list[dict]) -> dict[str, float]:
    """The share of the DPO pairs' chosen and of their rejected responses that pass the IFEval
    rules: the held-out oracle, read here only to report (no training signal comes from it). A
    self-play judge that prefers responses the rules fail shows as chosen below rejected."""
    from closedloop.verifiers.ifeval_rules import check

    rows = {r["prompt"]: r for r in judged if r.get("instruction_id_list")}
    known = [(p, rows[p["prompt"]]) for p in pairs if p["prompt"] in rows]
    if not known:
        return {}

    def passing(side: str) -> float:
        return sum(check(r["prompt"], r["instruction_id_list"], r["kwargs"], p[side]).strict_all
                   for p, r in known) / len(known)
    return {"pairs_chosen_rule_pass": passing("chosen"), "pairs_rejected_rule_pass": passing("rejected")}


def _log_pairs(pairs: list[dict], metrics: dict, out: Path) -> None:
    import pandas as pd

    write_json(out, metrics)
    mlflow.log_metrics(metrics)
    if pairs:
        mlflow.log_table(pd.DataFrame(pairs)[["prompt", "chosen", "rejected"]], "dpo_pairs.json")


def run_pairs(params: Any, root: Path, name: str) -> None:
    from closedloop.methods.spar_data import dpo_pairs, refiner_rft_set

    s, d = params.spar, root / spar.data_dir(name)
    judged, trees = read_jsonl(d / "judged.jsonl"), read_jsonl(d / "trees.jsonl")
    pairs = dpo_pairs(trees)
    rft = refiner_rft_set(judged, trees, s.max_refinement_examples, s.max_judgment_examples)
    write_jsonl(d / "dpo.jsonl", pairs)
    write_jsonl(d / "refiner_sft.jsonl", rft)
    judgments = [r for r in rft if r["kind"] == "judgment"]
    _log_pairs(pairs, _rule_agreement(pairs, judged) | {"dpo_pairs": len(pairs), "refiner_refinements": len(rft) - len(judgments),
                       "refiner_judgments": len(judgments), "refiner_judgments_yes": sum(r["verdict"] for r in judgments),
                       "refiner_judgments_from_samples": sum(r["source"] == "samples" for r in judgments)},
               d / "pairs_metrics.json")


def run_ablation_data(params: Any, root: Path, kind: str) -> None:
    """An ablation's DPO pairs from its iteration's judged samples: no_tree refines each failing
    response once (no tree), no_refine pairs the best and worst sample (no refinement)."""
    from closedloop.chunks import resumable

    s, of, seed = params.spar, params.spar.ablations[kind]["of"], params.seed + 7
    # what no_tree's search reads, declared for either kind (DVC cannot declare per kind)
    _ = s.iterations[of], s.tree.value(), s.judge.value(), s.batch_size, params.model.dtype, params.model.trust_remote_code
    out = root / spar.ablation_dir(kind)
    metrics: dict = {}
    trees: list[dict] = []
    with resumable(root, f"spar_ablation_data@{kind}") as store:
        if kind == "no_tree":
            trees, metrics = _search(params, root, store, of, single_refinement=True, seed=seed)
        judged = read_jsonl(root / spar.data_dir(of) / "judged.jsonl")
        pairs = spar.ablation_pairs(judged, trees, kind)
        write_jsonl(out / "trees.jsonl", trees)
        write_jsonl(out / "dpo.jsonl", pairs)
    _log_pairs(pairs, metrics | _rule_agreement(pairs, judged) | {"dpo_pairs": len(pairs)}, out / "pairs_metrics.json")


def run_ablation_actor(params: Any, root: Path, kind: str) -> None:
    """The ablation's actor: DPO from the actor its iteration starts from, on the ablation's pairs."""
    start = spar.model_dir(params.spar.ablations[kind]["start"], "actor")
    _train_from(params, root / start, root / spar.ablation_dir(kind) / "dpo.jsonl", root / spar.ablation_model_dir(kind),
                root / spar.ablation_dir(kind) / "actor_train_metrics.json", params.spar.dpo.value(), train_actor)


def _train_from(params: Any, start: Path, examples: Path, out: Path, metrics_out: Path, cfg: Any, train) -> None:
    """Train `start` on the examples file into `out`; with no examples, carry `start` forward unchanged."""
    seed, dtype = params.seed, params.model.dtype  # read whether or not there is anything to train on
    rows = read_jsonl(examples)
    if not rows:
        copy_model(start, out)
        metrics: dict = {"train_examples": 0}
    else:
        with atomic_dir(out) as tmp:
            metrics = train(start, rows, tmp, cfg, seed, dtype)
    log_training(metrics, metrics_out)


def _train(params: Any, root: Path, name: str, role: str, train) -> None:
    """Train from the previous iteration's model."""
    cfg = (params.spar.dpo if role == "actor" else params.spar.refiner_sft).value()
    examples = root / spar.data_dir(name) / ("dpo.jsonl" if role == "actor" else "refiner_sft.jsonl")
    _train_from(params, root / spar.model_dir(_prev(params, name), role), examples, root / spar.model_dir(name, role),
                root / spar.data_dir(name) / f"{role}_train_metrics.json", cfg, train)


def train_actor(start: Path, pairs: list[dict], out: Path, cfg: Any, seed: int, dtype: str) -> dict:
    from closedloop.feedback.dpo import train_dpo

    return train_dpo(start, spar.dpo_examples(pairs), out, cfg, seed=seed, dtype=dtype)


def run_actor(params: Any, root: Path, name: str) -> None:
    _train(params, root, name, "actor", train_actor)


def train_refiner(start: Path, examples: list[dict], out: Path, cfg: Any, seed: int, dtype: str) -> dict:
    from closedloop.feedback.sft import train_sft

    examples = [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
    return train_sft(start, examples, out, cfg, seed=seed, dtype=dtype)


def run_refiner(params: Any, root: Path, name: str) -> None:
    _train(params, root, name, "refiner", train_refiner)


def _held_out(root: Path, model: str) -> list[dict]:
    """The instruction-following records of eval@<model>: held-out responses with the rules' verdicts."""
    return [r for r in read_jsonl(root / "data/eval" / model / "records.jsonl") if r["suite"] == "instruction_following"]


def _judge_held_out(params: Any, root: Path, backend: Any, seed: int, out: str) -> tuple[Any, int, dict]:
    """A model judge over `backend` judges the reference model's held-out responses (the same
    responses for every judge, so judges pair up); writes one record per response to
    data/spar/judge/<out>/records.jsonl (`judge_accuracy`: correct against the rules). Returns
    (the judge, generations per judgment, its accuracy metrics)."""
    from closedloop.evaluate.compare import CLUSTER_KEY
    from closedloop.methods.spar_data import judge_accuracy, judging_scores
    from closedloop.verifiers import get_verifier
    from closedloop.verifiers.judge import from_verdict

    kwargs, cost = _model_judge_args(params, backend, seed)
    judge = get_verifier("model_judge", **kwargs)
    rows = _held_out(root, params.evaluate.reference)
    decisions = [from_verdict(v).decision for v in judge.verify_batch(rows)]
    gold = [r["strict"]["follow_all_instructions"] for r in rows]
    write_jsonl(root / JUDGE_DIR / out / "records.jsonl", [
        {"suite": spar.JUDGING_SUITE, "key": r["key"], "decision": d, "gold": g, "scores": judging_scores(d, g, gold),
         **({CLUSTER_KEY: r[CLUSTER_KEY]} if CLUSTER_KEY in r else {})}  # resampled as eval's records are
        for r, d, g in zip(rows, decisions, gold)])
    return judge, cost, judge_accuracy(decisions, gold)


def run_eval_init(params: Any, root: Path, key: str | None) -> None:
    """The base model and the starting refiner as judges of the held-out responses: the points the
    iterations' judging accuracy is compared with."""
    metrics = {}
    for name, model_dir in (("base", "models/base"), ("init", spar.model_dir("init", "refiner"))):
        backend = open_backend(params, root, model_dir, params.spar.batch_size)
        _, _, acc = _judge_held_out(params, root, backend, params.seed + 3, name)
        metrics |= {f"{name}_heldout_judge_{k}": v for k, v in acc.items()}
    write_json(root / spar.data_dir("init") / "eval_metrics.json", metrics)
    mlflow.log_metrics(metrics)


def run_eval(params: Any, root: Path, name: str) -> None:
    """The refiner judges the actor's held-out responses (eval@spar-<name>'s records) and the
    reference model's (the fixed set every iteration's judge is compared on); its accuracy/F1
    against the rules; with spar.eval_search, the paper's "+search" metrics."""
    from closedloop.methods.spar_data import judge_accuracy
    from closedloop.verifiers.judge import from_verdict

    s = params.spar
    results = _held_out(root, f"spar-{name}")
    refiner = open_backend(params, root, spar.model_dir(name, "refiner"), s.batch_size)
    judge, cost, fixed = _judge_held_out(params, root, refiner, params.seed + 3, name)
    judged = [from_verdict(v) for v in judge.verify_batch(results)]
    acc = judge_accuracy([j.decision for j in judged], [r["strict"]["follow_all_instructions"] for r in results])
    metrics = {f"refiner_judge_{k}": v for k, v in acc.items()} | {f"heldout_judge_{k}": v for k, v in fixed.items()}
    if s.eval_search:
        metrics |= _search_at_inference(params, results, judged, refiner, judge, cost)
    write_json(root / spar.data_dir(name) / "eval_metrics.json", metrics)
    mlflow.log_metrics(metrics)


def _search_at_inference(params: Any, results: list[dict], judged: list, refiner: Any, judge: Any, cost: int) -> dict:
    """The paper's "+search": held-out responses the refiner judges as failing are refined by tree
    search (the refiner judging, never the rules); the best node's response replaces them."""
    from dataclasses import asdict

    from closedloop.evaluate.instruction_following import flat_metrics, ifeval_report
    from closedloop.verifiers.ifeval_rules import verify_row

    t = params.spar.tree
    roots = [{**r, "judge": asdict(j)} for r, j in zip(results, judged) if j.decision is False]
    records = spar.refine_trees(roots, _refiner(refiner, t, params.seed + 4), judge, _tree_params(t), cost)
    improved = {r["row"]["key"]: max(r["nodes"], key=lambda n: (n["value"] or 0.0, -n["id"]))["response"]
                for r in records}
    final = [verify_row({**r, "response": improved.get(r["key"], r["response"])}) for r in results]
    report = flat_metrics(ifeval_report(final, n_bootstrap=params.evaluate.bootstrap, seed=params.seed))
    return {f"search_{k}": report[k] for k in METRICS} | {"search_trees": len(records)}


STAGES = {"spar_init": run_init, "spar_sample": run_sample, "spar_judge": run_judge, "spar_refine": run_refine,
          "spar_pairs": run_pairs, "spar_actor": run_actor, "spar_refiner": run_refiner, "spar_eval": run_eval,
          "spar_eval_init": run_eval_init, "spar_ablation_data": run_ablation_data,
          "spar_ablation_actor": run_ablation_actor}
