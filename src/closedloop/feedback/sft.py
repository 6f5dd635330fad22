"""Supervised fine-tuning (SFT / RFT feedback) through TRL's SFTTrainer on Accelerate.

Examples are conversational prompt-completion pairs, so TRL computes the loss on the completion
only. LoRA (PEFT) by default; `lora.enabled: false` trains every weight. Under
`accelerate launch` the same code runs data-parallel on several GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from closedloop.feedback.common import load_for_training, loss_history, lora_config, save_trained, trainer_args


def train_sft(model_dir: Path, examples: list[dict], out_dir: Path, sft: Any, *, seed: int,
              dtype: str = "float32") -> dict:
    """Train on `examples` from the checkpoint in model_dir; save into out_dir (see `save_trained`)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok, model = load_for_training(model_dir, dtype, seed)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**trainer_args(out_dir, sft, seed=seed, dtype=dtype)),
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        peft_config=lora_config(sft.lora) if sft.lora.enabled else None,
    )
    result = trainer.train()
    saved = save_trained(trainer, tok, model_dir, out_dir, sft, dtype=dtype)
    return {
        "train_loss": float(result.training_loss),
        "train_examples": len(examples),
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "saved": saved,
        "loss_history": loss_history(trainer),
    }
