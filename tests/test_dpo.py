"""DPO feedback through TRL on the tiny checkpoint: adapter, merged checkpoint, determinism."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from closedloop.config import DPOParams, LoraParams
from closedloop.feedback.common import ADAPTER_SUBDIR, merge_adapter
from closedloop.feedback.dpo import train_dpo

PAIRS = [
    {"prompt": [{"role": "user", "content": "what is two plus two ?"}],
     "chosen": [{"role": "assistant", "content": "it is four ."}],
     "rejected": [{"role": "assistant", "content": "the quick brown fox"}]},
    {"prompt": [{"role": "user", "content": "please list three colors"}],
     "chosen": [{"role": "assistant", "content": "red , green and blue"}],
     "rejected": [{"role": "assistant", "content": "a model writes"}]},
    {"prompt": [{"role": "system", "content": "you are a helpful bot"},
                {"role": "user", "content": "write a short poem about the sea"}],
     "chosen": [{"role": "assistant", "content": "the sea and the sky"}],
     "rejected": [{"role": "assistant", "content": "four"}]},
    {"prompt": [{"role": "user", "content": "what is the answer to the question ?"}],
     "chosen": [{"role": "assistant", "content": "the answer is four ."}],
     "rejected": [{"role": "assistant", "content": "lazy dog jumps"}]},
]


def _params(**kw) -> DPOParams:
    base = dict(beta=0.1, learning_rate=5e-3, epochs=1.0, batch_size=2, grad_accum=1, max_length=64,
                lora=LoraParams(r=4, alpha=8, dropout=0.0), merge=True)
    return DPOParams(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "out"
    metrics = train_dpo(tiny_model_dir, PAIRS, out, _params(), seed=3)
    return out, metrics


def test_dpo_trains_and_saves_merged_checkpoint(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, m = trained
    adapter = out / ADAPTER_SUBDIR
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not (out / "_trainer").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert m["saved"] == "merged" and m["train_steps"] == 2 and m["train_pairs"] == 4
    assert math.isfinite(m["train_loss"]) and m["loss_history"]
    assert all(math.isfinite(loss) for _, loss in m["loss_history"])
    assert m["rewards_accuracies"] is not None and m["rewards_margins"] is not None
    # The merged checkpoint is a plain model (no PEFT needed) that differs from the base.
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert set(merged.state_dict()) == set(base.state_dict())
    diffs = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert diffs and all("proj" in k for k in diffs)  # only LoRA-targeted linears moved
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_merge_adapter_matches_peft(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained
    again = merge_adapter(tiny_model_dir, out / ADAPTER_SUBDIR, tmp_path / "merged")
    assert load_file(again / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()
    merged = AutoModelForCausalLM.from_pretrained(again).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     str(out / ADAPTER_SUBDIR)).eval()
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_same_seed_same_weights_adapter_only(trained, tiny_model_dir, tmp_path):
    out, m = trained
    again = tmp_path / "again"
    m2 = train_dpo(tiny_model_dir, PAIRS, again, _params(merge=False), seed=3)
    assert m2["saved"] == "adapter"
    assert (again / "adapter_model.safetensors").is_file() and not (again / "model.safetensors").exists()
    a = load_file(out / ADAPTER_SUBDIR / "adapter_model.safetensors")
    b = load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m2["loss_history"] == m["loss_history"]


def test_same_params_and_seed_give_the_same_bytes(trained, tiny_model_dir, tmp_path):
    """Every file of a merged run, adapter_config.json included (PEFT writes target_modules from a
    set and the base's absolute path), is byte-identical when trained again from another path."""
    import shutil

    out, _ = trained
    moved = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "base")
    again = tmp_path / "again"
    train_dpo(moved, PAIRS, again, _params(), seed=3)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert ADAPTER_SUBDIR + "/adapter_config.json" in {str(f) for f in files}
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
