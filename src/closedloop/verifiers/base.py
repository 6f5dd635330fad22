"""The one Verifier protocol every feedback source implements.

The three axes follow the "verifier engineering" survey's taxonomy: the *form* of the feedback
(binary / score / rank / text), its *granularity* (whole trajectory / step / token) and its
*source* (a program or a model). Verifiers are looked up by name in a small registry, in the
style of lm-evaluation-harness, so configs can say `verifier: ifeval_rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from closedloop.errors import UserError


class Form(StrEnum):
    BINARY = "binary"
    SCORE = "score"
    RANK = "rank"
    TEXT = "text"


class Granularity(StrEnum):
    TRAJECTORY = "trajectory"
    STEP = "step"
    TOKEN = "token"


class Source(StrEnum):
    PROGRAM = "program"
    MODEL = "model"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float  # in [0, 1]
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Verdict.score must be in [0, 1], got {self.score}")


@runtime_checkable
class Verifier(Protocol):
    """Judges one sample: a dict with at least `prompt` and `response`, plus whatever the verifier needs."""

    name: str
    form: Form
    granularity: Granularity
    source: Source

    def verify(self, sample: dict) -> Verdict: ...

    def verify_batch(self, samples: list[dict]) -> list[Verdict]:
        # Default for classes that subclass Verifier explicitly; batched verifiers override it.
        return verify_batch(self, samples)


def verify_batch(verifier: Verifier, samples: list[dict]) -> list[Verdict]:
    """The plain loop, for verifiers with nothing to gain from batching."""
    return [verifier.verify(s) for s in samples]


_REGISTRY: dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str) -> Callable[[Callable[..., Verifier]], Callable[..., Verifier]]:
    """Class decorator: make `get_verifier(name, **kwargs)` construct this verifier."""

    def deco(factory: Callable[..., Verifier]) -> Callable[..., Verifier]:
        old = _REGISTRY.get(name)
        # Re-registering the same class (e.g. a module reload) is fine; a second class under one name is a bug.
        if old is not None and getattr(old, "__qualname__", None) != getattr(factory, "__qualname__", None):
            raise ValueError(f"verifier name {name!r} is already registered to {old!r}")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_verifiers() -> list[str]:
    return sorted(_REGISTRY)


def verifier_class(name: str) -> Callable[..., Verifier]:
    """The factory registered as `name` (its `source` says whether it needs a model)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise UserError(f"unknown verifier {name!r}; known verifiers: {', '.join(list_verifiers()) or '(none)'}")
    return factory


def get_verifier(name: str, **kwargs: Any) -> Verifier:
    """Construct the verifier registered as `name`; unknown names are a UserError listing the known ones."""
    factory = verifier_class(name)
    try:
        return factory(**kwargs)
    except TypeError as e:  # unexpected constructor arguments from a config
        raise UserError(f"verifier {name!r}: {e}") from None
