"""What every TRL trainer here shares: loading the starting checkpoint and the Trainer arguments."""

from __future__ import annotations

from pathlib import Path


def load_for_training(model_dir: Path, dtype: str, seed: int):
    """Tokenizer (with a pad token) and model from a local safetensors checkpoint.

    Seeds first: TRL wraps the model in LoRA (random A matrices) before Trainer seeds the RNGs
    itself, so without this the same seed would not give the same adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    return tok, model


def trainer_args(out_dir: Path, p, *, seed: int, dtype: str) -> dict:
    """Arguments common to SFTConfig and DPOConfig, from a params section with epochs, batch_size,
    grad_accum, learning_rate, max_length. Checkpoints are not saved (the stage saves the result)."""
    import torch

    return dict(
        output_dir=str(out_dir / "_trainer"),
        num_train_epochs=p.epochs,
        per_device_train_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        learning_rate=p.learning_rate,
        max_length=p.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=dtype == "bfloat16" and torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
