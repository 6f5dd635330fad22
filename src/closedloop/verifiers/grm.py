"""The generative reward model (GRM) of SPCT (DeepSeek-GRM, arXiv 2504.02495): format, scores, votes.

For a query and 1-4 responses the GRM writes, through a scaffold (closedloop.structured):

    Principles: <criteria for this query, with weights>
    Critique: <each response against them>
    Scores: \\boxed{7,3}

one integer from 1 to 10 per response, in the order the responses were shown. The order is shuffled
per sample (the paper's remedy for position bias) and mapped back, so `Judgment.scores[i]` is always
the score of the example's response i.

Scores are read in one of two ways (`score_mode`):
    labels  label scoring: after `Scores: \\boxed{` (and the earlier scores), the model's probability
            of each integer 1-10, read off its next-token logits (no sampling, never fails to
            parse). A response's score is the expectation under that distribution; the next
            response is read after the most probable integer of this one.
    parse   the model writes the box; a missing box, a wrong number of scores, or a score that is
            not an integer in 1-10 is a parse failure (`scores` None), counted, never raised.

Voting (inference-time scaling): k judgments, each response's scores summed, the best is the
argmax. A tie among the top responses counts as half right for a pair (a fair coin), 1/m for m tied.

The registered verifier `generative_rm` judges one response at a time (pointwise): Verdict.score
is (score - 1) / 9, so best-of-N can select with it like with any verifier.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from closedloop.errors import UserError
from closedloop.verifiers.base import Form, Granularity, Source, Verdict, Verifier, register_verifier

MIN_SCORE, MAX_SCORE = 1, 10
MAX_RESPONSES = 4
PRINCIPLES, CRITIQUE, SCORES = "Principles:", "Critique:", "Scores:"
BOX = " \\boxed{"


def grm_messages(query: str, responses: Sequence[str], *, principles: bool = True, hint: str | None = None,
                 max_chars: int | None = None) -> list[dict]:
    """The judging request, one user message (no system turn: some small models' templates refuse one)."""
    if not 1 <= len(responses) <= MAX_RESPONSES:
        raise UserError(f"grm: expected 1-{MAX_RESPONSES} responses, got {len(responses)}")

    def cut(text: str) -> str:
        return text if max_chars is None or len(text) <= max_chars else text[:max_chars] + " [...]"

    k = len(responses)
    what = "the response" if k == 1 else "each response"
    steps = ("write principles (the criteria this query calls for, with weights), " if principles else "") + \
        f"critique {what}, then score {'it' if k == 1 else 'each'} from 1 (poor) to 10 (excellent)"
    scores = ", ".join(f"s{i + 1}" for i in range(k))
    parts = [f"Judge {'the response' if k == 1 else f'the {k} responses'} to the query: {steps} as "
             f"`Scores: \\boxed{{{scores}}}`.", f"### Query\n{cut(query)}"]
    parts += [f"### Response {i + 1}\n{cut(r)}" for i, r in enumerate(responses)]
    if hint:
        parts.append(f"(Hint: {hint})")
    return [{"role": "user", "content": "\n\n".join(parts)}]


def hint_text(example: dict, order: Sequence[int]) -> str:
    """The label, stated in the shown order (hinted sampling)."""
    if example.get("best") is not None:
        return f"Response {list(order).index(example['best']) + 1} is the best."
    return f"the score is {example['score']}."


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_scores(text: str, k: int) -> list[int] | None:
    """The integers in the last \\boxed{...} of text; None unless there are exactly k, each in 1-10."""
    if not isinstance(text, str):
        return None
    boxes = _BOXED.findall(text)
    if not boxes:
        return None
    parts = [p.strip() for p in boxes[-1].split(",")]
    if len(parts) != k or not all(re.fullmatch(r"\d{1,2}", p) for p in parts):
        return None
    values = [int(p) for p in parts]
    return values if all(MIN_SCORE <= v <= MAX_SCORE for v in values) else None


def format_scores(scores: Sequence[int]) -> str:
    return f"{SCORES}{BOX}{','.join(str(int(s)) for s in scores)}}}"


def _digit_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    if not all(len(i) == 1 for i in ids) or tokenizer.encode("10", add_special_tokens=False) != ids[1] + ids[0]:
        raise UserError("grm: score_mode labels needs a tokenizer that writes each digit as one token; "
                        "use score_mode: parse with this model")
    return [i[0] for i in ids]


def box_distributions(model: Any, tokenizer: Any, prompts: Sequence[Any], counts: Sequence[int],
                      batch_size: int = 16) -> list[list[list[float]]]:
    """Per prompt (ending in `\\boxed{`), P(score = s) for s = 1..10 for each of its `counts` scores.

    Score j is read after the most probable integer of each earlier one and a comma, all on one
    KV cache: one prefill per prompt plus a few tokens per score. Prompts are batched with equal
    prefixes side by side (sorted by token ids) and a batch's common prefix (e.g. the judging
    request that k sampled judgments answer) is prefilled once for all its rows. Written here
    rather than with label_scoring.score_labels because "1" is a prefix of "10" (the labels are not
    prefix-free): P(first digit) comes from the logits; one speculative token "1" gives
    P("0" | "1"), which splits P("1") into 10 and 1, and is then cropped off the cache.
    """
    import torch

    from closedloop.generate import encode_prompt, eval_mode

    digits = _digit_ids(tokenizer)
    comma = tokenizer.encode(",", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=encoded.__getitem__)
    out: list[list[list[float]]] = [[] for _ in encoded]
    with eval_mode(model), torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            dists = _box_batch(model, [encoded[i] for i in idx], [counts[i] for i in idx], digits, comma, pad)
            for i, d in zip(idx, dists):
                out[i] = d
    return out


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the rows' common prefix, leaving every row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        n = next((i for i in range(n) if r[i] != first[i]), n)
    return max(n, 0)


def _box_batch(model: Any, chunk: list[list[int]], counts: list[int], digits: list[int], comma: list[int],
               pad: int) -> list[list[list[float]]]:
    import torch

    from closedloop.generate import logits_to_keep, pad_batch

    dev = model.device
    keep = logits_to_keep(model, 1)
    rows = len(chunk)
    shared = _common_prefix(chunk)
    cache = None
    if shared:  # one prefill of the shared prefix, repeated for every row
        cache = model(input_ids=torch.tensor([chunk[0][:shared]], device=dev), use_cache=True, **keep).past_key_values
        cache.batch_repeat_interleave(rows)
    ids, own = pad_batch([c[shared:] for c in chunk], pad, device=dev)  # a hole between prefix and suffix
    mask = torch.cat([torch.ones((rows, shared), dtype=own.dtype, device=dev), own], -1)
    pos = (shared + own.cumsum(-1) - 1).clamp(min=0)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, **keep)
    cache, logits, last = res.past_key_values, res.logits[:, -1].float(), pos[:, -1:]
    dists: list[list[list[float]]] = [[] for _ in chunk]
    for j in range(max(counts)):
        first = torch.softmax(logits, -1)[:, digits]  # P(digit 0..9)
        one = torch.full((rows, 1), digits[1], dtype=torch.long, device=dev)
        spec = model(input_ids=one, attention_mask=torch.cat([mask, torch.ones_like(one)], -1), position_ids=last + 1,
                     past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the speculative token
        probs = score_probs(first, torch.softmax(spec.logits[:, -1].float(), -1)[:, digits[0]])
        for r in range(rows):
            if j < counts[r]:
                dists[r].append(probs[r].tolist())
        if j + 1 == max(counts):
            break
        # feed "<most probable integer>," per row, left-padded within the step (a hole in the mask)
        feeds = [[digits[int(d)] for d in str(int(probs[r].argmax()) + MIN_SCORE)] + comma for r in range(rows)]
        f_ids, f_mask = pad_batch(feeds, pad, device=dev)
        f_pos = last + f_mask.cumsum(-1)
        mask = torch.cat([mask, f_mask], -1)
        res = model(input_ids=f_ids, attention_mask=mask, position_ids=f_pos, past_key_values=cache, use_cache=True,
                    **keep)
        logits, last = res.logits[:, -1].float(), f_pos[:, -1:]
    return dists


def score_probs(first: Any, p_zero: Any) -> Any:
    """P(score = 1..10) from P(first digit = 0..9) (..., 10) and P("0" after "1") (...): "1" splits
    into 10 (a "0" follows) and 1; renormalised over the integers 1-10."""
    import torch

    probs = torch.cat([(first[..., 1] * (1 - p_zero))[..., None], first[..., 2:10], (first[..., 1] * p_zero)[..., None]],
                      -1)
    return probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)


