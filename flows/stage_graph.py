"""The stage graph and what a `--target` stands for, from dvc.yaml through DVC's own API (no
Prefect here: the flow checks targets with it before Prefect starts)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from closedloop.errors import UserError, dvc_error
from closedloop.io import dvc_lock_mid_write, rereading

# DVC's per-path read/write locks: `--wait-for-lock` waits for the repository lock only, so a
# command touching files another DVC process holds fails at once with "... is busy". The flow
# (here) and its stage tasks (tasks/dvc_stage.py) wait that out, polling, for at most this long.
LOCK_BUSY = "is busy"
LOCK_WAIT_SECONDS = 6 * 3600
LOCK_POLL_SECONDS = 2


@dataclass(frozen=True)
class StageGraph:
    upstream: dict[str, list[str]]  # {stage: the stages it depends on}, in dvc.yaml order
    methods: dict[str, str]  # {stage: its meta.method}
    stale: set[str]  # the stages DVC reports as changed now (empty without `with_status`)
    params: dict[str, set[str]]  # {stage: the dotted param keys it declares}


def stage_graph(root: Path, with_status: bool = True) -> StageGraph:
    """The stage graph from DVC's own API, in one pass over the index. A dvc.yaml DVC cannot read
    raises UserError."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    def read() -> StageGraph:
        with Repo(str(root), _wait_for_lock=True) as repo:
            graph = repo.index.graph  # edges point from a stage to the stages it depends on
            stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
            upstream = {s.name: sorted(u.name for u in graph.successors(s) if isinstance(u, PipelineStage))
                        for s in stages}
            methods = {s.name: (s.meta or {}).get("method", "shared") for s in stages}
            params = {s.name: {k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params or []}
                      for s in stages}
            stale = {name.split(":")[-1] for name in repo.status()} if with_status else set()
        return StageGraph(upstream, methods, stale, params)

    # Wait for DVC's locks, as the stage tasks do: `_wait_for_lock` waits for the repository lock,
    # and a per-path lock ("... is busy": another flow's or a `dvc repro`'s stage is reading or
    # writing those files) is polled. A flow started beside another queues behind it. A dvc.lock
    # caught mid-write by a `dvc repro` beside us is read again (`rereading`).
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return rereading(read, dvc_lock_mid_write)
        except LockError as e:
            if LOCK_BUSY not in str(e) or time.monotonic() > deadline:
                raise dvc_error(e) from None
            time.sleep(LOCK_POLL_SECONDS)
        except DvcException as e:
            raise dvc_error(e) from None


def stages_to_run(graph: dict[str, list[str]], methods: dict[str, str], targets: list[str]) -> set[str]:
    """The targets' stages and everything upstream of them; every stage without targets."""
    return _ancestry(graph, resolve_targets(graph, methods, targets)) if targets else set(graph)


def _ancestry(graph: dict[str, list[str]], stages: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(stages)
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(graph[s])
    return seen


def resolve_targets(graph: dict[str, list[str]], methods: dict[str, str], targets: list[str],
                    stale: set[str] = frozenset()) -> set[str]:
    """The stages the targets stand for (before adding their ancestry).

    A target is a stage name (`eval@rft`), a foreach group (`eval` = every eval@*), or a method
    name from dvc.yaml's `meta.method`: its own stages plus the shared stages downstream of them
    (its evaluation, the comparison) whose other inputs are up to date or built by the method's
    own stages' ancestry anyway, so `--target rft` never runs another method's stages beyond what
    the method itself reads."""
    # dvc status lists a stage whose own inputs changed; everything downstream of it reruns too,
    # though DVC sees that only once the first has rerun
    stale = {s for s in graph if _ancestry(graph, {s}) & set(stale)}
    selected: set[str] = set()
    for t in targets:
        named = {s for s in graph if s == t or s.partition("@")[0] == t}
        own = {s for s in graph if methods[s] == t}
        if not named and not own:
            raise UserError(f"dvc.yaml: no stage or method named {t!r} (methods: "
                            f"{', '.join(sorted(set(methods.values())))}; stages: {', '.join(graph)})")
        selected |= named | own
        if own:
            needed = _ancestry(graph, own)  # what the method's stages run anyway
            for s in graph:
                if methods[s] != "shared" or s in selected:
                    continue
                ancestry = _ancestry(graph, {s}) - {s}
                if ancestry & own and all(methods[a] in ("shared", t) or a not in stale or a in needed
                                          for a in ancestry):
                    selected.add(s)
    return selected


def execution_order(graph: dict[str, list[str]], methods: dict[str, str] | None = None,
                    targets: list[str] | None = None, stale: set[str] = frozenset()) -> list[str]:
    """Topological order (dvc.yaml order among ready stages), restricted to the targets' ancestry."""
    methods = methods or {s: "shared" for s in graph}
    wanted = _ancestry(graph, resolve_targets(graph, methods, targets, stale)) if targets else set(graph)
    order: list[str] = []
    while len(order) < len(wanted):
        ready = [s for s in graph if s in wanted and s not in order and all(u in order for u in graph[s])]
        if not ready:
            raise UserError("dvc.yaml: the stage graph has a cycle")
        order.append(ready[0])
    return order
