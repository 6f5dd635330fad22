"""Synthetic verifiable instruction-following suite (IFEval-style) built from seed writing tasks.

Each row pairs one seed task with a few IFEval rule constraints whose descriptions are appended to
the task text, in the same row format as IFEval's input_data.jsonl (key, prompt, instruction_id_list,
kwargs), so synthetic rows and the real benchmark feed one evaluation.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from closedloop.errors import UserError
from closedloop.io import iter_jsonl

_KW = "keywords:"
_LEN = "length_constraints:"
_CONTENT = "detectable_content:"
_FMT = "detectable_format:"
_COMB = "combination:"
_SE = "startend:"
_CASE = "change_case:"

EXISTENCE, FREQUENCY, FORBIDDEN, LETTER = (
    _KW + "existence", _KW + "frequency", _KW + "forbidden_words", _KW + "letter_frequency")
LANGUAGE = "language:response_language"
SENTENCES, PARAGRAPHS, WORDS, NTH_PARAGRAPH = (
    _LEN + "number_sentences", _LEN + "number_paragraphs", _LEN + "number_words",
    _LEN + "nth_paragraph_first_word")
PLACEHOLDERS, POSTSCRIPT = _CONTENT + "number_placeholders", _CONTENT + "postscript"
BULLETS, CONSTRAINED, HIGHLIGHTS, SECTIONS, JSON_FORMAT, TITLE = (
    _FMT + "number_bullet_lists", _FMT + "constrained_response", _FMT + "number_highlighted_sections",
    _FMT + "multiple_sections", _FMT + "json_format", _FMT + "title")
TWO_RESPONSES, REPEAT_PROMPT = _COMB + "two_responses", _COMB + "repeat_prompt"
END_CHECKER, QUOTATION = _SE + "end_checker", _SE + "quotation"
CAPITAL_FREQ, CAPITAL, LOWERCASE = (
    _CASE + "capital_word_frequency", _CASE + "english_capital", _CASE + "english_lowercase")
NO_COMMA = "punctuation:no_comma"

# Word pools are disjoint so two constraints in one row never ask to both use and avoid a word, and
# none contains j/q/x/z, the letters a "less than" letter_frequency constraint is drawn from.
_INCLUDE_WORDS = ("garden", "window", "morning", "silver", "bridge", "candle", "market", "river",
                  "pocket", "honest", "history", "planet", "friendly", "balance", "careful",
                  "festival", "mountain", "thunder", "lantern", "harbor")
_FREQ_WORDS = ("light", "home", "time", "world", "heart", "hope", "water", "story", "idea", "change")
_FORBIDDEN_WORDS = ("very", "really", "good", "great", "nice", "thing", "just", "amazing",
                    "important", "beautiful", "simply", "basically", "perfect", "wonderful")
_FIRST_WORDS = ("first", "today", "however", "finally", "imagine", "remember", "overall",
                "sometimes", "meanwhile", "luckily")
_COMMON_LETTERS = "abcdeghilmnoprstuwy"
_RARE_LETTERS = "jqxz"
# Latin-script languages: langdetect tells them apart reliably and word/sentence counts still work.
_LANGUAGES = ("es", "fr", "de", "it", "pt")
# No final period: the description template appends its own ("... phrase {ender}. No other ...").
_END_PHRASES = ("Any other questions?", "Is there anything else I can help with?",
                "Does that answer your question?", "Have a lovely day!")
_RELATIONS = ("less than", "at least")


def _relation_and_count(rng: random.Random, less_than: tuple[int, int], at_least: tuple[int, int],
                        step: int = 1) -> tuple[str, int]:
    # Separate ranges per relation keep both directions achievable (e.g. no "less than 2 sentences").
    relation = rng.choice(_RELATIONS)
    lo, hi = less_than if relation == "less than" else at_least
    return relation, rng.randrange(lo, hi + 1, step)


def _words(rng: random.Random) -> dict:
    relation, n = _relation_and_count(rng, (50, 200), (30, 150), step=10)
    return {"num_words": n, "relation": relation}


def _sentences(rng: random.Random) -> dict:
    relation, n = _relation_and_count(rng, (4, 8), (2, 6))
    return {"num_sentences": n, "relation": relation}


def _frequency(rng: random.Random) -> dict:
    word = rng.choice(_FREQ_WORDS)
    relation, n = _relation_and_count(rng, (2, 3), (2, 4))
    return {"keyword": word, "frequency": n, "relation": relation}


def _letter(rng: random.Random) -> dict:
    # "less than" only with rare letters and "at least" only with common ones: the other pairings
    # are nearly impossible in a 100-200 word answer.
    relation = rng.choice(_RELATIONS)
    if relation == "less than":
        return {"letter": rng.choice(_RARE_LETTERS), "let_frequency": rng.randint(3, 6),
                "let_relation": relation}
    return {"letter": rng.choice(_COMMON_LETTERS), "let_frequency": rng.randint(3, 10),
            "let_relation": relation}


def _capital_freq(rng: random.Random) -> dict:
    # nltk counts "I" and "P.S." as all-capital words, so "less than" needs some headroom.
    relation, n = _relation_and_count(rng, (6, 10), (2, 6))
    return {"capital_frequency": n, "capital_relation": relation}


def _forbidden(rng: random.Random, task: str) -> dict:
    # Never forbid a word the task itself uses.
    pool = [w for w in _FORBIDDEN_WORDS if not re.search(rf"\b{w}\b", task, flags=re.IGNORECASE)]
    return {"forbidden_words": sorted(rng.sample(pool, rng.randint(1, 3)))}


def _nth_paragraph(rng: random.Random) -> dict:
    n = rng.randint(2, 4)
    return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n),
            "first_word": rng.choice(_FIRST_WORDS)}


_SAMPLERS: dict[str, Callable[[random.Random, str], dict]] = {
    EXISTENCE: lambda r, t: {"keywords": sorted(r.sample(_INCLUDE_WORDS, r.randint(1, 2)))},
    FREQUENCY: lambda r, t: _frequency(r),
    FORBIDDEN: _forbidden,
    LETTER: lambda r, t: _letter(r),
    LANGUAGE: lambda r, t: {"language": r.choice(_LANGUAGES)},
    SENTENCES: lambda r, t: _sentences(r),
    PARAGRAPHS: lambda r, t: {"num_paragraphs": r.randint(2, 4)},
    WORDS: lambda r, t: _words(r),
    NTH_PARAGRAPH: lambda r, t: _nth_paragraph(r),
    PLACEHOLDERS: lambda r, t: {"num_placeholders": r.randint(1, 3)},
    POSTSCRIPT: lambda r, t: {"postscript_marker": r.choice(("P.S.", "P.P.S"))},
    BULLETS: lambda r, t: {"num_bullets": r.randint(2, 5)},
    CONSTRAINED: lambda r, t: {},
    HIGHLIGHTS: lambda r, t: {"num_highlights": r.randint(1, 3)},
    SECTIONS: lambda r, t: {"section_spliter": r.choice(("Section", "SECTION")),
                            "num_sections": r.randint(2, 4)},
    JSON_FORMAT: lambda r, t: {},
    TITLE: lambda r, t: {},
    TWO_RESPONSES: lambda r, t: {},
    REPEAT_PROMPT: lambda r, t: {"prompt_to_repeat": t},
    END_CHECKER: lambda r, t: {"end_phrase": r.choice(_END_PHRASES)},
    CAPITAL_FREQ: lambda r, t: _capital_freq(r),
    CAPITAL: lambda r, t: {},
    LOWERCASE: lambda r, t: {},
    NO_COMMA: lambda r, t: {},
    QUOTATION: lambda r, t: {},
}
SUITE_IDS: tuple[str, ...] = tuple(_SAMPLERS)

# Ids that dictate the whole shape of the answer (IFEval's own conflict table): each may only be
# combined with the few ids listed. They lead a row, never fill one, so they stay rare as partners.
_RESTRICTIVE: dict[str, frozenset[str]] = {
    CONSTRAINED: frozenset(),
    JSON_FORMAT: frozenset({FORBIDDEN, EXISTENCE}),
    TWO_RESPONSES: frozenset({FORBIDDEN, EXISTENCE, LANGUAGE, TITLE, NO_COMMA}),
    REPEAT_PROMPT: frozenset({EXISTENCE, TITLE, NO_COMMA}),
}
# A non-English answer cannot satisfy English words, letters, casing or fixed English phrases.
_LANGUAGE_DEPENDENT = (EXISTENCE, FREQUENCY, FORBIDDEN, LETTER, CAPITAL_FREQ, CAPITAL, LOWERCASE,
                       SECTIONS, END_CHECKER, NTH_PARAGRAPH)
_CONFLICT_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(p) for p in [
        (CAPITAL, LOWERCASE),
        (CAPITAL_FREQ, CAPITAL), (CAPITAL_FREQ, LOWERCASE),
        # Paragraphs are split on "***" by one checker and on "\n\n" by the other.
        (PARAGRAPHS, NTH_PARAGRAPH),
        (PARAGRAPHS, SENTENCES),
        (SECTIONS, HIGHLIGHTS),
        # Section markers ("Section 1") break all-lowercase/all-capital answers and would be the
        # first word of a paragraph.
        (SECTIONS, CAPITAL), (SECTIONS, LOWERCASE), (SECTIONS, NTH_PARAGRAPH),
        (TITLE, NTH_PARAGRAPH),
        (QUOTATION, TITLE),
        *((LANGUAGE, other) for other in _LANGUAGE_DEPENDENT),
    ]
)


def conflicts(a: str, b: str) -> bool:
    """True when instruction ids `a` and `b` must not appear in the same row."""
    if a == b or frozenset((a, b)) in _CONFLICT_PAIRS:
        return True
    return (a in _RESTRICTIVE and b not in _RESTRICTIVE[a]) or (
        b in _RESTRICTIVE and a not in _RESTRICTIVE[b])


def sample_kwargs(instruction_id: str, rng: random.Random, task: str) -> dict:
    """Random kwargs for `instruction_id`, always every argument its checker takes."""
    try:
        sampler = _SAMPLERS[instruction_id]
    except KeyError:
        raise UserError(f"unknown instruction id {instruction_id!r}; expected one of "
                        f"{sorted(_SAMPLERS)}") from None
    return sampler(rng, task)


def _pick_ids(lead: str, count: int, usage: Counter[str], rng: random.Random) -> list[str]:
    """`lead` plus up to `count - 1` compatible ids, least used so far first (ties at random)."""
    chosen = [lead]
    while len(chosen) < count:
        candidates = [i for i in SUITE_IDS if i not in _RESTRICTIVE
                      and not any(conflicts(i, c) for c in chosen)]
        if not candidates:
            break  # a restrictive lead can leave fewer partners than requested
        least = min(usage[i] for i in candidates)
        chosen.append(rng.choice([i for i in candidates if usage[i] == least]))
    # The repeat instruction says "the request you need to repeat does not include this sentence",
    # so it reads right only as the last sentence.
    return sorted(chosen, key=lambda i: i == REPEAT_PROMPT)


def _cycle(items: list, rng: random.Random) -> Iterator:
    """Endless passes over `items`, reshuffled each pass, so every item is used evenly."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def _build_rows(tasks: list[dict], n: int, prefix: str, min_c: int, max_c: int,
                rng: random.Random) -> list[dict]:
    from closedloop.verifiers import ifeval_rules

    rows: list[dict] = []
    if n == 0:
        return rows
    usage: Counter[str] = Counter()
    task_iter, lead_iter = _cycle(tasks, rng), _cycle(list(SUITE_IDS), rng)
    width = max(4, len(str(n)))
    for index in range(1, n + 1):
        seed_task = next(task_iter)
        ids = _pick_ids(next(lead_iter), rng.randint(min_c, max_c), usage, rng)
        usage.update(ids)
        kwargs = [sample_kwargs(i, rng, seed_task["task"]) for i in ids]
        descriptions = [ifeval_rules.describe(i, kw) for i, kw in zip(ids, kwargs)]
        prompt = " ".join([seed_task["task"], *descriptions])
        for i, kw in zip(ids, kwargs):  # fails loudly if a sampler ever yields invalid kwargs
            ifeval_rules.build_checker(i, kw, prompt)
        rows.append({"key": f"{prefix}-{index:0{width}d}", "prompt": prompt,
                     "instruction_id_list": ids, "kwargs": kwargs, "seed_id": seed_task["id"]})
    return rows


