"""The reference backend: batched sampling through `model.generate`, many prompts x n completions, reproducibly.

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

Like the engine (`closedloop.engine`, the default backend; `closedloop.backends` picks one by
name), it honours `SamplingParams.stop` and response prefill (a chat whose last message is the
assistant's: the completion continues it), so `closedloop.structured` scaffolds run on either.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from closedloop import progress
from closedloop.errors import UserError
from closedloop.generate import (Completion, Prompt, SamplingParams, check_prompts, encode_prompt, eval_mode,
                                 first_stop, logits_to_keep, make_completion, pad_batch, stop_token_ids)


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
        fwd.update(logits_to_keep(model, 1))  # the prefix's logits are never used
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
        check_prompts(self.model, encoded, params.max_new_tokens)
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
        # fork_rng: per-batch seeding must not disturb the caller's global RNG stream.
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        start = time.perf_counter()
        try:
            with eval_mode(model), torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
                for b, idx in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not self.show_progress)):
                    # Seeded per batch so a batch's samples do not depend on what ran before it.
                    torch.manual_seed(params.seed + b)
                    ids, mask = pad_batch([encoded[i] for i in idx], self.pad_id)
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
        return out  # type: ignore[return-value]  # every slot is filled above
