"""Deductive closure training (DCT, Akyürek et al., arXiv 2401.08574) as a recipe over plain rows.

    seed     seed claims, by `seeds.mode`:
               unsupervised  the model writes claims about the topics in `seeds.topics`
               supervised    labelled claims (`seeds.claims`), their truth fixed
               transductive  the unlabelled evaluation claims (`evaluate.claims`, labels unread)
               update        new documents (`seeds.documents`) taken as true: the model-update setting
    expand   per seed, the model writes claims it implies and claims that contradict it (scaffolded,
             one claim each); each is a node joined to the seed by an `implies` / `contradicts`
             edge of that seed's graph. Optionally, edges the model itself rejects are pruned.
    score    P(true) of every node by label scoring (evaluate/fact_verification.py)
    verify   per graph, the most probable truth assignment that satisfies every edge and fixed
             label, found exactly (methods/dct_solver.py)
    feedback SFT (TRL, LoRA by default) on "is this claim true?" examples of that assignment, in
             the format the evaluation reads (`evaluate.claim_format`)
    ablation the same SFT on the seeds alone (their given labels, or the model's own): the
             paper's baseline, which DCT must beat
    measure  coherence (the model's own labels satisfy every edge) on held-out graphs, expanded
             from claims no model trained on

The stages (stages/dct.py) read and write files; everything here is rows in, rows out.
A graph row: {"graph", "nodes": [{"id", "text", "role", "fixed", "label"}], "edges": [[src, dst, kind]]}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from closedloop.config import FieldError, SFTParams, bounds
from closedloop.errors import UserError
from closedloop.methods.dct_solver import CONTRADICTS, IMPLIES, Solution, satisfied_edges, solve


@dataclass
class DCTSeedParams:
    # supervised by default: SmolLM2-135M's own claims about a topic are mostly not claims at all
    # (unsupervised, its graphs are ~93% false labels and it learns to answer "false"; see README)
    mode: Literal["unsupervised", "supervised", "transductive", "update"] = "supervised"
    topics: str = field(default="data/seeds/dct_topics.jsonl", metadata=bounds(path=True))  # unsupervised: {"topic"}
    claims_per_topic: int = field(default=2, metadata=bounds(ge=1, le=1024))
    claims: str = field(default="data/facts/train.jsonl", metadata=bounds(path=True))  # supervised: {"claim", "label"}
    documents: str = field(default="data/seeds/dct_update.jsonl", metadata=bounds(path=True))  # update: {"text"}
    max_seeds: int = field(default=24, metadata=bounds(ge=1))  # a deterministic subset of this many
    temperature: float = field(default=0.9, metadata=bounds(ge=0.0, le=10.0))  # unsupervised generation
    top_p: float = field(default=0.95, metadata=bounds(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=40, metadata=bounds(ge=1, le=100_000))


@dataclass
class DCTExpandParams:
    num_implied: int = field(default=2, metadata=bounds(ge=0, le=64))  # claims the seed implies, per seed
    num_contradicted: int = field(default=2, metadata=bounds(ge=0, le=64))  # claims contradicting it, per seed
    temperature: float = field(default=0.9, metadata=bounds(ge=0.0, le=10.0))
    top_p: float = field(default=0.95, metadata=bounds(gt=0.0, le=1.0))
    max_new_tokens: int = field(default=40, metadata=bounds(ge=1, le=100_000))
    # Ask the model whether each edge holds (P(yes) by label scoring) and prune those below the
    # threshold, with their claims. Off by default: SmolLM2-135M answers "no" to nearly every
    # edge, which would leave no graph to train on.
    validate: bool = False
    validity_threshold: float = field(default=0.5, metadata=bounds(ge=0.0, le=1.0))

    def __post_init__(self) -> None:
        if self.num_implied + self.num_contradicted == 0:
            raise FieldError("num_implied", "expected num_implied + num_contradicted >= 1, got 0 and 0")


@dataclass
class DCTConsistencyParams:
    # The solver is exact (branch and bound): ~20 nodes solve in milliseconds, but its worst case
    # grows exponentially, so a graph (connected component) above this many nodes is an error or,
    # with oversize: split, cut into parts of at most max_nodes (the edges between parts are dropped
    # and counted in the metrics: a weaker constraint set, never a silent truncation).
    max_nodes: int = field(default=24, metadata=bounds(ge=1, le=64))
    oversize: Literal["error", "split"] = "error"


@dataclass
class DCTHeldoutParams:
    # Coherence is measured on graphs no model trained on: one per claim of this jsonl (its `claim`
    # texts; labels unread), a training seed's text excluded, expanded by models/base as dct_expand
    # expands the seeds.
    claims: str = field(default="data/facts/eval.jsonl", metadata=bounds(path=True))
    max_seeds: int = field(default=24, metadata=bounds(ge=1))  # a deterministic subset of this many


@dataclass
class DCTConfig:
    seeds: DCTSeedParams = field(default_factory=DCTSeedParams)
    expand: DCTExpandParams = field(default_factory=DCTExpandParams)
    consistency: DCTConsistencyParams = field(default_factory=DCTConsistencyParams)
    heldout: DCTHeldoutParams = field(default_factory=DCTHeldoutParams)
    batch_size: int = field(default=64, metadata=bounds(ge=1, le=4096))  # sequences per generation/scoring batch
    # Repeat the rarer label's examples until both labels are equally many. Contradiction edges make
    # most chosen labels false, and without this the model learns to answer "false" to everything,
    # which satisfies every graph (all-false is always consistent) and measures nothing.
    balance_labels: bool = True
    # feedback: SFT on the chosen labels (LoRA by default, merged into models/dct)
    sft: SFTParams = field(default_factory=lambda: SFTParams(learning_rate=2e-4, epochs=1, max_length=256))


CONFIG = DCTConfig

# ----------------------------------------------------------------------------------------------
# seed and expand: prompts, scaffolded so each output is one claim

CLAIM_HEADER = "Statement:"  # the response prefill every generation continues; it ends at a newline


def topic_messages(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Write one short, simple factual statement about {topic}. "
                                        "Write only the statement, in one sentence."}]


def expand_messages(claim: str, kind: str) -> list[dict]:
    relation = ("must also be true if this statement is true" if kind == IMPLIES
                else "cannot be true if this statement is true")
    return [{"role": "user", "content": f"Statement: {claim}\n\nWrite one short statement that {relation}. "
                                        "Write only the statement, in one sentence."}]


def validity_messages(premise: str, claim: str, kind: str) -> list[dict]:
    question = "also be true" if kind == IMPLIES else "be false"
    return [{"role": "user", "content": f"Statement A: {premise}\nStatement B: {claim}\n\n"
                                        f"If statement A is true, must statement B {question}? Answer yes or no."},
            {"role": "assistant", "content": "Answer:"}]


def clean_claim(text: str) -> str:
    """One claim from a generation: its first line, markdown and quotes stripped, whitespace collapsed."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return " ".join(line.strip(" \t*_`#>\"'").split())


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


# generate(chats, n, seed) -> per chat, n one-line claims (already cleaned)
GenerateClaims = Callable[[list[list[dict]], int, int], list[list[str]]]


def seeds_from_topics(topics: Sequence[str], generate: GenerateClaims, per_topic: int, seed: int) -> list[dict]:
    """Unsupervised seeds: `per_topic` distinct non-empty claims per topic, unlabelled."""
    outs = generate([topic_messages(t) for t in topics], per_topic, seed)
    rows, seen = [], set()
    for topic, claims in zip(topics, outs):
        for c in claims:
            if c and _norm(c) and _norm(c) not in seen:
                seen.add(_norm(c))
                rows.append({"text": c, "fixed": False, "label": None, "source": f"topic: {topic}"})
    return rows


def build_graphs(seeds: Sequence[dict], generate: GenerateClaims, num_implied: int, num_contradicted: int,
                 seed: int) -> list[dict]:
    """One star graph per seed: the seed, then the distinct claims the model wrote for it (a claim
    equal to the seed or to an earlier node, up to case and punctuation, is dropped)."""
    asks = [(IMPLIES, num_implied), (CONTRADICTS, num_contradicted)]
    generated: dict[str, list[list[str]]] = {}
    for i, (kind, n) in enumerate(asks):
        generated[kind] = generate([expand_messages(s["text"], kind) for s in seeds], n, seed + i) if n else \
            [[] for _ in seeds]
    graphs = []
    for g, s in enumerate(seeds):
        nodes = [{"id": 0, "text": s["text"], "role": "seed", "fixed": s["fixed"], "label": s["label"]}]
        edges: list[list] = []
        seen = {_norm(s["text"])}
        for kind, _ in asks:
            for text in generated[kind][g]:
                if not text or _norm(text) in seen or not _norm(text):
                    continue
                seen.add(_norm(text))
                role = "implied" if kind == IMPLIES else "contradiction"
                nodes.append({"id": len(nodes), "text": text, "role": role, "fixed": False, "label": None})
                edges.append([0, len(nodes) - 1, kind])
        graphs.append({"graph": f"g{g:04d}", "source": s.get("source", ""), "nodes": nodes, "edges": edges})
    return graphs


def prune_invalid(graphs: Sequence[dict], p_valid: Callable[[list[list[dict]]], list[float]],
                  threshold: float) -> tuple[list[dict], int]:
    """(graphs without the edges whose P(yes, the edge holds) < threshold, and without the nodes
    left unconnected; the number of edges pruned)."""
    edges = [(g, e) for g, graph in enumerate(graphs) for e in graph["edges"]]
    probs = p_valid([validity_messages(graphs[g]["nodes"][e[0]]["text"], graphs[g]["nodes"][e[1]]["text"], e[2])
                     for g, e in edges])
    keep = {(g, tuple(e)) for (g, e), p in zip(edges, probs) if p >= threshold}
    out, pruned = [], len(edges) - len(keep)
    for g, graph in enumerate(graphs):
        kept_edges = [e for e in graph["edges"] if (g, tuple(e)) in keep]
        live = {0} | {i for e in kept_edges for i in e[:2]}
        renumber = {old: new for new, old in enumerate(sorted(live))}
        nodes = [{**n, "id": renumber[n["id"]]} for n in graph["nodes"] if n["id"] in live]
        out.append({**graph, "nodes": nodes, "edges": [[renumber[a], renumber[b], k] for a, b, k in kept_edges]})
    return out, pruned


# ----------------------------------------------------------------------------------------------
# verify: exact consistency per graph


def _components(n: int, edges: Sequence[Sequence]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, _ in edges:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def _parts(graph: dict, max_nodes: int, oversize: str) -> list[list[int]]:
    """Node groups solved separately: connected components, each cut into chunks of at most
    max_nodes in node order when oversize is "split"; else an oversized component is an error."""
    parts = []
    for comp in _components(len(graph["nodes"]), graph["edges"]):
        if len(comp) > max_nodes and oversize == "error":
            raise UserError(f"graph {graph['graph']!r}: {len(comp)} connected nodes, over "
                            f"dct.consistency.max_nodes ({max_nodes}); raise it or set dct.consistency.oversize: split")
        parts += [comp[i: i + max_nodes] for i in range(0, len(comp), max_nodes)]
    return parts


def solve_graph(graph: dict, max_nodes: int, oversize: str) -> tuple[dict, dict]:
    """(the graph with each node's `own` label (P(true) >= 0.5) and `assigned` label, per-graph stats)."""
    nodes, edges = graph["nodes"], graph["edges"]
    own = [n["p_true"] >= 0.5 for n in nodes]
    assigned = list(own)
    dropped = 0
    for part in _parts(graph, max_nodes, oversize):
        index = {node: i for i, node in enumerate(part)}
        sub = [(index[a], index[b], k) for a, b, k in edges if a in index and b in index]
        dropped += sum(1 for a, b, _ in edges if (a in index) != (b in index))
        fixed = {index[i]: bool(nodes[i]["label"]) for i in part if nodes[i]["fixed"]}
        sol: Solution = solve([nodes[i]["p_true"] for i in part], sub, fixed, graph=graph["graph"])
        for i, label in zip(part, sol.labels):
            assigned[i] = label
    free = [i for i, n in enumerate(nodes) if not n["fixed"]]
    stats = {"graph": graph["graph"], "nodes": len(nodes), "edges": len(edges),
             "flips": sum(own[i] != assigned[i] for i in free), "free_nodes": len(free),
             "satisfied_before": satisfied_edges(own, edges), "consistent_before": satisfied_edges(own, edges) == len(edges),
             "edges_dropped_by_split": dropped // 2}
    solved = {**graph, "nodes": [{**n, "own": o, "assigned": a} for n, o, a in zip(nodes, own, assigned)]}
    return solved, stats


def heldout_seeds(texts: Sequence[str], train_seeds: Sequence[dict], max_seeds: int, seed: int) -> list[dict]:
    """Unlabelled seeds for the held-out graphs: the distinct texts that are no training seed (up
    to case and punctuation), a deterministic subset of at most max_seeds."""
    seen = {_norm(s["text"]) for s in train_seeds}
    rows = []
    for text in texts:
        if _norm(text) and _norm(text) not in seen:
            seen.add(_norm(text))
            rows.append({"text": text, "fixed": False, "label": None, "source": "heldout"})
    return limit_seeds(rows, max_seeds, seed)


def seed_only_rows(graphs: Sequence[dict]) -> list[dict]:
    """The paper's ablation: (claim, label) of each graph's seed alone, no implication and no
    consistency step: a fixed seed's given label, else the model's own (P(true) >= 0.5)."""
    rows = []
    for g in graphs:
        seed = g["nodes"][0]
        label = bool(seed["label"]) if seed["fixed"] else seed["p_true"] >= 0.5
        rows.append({"claim": seed["text"], "label": label, "graph": g["graph"]})
    return rows


def training_rows(graphs: Sequence[dict]) -> list[dict]:
    """(claim, label) per node of every graph, the solver's label; a claim in several graphs once
    (its first label)."""
    rows, seen = [], set()
    for g in graphs:
        for n in g["nodes"]:
            if _norm(n["text"]) not in seen:
                seen.add(_norm(n["text"]))
                rows.append({"claim": n["text"], "label": n["assigned"], "graph": g["graph"]})
    return rows


def balance(rows: Sequence[dict]) -> list[dict]:
    """`rows` plus the rarer label's rows repeated in order until both labels are equally many."""
    groups = [[r for r in rows if r["label"]], [r for r in rows if not r["label"]]]
    small, big = sorted(groups, key=len)
    if not small:
        return list(rows)
    return list(rows) + [small[i % len(small)] for i in range(len(big) - len(small))]


def coherence(graphs: Sequence[dict], labels_of: Callable[[dict], list[bool]]) -> list[tuple[int, int]]:
    """Per graph (satisfied edges, edges) under the labels `labels_of(graph)`."""
    return [(satisfied_edges(labels_of(g), g["edges"]), len(g["edges"])) for g in graphs]


def seed_rows_from_claims(rows: Sequence[dict], fixed: bool, source: str) -> list[dict]:
    return [{"text": r["claim"], "fixed": fixed, "label": bool(r["label"]) if fixed else None, "source": source}
            for r in rows]


def seed_rows_from_documents(docs: Sequence[dict]) -> list[dict]:
    return [{"text": d["text"], "fixed": True, "label": True, "source": "update"} for d in docs]


def limit_seeds(rows: list[dict], max_seeds: int, seed: int) -> list[dict]:
    from closedloop.suite import deterministic_subset

    return rows if len(rows) <= max_seeds else deterministic_subset(rows, max_seeds, seed)