_EVAL_TASK_FRACTION = 0.2


def build_suite(seed_tasks: list[dict], num_train: int, num_eval: int, min_constraints: int,
                max_constraints: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Build (train_rows, eval_rows); eval rows only use seed tasks that no train row uses.

    Deterministic for `seed`. Each row's constraint count is uniform in
    [min_constraints, max_constraints], except that an exclusive lead id (e.g. constrained_response)
    can leave fewer compatible partners.
    """
    if num_train < 0 or num_eval < 0:
        raise UserError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    if not 1 <= min_constraints <= max_constraints:
        raise UserError("constraint counts must satisfy 1 <= min_constraints <= max_constraints, "
                        f"got {min_constraints} and {max_constraints}")
    need_both = num_train > 0 and num_eval > 0
    if len(seed_tasks) < (2 if need_both else 1) and num_train + num_eval > 0:
        raise UserError(f"need at least {2 if need_both else 1} seed tasks, got {len(seed_tasks)}")
    # Separate streams per purpose: changing num_eval does not reshuffle the train rows.
    tasks = sorted(seed_tasks, key=lambda t: t["id"])
    random.Random(f"{seed}:split").shuffle(tasks)
    n_eval_tasks = 0
    if num_eval > 0:
        n_eval_tasks = len(tasks) if num_train == 0 else min(
            len(tasks) - 1, max(1, round(len(tasks) * _EVAL_TASK_FRACTION)))
    eval_tasks, train_tasks = tasks[:n_eval_tasks], tasks[n_eval_tasks:]
    train = _build_rows(train_tasks, num_train, "train", min_constraints, max_constraints,
                        random.Random(f"{seed}:train"))
    evals = _build_rows(eval_tasks, num_eval, "eval", min_constraints, max_constraints,
                        random.Random(f"{seed}:eval"))
    return train, evals


def load_seed_tasks(path: str | Path) -> list[dict]:
    """Read seed tasks ({"id", "task"} per line); errors name file:line."""
    path = Path(path)
    tasks: list[dict] = []
    first_line: dict[str, int] = {}
    for lineno, row in iter_jsonl(path):
        for field in ("id", "task"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise UserError(f"{path}:{lineno}: expected a non-empty string field {field!r}")
        if row["id"] in first_line:
            raise UserError(f"{path}:{lineno}: duplicate id {row['id']!r} "
                            f"(first on line {first_line[row['id']]})")
        first_line[row["id"]] = lineno
        tasks.append({"id": row["id"], "task": row["task"].strip()})
    if not tasks:
        raise UserError(f"{path}: no seed tasks")
    return tasks


def _check_eval_row(row: dict, where: str) -> dict:
    """Validate one IFEval-format row; `where` (file:line or source row) prefixes every error."""
    from closedloop.verifiers import ifeval_rules

    missing = [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError(f"{where}: 'instruction_id_list' must be a list of strings")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise UserError(f"{where}: 'kwargs' must be a list of objects")
    if len(ids) != len(kwargs):
        raise UserError(f"{where}: 'instruction_id_list' has {len(ids)} entries but 'kwargs' "
                        f"has {len(kwargs)}")
    for i, kw in zip(ids, kwargs):
        if i not in ifeval_rules.INSTRUCTION_IDS:
            raise UserError(f"{where}: unknown instruction id {i!r}")
        try:
            ifeval_rules.build_checker(i, kw, row["prompt"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    # seed_id (the synthetic suite's seed task) travels on: the report's intervals resample by it
    return {"key": row["key"], "prompt": row["prompt"], "instruction_id_list": ids,
            "kwargs": kwargs, **({"seed_id": row["seed_id"]} if "seed_id" in row else {})}


def load_eval_rows(path: str | Path, limit: int | None, seed: int) -> list[dict]:
    """IFEval-format evaluation rows from a local JSONL file (prepare's split or IFEval's own
    input_data.jsonl), each line checked. `limit` keeps a deterministic subset: a `seed`-shuffled
    order cut to `limit` rows (None = all, in file order)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected an IFEval-format jsonl file")
    rows, lines = [], {}
    for lineno, row in iter_jsonl(path):
        rows.append(_check_eval_row(row, f"{path}:{lineno}"))
        key = str(row["key"])  # as the comparison joins models' records by it
        if key in lines:
            raise UserError(f"{path}:{lineno}: key {row['key']!r} repeats line {lines[key]} (records are joined by key)")
        lines[key] = lineno
    if not rows:
        raise UserError(f"{path}: no rows; expected IFEval-format lines (key, prompt, instruction_id_list, kwargs)")
    return deterministic_subset(rows, limit, seed)


def deterministic_subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """`rows` (None = all, in file order) or a `seed`-shuffled order cut to `limit` rows."""
    if limit is None:
        return rows
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:limit]
