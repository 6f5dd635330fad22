"""Batched sampling: many prompts x n completions through one model, reproducibly.

`HFBackend` wraps `model.generate` with left-padded, length-sorted batches and a KV cache.
For a fixed seed, prompts, params and `batch_size`, outputs are identical across runs and
backend instances on CPU. They DO depend on `batch_size`: batch composition changes both the
padding each prompt sees and which random draws it gets, so keep `batch_size` fixed (record it)
when comparing runs. On GPU, kernels may be non-deterministic; expect near-identical outputs.
Greedy (temperature 0) decodes each prompt once and returns n equal copies.

Prefix sharing (`share_prefix=True`, the default): when sampling n > 1 completions per prompt,
HF's `generate(num_return_sequences=n)` repeats each prompt n times *before* the prefill, so the
prompt is computed n times. Instead, each batch's left-padded prompts minus their last token are
prefilled once into a `DynamicCache`, the cache is repeated n times along the batch dimension, and
`generate` continues from it: it computes only the last prompt token per sequence, then decodes.
Prefill work drops from P*n*W to P*(W-1) + P*n positions (P prompts, padded width W), i.e. about
1/n. The n children of one tree-search node (same prompt) thus share one prefill.
Batch composition, row order and the number of random draws are the same in both modes, so the
outputs usually coincide, but they are not guaranteed to be bitwise equal: the prefix is computed
in a different tensor shape, so logits can differ in the last float bits, which can flip a sampled
token drawn near a probability boundary (and everything after it). Greedy-like decoding
(a tiny top_p) agrees; compare sampled runs only within one mode.

`HFBackend.stats` accumulates prompt/generated/prefill token counts and wall seconds over calls.

Backends by name (`make_backend`): "engine" (`closedloop.engine.EngineBackend`, the default:
continuous batching over the model's forward, see its module doc), "hf" (this module's `HFBackend`,
the reference) and "vllm" (a hook; no vLLM backend ships). Both shipped backends honour
`SamplingParams.stop` and response prefill (a chat whose last message is the assistant's: the
completion continues it), so `closedloop.structured` scaffolds run on either.
"""

from __future__ import annotations

import importlib.util
import inspect
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence, Union

import torch
from tqdm.auto import tqdm

from closedloop import progress
from closedloop.errors import UserError

# A chat (list of {"role", "content"} messages, rendered with the chat template plus the
# assistant header; or, when the last message is the assistant's, rendered so that the completion
# continues that message: response prefill) or raw text used as is.
Prompt = Union[list[dict], str]

# The backend stages use (`stages.common.open_backend`): make_backend(DEFAULT_BACKEND, model, tok, ...).
DEFAULT_BACKEND = "engine"
BACKENDS = ("engine", "hf", "proxy", "vllm")

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


