"""EngineBackend: a continuous-batching decode loop over one or several models' forward passes.

Where HF's batched `generate` loses time on CPU (SmolLM2-135M, batch 32, 2 cores, profiled):
finished rows keep computing until the whole batch is done; top-p sorts the full vocabulary every
step (~67 ms of a ~170 ms step); DynamicCache copies the whole cache per layer per step (torch.cat);
the prompt of n samples is prefilled n times. This loop instead:

- keeps up to `batch_size` rows (sequences) live; a finished row's slot is refilled from the queue
  (prompts longest first) once `refill_min` slots are free, so the batch stays full;
- prefills each admitted prompt once (all its samples share it: `share_prefix`, the default) and
  copies the KV into the samples' slots of a preallocated cache (`kv.SlotCache`), which decode
  steps write in place;
- samples with an exact top-k-prefiltered nucleus (`sampling.sample_next`), in float32;
- steps several models in lockstep, each with its own cache, and samples from
  `combine([logits_model_0, logits_model_1, ...])` (float32), e.g. proxy tuning's
  base + alpha * (expert - anti_expert). All models must share the tokenizer.

Determinism: each sequence (prompt i, sample k) draws its uniforms from its own generator seeded
with (seed, i, k), so which random numbers a sequence gets does not depend on its batch. Its logits
can still differ in the last float bits with the batch it shares a forward with (matmul blocking,
padding width), which depends on `batch_size`, `refill_min` and the prompts; so for a fixed seed,
prompts, params and those two settings, outputs are identical across runs on CPU. Greedy decoding
(temperature 0) decodes each prompt once and returns n equal copies; its tokens equal HFBackend's
(see tests/test_engine.py) except where two logits tie within float error.

Profile of this loop (torch.profiler, SmolLM2-135M float32, batch 32, 2 cores): matmuls ~78% of
the time, the model's elementwise ops (mul, silu, attention) ~15%, sampling ~3% (topk + the rare
full-sort fallback rows), cache copies and bookkeeping ~1%. So it runs at about the model's bare
forward speed; a compiled step (torch.compile) could only touch the elementwise share, and the
attention width changes every step (recompiles or dynamic shapes), so it is not used. bfloat16
weights only pay on CPUs with native bf16 matmuls (AVX512-BF16/AMX); on AVX2 a bf16 matmul is ~3x
slower than float32. Sampling always runs on float32 logits.

Models whose cache is not a plain full-attention DynamicCache (sliding-window, recurrent) are
refused with a UserError: use the "hf" backend for them.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from closedloop.engine.kv import SlotCache, Window, is_plain_dynamic
from closedloop.engine.sampling import sample_next
from closedloop.errors import UserError
from closedloop.generate import (Completion, Prompt, SamplingParams, encode_prompt, first_stop, make_completion,
                                 stop_token_ids)

# combine(per-model float32 logits, each (rows, vocab)) -> (rows, vocab) float32 logits to sample from.
Combine = Callable[[list[torch.Tensor]], torch.Tensor]


def _first(logits: list[torch.Tensor]) -> torch.Tensor:
    return logits[0]


@dataclass
class _Seq:
    prompt: int  # index in the caller's prompt list
    sample: int  # 0 .. copies - 1
    ids: list[int]  # prompt token ids
    uniforms: np.ndarray | None = None  # one draw per step, made at first use; unused when greedy
    out: list[int] = field(default_factory=list)


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


class EngineBackend:
    """Continuous batching over `model(...)` forwards; `generate` satisfies GenerationBackend.

    model: one causal LM, or a list of them (same tokenizer) stepped together; then `combine`
        maps their float32 next-token logits to the logits sampled from (required for > 1 model).
    batch_size: live sequences (rows) per forward.
    share_prefix: prefill a prompt once for its n samples (default True).
    refill_min: refill finished rows once this many are free (default max(1, batch_size // 8)):
        a prefill forward per admission has a fixed cost, idle rows cost little each.
    prefilter_k: top-k slice for nucleus sampling (speed only; results are exact).
    """

    def __init__(self, model: Any | Sequence[Any], tokenizer: Any, batch_size: int = 16,
                 show_progress: bool = True, share_prefix: bool = True, combine: Combine | None = None,
                 refill_min: int | None = None, prefilter_k: int = 64):
        if batch_size < 1:
            raise UserError(f"generation: batch_size must be >= 1, got {batch_size}")
        self.models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not self.models:
            raise UserError("generation: the engine needs at least one model")
        if len(self.models) > 1 and combine is None:
            raise UserError("generation: several models need a combine(list_of_logits) -> logits callable")
        self.model = self.models[0]
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.share_prefix = share_prefix
        self.combine: Combine = combine or _first
        self.refill_min = refill_min or max(1, batch_size // 8)
        self.prefilter_k = prefilter_k
        self.stop_ids = stop_token_ids(self.model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        self._keep_logits = ["logits_to_keep" in inspect.signature(m.forward).parameters for m in self.models]
        # Cumulative over all calls; the first seven keys mean what they mean for HFBackend.
        self.stats: dict[str, float] = {
            "prompt_tokens": 0,  # real prompt tokens, once per sequence
            "padded_prompt_tokens": 0,  # prompt positions per sequence, pads included (an unshared prefill)
            "prefill_tokens": 0,  # prompt positions the model(s) actually computed, per model
            "generated_tokens": 0,  # EOS excluded
            "sequences": 0,
            "batches": 0,  # prefill forwards (admissions split into groups of similar prompt length)
            "seconds": 0.0,
            "decode_steps": 0,
            "row_steps": 0,  # rows x decode steps, idle rows included
            "live_row_steps": 0,  # rows x decode steps that produced a token
        }

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        if empty := [i for i, e in enumerate(encoded) if not e]:
            raise UserError(f"generation: prompts {empty[:5]} are empty after tokenization")
        copies = 1 if params.temperature == 0 else params.n
        training = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                done = _Run(self, encoded, params, copies).run()
        finally:
            self.stats["seconds"] += time.perf_counter() - start
            for m, t in zip(self.models, training):
                m.train(t)
        out: list[list[Completion]] = []
        for i, e in enumerate(encoded):
            comps = [done[(i, k)] for k in range(copies)]
            out.append(comps if copies == params.n else [replace(comps[0]) for _ in range(params.n)])
            self.stats["prompt_tokens"] += len(e) * copies
            self.stats["generated_tokens"] += sum(c.num_tokens for c in comps)
            self.stats["sequences"] += copies
        return out


class _Run:
    """State of one `generate` call: the queue, the live rows and their caches."""

    def __init__(self, eng: EngineBackend, encoded: list[list[int]], params: SamplingParams, copies: int):
        self.eng, self.params, self.encoded = eng, params, encoded
        self.device = eng.model.device
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: less padding
        self.queue: deque[_Seq] = deque(_Seq(i, k, encoded[i]) for i in order for k in range(copies))
        self.done: dict[tuple[int, int], Completion] = {}
        self.stop_set = set(eng.stop_ids)
        self.headroom = params.max_new_tokens + 1  # a row admitted now finishes without a reallocation
        self.slots: list[_Seq | None] = []
        self.cache_len: list[int] = []  # positions each row holds in the cache
        self.window: Window | None = None
        self.caches: list[SlotCache] = []
        self.mask = self.next_tok = self.pos = torch.empty(0)
        self.bar = tqdm(total=len(self.queue), desc="generate", unit="seq", disable=not eng.show_progress)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _finished(self, s: _Seq) -> bool:
        if s.out[-1] in self.stop_set:
            return True
        if self.params.stop and first_stop(self.eng.tokenizer.decode(s.out, skip_special_tokens=True),
                                           self.params.stop) >= 0:
            return True
        return len(s.out) >= self.params.max_new_tokens

    def _record(self, s: _Seq) -> None:
        self.done[(s.prompt, s.sample)] = make_completion(self.eng.tokenizer, s.out, self.eng.stop_ids, self.params.stop)
        self.bar.update(1)

    def _uniforms(self, seqs: list[_Seq]) -> torch.Tensor | None:
        p = self.params
        if p.temperature == 0:
            return None
        for s in seqs:
            if s.uniforms is None:  # the sequence's own stream: independent of its batch and of timing
                s.uniforms = np.random.default_rng([p.seed, s.prompt, s.sample]).random(p.max_new_tokens)
        return torch.tensor([s.uniforms[len(s.out)] for s in seqs], dtype=torch.float32, device=self.device)

    def _sample(self, logits: list[torch.Tensor], seqs: list[_Seq]) -> list[int]:
        combined = self.eng.combine(logits)
        p = self.params
        return sample_next(combined, p.temperature, p.top_p, self._uniforms(seqs), self.eng.prefilter_k).tolist()

    def _live(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def _trim(self) -> None:
        """Start the attention window at the oldest column a live row still uses."""
        live = self._live()
        w = self.window
        if w is not None and live:
            w.start = w.end - max(self.cache_len[i] for i in live)

    def _rebuild(self, rows: list[int], new_end: int) -> None:
        """Keep `rows`, with the cache ending at column `new_end` and `headroom` columns after it."""
        w = self.window
        assert w is not None
        width = w.end - w.start
        capacity = new_end + self.headroom
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for cache in self.caches:
            cache.rebuild(idx, new_end, capacity)
        mask = self.mask.new_zeros((len(rows), capacity))
        mask[:, new_end - width : new_end] = self.mask[idx, w.start : w.end]
        self.mask, self.next_tok, self.pos = mask, self.next_tok[idx], self.pos[idx]
        self.slots = [self.slots[i] for i in rows]
        self.cache_len = [self.cache_len[i] for i in rows]
        w.start, w.end, w.capacity = new_end - width, new_end, capacity

    # -- the two kinds of forward --------------------------------------------------------------
    def _admit(self, free: list[int]) -> None:
        """Prefill the next queued sequences and put those not already finished into `free` rows."""
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        # Prompts of similar length are prefilled together: one padded forward over prompts of very
        # different lengths computes mostly pads (the queue is sorted longest first). A prompt's
        # samples always stay in one group, so that it is prefilled once.
        group: list[_Seq] = []
        lengths: list[int] = []  # of the group's distinct prompts
        for s in take:
            new_prompt = not group or s.prompt != group[-1].prompt or not self.eng.share_prefix
            if new_prompt and group and lengths[0] * (len(lengths) + 1) > 1.25 * (sum(lengths) + len(s.ids)):
                free = self._prefill(group, free)
                group, lengths = [], []
            group.append(s)
            if new_prompt:
                lengths.append(len(s.ids))
        self._prefill(group, free)

    def _prefill(self, take: list[_Seq], free: list[int]) -> list[int]:
        """One prefill forward (per model) for `take`; returns the rows still free afterwards."""
        eng = self.eng
        rows_of: dict[int, int] = {}  # prompt -> prefill row (shared by its samples)
        src: list[int] = []
        for j, s in enumerate(take):
            key = s.prompt if eng.share_prefix else -1 - j
            src.append(rows_of.setdefault(key, len(rows_of)))
        uniq = [take[src.index(r)].ids for r in range(len(rows_of))]
        ids, pmask = left_pad(uniq, eng.pad_id, self.device)
        positions = (pmask.cumsum(-1) - 1).clamp(min=0)
        logits, prefills = [], []
        for model, keep in zip(eng.models, eng._keep_logits):
            out = model(input_ids=ids, attention_mask=pmask, position_ids=positions, use_cache=True,
                        **({"logits_to_keep": 1} if keep else {}))
            if not is_plain_dynamic(out.past_key_values):
                raise UserError(f"generation backend 'engine' needs a full-attention model with a plain KV cache; "
                                f"{type(model).__name__} is not one: use backend 'hf'")
            logits.append(out.logits[:, -1].float())
            prefills.append(out.past_key_values)
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)
        toks = self._sample([x[src_t] for x in logits], take)
        width = ids.shape[1]
        eng.stats["prefill_tokens"] += ids.numel() * len(eng.models)
        eng.stats["padded_prompt_tokens"] += width * len(take)
        eng.stats["batches"] += 1

        stay: list[int] = []
        for j, (s, t) in enumerate(zip(take, toks)):
            s.out.append(t)
            if self._finished(s):
                self._record(s)
            else:
                stay.append(j)
        if not stay:
            return free
        if self.window is None:  # first prefill: allocate every row of the batch
            n = len(self.slots)
            self.window = Window(0, width, width + self.headroom)
            self.caches = [SlotCache.allocate(p, n, self.window) for p in prefills]
            self.mask = torch.zeros((n, self.window.capacity), dtype=torch.long, device=self.device)
            self.next_tok = torch.full((n,), eng.pad_id, dtype=torch.long, device=self.device)
            self.pos = torch.zeros((n,), dtype=torch.long, device=self.device)
            self.cache_len = [0] * n
        elif self.window.end < width:  # the new prompts reach further left than the buffer does
            # Row indices survive: every row is kept, in place.
            self._rebuild(list(range(len(self.slots))), width)
        end = self.window.end
        dst = free[: len(stay)]
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
        rows_t = src_t[torch.tensor(stay, dtype=torch.long, device=self.device)]
        for cache, prefill in zip(self.caches, prefills):
            cache.place(prefill, rows_t, dst_t)
        self.mask[dst_t] = 0
        self.mask[dst_t, end - width : end] = pmask[rows_t]
        self.next_tok[dst_t] = torch.tensor([toks[j] for j in stay], dtype=torch.long, device=self.device)
        for slot, j in zip(dst, stay):
            s = take[j]
            self.slots[slot] = s
            self.cache_len[slot] = len(s.ids)
            self.pos[slot] = len(s.ids)  # position of the sampled token, fed at the next step
        self._trim()
        return free[len(stay) :]

    def _step(self) -> None:
        """One decode step for every row; live rows take a token, finished ones free their slot."""
        eng, w = self.eng, self.window
        assert w is not None
        if w.end >= w.capacity:
            self._rebuild(list(range(len(self.slots))), w.end - w.start)
        self.mask[:, w.end] = 1
        attn = self.mask[:, w.start : w.end + 1]
        inp, pos = self.next_tok.unsqueeze(-1), self.pos.unsqueeze(-1)
        logits = [model(input_ids=inp, attention_mask=attn, position_ids=pos, past_key_values=cache,
                        use_cache=True).logits[:, -1].float()
                  for model, cache in zip(eng.models, self.caches)]
        w.end += 1
        self.pos += 1
        self.cache_len = [c + 1 for c in self.cache_len]
        live = self._live()
        seqs = [self.slots[i] for i in live]
        live_t = torch.tensor(live, dtype=torch.long, device=self.device)
        toks = self._sample([x[live_t] for x in logits], seqs)  # type: ignore[arg-type]
        self.next_tok[live_t] = torch.tensor(toks, dtype=torch.long, device=self.device)
        for i, s, t in zip(live, seqs, toks):
            s.out.append(t)
            if self._finished(s):
                self._record(s)
                self.slots[i] = None
        eng.stats["decode_steps"] += 1
        eng.stats["row_steps"] += len(self.slots)
        eng.stats["live_row_steps"] += len(live)
        self._trim()

    def run(self) -> dict[tuple[int, int], Completion]:
        self.slots = [None] * min(self.eng.batch_size, len(self.queue))
        try:
            while True:
                live = self._live()
                free = [i for i, s in enumerate(self.slots) if s is None]
                if self.queue and (not live or len(free) >= min(self.eng.refill_min, len(self.queue))):
                    self._admit(free)
                    continue
                if not live:
                    break
                if not self.queue and free and 4 * len(free) >= len(self.slots):
                    # Only the tail is left: drop idle rows instead of computing them.
                    self._rebuild(live, self.window.end - self.window.start)  # type: ignore[union-attr]
                self._step()
        finally:
            self.bar.close()
        return self.done
