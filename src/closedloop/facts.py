"""Labelled claims for fact verification: made by a program, hand-written, a user's file, or a hub set.

A claim row is `{"key", "claim", "label", "kind"}`. The program-made claims are simple enough
that their truth is computed when they are written (arithmetic, comparisons, the order of months
and weekdays, unit conversions, set membership), half true and half false, deterministic by seed;
tests/test_facts.py re-derives every label from the text alone. `data/seeds/facts.jsonl` adds a
small hand-written general-knowledge set. A user's labelled jsonl (`claim`, `label`) or a hub
dataset (e.g. CREAK: `sentence`, `label`) plugs in the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from closedloop.errors import UserError
from closedloop.io import iter_jsonl

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (big unit, small unit, small units per big unit)
UNITS = (("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24))
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")

# A claim maker: (rng, truth) -> claim text
Maker = Callable[[random.Random, bool], str]


def _arithmetic(rng: random.Random, truth: bool) -> str:
    op = rng.choice("+-x")
    a, b = rng.randint(2, 20), rng.randint(2, 12)
    if op == "-":
        a, b = max(a, b) + rng.randint(1, 9), min(a, b)
    value = {"+": a + b, "-": a - b, "x": a * b}[op]
    if not truth:
        value += rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return f"{a} {op} {b} = {value}."


def _comparison(rng: random.Random, truth: bool) -> str:
    a, b = rng.sample(range(1, 100), 2)
    word = rng.choice(["greater", "less"])
    holds = a > b if word == "greater" else a < b
    if holds != truth:
        a, b = b, a
    return f"{a} is {word} than {b}."


def _month_order(rng: random.Random, truth: bool) -> str:
    i, j = rng.sample(range(12), 2)
    word = rng.choice(["before", "after"])
    holds = i < j if word == "before" else i > j
    if holds != truth:
        i, j = j, i
    return f"{MONTHS[i]} comes {word} {MONTHS[j]}."


def _weekday_order(rng: random.Random, truth: bool) -> str:
    i = rng.randrange(7)
    word = rng.choice(["after", "before"])
    step = 1 if word == "after" else -1
    j = (i + step) % 7 if truth else (i + step + rng.choice([1, 2, 3, 4, 5])) % 7
    return f"The day {word} {DAYS[i]} is {DAYS[j]}."


def _unit_conversion(rng: random.Random, truth: bool) -> str:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    value = n * factor
    if not truth:  # a factor of 10 off, or one unit off
        value = rng.choice([value * 10, value // 10 if value % 10 == 0 else value + factor, value + factor])
    return f"{n} {big} is {value} {small}."


def _set_membership(rng: random.Random, truth: bool) -> str:
    kind = rng.choice(["prime", "even", "vowel", "colour"])
    if kind in ("prime", "even"):
        test = _is_prime if kind == "prime" else (lambda k: k % 2 == 0)
        n = rng.choice([k for k in range(2, 50) if test(k) == truth])
        return f"{n} is {'a prime' if kind == 'prime' else 'an even'} number."
    if kind == "vowel":
        letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if (c in "aeiou") == truth])
        return f"The letter {letter} is a vowel."
    listed = rng.sample(COLOURS, 3)
    colour = rng.choice(listed) if truth else rng.choice([c for c in COLOURS if c not in listed])
    return f"{colour.capitalize()} is one of the colours {listed[0]}, {listed[1]} and {listed[2]}."


def _is_prime(k: int) -> bool:
    return k > 1 and all(k % d for d in range(2, int(k ** 0.5) + 1))


MAKERS: dict[str, tuple[str, Maker]] = {  # kind: (key prefix, maker)
    "arithmetic": ("arith", _arithmetic), "comparison": ("cmp", _comparison), "month_order": ("month", _month_order),
    "weekday_order": ("day", _weekday_order), "unit_conversion": ("unit", _unit_conversion),
    "set_membership": ("set", _set_membership),
}


GENERAL = "general"  # the kind of the hand-written claims (data/seeds/facts.jsonl)
KINDS = (*MAKERS, GENERAL)


def program_claims(n: int, seed: int, kinds: Sequence[str] | None = None) -> list[dict]:
    """n distinct claims of `kinds` (default: every maker) in rotation, n // 2 true (shuffled),
    deterministic for (n, seed, kinds)."""
    if n < 1:
        raise ValueError(f"program_claims: n must be >= 1, got {n}")
    rng = random.Random(seed)
    truths = [i < n // 2 for i in range(n)]
    rng.shuffle(truths)
    makers = [k for k in MAKERS if kinds is None or k in kinds]
    if not makers:
        raise ValueError(f"program_claims: no claim maker among {list(kinds or [])}")
    rows, seen = [], set()
    for i, truth in enumerate(truths):
        # Resample on a repeat; a kind whose space is used up (there are only 14 true weekday
        # claims) hands over to the next kind.
        for kind in makers[i % len(makers):] + makers[: i % len(makers)]:
            prefix, make = MAKERS[kind]
            claim = next((c for c in (make(rng, truth) for _ in range(50)) if c not in seen), None)
            if claim is not None:
                break
        else:
            raise ValueError(f"program_claims: cannot make {n} distinct claims")
        seen.add(claim)
        rows.append({"key": f"{prefix}-{i:04d}", "claim": claim, "label": truth, "kind": kind})
    return rows


def parse_label(value: object) -> bool | None:
    """True/False from a bool, 0/1 or "true"/"false" (any case); None if it is none of them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def load_claims(path: Path, where: str) -> list[dict]:
    """A labelled jsonl (claim, label; optional key, kind), every line checked; one UserError
    naming `where` (the param), the file and line otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{where}: {path}: is a directory; expected a jsonl file of claims")
    rows: list[dict] = []
    lines: dict[str, int] = {}
    try:
        for lineno, row in iter_jsonl(path):
            at = f"{where}: {path.name}:{lineno}"
            claim = row.get("claim")
            if not isinstance(claim, str) or not claim.strip():
                raise UserError(f"{at}: claim: expected a non-empty string, got {claim!r}")
            label = parse_label(row.get("label"))
            if label is None:
                raise UserError(f"{at}: label: expected true or false, got {row.get('label')!r}")
            key = str(row.get("key", f"line-{lineno}"))
            if key in lines:
                raise UserError(f"{at}: key {key!r} repeats line {lines[key]}")
            lines[key] = lineno
            rows.append({"key": key, "claim": claim.strip(), "label": label, "kind": str(row.get("kind", "user"))})
    except UserError as err:
        if str(err).startswith(where):
            raise
        raise UserError(f"{where}: {err}") from None
    if not rows:
        raise UserError(f"{where}: {path.name}: no claims; expected lines like {{\"claim\": ..., \"label\": true}}")
    return rows


def load_hub_claims(dataset: str, split: str, claim_column: str, label_column: str,
                    config: str | None = None) -> list[dict]:
    """Claims from a hub dataset id (needs HF_HUB_OFFLINE=0) or a local data file or directory."""
    import datasets

    local = Path(dataset)
    try:
        if local.is_file():  # a data file: its format from the suffix (jsonl/json/csv/parquet)
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(local.suffix)
            if builder is None:
                raise UserError(f"facts.hub.dataset: {dataset}: expected a .jsonl, .json, .csv or .parquet file")
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(dataset, config, split=split)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types (offline, missing split, bad files)
        raise UserError(f"facts.hub.dataset: {dataset}: could not load split {split!r}: "
                        f"{' '.join(str(err).split())[:300]}") from None
    for col in (claim_column, label_column):
        if col not in ds.column_names:
            raise UserError(f"facts.hub: {dataset}: no column {col!r} (columns: {', '.join(ds.column_names)})")
    rows = []
    for i, (claim, raw) in enumerate(zip(ds[claim_column], ds[label_column])):
        label = parse_label(raw)
        if label is None or not isinstance(claim, str) or not claim.strip():
            raise UserError(f"facts.hub: {dataset}: row {i}: expected a claim string and a true/false label, "
                            f"got {claim!r}, {raw!r}")
        rows.append({"key": f"hub-{i:06d}", "claim": claim.strip(), "label": label, "kind": "hub"})
    return rows


def split_claims(rows: list[dict], num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, eval) of the requested sizes from a seed-shuffled order, eval first."""
    if len(rows) < num_train + num_eval:
        raise UserError(f"facts: {len(rows)} claims available, fewer than facts.num_train + facts.num_eval "
                        f"({num_train} + {num_eval})")
    order = list(rows)
    random.Random(seed).shuffle(order)
    return order[num_eval: num_eval + num_train], order[:num_eval]
