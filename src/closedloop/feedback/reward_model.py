"""A scalar Bradley-Terry reward model through TRL's RewardTrainer on Accelerate, and its scores.

The model is the checkpoint with a one-output classification head (`num_labels=1`, TRL's choice):
loss = -log sigmoid(r(chosen) - r(rejected)). Pairs are conversational (`prompt`: the user turn,
`chosen` / `rejected`: the assistant turn), rendered with the chat template as TRL renders them,
and `reward_scores` renders a (prompt, response) the same way. LoRA by default, with the new
score head fully trained (`modules_to_save`), merged into a plain safetensors checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from closedloop.feedback.common import live_metrics, loss_history, trainer_args


def load_reward_model(model_dir: Path, dtype: str = "float32", num_labels: int = 1):
    """(tokenizer with a pad token, sequence-classification model) from a local safetensors checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                               dtype=getattr(torch, dtype), use_safetensors=True)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    return tok, model


def conversational_pairs(pairs: Sequence[dict], max_chars: int) -> list[dict]:
    """Preference rows in TRL's conversational format (RewardTrainer renders them with the template)."""
    return [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"][:max_chars]}],
             "rejected": [{"role": "assistant", "content": p["rejected"][:max_chars]}]} for p in pairs]


def train_reward_model(model_dir: Path, pairs: list[dict], out_dir: Path, p: Any, *, seed: int,
                       dtype: str = "float32", in_order: bool = False) -> dict:
    """Train on `pairs` from the causal-LM checkpoint in model_dir; save a merged checkpoint into out_dir.
    in_order: batches follow the pairs' order (no shuffle), so pairs placed side by side (one
    prompt's comparisons) train together."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    set_seed(seed)  # the new head is random: seed before it is made
    tok, model = load_reward_model(model_dir, dtype)
    peft = (LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                       target_modules=p.lora.target_modules, task_type="SEQ_CLS", modules_to_save=["score"])
            if p.lora.enabled else None)
    args = RewardConfig(**trainer_args(out_dir, p, seed=seed, dtype=dtype),
                        train_sampling_strategy="sequential" if in_order else "random")
    trainer = RewardTrainer(model=model, args=args,
                            train_dataset=Dataset.from_list(pairs), processing_class=tok, peft_config=peft,
                            callbacks=[live_metrics()])
    result = trainer.train()
    trained = trainer.model.merge_and_unload() if p.lora.enabled else trainer.model
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    return {"train_loss": float(result.training_loss), "train_pairs": len(pairs),
            "train_steps": int(result.global_step), "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
            "loss_history": loss_history(trainer)}


def reward_scores(model: Any, tok: Any, prompts: Sequence[str], responses: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    """r(prompt, response) per pair: the chat rendered as in training, right-padded, the head's output."""
    import torch

    from closedloop.generate import eval_mode, pad_batch

    ids = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                   tokenize=True, return_dict=True)["input_ids"] for q, r in zip(prompts, responses)]
    out: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for b in range(0, len(ids), batch_size):
            x, mask = pad_batch(ids[b: b + batch_size], tok.pad_token_id, side="right", device=model.device)
            out.extend(model(input_ids=x, attention_mask=mask).logits[:, 0].float().tolist())
    return out
