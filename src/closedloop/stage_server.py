"""Stage processes forked from a server that has already imported the heavy libraries.

Every DVC stage is a fresh `closedloop stage NAME` process, and on 2 cores one spends 6-8 s
importing torch, transformers, MLflow's store, nltk and DVC before its first line of work
(`bench/bench_stage_start.py`); a stage of a tiny model, or one that only reads and writes JSON,
computes for a second or less. The server imports those libraries once and forks a process per
stage from itself (the zygote pattern: Android's app start, Ruby's Spring). Python has no
library for a forking server of whole command lines (multiprocessing's forkserver runs functions
for its own parent), hence this module.

What a stage computes does not change: the forked process takes the caller's argv, working
directory, environment, sys.path, umask and standard streams, imports closedloop afresh from the
caller's sys.path (only third-party libraries are preloaded), and exits with the status a process
of its own would have, signal included. The caller (`closedloop stage NAME`, the process DVC
started) stays for the stage's whole life: a signal it gets is passed on, and if it is killed the
stage is killed with it, so DVC and `kill` see the stage as before.

Never required: `closedloop stage-server SOCKET` serves until the process that started it ends;
`CLOSEDLOOP_STAGE_SERVER=SOCKET` sends stages there. The Prefect flow starts one for each of its
runs (`serving`); `dvc repro` and `dvc exp run` use one only where the variable is set. A stage
runs in its own process, as without the variable, when no server listens there, or when the
caller's environment differs from the server's in anything an import may have read (only
variables read at call time may differ: see PER_CALL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "CLOSEDLOOP_STAGE_SERVER"
READY_SECONDS = 300  # a flow waits this long for its server to listen (~7 s alone on 2 cores)
# What a stage process imports before its work (cProfile of `closedloop stage eval@base`), by
# module name; a training stage adds TRL's and PEFT's. Third-party only: closedloop itself is
# imported by each stage from its own sys.path (a project copy may carry different code).
PRELOAD = ("torch", "transformers", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "nltk",
           "if_verifiable.ifeval", "dvc.repo", "dvc.api", "trl", "peft", "datasets", "accelerate", "psutil",
           "yaml", "ruamel.yaml")
# transformers resolves these lazily, each pulling in a large part of the library on first use.
PRELOAD_ATTRS = ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "LlamaForCausalLM",
                 "PreTrainedTokenizerFast", "Trainer")
# Variables read when used, not at import: they may differ between the server and a stage.
# Everything else (HF_*, OMP_NUM_THREADS, LANG, MLFLOW_*, ...) must be equal, or the stage runs alone.
PER_CALL = {"PWD", "OLDPWD", "SHLVL", "_", "PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "COLUMNS", "LINES", ENV,
            # a shell's prompts: an activated venv exports PS1, and the non-interactive shell DVC
            # runs a stage in drops it
            "PS1", "PS2", "PS4",
            # MLflow reads these when it opens a run (mlflow.environment_variables: `.get()` per call)
            "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"}
PER_CALL_PREFIXES = ("DVC_", "PREFECT_", "CLOSEDLOOP_", "PYTEST_", "GIT_")


def env_difference(server: dict[str, str], caller: dict[str, str], set_by_imports: dict[str, str] = {}) -> list[str]:
    """The variables, not read at call time, whose values differ between the server's environment
    and a caller's. What the server's imports set may be missing in the caller (its own imports
    would set it) or equal."""
    names = set(server) | set(caller)
    return sorted(n for n in names if n not in PER_CALL and not n.startswith(PER_CALL_PREFIXES)
                  and server.get(n) != caller.get(n)
                  and not (n in set_by_imports and caller.get(n) in (None, set_by_imports[n])))


@contextmanager
def serving(log: Path) -> Iterator[dict[str, str]]:
    """A stage server for as long as the caller (a flow run) lasts, its output appended to `log`:
    yields the variables to give its stages ({} when one is set already, as in the tests), once
    it listens (its imports take ~7 s, about what the first stage alone would spend on them); if
    it never does, {} and its stages run alone."""
    if os.environ.get(ENV):
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="closedloop-stages-") as tmp:  # 0700: this user only
        sock = Path(tmp) / "socket"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "closedloop", "stage-server", str(sock)],
                                    stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_SECONDS
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            yield {ENV: str(sock)} if sock.exists() else {}
        finally:
            proc.terminate()
            proc.wait(timeout=30)


# ---- the wire: a 4-byte length, then a JSON object ----

def _send(conn: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


def _recv(conn: socket.socket) -> dict | None:
    head = _recv_exact(conn, 4)
    body = head and _recv_exact(conn, struct.unpack("!I", head)[0])
    return json.loads(body) if body else None


# ---- the caller: `closedloop stage NAME` with CLOSEDLOOP_STAGE_SERVER set ----

def run_on_server(argv: list[str]) -> int | None:
    """Run this stage command in a process forked by the server: its exit status, or None when it
    must run here (no variable, no server, or an environment the server refuses)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        # the standard streams go over the socket as file descriptors (SCM_RIGHTS)
        socket.send_fds(conn, [b"\0"], [0, 1, 2])
        umask = os.umask(0)
        os.umask(umask)
        _send(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path, "umask": umask})
        reply = _recv(conn)
    except OSError:
        conn.close()
        return None
    if reply is None or "refused" in reply:
        conn.close()
        return None
    return _wait(conn, reply["pid"])


