"""End-to-end tests of ``examples/chat.py``: the real process, over loopback TCP.

The demo runs as its own process (``sys.executable examples/chat.py --port 0``,
from another working directory, so its ``sys.path`` line is exercised); the
fixture reads the URL it prints to learn the port, and stops it with SIGTERM
at the end, checking that it exits promptly and logged no error. Clients are
the standard library only: raw sockets for the streams (so the tests see the
status line, the headers and every chunk of the chunked body byte for byte)
and ``urllib.request`` for the plain requests.

Message ids are the broadcaster's (``<epoch>-<n>``, the epoch random per room
lifetime): a test learns the epoch from the first message frame it reads and
then checks every frame byte for byte. So with a message's ``at``, the time the
server accepted it (Unix milliseconds): it must be a time of this test run, and
the rest of the frame is exact. The browser side of the page (loading
the history, dropping what it got twice) is tested in ``test_browser.py``.

Every socket read has a timeout, so a missing event fails a test in seconds
instead of hanging it; the only polling is of the stats endpoint, waiting for
the server to notice a client that went away or a room's history to expire.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _support
import pytest
from _support import Connection, request, serve

from broadcaster import SseParser, parse_positions

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat.py"
STARTED = int(time.time() * 1000)  # no message of these tests is older (Unix ms, as "at")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("uvicorn") is None,
    reason="the examples need uvicorn: pip install -e '.[examples]'",
)


# ---------------------------------------------------------------------------
# The demo process
# ---------------------------------------------------------------------------


class Chat(_support.Process):
    """``examples/chat.py`` running as a subprocess on a free port. After
    SIGTERM it must exit within 5 s, the way the docstring of chat.py says
    (killed by the re-raised SIGTERM)."""

    def __init__(self, cwd: Path, *args: str) -> None:
        super().__init__([sys.executable, str(CHAT), "--port", "0", *args], cwd, "chat running on")


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chat]:
    """One demo process shared by the tests that do not stop it."""
    yield from serve(Chat(tmp_path_factory.mktemp("cwd")))


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class Clients(_support.Clients):
    """Opens SSE streams and closes every one of them at the end of a test."""

    def stream(self, room: str, query: str = "", headers: dict[str, str] | None = None) -> Connection:
        """A stream of ``room``, read up to and including its first chunk."""
        conn, _ = self.open_stream(f"/rooms/{room}/events{query}", headers)
        assert conn.chunk() == b"retry: 2000\n\n"
        return conn


@pytest.fixture
def clients(chat: Chat) -> Iterator[Clients]:
    yield from _support.closing(Clients(chat.port))


def post(port: int, room: str, user: str, text: str) -> None:
    status, _, body = request(
        port, "POST", f"/rooms/{room}/messages", json.dumps({"user": user, "text": text}).encode()
    )
    assert (status, body) == (204, b"")


def stats(port: int, room: str) -> dict[str, Any]:
    status, head, body = request(port, "GET", f"/rooms/{room}/stats")
    assert status == 200 and head["content-type"] == "application/json"
    result: dict[str, Any] = json.loads(body)
    return result


# The id the broadcaster gives each message in its room: an epoch per room
# lifetime, a dash, and the message's number in that lifetime. A stream of one
# room writes it as "<room>=<id>" (the position it reached in each room).


class reload:  # noqa: N801  (read as the frame it matches: ``chunk == reload("a")``)
    """Equal to the reload frame naming ``rooms``, the rooms the page must
    load: its id names a position in each of the stream's rooms (here, the
    same rooms), which the test cannot know in advance."""

    def __init__(self, *rooms: str) -> None:
        positions = ",".join(re.escape(room) + r"=[0-9a-f]{12}-[0-9]+" for room in rooms)
        data = re.escape(json.dumps(list(rooms)).replace(" ", ""))
        self.frame = re.compile(f"event: reload\nid: {positions}\ndata: {data}\n\n".encode())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, bytes) and self.frame.fullmatch(other) is not None

    def __repr__(self) -> str:
        return f"<the reload frame {self.frame.pattern!r}>"


class Recent:
    """Equal to a time of this test run in Unix milliseconds: the ``at`` the
    server gives a message when it accepts it."""

    def __eq__(self, other: object) -> bool:
        return type(other) is int and STARTED <= other <= time.time() * 1000

    def __repr__(self) -> str:
        return f"<a time in Unix ms since {STARTED}>"


RECENT = Recent()
AT = re.compile(rb',"at":([0-9]+)\}\n')


class message:  # (lower case: read as the frame it matches, ``chunk == message(...)``)
    """Equal to the exact frame of a chat message (compact JSON, UTF-8, LF line
    endings) on a stream of ``room`` alone, ``id`` being the room's id of the
    message: byte for byte, its ``at`` being a time of this test run."""

    def __init__(self, room: str, n: int, user: str, text: str, id: str) -> None:
        self.fields = {"room": room, "n": n, "user": user, "text": text}
        self.id = f"{room}={id}"

    def frame(self, at: int) -> bytes:
        data = json.dumps({**self.fields, "at": at}, ensure_ascii=False, separators=(",", ":"))
        return f"event: message\ndata: {data}\nid: {self.id}\n\n".encode()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, bytes) or (found := AT.search(other)) is None:
            return False
        at = int(found[1])
        return at == RECENT and other == self.frame(at)

    def __repr__(self) -> str:
        return f"<the message frame {self.frame(0)!r}, with a recent time for 0>"


def stamp(frame: bytes | None) -> int:
    """The ``at`` of a message frame: when the server accepted the message."""
    assert frame is not None
    [event] = SseParser().feed(frame)
    at: int = json.loads(event.data)["at"]
    assert at == RECENT
    return at


def presence(room: str, count: int) -> bytes:
    return f'event: presence\ndata: {{"room":"{room}","count":{count}}}\n\n'.encode()


def epoch(frame: bytes | None) -> str:
    """The epoch of the id of a message frame (``<room>=<epoch>-<n>``), as a
    browser reads it."""
    assert frame is not None
    [event] = SseParser().feed(frame)
    positions = parse_positions(event.last_event_id)
    assert positions is not None, event
    [position] = positions.values()
    run, _, n = position.partition("-")
    assert re.fullmatch("[0-9a-f]{12}", run) and n.isdigit(), event
    return run


def frames(conn: Connection, n: int) -> tuple[list[bytes], list[bytes]]:
    """The next ``n`` frames of a stream, split into (messages, the others).
    A resumed stream's replayed messages and its own join's presence event
    are read concurrently by the server, so their interleaving is free; the
    events waiting together arrive in one chunk, so chunks are split into
    frames (an event's frame never holds a blank line)."""
    messages: list[bytes] = []
    others: list[bytes] = []
    pending = b""
    while len(messages) + len(others) < n:
        chunk = conn.chunk()
        assert chunk is not None
        pending += chunk
        while (end := pending.find(b"\n\n")) >= 0:
            frame, pending = pending[: end + 2], pending[end + 2 :]
            (messages if frame.startswith(b"event: message\n") else others).append(frame)
    assert pending == b"", pending
    return messages, others


def history(port: int, room: str) -> list[dict[str, Any]]:
    status, head, body = request(port, "GET", f"/rooms/{room}/history")
    assert status == 200 and head["content-type"] == "application/json"
    value: dict[str, Any] = json.loads(body)
    assert value["room"] == room
    messages: list[dict[str, Any]] = value["messages"]
    return messages


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_page_is_served(chat: Chat) -> None:
    """GET / is the one static page: HTML with the EventSource client, no
    innerHTML, nothing loaded from elsewhere."""
    status, head, body = request(chat.port, "GET", "/")
    assert status == 200
    assert head["content-type"] == "text/html; charset=utf-8"
    assert int(head["content-length"]) == len(body)
    assert b"new EventSource(" in body and b"fetch(" in body and b"textContent" in body
    assert b'addEventListener("reload"' in body and b'"/history"' in body
    assert b"innerHTML" not in body
    assert b"http://" not in body and b"https://" not in body and b"src=" not in body
    # The room field takes upper case too: the page lower-cases the name.
    assert b'pattern="[A-Za-z0-9_\\-]{1,32}"' in body and b".toLowerCase()" in body


def test_favicon_is_served(chat: Chat) -> None:
    status, head, body = request(chat.port, "GET", "/favicon.ico")
    assert (status, head["content-type"]) == (200, "image/svg+xml")
    assert body.startswith(b"<svg ") and body.endswith(b"</svg>")


def test_stream_headers_then_first_chunk_before_any_message(clients: Clients) -> None:
    """The stream's headers and its first chunk (the retry frame) arrive at
    once, before any message; then, on a connection without Last-Event-ID,
    the reload event (the page loads the history on it), then the client's
    own join."""
    conn = clients.connect()
    conn.request("GET", "/rooms/hdr/events")
    status, head = conn.head()
    assert status == 200
    assert head["content-type"] == "text/event-stream; charset=utf-8"
    assert head["cache-control"] == "no-cache"
    assert head["x-accel-buffering"] == "no"
    assert head["transfer-encoding"] == "chunked"
    assert conn.chunk() == b"retry: 2000\n\n"
    assert conn.chunk() == reload("hdr")
    assert conn.chunk() == presence("hdr", 1)


def test_head_of_a_stream_subscribes_nobody(chat: Chat, clients: Clients) -> None:
    """HEAD /rooms/x/events: the SSE headers, an empty body, no subscription
    (and no broadcast history either)."""
    conn = clients.connect()
    conn.request("HEAD", "/rooms/headonly/events")
    status, head = conn.head()
    assert status == 200 and head["content-type"] == "text/event-stream; charset=utf-8"
    assert stats(chat.port, "headonly") == {"room": "headonly", "subscribers": 0, "channels": 0, "resumable": False}


def test_message_reaches_two_streams_byte_exact(chat: Chat, clients: Clients) -> None:
    """A POSTed message arrives on both streams of the room as the same exact
    frame, with the id the broadcaster gave it (``<epoch>-1``); more messages
    arrive in order with the next numbers of the same epoch."""
    a = clients.stream("two")
    assert a.chunk() == reload("two")
    assert a.chunk() == presence("two", 1)
    b = clients.stream("two")
    assert b.chunk() == reload("two")
    assert a.chunk() == b.chunk() == presence("two", 2)

    post(chat.port, "two", "ann", "héllo\nworld ✓")
    frame = a.chunk()
    run, at = epoch(frame), stamp(frame)
    assert frame == (
        f'event: message\ndata: {{"room":"two","n":1,"user":"ann","text":"héllo\\nworld ✓","at":{at}}}\n'
        f"id: two={run}-1\n\n".encode()
    )
    assert b.chunk() == frame

    for n in range(2, 6):
        post(chat.port, "two", "bob", f"message {n}")
    expected = [message("two", n, "bob", f"message {n}", f"{run}-{n}") for n in range(2, 6)]
    for conn in (a, b):
        got = [conn.chunk() for _ in range(2, 6)]
        assert got == expected
        ats = [at, *map(stamp, got)]
        assert ats == sorted(ats)  # stamped as they were accepted


def test_rooms_are_independent(chat: Chat, clients: Clients) -> None:
    """A message to one room reaches that room's streams only; each room has
    its own epoch and numbers its messages from 1."""
    a = clients.stream("left")
    b = clients.stream("right")
    assert a.chunk() == reload("left") and b.chunk() == reload("right")
    assert a.chunk() == presence("left", 1) and b.chunk() == presence("right", 1)
    post(chat.port, "right", "ann", "to the right")
    post(chat.port, "left", "ann", "to the left")
    left, right = a.chunk(), b.chunk()
    assert epoch(left) != epoch(right)
    assert left == message("left", 1, "ann", "to the left", f"{epoch(left)}-1")
    assert right == message("right", 1, "ann", "to the right", f"{epoch(right)}-1")


def test_presence_rises_and_falls(chat: Chat, clients: Clients) -> None:
    """Every join and every leave pushes the room's subscriber count."""
    a = clients.stream("pres")
    assert a.chunk() == reload("pres") and a.chunk() == presence("pres", 1)
    b = clients.stream("pres")
    assert b.chunk() == reload("pres")
    assert a.chunk() == b.chunk() == presence("pres", 2)
    c = clients.stream("pres")
    assert c.chunk() == reload("pres")
    assert a.chunk() == b.chunk() == c.chunk() == presence("pres", 3)
    b.close()
    assert a.chunk() == c.chunk() == presence("pres", 2)
    c.close("reset")
    assert a.chunk() == presence("pres", 1)
    assert stats(chat.port, "pres")["subscribers"] == 1


def test_presence_is_neither_numbered_nor_retained(chat: Chat, clients: Clients) -> None:
    """Presence events carry no id and do not go through the broadcast
    history: after joins and leaves the first message is still number 1, and
    a client resuming after it gets no stale presence, only its own join."""
    a = clients.stream("quiet")
    assert a.chunk() == reload("quiet") and a.chunk() == presence("quiet", 1)
    for _ in range(3):
        b = clients.stream("quiet")
        assert b.chunk() == reload("quiet")
        assert a.chunk() == b.chunk() == presence("quiet", 2)
        b.close()
        assert a.chunk() == presence("quiet", 1)
    post(chat.port, "quiet", "ann", "first")
    first = a.chunk()
    run = epoch(first)
    assert first == message("quiet", 1, "ann", "first", f"{run}-1")

    c = clients.stream("quiet", headers={"Last-Event-ID": f"quiet={run}-1"})
    assert a.chunk() == c.chunk() == presence("quiet", 2)  # no reload, nothing replayed
    post(chat.port, "quiet", "ann", "second")
    assert a.chunk() == c.chunk() == message("quiet", 2, "ann", "second", f"{run}-2")


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_closed_client_is_gone_from_the_registry_within_1s(chat: Chat, clients: Clients, reset: bool) -> None:
    """Closing (or resetting) a client's socket removes its subscription and,
    being the last, the room's live channel, within 1 s; the room's broadcast
    history lingers on for a reconnection."""
    room = f"x{int(reset)}"
    conn = clients.stream(room)
    assert conn.chunk() == reload(room) and conn.chunk() == presence(room, 1)
    assert stats(chat.port, room)["subscribers"] == 1
    conn.close("reset" if reset else "close")
    deadline = time.monotonic() + 1.0
    while (current := stats(chat.port, room)) != {"room": room, "subscribers": 0, "channels": 0, "resumable": True}:
        assert time.monotonic() < deadline, f"still registered after 1 s: {current}"
        time.sleep(0.02)


def test_reconnect_with_last_event_id_resumes_exactly(chat: Chat, clients: Clients) -> None:
    """A stream resumed with Last-Event-ID gets exactly the messages after
    that id, then the live ones, and no reload. Messages sent while the room
    had no client at all are resumed too (its history lingers). The query
    parameter works when the header is absent, and the header wins over it."""
    a = clients.stream("resume")
    assert a.chunk() == reload("resume") and a.chunk() == presence("resume", 1)
    got = []
    for n in (1, 2, 3):
        post(chat.port, "resume", "ann", f"m{n}")
        got.append(a.chunk())
    run = epoch(got[0])
    ids = {n: f"{run}-{n}" for n in range(1, 8)}
    lei = {n: f"resume={id}" for n, id in ids.items()}  # the stream's id after message n
    assert got == [message("resume", n, "ann", f"m{n}", ids[n]) for n in (1, 2, 3)]
    a.close()
    deadline = time.monotonic() + 1.0
    while stats(chat.port, "resume")["subscribers"]:  # the room is empty now
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for n in (4, 5):  # missed while disconnected
        post(chat.port, "resume", "ann", f"m{n}")

    b = clients.stream("resume", headers={"Last-Event-ID": lei[3]})
    replayed, others = frames(b, 3)
    assert replayed == [message("resume", n, "ann", f"m{n}", ids[n]) for n in (4, 5)]
    assert others == [presence("resume", 1)]
    post(chat.port, "resume", "ann", "m6")
    assert b.chunk() == message("resume", 6, "ann", "m6", ids[6])

    # The query parameter, for a client that cannot set headers.
    c = clients.stream("resume", query=f"?last_event_id={lei[5]}")
    replayed, others = frames(c, 2)
    assert replayed == [message("resume", 6, "ann", "m6", ids[6])] and others == [presence("resume", 2)]
    assert b.chunk() == presence("resume", 2)

    # A browser's reconnection sends the header, which wins over the query.
    d = clients.stream("resume", query=f"?last_event_id={lei[1]}", headers={"Last-Event-ID": lei[5]})
    replayed, others = frames(d, 2)
    assert replayed == [message("resume", 6, "ann", "m6", ids[6])] and others == [presence("resume", 3)]
    assert b.chunk() == c.chunk() == presence("resume", 3)

    # An id that is not one of this room's lifetime: reload, nothing replayed.
    unknown_ids = ["not-an-id", "0", ids[3], "resume=000000000000-3", f"resume={run}-99", f"resume={run}-03"]
    for count, unknown in enumerate([*unknown_ids, f"other={run}-3"], start=4):
        e = clients.stream("resume", headers={"Last-Event-ID": unknown})
        assert e.chunk() == reload("resume"), unknown
        assert e.chunk() == presence("resume", count)
        for conn in (b, c, d):
            assert conn.chunk() == presence("resume", count)
    post(chat.port, "resume", "ann", "m7")
    assert b.chunk() == message("resume", 7, "ann", "m7", ids[7])


def test_resume_reaches_back_100_messages(chat: Chat, clients: Clients) -> None:
    """The broadcast history holds the last 100 messages: after 105, a client
    that saw message 5 resumes with 6 to 105; one that saw only 4 gets the
    reload event instead (its next message is gone)."""
    a = clients.stream("hist")
    assert a.chunk() == reload("hist") and a.chunk() == presence("hist", 1)
    for n in range(1, 106):
        post(chat.port, "hist", "ann", str(n))
    run = epoch(a.chunk())
    conn = clients.stream("hist", headers={"Last-Event-ID": f"hist={run}-5"})
    replayed, others = frames(conn, 101)
    assert replayed == [message("hist", n, "ann", str(n), f"{run}-{n}") for n in range(6, 106)]
    assert others == [presence("hist", 2)]
    old = clients.stream("hist", headers={"Last-Event-ID": f"hist={run}-4"})
    assert old.chunk() == reload("hist")
    assert old.chunk() == presence("hist", 3)


def test_history_endpoint_is_what_a_fresh_page_loads(chat: Chat, clients: Clients) -> None:
    """GET /rooms/{room}/history: the last 100 messages, oldest first, in the
    form of the message events (same ``n``, same order), including messages
    posted while nobody was in the room (which no broadcast history keeps)."""
    assert history(chat.port, "fresh") == []
    post(chat.port, "fresh", "ann", "before anyone came")
    assert stats(chat.port, "fresh")["resumable"] is False  # nobody: not retained for resuming
    first = {"room": "fresh", "n": 1, "user": "ann", "text": "before anyone came", "at": RECENT}
    assert history(chat.port, "fresh") == [first]

    # The page's order: connect, then load; a message in between is in both,
    # with the same n, which is how the page drops the second copy.
    conn = clients.stream("fresh")
    assert conn.chunk() == reload("fresh") and conn.chunk() == presence("fresh", 1)
    post(chat.port, "fresh", "bob", "while loading")
    live = conn.chunk()
    assert live == message("fresh", 2, "bob", "while loading", f"{epoch(live)}-1")
    loaded = history(chat.port, "fresh")
    assert [m["n"] for m in loaded] == [1, 2]
    assert loaded[1]["at"] == stamp(live)  # its time, as the stream gave it

    for n in range(3, 106):
        post(chat.port, "fresh", "ann", f"m{n}")
    recent = history(chat.port, "fresh")
    assert [m["n"] for m in recent] == list(range(6, 106))
    assert recent[-1] == {"room": "fresh", "n": 105, "user": "ann", "text": "m105", "at": RECENT}


def test_history_expires_after_linger(tmp_path: Path) -> None:
    """With ``--linger 0.3`` a room's broadcast history goes 0.3 s after its
    last client left: a reconnection then gets the reload event."""
    with Chat(tmp_path, "--linger", "0.3") as server:
        clients = Clients(server.port)
        a = clients.stream("brief")
        assert a.chunk() == reload("brief") and a.chunk() == presence("brief", 1)
        post(server.port, "brief", "ann", "hi")
        run = epoch(a.chunk())
        a.close()
        deadline = time.monotonic() + 3.0
        while stats(server.port, "brief")["resumable"]:
            assert time.monotonic() < deadline, "the room's history did not expire within 3 s"
            time.sleep(0.05)
        b = clients.stream("brief", headers={"Last-Event-ID": f"brief={run}-1"})
        assert b.chunk() == reload("brief")
        assert b.chunk() == presence("brief", 1)
        assert [m["text"] for m in history(server.port, "brief")] == ["hi"]  # the app's state stays
        clients.close_all()
        server.terminate()


def test_limits_ask_refused_clients_to_come_back_later(tmp_path: Path) -> None:
    """With ``--max-streams 2 --max-rooms 3``: a third stream gets a 200 that
    sets ``retry`` to 10 s and ends at once (an EventSource comes back then,
    where any other status would make it give up), a message to a fourth
    room a 503 with ``Retry-After: 10``; a stream that leaves makes room."""
    with Chat(tmp_path, "--max-streams", "2", "--max-rooms", "3") as server:
        clients = Clients(server.port)
        first = clients.stream("one")
        assert first.chunk() == reload("one")
        assert clients.stream("two").chunk() == reload("two")
        refused, head = clients.open_stream("/events?room=three")
        assert head["content-type"] == "text/event-stream; charset=utf-8"
        assert refused.chunk() == b": try again later\nretry: 10000\n\n"
        assert refused.chunk() is None
        for room in ("one", "two", "three"):
            post(server.port, room, "ann", "hi")
        status, head, body = request(server.port, "POST", "/rooms/four/messages", b'{"user": "ann", "text": "hi"}')
        assert (status, head["retry-after"], body) == (503, "10", b"try again later\n")
        first.close()
        deadline = time.monotonic() + 3.0
        while stats(server.port, "one")["subscribers"]:
            assert time.monotonic() < deadline, "the closed stream did not leave within 3 s"
            time.sleep(0.02)
        assert clients.stream("three").chunk() == reload("three")
        clients.close_all()
        server.terminate()


LONG = "x" * 33

BAD_REQUESTS = [
    # (method, path, body, status)
    ("POST", "/rooms/bad/messages", b"not json", 400),
    ("POST", "/rooms/bad/messages", b"", 400),
    ("POST", "/rooms/bad/messages", b'["ann", "hi"]', 400),
    ("POST", "/rooms/bad/messages", b'{"user": "ann"}', 400),
    ("POST", "/rooms/bad/messages", b'{"user": 1, "text": "hi"}', 400),
    ("POST", "/rooms/bad/messages", b'{"user": "   ", "text": "hi"}', 400),
    ("POST", "/rooms/bad/messages", json.dumps({"user": "u" * 33, "text": "hi"}).encode(), 400),
    ("POST", "/rooms/bad/messages", b'{"user": "ann", "text": " \\n "}', 400),
    ("POST", "/rooms/bad/messages", json.dumps({"user": "ann", "text": "t" * 2001}).encode(), 400),
    ("POST", "/rooms/bad/messages", b'{"user": "ann", "text": "\\ud800"}', 400),  # lone surrogate
    ("POST", "/rooms/bad/messages", b'{"user": "ann", "text": "\xff"}', 400),  # not UTF-8
    ("POST", "/rooms/Bad/messages", b'{"user": "ann", "text": "hi"}', 400),
    ("POST", f"/rooms/{LONG}/messages", b'{"user": "ann", "text": "hi"}', 400),
    ("GET", "/rooms/bad%2Fname/events", None, 404),
    ("POST", "/rooms/bad/messages", json.dumps({"user": "ann", "text": "x" * 17000}).encode(), 413),
    ("GET", "/nope", None, 404),
    ("GET", "/rooms", None, 404),
    ("GET", "/rooms/bad", None, 404),
    ("GET", "/rooms/bad/nope", None, 404),
    ("GET", "/rooms/bad/events/more", None, 404),
    ("GET", "/rooms/bad/history/1", None, 404),
    ("GET", "/rooms/bad/messages", None, 405),
    ("POST", "/rooms/bad/events", b"{}", 405),
    ("POST", "/rooms/bad/history", b"{}", 405),
    ("PUT", "/rooms/bad/history", b"{}", 405),
    ("DELETE", "/rooms/bad/stats", None, 405),
    ("POST", "/", b"{}", 405),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_REQUESTS)
def test_bad_request(chat: Chat, method: str, path: str, body: bytes | None, status: int) -> None:
    """Bad input gets 400, a body over 16 KiB 413, an unknown path 404 and a
    wrong method 405 (with Allow), each with a JSON error."""
    got, head, payload = request(chat.port, method, path, body)
    assert got == status
    assert head["content-type"] == "application/json" and "error" in json.loads(payload)
    if status == 405:
        assert head["allow"] in ("POST", "GET, HEAD")


def test_bad_posts_send_nothing_and_limits_are_inclusive(chat: Chat) -> None:
    """A 32-character user and a 2000-character text are accepted; the bad
    requests above stored nothing in their room."""
    post(chat.port, "bad", "u" * 32, "t" * 2000)
    assert history(chat.port, "bad") == [{"room": "bad", "n": 1, "user": "u" * 32, "text": "t" * 2000, "at": RECENT}]


def test_chunked_body_over_the_limit_is_413(chat: Chat, clients: Clients) -> None:
    """A body without Content-Length is counted as it arrives: 413 past 16 KiB."""
    conn = clients.connect()
    conn.request("POST", "/rooms/big/messages", {"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
    piece = b"x" * 4096
    conn.sock.sendall(b"".join(b"1000\r\n" + piece + b"\r\n" for _ in range(5)) + b"0\r\n\r\n")
    status, _ = conn.head()
    assert status == 413


def test_sigterm_ends_open_streams_cleanly_and_exits_within_3s(tmp_path: Path) -> None:
    """SIGTERM with open streams: every stream gets the end of its chunked
    body (``0\\r\\n\\r\\n``) and then the connection closes; the process exits
    within 3 s and logged no error."""
    with Chat(tmp_path) as server:
        streams = Clients(server.port)
        for n, room in enumerate(["general", "random", "general", "random", "general"]):
            conn = streams.stream(room)
            assert conn.chunk() == reload(room)
            assert conn.chunk() == presence(room, n // 2 + 1)
        idle = streams.connect()  # a keep-alive connection between requests
        idle.request("GET", "/rooms/general/stats")
        assert idle.head()[0] == 200

        elapsed = server.terminate()

        for conn in streams.open[:-1]:
            while (chunk := conn.chunk()) is not None:  # whatever was in flight,
                assert chunk.startswith(b"event: presence\n")  # then the end of body
            assert conn.at_eof()
        assert elapsed < 3.0
        streams.close_all()
