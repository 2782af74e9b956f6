"""Real `ablate` processes without a fresh interpreter's start-up each: a warm parent that has imported
torch, scikit-learn, matplotlib and MLflow once forks a child per command (a zygote, as Android's).

The child is a real process: its own pid, locks, signal handlers and exit status, killable with
kill -9, with its own pipes. It runs ``python -m ablation_cli`` as a fresh interpreter would (argv, cwd,
environment, sys.path[0], std streams, atexit handlers, non-daemon threads joined at exit). What it
skips is about 4.5 s of CPU importing torch, scikit-learn and matplotlib (docs/development.md).
Commands whose environment changes how an interpreter starts (PYTHONPATH, thread or malloc settings)
still get a fresh interpreter: :func:`popen` decides.

The server runs as ``python -m tests.warm SOCKET`` and serves one test process (a pytest-xdist
worker). A request is a JSON line (args, cwd, env) sent with the child's stdin, stdout and stderr
file descriptors (SCM_RIGHTS); the answer is the child's pid, then its exit status when it ends
(negative: the signal that ended it, as subprocess reports it).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import random
import runpy
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path
from typing import IO, Any

# what `ablate run`, `merge`, `import` and `track sync` import (a tiny run's sys.modules): imports only,
# nothing is called, so a child holds what a fresh interpreter holds after the same imports
PRELOAD = ["numpy", "torch", "torch._dynamo", "torch.optim", "sklearn.metrics", "sklearn.model_selection",
           "scipy.stats", "pandas", "pyarrow", "matplotlib", "matplotlib.pyplot", "matplotlib.backends.backend_agg",
           "matplotlib.backends.backend_pdf", "fontTools.subset", "fontTools.ttLib", "PIL.PngImagePlugin",
           "pydantic", "safetensors", "filelock", "rich", "typer", "mlflow", "ablation_cli.cli",
           "ablation_cli.session", "ablation_cli.orchestrator", "ablation_cli.executors.local",
           "ablation_cli.executors.workers", "ablation_cli.reports.merge", "ablation_cli.reports.plots",
           "ablation_cli.training.trainer", "ablation_cli.training.metrics", "ablation_cli.training.split",
           "ablation_cli.tracking"]
# variables read when an interpreter or a native library starts: a command with its own gets a fresh one
# (PYTHONPATH excepted: a child puts it on sys.path as a fresh interpreter would)
_STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "LD_", "MALLOC_", "MPL", "CUDA", "TORCH")
_ON_PATH = {"PYTHONPATH", "PYTHONUNBUFFERED"}  # what a child sets up itself


def fits(env: dict[str, str], started: dict[str, str]) -> bool:
    """Whether a child of a server started with ``started`` starts as a fresh interpreter with ``env`` would:
    the same start-up settings, and nothing on its PYTHONPATH that shadows a module the server imported."""
    keys = {k for k in (*env, *started) if k.startswith(_STARTUP_PREFIXES)} - _ON_PATH
    if any(env.get(k) != started.get(k) for k in keys):
        return False
    ours = set(started.get("PYTHONPATH", "").split(os.pathsep))
    loaded = {name.partition(".")[0] for name in sys.modules}
    for folder in env.get("PYTHONPATH", "").split(os.pathsep):
        if folder and folder not in ours and os.path.isdir(folder):
            inside = os.path.abspath(folder) + os.sep
            for name in {entry.partition(".")[0] for entry in os.listdir(folder)} & loaded:
                if not os.path.abspath(getattr(sys.modules[name], "__file__", None) or "/").startswith(inside):
                    return False  # a fresh interpreter would import this folder's, not the one loaded
    return True


# -- the server --------------------------------------------------------------------------------------

def serve(path: str) -> None:
    started = dict(os.environ)
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # an optional extra not installed (mlflow): a child goes without
            importlib.import_module(name)
    # what the imports set (torch: KMP_INIT_AT_FORK, ...), as they would in a fresh interpreter
    imported = {k: v for k, v in os.environ.items() if started.get(k) != v}
    gc.freeze()  # the children's collections skip what was imported: fewer pages copied on write
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin, *children.values()], [], [], 0.02)
        if sys.stdin in ready and not sys.stdin.readline():  # the test process is gone: so is the server
            break
        for pid, conn in children.items():
            if conn in ready and not conn.recv(1, socket.MSG_PEEK):  # its client is gone (kill -9 of a shell's
                with contextlib.suppress(OSError):                  # `ablate`): so is the child, as it would be
                    os.kill(pid, signal.SIGKILL)
        if listener in ready:
            conn, _ = listener.accept()
            msg, fds = _receive(conn)
            request = json.loads(msg)
            if not fits(request["env"], started):
                conn.sendall(b"fresh\n")  # the client starts a fresh interpreter itself
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                for other in (listener, *children.values()):
                    other.close()
                _child(request, fds, conn, started, imported)
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            with contextlib.suppress(OSError):
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One request: its JSON line (in one or more chunks) and the file descriptors sent with its first."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not msg.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        msg += more
    return msg, fds


def _child(request: dict[str, Any], fds: list[int], conn: socket.socket, started: dict[str, str],
           imported: dict[str, str]) -> None:
    """In the forked child: become ``python -m ablation_cli ARGS`` (or ``python -c CODE ARGS``) started in
    ``cwd`` with ``env``."""
    code = 1
    try:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(imported)
        # as `python -m` starts: the working folder (`-c`: ""), then PYTHONPATH, then the rest (less the
        # server's own)
        theirs, ours = (e.get("PYTHONPATH", "").split(os.pathsep) for e in (request["env"], started))
        rest = [p for p in sys.path[1:] if p not in set(ours) - {""}]
        first = "" if request.get("code") is not None else os.getcwd()
        sys.path[:] = [first, *(p for p in theirs if p), *rest]
        importlib.invalidate_caches()
        random.seed()
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(open(0, "rb", closefd=False))  # noqa: SIM115
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False),  # noqa: SIM115
                                                       write_through=True)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False),  # noqa: SIM115
                                                       errors="backslashreplace", write_through=True)
        code = _run_main(request["args"], request.get("code"))
        threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does at exit, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # whatever happens, the child never returns into the server loop
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(code)


def _run_main(args: list[str], code: str | None) -> int:
    try:
        if code is None:
            sys.argv = ["-m", *args]  # run_module puts the module's path first, as `python -m` does
            runpy.run_module("ablation_cli", run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(code, "<string>", "exec"), main.__dict__)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # an uncaught exception: its traceback and exit 1, as Python does
        traceback.print_exc()
        return 1
    return 0


# -- the client --------------------------------------------------------------------------------------

class _Server:
    """This test process's warm server, started on first use, stopped when the process ends."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="ablate-warm-")
        self.path = os.path.join(self.folder, "socket")
        repo = str(Path(__file__).resolve().parent.parent)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.warm", self.path], cwd=repo,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", "warm server"
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.folder)


