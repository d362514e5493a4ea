"""End-to-end tests of ``examples/starlette_app.py``, ``examples/fastapi_app.py``,
``examples/dashboard.py``, ``examples/threads.py`` and ``examples/metrics.py``:
real processes, over loopback TCP.

Each example runs as its own process (``sys.executable examples/NAME.py --port
0``, from another working directory, so its ``sys.path`` line is exercised);
the fixture reads the URL it prints to learn the port, drains its stdout and
stderr all along, and stops it with SIGTERM at the end, checking that it exits
promptly and logged no error. Clients are the standard library only: raw
sockets for the streams (the tests see the status line, the headers and every
chunk of the chunked body byte for byte) and ``urllib.request`` for the plain
requests. Every socket read has a timeout, and the only polling (of a stats
endpoint, or of a process's log) has a deadline.

The examples need uvicorn, starlette and fastapi (``pip install
'.[examples]'``). Without one of them its tests are skipped with the reason,
except under ``CI=true``, where a skip would hide a broken setup: they fail.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _support
import pytest
from _support import Connection, request

from broadcaster import SseParser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INTERVAL = 0.05  # --interval of dashboard.py and threads.py

ALICE = {"Authorization": "Bearer alice-token"}  # rooms general and ops
BOB = {"Authorization": "Bearer bob-token"}  # room general only


def require(*modules: str) -> None:
    """Skip (fail under CI=true) unless every module is importable."""
    _support.require_modules(modules, "the examples need {}: pip install -e '.[examples]'")


# ---------------------------------------------------------------------------
# The example processes
# ---------------------------------------------------------------------------


class Example(_support.Process):
    """``examples/NAME.py`` running as a subprocess on a free port. After
    SIGTERM it must exit within 5 s (the tests ask for 3), killed by the
    SIGTERM that uvicorn re-raises after its graceful shutdown, having logged
    no error."""

    def __init__(self, name: str, cwd: Path, *args: str) -> None:
        argv = [sys.executable, str(EXAMPLES / f"{name}.py"), "--port", "0", *args]
        super().__init__(argv, cwd, f"{name} running on", errors=("ERROR", "CRITICAL", "Traceback"))


def run(name: str, cwd: Path, *args: str) -> Iterator[Example]:
    """An example process for the duration of a fixture; SIGTERM at the end."""
    yield from _support.serve(Example(name, cwd, *args), exit_under=3.0)


@pytest.fixture(scope="module", params=["starlette_app", "fastapi_app"])
def authapp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    """starlette_app.py or fastapi_app.py (the same HTTP API), shared by the tests that do not stop it."""
    name: str = request.param
    require("uvicorn", name.removesuffix("_app"))
    yield from run(name, tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    require("uvicorn")
    yield from run("dashboard", tmp_path_factory.mktemp("cwd"), "--interval", str(INTERVAL))


@pytest.fixture(scope="module")
def threads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    require("uvicorn")
    yield from run("threads", tmp_path_factory.mktemp("cwd"), "--interval", str(INTERVAL))


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class Clients(_support.Clients):
    """Opens SSE streams and closes every one of them at the end of a test."""

    def stream(self, path: str, headers: dict[str, str] | None = None) -> Connection:
        """A stream, checked up to and including its first chunk (``:\\n\\n``)."""
        conn, head = self.open_stream(path, headers)
        assert head["content-type"] == "text/event-stream; charset=utf-8"
        assert head["cache-control"] == "no-cache"
        assert head["x-accel-buffering"] == "no"
        assert "content-length" not in head
        assert conn.chunk() == b":\n\n"
        return conn


def clients_of(server: Example) -> Iterator[Clients]:
    yield from _support.closing(Clients(server.port))


def get_json(port: int, path: str) -> Any:
    status, head, body = request(port, "GET", path)
    assert status == 200 and head["content-type"] == "application/json", (status, body)
    return json.loads(body)


def wait_until(what: str, check: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# starlette_app.py and fastapi_app.py: authorised rooms
# ---------------------------------------------------------------------------


def stats(port: int, room: str) -> dict[str, Any]:
    result: dict[str, Any] = get_json(port, f"/rooms/{room}/stats")
    return result


def publish(port: int, room: str, text: str, headers: dict[str, str]) -> tuple[int, bytes]:
    status, _, body = request(port, "POST", f"/rooms/{room}/messages", json.dumps({"text": text}).encode(), headers)
    return status, body


def message(room: str, user: str, text: str) -> bytes:
    """The exact frame of a message (compact JSON, UTF-8, LF line endings)."""
    data = json.dumps({"room": room, "user": user, "text": text}, ensure_ascii=False, separators=(",", ":"))
    return f"event: message\ndata: {data}\n\n".encode()


@pytest.fixture
def auth_clients(authapp: Example) -> Iterator[Clients]:
    """Clients of the app; afterwards, every room is empty again (within 1 s of
    closing the sockets), so each test starts from zero subscribers."""
    yield from clients_of(authapp)

    def empty() -> bool:
        return all(stats(authapp.port, room)["subscribers"] == 0 for room in ("general", "ops"))

    wait_until("the closed streams left their rooms", empty)


def test_authorised_stream_then_message_byte_exact(authapp: Example, auth_clients: Clients) -> None:
    """A bearer token that grants the room: the SSE headers and the first chunk
    at once, one subscriber, and a POSTed message arrives as its exact frame."""
    conn = auth_clients.stream("/rooms/ops/events", ALICE)
    assert stats(authapp.port, "ops") == {"room": "ops", "subscribers": 1, "channels": 1}

    text = 'héllo\nwörld ✓ "quoted"'
    assert publish(authapp.port, "ops", text, ALICE) == (200, b'{"delivered":1}')
    assert conn.chunk() == message("ops", "alice", text)
    for n in range(3):
        assert publish(authapp.port, "ops", f"m{n}", ALICE)[0] == 200
    assert [conn.chunk() for _ in range(3)] == [message("ops", "alice", f"m{n}") for n in range(3)]


def test_query_token_for_eventsource(authapp: Example, auth_clients: Clients) -> None:
    """``?token=`` works where EventSource cannot set a header; the message's
    user is the publisher's token's, and rooms are independent."""
    bob = auth_clients.stream("/rooms/general/events?token=bob-token")
    alice = auth_clients.stream("/rooms/ops/events?token=alice-token")
    assert publish(authapp.port, "ops", "ops only", ALICE) == (200, b'{"delivered":1}')
    assert publish(authapp.port, "general", "hi bob", ALICE) == (200, b'{"delivered":1}')
    assert publish(authapp.port, "general", "hi alice", BOB) == (200, b'{"delivered":1}')
    assert bob.chunk() == message("general", "alice", "hi bob")
    assert bob.chunk() == message("general", "bob", "hi alice")
    assert alice.chunk() == message("ops", "alice", "ops only")


REFUSALS = [
    # (path, headers, status)
    ("/rooms/ops/events", {}, 401),
    ("/rooms/ops/events?token=nobody", {}, 401),
    ("/rooms/ops/events", {"Authorization": "Bearer nobody"}, 401),
    ("/rooms/ops/events", {"Authorization": "Basic YWxpY2U6eA=="}, 401),
    ("/rooms/ops/events?token=bob-token", {}, 403),
    ("/rooms/ops/events", BOB, 403),
    ("/rooms/lobby/events", ALICE, 403),
]


@pytest.mark.parametrize(("path", "headers", "status"), REFUSALS)
def test_refused_subscribe_is_a_plain_error_and_subscribes_nothing(
    authapp: Example, auth_clients: Clients, path: str, headers: dict[str, str], status: int
) -> None:
    """No valid token: 401 with ``WWW-Authenticate: Bearer``; a token without
    the room: 403. Either is a complete response (a content-length body, and
    the connection serves the next request), not a stream, and nobody was
    subscribed (the check runs before ``subscribe``)."""
    room = path.split("/")[2]
    conn = auth_clients.connect()
    conn.request("GET", path, headers)
    got, head = conn.head()
    assert got == status
    assert not head["content-type"].startswith("text/event-stream")
    conn.take(int(head["content-length"]))
    if status == 401:
        assert head["www-authenticate"] == "Bearer"
    assert stats(authapp.port, room) == {"room": room, "subscribers": 0, "channels": 0}
    conn.request("GET", f"/rooms/{room}/stats")  # the same connection is free again
    assert conn.head()[0] == 200


def test_refused_publish_delivers_nothing(authapp: Example, auth_clients: Clients) -> None:
    """Publishing needs the room too: bob's post to ops is 403 and never
    reaches ops' subscribers; alice's next post is the next frame."""
    conn = auth_clients.stream("/rooms/ops/events", ALICE)
    assert publish(authapp.port, "ops", "intruder", BOB)[0] == 403
    assert publish(authapp.port, "ops", "intruder", {})[0] == 401
    assert publish(authapp.port, "ops", "legit", ALICE)[0] == 200
    assert conn.chunk() == message("ops", "alice", "legit")


@pytest.mark.parametrize("body", [b"not json", b'{"text": ""}', b'{"text": 3}', b'{"text": "   "}'])
def test_bad_message_is_refused(authapp: Example, body: bytes) -> None:
    """A body that is not ``{"text": "..."}`` with some text: a 4xx (400 from
    Starlette's example, 422 from FastAPI's validation)."""
    status, _, _ = request(authapp.port, "POST", "/rooms/ops/messages", body, ALICE)
    assert status in (400, 422)


def test_head_returns_at_once_and_subscribes_nothing(authapp: Example, auth_clients: Clients) -> None:
    """An authorised HEAD gets the SSE headers at once and no body (the next
    request on the connection is answered), without subscribing; an
    unauthorised HEAD is refused."""
    conn = auth_clients.connect()
    start = time.monotonic()
    conn.request("HEAD", "/rooms/general/events", BOB)
    status, head = conn.head()
    assert time.monotonic() - start < 1.0
    assert status == 200 and head["content-type"] == "text/event-stream; charset=utf-8"
    conn.request("GET", "/rooms/general/stats")
    status, head = conn.head()
    assert status == 200
    assert json.loads(conn.take(int(head["content-length"])))["subscribers"] == 0

    conn.request("HEAD", "/rooms/ops/events", BOB)
    assert conn.head()[0] == 403


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("name", ["starlette_app", "fastapi_app"])
def test_signal_ends_authorised_streams_cleanly(tmp_path: Path, name: str, sig: signal.Signals) -> None:
    """SIGTERM or Ctrl-C (SIGINT) with open streams: every stream gets what
    was sent before, then the end of its chunked body, the connection closes,
    and the process exits within 3 s having logged no error: killed by the
    SIGTERM that uvicorn re-raises, or with status 0 after a Ctrl-C (the
    KeyboardInterrupt uvicorn re-raises is caught)."""
    require("uvicorn", name.removesuffix("_app"))
    with Example(name, tmp_path) as server:
        streams = Clients(server.port)
        streams.stream("/rooms/ops/events", ALICE)
        general = [
            streams.stream("/rooms/general/events?token=bob-token"),
            streams.stream("/rooms/general/events", ALICE),
        ]
        assert stats(server.port, "general")["subscribers"] == 2
        assert publish(server.port, "general", "last", BOB) == (200, b'{"delivered":2}')
        if sig == signal.SIGINT:
            server.exit_code = 0
        elapsed = server.terminate(sig)
        for conn in general:
            assert conn.chunk() == message("general", "bob", "last")
        for conn in streams.open:
            assert conn.chunk() is None  # 0\r\n\r\n: the end of the body
            assert conn.at_eof()
        assert elapsed < 3.0, f"{name}: {elapsed:.2f} s"
        streams.close_all()


# ---------------------------------------------------------------------------
# dashboard.py: channel() with an imperative sender
# ---------------------------------------------------------------------------

METRICS = {"client", "n", "uptime_s", "loop_lag_ms", "cpu_s", "clients", "tasks"}


def metrics(chunk: bytes | None) -> dict[str, Any]:
    """The JSON of one metrics event (one event per chunk)."""
    assert chunk is not None
    [event] = SseParser().feed(chunk)
    assert event.type == "metrics", event
    value: dict[str, Any] = json.loads(event.data)
    assert set(value) == METRICS
    return value


@pytest.fixture
def dashboard_clients(dashboard: Example) -> Iterator[Clients]:
    yield from clients_of(dashboard)


def test_metrics_arrive_at_the_interval_as_json(dashboard_clients: Clients) -> None:
    """One metrics event at once, then one per interval, numbered from 1,
    with the stream counted among the open clients."""
    conn = dashboard_clients.stream("/metrics")
    first = metrics(conn.chunk())
    start = time.monotonic()
    rest = [metrics(conn.chunk()) for _ in range(6)]
    elapsed = time.monotonic() - start
    assert [m["n"] for m in [first, *rest]] == list(range(1, 8))
    assert {m["client"] for m in rest} == {first["client"]}
    assert all(m["clients"] >= 1 and m["cpu_s"] > 0 and m["uptime_s"] > 0 for m in rest)
    assert [m["uptime_s"] for m in rest] == sorted(m["uptime_s"] for m in rest)
    # Six intervals, paced by the closure's schedule (not faster, not stalled).
    assert 6 * INTERVAL * 0.8 <= elapsed < 6 * INTERVAL + 1.0, elapsed


def test_each_client_has_its_own_closure(dashboard_clients: Clients) -> None:
    """Two streams: two closures, each numbering its own events from 1."""
    a = dashboard_clients.stream("/metrics")
    b = dashboard_clients.stream("/metrics")
    ma, mb = metrics(a.chunk()), metrics(b.chunk())
    assert ma["client"] != mb["client"] and ma["n"] == mb["n"] == 1
    assert metrics(b.chunk())["clients"] >= 2


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_closure_is_cancelled_when_the_client_leaves(
    dashboard: Example, dashboard_clients: Clients, reset: bool
) -> None:
    """Closing (or resetting) the socket cancels the client's closure: the
    example logs it at INFO within 1 s."""
    conn = dashboard_clients.stream("/metrics")
    client = metrics(conn.chunk())["client"]
    metrics(conn.chunk())
    conn.close("reset" if reset else "close")
    dashboard.wait_for_log(f"INFO:     dashboard: client #{client}: metrics closure cancelled", within=1.0)


def test_dashboard_head_and_page(dashboard: Example, dashboard_clients: Clients) -> None:
    """HEAD /metrics: the SSE headers at once, no closure started; GET / is
    the page, with its EventSource."""
    conn = dashboard_clients.connect()
    start = time.monotonic()
    conn.request("HEAD", "/metrics")
    status, head = conn.head()
    assert time.monotonic() - start < 1.0
    assert status == 200 and head["content-type"] == "text/event-stream; charset=utf-8"
    conn.request("GET", "/")  # the connection is free at once
    status, head = conn.head()
    assert status == 200 and head["content-type"] == "text/html; charset=utf-8"
    page = conn.take(int(head["content-length"]))
    assert b'new EventSource("/metrics")' in page and b"innerHTML" not in page

    assert request(dashboard.port, "GET", "/nope")[0] == 404
    assert request(dashboard.port, "POST", "/metrics", b"{}")[0] == 405


def sigterm_ends_streams(tmp_path: Path, name: str, path: str, frame: Callable[[bytes | None], object]) -> str:
    """Three streams of ``path`` on a new ``name`` example, then SIGTERM: each
    stream ends with the end of its chunked body (after the frames in flight,
    each checked by ``frame``), the process exits within 3 s, no error. Its stderr."""
    require("uvicorn")
    with Example(name, tmp_path, "--interval", str(INTERVAL)) as server:
        streams = Clients(server.port)
        for _ in range(3):
            frame(streams.stream(path).chunk())
        elapsed = server.terminate()
        for conn in streams.open:
            while (chunk := conn.chunk()) is not None:
                frame(chunk)
            assert conn.at_eof()
        assert elapsed < 3.0
        streams.close_all()
        return server.stderr


def test_sigterm_ends_metrics_streams_cleanly(tmp_path: Path) -> None:
    """SIGTERM: closing the broadcaster cancels every closure, and every
    stream ends with the end of its chunked body (after whatever was in
    flight); exit within 3 s, no error."""
    stderr = sigterm_ends_streams(tmp_path, "dashboard", "/metrics", metrics)
    assert stderr.count("metrics closure cancelled") == 3


# ---------------------------------------------------------------------------
# threads.py: publishing from a plain thread
# ---------------------------------------------------------------------------

def tick(chunk: bytes | None) -> dict[str, Any]:
    """The JSON of one tick event (one event per chunk), checked against its id."""
    assert chunk is not None
    [event] = SseParser().feed(chunk)
    assert event.type == "tick", event
    value: dict[str, Any] = json.loads(event.data)
    assert value["n"] == int(event.last_event_id)
    return value


@pytest.fixture
def threads_clients(threads: Example) -> Iterator[Clients]:
    yield from clients_of(threads)
    wait_until("the closed streams unsubscribed", lambda: get_json(threads.port, "/stats")["subscribers"] == 0)


def test_ticks_from_the_thread_arrive_in_order(threads: Example, threads_clients: Clients) -> None:
    """Ticks published by the worker thread arrive in order, consecutively,
    on the event loop's streams; two streams get the same frames."""
    a = threads_clients.stream("/ticks")
    b = threads_clients.stream("/ticks")
    assert get_json(threads.port, "/stats")["subscribers"] == 2
    ticks = [tick(a.chunk()) for _ in range(8)]
    first = ticks[0]["n"]
    assert [t["n"] for t in ticks] == list(range(first, first + 8))
    assert {t["thread"] for t in ticks} == {"ticker"}
    assert [t["at"] for t in ticks] == sorted(t["at"] for t in ticks)
    # b subscribed just after a, so its ticks are a's from some point on.
    got = tick(b.chunk())
    skipped = got["n"] - first
    assert 0 <= skipped < 4
    assert [got, *(tick(b.chunk()) for _ in range(7 - skipped))] == ticks[skipped:]


