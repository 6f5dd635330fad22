"""Training reports as it goes: each logging step's loss and learning rate reach the stage's MLflow
run while the trainer still runs (the UI draws the curve live), and the steps done reach the run's
progress file (what `closedloop status` shows)."""

from __future__ import annotations

import json

import mlflow
from transformers import TrainerCallback

from closedloop import progress
from closedloop.config import LoraParams, SFTParams
from closedloop.feedback.sft import sft_trainer
from test_sft_loss import EXAMPLES


class Probe(TrainerCallback):
    """After LiveMetrics has run for a step: what the MLflow store and the progress file hold now."""

    def __init__(self, run_id: str, progress_file):
        self.run_id, self.progress_file, self.seen = run_id, progress_file, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}):  # the end-of-training summary
            return
        history = mlflow.MlflowClient().get_metric_history(self.run_id, "train/loss")
        done = json.loads(self.progress_file.read_text())
        self.seen.append((state.global_step, [m.step for m in history], done["done"], done["total"]))


def test_loss_reaches_mlflow_and_progress_while_training(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, str(tmp_path / "progress.json"))
    monkeypatch.setenv(progress.STAGE_ENV, "rft_train")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = SFTParams(batch_size=1, epochs=1, max_length=64, lora=LoraParams(enabled=True, r=4, alpha=8))
    with mlflow.start_run() as run:
        trainer = sft_trainer(tiny_model_dir, EXAMPLES, tmp_path / "out", p, seed=0)
        probe = Probe(run.info.run_id, tmp_path / "progress.json")
        trainer.add_callback(probe)  # after LiveMetrics, which sft_trainer adds
        trainer.train()
        assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"
    # one entry per optimizer step, each already in the store at its own step
    assert [s[0] for s in probe.seen] == [1, 2, 3]
    assert [s[1] for s in probe.seen] == [[1], [1, 2], [1, 2, 3]]
    assert [(s[2], s[3]) for s in probe.seen] == [(1, 3), (2, 3), (3, 3)]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/learning_rate")
    assert [m.step for m in history] == [1, 2, 3]
