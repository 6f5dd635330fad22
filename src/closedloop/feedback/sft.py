"""Supervised fine-tuning (SFT / RFT feedback) through TRL's SFTTrainer on Accelerate.

Examples are conversational prompt-completion pairs, so TRL computes the loss on the completion
only. LoRA (PEFT) by default; `lora.enabled: false` trains every weight. Under
`accelerate launch` the same code runs data-parallel on several GPUs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from closedloop.feedback.common import (live_metrics, load_for_training, loss_history, lora_config, save_trained,
                                        trainer_args)


def train_sft(model_dir: Path, examples: list[dict], out_dir: Path, sft: Any, *, seed: int,
              dtype: str = "float32") -> dict:
    """Train on `examples` from the checkpoint in model_dir; save into out_dir (see `save_trained`)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    trainer = sft_trainer(model_dir, examples, out_dir, sft, seed=seed, dtype=dtype)
    result = trainer.train()
    saved = save_trained(trainer, trainer.processing_class, model_dir, out_dir, sft, dtype=dtype)
    return {
        "train_loss": float(result.training_loss),
        "train_examples": len(examples),
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "saved": saved,
        "loss_history": loss_history(trainer),
    }


def sft_trainer(model_dir: Path, examples: list[dict], out_dir: Path, sft: Any, *, seed: int,
                dtype: str = "float32", trainer_cls: type | None = None, **config: Any):
    """The trainer train_sft runs (this module's class unless `trainer_cls`; extra SFTConfig
    fields in `config`): the benchmark and the tests build theirs here too."""
    from datasets import Dataset
    from trl import SFTConfig

    tok, model = load_for_training(Path(model_dir), dtype, seed)
    return (trainer_cls or sft_trainer_class())(
        model=model,
        args=SFTConfig(**trainer_args(Path(out_dir), sft, seed=seed, dtype=dtype), **config),
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        peft_config=lora_config(sft.lora) if sft.lora.enabled else None,
        callbacks=[live_metrics()],
    )


@functools.cache
def sft_trainer_class():
    """SFTTrainer, with the completion loss computed directly on CPU.

    TRL 1.16 always computes the loss through its fused LM head. Without Triton (CPU) that head
    scores every position, prompt and padding included, in tiles of a dozen torch ops each way:
    ~half of a demo SFT step on 2 cores. On CPU the logits of the completion tokens alone fit in
    memory, so this projects only those and takes the plain cross-entropy: the same loss and
    metrics (tests/test_sft_loss.py compares both). GPUs keep TRL's path, which never
    materialises the logits."""
    import torch
    from trl import SFTTrainer

    class CompletionLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._direct_loss(model, return_outputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            unwrapped = self.accelerator.unwrap_model(model)
            causal_lm = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            backbone_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            # The backbone alone (PEFT's LoRA layers sit inside it), as TRL's fused forward calls it.
            hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state[:, :-1]
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            targets = labels[mask]
            # One log-softmax serves the loss (cross-entropy) and the metrics TRL logs.
            log_p = torch.log_softmax(causal_lm.get_output_embeddings()(hidden[mask]).float(), dim=-1)
            nll = -log_p.gather(-1, targets.unsqueeze(-1)).sum()
            n = targets.numel()
            loss = nll / torch.as_tensor(n if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
            with torch.no_grad():
                self._metrics[mode]["entropy"].append(float(-(log_p.exp() * log_p).sum()) / max(n, 1))
                self._metrics[mode]["mean_token_accuracy"].append(
                    float((log_p.argmax(-1) == targets).sum()) / max(n, 1))
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

        def _direct_loss(self, model, return_outputs: bool) -> bool:
            """Only the plain case on CPU: anything else (other loss types, label smoothing, MoE aux
            loss, padding-free batches, parallelism) goes to TRL's own path."""
            return (next(model.parameters()).device.type == "cpu" and not return_outputs
                    and self.args.loss_type == "nll" and self.label_smoother is None
                    and self.compute_loss_func is None and not self.aux_loss_enabled
                    and not self.args.padding_free and self.accelerator.num_processes == 1)

    return CompletionLossSFTTrainer
