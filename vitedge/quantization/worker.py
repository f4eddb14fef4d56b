"""A child process that runs the INT8 search's heavy calls, so a crash in a native library costs one call.

NNCF, OpenVINO and ONNX Runtime are native code: a malloc corruption (seen in NNCF's quantile estimator)
or a hang must not take the user's run down with it.  The search sends each call (a function of
:mod:`vitedge.quantization.candidates` and its keyword arguments) to one long-lived child process over a
:mod:`multiprocessing` pipe; the child keeps what it loaded (the quantized base model, the image arrays)
between calls, so a call that edits the base graph costs seconds, not a re-import and a re-load.

A call whose child dies raises :class:`WorkerCrashed`; one that runs past its time raises
:class:`WorkerTimeout` after the child is killed.  Either way the next call starts a fresh child.

The child is ``python -m vitedge.quantization.worker`` connected back over a local socket
(:mod:`multiprocessing.connection`, with an auth key), not a ``multiprocessing.Process``: spawning one
re-imports the caller's main module, which breaks scripts without a ``__main__`` guard, notebooks and stdin.
Its output goes to ``worker.log`` in the search's scratch folder (or, for a worker started before that folder
exists, in a temporary folder of its own); a crash's last line is quoted from there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from ..errors import FileProblem, VitedgeError, first_line
from ..ui import err_console

START_TIMEOUT_S = 120.0  # importing NNCF, OpenVINO and ONNX Runtime on a busy machine


class WorkerFailed(VitedgeError):
    """The call raised inside the child (a Python error: the child itself is fine)."""


class WorkerCrashed(VitedgeError):
    """The child process died during the call (a signal or an exit from native code)."""


class WorkerTimeout(VitedgeError):
    """The call ran past its time; the child was killed."""


def _serve(conn) -> None:
    """The child's loop: run each (function name, kwargs) from the pipe, send back ("ok", result) or ("error", text)."""
    from . import candidates

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, kwargs = msg
        try:
            fn = candidates.CALLS[name]
            conn.send(("ok", fn(**kwargs)))
        except BaseException as exc:
            text = first_line(exc, 300)
            conn.send(("error", text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}", traceback.format_exc()[-4000:]))


def worker_command(address: str) -> list[str]:
    """The child process: this module run as a script, told where to connect."""
    return [sys.executable, "-m", __name__, address]


class Worker:
    """One child process at a time; :meth:`call` runs a function of :mod:`candidates` in it."""

    def __init__(self, folder: Path | None = None) -> None:
        """``folder``: where ``worker.log`` goes; ``None``: a temporary folder, removed by :meth:`close`."""
        self._own = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="vitedge-worker-")) if folder is None else Path(folder)
        self.log = self.folder / "worker.log"
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    @classmethod
    def early(cls) -> Worker:
        """A worker started now, before the caller has a scratch folder: its imports (about 2 s of NNCF, OpenVINO
        and ONNX Runtime) overlap with the caller opening the model and decoding the images."""
        worker = cls()
        worker.start()
        return worker

    def _start(self) -> None:
        """Spawn the child; it connects back while the caller goes on (:meth:`_connected` waits for it)."""
        key = secrets.token_bytes(16)
        self._listener = Listener(authkey=key)  # a fresh local socket (a named pipe on Windows)
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                worker_command(str(self._listener.address)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", VITEDGE_WORKER_KEY=key.hex()),
            )
        self._accepted: list = []
        self._waiter = threading.Thread(target=lambda: self._accepted.append(self._listener.accept()), daemon=True)
        self._waiter.start()
        self._started = time.perf_counter()

    def _connected(self) -> Connection:
        """The connection to the child, once it has connected (a child that dies or hangs first is an error)."""
        if self._conn is None:
            assert self._proc is not None
            while self._waiter.is_alive():
                self._waiter.join(0.5)
                if self._waiter.is_alive() and (self._proc.poll() is not None or time.perf_counter() - self._started > START_TIMEOUT_S):
                    self._proc.kill()
                    code = self._proc.wait()
                    self._proc = None
                    self._listener.close()
                    raise WorkerCrashed(f"the worker process did not start (exit code {code}){self._last_log_line()}")
            self._listener.close()
            self._conn = self._accepted[0]
        return self._conn

    def _stop(self, kill: bool = False) -> None:
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if not kill and conn is not None:
            try:
                conn.send(None)
                proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if conn is not None:
            conn.close()
        else:  # it never connected: stop waiting for it
            self._listener.close()
        self._proc = self._conn = None

    def _last_log_line(self) -> str:
        try:
            lines = self.log.read_bytes()[-400:].decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1][:160]}" if lines else ""

    def start(self) -> None:
        """Start the child now (else the first call does): it imports its libraries while the caller goes on."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop(kill=True)
            self._start()

    def call(self, name: str, timeout: float, what: str, meanwhile: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Run ``candidates.CALLS[name](**kwargs)`` in the child, showing ``what`` with the elapsed time.
        ``meanwhile``: work for this process while the child runs the call (its time counts towards ``timeout``)."""
        self.start()
        conn = self._connected()
        proc = self._proc
        assert proc is not None  # _start() set it, or raised
        t0 = time.perf_counter()
        conn.send((name, kwargs))
        with err_console.status(what) as status:
            if meanwhile is not None:
                meanwhile()
            while True:
                reply = None
                if conn.poll(1.0):
                    try:
                        reply = conn.recv()
                    except EOFError:  # the child died before it could answer
                        pass
                    else:
                        break
                if reply is None and proc.poll() is not None:
                    code = proc.wait()
                    tail = self._last_log_line()
                    self._stop(kill=True)
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    raise WorkerCrashed(f"the worker process died ({how}){tail}")
                elapsed = time.perf_counter() - t0
                if elapsed > timeout:
                    self._stop(kill=True)
                    raise WorkerTimeout(f"stopped after {timeout:.0f} s")
                status.update(f"{what} ({elapsed:.0f} s)")
        if reply[0] == "ok":
            return reply[1]
        raise WorkerFailed(reply[1], None)

    def close(self) -> None:
        self._stop()
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    from multiprocessing.connection import Client

    conn = Client(sys.argv[1], authkey=bytes.fromhex(os.environ.pop("VITEDGE_WORKER_KEY")))
    import nncf  # noqa: F401 - imported before the first call, so that no call's time limit pays for the imports
    import onnxruntime  # noqa: F401
    import openvino  # noqa: F401

    try:
        _serve(conn)
    finally:
        conn.close()
    # asked to stop: nothing is left to write, so skip the interpreter's teardown of the native libraries (about a
    # second that the caller would wait for)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()


