"""SPCT's stages (dvc.yaml `meta: {method: spct}`): data, rejective sampling, RFT, GRPO, RMs, evaluation.

    spct_data       reward examples, held out by prompt          data/spct/{train,eval}.jsonl
    spct_rejective  N GRM trajectories per train example (models/base), the rejective filters
                                                                 data/spct/{trajectories,rft}.jsonl, metrics
    spct_rft        rejective fine-tuning: SFT from models/base  models/spct/rft
    spct_grpo       rule-based GRPO (+1 / -1, KL) from models/spct/rft   models/spct/grm, step curves
    spct_rm         the scalar Bradley-Terry RM (models/spct/rm)
    spct_meta_rm    the meta RM (models/spct/meta_rm.json), from the final GRM's own judgments
    spct_eval       accuracy@1 of every judge, voting@k and meta-RM voting@k curves, best-of-N on the
                    policy's samples per selector; rows for the comparison report (data/eval/spct/)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from closedloop.errors import UserError
from closedloop.io import atomic_dir, atomic_path, read_jsonl, write_json, write_jsonl
from closedloop.methods import spct
from closedloop.stages.common import log_training, open_backend, scored_samples

DATA = Path("data/spct")
MODELS = Path("models/spct")
REPORT = Path("data/eval/spct/records.jsonl")  # read by the shared compare stage


def run_data(params: Any, root: Path, key: str | None) -> None:
    d = params.spct.data.value()  # the source decides which keys matter: declared and read whole
    if d.source == "rules":
        samples = scored_samples(root / d.samples, "spct.data.samples")
        examples = spct.examples_from_samples(samples, d.max_pairs_per_prompt, params.seed)
    elif d.source == "pairs":
        examples = spct.load_pair_file(root / d.pairs, "spct.data.pairs", params.seed)
    else:
        examples = spct.load_hub_pairs(d.hub_dataset, d.hub_split, params.seed)
    spct.check_examples(examples, f"spct.data ({d.source})")
    train, evalset = spct.split_examples(examples, d.eval_fraction, d.max_train, d.max_eval, params.seed)
    if not train or not evalset:
        raise UserError(f"spct.data: {len(examples)} examples over too few prompts for a train and a held-out "
                        f"split (got {len(train)} train, {len(evalset)} eval); the rules source needs prompts "
                        "whose samples differ in rule score: raise rft.num_samples or prepare.num_train")
    write_jsonl(root / DATA / "train.jsonl", train)
    write_jsonl(root / DATA / "eval.jsonl", evalset)
    mlflow.log_metrics({"examples": len(examples), "train": len(train), "eval": len(evalset),
                        "eval_prompts": len({e["prompt"] for e in evalset})})


def _grm(params: Any) -> Any:
    return params.spct.grm.value()


def _judge(params: Any, backend: Any, examples: list[dict], n: int, *, greedy: bool = False,
           principles: bool | None = None, hinted: bool = False, seed_offset: int = 0) -> list[list[Any]]:
    from closedloop.generate import derived_seed
    from closedloop.verifiers.grm import judge

    g = _grm(params)
    return judge(backend, examples, n=n, temperature=0.0 if greedy else g.temperature, top_p=g.top_p,
                 principles_tokens=g.principles_tokens, critique_tokens=g.critique_tokens,
                 principles=g.principles if principles is None else principles, score_mode=g.score_mode,
                 seed=derived_seed(params.seed, seed_offset), shuffle=not greedy, hinted=hinted,
                 max_chars=params.spct.data.max_chars, batch_size=params.spct.batch_size)


def _judgment_row(example: dict, j: Any, hinted: bool) -> dict:
    return {"key": example["key"], "text": j.text, "order": j.order, "scores": j.scores, "dists": j.dists,
            "num_tokens": j.num_tokens, "hinted": hinted, "right": spct.rule_reward(example, j.scores) > 0,
            "features": spct.judgment_features(j)}


def run_rejective(params: Any, root: Path, key: str | None) -> None:
    import pandas as pd

    from closedloop.verifiers.grm import grm_messages

    r = params.spct.rejective.value()
    train = read_jsonl(root / DATA / "train.jsonl")
    backend = open_backend(params, root, "models/base", params.spct.batch_size)
    runs = [(False, _judge(params, backend, train, r.num_samples))]
    if r.hinted:
        runs.append((True, _judge(params, backend, train, r.num_samples, hinted=True, seed_offset=1)))
    traj, sft, status_count = [], [], {"kept": 0, "too_easy": 0, "all_wrong": 0}
    failures = total = 0
    principles = _grm(params).principles
    for e, ex in enumerate(train):
        judgments = [j for _, per in runs for j in per[e]]
        traj += [_judgment_row(ex, j, h) for h, per in runs for j in per[e]]
        failures += sum(j.scores is None for j in judgments)
        total += len(judgments)
        status, kept = spct.rejective_filter(ex, runs[0][1][e], r.max_per_example)  # N unhinted decide "too easy"
        if runs[1:] and status != "too_easy":  # hinted trajectories join only if right
            _, hinted_right = spct.rejective_filter(ex, runs[1][1][e], r.max_per_example)
            status, kept = ("kept", (kept + hinted_right)[: r.max_per_example]) if hinted_right else (status, kept)
        status_count[status] += 1
        for j in kept:
            text = spct.training_text(j)
            # train on the prompt as shown, without the hint: the model must learn to judge unaided
            shown = [ex["responses"][i] for i in j.order]
            sft.append({"key": ex["key"], "prompt": grm_messages(ex["prompt"], shown, principles=principles,
                                                                 max_chars=params.spct.data.max_chars),
                        "completion": [{"role": "assistant", "content": text}]})
    write_jsonl(root / DATA / "trajectories.jsonl", traj)
    write_jsonl(root / DATA / "rft.jsonl", sft)
    metrics = {"examples": len(train), "trajectories": total,
               "trajectory_accuracy": sum(t["right"] for t in traj) / max(1, total),
               "parse_failure_rate": failures / max(1, total), "kept_trajectories": len(sft),
               **{f"examples_{k}": v for k, v in status_count.items()}}
    write_json(root / DATA / "rejective_metrics.json", metrics)
    mlflow.log_metrics(metrics)
    mlflow.log_table(pd.DataFrame([{"key": t["key"], "right": t["right"], "hinted": t["hinted"], "text": t["text"]}
                                   for t in traj[:200]]), "trajectories.json")



def run_rft(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.sft import train_sft

    rows = read_jsonl(root / DATA / "rft.jsonl")
    if not rows:
        raise UserError(f"{DATA / 'rft.jsonl'}: no trajectories survived rejective sampling; raise "
                        "spct.rejective.num_samples or turn on spct.rejective.hinted")
    examples = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    with atomic_dir(root / MODELS / "rft") as tmp:
        metrics = train_sft(root / "models/base", examples, tmp, params.spct.sft.value(), seed=params.seed,
                            dtype=params.model.dtype)
    log_training(metrics, root / DATA / "rft_metrics.json")


def run_grpo(params: Any, root: Path, key: str | None) -> None:
    import random

    from transformers import AutoTokenizer

    from closedloop.generate import render_prompt
    from closedloop.feedback.grpo import train_grpo
    from closedloop.structured import continue_prompt
    from closedloop.verifiers.grm import CRITIQUE, PRINCIPLES, grm_messages

    g = _grm(params)
    train = read_jsonl(root / DATA / "train.jsonl")
    tok = AutoTokenizer.from_pretrained(root / MODELS / "rft")
    rng = random.Random(params.seed)
    rows = []
    for ex in train:  # one shuffled order per example; the completion continues the first header
        order = list(range(len(ex["responses"])))
        rng.shuffle(order)
        chat = grm_messages(ex["prompt"], [ex["responses"][i] for i in order], principles=g.principles,
                            max_chars=params.spct.data.max_chars)
        rows.append({"prompt": render_prompt(tok, continue_prompt(chat, PRINCIPLES if g.principles else CRITIQUE)),
                     "best": -1 if ex["best"] is None else ex["best"],
                     "score": -1 if ex["score"] is None else ex["score"], "order": order})
    with atomic_dir(root / MODELS / "grm") as tmp:
        batch_size = params.spct.batch_size  # read in both modes, as dvc.yaml declares it
        reward = spct.grpo_reward if g.score_mode == "parse" else spct.LabelScoredReward(tok, batch_size)
        metrics = train_grpo(root / MODELS / "rft", rows, reward, tmp, params.spct.grpo.value(),
                             seed=params.seed, dtype=params.model.dtype)
    history = metrics.pop("history")
    for h in history:
        mlflow.log_metrics({"reward": h["reward"], "kl": h["kl"], "completion_length": h["completion_length"],
                            "groups_differing": h["groups_differing"]}, step=h["step"])
    write_json(root / DATA / "grpo_steps.json", history)
    metrics |= {"final_reward": history[-1]["reward"] if history else 0.0,
                "first_reward": history[0]["reward"] if history else 0.0,
                # the share of prompt groups GRPO could learn from (0: every advantage was 0)
                "mean_groups_differing": sum(h["groups_differing"] for h in history) / len(history) if history else 0.0}
    log_training(metrics, root / DATA / "grpo_metrics.json")


def run_rm(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.reward_model import conversational_pairs, train_reward_model

    d = params.spct.data.max_chars
    pairs = conversational_pairs(spct.preference_pairs(read_jsonl(root / DATA / "train.jsonl")), d)
    if not pairs:
        raise UserError(f"{DATA / 'train.jsonl'}: no ranked examples to train the scalar reward model on")
    with atomic_dir(root / MODELS / "rm") as tmp:
        metrics = train_reward_model(root / "models/base", pairs, tmp, params.spct.rm.value(), seed=params.seed,
                                     dtype=params.model.dtype)
    log_training(metrics, root / DATA / "rm_metrics.json")


def run_meta_rm(params: Any, root: Path, key: str | None) -> None:
    """The meta RM, from judgments of the model whose votes it filters at evaluation (the final GRM),
    sampled as voting samples them, on the train examples."""
    m = params.spct.meta_rm.value()
    train = read_jsonl(root / DATA / "train.jsonl")
    per = _judge(params, open_backend(params, root, MODELS / "grm", params.spct.batch_size), train, m.num_samples,
                 seed_offset=3)
    traj = [_judgment_row(ex, j, False) for ex, judgments in zip(train, per) for j in judgments]
    write_jsonl(root / DATA / "meta_trajectories.jsonl", traj)
    meta = spct.train_meta_rm([t["features"] for t in traj], [float(t["right"]) for t in traj], m, params.seed)
    write_json(root / MODELS / "meta_rm.json", meta)
    metrics = {"trajectories": len(traj), "trajectory_accuracy": sum(t["right"] for t in traj) / max(1, len(traj)),
               **{f"meta_rm_{k}": v for k, v in meta.items() if k.startswith("train_")}}
    write_json(root / DATA / "meta_rm_metrics.json", metrics)
    mlflow.log_metrics(metrics)


def _best_of_n(params: Any, root: Path, eval_prompts: set[str]) -> tuple[list[dict], dict]:
    """IFEval accuracy of the sample each selector picks among the first N of the policy's samples."""
    from closedloop.verifiers import get_verifier

    ev, d = params.spct.eval, params.spct.data
    samples = [r for r in scored_samples(root / d.samples, "spct.data.samples") if "instruction_id_list" in r]
    held = [r for r in samples if r["prompt"] in eval_prompts] or samples  # held-out prompts when they have samples
    by_key: dict[str, list[dict]] = {}
    for r in sorted(held, key=lambda r: (str(r["key"]), r.get("sample_idx", 0))):
        by_key.setdefault(str(r["key"]), []).append(r)
    keys = sorted(by_key)[: ev.best_of_n_prompts]
    if not keys:
        return [], {}
    flat = [s for k in keys for s in by_key[k][: max(ev.best_of_n)]]
    oracle = get_verifier("ifeval_rules", mode="strict").verify_batch(flat)
    truth = {id(s): v for s, v in zip(flat, oracle)}
    args = {"reward_model": {"model": str(root / MODELS / "rm"), "dtype": params.model.dtype, "max_chars": d.max_chars},
            "generative_rm": {"model": str(root / MODELS / "grm"), "dtype": params.model.dtype,
                              "principles": _grm(params).principles, "score_mode": _grm(params).score_mode,
                              "principles_tokens": _grm(params).principles_tokens,
                              "critique_tokens": _grm(params).critique_tokens, "max_chars": d.max_chars}}
    rows, metrics = [], {}
    for name in ev.selectors:
        verdicts = oracle if name == "ifeval_rules" else get_verifier(name, **args.get(name, {})).verify_batch(flat)
        score = {id(s): v.score for s, v in zip(flat, verdicts)}
        for n in ev.best_of_n:
            strict = loose = 0.0
            for k in keys:
                cands = by_key[k][:n]
                pick = max(range(len(cands)), key=lambda i: (score[id(cands[i])], -i))
                v = truth[id(cands[pick])]
                strict += float(v.passed)
                loose += v.score
            acc = strict / len(keys)
            rows.append({"selector": name, "n": n, "prompt_strict": acc, "instruction_fraction": loose / len(keys)})
            metrics[f"best_of_{n}/{name}"] = acc
    return rows, metrics


