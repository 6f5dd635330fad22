"""Proxy tuning's decoding on the engine (Liu et al. 2024): several models in lockstep, combined as

    logits = base(x) + sum_i alpha_i * (expert_i(x) - anti_expert_i(x))

on the raw next-token logits, in float32, before temperature and top-p (the engine's sampler runs
after `combine`). Each model keeps its own KV cache and may see the prompt through its own view
(`templates`: its chat template, or the raw text). All share the base's tokenizer: a different
vocabulary is an error; output layers padded past the vocabulary (as many checkpoints pad them)
are cut to the shared width, as the reference implementation (alisawuffles/proxy-tuning) does.

Written on the engine rather than ported: the reference pins torch <= 2.0.1 and a forked
transformers ~4.34, uses the legacy tuple cache and hard-codes Llama.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from closedloop.errors import UserError


def proxy_combine(alphas: Sequence[float]):
    """combine([base, expert_1, anti_1, expert_2, anti_2, ...]) for the engine, in float32."""
    alphas = list(alphas)

    def combine(logits: list[Any]) -> Any:
        if len(logits) != 1 + 2 * len(alphas):
            raise ValueError(f"proxy: expected 1 + 2 x {len(alphas)} models' logits, got {len(logits)}")
        width = min(x.shape[-1] for x in logits)
        out = logits[0][..., :width].float()
        for i, alpha in enumerate(alphas):
            out = out + alpha * (logits[1 + 2 * i][..., :width].float() - logits[2 + 2 * i][..., :width].float())
        return out

    return combine


def check_vocabularies(names: Sequence[str], tokenizers: Sequence[Any], models: Sequence[Any]) -> None:
    """Every model shares the first's tokenizer (the same token -> id map) and has an output row
    per token of it; one clear error naming the model otherwise."""
    base = tokenizers[0].get_vocab()
    for name, tok, model in zip(names, tokenizers, models):
        vocab = tok.get_vocab()
        if vocab != base:
            differ = len(set(vocab.items()) ^ set(base.items()))
            raise UserError(f"proxy: {name}'s tokenizer differs from {names[0]}'s ({len(vocab)} vs {len(base)} tokens, "
                            f"{differ} entries differ); proxy tuning needs one shared vocabulary")
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(base):
            raise UserError(f"proxy: {name} has {rows} output rows, fewer than the {len(base)} tokens of the "
                            "shared vocabulary")


def proxy_backend(models: Sequence[Any], tokenizer: Any, alphas: Sequence[float], templates: Sequence[bool] | None = None,
                  **kw: Any):
    """The engine over [base, expert, anti_expert, ...] with the proxy combination."""
    from closedloop.engine.backend import EngineBackend

    if len(models) != 1 + 2 * len(alphas):
        raise UserError(f"proxy: expected a base and an (expert, anti-expert) pair per alpha, got {len(models)} "
                        f"models for {len(alphas)} alpha(s)")
    return EngineBackend(list(models), tokenizer, combine=proxy_combine(alphas), templates=templates, **kw)
