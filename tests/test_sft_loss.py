"""The CPU completion loss in feedback/sft.py against TRL's fused LM head: same loss, gradients, metrics."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from trl import SFTTrainer

from closedloop.config import LoraParams, SFTParams
from closedloop.feedback.sft import sft_trainer

EXAMPLES = [
    {"prompt": [{"role": "user", "content": "what is two plus two ?"}],
     "completion": [{"role": "assistant", "content": "it is four ."}]},
    {"prompt": [{"role": "system", "content": "you are a helpful bot"},
                {"role": "user", "content": "write a short poem about the sea and the sky"}],
     "completion": [{"role": "assistant", "content": "the sea and the sky"}]},
    {"prompt": [{"role": "user", "content": "please list three colors"}],
     "completion": [{"role": "assistant", "content": "red , green and blue and the quick brown fox"}]},
]


def _trainer(model_dir, tmp_path, lora: bool):
    p = SFTParams(batch_size=3, max_length=64, lora=LoraParams(enabled=lora, r=4, alpha=8))
    return sft_trainer(model_dir, EXAMPLES, tmp_path, p, seed=0)


def _loss_grads_metrics(trainer, compute_loss, batch, num_items):
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("num_items", [None, 7])
def test_cpu_completion_loss_matches_trl_fused_head(tiny_model_dir, tmp_path, lora, num_items):
    trainer = _trainer(tiny_model_dir, tmp_path, lora)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # the prompt is masked out of the labels and the rows are padded: the case the direct path narrows
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    ours = _loss_grads_metrics(trainer, type(trainer).compute_loss, batch, num_items)
    fused = _loss_grads_metrics(trainer, SFTTrainer.compute_loss, batch, num_items)
    assert torch.isfinite(ours[0]) and ours[0] > 0
    assert torch.allclose(ours[0], fused[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == fused[1].keys() and ours[1]
    for name, g in ours[1].items():
        assert torch.allclose(g, fused[1][name], atol=1e-5, rtol=1e-4), name
    assert ours[2].keys() == fused[2].keys() == {"entropy", "mean_token_accuracy"}
    for key in ours[2]:
        assert ours[2][key] == pytest.approx(fused[2][key], abs=1e-5)


def test_direct_loss_leaves_other_losses_to_trl(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, lora=True)
    assert trainer._direct_loss(trainer.model, return_outputs=False)
    assert not trainer._direct_loss(trainer.model, return_outputs=True)
    trainer.args.loss_type = "dft"  # DFT reweights by the token's probability: TRL's path computes it
    assert not trainer._direct_loss(trainer.model, return_outputs=False)
