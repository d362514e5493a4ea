"""The README's code is real: its Python blocks that start with a file name
(``# app.py``, ``# main.py``, ...) are written out beside a copy of
broadcaster.py, as a user would save them, and

* every Python block of the README passes ``mypy --strict`` (a block without a
  file name is a fragment: it is checked after ``PRELUDE``, which declares the
  names such fragments take from the text around them);
* the Quickstart (``app.py``), the FastAPI app (``main.py``) and the Starlette
  app (``starlette_app.py``) do what the README says, driven in process by
  ``AsgiClient``; the FastAPI app's own tests (``test_main.py``,
  ``test_resume.py``) pass in a pytest process of their own;
* the Quickstart, the FastAPI app and the Starlette app, each started with
  each command line the README gives (``uvicorn app:app``, ``granian
  --interface asgi app:app``, ``daphne app:app``), end every open stream
  cleanly and exit within 1 s of SIGTERM (and of SIGINT, once).

They need fastapi and the servers (``pip install --group test``); without them
they are skipped with the reason, except under ``CI=true``, where a skip fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import _support
import pytest
from _support import HOST, Connection, free_port

from broadcaster import AsgiClient

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Every fenced Python block, and the file name its first line gives, if any.
PYTHON_BLOCK = re.compile(r"^```python\n(?:# ([a-z_]+\.py)\n)?(.*?)^```$", re.MULTILINE | re.DOTALL)
FILES = ["app.py", "main.py", "starlette_app.py", "test_main.py", "test_resume.py"]
# What the README's fragments take from the text around them: each line is
# put before a fragment that uses its name without defining it.
PRELUDE = {
    "Any": "from typing import Any",
    "Broadcaster": "from broadcaster import Broadcaster",
    "Event": "from broadcaster import Event",
    "last_event_id": "from broadcaster import last_event_id",
    "replay": "from broadcaster import replay",
    "Scope": "Scope = dict[str, Any]",
    "rooms": "rooms: Broadcaster[str, Event] = Broadcaster()",
    "room": 'room: str = "lobby"',
    "scope": "scope: Scope = {}",
    "history": "history: Any = None",
}


def with_prelude(code: str) -> str:
    """A fragment, after the lines of PRELUDE it needs."""
    defined = set(
        re.findall(r"^(?:from \S+ import (.+)|(\w+)\s*[:=]|(?:async )?def (\w+)|class (\w+))", code, re.MULTILINE)
    )
    names = {name.strip() for groups in defined for part in groups for name in part.split(",") if name.strip()}
    used = {name for name in PRELUDE if re.search(rf"\b{name}\b", code) and name not in names}
    if used & {"rooms", "Scope", "scope", "history"}:
        used |= {"Any", "Broadcaster", "Event", "Scope"} - names
    return "".join(PRELUDE[name] + "\n" for name in PRELUDE if name in used) + code


ANN = {"Authorization": "Bearer ann-token"}
STREAMS = 20  # opened before each SIGTERM
EXIT_WITHIN = 1.0


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the README's files and broadcaster.py."""
    _support.require_modules(("fastapi", "mypy"), "the README's examples need {}: pip install --group test")
    where = tmp_path_factory.mktemp("readme")
    blocks = PYTHON_BLOCK.findall(README)
    named = [(name, code) for name, code in blocks if name]
    assert [name for name, _ in named] == FILES
    for name, code in named:
        (where / name).write_text(f"# {name}\n{code}", encoding="utf-8")
    fragments = [code for name, code in blocks if not name]
    assert len(fragments) >= 10, "the README's other Python blocks"
    for n, code in enumerate(fragments):
        (where / f"fragment_{n}.py").write_text(with_prelude(code), encoding="utf-8")
    shutil.copy(ROOT / "broadcaster.py", where)
    shutil.copy(ROOT / "examples" / "redis_bridge.py", where)  # a fragment uses the Redis bridge
    # A user's project would configure pytest so; warnings are errors here too.
    (where / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n", encoding="utf-8"
    )
    return where


