"""Verifiers: one protocol (base.py) and the programs and models that implement it."""

from closedloop.verifiers.base import (
    Form,
    Granularity,
    Source,
    Verdict,
    Verifier,
    get_verifier,
    list_verifiers,
    register_verifier,
    verify_batch,
)
from closedloop.verifiers.ifeval_rules import (
    INSTRUCTION_IDS,
    IFEvalResult,
    IFEvalRuleVerifier,
    build_checker,
    check,
    describe,
    verify_jsonl,
    verify_row,
)

__all__ = [
    "INSTRUCTION_IDS",
    "Form",
    "Granularity",
    "IFEvalResult",
    "IFEvalRuleVerifier",
    "Source",
    "Verdict",
    "Verifier",
    "build_checker",
    "check",
    "describe",
    "get_verifier",
    "list_verifiers",
    "register_verifier",
    "verify_batch",
    "verify_jsonl",
    "verify_row",
]