_server: _Server | None = None
_lock = threading.Lock()


def socket_path() -> str:
    """The warm server's socket (started on first use): for ``tests/warm.py --client`` in a shell."""
    global _server
    with _lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        return _server.path


class _Fresh(Exception):
    """The server cannot start this command as a fresh interpreter would: start one."""


def _request(path: str, args: list[str], cwd: str, env: dict[str, str], fds: list[int],
             code: str | None = None) -> tuple[socket.socket, IO[str], int]:
    """Ask the server at ``path`` for a child; its connection, the answers' stream and the child's pid."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"args": args, "cwd": str(Path(cwd).resolve()), "env": env, "code": code}).encode() + b"\n"
    socket.send_fds(conn, [request], fds)
    answers = conn.makefile("r")
    first = answers.readline().strip()
    if first == "fresh":
        answers.close()
        conn.close()
        raise _Fresh
    return conn, answers, int(first)


class WarmProcess:
    """The part of :class:`subprocess.Popen` the tests use, for a child of the warm server."""

    def __init__(self, args: list[str], cwd: Path | str, env: dict[str, str], stdin: Any, stdout: Any,
                 stderr: Any, text: bool, code: str | None = None) -> None:
        self.args, self.returncode, self._text = args, None, text
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        theirs: list[int] = [os.open(os.devnull, os.O_RDWR)]  # the child's ends, closed here once sent
        mine: list[int] = []
        fds: list[int] = []
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                mine.append(w if i == 0 else r)
                theirs.append(r if i == 0 else w)
                fds.append(theirs[-1])
            elif spec == subprocess.STDOUT:
                fds.append(fds[1])
            elif isinstance(spec, int) and spec >= 0:
                fds.append(spec)
            elif hasattr(spec, "fileno"):
                fds.append(spec.fileno())
            else:  # None or DEVNULL: a test's own streams stay out of it
                fds.append(theirs[0])
        try:
            self._conn, self._answers, self.pid = _request(socket_path(), args, str(cwd), env, fds, code)
        except BaseException:
            for fd in (*theirs, *mine):
                os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        streams = iter(mine)
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec == subprocess.PIPE:
                mode = ("w" if i == 0 else "r") + ("" if text else "b")
                setattr(self, ("stdin", "stdout", "stderr")[i], os.fdopen(next(streams), mode))

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._read_status()
        assert self.returncode is not None
        return self.returncode

    def _read_status(self) -> None:
        line = self._answers.readline()
        self.returncode = int(line) if line.strip() else -signal.SIGKILL  # the server died, and with it
        self._answers.close()
        self._conn.close()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: str | bytes | None = None, timeout: float | None = None) -> tuple[Any, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        chunks: dict[int, list[bytes]] = {}
        with selectors.DefaultSelector() as sel:
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    sel.register(stream.fileno(), selectors.EVENT_READ)
                    chunks[stream.fileno()] = []
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
                for key, _ in sel.select(left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        sel.unregister(key.fd)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        out = [self._decode(b"".join(chunks[s.fileno()])) if s is not None else None
               for s in (self.stdout, self.stderr)]
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return out[0], out[1]

    def _decode(self, data: bytes) -> str | bytes:
        return data.decode(errors="replace").replace("\r\n", "\n") if self._text else data


def popen(args: list[str], cwd: Path | str, env: dict[str, str] | None = None, stdin: Any = None,
          stdout: Any = None, stderr: Any = None, text: bool = False,
          code: str | None = None) -> WarmProcess | subprocess.Popen[Any]:
    """``subprocess.Popen([python, "-m", "ablation_cli", *args], ...)`` (with ``code``: ``[python, "-c",
    code, *args]``), forked from the warm server unless ``env`` changes how an interpreter starts."""
    full_env = {**os.environ, **(env or {})}
    try:
        return WarmProcess(args, cwd, full_env, stdin, stdout, stderr, text, code)
    except _Fresh:
        command = ["-m", "ablation_cli"] if code is None else ["-c", code]
        return subprocess.Popen([sys.executable, *command, *args], cwd=cwd, env=full_env, stdin=stdin,
                                stdout=stdout, stderr=stderr, text=text)


def run(args: list[str], cwd: Path | str, env: dict[str, str] | None = None, timeout: float | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([python, "-m", "ablation_cli", *args], capture_output=True, text=True, ...)``."""
    proc = popen(args, cwd, env, stdin=subprocess.PIPE if input is not None else None,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess([sys.executable, "-m", "ablation_cli", *args], proc.wait(), out, err)


def client(args: list[str]) -> None:
    """``ablate ARGS`` in a shell (``python tests/warm.py --client ARGS``): this process's own streams go to a
    child of the server at $ABLATE_WARM_SOCKET; its signals are passed on, and its exit status is ours."""
    try:
        _conn, answers, pid = _request(os.environ["ABLATE_WARM_SOCKET"], args, os.getcwd(), dict(os.environ),
                                       [0, 1, 2])  # _conn: open until the exit status is read
    except (_Fresh, KeyError, OSError):
        os.execv(sys.executable, [sys.executable, "-m", "ablation_cli", *args])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: os.kill(pid, s))
    line = answers.readline()
    code = int(line) if line.strip() else -signal.SIGKILL
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        client(sys.argv[2:])
    else:
        serve(sys.argv[1])
