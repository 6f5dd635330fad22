"""Where finished work outlives the checkout: DVC's cache (outputs and its run-cache) and the
effect runs' own records, outside the checkout by default.

DVC keeps its cache in `.dvc/cache` unless told otherwise, so a fresh clone, or a deleted
checkout, starts from nothing. With the cache in one directory per user (DVC's shared-cache
setup: `dvc cache dir --local PATH`), every clone on the machine restores a stage that any of them
finished ("Stage 'x' is cached - skipping run"), under `dvc repro` and `dvc exp run` alike.

The choice, first that applies:
1. a `cache.dir` already in the DVC config (any level: a user's `dvc cache dir ...`) is kept;
2. $CLOSEDLOOP_DVC_CACHE, a path (relative to the project): `.dvc/cache` keeps it inside;
3. $XDG_CACHE_HOME/closedloop/dvc (~/.cache/closedloop/dvc).
A fresh clone has no `.dvc/config.local`, so `make`, the flow and `closedloop effect` set it in
each clone (`closedloop cache` does it alone).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CLOSEDLOOP_DVC_CACHE"
INSIDE = Path(".dvc/cache")


def default_cache_dir() -> Path:
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home) / "closedloop" / "dvc"


def configured_cache_dir(root: Path) -> Path | None:
    """The cache.dir the DVC config sets for this project (None: DVC's default, .dvc/cache)."""
    from dvc.config import Config

    config = Config(dvc_dir=str(root / ".dvc"), validate=False)
    for level in ("local", "repo", "global", "system"):  # DVC's precedence, highest first
        value = (config.load_one(level).get("cache") or {}).get("dir")
        if value:
            # relative values in .dvc/config(.local) are relative to .dvc/
            path = Path(value).expanduser()
            return path if path.is_absolute() or level in ("global", "system") else (root / ".dvc" / path).resolve()
    return None


def ensure_cache_dir(root: Path) -> Path:
    """The project's DVC cache directory, set in `.dvc/config.local` when nothing chose one yet."""
    chosen = configured_cache_dir(root)
    if chosen is not None:
        return chosen
    wanted = Path(os.environ.get(CACHE_ENV) or default_cache_dir()).expanduser()
    wanted = (wanted if wanted.is_absolute() else root / wanted).resolve()
    if wanted == (root / INSIDE).resolve():
        return wanted  # DVC's default: nothing to write
    from dvc.config import Config

    wanted.mkdir(parents=True, exist_ok=True)
    with Config(dvc_dir=str(root / ".dvc"), validate=False).edit("local") as conf:
        conf.setdefault("cache", {})["dir"] = str(wanted)
    return wanted


def state_dir(root: Path, *, configure: bool = True) -> Path:
    """Beside the DVC cache: what closedloop keeps about runs (attempts, stage seconds, chunks of
    interrupted stages), shared by every clone that shares the cache (inside the checkout: under
    .dvc/tmp, which git ignores). `configure=False` (inside a stage DVC runs): the cache DVC is
    using now, the config left as it is."""
    cache = ensure_cache_dir(root) if configure else (configured_cache_dir(root) or (root / INSIDE).resolve())
    if cache.parts[-2:] == INSIDE.parts:  # a checkout's own cache (this one's, or, for the temporary
        return cache.parent / "tmp" / "closedloop-state"  # copy of `dvc exp run --temp`, its origin's)
    return cache.parent / "closedloop-state"