class BoxReader:
    """The engine's reader for `Scores: \\boxed{` (EngineBackend.generate_scaffold's `read`): the
    same reading as box_distributions, on the generation's own KV cache, so a judgment costs no
    second prefill. Per score: P(first digit) from the logits, a speculative "1" for P("0" | "1"),
    dropped again, then "<most probable integer>," is fed and the next score read."""

    def __init__(self, count: int, digits: list[int], comma: list[int]) -> None:
        self.count, self.digits, self.comma = count, digits, comma
        self.dists: list[list[float]] = []
        self._first: Any = None

    def step(self, logits: Any) -> tuple[int, list[int]] | None:
        import torch

        p = torch.softmax(logits.float(), -1)
        if self._first is None:
            self._first = p[self.digits]
            return 0, [self.digits[1]]
        probs = score_probs(self._first, p[self.digits[0]])
        self._first = None
        self.dists.append(probs.tolist())
        if len(self.dists) == self.count:
            return None
        best = str(int(probs.argmax()) + MIN_SCORE)
        return 1, [self.digits[int(d)] for d in best] + self.comma


def expected_score(dist: Sequence[float]) -> float:
    return sum((s + MIN_SCORE) * p for s, p in enumerate(dist))


@dataclass
class Judgment:
    text: str  # the GRM's answer as shown (scores in the shown order)
    order: list[int]  # order[j] = the example's response shown as Response j+1
    scores: list[float] | None  # per response of the example (original order); None = parse failure
    num_tokens: int  # generated tokens
    dists: list[list[float]] | None = None  # labels mode: P(1..10) per response (original order)

    def best(self) -> int | None:
        return unique_argmax(self.scores) if self.scores is not None else None