def run_eval(params: Any, root: Path, key: str | None) -> None:
    """Every judge on the held-out ranked examples; the report rows are paired on the same examples."""
    from closedloop.feedback.reward_model import load_reward_model, reward_scores
    from closedloop.verifiers.grm import credit

    ev = params.spct.eval.value()
    evalset = read_jsonl(root / DATA / "eval.jsonl")
    ranked = [e for e in evalset if e["best"] is not None]
    if not ranked:
        raise UserError(f"{DATA / 'eval.jsonl'}: no ranked examples to evaluate the judges on")
    ranked = ranked[: params.spct.eval.max_examples]
    meta = json.loads((root / MODELS / "meta_rm.json").read_text())
    credits: dict[str, list[float]] = {}
    failures: dict[str, float] = {}
    tokens: dict[str, float] = {}
    # greedy accuracy@1: the untrained model as a GRM, the ablation without principles, after RFT, after RL
    judges = {"base": ("models/base", None), "grm-rft": (MODELS / "rft", None), "grm": (MODELS / "grm", None),
              "grm-no-principles": (MODELS / "grm", False)}
    backends: dict[str, Any] = {}  # one load per checkpoint

    def backend(model_dir: str | Path) -> Any:
        if str(model_dir) not in backends:
            backends[str(model_dir)] = open_backend(params, root, model_dir, params.spct.batch_size)
        return backends[str(model_dir)]

    for name, (model_dir, principles) in judges.items():
        js = [per[0] for per in _judge(params, backend(model_dir), ranked, 1, greedy=True, principles=principles)]
        credits[name] = [credit(e, j.scores) for e, j in zip(ranked, js)]
        failures[name] = sum(j.scores is None for j in js) / len(js)
    tok, rm = load_reward_model(root / MODELS / "rm", params.model.dtype)
    d = params.spct.data.max_chars
    credits["scalar-rm"] = [credit(e, reward_scores(rm, tok, [e["prompt"]] * len(e["responses"]),
                                                    [r[:d] for r in e["responses"]])) for e in ranked]
    # voting@k over one pool of max(k) sampled judgments per example (shuffled orders, grm.temperature)
    kmax = max(ev.votes)
    pool = _judge(params, backend(MODELS / "grm"), ranked, kmax, seed_offset=2)
    backends.clear()
    curve = []
    for k in sorted(set(ev.votes)):
        for variant, m in (("voting", None), ("meta_rm_voting", meta)):
            c = [spct.voting_credit(e, js, k, m) for e, js in zip(ranked, pool)]
            toks = sum(j.num_tokens for js in pool for j in js[:k]) / len(ranked)
            curve.append({"variant": variant, "k": k, "accuracy": sum(c) / len(c), "tokens_per_example": toks})
            if k == kmax:
                credits[f"grm-{'vote' if m is None else 'meta'}{k}"] = c
                tokens[f"grm-{'vote' if m is None else 'meta'}{k}"] = toks
    failures["grm-sampled"] = sum(j.scores is None for js in pool for j in js) / (kmax * len(ranked))
    bon_rows, bon_metrics = _best_of_n(params, root, {e["prompt"] for e in evalset})
    records = [{"suite": "reward_accuracy", "model": name, "key": e["key"], "source": e["source"],
                "scores": {"reward_accuracy": [c, 1.0]}, "breakdown": {e["source"]: [c, 1.0]}}
               for name, cs in credits.items() for e, c in zip(ranked, cs)]
    write_jsonl(root / REPORT, records)
    write_json(root / DATA / "voting.json", curve)
    write_json(root / DATA / "best_of_n.json", bon_rows)
    metrics = {f"accuracy/{n}": sum(c) / len(c) for n, c in credits.items()}
    metrics |= {f"parse_failure_rate/{n}": v for n, v in failures.items()} | bon_metrics
    metrics["eval_examples"] = len(ranked)
    write_json(root / DATA / "eval_metrics.json", metrics)
    mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
    for row in curve:
        mlflow.log_metric(f"{row['variant']}_accuracy", row["accuracy"], step=row["k"])
    _plot(curve, bon_rows, root / DATA / "scaling.png")
    mlflow.log_artifact(str(root / DATA / "scaling.png"))


