"""RLHF's stages (dvc.yaml `meta: {method: rlhf}`): preferences, reward model, policy, evaluation.

    rlhf_prefs   ranked pairs, held out by prompt           data/rlhf/prefs_{train,eval}.jsonl
    rlhf_rm      Bradley-Terry reward model from the SFT model (TRL), held-out pairwise accuracy
                                                             models/rlhf/rm
    rlhf_policy  PPO (or GRPO / RLOO) from the SFT model against the RM, KL to the SFT model
                                                             models/rlhf/policy, per-step curves
    rlhf_eval    on held-out prompts: the RM's score of each model's eval@ responses and its win
                 rate against the SFT model's; KL(policy || SFT) on fresh policy samples; rows for
                 the comparison report (data/eval/rlhf-reward/). IFEval metrics come from eval@rlhf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from closedloop.errors import UserError
from closedloop.io import atomic_dir, read_jsonl, read_prompt_rows, write_json, write_jsonl
from closedloop.methods import rlhf
from closedloop.stages.common import chat, eval_records, log_training, open_backend, scored_samples

DATA = Path("data/rlhf")
MODELS = Path("models/rlhf")
REPORT = Path("data/eval/rlhf-reward/records.jsonl")  # read by the shared compare stage


def _judge_scores(params: Any, root: Path, samples: list[dict]) -> list[float]:
    """RLAIF: the judge model's label-scored P(yes) that each sample follows its instruction."""
    from closedloop.verifiers.judge import judge_messages, label_scored

    backend = open_backend(params, root, params.rlhf.prefs.judge_model, params.rlhf.batch_size)
    score = label_scored(backend.model, backend.tokenizer, params.rlhf.batch_size)
    return score([judge_messages(s["prompt"], s["response"]) for s in samples])


def run_prefs(params: Any, root: Path, key: str | None) -> None:
    from closedloop.methods import spct

    p = params.rlhf.prefs.value()  # the source decides which keys matter: declared and read whole
    # ai_feedback's judge loads in these; declared for it and read in every mode (as dvc.yaml declares them)
    _ = (params.model.dtype, params.model.trust_remote_code, params.rlhf.batch_size)
    metrics: dict[str, float] = {}
    if p.source in ("rules", "ai_feedback"):
        samples = scored_samples(root / p.samples, "rlhf.prefs.samples")
        if p.source == "ai_feedback":
            for s, v in zip(samples, _judge_scores(params, root, samples)):
                s["judge"] = v
            by_rules = {(q["prompt"], q["chosen"], q["rejected"]) for q in rlhf.ranked_pairs(samples)}
            pairs = rlhf.ranked_pairs(samples, "judge")
            # how often the AI labeller agrees with the rules, where the rules rank the pair at all
            ranked = [q for q in pairs if (q["prompt"], q["chosen"], q["rejected"]) in by_rules
                      or (q["prompt"], q["rejected"], q["chosen"]) in by_rules]
            if ranked:
                metrics["ai_rules_agreement"] = sum((q["prompt"], q["chosen"], q["rejected"]) in by_rules
                                                    for q in ranked) / len(ranked)
        else:
            pairs = rlhf.ranked_pairs(samples)
    elif p.source == "pairs":
        pairs = spct.preference_pairs(spct.load_pair_file(root / p.pairs, "rlhf.prefs.pairs", params.seed))
    else:
        pairs = spct.preference_pairs(spct.load_hub_pairs(p.hub_dataset, p.hub_split, params.seed))
    rlhf.check_pairs(pairs, f"rlhf.prefs ({p.source})")
    train, evalset = rlhf.split_pairs(pairs, p.eval_fraction, p.max_pairs, params.seed)
    if not train or not evalset:
        raise UserError(f"rlhf.prefs: {len(pairs)} pairs over too few prompts for a train and a held-out split "
                        f"(got {len(train)} train, {len(evalset)} eval)")
    write_jsonl(root / DATA / "prefs_train.jsonl", train)
    write_jsonl(root / DATA / "prefs_eval.jsonl", evalset)
    metrics |= {"pairs": len(pairs), "train_pairs": len(train), "eval_pairs": len(evalset),
                "train_prompts": len({q["prompt"] for q in train}), "eval_prompts": len({q["prompt"] for q in evalset})}
    write_json(root / DATA / "prefs_metrics.json", metrics)
    mlflow.log_metrics(metrics)