def unique_argmax(values: Sequence[float]) -> int | None:
    top = max(values)
    winners = [i for i, v in enumerate(values) if v == top]
    return winners[0] if len(winners) == 1 else None


def credit(example: dict, scores: Sequence[float] | None) -> float:
    """How right one set of scores is: for a ranked example 1 if the labelled best is the unique top,
    1/m if it ties with m-1 others, else 0; for a single scored response 1 if the rounded score
    equals the label. None (a parse failure) is 0."""
    if scores is None:
        return 0.0
    if example.get("best") is not None:
        top = max(scores)
        winners = [i for i, v in enumerate(scores) if v == top]
        return 1.0 / len(winners) if example["best"] in winners else 0.0
    return float(round(scores[0]) == int(example["score"]))


def rule_reward(example: dict, scores: Sequence[float] | None) -> float:
    """SPCT's online-RL reward: +1 when the predicted best is the labelled best (a unique top) or the
    single score equals the label, -1 otherwise (ties and parse failures included)."""
    if scores is None:
        return -1.0
    if example.get("best") is not None:
        return 1.0 if unique_argmax(scores) == example["best"] else -1.0
    return 1.0 if round(scores[0]) == int(example["score"]) else -1.0


def vote(judgments: Sequence[Judgment]) -> list[float] | None:
    """Summed scores per response over the judgments that parsed; None if none did."""
    parsed = [j.scores for j in judgments if j.scores is not None]
    if not parsed:
        return None
    return [sum(s[i] for s in parsed) for i in range(len(parsed[0]))]


def shown_order(num_responses: int, rng: random.Random, shuffle: bool) -> list[int]:
    order = list(range(num_responses))
    if shuffle:
        rng.shuffle(order)
    return order