def _plot(curve: list[dict], bon: list[dict], path: Path) -> None:
    """Accuracy against k and against generated tokens (voting, meta-RM voting); best-of-N per selector."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    a, b, c = fig.subplots(1, 3)
    for variant in ("voting", "meta_rm_voting"):
        rows = [r for r in curve if r["variant"] == variant]
        a.plot([r["k"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=variant)
        b.plot([r["tokens_per_example"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=variant)
    a.set(xscale="log", xlabel="k (sampled judgments)", ylabel="pairwise accuracy %", title="GRM voting@k")
    b.set(xscale="log", xlabel="generated tokens per example", ylabel="pairwise accuracy %", title="accuracy vs compute")
    for name in sorted({r["selector"] for r in bon}):
        rows = [r for r in bon if r["selector"] == name]
        c.plot([r["n"] for r in rows], [100 * r["prompt_strict"] for r in rows], marker="o", label=name)
    c.set(xscale="log", xlabel="N (policy samples)", ylabel="IFEval prompt strict %", title="best-of-N by selector")
    for ax in (a, b, c):
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


STAGES = {"spct_data": run_data, "spct_rejective": run_rejective, "spct_rft": run_rft, "spct_grpo": run_grpo,
          "spct_rm": run_rm, "spct_meta_rm": run_meta_rm, "spct_eval": run_eval}
