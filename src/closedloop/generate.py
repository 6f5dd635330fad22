"""What every generation backend shares: prompts, sampling params, completions, and the helpers
each backend and scorer would otherwise write again (padding, eval mode, the logits-to-keep probe,
seed streams).

A leaf: it imports no other generation module, so the backends (`closedloop.hf_backend`, the
engine in `closedloop.engine`) and `closedloop.backends.make_backend`, which picks one by name,
all import it at the top of their files.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, Union

import torch

from closedloop.errors import UserError

# A chat (list of {"role", "content"} messages, rendered with the chat template plus the
# assistant header; or, when the last message is the assistant's, rendered so that the completion
# continues that message: response prefill) or raw text used as is.
Prompt = Union[list[dict], str]

# End-of-turn markers of common chat templates. One counts as a stop token only if the
# tokenizer's template mentions it and it is a single token in the vocabulary.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 0.8  # 0 -> greedy
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 0
    # Stop strings: generation ends once the decoded completion contains one (it may span several
    # tokens); the returned text ends before it and finish_reason is "stop".
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise UserError(f"sampling: stop strings must be non-empty strings, got {self.stop!r}")
        if self.n < 1:
            raise UserError(f"sampling: n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise UserError(f"sampling: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"sampling: max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    text: str
    num_tokens: int  # generated tokens, EOS excluded; with a stop string, up to the token completing it
    finish_reason: str  # "stop" (EOS/stop token/stop string) or "length"


class GenerationBackend(Protocol):
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]: ...


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """Chat messages -> template text ending in the assistant header; a string passes through.

    A chat whose last message has role "assistant" is a response prefill: it is rendered with
    `continue_final_message=True` (no end-of-turn after it), so the completion continues that text.
    """
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("prompt is a list of chat messages but the tokenizer has no chat_template")
    if prompt and prompt[-1].get("role") == "assistant":
        return tokenizer.apply_chat_template(prompt, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def raw_prompt(prompt: Prompt) -> str:
    """A prompt as plain text, no chat template: the messages' contents, a blank line apart; a
    response prefill (a final assistant message) continues on the next line. A string passes through."""
    if isinstance(prompt, str):
        return prompt
    head = [m["content"] for m in prompt if m.get("role") != "assistant" or m is not prompt[-1]]
    tail = prompt[-1]["content"] if prompt and prompt[-1].get("role") == "assistant" else ""
    return "\n\n".join(head) + "\n" + tail


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt token ids as every backend feeds them to the model."""
    text = render_prompt(tokenizer, prompt)
    # Chat templates already write BOS and friends; raw text gets the tokenizer's usual specials.
    return tokenizer.encode(text, add_special_tokens=isinstance(prompt, str))


def check_prompts(model: Any, encoded: Sequence[Sequence[int]], new_tokens: int) -> None:
    """Refuse, before any generation, prompts that tokenize to nothing, and prompts whose tokens plus
    `new_tokens` exceed the model's context (`config.max_position_embeddings`): past it a model
    writes garbage or runs out of memory (a 20 MB prompt) instead of failing. A model whose config
    names no context passes that check."""
    if empty := [i for i, e in enumerate(encoded) if not e]:
        raise UserError(f"generation: prompts {empty[:5]} are empty after tokenization")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    lengths = [len(e) for e in encoded]
    too_long = [i for i, n in enumerate(lengths) if n + new_tokens > limit]
    if too_long:
        worst = max(too_long, key=lambda i: lengths[i])
        raise UserError(f"generation: {len(too_long)} of {len(lengths)} prompts do not fit the model's context of "
                        f"{limit} tokens with {new_tokens} new tokens (the longest, prompt {worst} counting from 0, "
                        f"has {lengths[worst]} tokens); shorten those prompts or lower max_new_tokens")


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Index in `text` where the earliest stop string starts, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def make_completion(tokenizer: Any, new_tokens: list[int], stop_ids: Sequence[int],
                    stops: Sequence[str] = ()) -> Completion:
    """Generated ids -> Completion: cut at the first stop token, then at the first stop string.

    With a stop string, num_tokens counts the tokens up to the one whose decoding completes it
    (the smallest such prefix, found by bisection over prefix decodes), the text ends before it.
    """
    ids = set(stop_ids)
    cut = next((i for i, t in enumerate(new_tokens) if t in ids), None)
    kept = new_tokens if cut is None else new_tokens[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if stops and (at := first_stop(text, stops)) >= 0:
        lo, hi = 1, len(kept)  # invariant: the prefix of length hi contains a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if first_stop(tokenizer.decode(kept[:mid], skip_special_tokens=True), stops) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return Completion(text=text[:at].rstrip(), num_tokens=hi, finish_reason="stop")
    return Completion(text=text.rstrip(), num_tokens=len(kept), finish_reason="length" if cut is None else "stop")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config and tokenizer, plus the template's end-of-turn token."""
    ids: list[int] = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]:
        if i is not None and i not in ids:
            ids.append(int(i))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else str(template)
    for tok in _END_OF_TURN:
        if tok in template:
            # A marker split into several pieces would not be a reliable single-step stop.
            pieces = tokenizer.encode(tok, add_special_tokens=False)
            if len(pieces) == 1 and pieces[0] != tokenizer.unk_token_id and pieces[0] not in ids:
                ids.append(int(pieces[0]))
    if not ids:
        raise UserError("generation: neither the model's generation_config nor the tokenizer defines an EOS token")
    return ids


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left",
              device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), each (rows, longest), padded on `side`: left for a
    causal LM that continues each row (its last tokens line up), right for one read at the start."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[row, cols] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


@contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """The models in eval mode (dropout off) for the block, then each back in the mode it was in:
    a caller may be half-way through training one."""
    training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(models, training):
            m.train(was)


def logits_to_keep(model: Any, n: int) -> dict[str, int]:
    """`{"logits_to_keep": n}` for a forward that takes it (transformers' causal LMs then compute the
    vocabulary logits of the last n positions only), `{}` for one that does not. A PEFT model is
    asked about its base model, to which it passes its keyword arguments (the LM head's matmul
    then has another shape, which on a GPU can move the kept logits' last bits)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


def derived_seed(seed: int, stream: int) -> int:
    """The seed of one of many streams (a batch, a call) under a run's `seed`: distinct for every
    (seed, stream) while streams stay below the prime 1_000_003, and independent of the streams
    that ran before it, so a resumed run draws what a whole one drew."""
    return seed * 1_000_003 + stream

