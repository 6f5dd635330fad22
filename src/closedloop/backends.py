"""Generation backends by name: what a stage's `make_backend(DEFAULT_BACKEND, model, tok, ...)` opens.

"engine" (`closedloop.engine.EngineBackend`, the default: continuous batching over the model's
forward), "proxy" (the engine with proxy tuning's logit arithmetic over several models), "hf"
(`closedloop.hf_backend.HFBackend`, the reference: `model.generate`) and "vllm" (a hook; no vLLM
backend ships yet). Each satisfies `closedloop.generate.GenerationBackend`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from closedloop.engine import EngineBackend
from closedloop.engine.proxy import proxy_backend
from closedloop.errors import UserError
from closedloop.generate import GenerationBackend
from closedloop.hf_backend import HFBackend

# The backend stages use (`stages.common.open_backend`).
DEFAULT_BACKEND = "engine"
BACKENDS = ("engine", "hf", "proxy", "vllm")


def make_backend(name: str, model: Any, tokenizer: Any, **kw: Any) -> GenerationBackend:
    """Backend by name, constructed as `Backend(model, tokenizer, **kw)`.

    "engine": `model` may be a list of models with a `combine=` callable; "proxy": `model` =
    [base, expert, anti_expert, ...], `alphas=[...]` (engine/proxy.py); "hf"; "vllm": a hook that raises.
    """
    if name == "engine":
        return EngineBackend(model, tokenizer, **kw)
    if name == "proxy":
        return proxy_backend(model, tokenizer, **kw)
    if name == "hf":
        return HFBackend(model, tokenizer, **kw)
    if name == "vllm":
        # Hook: a VLLMBackend would load the checkpoint directory into vllm.LLM, map SamplingParams
        # to vllm.SamplingParams(n, temperature, top_p, max_tokens, seed, stop, stop_token_ids) and
        # return Completions in prompt order, satisfying GenerationBackend.
        installed = importlib.util.find_spec("vllm") is not None
        raise UserError("generation backend 'vllm' is not implemented"
                        + ("" if installed else " (and the vllm package is not installed)")
                        + "; use 'engine' or 'hf'")
    raise UserError(f"unknown generation backend {name!r}; expected one of {', '.join(BACKENDS)}")
