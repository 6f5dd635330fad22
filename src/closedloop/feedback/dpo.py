"""Preference feedback (DPO) through TRL's DPOTrainer on Accelerate, and adapter merging.

Pairs are conversational: `{"prompt": [messages], "chosen": [{"role": "assistant", ...}],
"rejected": [{"role": "assistant", ...}]}`; TRL renders them with the chat template and scores
the completions only. LoRA (PEFT) by default. With LoRA and no explicit reference model, TRL 1.16
uses the policy with its adapter disabled as the reference (DPOTrainer sets `ref_model = None` for
a PEFT model and computes reference log-probs under `use_adapter(model, None)`, i.e.
`model.disable_adapter()`), so the reference is exactly the checkpoint in `model_dir`.
With `lora.enabled: false`, TRL loads a second copy of `model_dir` as the frozen reference.

SPAR chains iterations (each one's output is the next one's base); `merge: true` (every trainer's
default) folds the adapter into the weights and leaves a plain safetensors checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from closedloop.feedback.common import (live_metrics, load_for_training, loss_history, lora_config, save_trained,
                                        trainer_args)


def _last(log_history: list[dict], key: str) -> float | None:
    vals = [h[key] for h in log_history if key in h]
    return float(vals[-1]) if vals else None


def train_dpo(model_dir: Path, pairs: list[dict], out_dir: Path, dpo: Any, *, seed: int,
              dtype: str = "float32") -> dict:
    """Train on preference `pairs` from the checkpoint in model_dir; save into out_dir (see
    `save_trained`: merged by default). Returns metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok, model = load_for_training(model_dir, dtype, seed)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(beta=dpo.beta, **trainer_args(out_dir, dpo, seed=seed, dtype=dtype)),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        peft_config=lora_config(dpo.lora) if dpo.lora.enabled else None,
        callbacks=[live_metrics()],
    )
    result = trainer.train()
    saved = save_trained(trainer, tok, model_dir, out_dir, dpo, dtype=dtype)
    log = trainer.state.log_history
    return {
        "train_loss": float(result.training_loss),
        "train_pairs": len(pairs),
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "rewards_accuracies": _last(log, "rewards/accuracies"),
        "rewards_margins": _last(log, "rewards/margins"),
        "saved": saved,
        "loss_history": loss_history(trainer),
    }