def check_fits_context(model: Any, lengths: Sequence[int], new_tokens: int) -> None:
    """Refuse, before any generation, prompts whose tokens plus `new_tokens` exceed the model's
    context (`config.max_position_embeddings`): past it a model writes garbage or runs out of
    memory (a 20 MB prompt) instead of failing. A model whose config names no context passes."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
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


class HFBackend:
    """`model.generate` over left-padded batches of `batch_size` sequences (prompts x n).

    `share_prefix` (default True): the n samples of a prompt reuse one prefill of it (see the module doc).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, show_progress: bool = True,
                 share_prefix: bool = True):
        if batch_size < 1:
            raise UserError(f"generation: batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress
        # Prefill each prompt once and reuse its KV cache for its n samples (see the module doc).
        self.share_prefix = share_prefix
        self.stop_ids = stop_token_ids(model, tokenizer)
        # Padding is done here rather than by the tokenizer, so the caller's tokenizer keeps its
        # pad token and padding side; EOS stands in for a missing pad token (it is masked anyway).
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        # Cumulative over all calls; benchmarks read them.
        self.stats: dict[str, float] = {
            "prompt_tokens": 0,  # real (non-pad) prompt tokens prefilled, counted once per sequence
            "padded_prompt_tokens": 0,  # prompt positions per sequence, pads included (the unshared prefill)
            "prefill_tokens": 0,  # prompt positions the model actually computed, pads included
            "generated_tokens": 0,  # EOS excluded
            "sequences": 0,
            "batches": 0,
            "seconds": 0.0,
        }

    def _encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        return ids, mask

    def _generate_kwargs(self, params: SamplingParams, copies: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=copies,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            # Pin knobs a checkpoint's generation_config could otherwise slip in, so that
            # SamplingParams alone define the distribution.
            num_beams=1,
            repetition_penalty=1.0,
        )
        if params.temperature == 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        return kw

    def _stop_criteria(self, params: SamplingParams, prompt_width: int) -> dict[str, Any]:
        """generate kwargs that end rows at a stop string (the text cut itself is make_completion's)."""
        if not params.stop:
            return {}
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok, stops = self.tokenizer, params.stop

        # Not generate's own `stop_strings`: its StopStringCriteria matches token strings, which fails on
        # tokenizers whose decoder inserts text between tokens (e.g. WordLevel's spaces) and refuses
        # some vocabularies outright. Decoding each row's completion is slower but always right.
        class _StopStrings(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return torch.tensor([first_stop(tok.decode(row, skip_special_tokens=True), stops) >= 0
                                     for row in input_ids[:, prompt_width:].tolist()], device=input_ids.device)

        return {"stopping_criteria": StoppingCriteriaList([_StopStrings()])}

    def _completion(self, new_tokens: list[int], stops: Sequence[str] = ()) -> Completion:
        return make_completion(self.tokenizer, new_tokens, self.stop_ids, stops)

    def _sample_batch(self, ids: torch.Tensor, mask: torch.Tensor, kw: dict[str, Any], copies: int,
                      **extra: Any) -> Any:
        """`copies` continuations of each left-padded row (prompt-major rows): model.generate's output.

        With `share_prefix` and copies > 1, the rows minus their last token are prefilled once and
        the cache is repeated `copies` times; otherwise generate expands the prompts before its
        prefill. `extra` goes to generate (tests ask for logits). Counts `prefill_tokens`.
        """
        model = self.model
        device = model.device
        ids, mask = ids.to(device), mask.to(device)
        rows, width = ids.shape
        # A checkpoint that asks generate for its own cache type (static, hybrid, ...) cannot be
        # handed a DynamicCache; it keeps the plain path.
        own_cache = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
        if not (self.share_prefix and copies > 1 and width > 1) or own_cache is not None:
            self.stats["prefill_tokens"] += ids.numel() * copies
            return model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
        # Positions as generate derives them from the mask (left pads sit at 0), so the cached keys
        # carry the same rotary positions as in an unshared prefill.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        fwd: dict[str, Any] = dict(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                   position_ids=positions[:, :-1], use_cache=True)
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            fwd["logits_to_keep"] = 1  # the prefix's logits are never used
        cache = model(**fwd).past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):  # e.g. a recurrent-state model: no KV cache to share
            self.stats["prefill_tokens"] += rows * (width - 1) + ids.numel() * copies
            return model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
        cache.batch_repeat_interleave(copies)
        # generate sees the full prompts and a cache holding all but their last position, so its
        # prefill computes only that last token per sequence (mask and positions span the full width).
        shared_kw = {**kw, "num_return_sequences": 1}
        out = model.generate(input_ids=ids.repeat_interleave(copies, dim=0),
                             attention_mask=mask.repeat_interleave(copies, dim=0),
                             past_key_values=cache, **shared_kw, **extra)
        self.stats["prefill_tokens"] += rows * (width - 1) + rows * copies
        return out

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        if empty := [i for i, e in enumerate(encoded) if not e]:
            raise UserError(f"generation: prompts {empty[:5]} are empty after tokenization")
        check_fits_context(self.model, [len(e) for e in encoded], params.max_new_tokens)
        # Longest first: similar lengths share a batch (less padding) and a too-long batch fails early.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        # Greedy completions are all equal (and generate refuses num_return_sequences > 1 without
        # sampling), so decode each prompt once and repeat the result n times.
        copies = 1 if params.temperature == 0 else params.n
        per_batch = max(1, self.batch_size // copies)
        batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
        kw = self._generate_kwargs(params, copies)
        model = self.model
        device = model.device
        out: list[list[Completion] | None] = [None] * len(prompts)
        was_training = model.training
        model.eval()
        # fork_rng: per-batch seeding must not disturb the caller's global RNG stream.
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        start = time.perf_counter()
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
                for b, idx in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not self.show_progress)):
                    # Seeded per batch so a batch's samples do not depend on what ran before it.
                    torch.manual_seed(params.seed + b)
                    ids, mask = self._left_pad([encoded[i] for i in idx])
                    seqs = self._sample_batch(ids, mask, kw, copies, **self._stop_criteria(params, ids.shape[1]))
                    new = seqs[:, ids.shape[1] :].tolist()  # rows are prompt-major: `copies` per prompt
                    for j, i in enumerate(idx):
                        comps = [self._completion(new[j * copies + k], params.stop) for k in range(copies)]
                        out[i] = comps if copies == params.n else [replace(comps[0]) for _ in range(params.n)]
                        # Stats count computed work, not the repeated greedy copies.
                        self.stats["prompt_tokens"] += len(encoded[i]) * copies
                        self.stats["generated_tokens"] += sum(c.num_tokens for c in comps)
                    self.stats["padded_prompt_tokens"] += ids.numel() * copies
                    self.stats["sequences"] += len(idx) * copies
                    self.stats["batches"] += 1
                    progress.report(b + 1, len(batches), "batches generated", detail=True)
        finally:
            self.stats["seconds"] += time.perf_counter() - start
            model.train(was_training)
        return out  # type: ignore[return-value]  # every slot is filled above


def make_backend(name: str, model: Any, tokenizer: Any, **kw: Any) -> GenerationBackend:
    """Backend by name, constructed as `Backend(model, tokenizer, **kw)`.

    "engine": `closedloop.engine.EngineBackend` (DEFAULT_BACKEND; `model` may be a list of models
    with a `combine=` callable), "proxy": the engine with proxy tuning's combination (`model` =
    [base, expert, anti_expert], `alphas=[...]`), "hf": `HFBackend` (the reference), "vllm": a hook
    that raises.
    """
    if name == "engine":
        from closedloop.engine import EngineBackend  # the engine imports this module

        return EngineBackend(model, tokenizer, **kw)
    if name == "proxy":  # model: [base, expert, anti_expert, ...]; kw: alphas, templates (engine/proxy.py)
        from closedloop.engine.proxy import proxy_backend

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