@pytest.fixture(autouse=True)
def saved_signals() -> Iterator[None]:
    """The apps arm close_on_signals(): whatever they chained in this
    process is undone after each test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def load(project: Path, name: str) -> ModuleType:
    """Import one of the README's files (under a name of its own)."""
    spec = importlib.util.spec_from_file_location(f"readme_{name}", project / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=where, capture_output=True, text=True, timeout=300, check=False)


def test_every_python_block_of_the_readme_passes_mypy_strict(project: Path) -> None:
    files = sorted(path.name for path in project.glob("*.py") if path.name not in ("broadcaster.py", "redis_bridge.py"))
    checked = run(project, "-m", "mypy", "--strict", "--no-incremental", *files)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_readme_tests_of_the_fastapi_app_pass(project: Path) -> None:
    ran = run(project, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_main.py", "test_resume.py")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(r"^3 passed in ", ran.stdout, re.MULTILINE), ran.stdout


@pytest.mark.asyncio
async def test_the_quickstart_streams_a_room_publishes_and_resumes(project: Path) -> None:
    quickstart = load(project, "app")
    async with AsgiClient(quickstart.app, lifespan=True) as client:
        async with client.stream("GET", "/rooms/lobby") as stream:
            assert stream.status == 200
            posted = await client.request("POST", "/rooms/lobby", body=b"hello\nworld")
            assert (posted.status, posted.text) == (200, "delivered to 1\n")
            first = await stream.event()
            assert (first.type, first.data) == ("message", "hello\nworld")
        await client.request("POST", "/rooms/lobby", body=b"missed")
        async with client.stream("GET", "/rooms/lobby", headers={"Last-Event-ID": first.last_event_id}) as stream:
            assert (await stream.event()).data == "missed"
        for method, path, body, status in [
            ("GET", "/", b"", 404),
            ("GET", "/rooms/", b"", 404),
            ("PUT", "/rooms/lobby", b"", 405),
            ("POST", "/rooms/lobby", b"\xff", 400),
            ("POST", "/rooms/lobby", b"x" * 65537, 400),
        ]:
            answered = await client.request(method, path, body=body)
            assert answered.status == status, (method, path, answered.text)
    assert quickstart.rooms.metrics().streams == 0


@pytest.mark.asyncio
async def test_the_fastapi_app_serves_its_api_docs(project: Path) -> None:
    """The adapter's status_code default keeps the OpenAPI schema, and so
    /docs, working."""
    main = load(project, "main")
    async with AsgiClient(main.app) as client:
        schema = await client.request("GET", "/openapi.json")
        assert schema.status == 200, schema.text
        assert "text/event-stream" in json.dumps(schema.json()["paths"]["/rooms/{room}/events"])
        assert (await client.request("GET", "/docs")).status == 200


@pytest.mark.asyncio
async def test_the_starlette_app_authorises_before_subscribing_and_streams(project: Path) -> None:
    starlette_app = load(project, "starlette_app")
    rooms = starlette_app.rooms
    async with AsgiClient(starlette_app.app, lifespan=True) as client:
        refused = await client.request("GET", "/rooms/lobby/events")
        assert (refused.status, refused.json()) == (401, {"detail": "a valid token is required"})
        assert rooms.subscriber_count("lobby") == 0
        async with client.stream("GET", "/rooms/lobby/events", headers=ANN) as stream:
            posted = await client.request("POST", "/rooms/lobby/messages", json={"text": "hi"}, headers=ANN)
            assert posted.json() == {"delivered": 1}
            event = await stream.event()
            assert (event.type, json.loads(event.data)) == ("message", {"user": "ann", "text": "hi"})
            bad = await client.request("POST", "/rooms/lobby/messages", body=b"{", headers=ANN)
            assert bad.status == 422
        assert rooms.subscriber_count("lobby") == 0
    assert rooms.metrics().channels == 0 and rooms.subscribe("x").closed  # the lifespan closed it


# -- the README's apps under each command line --------------------------------

COMMAND_LINES: dict[str, tuple[str, list[str]]] = {
    "uvicorn": ("uvicorn", ["-m", "uvicorn", "{app}", "--host", HOST, "--port", "{port}"]),
    "granian": ("granian", ["-m", "granian", "--interface", "asgi", "--host", HOST, "--port", "{port}", "{app}"]),
    "daphne": ("daphne", ["-m", "daphne", "-b", HOST, "-p", "{port}", "{app}"]),
}


@dataclasses.dataclass(frozen=True)
class ReadmeApp:
    """One of the README's apps, as a client uses it."""

    target: str  # what the command line names
    events: str  # the path of a room's stream
    publish: str  # where a message is posted
    headers: dict[str, str]  # on every request
    body: bytes  # the message "last words", as this app takes it
    content_type: str
    data: bytes  # the event's data line, as written


APPS: dict[str, ReadmeApp] = {
    "quickstart": ReadmeApp("app:app", "/rooms/lobby", "/rooms/lobby", {}, b"last words", "text/plain", b"last words"),
    "fastapi": ReadmeApp(
        "main:app",
        "/rooms/lobby/events",
        "/rooms/lobby/messages",
        ANN,
        b'{"text": "last words"}',
        "application/json",
        b'{"user":"ann","text":"last words"}',
    ),
}
APPS["starlette"] = dataclasses.replace(APPS["fastapi"], target="starlette_app:app")
RUNS = [(app, server, signal.SIGTERM) for app in APPS for server in COMMAND_LINES]
RUNS.append(("quickstart", "uvicorn", signal.SIGINT))  # Ctrl-C


@pytest.fixture
def server(request: pytest.FixtureRequest, project: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A README app under one command line, its own process group, on a free port."""
    app, name = request.param
    module, argv = COMMAND_LINES[name]
    _support.require_modules((module,), "the README's apps under {}: pip install --group test")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *(arg.format(port=port, app=APPS[app].target) for arg in argv)],
        cwd=project,
        env={**os.environ, "PYTHONWARNINGS": "error", "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # another process: polled, with a deadline
            assert proc.poll() is None, f"{name} exited early"
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{name} never listened on {port}"
                time.sleep(0.05)
        yield proc, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def group_alive(group: int) -> bool:
    """Whether any process of the process group is still running."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("server", "sig"),
    [((app, name), sig) for app, name, sig in RUNS],
    ids=[f"{app}-{name}-{sig.name}" for app, name, sig in RUNS],
    indirect=["server"],
)
def test_a_readme_app_ends_every_stream_and_exits_within_1s_of_a_signal(
    server: tuple[subprocess.Popen[str], int], sig: signal.Signals, request: pytest.FixtureRequest
) -> None:
    proc, port = server
    app = APPS[request.node.callspec.params["server"][0]]
    streams: list[Connection] = []
    try:
        for _ in range(STREAMS):
            conn = Connection(port)
            conn.request("GET", app.events, {"Accept": "text/event-stream", **app.headers})
            status, head = conn.head()
            assert (status, head["content-type"]) == (200, "text/event-stream; charset=utf-8")
            assert conn.chunk() == b":\n\n"  # the first chunk: the stream is open
            streams.append(conn)
        status, _, body = _support.request(
            port, "POST", app.publish, app.body, app.headers, content_type=app.content_type
        )
        assert status == 200, body
        start = time.monotonic()
        os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=10)
        while group_alive(proc.pid) and time.monotonic() - start < 10:  # its workers too (granian's)
            time.sleep(0.005)
        exited = time.monotonic() - start
        ends: dict[str, int] = {}
        for conn in streams:
            body = b""
            while (chunk := conn.chunk()) is not None:  # raises if the body was cut off
                body += chunk
            assert re.fullmatch(
                rb"event: message\nid: [0-9a-f]{12}-1\ndata: " + re.escape(app.data) + rb"\n\n", body
            ), body
            ends["clean"] = ends.get("clean", 0) + 1
    finally:
        for conn in streams:
            conn.close()
    print(f"\n{request.node.callspec.id}: exited {exited:.3f} s after {sig.name}, streams {ends}")
    assert ends == {"clean": STREAMS}
    assert exited < EXIT_WITHIN, f"exited {exited:.3f} s after {sig.name}:\n{output}"
    assert "Traceback" not in output and "ERROR" not in output, output
