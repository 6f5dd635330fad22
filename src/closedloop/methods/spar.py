"""SPaR (arXiv 2412.11605): self-play tree-search refinement, one iteration as a recipe.

    search   the actor samples n responses per prompt; the refiner refines failing ones in a tree
    verify   the refiner judges (k votes, majority), or the IFEval rules, or both ("hybrid")
    feedback DPO for the actor on (successful refinement, original response) pairs;
             SFT (RFT) for the refiner on its successful refinements and its majority judgments
             where the votes split (self-play: no rule verdict enters the refiner's data)

Each step is a function over plain rows so the DVC stages (stages/spar.py) only read, call, write.
Paths: iteration <name> starts from models/spar/<prev>/{actor,refiner} and writes
models/spar/<name>/{actor,refiner} and data/spar/<name>/.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from closedloop.config import DPOParams, FieldError, SFTParams, bounds, check_verifier_name
from closedloop.methods.spar_data import (
    balanced_judgments,
    best_worst_pairs,
    dpo_pairs,
    refine_messages_for,
    refinement_examples,
)
from closedloop.search.tree import TreeParams, tree_search_many
from closedloop.verifiers.ifeval_rules import check
from closedloop.verifiers.judge import as_verdict, from_verdict, parse_refinement, rule_judgment


@dataclass
class SparSampleConfig:
    num_samples: int = field(default=5, metadata=bounds(ge=2, le=1024))  # paper: 5
    temperature: float = field(default=0.9, metadata=bounds(gt=0.0, le=10.0))  # paper: 0.9
    top_p: float = field(default=0.9, metadata=bounds(gt=0.0, le=1.0))  # paper: 0.9
    max_new_tokens: int = field(default=128, metadata=bounds(ge=1, le=100_000))
    max_prompts: int | None = field(default=16, metadata=bounds(ge=1))  # None: every train prompt


@dataclass
class SparJudgeConfig:
    # A registered verifier: hybrid_judge (IFEval rules where every constraint is rule-checkable,
    # the refiner elsewhere), model_judge (the refiner, k votes), or ifeval_rules (rules as oracle).
    verifier: str = "hybrid_judge"
    votes: int = field(default=3, metadata=bounds(ge=1, le=1024))  # k judgments per response (paper: 5)
    temperature: float = field(default=0.7, metadata=bounds(gt=0.0, le=10.0))
    top_p: float = field(default=0.95, metadata=bounds(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=96, metadata=bounds(ge=1, le=100_000))
    # votes: k sampled judgments, majority (the paper); labels: one forward pass, value = P(" yes")
    # after the judge prompt and a prefilled "Verdict:" (label scoring: never unparseable)
    scoring: Literal["votes", "labels"] = "labels"

    def __post_init__(self) -> None:
        check_verifier_name(self.verifier)


@dataclass
class SparTreeConfig:
    strategy: Literal["bfs", "dfs"] = "bfs"
    width: int = field(default=3, metadata=bounds(ge=1, le=64))  # children per expanded node (paper: 3)
    branches: int = field(default=2, metadata=bounds(ge=1, le=64))  # nodes expanded per level (paper: 2)
    max_depth: int = field(default=3, metadata=bounds(ge=1, le=64))  # paper: 3
    gate: float = field(default=0.5, metadata=bounds(ge=0.0, le=0.99))  # success: value > gate (paper: 0.5)
    # nodes per tree, the root included, as the reference counts them. Demo size: the reference's
    # default is 1000; width 3, branches 2 and depth 3 need 16 for a tree that never passes the gate
    budget: int = field(default=20, metadata=bounds(ge=1, le=100_000))
    temperature: float = field(default=0.9, metadata=bounds(gt=0.0, le=10.0))
    top_p: float = field(default=0.9, metadata=bounds(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=128, metadata=bounds(ge=1, le=100_000))
    roots_per_prompt: int = field(default=1, metadata=bounds(ge=1, le=1024))  # failing responses refined per prompt
    # The refiner answers through a scaffold: "Critique:" (critique_tokens) then "Refined response:"
    # (max_new_tokens) are written by us, so the format holds whatever the model writes.
    scaffold: bool = True
    critique_tokens: int = field(default=48, metadata=bounds(ge=1, le=100_000))


@dataclass
class SparInitConfig:
    # The starting refiner. rules_sft (the paper's start, the effect run's): SFT of the base on
    # judgments and refinements from a stronger judge (GPT-4o in the paper; the IFEval rules here, for
    # this initial data only: every iteration after it judges by the refiner). copy (the demo, whose
    # hybrid judge is the rules anyway): the base model as it is.
    refiner: Literal["rules_sft", "copy"] = "copy"
    # rules_sft's data: the base's samples on the LAST max_prompts train prompts (the iterations
    # sample from the first), judged by the rules; trees searched with the rules judging
    max_prompts: int = field(default=64, metadata=bounds(ge=1))
    num_samples: int = field(default=4, metadata=bounds(ge=1, le=1024))


@dataclass
class SparConfig:
    # {name: the iteration it starts from}, in order; "init" = models/base. DVC templating has no
    # arithmetic, so each entry names its predecessor; add an entry to run one more iteration
    # (nothing before it reruns). Stage names are spar_*@<name>; outputs go to models/spar/<name>
    # and data/spar/<name>. Add `spar-<name>: models/spar/<name>/actor` to evaluate.models to see
    # the iteration as a row of the comparison report.
    iterations: dict[str, str] = field(default_factory=lambda: {"it1": "init"})
    init: SparInitConfig = field(default_factory=SparInitConfig)
    # The paper's ablations, each beside an iteration: {kind: {of: <iteration>, start: <what that
    # iteration starts from>}}, kind no_tree (one refinement per failing response, no tree) or
    # no_refine (DPO pairs of the best and the worst sample by the judge). An ablation reuses its
    # iteration's samples and judgments and trains its own actor from the same start
    # (models/spar/ablations/<kind>/actor), so `spar-<it>` and the ablation pair up on the same
    # held-out prompts. `start` repeats `iterations[of]` because DVC's templating cannot look it up.
    ablations: dict[str, dict[str, str]] = field(default_factory=dict)
    batch_size: int = field(default=64, metadata=bounds(ge=1, le=4096))  # sequences per generation batch
    sample: SparSampleConfig = field(default_factory=SparSampleConfig)
    judge: SparJudgeConfig = field(default_factory=SparJudgeConfig)
    tree: SparTreeConfig = field(default_factory=SparTreeConfig)
    max_refinement_examples: int = field(default=200, metadata=bounds(ge=0))  # refiner RFT caps, per kind
    max_judgment_examples: int = field(default=200, metadata=bounds(ge=0))
    dpo: DPOParams = field(default_factory=DPOParams)
    refiner_sft: SFTParams = field(default_factory=lambda: SFTParams(learning_rate=1e-4, epochs=1.0, batch_size=4,
                                                                      max_length=1024))
    eval_search: bool = False  # also score the actor with tree search at inference ("+search")

    def __post_init__(self) -> None:
        import re

        if not self.iterations:
            raise FieldError("iterations", "expected at least one iteration, e.g. {it1: init}")
        prev = "init"
        for name, start in self.iterations.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "init":
                raise FieldError(f"iterations.{name}", "expected a name of lowercase letters, digits and _ (not 'init')")
            if start != prev:
                raise FieldError(f"iterations.{name}", f"expected {prev!r} (the iteration before it), got {start!r}")
            prev = name
        for kind, entry in self.ablations.items():
            if kind not in ABLATIONS:
                raise FieldError(f"ablations.{kind}", f"expected one of: {', '.join(ABLATIONS)}")
            if set(entry) != {"of", "start"}:
                raise FieldError(f"ablations.{kind}", "expected {of: <iteration>, start: <the iteration it starts from>}")
            if entry["of"] not in self.iterations:
                raise FieldError(f"ablations.{kind}.of", f"expected one of the iterations ({', '.join(self.iterations)}), "
                                                         f"got {entry['of']!r}")
            if entry["start"] != self.iterations[entry["of"]]:
                raise FieldError(f"ablations.{kind}.start",
                                 f"expected {self.iterations[entry['of']]!r} (what {entry['of']} starts from), "
                                 f"got {entry['start']!r}")


CONFIG = SparConfig
ABLATIONS = ("no_tree", "no_refine")
JUDGING_SUITE = "refiner_judging"  # records of a judge's correctness on held-out responses


def model_dir(name: str, role: str) -> Path:
    return Path("models/spar") / name / role


def data_dir(name: str) -> Path:
    return Path("data/spar") / name


class SeededGenerator:
    """`generate_fn(chats, n) -> texts` over a backend; call i uses seed + i, so a stage that makes
    the same calls in the same order gets the same texts (CPU determinism across reruns)."""

    def __init__(self, backend: Any, temperature: float, top_p: float, max_new_tokens: int, seed: int):
        self.backend, self.seed = backend, seed
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
        self.calls = itertools.count()

    def __call__(self, chats: list[list[dict]], n: int) -> list[list[str]]:
        from closedloop.generate import SamplingParams, derived_seed

        if not chats:
            return []
        params = SamplingParams(n=n, seed=derived_seed(self.seed, next(self.calls)), **self.sampling)
        return [[c.text for c in comps] for comps in self.backend.generate(chats, params)]


class ScaffoldedRefiner:
    """Like SeededGenerator, for refine prompts: each text is `Critique: ... Refined response: ...`
    by construction (a two-segment scaffold), so `parse_refinement` never fails on the format."""

    def __init__(self, backend: Any, temperature: float, top_p: float, critique_tokens: int, max_new_tokens: int,
                 seed: int):
        from closedloop.structured import Segment

        self.backend, self.seed = backend, seed
        self.sampling = {"temperature": temperature, "top_p": top_p}
        self.segments = [Segment("Critique:", critique_tokens), Segment("Refined response:", max_new_tokens)]
        self.calls = itertools.count()

    def __call__(self, chats: list[list[dict]], n: int) -> list[list[str]]:
        from closedloop.generate import SamplingParams, derived_seed
        from closedloop.structured import generate_scaffold
        from closedloop.verifiers.judge import format_refinement

        if not chats:
            return []
        params = SamplingParams(n=n, seed=derived_seed(self.seed, next(self.calls)), max_new_tokens=1, **self.sampling)
        outs = generate_scaffold(self.backend, chats, self.segments, params)
        return [[format_refinement(*o.segments) for o in per_chat] for per_chat in outs]


def sample_responses(generate, rows: Sequence[dict], n: int) -> list[dict]:
    """Search, step 1: n actor samples per prompt."""
    outs = generate([[{"role": "user", "content": r["prompt"]}] for r in rows], n)
    return [{**row, "sample_idx": i, "response": text} for row, texts in zip(rows, outs) for i, text in enumerate(texts)]


def judge_samples(judge, samples: Sequence[dict]) -> list[dict]:
    """Verify: each sample gets the judge's decision, value (yes-vote share), votes and texts, plus
    the rules' verdict (the gold label the refiner's judging is scored against)."""
    results = [from_verdict(v) for v in judge.verify_batch(list(samples))]
    out = []
    for s, r in zip(samples, results):
        gold = check(s["prompt"], s["instruction_id_list"], s["kwargs"], s["response"]).strict_all
        out.append({**s, "judge": {"decision": r.decision, "value": r.value, "votes": r.votes, "texts": r.texts,
                                   "unparseable": r.unparseable, "source": r.source}, "rule_verdict": gold})
    return out


def failing_roots(judged: Sequence[dict], per_prompt: int) -> list[dict]:
    """Prompts with at least one failing response; up to `per_prompt` failing responses each (ties dropped)."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for s in judged:
        if s["judge"]["decision"] is False:
            by_key[str(s["key"])].append(s)
    return [s for key in sorted(by_key) for s in by_key[key][:per_prompt]]


