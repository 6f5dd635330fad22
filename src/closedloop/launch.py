"""Training stages under `accelerate launch`, from params.yaml's `launch` section: no hand edit of
dvc.yaml's commands. A stage dvc.yaml marks `meta: {trains: true}` re-executes itself as
`accelerate launch ... -m closedloop stage NAME` when `launch.num_processes` > 1; each process then
runs the stage (closedloop.io discards the outputs of every rank but 0, closedloop.cli sends their
MLflow calls to a throwaway store), so DVC, the flow and MLflow see one stage as before.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from closedloop.config import LaunchParams
from closedloop.errors import UserError


def launched() -> bool:
    """Whether this process was started by a launcher (accelerate and torchrun set LOCAL_RANK in each)."""
    return "LOCAL_RANK" in os.environ


def wants_launch(launch: LaunchParams, meta: dict) -> bool:
    return launch.num_processes > 1 and bool(meta.get("trains")) and not launched()


def _free_port() -> int:
    """A port for rank 0's rendezvous: the default (29500) would collide with a second launch running beside."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launch: LaunchParams, stage: str, root: Path) -> list[str]:
    """`accelerate launch` of `closedloop stage <stage>`: a config file's settings where one is given,
    otherwise data parallel on this machine, without mixed precision or compilation (as one process runs)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes),
           "--main_process_port", str(_free_port())]
    if launch.config_file:
        config = Path(launch.config_file) if Path(launch.config_file).is_absolute() else root / launch.config_file
        if not config.is_file():
            raise UserError(f"params.yaml: launch.config_file: {launch.config_file}: expected an accelerate config "
                            "file (`accelerate config --config_file PATH` writes one), got no such file")
        cmd += ["--config_file", str(config)]
    else:
        import torch

        gpus = torch.cuda.device_count()
        if gpus and launch.num_processes > gpus:
            raise UserError(f"params.yaml: launch.num_processes: expected at most {gpus} (the GPUs here), "
                            f"got {launch.num_processes}; give launch.config_file for several machines")
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "-m", "closedloop", "stage", stage]


def relaunch(launch: LaunchParams, stage: str, root: Path) -> None:
    """Replace this process with the launcher (same pid, so DVC and the stage server wait on it)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():  # Accelerate's multi-process CPU mode (gloo)
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = launch_command(launch, stage, root)
    print(f"closedloop: {stage} under accelerate launch, {launch.num_processes} processes", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
