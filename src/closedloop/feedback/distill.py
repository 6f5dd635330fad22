"""Knowledge distillation of a student from a teacher through TRL's GKDTrainer (trl.experimental).

Supervised KD on fixed conversations (`lmbda = 0`: no student generations): the student matches
the teacher's full next-token distribution on every completion token (generalised JSD, `beta = 0`
is forward KL). A whole distribution per token carries far more signal than SFT on sampled text,
which is what lets a truncated model recover in a few dozen steps on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from closedloop.feedback.common import live_metrics, loss_history, trainer_args


def distill(student: Any, teacher: Any, tok: Any, conversations: list[list[dict]], out_dir: Path, p: Any, *,
            beta: float, temperature: float, seed: int, dtype: str = "float32") -> dict:
    """Train `student` (in memory, every weight) towards `teacher` on `conversations` (chat messages
    ending with the assistant's turn); save the student as a safetensors checkpoint in out_dir."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    for m in (student, teacher):
        m.config.use_cache = False
    args = GKDConfig(**trainer_args(out_dir, p, seed=seed, dtype=dtype), lmbda=0.0, beta=beta,
                     temperature=temperature)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
                         callbacks=[live_metrics()])
    result = trainer.train()
    student.config.use_cache = True
    trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {
        "train_loss": float(result.training_loss),
        "train_examples": len(conversations),
        "train_steps": int(result.global_step),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "loss_history": loss_history(trainer),
    }