def _result(d: dict):
    from closedloop.verifiers.judge import JudgeResult

    return JudgeResult(d["decision"], d["value"], d["votes"], d["texts"], d["unparseable"], d["source"])


def refine_trees(roots: Sequence[dict], refine_generate, judge, tree: TreeParams, votes: int) -> list[dict]:
    """Search, step 2: one refinement tree per failing root, all trees batched in lockstep.

    A node's `width` children are sampled from one refine prompt (n=width), so the backend prefills
    that prompt once and shares it (HFBackend(share_prefix=True))."""
    from closedloop.methods.spar_data import tree_to_record

    def refine(requests):
        chats = [refine_messages_for(roots[i]["prompt"], node) for i, parents in requests for node in parents]
        texts = iter(refine_generate(chats, tree.width))
        return [[[parse_refinement(t) for t in next(texts)] for _ in parents] for _, parents in requests]

    def judge_batch(requests):
        samples = [{**roots[i], "response": r} for i, responses in requests for r in responses]
        results = iter([from_verdict(v) for v in judge.verify_batch(samples)])
        return [[next(results) for _ in responses] for _, responses in requests]

    results = tree_search_many([(r["response"], _result(r["judge"])) for r in roots], refine, judge_batch, tree, votes)
    return [tree_to_record(root, res) for root, res in zip(roots, results)]


