"""Preference feedback (DPO) through TRL's DPOTrainer on Accelerate, and adapter merging.

Pairs are conversational: `{"prompt": [messages], "chosen": [{"role": "assistant", ...}],
"rejected": [{"role": "assistant", ...}]}`; TRL renders them with the chat template and scores
the completions only. LoRA (PEFT) by default. With LoRA and no explicit reference model, TRL 1.16
uses the policy with its adapter disabled as the reference (DPOTrainer sets `ref_model = None` for
a PEFT model and computes reference log-probs under `use_adapter(model, None)`, i.e.
`model.disable_adapter()`), so the reference is exactly the checkpoint in `model_dir`.
With `lora.enabled: false`, TRL loads a second copy of `model_dir` as the frozen reference.

SPAR chains iterations (each one's output is the next one's base), so `merge: true` folds the
adapter into the base weights and leaves a plain safetensors checkpoint in out_dir (the adapter
itself is kept in out_dir/adapter).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from closedloop.feedback.common import load_for_training, trainer_args
from closedloop.feedback.sft import lora_config

ADAPTER_SUBDIR = "adapter"  # where a merged run keeps its adapter, inside out_dir


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Fold the LoRA adapter in adapter_dir into the checkpoint in base_dir; save a plain
    safetensors model + tokenizer into out_dir (works for SFT and DPO adapters alike)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # The adapter dir holds the tokenizer the adapter was trained with (pad token set); fall back to the base's.
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def _last(log_history: list[dict], key: str) -> float | None:
    vals = [h[key] for h in log_history if key in h]
    return float(vals[-1]) if vals else None


def train_dpo(model_dir: Path, pairs: list[dict], out_dir: Path, dpo, *, seed: int, dtype: str = "float32",
              merge_into_full: bool | None = None) -> dict:
    """Train on preference `pairs` and save into out_dir. Returns metrics.

    out_dir gets: a full merged checkpoint (LoRA with merge; adapter in out_dir/adapter), the
    adapter alone (LoRA without merge), or the full model (lora.enabled false). `merge_into_full`
    overrides `dpo.merge` when given (absent field: merge).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    merge = dpo.merge if merge_into_full is None else merge_into_full
    use_lora = dpo.lora.enabled
    tok, model = load_for_training(model_dir, dtype, seed)
    config = DPOConfig(beta=dpo.beta, **trainer_args(out_dir, dpo, seed=seed, dtype=dtype))
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        peft_config=lora_config(dpo.lora) if use_lora else None,
    )
    result = trainer.train()
    adapter_dir = out_dir / ADAPTER_SUBDIR if (use_lora and merge) else out_dir
    trainer.save_model(str(adapter_dir))
    tok.save_pretrained(str(adapter_dir))
    # save_model also pickles the TrainingArguments; not needed to load anything, and no pickles in outputs.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    if use_lora and merge:
        merge_adapter(model_dir, adapter_dir, out_dir, dtype=dtype)

    log = trainer.state.log_history
    return {
        "train_loss": float(result.training_loss),
        "train_pairs": len(pairs),
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "rewards_accuracies": _last(log, "rewards/accuracies"),
        "rewards_margins": _last(log, "rewards/margins"),
        "saved": "merged" if (use_lora and merge) else ("adapter" if use_lora else "full"),
        "loss_history": [(h["step"], h["loss"]) for h in log if "loss" in h],
    }
