"""EngineBackend: a continuous-batching decode loop over one or several models' forward passes.

Where HF's batched `generate` loses time on CPU (SmolLM2-135M, batch 32, 2 cores, profiled):
finished rows keep computing until the whole batch is done; top-p sorts the full vocabulary every
step (~67 ms of a ~170 ms step); DynamicCache copies the whole cache per layer per step (torch.cat);
the prompt of n samples is prefilled n times. This loop instead:

- keeps up to `batch_size` rows (sequences) live; a finished row's slot is refilled from the queue
  (prompts longest first) once `refill_min` slots are free, so the batch stays full;
- prefills each admitted prompt once (all its samples, and any equal prompt in the same call, share
  it: `share_prefix`, the default) and copies the KV into the samples' slots of a preallocated cache (`kv.SlotCache`), which decode
  steps write in place;
- samples with an exact top-k-prefiltered nucleus (`sampling.sample_next`), in float32;
- steps several models in lockstep, each with its own cache, and samples from
  `combine([logits_model_0, logits_model_1, ...], prompts)` (float32; `prompts`: each row's index
  in the caller's list, so a combination may differ per prompt), e.g. proxy tuning's
  base + alpha * (expert - anti_expert). All models must share the tokenizer;
- writes scaffolds (`generate_scaffold`) in the same loop: a row that ends a segment is fed the
  next header as forced tokens and carries on, so its text is never re-encoded.

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

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from closedloop import progress
from closedloop.engine.kv import SlotCache, Window, is_plain_dynamic
from closedloop.engine.sampling import sample_next
from closedloop.errors import UserError
from closedloop.generate import (Completion, Prompt, SamplingParams, check_prompts, encode_prompt, eval_mode,
                                 first_stop, logits_to_keep, make_completion, pad_batch, raw_prompt, stop_token_ids)
from closedloop.structured import ScaffoldOutput, continue_prompt

# combine(per-model float32 logits, each (rows, vocab), each row's prompt index in the caller's list)
# -> (rows, vocab) float32 logits to sample from.
Combine = Callable[[list[torch.Tensor], list[int]], torch.Tensor]


def _first(logits: list[torch.Tensor], prompts: list[int]) -> torch.Tensor:
    return logits[0]


@dataclass
class _Seq:
    prompt: int  # index in the caller's prompt list
    sample: int  # 0 .. copies - 1
    views: tuple[list[int], ...]  # prompt token ids per model (its own view of the prompt)
    uniforms: np.ndarray | None = None  # one draw per sampled token, made at first use; unused when greedy
    out: list[int] = field(default_factory=list)  # every token fed or pending after the prompt, forced ones too
    draws: int = 0  # tokens sampled so far (forced ones draw nothing)
    phase: int = 0  # scaffold segment being written (0 for plain generation)
    phase_start: int = 0  # index in `out` of the current phase's first sampled token
    forced: list[int] = field(default_factory=list)  # tokens to feed before sampling resumes (a header)
    segments: list[Completion] = field(default_factory=list)  # finished phases
    reader: Any = None  # after the last phase: reads the next-token logits (see generate_scaffold)
    reading: bool = False

    @property
    def ids(self) -> list[int]:
        """The prompt as the first model sees it (the one sampled tokens are decoded with)."""
        return self.views[0]


@dataclass(frozen=True)
class _Phase:
    max_new_tokens: int
    stop: tuple[str, ...]  # the next segment's header is one of them
    join: str = ""  # text written after this phase's text, before the next phase: separator + next header


class EngineBackend:
    """Continuous batching over `model(...)` forwards; `generate` satisfies GenerationBackend.

    model: one causal LM, or a list of them (same tokenizer) stepped together; then `combine`
        maps their float32 next-token logits (and each row's prompt index) to the logits sampled
        from (required for > 1 model).
    batch_size: live sequences (rows) per forward.
    share_prefix: prefill a prompt once for its n samples (default True).
    templates: per model, whether a chat prompt is rendered with the chat template (True, the
        default) or given as its raw text (False: `generate.raw_prompt`); each model then keeps its
        own mask and positions, and all of them take the same sampled tokens.
    refill_min: refill finished rows once this many are free (default max(1, batch_size // 8)):
        a prefill forward per admission has a fixed cost, idle rows cost little each.
    prefilter_k: top-k slice for nucleus sampling (speed only; results are exact).
    """

    def __init__(self, model: Any | Sequence[Any], tokenizer: Any, batch_size: int = 16,
                 show_progress: bool = True, share_prefix: bool = True, combine: Combine | None = None,
                 refill_min: int | None = None, prefilter_k: int = 64, templates: Sequence[bool] | None = None):
        if batch_size < 1:
            raise UserError(f"generation: batch_size must be >= 1, got {batch_size}")
        self.models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not self.models:
            raise UserError("generation: the engine needs at least one model")
        if len(self.models) > 1 and combine is None:
            raise UserError("generation: several models need a combine(list_of_logits, prompts) -> logits callable")
        self.model = self.models[0]
        self.tokenizer = tokenizer
        self.templates = list(templates) if templates is not None else [True] * len(self.models)
        if len(self.templates) != len(self.models):
            raise UserError(f"generation: {len(self.templates)} templates for {len(self.models)} models")
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.share_prefix = share_prefix
        self.combine: Combine = combine or _first
        self.refill_min = refill_min or max(1, batch_size // 8)
        self.prefilter_k = prefilter_k
        self.stop_ids = stop_token_ids(self.model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        self._keep_logits = [logits_to_keep(m, 1) for m in self.models]
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
        return [[replace(s.segments[-1]) for s in seqs] for seqs in self._run(prompts, params)]

    def sample_ids(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[tuple[list[int], list[int]]]]:
        """Like `generate`, but the token ids: per prompt, n (prompt ids, sampled ids) pairs; the
        sampled ids end with the stop token when there is one (RL needs the exact tokens, which
        re-encoding the text would not give back)."""
        return [[(s.ids, list(s.out)) for s in seqs] for seqs in self._run(prompts, params)]

    def generate_scaffold(self, prompts: Sequence[Prompt], segments: Sequence[Any], params: SamplingParams,
                          separator: str = "\n", read: tuple[str, Callable[[int], Any]] | None = None
                          ) -> list[list[Any]]:
        """`closedloop.structured.generate_scaffold` in one decode loop: at a segment's end the row
        stays live and is fed the separator and the next header as forced tokens, so the text so far
        is never re-encoded (the re-encoding path prefills it once per segment). The answer text is
        the one a re-encoding scaffold writes; the tokens the model conditions on can differ from a
        fresh tokenization of it only where a header meets the text before it.

        read = (header, make_reader): after the last segment the row is fed separator + header,
        then `make_reader(prompt_index)` (one reader per sample) is handed the float32 next-token
        logits each time the row's forced tokens run out: `reader.step(logits)` returns
        (drop, tokens): drop that many of the last fed tokens from the cache (e.g. a speculative
        one), then feed `tokens` (at least one); or None when it has read all it needs. The reader
        comes back as ScaffoldOutput.read: label scoring on the generation's own KV cache.
        """
        tail = [*segments[1:], None]
        phases = [_Phase(seg.max_new_tokens, tuple(seg.stop) + ((nxt.header,) if nxt else ()),
                         separator + (nxt.header if nxt else read[0]) if (nxt or read) else "")
                  for seg, nxt in zip(segments, tail)]
        runs = self._run([continue_prompt(p, segments[0].header) for p in prompts], params, phases,
                         read[1] if read else None)
        out = []
        for seqs in runs:
            outs = []
            for s in seqs:
                text = segments[0].header + "".join(c.text + ph.join for c, ph in zip(s.segments, phases))
                outs.append(ScaffoldOutput(text, [c.text.strip() for c in s.segments],
                                           sum(c.num_tokens for c in s.segments),
                                           [c.finish_reason for c in s.segments], s.reader))
            out.append(outs)
        return out

    def _run(self, prompts: Sequence[Prompt], params: SamplingParams, phases: Sequence[_Phase] | None = None,
             make_reader: Callable[[int], Any] | None = None) -> list[list[_Seq]]:
        """n finished sequences per prompt (greedy: one, repeated n times)."""
        if not prompts:
            return []
        cache: dict[bool, list[list[int]]] = {}  # one encoding per distinct view
        views = [cache.setdefault(t, [encode_prompt(self.tokenizer, p if t else raw_prompt(p)) for p in prompts])
                 for t in self.templates]
        encoded = list(zip(*views))
        # The sampled tokens' budget; a scaffold's forced headers and a reader's tokens add a few more.
        new_tokens = sum(ph.max_new_tokens for ph in phases) if phases else params.max_new_tokens
        for model, view in zip(self.models, views):
            check_prompts(model, view, new_tokens)
        copies = 1 if params.temperature == 0 else params.n
        start = time.perf_counter()
        try:
            with eval_mode(*self.models), torch.inference_mode():
                done = _Run(self, encoded, params, copies, phases, make_reader).run()
        finally:
            self.stats["seconds"] += time.perf_counter() - start
        out: list[list[_Seq]] = []
        for i, e in enumerate(encoded):
            seqs = [done[(i, k)] for k in range(copies)]
            out.append(seqs if copies == params.n else seqs * params.n)
            self.stats["prompt_tokens"] += len(e[0]) * copies
            self.stats["generated_tokens"] += sum(c.num_tokens for s in seqs for c in s.segments)
            self.stats["sequences"] += copies
        return out


class _Run:
    """State of one `generate` call: the queue, the live rows and their caches."""

    def __init__(self, eng: EngineBackend, encoded: list[tuple[list[int], ...]], params: SamplingParams, copies: int,
                 phases: Sequence[_Phase] | None = None, make_reader: Callable[[int], Any] | None = None):
        self.eng, self.params, self.encoded, self.make_reader = eng, params, encoded, make_reader
        self.phases = list(phases or [_Phase(params.max_new_tokens, params.stop)])
        self.joins = [eng.tokenizer.encode(ph.join, add_special_tokens=False) for ph in self.phases]
        self.device = eng.model.device
        # longest first (less padding); identical prompts side by side, so that they share a prefill
        order = sorted(range(len(encoded)), key=lambda i: (-max(map(len, encoded[i])), encoded[i], i))
        self.queue: deque[_Seq] = deque(_Seq(i, k, encoded[i]) for i in order for k in range(copies))
        self.done: dict[tuple[int, int], _Seq] = {}
        self.stop_set = set(eng.stop_ids)
        self.budget = sum(ph.max_new_tokens for ph in self.phases)  # sampled tokens per sequence, at most
        # a row admitted now finishes without a reallocation (a header's re-encoded overlap aside)
        self.headroom = self.budget + sum(map(len, self.joins)) + 1
        self.slots: list[_Seq | None] = []
        self.cache_len: list[int] = []  # positions each row holds in the cache
        self.window: Window | None = None
        self.caches: list[SlotCache] = []
        # per model: attention mask (rows, capacity) and next position (rows,); one view each
        self.masks: list[torch.Tensor] = []
        self.poss: list[torch.Tensor] = []
        self.next_tok = torch.empty(0)
        self.bar = tqdm(total=len(self.queue), desc="generate", unit="seq", disable=not eng.show_progress)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _phase_done(self, s: _Seq) -> bool:
        toks, ph = s.out[s.phase_start:], self.phases[s.phase]
        if toks[-1] in self.stop_set:
            return True
        if ph.stop and first_stop(self.eng.tokenizer.decode(toks, skip_special_tokens=True), ph.stop) >= 0:
            return True
        return len(toks) >= ph.max_new_tokens

    def _advance(self, s: _Seq, sampled: int, logits: torch.Tensor) -> tuple[int | None, int]:
        """Take the step's sampled token (or the next forced one, or the reader's): (token to feed
        next, or None when the sequence is done; fed tokens to drop from the cache first: a rollback
        where a header overlapped the text, or a reader's speculative token)."""
        if s.forced:
            s.out.append(s.forced.pop(0))
            return s.out[-1], 0
        if s.reading:
            nxt = s.reader.step(logits)
            if nxt is None:
                self._finish(s)
                return None, 0
            drop, feed = nxt
            del s.out[len(s.out) - drop:]
            s.out += feed[:1]
            s.forced = list(feed[1:])
            return feed[0], drop
        s.out.append(sampled)
        s.draws += 1
        if not self._phase_done(s):
            return sampled, 0
        tok, toks, ph = self.eng.tokenizer, s.out[s.phase_start:], self.phases[s.phase]
        seg = make_completion(tok, toks, self.eng.stop_ids, ph.stop)
        s.segments.append(seg)
        last = s.phase + 1 == len(self.phases)
        if last and self.make_reader is None:
            self._finish(s)
            return None, 0
        if last:
            s.reader, s.reading = self.make_reader(s.prompt), True
        # Next segment: the text so far is this segment's text (cut at its stop, trailing blanks
        # dropped, exactly as a re-encoding scaffold writes it), then the join. Keep the longest
        # run of the segment's tokens that decodes to a prefix of that text; the rest of the text
        # and the join are fed as forced tokens. Tokens past the kept run leave the cache.
        keep = seg.num_tokens
        while keep and not seg.text.startswith(tok.decode(toks[:keep], skip_special_tokens=True)):
            keep -= 1
        forced = tok.encode(seg.text[len(tok.decode(toks[:keep], skip_special_tokens=True)):] + ph.join,
                            add_special_tokens=False)
        s.phase += 1
        if keep == len(toks):  # every token stays; the pending one is fed first
            s.forced = forced
            s.phase_start = len(s.out) + len(forced)
            return sampled, 0
        drop = len(toks) - 1 - keep  # fed tokens past the kept run (the pending one was never fed)
        del s.out[s.phase_start + keep:]
        s.out.append(forced[0])
        s.forced = forced[1:]
        s.phase_start = len(s.out) + len(s.forced)
        return s.out[-1], drop

    def _finish(self, s: _Seq) -> None:
        self.done[(s.prompt, s.sample)] = s
        self.bar.update(1)
        progress.report(len(self.done), self.bar.total, "sequences generated", detail=True)

    def _uniforms(self, seqs: list[_Seq]) -> torch.Tensor | None:
        p = self.params
        if p.temperature == 0:
            return None
        for s in seqs:
            if s.uniforms is None:  # the sequence's own stream: independent of its batch and of timing
                s.uniforms = np.random.default_rng([p.seed, s.prompt, s.sample]).random(self.budget)
        # a row feeding forced tokens draws nothing; its sample is discarded
        return torch.tensor([s.uniforms[min(s.draws, self.budget - 1)] for s in seqs], dtype=torch.float32,
                            device=self.device)

    def _sample(self, logits: list[torch.Tensor], seqs: list[_Seq]) -> tuple[list[int], torch.Tensor]:
        """(sampled token per row, the combined float32 logits they were sampled from)."""
        combined = self.eng.combine(logits, [s.prompt for s in seqs])
        p = self.params
        toks = sample_next(combined, p.temperature, p.top_p, self._uniforms(seqs), self.eng.prefilter_k).tolist()
        return toks, combined

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
        masks = []
        for old in self.masks:
            mask = old.new_zeros((len(rows), capacity))
            mask[:, new_end - width : new_end] = old[idx, w.start : w.end]
            masks.append(mask)
        self.masks, self.poss, self.next_tok = masks, [p[idx] for p in self.poss], self.next_tok[idx]
        self.slots = [self.slots[i] for i in rows]
        self.cache_len = [self.cache_len[i] for i in rows]
        w.start, w.end, w.capacity = new_end - width, new_end, capacity

    # -- the two kinds of forward --------------------------------------------------------------
    def _admit(self, free: list[int]) -> None:
        """Prefill the next queued sequences and put those not already finished into `free` rows."""
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        # Prompts of similar length are prefilled together: one padded forward over prompts of very
        # different lengths computes mostly pads (the queue is sorted longest first). A prompt's
        # samples (and its duplicates: equal prompts are queued side by side) always stay in one
        # group, so that it is prefilled once.
        group: list[_Seq] = []
        lengths: list[int] = []  # of the group's distinct prompts
        for s in take:
            new_prompt = not group or s.views != group[-1].views or not self.eng.share_prefix
            width = max(map(len, s.views))
            if new_prompt and group and lengths[0] * (len(lengths) + 1) > 1.25 * (sum(lengths) + width):
                free = self._prefill(group, free)
                group, lengths = [], []
            group.append(s)
            if new_prompt:
                lengths.append(width)
        self._prefill(group, free)

    def _prefill(self, take: list[_Seq], free: list[int]) -> list[int]:
        """One prefill forward (per model) for `take`; returns the rows still free afterwards."""
        eng = self.eng
        rows_of: dict[Any, int] = {}  # prompt ids -> prefill row (shared by its samples and its duplicates)
        src: list[int] = []
        for j, s in enumerate(take):
            key = tuple(map(tuple, s.views)) if eng.share_prefix else j
            src.append(rows_of.setdefault(key, len(rows_of)))
        firsts = [take[src.index(r)] for r in range(len(rows_of))]
        logits, prefills, pmasks = [], [], []
        for m, (model, keep) in enumerate(zip(eng.models, eng._keep_logits)):
            ids, pmask = pad_batch([s.views[m] for s in firsts], eng.pad_id, device=self.device)
            positions = (pmask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=pmask, position_ids=positions, use_cache=True, **keep)
            eng.stats["prefill_tokens"] += ids.numel()
            pmasks.append(pmask)
            if not is_plain_dynamic(out.past_key_values):
                raise UserError(f"generation backend 'engine' needs a full-attention model with a plain KV cache; "
                                f"{type(model).__name__} is not one: use backend 'hf'")
            logits.append(out.logits[:, -1].float())
            prefills.append(out.past_key_values)
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)
        toks, combined = self._sample([x[src_t] for x in logits], take)
        width = max(pm.shape[1] for pm in pmasks)
        eng.stats["padded_prompt_tokens"] += pmasks[0].shape[1] * len(take)
        eng.stats["batches"] += 1

        stay: list[int] = []
        feed: list[int] = []
        for j, (s, t) in enumerate(zip(take, toks)):
            nxt, _ = self._advance(s, t, combined[j])  # nothing of a row is in its cache yet: no rollback
            if nxt is not None:
                stay.append(j)
                feed.append(nxt)
        if not stay:
            return free
        if self.window is None:  # first prefill: allocate every row of the batch
            n = len(self.slots)
            self.window = Window(0, width, width + self.headroom)
            self.caches = [SlotCache.allocate(p, n, self.window) for p in prefills]
            self.masks = [torch.zeros((n, self.window.capacity), dtype=torch.long, device=self.device) for _ in prefills]
            self.poss = [torch.zeros((n,), dtype=torch.long, device=self.device) for _ in prefills]
            self.next_tok = torch.full((n,), eng.pad_id, dtype=torch.long, device=self.device)
            self.cache_len = [0] * n
        elif self.window.end < width:  # the new prompts reach further left than the buffer does
            # Row indices survive: every row is kept, in place.
            self._rebuild(list(range(len(self.slots))), width)
        end = self.window.end
        dst = free[: len(stay)]
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
        rows_t = src_t[torch.tensor(stay, dtype=torch.long, device=self.device)]
        for cache, prefill, mask, pmask in zip(self.caches, prefills, self.masks, pmasks):
            cache.place(prefill, rows_t, dst_t)
            mask[dst_t] = 0
            mask[dst_t, end - pmask.shape[1] : end] = pmask[rows_t]
        self.next_tok[dst_t] = torch.tensor(feed, dtype=torch.long, device=self.device)
        for slot, j in zip(dst, stay):
            s = take[j]
            self.slots[slot] = s
            self.cache_len[slot] = max(map(len, s.views))
            for m, pos in enumerate(self.poss):
                pos[slot] = len(s.views[m])  # position of the sampled token, fed at the next step
        self._trim()
        return free[len(stay) :]

    def _step(self) -> None:
        """One decode step for every row; live rows take a token, finished ones free their slot."""
        eng, w = self.eng, self.window
        assert w is not None
        if w.end >= w.capacity:
            self._rebuild(list(range(len(self.slots))), w.end - w.start)
        inp = self.next_tok.unsqueeze(-1)
        logits = []
        for model, cache, mask, pos in zip(eng.models, self.caches, self.masks, self.poss):
            mask[:, w.end] = 1
            logits.append(model(input_ids=inp, attention_mask=mask[:, w.start : w.end + 1],
                                position_ids=pos.unsqueeze(-1), past_key_values=cache,
                                use_cache=True).logits[:, -1].float())
            pos += 1
        w.end += 1
        self.cache_len = [c + 1 for c in self.cache_len]
        live = self._live()
        seqs = [self.slots[i] for i in live]
        live_t = torch.tensor(live, dtype=torch.long, device=self.device)
        toks, combined = self._sample([x[live_t] for x in logits], seqs)  # type: ignore[arg-type]
        for j, (i, s, t) in enumerate(zip(live, seqs, toks)):
            nxt, drop = self._advance(s, t, combined[j])  # type: ignore[arg-type]
            if nxt is None:
                self.slots[i] = None
                continue
            self.next_tok[i] = nxt
            if drop:  # masked columns are invisible to attention; positions rewind over them
                for mask, pos in zip(self.masks, self.poss):
                    mask[i, w.end - drop : w.end] = 0
                    pos[i] -= drop
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