def ablation_pairs(judged: Sequence[dict], trees: Sequence[dict], kind: str) -> list[dict]:
    """An ablation's DPO pairs: no_tree's from its single-refinement trees, as SPAR's; no_refine's
    the best against the worst sample of a prompt by the judge's value (no refinement)."""
    if kind == "no_tree":
        return dpo_pairs(trees)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for s in judged:
        if s["judge"]["decision"] is not None:
            by_prompt[s["prompt"]].append(s)
    return best_worst_pairs({p: [s["response"] for s in ss] for p, ss in by_prompt.items()},
                            {p: [s["judge"] for s in ss] for p, ss in by_prompt.items()})


def ablation_dir(kind: str) -> Path:
    return Path("data/spar/ablations") / kind


def ablation_model_dir(kind: str) -> Path:
    return Path("models/spar/ablations") / kind / "actor"


class ExplainedRules:
    """The IFEval rules as a judge that writes its judgment (`rule_judgment_text`): the stronger
    judge of the starting refiner's data, never a judge of an iteration."""

    def verify_batch(self, samples: list[dict]) -> list:
        return [as_verdict(rule_judgment(s, explain=True)) for s in samples]


def init_refiner_examples(judged: Sequence[dict], trees: Sequence[dict], max_refinement: int,
                          max_judgment: int) -> list[dict]:
    """The starting refiner's SFT set from rule-judged samples and rule-judged trees: the final step
    of each successful tree, then the rules' judgments of the samples, balanced between yes and no
    (`balanced_judgments`), each kind capped."""
    candidates = [(s["prompt"], s["response"], s["judge"]["texts"][0], bool(s["judge"]["decision"]), "rules")
                  for s in judged if s["judge"]["texts"]]
    return refinement_examples(trees, max_refinement) + balanced_judgments(candidates, max_judgment)


def success_depths(trees: Sequence[dict], max_depth: int) -> dict[str, int]:
    """How many trees succeeded at each depth (1..max_depth): the paper's depth histogram."""
    counts = {d: 0 for d in range(1, max_depth + 1)}
    for rec in trees:
        if rec["success"] is not None:
            counts[rec["nodes"][rec["success"]]["depth"]] += 1
    return {f"success_depth_{d}": n for d, n in counts.items()}


def dpo_examples(pairs: Sequence[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]

