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

import torch

from closedloop.engine.backend import EngineBackend
from closedloop.errors import UserError


def proxy_combine(alphas: Sequence[float], per_prompt: Sequence[Sequence[float]] | None = None):
    """combine([base, expert_1, anti_1, expert_2, anti_2, ...], prompts) for the engine, in float32.

    per_prompt[i], when given, replaces `alphas` for the caller's prompt i: a sweep over alpha
    decoded as one batch (the prompts repeated once per setting, so they share their prefills): on
    2 cores, 96 rows of 64 greedy tokens from SmolLM2-135M took 27.0 s in one batch against 19.8 s
    for 48 of them, 1.5x faster than the sweep one alpha at a time.
    """
    pairs = len(alphas)
    table = torch.tensor([list(alphas)] if per_prompt is None else [list(a) for a in per_prompt], dtype=torch.float32)
    if table.ndim != 2 or table.shape[1] != pairs:
        raise UserError(f"proxy: per-prompt alphas need {pairs} value(s) each (one per expert pair), "
                        f"got {list(table.shape)}")

    def combine(logits: list[Any], prompts: list[int]) -> Any:
        if len(logits) != 1 + 2 * pairs:
            raise ValueError(f"proxy: expected 1 + 2 x {pairs} models' logits, got {len(logits)}")
        width = min(x.shape[-1] for x in logits)
        if per_prompt is None:
            alpha = table.to(logits[0].device)  # (1, pairs): the same for every row
        else:
            if max(prompts, default=0) >= len(table):
                raise ValueError(f"proxy: per-prompt alphas cover {len(table)} prompts, got prompt {max(prompts)}")
            alpha = table[torch.tensor(prompts, dtype=torch.long)].to(logits[0].device)  # (rows, pairs)
        out = logits[0][..., :width].float()
        for i in range(pairs):
            diff = logits[1 + 2 * i][..., :width].float() - logits[2 + 2 * i][..., :width].float()
            out = out + alpha[:, i : i + 1] * diff
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
                  per_prompt: Sequence[Sequence[float]] | None = None, **kw: Any):
    """The engine over [base, expert, anti_expert, ...] with the proxy combination (`per_prompt`:
    see proxy_combine)."""
    if len(models) != 1 + 2 * len(alphas):
        raise UserError(f"proxy: expected a base and an (expert, anti-expert) pair per alpha, got {len(models)} "
                        f"models for {len(alphas)} alpha(s)")
    return EngineBackend(list(models), tokenizer, combine=proxy_combine(alphas, per_prompt), templates=templates, **kw)