def ray_calls(job: Any, steps: list[tuple[str, dict]]) -> dict:
    """A Ray task of the search (``--ray``): ``steps``, calls of :data:`CALLS` run in order in this task's process, and
    their results (``{"results": [...]}``); ``{"error": ...}`` when a call fails, which costs that item only (the
    search records it, as a crashed call of the local worker).  A file of the search that this node cannot see is
    a :class:`~vitedge.errors.FileProblem`, raised: every task would fail alike (no shared filesystem)."""
    made = {kw.get("out") for name, kw in steps if name == "quantize_base"}  # files an earlier step writes
    needed = [kw[key] for _, kw in steps for key in ("source", "base") if isinstance(kw.get(key), str) and kw[key] not in made]
    needed += [p for _, kw in steps for p in data_paths(kw.get("data") or kw.get("calib"))]
    missing = [p for p in needed if not Path(p).exists()]
    if missing:
        raise FileProblem(
            f"the INT8 search's file {missing[0]} is not on this Ray node",
            "put -o on a filesystem that every node mounts at the same path (docs/distributed.md)",
        )
    from .candidates import CALLS  # (as the worker's own process: only the process that runs candidates loads them)

    results = []
    try:
        for name, kw in steps:
            results.append(CALLS[name](**{**(job or {}), **kw}))
    except Exception as exc:  # a candidate that fails is one row of the table, as in the local worker
        return {"error": first_line(exc)}
    return {"results": results}


def data_paths(data: str | list[str] | None) -> list[str]:
    """The ``.npy`` files of a set of preprocessed images: one, or one per input size (``candidates.Data``)."""
    return [] if data is None else [data] if isinstance(data, str) else list(data)
