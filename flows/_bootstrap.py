"""Environment for every flow entry point; imported before prefect so its settings take effect.

Prefect's home (its SQLite database), like MLflow's store, lives inside the project unless the
user points PREFECT_HOME elsewhere. Offline and no-telemetry variables are set here too.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # flows/ and tasks/ are plain folders beside src/
    sys.path.insert(0, str(ROOT))

from closedloop.env import set_offline_defaults  # noqa: E402

set_offline_defaults()
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
# The temporary server migrates an empty database in ~75 s on 2 cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
# Stage commands (`closedloop`, `dvc`) come from the interpreter running the flow.
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


def check_params_or_exit(argv: list[str]) -> None:
    """Validate params.yaml before prefect is imported (importing it creates PREFECT_HOME):
    a bad value stops the run with one line and exit code 2, having written nothing."""
    from closedloop.config import load_params
    from closedloop.errors import UserError

    try:
        load_params(ROOT / "params.yaml")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
