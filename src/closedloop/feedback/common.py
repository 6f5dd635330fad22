"""What every TRL trainer here shares: loading the starting checkpoint, the Trainer arguments
(from `config.TrainParams`), and saving the result reproducibly."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

ADAPTER_SUBDIR = "adapter"  # where a merged LoRA run keeps its adapter, inside out_dir


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


def lora_config(lora: Any):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def trainer_args(out_dir: Path, p: Any, *, seed: int, dtype: str) -> dict:
    """Arguments common to every TRL config, from a `TrainParams` section. Checkpoints are not
    saved (the stage saves the result)."""
    import torch

    return dict(
        output_dir=str(out_dir / "_trainer"),
        num_train_epochs=p.epochs,
        per_device_train_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        learning_rate=p.learning_rate,
        max_length=p.max_length,
        warmup_steps=p.warmup_steps,
        gradient_checkpointing=p.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=dtype == "bfloat16" and torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def normalise_adapter_config(adapter_dir: Path) -> None:
    """Make adapter_config.json the same bytes for the same training: PEFT writes target_modules
    from a set (order varies run to run) and the base model's absolute path (varies by clone)."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = None  # the stage knows its base; an absolute path would leak the clone
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card template embeds the same path


def save_trained(trainer: Any, tok: Any, model_dir: Path, out_dir: Path, p: Any, *, dtype: str) -> str:
    """Save what training produced into out_dir: with LoRA and `merge`, a plain merged checkpoint
    (adapter kept in out_dir/adapter); with LoRA alone, the adapter; otherwise the full model.
    Returns which of "merged", "adapter", "full" was saved."""
    from closedloop.io import is_main_process

    use_lora, merge = p.lora.enabled, p.merge
    kind = "merged" if (use_lora and merge) else "adapter" if use_lora else "full"
    target = out_dir / ADAPTER_SUBDIR if kind == "merged" else out_dir
    trainer.save_model(str(target))  # every rank: sharded states (FSDP, DeepSpeed) are gathered here
    if not is_main_process():  # only rank 0's output is kept (closedloop.io): no merge to do here
        return kind
    tok.save_pretrained(str(target))
    # save_model also pickles the TrainingArguments: not needed to load anything, and no pickles in outputs.
    (target / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    normalise_adapter_config(target)
    if kind == "merged":
        merge_adapter(model_dir, target, out_dir, dtype=dtype)
    return kind


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Fold the LoRA adapter in adapter_dir into the checkpoint in base_dir; save a plain
    safetensors model + tokenizer into out_dir (works for SFT and DPO adapters alike)."""
    import torch
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


@functools.cache
def _live_metrics_class():
    from transformers import TrainerCallback

    from closedloop import progress

    class LiveMetrics(TrainerCallback):
        """Each logging step's numbers (loss, learning rate, a trainer's own: DPO's reward margin,
        GRPO's reward) to the stage's MLflow run as `train/<name>` at that step, and the steps done
        to the run's progress, while training goes on. Not transformers' MLflowCallback: that one
        also logs every TrainingArguments field as a param and may open a run of its own."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            import mlflow

            if not state.is_world_process_zero:
                return
            progress.report(state.global_step, state.max_steps or None, "steps")
            numbers = {f"train/{k}": float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers and mlflow.active_run() is not None:
                mlflow.log_metrics(numbers, step=state.global_step)

    return LiveMetrics


def live_metrics() -> Any:
    """The callback every trainer here runs with (see LiveMetrics)."""
    return _live_metrics_class()()


def loss_history(trainer: Any) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
