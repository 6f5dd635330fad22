"""Supervised fine-tuning (SFT / RFT feedback) through TRL's SFTTrainer on Accelerate.

Examples are conversational prompt-completion pairs, so TRL computes the loss on the completion
only. LoRA (PEFT) by default; `sft.lora.enabled: false` trains every weight. Under
`accelerate launch` the same code runs data-parallel on several GPUs.
"""

from __future__ import annotations

from pathlib import Path

from closedloop.feedback.common import load_for_training, trainer_args


def lora_config(lora):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def train_sft(model_dir: Path, examples: list[dict], out_dir: Path, sft, *, seed: int, dtype: str = "float32") -> dict:
    """Train on `examples` and save the adapter (or full model) into out_dir. Returns metrics."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, model = load_for_training(model_dir, dtype, seed)
    config = SFTConfig(warmup_steps=sft.warmup_steps, **trainer_args(out_dir, sft, seed=seed, dtype=dtype))
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        peft_config=lora_config(sft.lora) if sft.lora.enabled else None,
    )
    result = trainer.train()
    trainer.save_model(str(out_dir))
    tok.save_pretrained(str(out_dir))
    import shutil

    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: outputs hold safetensors only
    history = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": float(result.training_loss),
        "train_examples": len(examples),
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "loss_history": history,
    }
