"""Scaffolded generation: fixed headers written by us, free text written by the model between them.

A scaffold such as `Critique: ... Refined response: ...` is a list of `Segment`s. Segment 1's
header is prefilled as the start of the assistant's answer (response prefill), the model writes
until the next header (a stop string), its token limit or end of turn; then the next header is
appended and segment 2 is generated, and so on. The format therefore holds by construction,
whatever the model writes. Each segment has its own token limit and extra stop strings.

Batched and backend-agnostic. A backend with its own `generate_scaffold` (the engine) writes every
segment in one decode loop, feeding each header as forced tokens (no re-encoding). On any other
GenerationBackend honouring `SamplingParams.stop` and response prefill (the HF reference), each
segment is one `backend.generate` call over every live branch, and a later segment re-encodes the
text so far as a new prompt. Either way the n samples per prompt branch at segment 1, each then
continues its own text, and the answer text is built the same way: segment text (cut at its stop,
trailing blanks dropped), separator, next header.

Chat prompts get the answer so far as a final assistant message (rendered with
`continue_final_message`); raw-text prompts get it appended to the string.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from closedloop.errors import UserError
from closedloop.generate import GenerationBackend, Prompt, SamplingParams


@dataclass(frozen=True)
class Segment:
    header: str  # fixed text that opens the segment, e.g. "Critique:"
    max_new_tokens: int  # the model's budget for this segment's text
    stop: tuple[str, ...] = ()  # extra stop strings; the next segment's header is always one


@dataclass
class ScaffoldOutput:
    text: str  # the whole answer: headers and segment texts, joined as the model saw them
    segments: list[str]  # each segment's generated text (stop string and surrounding blanks removed)
    num_tokens: int  # generated tokens over all segments
    finish_reasons: list[str]  # per segment: "stop" (next header / stop string / end of turn) or "length"
    read: Any = None  # the engine's reader after the last segment, when one was asked for


def continue_prompt(prompt: Prompt, answer: str) -> Prompt:
    """`prompt` with `answer` as the start of the assistant's reply (response prefill)."""
    if isinstance(prompt, str):
        return prompt + answer
    return [*prompt, {"role": "assistant", "content": answer}]


def generate_scaffold(backend: GenerationBackend, prompts: Sequence[Prompt], segments: Sequence[Segment],
                      params: SamplingParams, separator: str = "\n") -> list[list[ScaffoldOutput]]:
    """n = params.n scaffolded answers per prompt.

    Segment i runs with params (temperature, top_p) but its own max_new_tokens and stop strings, and
    seed params.seed + i. `separator` goes between a segment's text and the next header. A header
    should not end in whitespace: the model writes its own leading space (and chat templates that
    trim message ends would drop it anyway).
    """
    if not segments:
        raise UserError("scaffold: at least one segment is needed")
    if params.stop:
        raise UserError("scaffold: give stop strings per Segment, not in SamplingParams")
    native = getattr(backend, "generate_scaffold", None)
    if native is not None:
        return native(prompts, segments, params, separator)
    # branch b = (prompt index, answer so far, per-segment texts, tokens, finish reasons)
    answers: list[str] = []
    owners: list[int] = []
    texts: list[list[str]] = []
    tokens: list[int] = []
    reasons: list[list[str]] = []
    for i, seg in enumerate(segments):
        nxt = segments[i + 1].header if i + 1 < len(segments) else None
        stop = tuple(seg.stop) + ((nxt,) if nxt else ())
        sp = replace(params, n=params.n if i == 0 else 1, max_new_tokens=seg.max_new_tokens, stop=stop,
                     seed=params.seed + i)
        if i == 0:
            outs = backend.generate([continue_prompt(p, seg.header) for p in prompts], sp)
            for j, comps in enumerate(outs):
                for c in comps:
                    owners.append(j)
                    answers.append(seg.header)
                    texts.append([])
                    tokens.append(0)
                    reasons.append([])
            flat = [c for comps in outs for c in comps]
        else:
            outs = backend.generate([continue_prompt(prompts[o], a) for o, a in zip(owners, answers)], sp)
            flat = [comps[0] for comps in outs]
        for b, c in enumerate(flat):
            body = c.text.rstrip()
            texts[b].append(body.strip())
            tokens[b] += c.num_tokens
            reasons[b].append(c.finish_reason)
            answers[b] += body
            if nxt:
                answers[b] += separator + nxt
    result: list[list[ScaffoldOutput]] = [[] for _ in prompts]
    for b, o in enumerate(owners):
        result[o].append(ScaffoldOutput(answers[b], texts[b], tokens[b], reasons[b]))
    return result
