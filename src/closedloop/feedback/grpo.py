"""Online RL with group baselines through TRL on Accelerate: GRPO (GRPOTrainer: group-relative,
std-scaled advantages) or RLOO (RLOOTrainer: leave-one-out baselines), chosen by `algorithm`.
Both take the same config fields here; `beta` is the KL coefficient to the starting model.

A reward function `reward_fn(prompts, completions, **columns) -> list[float]` scores each sampled
completion (TRL passes every other dataset column, repeated per generation; it names the logged
reward after `reward_fn.__name__`). One with a `bind(model)` method is handed the policy being
trained before the first step, for rewards read off the policy itself. Prompts are plain
text (a chat template already rendered, optionally with a response prefill), so a scaffold's
opening header can be part of the prompt. LoRA by default; the KL reference is then the policy
with its adapter disabled (TRL does this for a PEFT model), merged into a plain checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from closedloop.feedback.common import live_metrics, load_for_training, lora_config, save_trained, trainer_args


def online_rl_config(algorithm: str, out_dir: Path, p: Any, *, seed: int, dtype: str = "float32") -> Any:
    """TRL's GRPOConfig or RLOOConfig for these params (GRPO's loss_type set explicitly: TRL's
    default is not GRPO's)."""
    import trl

    kinds = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}
    if algorithm not in kinds:
        raise ValueError(f"unknown online RL algorithm {algorithm!r} (expected one of {', '.join(kinds)})")
    args = {k: v for k, v in trainer_args(Path(out_dir), p, seed=seed, dtype=dtype).items() if k != "max_length"}
    own_loss = {"loss_type": p.loss_type} if algorithm == "grpo" else {}  # RLOOConfig has no loss_type
    return kinds[algorithm](**args, **own_loss, beta=p.beta, num_generations=p.num_generations,
                            max_completion_length=p.max_completion_length, temperature=p.temperature,
                            top_p=p.top_p, max_steps=p.max_steps, epsilon=p.clip)


def train_grpo(model_dir: Path, rows: list[dict], reward_fn: Callable[..., list[float]], out_dir: Path, p: Any, *,
               seed: int, dtype: str = "float32", algorithm: str = "grpo") -> dict:
    """GRPO (or RLOO) from the checkpoint in model_dir on `rows` (each with a `prompt`: a string, or a
    chat TRL renders with the template); save into out_dir."""
    import trl
    from datasets import Dataset

    config = online_rl_config(algorithm, out_dir, p, seed=seed, dtype=dtype)
    trainer_cls = trl.GRPOTrainer if algorithm == "grpo" else trl.RLOOTrainer
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok, model = load_for_training(model_dir, dtype, seed)
    trainer = trainer_cls(model=model, reward_funcs=reward_fn, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=lora_config(p.lora) if p.lora.enabled else None,
                          callbacks=[live_metrics()])
    if hasattr(reward_fn, "bind"):  # a reward that reads the policy itself (e.g. label-scored GRM scores)
        reward_fn.bind(trainer.model)
    result = trainer.train()
    saved = save_trained(trainer, tok, model_dir, out_dir, p, dtype=dtype)
    steps = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "saved": saved,
        "history": [{"step": int(h["step"]), "reward": float(h["reward"]), "kl": float(h.get("kl", 0.0)),
                     "reward_std": float(h.get("reward_std", 0.0)),
                     # groups whose rewards differ: the only ones with a nonzero advantage, hence a gradient
                     "groups_differing": 1.0 - float(h.get("frac_reward_zero_std", 1.0)),
                     "completion_length": float(h.get("completions/mean_length", 0.0))} for h in steps],
    }