def _wait(conn: socket.socket, pid: int) -> int:
    """Pass signals on to the stage's process until it ends; end as it ended."""
    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    status = _recv(conn)  # a signal's handler runs, then the call resumes (PEP 475)
    if status is None:
        print(f"closedloop: the stage server at {os.environ.get(ENV)} went away during the stage", file=sys.stderr)
        return 1
    if "signal" in status:  # die of the same signal, as the stage's own process would have
        sys.stdout.flush()
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
        time.sleep(1)
    return int(status["exit"])


# ---- the server ----

def serve(path: Path) -> None:
    """Preload, then fork a watcher per connection; each watcher forks the stage and reports how it
    ended (the server itself stays single-threaded, as forking requires)."""
    import importlib

    parent = os.getppid()  # before the imports: the server ends with it
    base_env = dict(os.environ)  # what stages are compared with: the environment the imports saw
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library: its stages import it themselves
            pass
    transformers = sys.modules["transformers"]
    for attr in PRELOAD_ATTRS:
        getattr(transformers, attr)
    # what the imports themselves set (torch: KMP_*, TORCHINDUCTOR_CACHE_DIR): a stage's own
    # imports would set them too
    set_by_imports = {k: v for k, v in os.environ.items() if base_env.get(k) != v}
    os.chdir("/")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # the socket: this user only (a stage runs whatever it is sent)
    listener.bind(str(path))
    os.umask(old_umask)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # watchers are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` removes the socket
    print(f"stage server: ready on {path} (pid {os.getpid()})", flush=True)
    server_pid = os.getpid()
    listener.settimeout(1.0)
    try:
        while os.getppid() == parent:  # it ends with the process that started it (a killed test run)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            if os.fork() == 0:
                listener.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                try:
                    _watch(conn, base_env, set_by_imports)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(0)
            conn.close()
    finally:
        if os.getpid() == server_pid:
            path.unlink(missing_ok=True)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _watch(conn: socket.socket, base_env: dict[str, str], set_by_imports: dict[str, str]) -> None:
    """One stage: receive it, check it, fork it, kill it if its caller goes, report its end."""
    if _peer_uid(conn) != os.getuid():
        return
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    request = _recv(conn)
    if request is None or len(fds) != 3:
        return
    differ = env_difference(base_env, request["env"], set_by_imports)
    if differ:
        print(f"stage server: {request['argv'][1:]} runs alone: its environment differs in {differ}",
              file=sys.stderr, flush=True)
        _send(conn, {"refused": f"environment differs in {differ}"})
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # a signal passed on before the stage has its own handlers waits until it has them (it would
    # otherwise meet the server's SIGTERM handler)
    passed_on = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, passed_on)
    pid = os.fork()
    if pid == 0:
        try:
            conn.close()
            _become_stage(request, fds, set_by_imports, passed_on)  # never returns
        finally:
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, passed_on)
    for fd in fds:
        os.close(fd)
    print(f"stage server: {request['argv'][1:]} in pid {pid}", file=sys.stderr, flush=True)
    try:
        _send(conn, {"pid": pid})
        end = _supervise(conn, pid)
    except OSError:  # the caller went away before it heard of its stage, or mid-way
        end = None
    if end is None:  # the caller is gone (killed): so is its stage
        print(f"stage server: pid {pid} killed: its caller went away", file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return
    print(f"stage server: pid {pid} ended: {end}", file=sys.stderr, flush=True)
    try:
        _send(conn, end)
    except OSError:
        pass


def _supervise(conn: socket.socket, pid: int) -> dict | None:
    """Wait for the stage to end: how it ended, or None as soon as its caller's end of the socket
    closes."""
    conn.settimeout(0.2)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        try:
            if conn.recv(1) == b"":
                return None
        except TimeoutError:
            pass


def _become_stage(request: dict, fds: list[int], set_by_imports: dict[str, str], blocked: set) -> None:
    """In the forked process: take on the caller's process state, run its command, exit as a
    Python process does (atexit handlers, flushed streams, the exit status or the signal)."""
    import random
    import runpy
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    for k, v in set_by_imports.items():
        os.environ.setdefault(k, v)
    os.environ.pop(ENV, None)  # this process runs the stage itself
    sys.path[:] = request["path"]
    sys.argv = request["argv"]
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
    for name in [m for m in sys.modules if m == "closedloop" or m.startswith("closedloop.")]:
        del sys.modules[name]  # imported afresh from the caller's sys.path
    # fresh random state, as a process of its own starts with (stages seed what they use)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    code: int = 0
    try:
        # as `python -m closedloop ARGS` would (its __main__ exits with the command's status); by
        # name, since this module is what the command line's own module imports to get here
        runpy.run_module("closedloop", run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # Python reports it as death by SIGINT
        traceback.print_exc()
        _exit(0, signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: int, sig: int | None = None) -> None:
    import atexit

    atexit._run_exitfuncs()  # what the interpreter runs at exit (MLflow's, logging's, ...)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if sig is not None:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(code)