def judge(backend: Any, examples: Sequence[dict], *, n: int, temperature: float, top_p: float,
          principles_tokens: int, critique_tokens: int, principles: bool, score_mode: str, seed: int,
          shuffle: bool = True, hinted: bool = False, max_chars: int | None = None,
          batch_size: int = 16) -> list[list[Judgment]]:
    """n judgments per example (`{"prompt", "responses", "best" | "score"}`), each on its own shuffled order.

    The scaffold writes Principles (unless `principles` is off) and Critique; then the scores are
    written by the model and parsed (`parse`) or read by label scoring (`labels`).
    """
    from closedloop.generate import SamplingParams
    from closedloop.structured import Segment, continue_prompt, generate_scaffold

    rng = random.Random(seed)
    orders = [[shown_order(len(ex["responses"]), rng, shuffle) for _ in range(n)] for ex in examples]
    chats, owners = [], []
    for e, ex in enumerate(examples):
        for s, order in enumerate(orders[e]):
            chats.append(grm_messages(ex["prompt"], [ex["responses"][i] for i in order], principles=principles,
                                      hint=hint_text(ex, order) if hinted else None, max_chars=max_chars))
            owners.append((e, s))
    segs = ([Segment(PRINCIPLES, principles_tokens)] if principles else []) + [Segment(CRITIQUE, critique_tokens)]
    if score_mode == "parse":
        segs.append(Segment(SCORES, 6 * MAX_RESPONSES, ("\n",)))
    elif score_mode != "labels":
        raise UserError(f"grm: score_mode: expected labels or parse, got {score_mode!r}")
    params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_new_tokens=1, seed=seed)
    # n=1 per chat: every sample has its own shuffled prompt (equal ones share a prefill on the engine)
    counts = [len(examples[e]["responses"]) for e, _ in owners]
    if score_mode == "labels" and hasattr(backend, "generate_scaffold"):  # the engine reads the box itself
        digits, comma = _digit_ids(backend.tokenizer), backend.tokenizer.encode(",", add_special_tokens=False)
        read = (SCORES + BOX, lambda i: BoxReader(counts[i], digits, comma))
        outs = [o[0] for o in backend.generate_scaffold(chats, segs, params, read=read)]
        answers = [o.text for o in outs]  # the read header included
        all_dists = [o.read.dists for o in outs]
    else:
        outs = [o[0] for o in generate_scaffold(backend, chats, segs, params)]
        answers = [o.text + "\n" + SCORES + BOX for o in outs]
        if score_mode == "labels":  # every score of a judgment read off one prefill of its answer so far
            all_dists = box_distributions(backend.model, backend.tokenizer,
                                          [continue_prompt(c, a) for c, a in zip(chats, answers)], counts, batch_size)
    result: list[list[Judgment]] = [[None] * n for _ in examples]  # type: ignore[list-item]
    if score_mode == "parse":
        for (e, s), out in zip(owners, outs):
            order = orders[e][s]
            shown = parse_scores(SCORES + " " + out.segments[-1], len(order))
            scores = None if shown is None else _unshuffle([float(v) for v in shown], order)
            result[e][s] = Judgment(out.text, order, scores, out.num_tokens)
        return result
    for b, (e, s) in enumerate(owners):
        order, dists = orders[e][s], all_dists[b]
        ints = [str(max(range(len(d)), key=d.__getitem__) + MIN_SCORE) for d in dists]
        result[e][s] = Judgment(answers[b] + ",".join(ints) + "}", order,
                                _unshuffle([expected_score(d) for d in dists], order), outs[b].num_tokens,
                                _unshuffle(dists, order))
    return result


def _unshuffle(shown: list, order: Sequence[int]) -> list:
    """Shown position j holds the example's response order[j]; return them in the example's order."""
    out: list = [None] * len(order)
    for j, i in enumerate(order):
        out[i] = shown[j]
    return out


@register_verifier("generative_rm")
class GenerativeRMVerifier(Verifier):
    """A GRM checkpoint judging one response (pointwise, greedy): Verdict.score = (score - 1) / 9;
    passed when the score is at least `threshold`."""

    name = "generative_rm"
    form = Form.SCORE
    granularity = Granularity.TRAJECTORY
    source = Source.MODEL

    def __init__(self, model: str = "models/spct/grm", principles: bool = True, score_mode: str = "labels",
                 principles_tokens: int = 32, critique_tokens: int = 48, threshold: float = 6.0,
                 batch_size: int = 16, max_chars: int | None = 1200, dtype: str = "float32",
                 trust_remote_code: bool = False) -> None:
        from closedloop.backends import DEFAULT_BACKEND, make_backend
        from closedloop.models import load_model

        m, tok = load_model(Path(model), dtype=dtype, trust_remote_code=trust_remote_code)
        self.backend = make_backend(DEFAULT_BACKEND, m, tok, batch_size=batch_size)
        self.kw = dict(n=1, temperature=0.0, top_p=1.0, principles_tokens=principles_tokens,
                       critique_tokens=critique_tokens, principles=principles, score_mode=score_mode, seed=0,
                       shuffle=False, max_chars=max_chars, batch_size=batch_size)
        self.threshold = threshold

    def verify(self, sample: dict) -> Verdict:
        return self.verify_batch([sample])[0]

    def verify_batch(self, samples: list[dict]) -> list[Verdict]:
        examples = [{"prompt": s["prompt"], "responses": [s["response"]], "score": 0} for s in samples]
        out = []
        for (j,) in judge(self.backend, examples, **self.kw):
            if j.scores is None:
                out.append(Verdict(False, 0.0, {"parsed": False}))
            else:
                s = j.scores[0]
                out.append(Verdict(s >= self.threshold, (s - MIN_SCORE) / (MAX_SCORE - MIN_SCORE), {"grm_score": s}))
        return out