def run_rm(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.reward_model import conversational_pairs, load_reward_model, reward_scores, train_reward_model

    cut = params.rlhf.prefs.max_chars
    train = read_jsonl(root / DATA / "prefs_train.jsonl")
    evalset = read_jsonl(root / DATA / "prefs_eval.jsonl")
    with atomic_dir(root / MODELS / "rm") as tmp:
        # in order: a prompt's comparisons sit side by side (rlhf.split_pairs) and train together
        metrics = train_reward_model(root / params.rlhf.sft_model, conversational_pairs(train, cut), tmp,
                                     params.rlhf.rm.value(), seed=params.seed, dtype=params.model.dtype,
                                     in_order=True)
        tok, rm = load_reward_model(tmp, params.model.dtype)
        prompts = [q["prompt"] for q in evalset]
        chosen = reward_scores(rm, tok, prompts, [q["chosen"][:cut] for q in evalset], params.rlhf.batch_size)
        rejected = reward_scores(rm, tok, prompts, [q["rejected"][:cut] for q in evalset], params.rlhf.batch_size)
    metrics |= {"eval_pairwise_accuracy": rlhf.pairwise_accuracy(chosen, rejected), "eval_pairs": len(evalset),
                "eval_mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(evalset)}
    log_training(metrics, root / DATA / "rm_metrics.json")


class _RewardModel:
    """The trained RM as a reward: r(prompt, response) on the chat rendered as in its training."""

    __name__ = "reward_model"  # TRL names the logged reward after its function

    def __init__(self, path: Path, dtype: str, batch_size: int, max_chars: int) -> None:
        from closedloop.feedback.reward_model import load_reward_model

        self.tok, self.model = load_reward_model(path, dtype)
        self.batch_size, self.max_chars = batch_size, max_chars

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from closedloop.feedback.reward_model import reward_scores

        return reward_scores(self.model, self.tok, prompts, [r[: self.max_chars] for r in responses], self.batch_size)

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        """TRL's reward function (conversational rows: the user turn, the assistant's completion)."""
        return self.score([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])


def run_policy(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.grpo import train_grpo
    from closedloop.feedback.ppo import train_ppo

    a = params.rlhf.policy.value()  # the algorithm decides which keys matter: declared and read whole
    rows = read_prompt_rows(root / a.prompts, "rlhf.policy.prompts", a.max_prompts)
    prompts = [chat(r["prompt"]) for r in rows]
    reward = _RewardModel(root / MODELS / "rm", params.model.dtype, params.rlhf.batch_size,
                          params.rlhf.prefs.max_chars)
    sft = root / params.rlhf.sft_model
    with atomic_dir(root / MODELS / "policy") as tmp:
        if a.algorithm == "ppo":
            def on_step(step: int, m: dict) -> None:
                mlflow.log_metrics({k: v for k, v in m.items() if k != "step"}, step=step)

            metrics = train_ppo(sft, root / MODELS / "rm", prompts,
                                lambda ps, rs: reward.score([p[-1]["content"] for p in ps], rs), tmp, a.ppo,
                                seed=params.seed, dtype=params.model.dtype, on_step=on_step)
            steps = [{"step": h["step"], "reward": h["score"], "kl": h["kl"]} for h in metrics.pop("history")]
        else:
            metrics = train_grpo(sft, [{"prompt": p} for p in prompts], reward, tmp, a.grpo, seed=params.seed,
                                 dtype=params.model.dtype, algorithm=a.algorithm)
            steps = [{"step": h["step"], "reward": h["reward"], "kl": h["kl"]} for h in metrics.pop("history")]
            for h in steps:
                mlflow.log_metrics({"score": h["reward"], "kl": h["kl"]}, step=h["step"])
    write_json(root / DATA / "policy_steps.json", steps)
    metrics |= {"first_reward": steps[0]["reward"] if steps else 0.0,
                "final_reward": steps[-1]["reward"] if steps else 0.0, "final_kl": steps[-1]["kl"] if steps else 0.0}
    log_training(metrics, root / DATA / "policy_metrics.json")


def _kl_to_sft(params: Any, root: Path, prompts: list[list[dict]]) -> float:
    """KL(policy || SFT) per response: policy samples at temperature 1, summed log-ratio over tokens."""
    import torch

    from closedloop.feedback.ppo import build_batch, pad_token_id, response_logprobs
    from closedloop.generate import SamplingParams
    from closedloop.models import load_model

    e = params.rlhf.eval
    backend = open_backend(params, root, MODELS / "policy", params.rlhf.batch_size)
    sampled = [x for per in backend.sample_ids(prompts, SamplingParams(n=e.kl_samples, temperature=1.0, top_p=1.0,
                                                                       max_new_tokens=e.kl_max_new_tokens,
                                                                       seed=params.seed))
               for x in per if x[1]]
    sft, _ = load_model(root / params.rlhf.sft_model, dtype=params.model.dtype,
                        trust_remote_code=params.model.trust_remote_code)
    pad = pad_token_id(backend.tokenizer, backend.stop_ids)
    total = 0.0
    with torch.inference_mode():
        for b in range(0, len(sampled), params.rlhf.batch_size):
            chunk = sampled[b: b + params.rlhf.batch_size]
            batch = build_batch([q for q, _ in chunk], [r for _, r in chunk], pad, backend.stop_ids,
                                backend.model.device)
            lp = response_logprobs(backend.model, batch, 1.0)[0]
            lq = response_logprobs(sft, batch, 1.0)[0]
            total += float(((lp - lq) * batch.mask).sum())
    return total / max(1, len(sampled))


def run_eval(params: Any, root: Path, key: str | None) -> None:
    """The RM as a judge of every model's greedy eval@ responses (same prompts), and the policy's KL."""
    e = params.rlhf.eval
    names = list(dict.fromkeys([params.evaluate.reference, e.sft_name, e.policy_name]))
    rows = {n: eval_records(root, n, "instruction_following", "rlhf.eval") for n in names}
    keys = sorted(set.intersection(*(set(r) for r in rows.values())))[: e.max_prompts]
    if not keys:
        raise UserError(f"rlhf.eval: {', '.join(names)} share no evaluated prompt")
    reward = _RewardModel(root / MODELS / "rm", params.model.dtype, params.rlhf.batch_size,
                          params.rlhf.prefs.max_chars)
    scores = {n: dict(zip(keys, reward.score([rows[n][k]["prompt"] for k in keys],
                                             [rows[n][k]["response"] for k in keys]))) for n in names}
    records, metrics = [], {}
    for n in names:
        wins = [rlhf.win(scores[n][k], scores[e.sft_name][k]) for k in keys]
        records += [{"suite": "reward_model", "model": n, "key": k, "source": "held-out",
                     "scores": {"win_rate_vs_sft": [w, 1.0]}, "breakdown": {}} for k, w in zip(keys, wins)]
        metrics |= {f"rm_score/{n}": sum(scores[n].values()) / len(keys), f"win_rate_vs_sft/{n}": sum(wins) / len(keys)}
    metrics["kl_to_sft"] = _kl_to_sft(params, root, [chat(rows[e.policy_name][k]["prompt"]) for k in keys])
    metrics["eval_prompts"] = len(keys)
    write_jsonl(root / REPORT, records)
    write_json(root / DATA / "eval_metrics.json", metrics)
    mlflow.log_metrics(metrics)


STAGES = {"rlhf_prefs": run_prefs, "rlhf_rm": run_rm, "rlhf_policy": run_policy, "rlhf_eval": run_eval}
