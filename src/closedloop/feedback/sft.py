"""Supervised fine-tuning (SFT / RFT feedback) through TRL's SFTTrainer on Accelerate.

Examples are conversational prompt-completion pairs, so TRL computes the loss on the completion
only. LoRA (PEFT) by default; `sft.lora.enabled: false` trains every weight. Under
`accelerate launch` the same code runs data-parallel on several GPUs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def lora_config(lora):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def train_sft(model_dir: Path, examples: list[dict], out_dir: Path, sft, *, seed: int, dtype: str = "float32") -> dict:
    """Train on `examples` and save the adapter (or full model) into out_dir. Returns metrics."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    config = SFTConfig(
        output_dir=str(out_dir / "_trainer"),
        num_train_epochs=sft.epochs,
        per_device_train_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.grad_accum,
        learning_rate=sft.learning_rate,
        warmup_steps=sft.warmup_steps,
        max_length=sft.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=dtype == "bfloat16" and torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
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
