"""The `base` stage's model materialisation: local dirs, and one clear error for bad ones."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from closedloop.errors import UserError
from closedloop.models import load_model, materialise_base


def test_local_checkpoint_is_materialised_as_safetensors(tiny_model_dir, tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    info = materialise_base(str(tiny_model_dir), out)
    assert info["architecture"] == "LlamaForCausalLM"
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert any("embed_tokens" in k for k in f.keys())
    model, tok = load_model(out)
    assert model.config.num_hidden_layers == 2 and tok.pad_token is not None


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"model.base: '\./no/such/dir' is not a directory"):
        materialise_base("./no/such/dir", tmp_path / "x")


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        materialise_base(str(tmp_path / "empty"), tmp_path / "x")


def test_non_causal_lm_checkpoint_is_rejected(tmp_path):
    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                  "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 8}))
    with pytest.raises(UserError, match="is not a causal language model"):
        materialise_base(str(ckpt), tmp_path / "x")
