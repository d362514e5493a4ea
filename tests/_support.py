"""Helpers shared by the integration tests: servers run as subprocesses on a
free port of 127.0.0.1, and standard-library clients that talk HTTP to them.

Not a test module (pytest collects ``test_*.py`` only): the test files import
it as a sibling (``tests/`` is on ``sys.path`` under pytest, as for mypy).
Every socket read has a timeout and every wait a deadline.
"""

from __future__ import annotations

import importlib.util
import math
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, NoReturn, TypeVar

import pytest

HOST = "127.0.0.1"
TIMEOUT = 5.0  # the most any single socket read may take

# Plain requests must not go through an http_proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def skip(reason: str) -> NoReturn:
    """Skip with ``reason``; under CI=true fail instead, where a skip would hide a broken setup."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: a skipped test is a failure)")
    pytest.skip(reason)


def require_modules(modules: Iterable[str], reason: str) -> None:
    """Skip (fail under CI=true) unless every one of ``modules`` is importable;
    ``reason`` names the missing ones in place of ``{}``."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        skip(reason.format(", ".join(missing)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def drain(pipe: IO[str], put: Callable[[str | None], None]) -> None:
    """Hand every line of ``pipe`` to ``put``, then None at the end, and close it."""
    with pipe:
        for line in pipe:
            put(line)
    put(None)


P = TypeVar("P", bound="Process")


class Process:
    """A Python script serving on a free port, as a subprocess (``argv[1]``): it
    prints ``<banner> http://127.0.0.1:PORT/`` once it listens, which is waited
    for unless ``ready_within`` is None (then ``wait_ready()`` is up to the caller).

    ``terminate()`` checks what each caller expects of a SIGTERM (or of the
    signal it is given): an exit within ``exit_within`` s, with ``exit_code``
    (None: any), and none of ``errors`` on stderr. As a context manager it is
    killed, if still running, at the end."""

    def __init__(
        self,
        argv: list[str],
        cwd: Path,
        banner: str,
        *,
        ready_within: float | None = 15,
        exit_within: float = 5,
        exit_code: int | None = -signal.SIGTERM,
        errors: tuple[str, ...] = ("ERROR", "Traceback"),
    ) -> None:
        self.name = Path(argv[1]).name
        self.prefix = f"{banner} http://{HOST}:"
        self.exit_within, self.exit_code, self.errors = exit_within, exit_code, errors
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            # A warning is an error in the served process too, as in the tests.
            env={**os.environ, "PYTHONWARNINGS": "error"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        # Both pipes are drained all along: uvicorn's access log goes to
        # stdout, and a full pipe would block the server.
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=drain, args=(self.proc.stdout, self.stdout.put), daemon=True),
            threading.Thread(target=drain, args=(self.proc.stderr, self._log), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.port = 0
        self.url = ""  # the URL the script printed
        if ready_within is not None:
            self.wait_ready(ready_within)

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _log(self, line: str | None) -> None:
        if line is not None:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_ready(self, within: float) -> None:
        """Sets ``port`` from the line the script prints once it is listening."""
        deadline = time.monotonic() + within
        while True:
            try:
                line = self.stdout.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"{self.name} printed no URL within {within:g} s; stderr: {self.stderr}")
            if line is None:
                self.proc.wait()
                pytest.fail(f"{self.name} exited with {self.proc.returncode}; stderr: {self.stderr}")
            if line.startswith(self.prefix):
                self.port = int(line[len(self.prefix) :].split("/")[0])
                self.url = line[len(self.prefix) - len(f"http://{HOST}:") :].split()[0]
                return

    def wait_for_log(self, text: str, within: float) -> float:
        """Seconds until ``text`` appeared on stderr; fails after ``within``."""
        start = time.monotonic()
        while text not in self.stderr:
            if time.monotonic() - start > within:
                pytest.fail(f"{text!r} not logged within {within} s; stderr:\n{self.stderr}")
            time.sleep(0.01)
        return time.monotonic() - start

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """SIGTERM (or ``sig``: SIGINT is a Ctrl-C); the seconds until it exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} died early ({self.proc.returncode}); stderr: {self.stderr}")
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=self.exit_within)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {self.exit_within:g} s of {sig.name}; stderr:\n{self.stderr}")
        elapsed = time.monotonic() - start
        for thread in self._threads:
            thread.join(timeout=5)
        log = self.stderr
        if self.exit_code is not None:
            assert self.proc.returncode == self.exit_code, log
        assert not any(error in log for error in self.errors), log
        return elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def serve(server: P, exit_under: float = math.inf) -> Iterator[P]:
    """``server`` for the duration of a fixture; SIGTERM at the end (the exit
    taking less than ``exit_under`` s), killed in any case."""
    with server:
        yield server
        assert server.terminate() < exit_under


def abort(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN (no-op if closed already)."""
    if sock.fileno() < 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class Connection:
    """One HTTP/1.1 connection, spoken and parsed by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.buf = b""

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def head(self) -> tuple[int, dict[str, str]]:
        """The status and the headers (names lowercased) of the response."""
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None for the last one (``0\\r\\n\\r\\n``)."""
        size = int(self._line().split(b";")[0], 16)
        data = self.take(size + 2)
        assert data[-2:] == b"\r\n", data
        return data[:-2] if size else None

    def at_eof(self) -> bool:
        """True if the server closed the connection (nothing more to read)."""
        if self.buf:
            return False
        return self.sock.recv(1) == b""

    def close(self, how: str = "close") -> None:
        """``close``: a FIN; ``reset``: an abrupt close, a RST."""
        if how == "reset":
            abort(self.sock)
        else:
            self.sock.close()


class Clients:
    """Opens connections (SSE streams) to a port and closes every one of them at
    the end of a test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open: list[Connection] = []

    def connect(self) -> Connection:
        conn = Connection(self.port)
        self.open.append(conn)
        return conn

    def open_stream(self, path: str, headers: dict[str, str] | None = None) -> tuple[Connection, dict[str, str]]:
        """A GET of a stream: the connection, after a 200 head with a chunked body, and that head."""
        conn = self.connect()
        conn.request("GET", path, {"Accept": "text/event-stream", **(headers or {})})
        status, head = conn.head()
        assert status == 200
        assert head["transfer-encoding"] == "chunked"
        return conn, head

    def close_all(self) -> None:
        for conn in self.open:
            conn.close()
        self.open.clear()


C = TypeVar("C", bound=Clients)


def closing(clients: C) -> Iterator[C]:
    """``clients`` for the duration of a fixture, every connection closed at the end."""
    try:
        yield clients
    finally:
        clients.close_all()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    content_type: str | None = "application/json",
    timeout: float = TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    """A plain request with urllib: status, headers (lowercased names), body. A
    body goes as ``content_type`` (None: urllib's default)."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body, method=method, headers=headers or {})
    if body is not None and content_type is not None:
        req.add_header("Content-Type", content_type)
    try:
        with OPENER.open(req, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()
