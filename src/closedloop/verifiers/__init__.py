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
    verifier_class,
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
from closedloop.verifiers.grm import GenerativeRMVerifier  # registers generative_rm
from closedloop.verifiers.judge import HybridJudge, ModelJudge  # registers the model judges
from closedloop.verifiers.reward_model import RewardModelVerifier  # registers reward_model

__all__ = [
    "INSTRUCTION_IDS",
    "Form",
    "GenerativeRMVerifier",
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
    "verifier_class",
    "HybridJudge",
    "ModelJudge",
    "RewardModelVerifier",
    "verify_batch",
    "verify_jsonl",
    "verify_row",
]
