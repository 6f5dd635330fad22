"""Each stage sees only the params its dvc.yaml entry declares.

DVC reruns a stage exactly when something it declares changed, so a stage that reads an
undeclared param would leave dvc.lock vouching for results the current params did not produce.
`ParamsView` makes that impossible: reading an undeclared key raises `UndeclaredParam`, and every
key read is recorded (`reads`) so tests can compare what the code reads with what dvc.yaml declares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from closedloop.config import Params

T = TypeVar("T")


class UndeclaredParam(RuntimeError):
    """A stage read a param its dvc.yaml entry does not declare: a bug in the stage or in dvc.yaml.
    Not an AttributeError, so `getattr(view, key, default)` cannot swallow it."""


@dataclasses.dataclass(frozen=True)
class Declaration:
    params: set[str]  # the dotted param keys
    outs: list[str]  # outputs, as dvc.yaml writes them (relative to the project)
    meta: dict  # its `meta:` (method, trains)


def collected(root: Path, stage: str, use: Callable[[list], T]) -> T:
    """`use(stages)` on DVC's own parse of `stage` in dvc.yaml (a foreach group: its members), with
    the repository open (a dep's hash needs it); read again while another DVC process is rewriting
    dvc.lock. DVC errors are raised as they are."""
    from dvc.repo import Repo

    from closedloop.io import dvc_lock_mid_write, rereading

    def read() -> T:
        with Repo(str(root)) as repo:
            # An explicit dvc.yaml path: a bare stage name would be looked up from the current directory.
            return use(repo.stage.collect(f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"))
    return rereading(read, dvc_lock_mid_write)


def declaration(root: Path, stage: str) -> Declaration:
    """What the stage declares in dvc.yaml, from DVC's own parse (foreach expanded)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException

    from closedloop.errors import UserError, dvc_error

    try:
        found = collected(root, stage, list)
    except DvcException as e:
        raise dvc_error(e) from None
    if [s.name for s in found] != [stage]:  # a foreach group's name: DVC returns its members
        raise UserError(f"dvc.yaml: stage {stage!r} is a group; run one of its stages: "
                        f"{', '.join(s.name for s in found) or '(none: its foreach is empty)'}")
    (resolved,) = found
    keys = {k for dep in resolved.deps if isinstance(dep, ParamsDependency) for k in dep.params or []}
    return Declaration(keys, [str(out.def_path) for out in resolved.outs], dict(resolved.meta or {}))


def covered(key: str, declared: set[str]) -> bool:
    """True if `key` or one of its ancestors is declared."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in declared for i in range(1, len(parts) + 1))


def _has_declared_child(key: str, declared: set[str]) -> bool:
    return any(d.startswith(key + ".") for d in declared)


class ParamsView:
    """Read-only attribute (and, for mappings, item) access to the declared part of `Params`."""

    def __init__(self, obj: Any, declared: set[str], prefix: str = "", reads: set[str] | None = None):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "reads", reads if reads is not None else set())

    def _get(self, name: str, value: Any) -> Any:
        key = self._prefix + name
        is_covered = covered(key, self._declared)
        if is_covered or _has_declared_child(key, self._declared):
            # Sections stay views so the leaves read are recorded; a mapping declared whole is
            # one value, while a mapping declared key by key (evaluate.models.<name>) stays a view.
            if dataclasses.is_dataclass(value) or (isinstance(value, dict) and not is_covered):
                return ParamsView(value, self._declared, key + ".", self.reads)
            self.reads.add(key)
            return value
        raise UndeclaredParam(f"the stage reads param {key!r}, which its dvc.yaml entry does not declare "
                              f"(declared: {', '.join(sorted(self._declared)) or 'none'})")

    def value(self) -> Any:
        """The underlying section (a plain dataclass), recorded as read whole: for code that
        uses all of it, e.g. a trainer given its TrainParams."""
        self.reads.add(self._prefix.rstrip("."))
        return self._obj

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._get(name, getattr(self._obj, name))

    def __getitem__(self, name: str) -> Any:
        return self._get(name, self._obj[name])

    def __iter__(self):
        # Iterating a mapping reads its keys: the whole mapping must be declared.
        key = self._prefix.rstrip(".")
        if not covered(key, self._declared):
            raise UndeclaredParam(f"the stage iterates param {key!r}, which its dvc.yaml entry does not declare")
        self.reads.add(key)
        return iter(self._obj)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only")


def leaf_values(params: Params, keys: set[str]) -> dict[str, Any]:
    """{dotted key: value} of every leaf param under the given dotted keys (a section stands for
    all its fields)."""
    out: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        else:
            out[key] = node

    tree = params.as_dict()
    for key in sorted(keys):
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        walk(node, key)
    return out


def leaf_keys(params: Params, keys: set[str]) -> set[str]:
    """Every leaf param under the given dotted keys."""
    return set(leaf_values(params, keys))