def test_threads_head_and_errors(threads: Example, threads_clients: Clients) -> None:
    """HEAD /ticks: the SSE headers at once, nobody subscribed."""
    conn = threads_clients.connect()
    conn.request("HEAD", "/ticks")
    status, head = conn.head()
    assert status == 200 and head["content-type"] == "text/event-stream; charset=utf-8"
    conn.request("GET", "/stats")
    status, head = conn.head()
    assert status == 200 and json.loads(conn.take(int(head["content-length"])))["subscribers"] == 0
    assert request(threads.port, "GET", "/nope")[0] == 404
    assert request(threads.port, "POST", "/ticks", b"{}")[0] == 405


def test_sigterm_stops_the_thread_and_ends_tick_streams_cleanly(tmp_path: Path) -> None:
    """SIGTERM: the streams end with the end of their chunked body (after the
    ticks in flight), the thread is stopped and joined (lifespan shutdown
    completes), the process exits within 3 s, no error."""
    assert "Application shutdown complete." in sigterm_ends_streams(tmp_path, "threads", "/ticks", tick)


# ---------------------------------------------------------------------------
# metrics.py: Broadcaster.metrics() exported to Prometheus
# ---------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics``, parsed by prometheus_client's own
    parser: ``name`` or ``name{label="value"}`` -> value."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    status, head, body = request(port, "GET", "/metrics")
    assert status == 200 and head["content-type"].startswith("text/plain"), (status, head)
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_example_exports_what_a_scripted_scenario_did(tmp_path: Path) -> None:
    """Two clients connect, one message reaches both, one leaves, then a
    burst of 10 overflows the other's 4-item buffer (6 dropped, the stream
    ends with Lagged): Prometheus reads exactly that. Then SIGTERM with a
    new stream open ends it cleanly, and the process within 3 s."""
    require("uvicorn", "prometheus_client")
    with Example("metrics", tmp_path, "--buffer", "4") as app:
        clients = Clients(app.port)
        slow, leaving = clients.stream("/events/news"), clients.stream("/events/news")
        assert scrape(app.port)["sse_streams"] == 2
        status, _, body = request(app.port, "POST", "/publish/news", b"hello", content_type="text/plain")
        assert (status, json.loads(body)) == (200, {"sent": 1, "delivered": 2})
        assert slow.chunk() == leaving.chunk() == b"data: hello\n\n"
        leaving.close()
        wait_until("the client that left is gone", lambda: scrape(app.port)["sse_streams"] == 1)
        status, _, body = request(app.port, "POST", "/publish/news?count=10", b"burst", content_type="text/plain")
        assert (status, json.loads(body)) == (200, {"sent": 10, "delivered": 10})
        assert slow.chunk() is None  # the stream lagged: its response ended cleanly
        wait_until("the lagging response ended", lambda: scrape(app.port)["sse_responses_open"] == 0)
        samples = scrape(app.port)
        # SIGTERM with a stream open: it ends cleanly, and the process at once.
        last = clients.stream("/events/news")
        assert app.terminate() < 3.0
        assert last.chunk() is None and last.at_eof()
        clients.close_all()
    ended = {how: samples[f'sse_responses_ended_total{{how="{how}"}}'] for how in ("client_gone", "lag", "error")}
    assert ended == {"client_gone": 1, "lag": 1, "error": 0}
    assert {name: samples[name] for name in ("sse_streams", "sse_channels", "sse_lingering")} == dict.fromkeys(
        ("sse_streams", "sse_channels", "sse_lingering"), 0
    )
    totals = ("sends", "deliveries", "dropped", "lag_reports", "resumes", "gaps", "bytes_written")
    assert {name: samples[f"sse_{name}_total"] for name in totals} == {
        "sends": 11,
        "deliveries": 12,
        "dropped": 6,
        "lag_reports": 1,
        "resumes": 0,
        "gaps": 0,
        "bytes_written": 2 * len(b":\n\ndata: hello\n\n"),
    }


# ---------------------------------------------------------------------------
# Every example: the URL it prints works
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "modules"),
    [
        ("chat", ("uvicorn",)),
        ("dashboard", ("uvicorn",)),
        ("fastapi_app", ("uvicorn", "fastapi")),
        ("starlette_app", ("uvicorn", "starlette")),
        ("threads", ("uvicorn",)),
        ("metrics", ("uvicorn", "prometheus_client")),
    ],
)
def test_every_example_prints_a_url_that_answers(tmp_path: Path, name: str, modules: tuple[str, ...]) -> None:
    """The URL an example prints when it starts answers 200 (a page, the
    API docs, JSON, or a stream: only its head is read)."""
    require(*modules)
    with Example(name, tmp_path) as app:
        assert app.url.startswith(f"http://127.0.0.1:{app.port}/"), app.url
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
        try:
            conn.request("GET", app.url.removeprefix(f"http://127.0.0.1:{app.port}"))
            assert conn.getresponse().status == 200, app.url
        finally:
            conn.close()
        app.terminate()
