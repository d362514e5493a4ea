"""Unit tests of broadcaster.py: every promise of its docstrings, with exact bytes.

They alone cover every line and branch of the module. Sections follow the
module's order, each holding all the tests of one unit (examples, properties,
faults, leak checks): the harness; the module itself; the reference
event-stream parser the frames are checked against; Event; SseConfig;
Broadcaster and BroadcastStream; history and resume; keyed streams; response();
faults of response() and channel() side by side; shutdown on a signal;
channel() and Sender; replay() and last_event_id(); SseParser; AsgiClient.

Conventions: flat ``test_<unit>_<behaviour>`` functions, one property each, a
one-line docstring stating it. Async tests run under ``@async_test``, which puts
a timeout on them and fails them if they leave a task running. ASGI apps are
driven by the module's own ``AsgiClient`` wherever a client's view is what a
test checks (which events arrive, the body's bytes, what is released once the
client leaves); the tests that need exact control of the ASGI messages (body
message boundaries, first chunks, timing, faults injected into send or
receive, cancellation, logs of an exact message flow) use ``AsgiPeer``, an
in-memory server side of one request. Tests wait for what either records (with
``response.event()`` or ``peer.wait_until(...)``), never with sleeps.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import inspect
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
import warnings
import weakref
import zlib
from collections import Counter, deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    MutableMapping,
)
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, TypeVar, cast

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import broadcaster
from broadcaster import (
    AsgiClient,
    AsgiResponse,
    Broadcaster,
    BroadcastStream,
    ClientDisconnected,
    Event,
    KeyedStream,
    Lagged,
    LagPolicy,
    Sender,
    SseConfig,
    SseEvent,
    _Channel,
    _Entry,
    _FedSource,
    _RegistryLock,
    _Replay,
    _SseResponse,
    _Subscriber,
    last_event_id,
    merge,
    replay,
)

# ===========================================================================
# Harness: async tests, a fake ASGI server side, log records, the leak meter
#
# What every section below uses. Nothing here is tested for itself, except the
# leak meter (in the registry section) and the fault probe (with the faults).
# ===========================================================================

# ---------------------------------------------------------------------------
# Async tests and the fake ASGI server side
# ---------------------------------------------------------------------------

AsgiMessage = dict[str, Any]
AsyncTest = Callable[..., Coroutine[Any, Any, None]]


def async_test(timeout: float = 5.0) -> Callable[[AsyncTest], Callable[..., None]]:
    """Run an async test in a fresh loop, within ``timeout`` seconds, and fail
    it if any task it started is still running when it returns. Arguments
    (pytest parameters) are passed through."""

    def decorate(fn: AsyncTest) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            async def main() -> None:
                task = asyncio.ensure_future(fn(*args, **kwargs))
                done, _ = await asyncio.wait((task,), timeout=timeout)
                if not done:
                    task.cancel()
                    await asyncio.wait((task,))
                    raise AssertionError(f"test did not finish within {timeout} s")
                task.result()
                leftover = asyncio.all_tasks() - {asyncio.current_task()}
                assert not leftover, f"test left tasks running: {leftover}"

            asyncio.run(main())

        return run

    return decorate


class AsgiPeer:
    """The server side of one in-memory ASGI request: records what the app
    sends, feeds what it receives, and lets a test await a condition."""

    def __init__(
        self,
        method: str = "GET",
        headers: Iterable[tuple[bytes, bytes]] = (),
        query_string: bytes = b"",
    ) -> None:
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": "/events",
            "raw_path": b"/events",
            "query_string": query_string,
            "headers": list(headers),
        }
        self.sent: list[AsgiMessage] = []
        self._incoming: asyncio.Queue[AsgiMessage] = asyncio.Queue()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # Set to make send() raise (fault injection) or hang.
        self.send_error: BaseException | None = None
        self.send_hangs = False
        # Called with each message once it is recorded.
        self.on_sent: Callable[[AsgiMessage], None] | None = None

    async def receive(self) -> AsgiMessage:
        return await self._incoming.get()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self.send_error is not None:
            raise self.send_error
        if self.send_hangs:
            await asyncio.Event().wait()
        self.sent.append(dict(message))
        if self.on_sent is not None:
            self.on_sent(self.sent[-1])
        self._notify()

    def push(self, message: AsgiMessage) -> None:
        """Queue a message for the app's receive()."""
        self._incoming.put_nowait(message)

    def disconnect(self) -> None:
        self.push({"type": "http.disconnect"})

    def _notify(self) -> None:
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds after some send()."""
        if predicate():
            return
        future = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await future
        finally:
            self._waiters.remove(entry)

    async def wait_for_bodies(self, n: int) -> None:
        """Return once ``n`` body messages have been sent."""
        await self.wait_until(lambda: len(self.bodies) >= n)

    @property
    def start(self) -> AsgiMessage:
        assert self.sent and self.sent[0]["type"] == "http.response.start", f"no start message in {self.sent}"
        return self.sent[0]

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    @property
    def ended(self) -> bool:
        """True if the last message closed the body (more_body False)."""
        return (
            bool(self.sent)
            and self.sent[-1]["type"] == "http.response.body"
            and not self.sent[-1].get("more_body", False)
        )


AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]

ASGI_SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

# The first chunk (no retry configured) and the default keep-alive frame.
ASGI_EMPTY_COMMENT = b":\n\n"


def asgi_start(headers: Iterable[tuple[bytes, bytes]] = ASGI_SSE_HEADERS) -> AsgiMessage:
    """The http.response.start message an SSE response must send."""
    return {"type": "http.response.start", "status": 200, "headers": list(headers)}


def asgi_body(body: bytes, more_body: bool = True) -> AsgiMessage:
    """An http.response.body message."""
    return {"type": "http.response.body", "body": body, "more_body": more_body}


ASGI_FIRST = asgi_body(ASGI_EMPTY_COMMENT)

ASGI_FINAL = asgi_body(b"", more_body=False)

ASGI_DISCONNECT: AsgiMessage = {"type": "http.disconnect"}


def asgi_serve(
    app: AsgiApp,
    peer: AsgiPeer,
    send: Callable[[AsgiMessage], Awaitable[None]] | None = None,
    receive: Callable[[], Awaitable[AsgiMessage]] | None = None,
) -> asyncio.Task[None]:
    """Run ``app`` against ``peer`` (or the given send/receive) in a task, as a server does."""
    coro = app(peer.scope, peer.receive if receive is None else receive, peer.send if send is None else send)

    async def run() -> None:
        await coro

    return asyncio.get_running_loop().create_task(run())


async def asgi_call(app: AsgiApp, peer: AsgiPeer, scope: dict[str, Any] | None = None) -> None:
    """Await ``app`` against ``peer`` (with ``scope`` instead of the peer's, if given)."""
    await app(peer.scope if scope is None else scope, peer.receive, peer.send)


async def asgi_ended(task: asyncio.Task[None], within: float = 3.0) -> None:
    """Wait for the app's task to return (re-raising its error), at most ``within`` s."""
    done, _ = await asyncio.wait((task,), timeout=within)
    assert done, f"the response did not end within {within} s"
    task.result()


async def client_request(app: AsgiApp, method: str = "GET") -> AsgiResponse:
    """The whole response of ``app`` to one request (read to the end of its
    body), as the module's ``AsgiClient`` receives it."""
    async with AsgiClient(app) as client:
        return await client.request(method, "/events")


def asgi_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Every record at ERROR or above, from any logger (asyncio's included)."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def asgi_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The records of the ``broadcaster`` logger at exactly ``level``."""
    return [r for r in caplog.records if r.name == "broadcaster" and r.levelno == level]


def asgi_logged_stop(caplog: pytest.LogCaptureFixture, message: str) -> None:
    """The one ERROR logged is a RuntimeError saying ``message``, caused by the
    StopAsyncIteration it wraps (which must not pass for the source's end)."""
    [record] = asgi_records(caplog, logging.ERROR)
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert str(record.exc_info[1]) == message
    cause = record.exc_info[1].__cause__
    assert isinstance(cause, StopAsyncIteration), f"the error does not name what it wraps as its cause: {cause!r}"


class AsgiRecordingSource:
    """An event source that records the calls made to it. It yields ``items``
    (raising those that are exceptions), then waits forever if ``wait`` else ends."""

    def __init__(self, items: Iterable[Event | Exception] = (), *, wait: bool = False) -> None:
        self.items = list(items)
        self.wait = wait
        self.calls: list[str] = []

    def __aiter__(self) -> AsgiRecordingSource:
        return self

    async def __anext__(self) -> Event:
        self.calls.append("__anext__")
        if self.items:
            item = self.items.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        if self.wait:
            await asyncio.get_running_loop().create_future()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.calls.append("aclose")


def asgi_watched_receive(peer: AsgiPeer) -> tuple[Callable[[], Awaitable[AsgiMessage]], asyncio.Event]:
    """A receive() forwarding to ``peer``, and an event set at its first call:
    then the response is streaming (its pending receive() watches the client)."""
    called = asyncio.Event()

    async def receive() -> AsgiMessage:
        called.set()
        return await peer.receive()

    return receive, called


class AsgiStampedSend:
    """A send() that forwards to ``peer`` and records the loop time of each body."""

    def __init__(self, peer: AsgiPeer) -> None:
        self.peer = peer
        self.stamps: list[tuple[float, bytes]] = []

    async def __call__(self, message: AsgiMessage) -> None:
        await self.peer.send(message)
        if message["type"] == "http.response.body":
            self.stamps.append((asyncio.get_running_loop().time(), message["body"]))


def asgi_stalled_send(
    peer: AsgiPeer, on_cancel: Callable[[asyncio.CancelledError], None]
) -> Callable[[AsgiMessage], Awaitable[None]]:
    """A send() forwarding to ``peer`` that stalls on the body ``data: slow``
    until it is cancelled, then calls ``on_cancel`` with the cancellation:
    what it raises comes out of the send; if it returns, the send writes."""

    async def send(message: AsgiMessage) -> None:
        if message.get("body") == b"data: slow\n\n":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError as exc:
                on_cancel(exc)
        await peer.send(message)

    return send


async def asgi_pending_cancellations(
    app: AsgiApp, peer: AsgiPeer, send: Callable[[AsgiMessage], Awaitable[None]]
) -> int:
    """Await ``app`` as a server's task would, then return how many
    cancellation requests that task has pending (3.11+ counts them; 0 on 3.10)."""
    await app(peer.scope, peer.receive, send)
    task = asyncio.current_task()
    assert task is not None
    return int(getattr(task, "cancelling", lambda: 0)())


class LeakResume:
    """The state of the resume cycles: the ids of the last two items seen."""

    def __init__(self) -> None:
        self.ids: deque[str] = deque(maxlen=2)


# ---------------------------------------------------------------------------
# The leak meter: object census and traced memory
# ---------------------------------------------------------------------------

#
# Each check runs a warm-up round (so that every code path has run, caches and
# free lists have filled and dicts have grown to their working size), takes a
# census of the module's objects (and of deques, tasks, futures and
# weakref.finalize registrations) and a tracemalloc snapshot, runs the full
# workload, and compares: every count must be back exactly where it was, and
# the traced memory must not have grown by more than LEAK_BOUND.
#
# LEAK_BOUND is 64 KiB. The growth measured is 0 to 0.5 KiB for the cycles and
# about 2 KiB for the responses on Python 3.13, up to 16 KiB on 3.10, the same
# after 10 or 100 times more cycles (tests/soak.py): caches and free lists that
# are bounded whatever the count (the deque block free list, 16 blocks of
# 528 B; the abc caches; history ids a digit longer). The bound is four times
# the worst of that. Every Python object takes at least 16 bytes (32 or more
# for anything useful: an int, a tuple, a bytes), so over 100,000 cycles a
# leak of one object every 25 cycles already exceeds it (and a leak of one
# object per cycle, the usual bug, 25 to 50 times over); over 5,000 cycles of
# one variant, or 5,000 responses, so does a leak of one object per cycle.
# test_leak_meter_catches_a_small_leak checks that the meter sees such a leak;
# the census catches any leaked stream, subscriber, queue or task at once.
LEAK_BOUND = 64 * 1024


def leak_divisor() -> int:
    """1, or 10 under a tracer (coverage, a debugger): tracing makes each cycle
    several times slower and the checks then only need to run, not to prove
    anything (tests/test_quality.py runs this file under coverage for
    coverage's sake; the normal run of the suite does the full counts)."""
    if sys.gettrace() is not None:
        return 10
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: coverage may use it instead
    return 10 if monitoring is not None and monitoring.get_tool(monitoring.COVERAGE_ID) is not None else 1


LEAK_TYPES: dict[type[Any], str] = {
    kind: kind.__name__
    for kind in (
        BroadcastStream,
        _Subscriber,
        _Channel,
        _Entry,
        _Replay,
        _SseResponse,
        _FedSource,
        _RegistryLock,
        Sender,
        deque,
        asyncio.Task,
        asyncio.Future,
        weakref.finalize,
    )
}

LEAK_FILTERS = (
    tracemalloc.Filter(False, tracemalloc.__file__),  # the snapshots themselves
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<unknown>"),
    # The filters' own pattern cache (fnmatch, and the re module: re/ since
    # Python 3.11, sre_*.py before).
    tracemalloc.Filter(False, "*/fnmatch.py"),
    tracemalloc.Filter(False, "*/re/*"),
    tracemalloc.Filter(False, "*/sre_*.py"),
    # asyncio's registry of all tasks is a WeakSet: its hash table is sized by
    # the most tasks alive at once (finished tasks in reference cycles stay in
    # it until a collection), a high-water mark of concurrency, not of the
    # number of responses. A task that leaks is caught by the census instead.
    tracemalloc.Filter(False, "*/_weakrefset.py"),
)


def leak_census() -> Counter[str]:
    """How many objects of each of LEAK_TYPES are alive (after a collection),
    and how many weakref.finalize registrations are pending."""
    gc.collect()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = LEAK_TYPES.get(type(obj))
        if name is not None:
            counts[name] += 1
    counts["finalize registrations"] = len(vars(weakref.finalize)["_registry"])
    return counts


def leak_delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """The counts that changed, by how much."""
    return {name: after[name] - before[name] for name in before | after if after[name] != before[name]}


def leak_snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(LEAK_FILTERS)


@contextmanager
def leak_tracing() -> Iterator[None]:
    """tracemalloc on (left on if it already was)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


async def leak_measure(
    workload: Callable[[int], Coroutine[Any, Any, None]], warmup: int, full: int
) -> tuple[dict[str, int], int, list[str]]:
    """Run ``workload(warmup)``, mark, run ``workload(full)``: the census
    changes, the traced memory growth in bytes, and its top lines."""
    began = time.process_time()
    with leak_tracing():
        await workload(warmup)
        # One loop iteration first: the handle that resumed this task may hold
        # the last future or task it awaited until the loop drops it.
        await asyncio.sleep(0)
        before = leak_census()
        first = leak_snapshot()
        await workload(full)
        await asyncio.sleep(0)
        second = leak_snapshot()
        after = leak_census()
    stats = second.compare_to(first, "lineno")
    growth = sum(stat.size_diff for stat in stats)
    cpu = f"CPU time {time.process_time() - began:.2f} s"
    return leak_delta(before, after), growth, [cpu, *(str(stat) for stat in stats[:8])]


def leak_report(what: str, delta: dict[str, int], growth: int, top: list[str]) -> None:
    print(f"\n{what}: census change {delta or 'none'}; traced memory growth {growth} B (bound {LEAK_BOUND} B)")
    print("\n".join(top))
    assert delta == {}, f"{what} left objects behind: {delta}"
    top_lines = "\n".join(top)
    assert growth <= LEAK_BOUND, f"{what}: traced memory grew by {growth} B > {LEAK_BOUND} B:\n{top_lines}"


# ---------------------------------------------------------------------------
# Hypothesis budgets
#
# The default settings keep the property tests under ~6 s on two cores. For a
# long run, HYPOTHESIS_PROFILE=soak multiplies every example budget by 50 (and
# the state machines' step count by 2), e.g.
# ``HYPOTHESIS_PROFILE=soak python -m pytest -q -k property``.
# ---------------------------------------------------------------------------

# HYPOTHESIS_PROFILE=soak: 50 times the examples, twice the state-machine steps.
_PROFILES: dict[str, tuple[int, int]] = {"default": (1, 1), "soak": (50, 2)}

_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")

if _PROFILE not in _PROFILES:
    raise RuntimeError(f"HYPOTHESIS_PROFILE must be one of {sorted(_PROFILES)}, got {_PROFILE!r}")

_EXAMPLES_SCALE, _STEPS_SCALE = _PROFILES[_PROFILE]

# Typed here: older hypothesis releases (the newest that supports Python 3.10
# among them) ship run_state_machine_as_test without annotations.
_run_machine = cast(Callable[..., None], run_state_machine_as_test)


def _budget(examples: int, steps: int = 50) -> settings:
    """``examples`` examples (``steps`` steps each for a state machine), no
    deadline, no example database. (Under CI=true hypothesis also derandomizes:
    every run then tries the same examples.)"""
    return settings(
        max_examples=examples * _EXAMPLES_SCALE,
        stateful_step_count=steps * _STEPS_SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# ===========================================================================
# The module itself
# ===========================================================================


def test_module_imports_only_the_standard_library() -> None:
    """broadcaster.py imports nothing outside sys.stdlib_module_names, anywhere in the file."""
    tree = ast.parse(Path(broadcaster.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, "the import scan found nothing: it is broken"
    outside = sorted(name for name in imported if name not in sys.stdlib_module_names and name != "__future__")
    assert outside == [], f"broadcaster.py imports non-stdlib modules: {outside}"


def test_module_all_is_the_public_api() -> None:
    """__all__ lists exactly the fixed public names, each defined."""
    assert broadcaster.__all__ == [
        "Broadcaster",
        "BroadcastStream",
        "KeyedStream",
        "Event",
        "LagPolicy",
        "Lagged",
        "Sender",
        "SseConfig",
        "ClientDisconnected",
        "Metrics",
        "LimitReached",
        "StreamLimit",
        "KeyLimit",
        "last_event_id",
        "SseParser",
        "SseEvent",
        "AsgiClient",
        "AsgiResponse",
        "merge",
        "parse_positions",
        "format_positions",
        "replay",
    ]
    for name in broadcaster.__all__:
        assert hasattr(broadcaster, name), name


# ===========================================================================
# The reference event-stream parser
#
# A WHATWG HTML event-stream parser written for these tests, independent of
# broadcaster.py (the module is never checked against itself). Every frame the
# module writes is checked twice: by exact bytes, and by what this parser, a
# conformant client, makes of it. The parser is checked here against the HTML
# Standard's examples and the web-platform-tests eventsource/format-* streams.
# ===========================================================================

# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


class SseMessage(NamedTuple):
    """One dispatched ``MessageEvent``, as a browser's ``EventSource`` sees it."""

    type: str
    data: str
    last_event_id: str


@dataclasses.dataclass
class SseParse:
    """What a client made of a whole stream."""

    events: list[SseMessage]
    # The EventSource's "last event ID string" at the end (sent on reconnect).
    last_event_id: str
    # The reconnection time the stream set, or None if it set none.
    retry: int | None


_SSE_EOL = re.compile(r"\r\n|\r|\n")

_SSE_DIGITS = re.compile(r"[0-9]+")


def parse_event_stream(stream: bytes) -> SseParse:
    """Interpret ``stream`` as the HTML Standard, §9.2.6 "Interpreting an event
    stream" (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation),
    prescribes for a web browser.

    UTF-8 decode with replacement, one leading BOM removed (the "UTF-8 decode"
    algorithm); lines end at CRLF, lone CR or lone LF, and a final line without
    a line end is discarded with any pending event ("any pending data must be
    discarded"); a line starting with ``:`` is a comment; otherwise the field
    name is what precedes the first ``:`` (the whole line if none) and the value
    what follows it, less one leading space. Fields: ``data`` appends value + LF
    to the data buffer; ``event`` sets the event type buffer; ``id`` sets the
    last event ID buffer unless the value contains NUL; ``retry`` sets the
    reconnection time if the value is ASCII digits (an empty value is ignored,
    as browsers do); others are ignored. A blank line dispatches: the last event
    ID string becomes the buffer (which persists), an empty data buffer
    dispatches nothing, else one trailing LF is removed and an event of the
    buffered type (``message`` when empty) is fired; data and type buffers reset.
    """
    text = stream.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _SSE_EOL.split(text)[:-1]  # the last piece has no line end
    events: list[SseMessage] = []
    data, event_type, id_buffer, last_id = "", "", "", ""
    retry: int | None = None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(SseMessage(event_type or "message", data, last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\x00" not in value:
            id_buffer = value
        elif name == "retry" and _SSE_DIGITS.fullmatch(value):
            retry = int(value)
    return SseParse(events, last_id, retry)


def _datas(stream: bytes) -> list[str]:
    return [event.data for event in parse_event_stream(stream).events]


# ---------------------------------------------------------------------------
# The HTML Standard's rules and examples
# ---------------------------------------------------------------------------


def test_sse_parser_spec_example_joins_data_lines_with_lf() -> None:
    """HTML Standard example: three data lines make one event "YHOO\\n+2\\n10"."""
    parsed = parse_event_stream(b"data: YHOO\ndata: +2\ndata: 10\n\n")
    assert parsed.events == [SseMessage("message", "YHOO\n+2\n10", "")], f"got {parsed.events}"


def test_sse_parser_spec_example_ids_and_unterminated_event() -> None:
    """HTML Standard example: id sets lastEventId, a bare ``id`` resets it, an event without a blank line is dropped."""
    stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n"
    parsed = parse_event_stream(stream)
    assert parsed.events == [
        SseMessage("message", "first event", "1"),
        SseMessage("message", "second event", ""),
    ], f"got {parsed.events}"


def test_sse_parser_spec_example_bare_data_lines() -> None:
    """HTML Standard example: ``data`` alone is an empty value; two make "\\n"; an unterminated one is dropped."""
    assert _datas(b"data\n\ndata\ndata\n\ndata:") == ["", "\n"]


def test_sse_parser_spec_example_removes_one_leading_space() -> None:
    """HTML Standard example: ``data:test`` and ``data: test`` are the same event."""
    assert _datas(b"data:test\n\ndata: test\n\n") == ["test", "test"]


def test_sse_parser_wpt_field_parsing() -> None:
    """WPT format-field-parsing: field names are exact and case-sensitive; only ``data`` lines count."""
    stream = (
        b"data:\x00\ndata:  2\rData:1\ndata\x00:2\ndata:1\r\x00data:4\nda-ta:3\r"
        b"data_5\ndata:3\rdata:\r\n data:32\ndata:4\n\n"
    )
    assert _datas(stream) == ["\x00\n 2\n1\n3\n\n4"]


def test_sse_parser_wpt_comments() -> None:
    """WPT format-comments: comment lines (holding NUL, CR-ended, long) never reach the data."""
    long = b"x" * 2048
    stream = b"data:1\r:\x00\n:\r\ndata:2\n:" + long + b"\rdata:3\n:data:fail\r:" + long + b"\ndata:4\n\n"
    assert _datas(stream) == ["1\n2\n3\n4"]


def test_sse_parser_wpt_leading_space_only_one_space_removed() -> None:
    """WPT format-leading-space: one space is removed, a tab is kept."""
    assert _datas(b"data:\ttest\rdata: \ndata:test\n\n") == ["\ttest\n\ntest"]


def test_sse_parser_wpt_newlines_crlf_lf_cr_mixed() -> None:
    """WPT format-newlines: CRLF, LF and CR end lines alike, even mixed in one stream."""
    assert _datas(b"data:test\r\ndata\ndata:test\r\n\r") == ["test\n\ntest"]


def test_sse_parser_wpt_bom_only_at_stream_start() -> None:
    """WPT format-bom: a BOM is stripped at the start only; a later one spoils its line's field name."""
    assert _datas(b"\xef\xbb\xbfdata:1\n\n\xef\xbb\xbfdata:2\n\ndata:3\n\n") == ["1", "3"]


def test_sse_parser_wpt_only_one_bom_stripped() -> None:
    """WPT format-bom-2: of two leading BOMs, the second spoils the first line."""
    assert _datas(b"\xef\xbb\xbf\xef\xbb\xbfdata:1\n\ndata:2\n\ndata:3\n\n") == ["2", "3"]


def test_sse_parser_wpt_null_character_in_data() -> None:
    """WPT format-null-character: NUL is kept in data, and extra blank lines dispatch nothing."""
    assert _datas(b"data:\x00\n\n\n\n") == ["\x00"]


def test_sse_parser_wpt_unknown_fields_ignored() -> None:
    """WPT format-field-unknown: unknown fields, leading-space names and comments are ignored."""
    stream = b"data:test\n data\ndata\nfoobar:xxx\njustsometext\n:thisisacommentyay\ndata:test\n\n"
    assert _datas(stream) == ["test\n\ntest"]


def test_sse_parser_event_type_and_its_reset() -> None:
    """WPT format-field-event(-empty): ``event`` sets the type for one event; an empty one means "message"."""
    parsed = parse_event_stream(b"event:test\ndata:x\n\ndata:y\n\nevent: \ndata:z\n\n")
    assert [event.type for event in parsed.events] == ["test", "message", "message"], f"got {parsed.events}"


def test_sse_parser_last_event_id_persists_until_reset() -> None:
    """WPT format-field-id(-2): the last event id carries over to later events until an empty id resets it."""
    parsed = parse_event_stream(b"id:1\ndata:a\n\ndata:b\n\nid\ndata:c\n\n")
    assert [event.last_event_id for event in parsed.events] == ["1", "1", ""], f"got {parsed.events}"


def test_sse_parser_id_with_nul_ignored() -> None:
    """WPT format-field-id-null: an id containing NUL is ignored, the previous one stays."""
    parsed = parse_event_stream(b"id:1\ndata:a\n\nid:2\x003\ndata:b\n\n")
    assert [event.last_event_id for event in parsed.events] == ["1", "1"], f"got {parsed.events}"


def test_sse_parser_id_without_data_sets_last_event_id_only() -> None:
    """A block with an id and no data fires nothing but sets the last event id string."""
    parsed = parse_event_stream(b"id:7\n\n")
    assert (parsed.events, parsed.last_event_id) == ([], "7"), f"got {parsed}"


def test_sse_parser_unterminated_block_is_discarded() -> None:
    """At end of stream a block without its blank line is dropped, id included."""
    parsed = parse_event_stream(b"data:1\n\nid:5\ndata:2\n")
    assert parsed == SseParse([SseMessage("message", "1", "")], "", None), f"got {parsed}"


def test_sse_parser_wpt_retry_digits() -> None:
    """WPT format-field-retry: ASCII digits set the reconnection time, leading zeros allowed."""
    assert parse_event_stream(b"retry:03000\ndata:x\n\n").retry == 3000


@pytest.mark.parametrize("bogus", [b"1000x", b"", b"  1", b"-1", b"1.5", b"1e3", "\u0663".encode()])
def test_sse_parser_wpt_retry_bogus_ignored(bogus: bytes) -> None:
    """WPT format-field-retry-bogus/-empty: a retry that is not only ASCII
    digits is ignored, and the event still fires."""
    parsed = parse_event_stream(b"retry:3000\nretry:" + bogus + b"\ndata:x\n\n")
    assert parsed == SseParse([SseMessage("message", "x", "")], "", 3000), f"got {parsed}"


def test_sse_parser_wpt_utf8_and_replacement() -> None:
    """WPT format-utf-8: UTF-8 is decoded; invalid bytes become U+FFFD."""
    assert _datas("data:ok€\n\n".encode() + b"data:\xff\xfeok\n\n") == ["ok€", "\ufffd\ufffdok"]


# ---------------------------------------------------------------------------
# The web-platform-tests eventsource/format-* streams, byte for byte
# ---------------------------------------------------------------------------


#
# Each case is what a browser receives in the WPT test, rebuilt from the test
# and its server script, and what the test asserts about the events:
#
# * ``resources/message.py`` serves ``message + b"\n\n" + b"\n"``, or
#   ``message + b"\n"`` with ``newline=none``;
# * ``resources/last-event-id.py`` serves ``data: <Last-Event-ID>\n\n`` when the
#   request carries one, else ``id: <idvalue>\nretry: 200\ndata: hello\n\n``
#   (idvalue ``…`` unless given);
# * the tests that reconnect (``format-field-id``, ``-id-2``, ``-id-null``,
#   ``-data-before-final-empty-line``) are run as the browser runs them: one
#   parse per connection, a fresh parser each time, the last event ID string
#   carried over (and sent to the server as Last-Event-ID). The carried string
#   is given to the next parse as a leading ``id: <string>\n\n`` block, which
#   dispatches nothing and leaves the parser exactly in that state.
#
# format-mime-trailing-semicolon (and the other format-mime-* tests) check the
# Content-Type check of the client, not the parser: not applicable here.
def _wpt_message_py(message: str, *, newline: bool = True) -> Callable[[str], bytes]:
    """The server of ``resources/message.py?message=...`` (it ignores Last-Event-ID)."""
    body = message.encode() + (b"\n\n" if newline else b"") + b"\n"
    return lambda _last_event_id: body


def _wpt_last_event_id_py(idvalue: str = "\u2026") -> Callable[[str], bytes]:
    """The server of ``resources/last-event-id.py?idvalue=...``: it echoes the
    request's Last-Event-ID as data, or sends an event with id ``idvalue``."""

    def serve(last_event_id: str) -> bytes:
        if last_event_id:
            return b"data: " + last_event_id.encode() + b"\n\n"
        return b"id: " + idvalue.encode() + b"\nretry: 200\ndata: hello\n\n"

    return serve


class _WptCase(NamedTuple):
    name: str
    server: Callable[[str], bytes]
    connections: int
    events: list[SseMessage]
    retry: int | None


def _browser_session(server: Callable[[str], bytes], connections: int) -> tuple[list[SseMessage], int | None]:
    """The events a browser dispatches over ``connections`` connections to
    ``server``, and the reconnection time it ends with."""
    events: list[SseMessage] = []
    last_event_id, retry = "", None
    for _ in range(connections):
        carried = b"id: " + last_event_id.encode() + b"\n\n" if last_event_id else b""
        parsed = parse_event_stream(carried + server(last_event_id))
        events += parsed.events
        last_event_id = parsed.last_event_id
        retry = parsed.retry if parsed.retry is not None else retry
    return events, retry


def _messages(*datas: str) -> list[SseMessage]:
    return [SseMessage("message", data, "") for data in datas]


_WPT_LONG = "x" * 2048

_WPT_CASES = [
    _WptCase(
        "format-field-parsing",
        _wpt_message_py(
            "data:\0\ndata:  2\rData:1\ndata\0:2\ndata:1\r\0data:4\nda-ta:3\r"
            "data_5\ndata:3\rdata:\r\n data:32\ndata:4\n",
            newline=False,
        ),
        1,
        _messages("\0\n 2\n1\n3\n\n4"),
        None,
    ),
    _WptCase(
        "format-comments",
        _wpt_message_py(
            f"data:1\r:\0\n:\r\ndata:2\n:{_WPT_LONG}\rdata:3\n:data:fail\r:{_WPT_LONG}\ndata:4\n", newline=False
        ),
        1,
        _messages("1\n2\n3\n4"),
        None,
    ),
    _WptCase(
        "format-leading-space", _wpt_message_py("data:\ttest\rdata: \ndata:test"), 1, _messages("\ttest\n\ntest"), None
    ),
    _WptCase("format-bom", _wpt_message_py("\ufeffdata:1\n\n\ufeffdata:2\n\ndata:3"), 1, _messages("1", "3"), None),
    _WptCase("format-bom-2", _wpt_message_py("\ufeff\ufeffdata:1\n\ndata:2\n\ndata:3"), 1, _messages("2", "3"), None),
    _WptCase(
        "format-newlines",
        _wpt_message_py("data:test\r\ndata\ndata:test\r\n\r", newline=False),
        1,
        _messages("test\n\ntest"),
        None,
    ),
    _WptCase("format-null-character", _wpt_message_py("data:\0\n\n"), 1, _messages("\0"), None),
    _WptCase(
        "format-field-id",
        _wpt_last_event_id_py(),
        2,
        [SseMessage("message", "hello", "\u2026"), SseMessage("message", "\u2026", "\u2026")],
        200,
    ),
    _WptCase(
        "format-field-id-2",
        _wpt_last_event_id_py(),
        3,
        [
            SseMessage("message", "hello", "\u2026"),
            SseMessage("message", "\u2026", "\u2026"),
            SseMessage("message", "\u2026", "\u2026"),
        ],
        200,
    ),
    # An id holding NUL is ignored: lastEventId stays "", so the reconnection
    # sends no Last-Event-ID and gets "hello" again.
    _WptCase("format-field-id-null", _wpt_last_event_id_py("\0\0"), 2, _messages("hello", "hello"), 200),
    _WptCase(
        "format-field-data", _wpt_message_py("data:\n\ndata\ndata\n\ndata:test"), 1, _messages("", "\n", "test"), None
    ),
    _WptCase(
        "format-field-event",
        _wpt_message_py("event:test\ndata:x\n\ndata:x"),
        1,
        [SseMessage("test", "x", ""), SseMessage("message", "x", "")],
        None,
    ),
    _WptCase("format-field-event-empty", _wpt_message_py("event: \ndata:data"), 1, _messages("data"), None),
    _WptCase("format-field-retry", _wpt_message_py("retry:03000\ndata:x"), 1, _messages("x"), 3000),
    _WptCase("format-field-retry-bogus", _wpt_message_py("retry:3000\nretry:1000x\ndata:x"), 1, _messages("x"), 3000),
    _WptCase("format-field-retry-empty", _wpt_message_py("retry\ndata:test"), 1, _messages("test"), None),
    _WptCase(
        "format-field-unknown",
        _wpt_message_py("data:test\n data\ndata\nfoobar:xxx\njustsometext\n:thisisacommentyay\ndata:test"),
        1,
        _messages("test\n\ntest"),
        None,
    ),
    # The second connection's first event is again "test1", with an empty
    # lastEventId: the unterminated block (and its id) was discarded at EOF.
    _WptCase(
        "format-data-before-final-empty-line",
        _wpt_message_py("retry:1000\ndata:test1\n\nid:test\ndata:test2", newline=False),
        2,
        _messages("test1", "test1"),
        1000,
    ),
    # Served with ``charset=windows-1252``: the stream is UTF-8 regardless.
    _WptCase("format-utf-8", _wpt_message_py("data:ok\u2026"), 1, _messages("ok\u2026"), None),
]


@pytest.mark.parametrize("case", _WPT_CASES, ids=[case.name for case in _WPT_CASES])
def test_sse_parser_wpt_format_stream_exact(case: _WptCase) -> None:
    """The exact bytes of each WPT eventsource/format-* test give the events (type, data, lastEventId)
    and the retry it asserts."""
    events, retry = _browser_session(case.server, case.connections)
    assert (events, retry) == (case.events, case.retry), f"{case.name}: got {events}, retry {retry}"


# ===========================================================================
# Event: validating and encoding one frame
# ===========================================================================

# ---------------------------------------------------------------------------
# Exact frames
# ---------------------------------------------------------------------------


def test_event_data_only_frame() -> None:
    """Data alone is one ``data:`` line and a blank line."""
    assert Event("hello").encode() == b"data: hello\n\n"


@pytest.mark.parametrize(
    ("data", "frame"),
    [
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb\rc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\r\r\nb", b"data: a\ndata: \ndata: b\n\n"),
    ],
)
def test_event_data_split_on_crlf_cr_and_lf(data: str, frame: bytes) -> None:
    """Data is split on CRLF (one break), lone CR and lone LF, one ``data:`` line each."""
    assert Event(data).encode() == frame


@pytest.mark.parametrize(
    ("data", "frame"),
    [
        ("a\n", b"data: a\ndata: \n\n"),
        ("a\r\n\r\n", b"data: a\ndata: \ndata: \n\n"),
        ("\r", b"data: \ndata: \n\n"),
    ],
)
def test_event_data_trailing_line_breaks_write_empty_data_lines(data: str, frame: bytes) -> None:
    """Each trailing line break writes one more, empty, ``data:`` line."""
    assert Event(data).encode() == frame


def test_event_empty_data_writes_empty_data_line() -> None:
    """``data=""`` writes ``data: `` so the event still fires."""
    assert Event("").encode() == b"data: \n\n"


def test_event_data_keeps_leading_spaces() -> None:
    """Leading spaces survive: the separator space comes first."""
    assert Event("  x").encode() == b"data:   x\n\n"


def test_event_data_keeps_nul() -> None:
    """NUL in data is written as is (browsers keep it)."""
    assert Event("a\x00b").encode() == b"data: a\x00b\n\n"


def test_event_data_unicode_and_other_separators_do_not_split() -> None:
    """Non-ASCII is UTF-8, and U+2028, U+2029, NEL, VT, FF, FS (str.splitlines breaks) stay in one line."""
    data = "é😀\u2028\u2029\x85\x0b\x0c\x1cend"
    assert Event(data).encode() == ("data: " + data + "\n\n").encode("utf-8")


def test_event_name_writes_event_line() -> None:
    """``event`` writes an ``event:`` line before the data."""
    assert Event("x", event="update").encode() == b"event: update\ndata: x\n\n"


def test_event_empty_name_writes_no_event_line() -> None:
    """``event=""`` writes no ``event:`` line."""
    assert Event("x", event="").encode() == b"data: x\n\n"


def test_event_id_writes_id_line() -> None:
    """``id`` writes an ``id:`` line before the data."""
    assert Event("x", id="42").encode() == b"id: 42\ndata: x\n\n"


def test_event_empty_id_writes_empty_id_line() -> None:
    """``id=""`` is legal and writes ``id: `` (it resets the client's last id)."""
    assert Event(id="").encode() == b"id: \n\n"


@pytest.mark.parametrize(("retry", "frame"), [(0, b"retry: 0\n\n"), (2500, b"retry: 2500\n\n")])
def test_event_retry_writes_retry_line(retry: int, frame: bytes) -> None:
    """``retry`` writes ``retry: N`` in decimal, 0 included."""
    assert Event(retry=retry).encode() == frame


def test_event_comment_single_line() -> None:
    """A comment is written as ``: `` + text; alone it is a valid frame."""
    assert Event(comment="hi").encode() == b": hi\n\n"


def test_event_comment_multi_line() -> None:
    """A multi-line comment writes one ``: `` line per line (CRLF, CR, LF)."""
    assert Event(comment="a\nb\r\nc\rd").encode() == b": a\n: b\n: c\n: d\n\n"


def test_event_empty_comment_writes_colon_space() -> None:
    """``comment=""`` writes ``: ``."""
    assert Event(comment="").encode() == b": \n\n"


def test_event_comment_only_dispatches_nothing() -> None:
    """A comment-only frame fires no event on the client and changes no state."""
    assert parse_event_stream(Event(comment="keep\nalive").encode()) == SseParse([], "", None)


def test_event_all_fields_in_documented_order() -> None:
    """The order is comment, event, id, retry, data."""
    event = Event("d1\nd2", event="e", id="7", retry=10, comment="c1\nc2")
    assert event.encode() == b": c1\n: c2\nevent: e\nid: 7\nretry: 10\ndata: d1\ndata: d2\n\n"


def test_event_encode_returns_the_same_bytes_object() -> None:
    """encode() returns the frame computed at construction, not a new one per call."""
    event = Event("x", id="1")
    first = event.encode()
    assert type(first) is bytes, f"encode() returned {type(first).__name__}"
    assert event.encode() is first, "encode() built a new bytes object on the second call"


# ---------------------------------------------------------------------------
# Round trip through the reference parser
# ---------------------------------------------------------------------------

_ROUND_TRIP_EVENTS = [
    Event("hello"),
    Event(""),
    Event("a\r\nb\rc\nd"),
    Event("a\n\rb"),
    Event("trailing\n"),
    Event("\n\n"),
    Event("\r"),
    Event("  leading spaces"),
    Event(" "),
    Event("a\x00b"),
    Event("é 😀 \u2028 \u2029 \x85 \x0b \x0c"),
    Event("\ufeffbom inside"),
    Event(": not a comment"),
    Event("data: nested\nid: 9"),
    Event("x", event="update"),
    Event("x", event=""),
    Event("x", event=" spaced "),
    Event("x", event="a:b"),
    Event("x", event="é😀"),
    Event("x", id="42"),
    Event("x", id=""),
    Event("x", id=" a: b é"),
    Event("x", retry=0),
    Event("x", retry=2500),
    Event("x", comment="c\nd"),
    Event("d1\r\nd2", event="e", id="7", retry=10, comment="c"),
    Event.json({"k": ["é", 1.5, None], "s": "a\nb"}),
]


@pytest.mark.parametrize("event", _ROUND_TRIP_EVENTS, ids=repr)
def test_event_round_trips_through_whatwg_parser(event: Event) -> None:
    """A conformant client recovers the data (breaks as LF), type (or "message"), last id and retry."""
    assert event.data is not None
    parsed = parse_event_stream(event.encode())
    expected = SseMessage(event.event or "message", re.sub(r"\r\n?", "\n", event.data), event.id or "")
    assert parsed.events == [expected], f"{event!r} parsed as {parsed.events}"
    assert parsed.retry == event.retry, f"{event!r} set retry {parsed.retry}"


@pytest.mark.parametrize(
    ("event", "parsed"),
    [
        (Event(id="9"), SseParse([], "9", None)),
        (Event(id=" x"), SseParse([], " x", None)),
        (Event(retry=5), SseParse([], "", 5)),
        (Event(event="ignored"), SseParse([], "", None)),
        (Event(comment="c"), SseParse([], "", None)),
    ],
    ids=repr,
)
def test_event_without_data_dispatches_nothing_but_sets_state(event: Event, parsed: SseParse) -> None:
    """A data-less event fires nothing; its id and retry still reach the client."""
    assert parse_event_stream(event.encode()) == parsed


def test_event_stream_of_frames_parses_to_the_events() -> None:
    """A whole body (first chunk, events, keep-alive, an id reset) parses to the events with their last ids."""
    config = SseConfig(retry=2500, keep_alive_comment="ping")
    body = b"".join(
        [
            config._first_chunk,
            Event("a", id="1").encode(),
            config._keep_alive_frame,
            Event("b", event="tick").encode(),
            Event(id="").encode(),
            Event("c\r\nd").encode(),
        ]
    )
    assert parse_event_stream(body) == SseParse(
        [SseMessage("message", "a", "1"), SseMessage("tick", "b", "1"), SseMessage("message", "c\nd", "")],
        "",
        2500,
    )


# ---------------------------------------------------------------------------
# Bad input, immutability, value semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["event", "id"])
@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nb", "a\x00b", "end\n"])
def test_event_one_line_field_rejects_cr_lf_nul(field: str, value: Any) -> None:
    """``event`` and ``id`` with CR, LF or NUL raise ValueError naming the field and value."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{field} must not contain CR, LF or NUL: {value!r}") + "$"):
        Event("x", **{field: value})


@pytest.mark.parametrize(("retry", "kind"), [(True, "bool"), (False, "bool"), (1.0, "float"), ("1", "str")])
def test_event_retry_wrong_type_is_type_error(retry: Any, kind: str) -> None:
    """``retry`` must be an int: bool, float and str raise TypeError."""
    with pytest.raises(TypeError, match=rf"^retry must be an int, not {kind}$"):
        Event("x", retry=retry)


def test_event_negative_retry_is_value_error() -> None:
    """A negative ``retry`` raises ValueError."""
    with pytest.raises(ValueError, match=r"^retry must be >= 0, got -1$"):
        Event("x", retry=-1)


@pytest.mark.parametrize("field", ["data", "comment", "event", "id"])
@pytest.mark.parametrize(("value", "kind"), [(b"x", "bytes"), (1, "int"), (["x"], "list")])
def test_event_text_field_wrong_type_is_type_error(field: str, value: Any, kind: str) -> None:
    """``data``, ``comment``, ``event`` and ``id`` must be str: anything else raises TypeError."""
    with pytest.raises(TypeError, match=rf"^{field} must be a str, not {kind}$"):
        Event(**{field: value})


@pytest.mark.parametrize("field", ["data", "comment", "event", "id"])
def test_event_lone_surrogate_is_value_error(field: str) -> None:
    """A lone surrogate in any text field raises ValueError (never a replaced or corrupt frame)."""
    with pytest.raises(ValueError, match=r"^Event contains a lone surrogate: '\\ud800'$"):
        kwargs: dict[str, Any] = {field: "a\ud800b"}
        Event(**kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"event": ""}, {"data": None, "event": "", "comment": None}], ids=repr)
def test_event_without_any_field_is_value_error(kwargs: dict[str, Any]) -> None:
    """An event that would write no field at all raises ValueError."""
    message = r"^an Event needs at least one of data, event \(non-empty\), id, retry or comment$"
    with pytest.raises(ValueError, match=message):
        Event(**kwargs)


def test_event_fields_after_data_are_keyword_only() -> None:
    """Only ``data`` is positional: ``Event("x", "e")`` is a TypeError."""
    args: Any = ("x", "e")
    with pytest.raises(TypeError, match=r"__init__\(\) takes from 1 to 2 positional arguments but 3 were given$"):
        Event(*args)


@pytest.mark.parametrize("field", ["data", "event", "id", "retry", "comment"])
def test_event_is_immutable(field: str) -> None:
    """Assigning any field raises FrozenInstanceError and leaves the frame as it was."""
    event = Event("x", event="e", id="1", retry=2, comment="c")
    with pytest.raises(dataclasses.FrozenInstanceError, match=rf"^cannot assign to field '{field}'$"):
        setattr(event, field, "y")
    assert event.encode() == b": c\nevent: e\nid: 1\nretry: 2\ndata: x\n\n", (
        "the frame changed after a refused assignment"
    )


def test_event_equal_by_fields() -> None:
    """Events with the same fields are equal; any differing field makes them unequal."""
    assert Event("x", event="e", id="1") == Event("x", event="e", id="1")
    assert Event("x") != Event("x", id="1"), "an id did not count in equality"
    assert Event("x") != Event("y"), "data did not count in equality"


def test_event_equal_events_hash_equal() -> None:
    """Equal events hash equal, so they dedupe in a set."""
    a, b = Event("x", event="e", retry=3), Event("x", event="e", retry=3)
    assert hash(a) == hash(b), "equal events hash differently"
    assert len({a, b, Event("x")}) == 2


def test_event_repr_shows_fields_not_frame() -> None:
    """repr() lists the fields and leaves out the encoded frame."""
    event = Event("x", id="1", comment="c")
    assert repr(event) == "Event(data='x', event=None, id='1', retry=None, comment='c')"


# ---------------------------------------------------------------------------
# Event.json
# ---------------------------------------------------------------------------


def test_event_json_is_compact() -> None:
    """Event.json writes compact JSON: no space after ``,`` or ``:``."""
    event = Event.json({"a": 1, "b": [1, 2]})
    assert (event.data, event.encode()) == ('{"a":1,"b":[1,2]}', b'data: {"a":1,"b":[1,2]}\n\n')


def test_event_json_writes_non_ascii_raw() -> None:
    """Event.json does not \\u-escape non-ASCII (ensure_ascii=False)."""
    assert Event.json(["é", "😀"]).encode() == 'data: ["é","😀"]\n\n'.encode()


def test_event_json_is_one_data_line() -> None:
    """Line breaks inside strings are JSON escapes, so the frame has one data line."""
    assert Event.json("a\nb\r").encode() == b'data: "a\\nb\\r"\n\n'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), [1.0, float("nan")]], ids=repr)
def test_event_json_rejects_nan_and_infinity(value: object) -> None:
    """NaN and infinities are not JSON: ValueError (allow_nan=False)."""
    with pytest.raises(ValueError, match=r"^Out of range float values are not JSON compliant"):
        Event.json(value)


def test_event_json_unserialisable_is_type_error() -> None:
    """A value json cannot serialise raises TypeError."""
    with pytest.raises(TypeError, match=r"^Object of type set is not JSON serializable$"):
        Event.json({1, 2})


def test_event_json_lone_surrogate_is_value_error() -> None:
    """A lone surrogate in a JSON string is refused like any other lone surrogate."""
    with pytest.raises(ValueError, match=r"^Event contains a lone surrogate: '\\udc80'$"):
        Event.json("\udc80")


def test_event_json_passes_event_id_retry() -> None:
    """event, id and retry are passed through to the Event."""
    assert Event.json([1], event="e", id="i", retry=3) == Event("[1]", event="e", id="i", retry=3)


def test_event_json_validates_passed_fields() -> None:
    """A bad id given to Event.json raises like Event's own validation."""
    with pytest.raises(ValueError, match=r"^id must not contain CR, LF or NUL: 'a\\nb'$"):
        Event.json(1, id="a\nb")


def test_event_json_round_trips_through_parser_and_json_loads() -> None:
    """json.loads of the data a client parses gives back the value."""
    value = {"s": "line1\nline2\r\u2028 é 😀", "n": [1, 2.5, None, True, False], "o": {}}
    (message,) = parse_event_stream(Event.json(value, event="state").encode()).events
    assert (message.type, json.loads(message.data)) == ("state", value)


# ---------------------------------------------------------------------------
# Properties: any valid event round-trips, any invalid one raises as documented
# ---------------------------------------------------------------------------

# Fragments a generic text strategy rarely produces: every line break of the
# format and their mixes, NUL, leading spaces and colons, BOMs, the Unicode
# separators that must NOT split a line, field-like text, and field lines or
# blank lines after a line break (injection attempts).
_SPECIALS = (
    "\r",
    "\n",
    "\r\n",
    "\n\r",
    "\r\r\n",
    "\x00",
    " ",
    "  ",
    "\t",
    ":",
    ": ",
    "\ufeff",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\ufffd",
    "\xe9",
    "\U0001f600",
    "data: x",
    "id: 7",
    "event: e",
    "retry: 1",
    # Leading spaces at the start of a line (a client drops exactly one).
    " x",
    "\n  x",
    # Attempts to inject a field or end the frame early, whatever the break.
    "\rdata: x",
    "\nid: 7",
    "\r\nevent: e",
    "\rretry: 1",
    "\r\r",
    "\n\n",
    "\r\n\r\n",
)

# Every code point except the surrogates (which UTF-8 cannot encode).
_CHARS = st.characters(codec="utf-8")

_TEXT = st.lists(st.one_of(st.text(_CHARS, max_size=6), st.sampled_from(_SPECIALS)), max_size=6).map("".join)

_FORBIDDEN_IN_LINE = re.compile(r"[\r\n\x00]")

# A valid one-line field (event, id): no CR, LF or NUL.
_LINE = _TEXT.map(lambda text: _FORBIDDEN_IN_LINE.sub("", text))

_RETRY = st.integers(min_value=0)


def _writes_a_field(kwargs: dict[str, Any]) -> bool:
    """Whether Event(**kwargs) writes at least one field (else it is invalid)."""
    return any(kwargs.get(name) is not None for name in ("data", "id", "retry", "comment")) or bool(kwargs.get("event"))


# Keyword arguments of a valid Event: each field present or not (None).
_EVENT_KWARGS = st.fixed_dictionaries(
    {}, optional={"data": _TEXT, "event": _LINE, "id": _LINE, "retry": _RETRY, "comment": _TEXT}
)

_VALID_EVENT_KWARGS = _EVENT_KWARGS.filter(_writes_a_field)


def _normalised(data: str) -> str:
    """``data`` with every line break (CRLF, CR, LF) as LF."""
    return re.sub(r"\r\n?", "\n", data)


def _client_view(kwargs: dict[str, Any]) -> SseParse:
    """What a conformant client makes of the frame of Event(**kwargs) alone."""
    data, event_id = kwargs.get("data"), kwargs.get("id")
    events = [] if data is None else [SseMessage(kwargs.get("event") or "message", _normalised(data), event_id or "")]
    return SseParse(events, event_id or "", kwargs.get("retry"))


@_budget(100)
@given(_VALID_EVENT_KWARGS)
def test_property_event_round_trips_through_the_whatwg_parser(kwargs: dict[str, Any]) -> None:
    """For any valid fields the client recovers data (breaks as LF), type (or "message"), last event id and retry."""
    event = Event(**kwargs)
    assert parse_event_stream(b":\n\n" + event.encode()) == _client_view(kwargs), f"{event!r} -> {event.encode()!r}"


@_budget(50)
@given(_TEXT)
def test_property_event_comment_only_dispatches_nothing(comment: str) -> None:
    """A comment-only event, whatever its text (NUL, line breaks, field-like lines), fires nothing and sets nothing."""
    frame = Event(comment=comment).encode()
    assert parse_event_stream(b":\n\n" + frame) == SseParse([], "", None), f"{comment!r} -> {frame!r}"


@_budget(60)
@given(st.lists(_VALID_EVENT_KWARGS, min_size=1, max_size=5))
def test_property_event_frames_concatenate_without_bleeding(frames: list[dict[str, Any]]) -> None:
    """A body of several frames parses to each frame's event in order, with the client's
    last event id and retry carried across frames: no field of one frame leaks into another."""
    body = b":\n\n" + b"".join(Event(**kwargs).encode() for kwargs in frames)
    events: list[SseMessage] = []
    last_id, retry = "", None
    for kwargs in frames:
        if kwargs.get("id") is not None:
            last_id = kwargs["id"]
        if kwargs.get("retry") is not None:
            retry = kwargs["retry"]
        if kwargs.get("data") is not None:
            events.append(SseMessage(kwargs.get("event") or "message", _normalised(kwargs["data"]), last_id))
    assert parse_event_stream(body) == SseParse(events, last_id, retry)


def _inserted(text: st.SearchStrategy[str], inside: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``text`` with one string of ``inside`` inserted somewhere."""
    return st.tuples(text, inside, text).map("".join)


_SURROGATE = st.characters(categories=["Cs"])

_NOT_A_STR = st.one_of(
    st.binary(max_size=4),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.text(max_size=2), max_size=2),
    st.tuples(st.text(max_size=2)),
    st.builds(object),
)

_NOT_AN_INT = st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.binary(max_size=3), st.builds(object))


class _Flaw(NamedTuple):
    """One invalid field value and what Event must raise for it."""

    field: str
    value: object
    error: type[Exception]
    message: str  # a regex the error message must match from its start


def _flaws() -> st.SearchStrategy[_Flaw]:
    def flaw(fields: list[str], values: st.SearchStrategy[Any], error: type[Exception], message: str) -> Any:
        return st.tuples(st.sampled_from(fields), values).map(
            lambda fv: _Flaw(fv[0], fv[1], error, message.format(field=fv[0]))
        )

    # The injection flaws first (hypothesis favours the first branches), NUL
    # first among them (the subtlest: a browser ignores an id holding one).
    return st.one_of(
        flaw(
            ["id", "event"],
            _inserted(_LINE, st.sampled_from(["\x00", "\r", "\n", "\r\n"])),
            ValueError,
            "{field} must not contain CR, LF or NUL: ",
        ),
        flaw(["data", "comment"], _inserted(_TEXT, _SURROGATE), ValueError, "Event contains a lone surrogate: "),
        flaw(["event", "id"], _inserted(_LINE, _SURROGATE), ValueError, "Event contains a lone surrogate: "),
        flaw(["data", "comment", "event", "id"], _NOT_A_STR, TypeError, "{field} must be a str, not "),
        flaw(["retry"], _NOT_AN_INT, TypeError, "retry must be an int, not "),
        flaw(["retry"], st.integers(max_value=-1), ValueError, r"retry must be >= 0, got -"),
    )


@_budget(100)
@given(_EVENT_KWARGS, _flaws())
def test_property_event_invalid_field_raises_the_documented_error(kwargs: dict[str, Any], flaw: _Flaw) -> None:
    """One invalid field among valid ones (CR/LF/NUL in event or id, a lone surrogate
    anywhere, a non-str text field, a bad retry) raises the documented exception, naming it."""
    kwargs = {**kwargs, flaw.field: flaw.value}
    with pytest.raises(flaw.error, match="^" + flaw.message):
        event = Event(**kwargs)
        raise AssertionError(f"Event(**{kwargs!r}) returned {event!r}")


@_budget(60)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "data": st.one_of(_TEXT, _inserted(_TEXT, _SURROGATE), _NOT_A_STR),
            "event": st.one_of(_LINE, _inserted(_TEXT, st.sampled_from(["\r", "\n", "\x00"])), _NOT_A_STR),
            "id": st.one_of(_LINE, _inserted(_TEXT, st.sampled_from(["\r", "\n", "\x00"])), _NOT_A_STR),
            "retry": st.one_of(_RETRY, st.integers(max_value=-1), _NOT_AN_INT),
            "comment": st.one_of(_TEXT, _inserted(_TEXT, _SURROGATE), _NOT_A_STR),
        },
    )
)
def test_property_event_any_input_is_an_exact_event_or_a_documented_error(kwargs: dict[str, Any]) -> None:
    """For any mix of valid and invalid fields, Event either raises TypeError or
    ValueError (never anything else), or all fields were valid and it round-trips."""
    try:
        event = Event(**kwargs)
    except (TypeError, ValueError):
        valid = False
    else:
        valid = True
        assert parse_event_stream(b":\n\n" + event.encode()) == _client_view(kwargs)

    def ok_text(value: object) -> bool:
        return isinstance(value, str) and not re.search(r"[\ud800-\udfff]", value)

    expected_valid = (
        _writes_a_field(kwargs)
        and all(ok_text(kwargs[f]) for f in ("data", "comment") if kwargs.get(f) is not None)
        and all(
            ok_text(kwargs[f]) and not _FORBIDDEN_IN_LINE.search(kwargs[f])
            for f in ("event", "id")
            if kwargs.get(f) is not None
        )
        and (kwargs.get("retry") is None or (type(kwargs["retry"]) is int and kwargs["retry"] >= 0))
    )
    assert valid == expected_valid, f"Event(**{kwargs!r}) {'returned' if valid else 'raised'}"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=16,
)


@_budget(60)
@given(_JSON, st.none() | _LINE)
def test_property_event_json_round_trips_any_json_value(value: object, event_type: str | None) -> None:
    """json.loads of the data a client parses from Event.json(value) gives back value, under the event type."""
    event = Event.json(value, event=event_type)
    (message,) = parse_event_stream(b":\n\n" + event.encode()).events
    assert message.type == (event_type or "message")
    assert json.loads(message.data) == value, f"{value!r} -> {event.encode()!r}"


@_budget(25)
@given(_JSON, _inserted(_TEXT, _SURROGATE))
def test_property_event_json_with_a_lone_surrogate_raises_value_error(value: object, bad: str) -> None:
    """A lone surrogate anywhere in a JSON value (here: beside it in a list) raises ValueError."""
    with pytest.raises(ValueError, match=r"^Event contains a lone surrogate: "):
        Event.json([value, {bad: bad}])


# ===========================================================================
# SseConfig
# ===========================================================================


def test_sse_config_defaults() -> None:
    """Defaults: keep-alive every 15 s with an empty comment, no retry, 30 s send timeout, no headers."""
    config = SseConfig()
    fields = (config.keep_alive, config.keep_alive_comment, config.retry, config.send_timeout, config.headers)
    assert fields == (15.0, "", None, 30.0, ()), f"defaults are {fields}"


@pytest.mark.parametrize(
    ("window", "error", "message"),
    [
        ((1, "2"), TypeError, "shutdown_retry must be a (low, high) tuple of seconds or None, got (1, '2')"),
        ([1, 2], TypeError, "shutdown_retry must be a (low, high) tuple"),
        ((1, 2, 3), TypeError, "shutdown_retry must be a (low, high) tuple"),
        ((True, 2), TypeError, "shutdown_retry must be a (low, high) tuple"),
        ((2, 1), ValueError, "shutdown_retry must have 0 <= low <= high, finite, got (2, 1)"),
        ((-1, 1), ValueError, "shutdown_retry must have 0 <= low <= high"),
        ((1, float("inf")), ValueError, "shutdown_retry must have 0 <= low <= high"),
    ],
)
def test_sse_config_shutdown_retry_is_a_window_of_seconds(window: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        SseConfig(shutdown_retry=window)
    assert SseConfig(shutdown_retry=(0, 0.5)).shutdown_retry == (0, 0.5)
    assert SseConfig().shutdown_retry is None


def test_sse_config_accepts_none_times() -> None:
    """keep_alive=None and send_timeout=None disable them."""
    config = SseConfig(keep_alive=None, send_timeout=None)
    assert (config.keep_alive, config.send_timeout) == (None, None)


@pytest.mark.parametrize("field", ["keep_alive", "send_timeout"])
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan"), float("inf")], ids=repr)
def test_sse_config_time_not_positive_finite_is_value_error(field: str, value: Any) -> None:
    """keep_alive and send_timeout must be > 0 and finite (never a busy loop)."""
    message = f"{field} must be > 0 and finite (use None to disable), got {value!r}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SseConfig(**{field: value})


@pytest.mark.parametrize("field", ["keep_alive", "send_timeout"])
@pytest.mark.parametrize(("value", "kind"), [(True, "bool"), ("1", "str"), (b"1", "bytes")])
def test_sse_config_time_wrong_type_is_type_error(field: str, value: Any, kind: str) -> None:
    """keep_alive and send_timeout must be numbers: bool and str raise TypeError."""
    with pytest.raises(TypeError, match=rf"^{field} must be a number of seconds or None, not {kind}$"):
        SseConfig(**{field: value})


@pytest.mark.parametrize("comment", ["a\rb", "a\nb", "\r\n"])
def test_sse_config_keep_alive_comment_line_break_is_value_error(comment: str) -> None:
    """keep_alive_comment with CR or LF raises ValueError."""
    with pytest.raises(
        ValueError, match="^" + re.escape(f"keep_alive_comment must not contain CR or LF: {comment!r}") + "$"
    ):
        SseConfig(keep_alive_comment=comment)


@pytest.mark.parametrize(("comment", "kind"), [(None, "NoneType"), (b"ping", "bytes"), (1, "int")])
def test_sse_config_keep_alive_comment_wrong_type_is_type_error(comment: Any, kind: str) -> None:
    """keep_alive_comment must be a str."""
    with pytest.raises(TypeError, match=rf"^keep_alive_comment must be a str, not {kind}$"):
        SseConfig(keep_alive_comment=comment)


def test_sse_config_keep_alive_comment_lone_surrogate_is_value_error() -> None:
    """A lone surrogate in keep_alive_comment raises ValueError at construction."""
    with pytest.raises(ValueError, match=r"^keep_alive_comment contains a lone surrogate: '\\ud800'$"):
        SseConfig(keep_alive_comment="\ud800")


@pytest.mark.parametrize(("retry", "kind"), [(True, "bool"), (2.5, "float"), ("1", "str")])
def test_sse_config_retry_wrong_type_is_type_error(retry: Any, kind: str) -> None:
    """SseConfig.retry must be an int: bool, float and str raise TypeError."""
    with pytest.raises(TypeError, match=rf"^retry must be an int, not {kind}$"):
        SseConfig(retry=retry)


def test_sse_config_negative_retry_is_value_error() -> None:
    """A negative SseConfig.retry raises ValueError."""
    with pytest.raises(ValueError, match=r"^retry must be >= 0, got -5$"):
        SseConfig(retry=-5)


def test_sse_config_headers_not_a_tuple_is_type_error() -> None:
    """headers must be a tuple (a list is refused: the config is immutable)."""
    headers: Any = [("x-a", "1")]
    with pytest.raises(TypeError, match=r"^headers must be a tuple of \(name, value\) pairs, not list$"):
        SseConfig(headers=headers)


@pytest.mark.parametrize(
    ("pair", "shown"),
    [(("x-a",), "('x-a',)"), (("x-a", "1", "2"), "('x-a', '1', '2')"), (["x-a", "1"], "['x-a', '1']"), ("ab", "'ab'")],
)
def test_sse_config_header_not_a_pair_is_type_error(pair: Any, shown: str) -> None:
    """Each header must be a (name, value) 2-tuple."""
    with pytest.raises(
        TypeError, match="^" + re.escape(f"each header must be a (name, value) tuple, got {shown}") + "$"
    ):
        SseConfig(headers=(pair,))


@pytest.mark.parametrize(
    ("pair", "message"),
    [((b"x-a", "1"), "header name must be a str, not bytes"), (("x-a", 1), "header value must be a str, not int")],
)
def test_sse_config_header_text_wrong_type_is_type_error(pair: Any, message: str) -> None:
    """Header names and values must be str."""
    with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
        SseConfig(headers=(pair,))


@pytest.mark.parametrize("name", ["X-Custom", "x custom", "", "x:a", "é", "x-a\n"])
def test_sse_config_header_name_not_lowercase_token_is_value_error(name: str) -> None:
    """A header name must be a lowercase RFC 9110 token."""
    with pytest.raises(ValueError, match="^" + re.escape(f"header name must be a lowercase token: {name!r}") + "$"):
        SseConfig(headers=((name, "v"),))


@pytest.mark.parametrize("name", ["connection", "content-length", "transfer-encoding"])
def test_sse_config_framing_header_is_value_error(name: str) -> None:
    """Headers that frame the body are the server's: ValueError."""
    message = f"header {name!r} is owned by the server and would corrupt the stream"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SseConfig(headers=((name, "close"),))


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nb", "a\x00b"])
def test_sse_config_header_value_cr_lf_nul_is_value_error(value: str) -> None:
    """A header value with CR, LF or NUL raises ValueError (no header injection)."""
    message = f"header 'x-a' value must not contain CR, LF or NUL: {value!r}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SseConfig(headers=(("x-a", value),))


@pytest.mark.parametrize("value", ["a\x01b", "a\x1bb", "a\x7fb", "\x0b", "\x0c"])
def test_sse_config_header_value_control_character_is_value_error(value: str) -> None:
    """A header value with a control character other than HTAB raises ValueError:
    RFC 9110 forbids it, and a server would refuse it mid-response."""
    message = f"header 'x-a' value must not contain control characters: {value!r}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SseConfig(headers=(("x-a", value),))


@pytest.mark.parametrize("value", [" a", "a ", "\ta", "a\t"])
def test_sse_config_header_value_edge_whitespace_is_value_error(value: str) -> None:
    """A header value starting or ending with SP or HTAB raises ValueError (a
    parser would strip it, so it would not arrive as given)."""
    message = f"header 'x-a' value must not start or end with whitespace: {value!r}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SseConfig(headers=(("x-a", value),))


def test_sse_config_header_value_inner_tab_and_empty_value_are_allowed() -> None:
    """HTAB inside a value and an empty value are valid field values."""
    config = SseConfig(headers=(("x-a", "a\tb"), ("x-b", "")))
    assert list(config._start)[-2:] == [(b"x-a", b"a\tb"), (b"x-b", b"")]


@pytest.mark.parametrize("value", ["€", "😀", "\ud800"])
def test_sse_config_header_value_not_latin1_is_value_error(value: str) -> None:
    """A header value that latin-1 cannot encode raises ValueError."""
    with pytest.raises(ValueError, match="^" + re.escape(f"header 'x-a' value must be latin-1: {value!r}") + "$"):
        SseConfig(headers=(("x-a", value),))


@pytest.mark.parametrize("field", ["keep_alive", "keep_alive_comment", "retry", "send_timeout", "headers"])
def test_sse_config_is_frozen(field: str) -> None:
    """Assigning any SseConfig field raises FrozenInstanceError."""
    config = SseConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match=rf"^cannot assign to field '{field}'$"):
        setattr(config, field, None)


@pytest.mark.parametrize(("retry", "chunk"), [(None, b":\n\n"), (0, b"retry: 0\n\n"), (2500, b"retry: 2500\n\n")])
def test_sse_config_first_chunk(retry: int | None, chunk: bytes) -> None:
    """The first body chunk is ``:\\n\\n``, or ``retry: N\\n\\n`` when retry is set."""
    assert SseConfig(retry=retry)._first_chunk == chunk


@pytest.mark.parametrize(("comment", "frame"), [("", b":\n\n"), ("ping", b": ping\n\n"), ("é", ": é\n\n".encode())])
def test_sse_config_keep_alive_frame(comment: str, frame: bytes) -> None:
    """The keep-alive frame is ``:\\n\\n``, or ``: text\\n\\n`` with a comment (UTF-8)."""
    assert SseConfig(keep_alive_comment=comment)._keep_alive_frame == frame


def test_sse_config_start_headers_default() -> None:
    """Without extras the start headers are exactly the three built-in ones."""
    assert list(SseConfig()._start) == ASGI_SSE_HEADERS


def test_sse_config_start_headers_extras_in_order() -> None:
    """Extra headers follow the built-in ones in the given order, values latin-1 encoded, duplicates kept."""
    config = SseConfig(headers=(("x-b", "2"), ("x-a", "é"), ("set-cookie", "a=1"), ("set-cookie", "b=2")))
    assert list(config._start) == [
        *ASGI_SSE_HEADERS,
        (b"x-b", b"2"),
        (b"x-a", b"\xe9"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_sse_config_user_header_replaces_built_in() -> None:
    """A user header named like a built-in one replaces it (no duplicate name)."""
    config = SseConfig(headers=(("cache-control", "no-store"), ("x-a", "1"), ("content-type", "text/event-stream")))
    assert list(config._start) == [
        (b"x-accel-buffering", b"no"),
        (b"cache-control", b"no-store"),
        (b"x-a", b"1"),
        (b"content-type", b"text/event-stream"),
    ]


@async_test()
async def test_sse_config_start_headers_not_shared_between_responses() -> None:
    """A middleware editing one response's header list in place (as
    Starlette's MutableHeaders(raw=...) does) leaves later responses alone."""

    async def no_events() -> AsyncIterator[Event]:
        return
        yield

    b: Broadcaster[str, int] = Broadcaster(config=SseConfig(keep_alive=None, headers=(("x-a", "1"),)))
    expected = [*ASGI_SSE_HEADERS, (b"x-a", b"1")]
    first = AsgiPeer()

    async def editing_send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"].append((b"vary", b"accept-encoding"))
        await first.send(dict(message))

    await b.response(no_events())(first.scope, first.receive, editing_send)
    assert first.ended, f"the first response did not end cleanly: {first.sent}"
    second = AsgiPeer()

    async def plain_send(message: MutableMapping[str, Any]) -> None:
        await second.send(dict(message))

    await b.response(no_events())(second.scope, second.receive, plain_send)
    assert second.start["headers"] == expected, f"the first response's edit leaked: {second.start['headers']}"


def test_sse_config_header_value_may_start_and_end_with_other_characters_than_sp_or_htab() -> None:
    """Only SP and HTAB count as surrounding whitespace of a header value: latin-1 NBSP and
    letters such as X at its ends are kept."""
    config = SseConfig(headers=(("x-a", "\xa0v\xa0"), ("x-b", "XvX")))
    assert config._start[-2:] == ((b"x-a", b"\xa0v\xa0"), (b"x-b", b"XvX")), f"wrong headers: {config._start}"


# ===========================================================================
# Broadcaster and BroadcastStream: the registry
# ===========================================================================

# ---------------------------------------------------------------------------
# Construction, subscribe, send
# ---------------------------------------------------------------------------


def test_broadcaster_defaults() -> None:
    """A default Broadcaster has buffer 64, the default SseConfig and no channels."""
    b: Broadcaster[str, int] = Broadcaster()
    assert b.buffer == 64
    assert b.config == SseConfig()
    assert len(b) == 0
    assert repr(b) == "<Broadcaster open channels=0 buffer=64>"


@pytest.mark.parametrize("buffer", [0, -1])
def test_broadcaster_buffer_below_one_is_rejected_at_construction(buffer: int) -> None:
    """buffer < 1 raises ValueError in the constructor, not at the first subscribe."""
    with pytest.raises(ValueError, match=rf"^buffer must be >= 1, got {buffer}$"):
        Broadcaster(buffer)


@pytest.mark.parametrize("buffer", [True, 2.0, "3", None])
def test_broadcaster_buffer_of_wrong_type_is_rejected(buffer: Any) -> None:
    """buffer must be an int (bool, float, str and None raise TypeError)."""
    with pytest.raises(TypeError, match=r"^buffer must be an int, not \w+$"):
        Broadcaster(buffer)


def test_broadcaster_config_of_wrong_type_is_rejected() -> None:
    """config must be an SseConfig or None."""
    with pytest.raises(TypeError, match=r"^config must be an SseConfig, not dict$"):
        Broadcaster(config={"keep_alive": 1})  # type: ignore[arg-type]  # the error under test


def test_broadcaster_keeps_the_config_it_was_given() -> None:
    """The config property returns the SseConfig given at construction."""
    config = SseConfig(keep_alive=None, retry=100)
    assert Broadcaster(8, config).config is config


def test_subscribe_without_a_running_loop_raises() -> None:
    """subscribe() outside async code raises RuntimeError with a clear message."""
    b: Broadcaster[str, int] = Broadcaster()
    with pytest.raises(RuntimeError, match=r"^Broadcaster\.subscribe\(\) needs a running event loop"):
        b.subscribe("k")
    assert len(b) == 0


@async_test()
async def test_subscribe_with_an_unhashable_key_raises() -> None:
    """An unhashable key raises TypeError and registers nothing."""
    b: Broadcaster[Any, int] = Broadcaster()
    with pytest.raises(TypeError):
        b.subscribe([1, 2])
    assert len(b) == 0


@async_test()
async def test_subscribe_creates_the_channel_lazily() -> None:
    """A key has no channel until its first subscribe; then it is in the registry."""
    b: Broadcaster[str, int] = Broadcaster()
    assert "room" not in b and len(b) == 0
    stream = b.subscribe("room")
    assert "room" in b and len(b) == 1 and b.subscriber_count("room") == 1
    stream.close()


@async_test()
async def test_send_without_subscribers_returns_zero_and_creates_nothing() -> None:
    """send() to a key with no channel returns 0 and leaves the registry empty."""
    b: Broadcaster[str, int] = Broadcaster()
    assert b.send("nobody", 1) == 0
    assert "nobody" not in b and len(b) == 0


@async_test()
async def test_send_fans_out_to_every_subscriber_in_order() -> None:
    """Every subscriber of a key gets every item, in send order; send() counts them."""
    b: Broadcaster[str, int] = Broadcaster()
    streams = [b.subscribe("k") for _ in range(3)]
    assert [b.send("k", i) for i in range(5)] == [3] * 5
    for stream in streams:
        assert [await anext(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
        stream.close()


@async_test()
async def test_keys_are_independent_channels() -> None:
    """An item sent to one key never reaches a subscriber of another."""
    b: Broadcaster[str, str] = Broadcaster()
    a, z = b.subscribe("a"), b.subscribe("z")
    b.send("a", "for a")
    b.send("z", "for z")
    assert (await anext(a), await anext(z)) == ("for a", "for z")
    assert (a.queued, z.queued) == (0, 0)
    a.close()
    z.close()


@async_test()
async def test_subscriber_only_gets_items_sent_after_it_subscribed() -> None:
    """A stream starts empty: nothing sent before its subscribe is replayed."""
    b: Broadcaster[str, int] = Broadcaster()
    early = b.subscribe("k")
    b.send("k", 1)
    late = b.subscribe("k")
    b.send("k", 2)
    assert (early.queued, late.queued) == (2, 1)
    assert await anext(late) == 2
    early.close()
    late.close()


@async_test()
async def test_subscriber_count_and_len_follow_subscriptions() -> None:
    """subscriber_count(key) and len() track subscribes and closes exactly."""
    b: Broadcaster[str, int] = Broadcaster()
    s1, s2, s3 = b.subscribe("a"), b.subscribe("a"), b.subscribe("b")
    assert (b.subscriber_count("a"), b.subscriber_count("b"), len(b)) == (2, 1, 2)
    s1.close()
    assert (b.subscriber_count("a"), len(b)) == (1, 2)
    s2.close()
    assert (b.subscriber_count("a"), len(b), "a" in b) == (0, 1, False)
    s3.close()
    assert len(b) == 0 and b.subscriber_count("zzz") == 0


@async_test()
async def test_send_returns_immediately_to_a_reader_that_never_reads() -> None:
    """A subscriber that never reads holds at most `buffer` items; send() never waits."""
    b: Broadcaster[str, int] = Broadcaster(buffer=8)
    stream = b.subscribe("k")
    for i in range(10_000):
        assert b.send("k", i) == 1
    assert stream.queued == 8 and stream.lagged == 10_000 - 8
    stream.close()


@async_test()
async def test_stream_properties_and_repr() -> None:
    """key, queued, lagged, closed and repr describe the stream's state."""
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("room")
    assert (stream.key, stream.queued, stream.lagged, stream.closed) == ("room", 0, 0, False)
    assert repr(stream) == "<BroadcastStream key='room' open queued=0 lagged=0>"
    for i in range(3):
        b.send("room", i)
    assert repr(stream) == "<BroadcastStream key='room' open queued=2 lagged=1>"
    stream.close()
    assert repr(stream) == "<BroadcastStream key='room' closed queued=0 lagged=1>"


@async_test()
async def test_subscribe_with_an_unhashable_key_raises_even_after_close() -> None:
    """subscribe() rejects an unhashable key with TypeError also on a closed broadcaster."""
    b = Broadcaster[Any, int]()
    b.close()
    with pytest.raises(TypeError, match="unhashable"):
        b.subscribe([])


@async_test()
async def test_send_reaches_the_streams_left_after_another_one_left() -> None:
    """After one stream of a key leaves, send() still reaches the others (with and without history)."""
    for history in (0, 2):
        b = Broadcaster[str, int](history=history)
        leaving, staying = b.subscribe("k"), b.subscribe("k")
        leaving.close()
        assert b.send("k", 1) == 1, f"history={history}: the remaining stream was not addressed"
        assert await anext(staying) == 1
        staying.close()


# ---------------------------------------------------------------------------
# What an idle stream holds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("buffer", [1, 2, 64])
@async_test()
async def test_stream_holds_a_queue_only_while_it_has_unread_items(buffer: int) -> None:
    """An idle stream holds no deque (760 bytes, more than the rest of an idle
    subscription): one unread item is held alone, two or more in a deque that
    goes once drained, by reads or by a response's take; order and lag count
    are those of a deque bounded by the buffer."""
    b: Broadcaster[str, int] = Broadcaster(buffer=buffer)
    stream = b.subscribe("k").on_lag(LagPolicy.SKIP)
    sub = stream._sub

    def held() -> tuple[bool, bool]:
        return sub.one is not broadcaster._EMPTY, sub.queue is not None

    assert held() == (False, False)
    b.send("k", 0)
    assert held() == (True, False) and stream.queued == 1
    assert await anext(stream) == 0 and held() == (False, False)
    for i in range(1, 4):
        b.send("k", i)
    kept = [1, 2, 3][-buffer:]
    assert held() == (False, True) and stream.queued == len(kept) and stream.lagged == 3 - len(kept)
    assert [await anext(stream) for _ in kept] == kept and held() == (False, False)
    b.send("k", 4)
    b.send("k", 5)
    if buffer == 1:  # 4 was dropped: the take applies the policy (SKIP) first
        assert stream._take(10) == ([5], None, None) and stream.lagged == stream._sub.reported == 3
    else:
        assert stream._take(10) == ([4, 5], None, None)
    assert held() == (False, False)
    b.send("k", 6)
    assert stream._take(10) == ([6], None, None) and held() == (False, False) and stream.queued == 0


@async_test()
async def test_stream_take_of_exactly_what_is_queued_drops_the_queue() -> None:
    """_take(n) of a stream holding more than n items leaves the rest queued; of
    exactly n, it hands them all over and drops the drained deque."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    for i in range(3):
        b.send("k", i)
    assert stream._take(2) == ([0, 1], None, None) and stream._sub.queue is not None and stream.queued == 1
    b.send("k", 3)
    assert stream._take(2) == ([2, 3], None, None) and stream._sub.queue is None and stream.queued == 0


# ---------------------------------------------------------------------------
# Lag policies
# ---------------------------------------------------------------------------


@async_test()
async def test_lag_error_raises_lagged_once_then_continues_from_oldest_retained() -> None:
    """Under LagPolicy.ERROR (the default) a full stream drops the oldest items, the
    next read raises Lagged(missed), and reading continues with what was retained."""
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("k")
    for i in range(5):
        b.send("k", i)
    with pytest.raises(Lagged) as info:
        await anext(stream)
    assert info.value.missed == 3
    assert str(info.value) == "subscriber lagged behind and missed 3 item(s)"
    assert [await anext(stream), await anext(stream)] == [3, 4]
    assert stream.lagged == 3
    stream.close()


@async_test()
async def test_lag_error_reports_each_new_loss_separately() -> None:
    """Lagged carries only the items lost since the last report; lagged is the total."""
    b: Broadcaster[str, int] = Broadcaster(buffer=1)
    stream = b.subscribe("k")
    b.send("k", 1)
    b.send("k", 2)
    with pytest.raises(Lagged, match=r"missed 1 item"):
        await anext(stream)
    assert await anext(stream) == 2
    for i in range(3, 8):
        b.send("k", i)
    with pytest.raises(Lagged) as info:
        await anext(stream)
    assert (info.value.missed, stream.lagged) == (4, 5)
    assert await anext(stream) == 7
    stream.close()


@async_test()
async def test_lag_skip_continues_silently_from_oldest_retained() -> None:
    """LagPolicy.SKIP yields the retained items with no exception; lagged still counts."""
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("k").on_lag(LagPolicy.SKIP)
    for i in range(5):
        b.send("k", i)
    assert [await anext(stream), await anext(stream)] == [3, 4]
    assert stream.lagged == 3
    stream.close()


@async_test()
async def test_lag_end_stops_at_the_next_read_and_leaves_the_channel() -> None:
    """LagPolicy.END ends iteration at the next read after a loss, discarding what
    was buffered, and the stream leaves its channel."""
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("k").on_lag(LagPolicy.END)
    other = b.subscribe("k")
    for i in range(3):
        b.send("k", i)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert stream.closed and stream.queued == 0 and stream.lagged == 1
    assert b.subscriber_count("k") == 1
    b.send("k", 9)
    assert stream.queued == 0, "an ended stream must not receive items"
    other.close()


@async_test()
async def test_lag_end_without_loss_reads_normally() -> None:
    """LagPolicy.END changes nothing while no item was dropped."""
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("k").on_lag(LagPolicy.END)
    b.send("k", 1)
    b.send("k", 2)
    assert [await anext(stream), await anext(stream)] == [1, 2]
    stream.close()


@async_test()
async def test_on_lag_returns_the_stream_and_rejects_non_policies() -> None:
    """on_lag() returns the same stream (for chaining) and needs a LagPolicy."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    assert stream.on_lag(LagPolicy.SKIP) is stream
    with pytest.raises(TypeError, match=r"^policy must be a LagPolicy, not str$"):
        stream.on_lag("skip")  # type: ignore[arg-type]  # the error under test
    stream.close()


@async_test()
async def test_lagged_is_exact_under_every_policy() -> None:
    """lagged grows by exactly one per dropped item, whatever the policy."""
    b: Broadcaster[str, int] = Broadcaster(buffer=3)
    streams = {policy: b.subscribe("k").on_lag(policy) for policy in LagPolicy}
    for i in range(10):
        b.send("k", i)
    assert {policy: s.lagged for policy, s in streams.items()} == dict.fromkeys(LagPolicy, 7)
    for s in streams.values():
        s.close()


def test_lagged_args_hold_the_missed_count() -> None:
    """Lagged(n) carries n as its only argument, so its repr and pickling keep the count."""
    error = Lagged(3)
    assert error.args == (3,), f"wrong args: {error.args}"
    assert repr(error) == "Lagged(3)", f"wrong repr: {error!r}"


# ---------------------------------------------------------------------------
# Closing, ending, leaving, garbage collection
# ---------------------------------------------------------------------------


@async_test()
async def test_stream_close_ends_iteration_and_leaves_the_registry() -> None:
    """close() discards what is buffered, ends iteration and removes the channel
    when it was the last stream."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    b.send("k", 1)
    stream.close()
    assert stream.closed and stream.queued == 0
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert "k" not in b and len(b) == 0
    assert b.send("k", 2) == 0


@async_test()
async def test_stream_close_is_idempotent() -> None:
    """Closing twice changes nothing and does not touch a newer channel of the key."""
    b: Broadcaster[str, int] = Broadcaster()
    old = b.subscribe("k")
    old.close()
    new = b.subscribe("k")
    old.close()
    assert b.subscriber_count("k") == 1
    new.close()


@async_test()
async def test_stream_aclose_and_async_with_close_it() -> None:
    """aclose() and leaving `async with` both close the stream."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("a")
    await stream.aclose()
    assert stream.closed and "a" not in b
    async with b.subscribe("b") as inner:
        assert isinstance(inner, BroadcastStream) and b.subscriber_count("b") == 1
    assert inner.closed and "b" not in b


@async_test()
async def test_stream_close_wakes_a_blocked_reader() -> None:
    """A task blocked in __anext__ ends with StopAsyncIteration when another task
    closes the stream."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # let the reader block (it must not finish by itself)
    assert not reader.done()
    stream.close()
    with pytest.raises(StopAsyncIteration):
        await reader


@async_test()
async def test_stream_iterates_with_async_for_until_removed() -> None:
    """`async for` yields the buffered items and stops after remove(key)."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    for i in range(3):
        b.send("k", i)
    b.remove("k")
    assert [item async for item in stream] == [0, 1, 2]


@async_test()
async def test_garbage_collected_stream_leaves_the_registry_at_once() -> None:
    """A stream dropped without close() is finalized by refcounting alone: the
    channel entry is really gone, with no gc.collect() needed."""
    b: Broadcaster[str, int] = Broadcaster()
    gc.disable()
    try:
        stream = b.subscribe("k")
        keep = b.subscribe("other")
        del stream
        assert "k" not in b and len(b) == 1 and b._channels.keys() == {"other"}
    finally:
        gc.enable()
    keep.close()


@async_test()
async def test_garbage_collected_stream_in_a_cycle_leaves_after_collection() -> None:
    """A stream kept only by a reference cycle of the user's leaves when the cycle
    is collected."""
    b: Broadcaster[str, int] = Broadcaster()

    class Holder:
        pass

    holder = Holder()
    holder.self = holder  # type: ignore[attr-defined]  # a deliberate cycle
    holder.stream = b.subscribe("k")  # type: ignore[attr-defined]
    del holder
    assert "k" in b, "the cycle keeps the stream alive until collected"
    gc.collect()
    assert "k" not in b and len(b) == 0


@async_test()
async def test_stream_has_no_reference_cycle_and_registry_holds_no_stream() -> None:
    """Dropping the last user reference frees the stream at once, even after it
    was read from and lagged: nothing (registry, waiter, finalizer) keeps it."""
    b: Broadcaster[str, int] = Broadcaster(buffer=1)
    stream = b.subscribe("k")
    b.send("k", 1)
    b.send("k", 2)
    with pytest.raises(Lagged):
        await anext(stream)
    assert await anext(stream) == 2
    ref = weakref.ref(stream)
    gc.disable()
    try:
        del stream
        assert ref() is None, f"the stream is still referenced by {gc.get_referrers(ref())}"
        assert "k" not in b
    finally:
        gc.enable()


@async_test()
async def test_remove_drains_buffered_items_then_ends_and_forgets_the_key() -> None:
    """remove(key) drops the channel at once; its streams yield what was already
    delivered to them and then stop; a later subscribe gets a fresh channel."""
    b: Broadcaster[str, int] = Broadcaster()
    s1, s2 = b.subscribe("k"), b.subscribe("k")
    b.send("k", 1)
    b.send("k", 2)
    b.remove("k")
    assert "k" not in b and len(b) == 0 and b.subscriber_count("k") == 0
    assert b.send("k", 3) == 0
    fresh = b.subscribe("k")
    assert b.subscriber_count("k") == 1
    assert [x async for x in s1] == [1, 2]
    assert [x async for x in s2] == [1, 2]
    s1.close()
    assert b.subscriber_count("k") == 1, "closing a removed stream must not touch the new channel"
    b.send("k", 4)
    assert await anext(fresh) == 4
    fresh.close()


@async_test()
async def test_remove_wakes_a_blocked_reader() -> None:
    """A reader blocked on an empty stream stops when its key is removed."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    b.remove("k")
    with pytest.raises(StopAsyncIteration):
        await reader


@async_test()
async def test_remove_of_an_unknown_key_does_nothing() -> None:
    """remove() of a key without a channel is a no-op."""
    b: Broadcaster[str, int] = Broadcaster()
    keep = b.subscribe("a")
    b.remove("b")
    assert len(b) == 1 and not keep.closed
    keep.close()


@async_test()
async def test_close_ends_every_stream_after_draining_and_is_final() -> None:
    """close() empties the registry; every stream drains and stops; later
    subscribes get ended streams and sends reach nobody."""
    b: Broadcaster[str, int] = Broadcaster()
    a, z = b.subscribe("a"), b.subscribe("z")
    b.send("a", 1)
    b.close()
    b.close()
    assert len(b) == 0 and repr(b) == "<Broadcaster closed channels=0 buffer=64>"
    assert [x async for x in a] == [1]
    assert [x async for x in z] == []
    late = b.subscribe("a")
    assert late.closed and "a" not in b and b.send("a", 2) == 0
    assert [x async for x in late] == []


@async_test()
async def test_remove_from_another_thread_ends_streams_after_draining() -> None:
    """remove() called from a plain thread ends the loop's streams through the
    loop, after the items that thread sent first."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")

    def work() -> None:
        b.send("k", 1)
        b.send("k", 2)
        b.remove("k")

    thread = threading.Thread(target=work)
    thread.start()
    assert [x async for x in stream] == [1, 2]
    thread.join()
    assert len(b) == 0


@async_test()
async def test_close_of_a_stream_whose_reader_was_just_cancelled() -> None:
    """close() right after a blocked reader was cancelled ends the stream cleanly."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.cancel()
    stream.close()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert stream.closed and "k" not in b


@async_test()
async def test_remove_and_close_end_streams_before_they_return_without_history() -> None:
    """Without history, remove() and close() called on the streams' loop end them at once."""
    b = Broadcaster[str, int]()
    a, c = b.subscribe("a"), b.subscribe("c")
    b.remove("a")
    assert a.closed, "remove() left the stream open until the next tick"
    b.close()
    assert c.closed, "close() left the stream open until the next tick"


@async_test()
async def test_stream_close_after_remove_woke_its_blocked_reader() -> None:
    """close() of a stream whose blocked reader remove() just woke neither raises nor hangs the reader."""
    b = Broadcaster[str, int]()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the reader now waits for an item
    b.remove("k")
    stream.close()
    with pytest.raises(StopAsyncIteration):
        await reader


def test_live_stream_at_interpreter_exit_does_not_leave_its_channel(tmp_path: Path) -> None:
    """The finalizer of a stream still open when the interpreter exits does not run (no on_change at exit)."""
    script = tmp_path / "exit_with_a_stream.py"
    script.write_text(
        "import asyncio\n"
        "import broadcaster\n"
        "b = broadcaster.Broadcaster(on_change=lambda key: print('change', key))\n"
        "async def main():\n"
        "    return b.subscribe('k')\n"
        "stream = asyncio.run(main())\n"
        "print('exiting')\n",
        encoding="utf-8",
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(broadcaster.__file__))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, f"the script failed: {result.stderr}"
    assert result.stdout.splitlines() == ["change k", "exiting"], f"wrong output: {result.stdout!r}"


@async_test()
async def test_stream_finalizer_does_not_run_at_interpreter_exit() -> None:
    """A stream's finalizer is not registered for interpreter exit (leaving the
    registry then is pointless, and the loop may be gone)."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    assert stream._finalizer.atexit is False
    stream.close()


# ---------------------------------------------------------------------------
# Cancellation of a read
# ---------------------------------------------------------------------------


@async_test()
async def test_cancelled_read_loses_nothing_and_leaves_the_stream_usable() -> None:
    """Cancelling a task blocked in __anext__ removes nothing and takes its
    waiter away with it (the stream holds no future); the next read gets the
    next item sent."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert stream._sub.waiter is None, f"the cancelled read left its waiter behind: {stream._sub.waiter!r}"
    b.send("k", 1)
    assert await anext(stream) == 1
    assert b.subscriber_count("k") == 1
    stream.close()


@async_test()
async def test_item_delivered_to_a_reader_cancelled_before_it_ran_stays_queued() -> None:
    """An item sent while the blocked reader is being cancelled stays in the
    buffer: the waiter is only a wake-up, never a hand-over."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    b.send("k", 1)  # wakes the reader's waiter...
    reader.cancel()  # ...but the reader is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert stream.queued == 1 and await anext(stream) == 1
    stream.close()


@async_test()
async def test_wait_for_timeout_around_a_read_loses_nothing() -> None:
    """asyncio.wait_for around __anext__ is safe: a timeout loses no item."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(stream), 0.01)
    b.send("k", 7)
    assert await asyncio.wait_for(anext(stream), 1) == 7
    stream.close()


@async_test()
async def test_send_to_a_reader_cancelled_in_the_same_tick_keeps_the_item() -> None:
    """send() to a stream whose blocked reader was just cancelled (its waiter is
    cancelled but not yet cleared) queues the item without touching the waiter."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.cancel()  # cancels the waiter future now; the reader runs its finally later
    b.send("k", 1)
    next_read = asyncio.ensure_future(anext(stream))
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await next_read == 1
    stream.close()


# ---------------------------------------------------------------------------
# Threads and event loops
# ---------------------------------------------------------------------------


@async_test()
async def test_send_from_another_thread_arrives_in_order() -> None:
    """Items sent from a plain thread reach the loop's subscriber in that thread's order."""
    b: Broadcaster[str, int] = Broadcaster(buffer=1000)
    stream = b.subscribe("k")
    counts: list[int] = []
    thread = threading.Thread(target=lambda: counts.extend(b.send("k", i) for i in range(500)))
    thread.start()
    got = [await anext(stream) for _ in range(500)]
    thread.join()
    assert got == list(range(500)) and counts == [1] * 500
    stream.close()


@async_test()
async def test_send_from_another_thread_wakes_a_blocked_reader() -> None:
    """A reader blocked on its loop wakes up for an item sent from another thread."""
    b: Broadcaster[str, str] = Broadcaster()
    stream = b.subscribe("k")
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    thread = threading.Thread(target=b.send, args=("k", "hello"))
    thread.start()
    assert await reader == "hello"
    thread.join()
    stream.close()


@async_test()
async def test_send_from_another_thread_drops_the_oldest_item_of_a_full_stream() -> None:
    """Items sent from a plain thread are bounded by the buffer as on the
    stream's loop: a full stream drops its oldest item and counts it."""
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("k").on_lag(LagPolicy.SKIP)
    # The thread's deliveries are queued on the loop before to_thread's result.
    counts = await asyncio.to_thread(lambda: [b.send("k", i) for i in range(4)])
    assert counts == [1] * 4, f"wrong counts: {counts}"
    assert (stream.queued, stream.lagged) == (2, 2), f"queued {stream.queued}, lagged {stream.lagged}"
    assert [await anext(stream), await anext(stream)] == [2, 3]
    stream.close()


def test_send_reaches_subscribers_on_two_loops_in_two_threads() -> None:
    """One send() from a third thread reaches subscribers bound to two different
    loops running in two threads."""
    b: Broadcaster[str, int] = Broadcaster()
    ready = threading.Barrier(3, timeout=5)
    results: dict[str, list[int]] = {}

    def consumer(name: str) -> None:
        async def main() -> None:
            stream = b.subscribe("k")
            ready.wait()
            results[name] = [await asyncio.wait_for(anext(stream), 5) for _ in range(3)]
            stream.close()

        asyncio.run(main())

    threads = [threading.Thread(target=consumer, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    ready.wait()
    assert [b.send("k", i) for i in range(3)] == [2, 2, 2]
    for t in threads:
        t.join(5)
    assert results == {"one": [0, 1, 2], "two": [0, 1, 2]}
    assert len(b) == 0


def test_send_from_a_loop_with_subscribers_also_reaches_another_loops() -> None:
    """send() on a loop whose subscribers are the key's first group delivers to
    them at once and still hands the item to the subscribers of another loop
    (the fast path for one group must not swallow the others)."""
    b: Broadcaster[str, int] = Broadcaster()
    subscribed, done = threading.Event(), threading.Event()
    got: list[int] = []

    def other_loop() -> None:
        async def main() -> None:
            stream = b.subscribe("k")
            subscribed.set()
            got.append(await asyncio.wait_for(anext(stream), 5))
            stream.close()

        asyncio.run(main())
        done.set()

    async def main() -> None:
        stream = b.subscribe("k")  # this loop's group comes first
        thread = threading.Thread(target=other_loop)
        thread.start()
        assert await asyncio.to_thread(subscribed.wait, 5)
        assert b.send("k", 7) == 2, "both loops' subscribers must be addressed"
        assert stream.queued == 1
        assert await asyncio.to_thread(done.wait, 5)
        thread.join(5)
        stream.close()

    asyncio.run(main())
    assert got == [7]


def test_send_skips_subscribers_of_a_closed_loop() -> None:
    """A subscriber whose loop has closed cannot read: send() skips it and does not count it."""
    b: Broadcaster[str, int] = Broadcaster()
    holder: list[BroadcastStream[int]] = []

    async def subscribe() -> None:
        holder.append(b.subscribe("k"))

    asyncio.run(subscribe())  # the loop is closed when run() returns
    assert b.subscriber_count("k") == 1
    assert b.send("k", 1) == 0
    b.remove("k")  # ending streams of a closed loop is skipped too, without error
    assert len(b) == 0
    holder.clear()


def test_concurrent_subscribe_close_and_send_from_many_threads_leave_no_channel() -> None:
    """Four threads, each with its own loop, subscribe/read/close the same keys
    while a fifth sends: afterwards the registry is empty and counts never lie."""
    b: Broadcaster[int, int] = Broadcaster(buffer=4)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        async def main() -> None:
            for i in range(300):
                stream = b.subscribe(i % 3)
                if i % 2:
                    await asyncio.sleep(0)  # let deliveries from the sender arrive
                    stream.close()
                else:
                    del stream  # leave by garbage collection

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    def send() -> None:
        while not stop.is_set():
            for key in range(3):
                b.send(key, 1)

    sender = threading.Thread(target=send)
    sender.start()
    workers = [threading.Thread(target=churn) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    stop.set()
    sender.join(5)
    assert errors == []
    assert len(b) == 0 and b._channels == {}, f"channels left behind: {b._channels}"


def test_send_skips_a_closed_loop_and_still_reaches_the_next_loop() -> None:
    """send() skips the subscribers of a closed loop and goes on to those of the other loops."""
    b = Broadcaster[str, int]()
    holder: list[BroadcastStream[int]] = []

    async def subscribe() -> None:
        holder.append(b.subscribe("k"))

    asyncio.run(subscribe())  # the first group of "k" is on a loop that is closed now

    async def main() -> None:
        stream = b.subscribe("k")
        assert b.send("k", 1) == 1, "the subscriber of the running loop was not addressed"
        assert stream.queued == 1, "the subscriber of the running loop missed the item"
        stream.close()

    asyncio.run(main())
    holder.clear()


# ---------------------------------------------------------------------------
# Admission limits: max_streams, max_streams_per_key, max_keys
# ---------------------------------------------------------------------------

StreamLimit = broadcaster.StreamLimit
KeyLimit = broadcaster.KeyLimit
LimitReached = broadcaster.LimitReached


@pytest.mark.parametrize("limit", ["max_streams", "max_streams_per_key", "max_keys"])
def test_limits_are_positive_ints(limit: str) -> None:
    zero: dict[str, Any] = {limit: 0}
    with pytest.raises(ValueError, match=f"{limit} must be >= 1, got 0"):
        Broadcaster(**zero)
    text: dict[str, Any] = {limit: "5"}
    with pytest.raises(TypeError, match=f"{limit} must be an int, not str"):
        Broadcaster(**text)


@async_test()
async def test_limits_max_streams_refuses_the_next_and_changes_nothing() -> None:
    """Past max_streams, subscribe and subscribe_many raise StreamLimit
    (a LimitReached naming the limit), and the registry is as it was; a
    keyed stream counts once; a stream that leaves, closed or dropped,
    frees its place; one made after close() takes none."""
    b: Broadcaster[str, int] = Broadcaster(max_streams=2)
    first = b.subscribe("a")
    many = b.subscribe_many(["b", "c"])
    for attempt in (lambda: b.subscribe("d"), lambda: b.subscribe_many(["a", "e"])):
        with pytest.raises(StreamLimit, match=r"^2 streams are open: max_streams is 2$") as refused:
            attempt()
        assert isinstance(refused.value, LimitReached)
        assert (refused.value.limit, refused.value.value) == ("max_streams", 2)
        assert (len(b), b.subscriber_count("a"), "d" in b, "e" in b) == (3, 1, False, False)
    first.close()
    second = b.subscribe("d")
    del many
    gc.collect()
    third = b.subscribe("e")
    b.close()
    assert b.subscribe("f").closed
    second.close()
    third.close()


@async_test()
async def test_limits_max_streams_per_key_refuses_a_full_key_only() -> None:
    b: Broadcaster[str, int] = Broadcaster(max_streams_per_key=2)
    streams: list[BroadcastStream[int] | KeyedStream[str, int]] = [b.subscribe("a"), b.subscribe_many(["a", "b"])]
    with pytest.raises(StreamLimit, match=r"^a key has 2 streams: max_streams_per_key is 2$"):
        b.subscribe("a")
    with pytest.raises(StreamLimit, match="max_streams_per_key") as refused:
        b.subscribe_many(["c", "b", "a"])
    assert (refused.value.limit, refused.value.value) == ("max_streams_per_key", 2)
    assert ("c" in b, b.subscriber_count("b")) == (False, 1), "a refused keyed stream joined a channel"
    streams.append(b.subscribe("b"))
    for stream in streams:
        stream.close()


@async_test()
async def test_limits_max_keys_counts_lingering_channels() -> None:
    """max_keys bounds the channels, histories that linger included, so no
    choice of keys makes the process hold more; a key with a channel
    (live or lingering) can always be joined."""
    b: Broadcaster[str, int] = Broadcaster(history=5, linger=60, max_keys=3)
    a, c = b.subscribe("a"), b.subscribe("c")
    b.send("a", 1)
    a.close()  # "a" lingers with its history
    with pytest.raises(KeyLimit, match=r"^2 channels and 2 new: max_keys is 3$") as refused:
        b.subscribe_many(["x", "y", "c"])
    assert (refused.value.limit, refused.value.value, len(b)) == ("max_keys", 3, 2)
    b.subscribe("x").close()  # the third channel: it lingers too
    with pytest.raises(KeyLimit, match=r"^3 channels and 1 new: max_keys is 3$"):
        b.subscribe("z")
    again = b.subscribe("a", last_event_id="nope")  # a lingering key revives
    assert len(b) == 3
    again.close()
    c.close()


_LIMITED_KEYS = st.sampled_from("abcdefgh")


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("one"), _LIMITED_KEYS),
            st.tuples(st.just("many"), st.lists(_LIMITED_KEYS, min_size=1, max_size=4, unique=True)),
            st.tuples(st.just("close"), st.integers(0, 20)),
            st.tuples(st.just("send"), _LIMITED_KEYS),
        ),
        max_size=40,
    ),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
)
@_budget(150)
def test_property_limits_hold_whatever_the_clients_ask(
    steps: list[tuple[str, Any]], max_streams: int, per_key: int, max_keys: int
) -> None:
    """Any sequence of subscriptions (one key or many), leaves and sends:
    the open streams, the streams of each key and the channels (with their
    lingering histories) never pass the limits; a refusal is a LimitReached
    and leaves the registry as it was."""

    async def main() -> None:
        b: Broadcaster[str, int] = Broadcaster(
            2, history=3, max_streams=max_streams, max_streams_per_key=per_key, max_keys=max_keys
        )
        open_streams: list[Any] = []  # BroadcastStream or KeyedStream
        for kind, arg in steps:
            before = (len(b), {key: b.subscriber_count(key) for key in "abcdefgh"})
            try:
                if kind == "one":
                    open_streams.append(b.subscribe(arg))
                elif kind == "many":
                    open_streams.append(b.subscribe_many(arg))
                elif kind == "close" and open_streams:
                    open_streams.pop(arg % len(open_streams)).close()
                elif kind == "send":
                    b.send(arg, 1)
            except LimitReached:
                assert (len(b), {key: b.subscriber_count(key) for key in "abcdefgh"}) == before
            assert len(open_streams) <= max_streams
            assert len(b) <= max_keys
            assert all(b.subscriber_count(key) <= per_key for key in "abcdefgh")
        for stream in open_streams:
            stream.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@async_test()
async def test_try_later_asks_an_event_source_to_come_back(method: str) -> None:
    """status 200: an event stream with the broadcaster's headers that sets
    retry to the delay, then ends; a browser's EventSource reconnects then."""
    b: Broadcaster[str, int] = Broadcaster(config=SseConfig(headers=(("x-app", "chat"),)))
    response = await client_request(b.try_later(2.5), method)
    assert response.status == 200 and response.ended
    assert response.raw_headers == list(b.config._start)
    assert response.headers["x-app"] == "chat"
    if method == "GET":
        assert response.body == b": try again later\nretry: 2500\n\n"
        assert response.parser.retry == 2500 and response.parser.comments == ["try again later"]
    else:
        assert response.body == b""


@pytest.mark.parametrize("status", [429, 503])
@async_test()
async def test_try_later_answers_other_clients_with_retry_after(status: int) -> None:
    response = await client_request(Broadcaster[str, int]().try_later(1.2, status=status))
    assert response.status == status
    assert [name for name, _ in response.raw_headers] == [b"content-type", b"retry-after", b"content-length"]
    assert response.headers == {
        "content-type": "text/plain; charset=utf-8",
        "retry-after": "2",
        "content-length": str(len(b"try again later\n")),
    }
    assert response.body == b"try again later\n"


@async_test()
async def test_try_later_sends_fresh_headers_and_a_retry_of_at_least_1_ms() -> None:
    """Each answer gets its own list of headers (middleware edits them in
    place); a delay under 1 ms is written as 1 ms, never 0."""
    b: Broadcaster[str, int] = Broadcaster()
    app = b.try_later(0.0001)
    first, second = AsgiPeer(), AsgiPeer()
    await asgi_call(app, first)
    first.start["headers"].append((b"x-added", b"by a middleware"))
    await asgi_call(app, second)
    assert second.start["headers"] == list(b.config._start)
    assert second.bodies == [b": try again later\nretry: 1\n\n"]


@async_test()
async def test_try_later_checks_its_arguments_and_its_scope() -> None:
    b: Broadcaster[str, int] = Broadcaster()
    with pytest.raises(ValueError, match="status must be 200, 429 or 503, got 404"):
        b.try_later(1, status=404)
    with pytest.raises(TypeError, match="status must be an int, not float"):
        b.try_later(1, status=200.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seconds must be > 0 and finite"):
        b.try_later(0)
    peer = AsgiPeer()
    peer.scope["type"] = "websocket"
    with pytest.raises(RuntimeError, match="try_later\\(\\) answers 'http' scopes only, got 'websocket'"):
        await asgi_call(b.try_later(1), peer)
    assert peer.sent == []


# ---------------------------------------------------------------------------
# Metrics: Broadcaster.metrics()
# ---------------------------------------------------------------------------

Metrics = broadcaster.Metrics
ENDINGS = ("source_done", "client_gone", "send_timeout", "lag", "error", "shutdown", "cancelled")


def metrics_of(b: Broadcaster[Any, Any], **changed: Any) -> Metrics:
    """The metrics of a fresh broadcaster, with ``changed`` fields; ``ended``
    gives the responses_ended that differ from 0."""
    ended = dict.fromkeys(ENDINGS, 0) | changed.pop("ended", {})
    fresh = {name: 0 for name in Metrics.__dataclass_fields__ if name != "responses_ended"}
    return Metrics(**(fresh | changed), responses_ended=ended)


@async_test()
async def test_metrics_count_the_registry_and_the_sends() -> None:
    """Channels, lingering channels and open streams are what they are now;
    sends, deliveries and resumes add up; the snapshot is immutable."""
    b: Broadcaster[str, int] = Broadcaster(history=5, linger=60)
    assert b.metrics() == metrics_of(b)
    a1, a2, both = b.subscribe("a"), b.subscribe("a"), b.subscribe_many(["a", "b"])
    b.send("a", 1)
    b.send("b", 2)
    b.send("nobody", 3)
    assert b.metrics() == metrics_of(b, channels=2, streams=3, sends=3, deliveries=4)
    position = both.last_event_id
    a1.close()
    both.close()
    assert b.metrics() == metrics_of(b, channels=1, lingering=1, streams=1, sends=3, deliveries=4)
    resumed = b.subscribe_many(["a", "b"], last_event_id=position)
    b.subscribe("b", last_event_id="unknown-1").close()
    b.subscribe_many(["a", "c"], last_event_id=position).close()  # "c" cannot resume
    snapshot = b.metrics()
    assert (snapshot.resumes, snapshot.gaps, snapshot.streams) == (1, 2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.sends = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.responses_ended["error"] = 1  # type: ignore[index]
    a2.close()
    resumed.close()


@async_test()
async def test_metrics_count_no_resume_or_gap_after_close() -> None:
    """A reconnection during shutdown is neither a resume nor a gap."""
    b: Broadcaster[str, int] = Broadcaster(history=5)
    b.close()
    b.subscribe("k", last_event_id="x-1")
    b.subscribe_many(["k"], last_event_id="k=x-1")
    assert (b.metrics().resumes, b.metrics().gaps, b.metrics().streams) == (0, 0, 0)


def test_metrics_keep_the_counts_of_threads_that_ended() -> None:
    """Sends from 50 short-lived threads: every one counted, and the
    counters of the threads that ended are folded into one sum."""
    b: Broadcaster[str, int] = Broadcaster()
    for _ in range(50):
        thread = threading.Thread(target=b.send, args=("k", 1))
        thread.start()
        thread.join()
    assert b.metrics().sends == 50
    assert len(b._all_counts) == 0, "the counters of ended threads are kept one by one"
    b.send("k", 2)
    assert b.metrics().sends == 51 and len(b._all_counts) == 1


@async_test()
async def test_metrics_count_drops_and_lag_reports() -> None:
    b: Broadcaster[str, int] = Broadcaster(buffer=2)
    stream = b.subscribe("k")
    for n in range(5):
        b.send("k", n)
    assert (b.metrics().dropped, b.metrics().lag_reports) == (3, 0)
    with pytest.raises(Lagged):
        await anext(stream)
    assert (b.metrics().dropped, b.metrics().lag_reports) == (3, 1)
    stream.close()


def test_metrics_lose_no_send_of_concurrent_threads() -> None:
    """Eight threads send 5,000 items each to three streams at once: every
    send and delivery is counted (each thread counts into its own counters)."""
    b: Broadcaster[str, int] = Broadcaster(buffer=1)
    threads, sends = 8, 5000

    async def main() -> None:
        streams = [b.subscribe("k") for _ in range(3)]
        start = threading.Barrier(threads)

        def sender() -> None:
            start.wait()
            for n in range(sends):
                b.send("k", n)

        workers = [threading.Thread(target=sender) for _ in range(threads)]
        for worker in workers:
            worker.start()

        def join() -> None:
            for worker in workers:
                worker.join()

        await asyncio.to_thread(join)
        for stream in streams:
            stream.close()

    asyncio.run(main())
    snapshot = b.metrics()
    assert (snapshot.sends, snapshot.deliveries) == (threads * sends, 3 * threads * sends)


@async_test()
async def test_metrics_count_responses_by_how_they_ended_and_their_bytes() -> None:
    """Open responses now; ended ones by how; the body bytes written."""
    b: Broadcaster[str, Event] = Broadcaster(buffer=1, config=SseConfig(keep_alive=None, send_timeout=0.05))
    bodies = 0
    # source_done: the key is removed
    stream = b.subscribe("done")
    b.send("done", Event("x"))
    b.remove("done")
    bodies += len((await client_request(b.response(stream))).body)
    # client_gone, and open while it streams
    async with AsgiClient(b.response(b.subscribe("gone"))) as client, client.stream("GET", "/") as response:
        b.send("gone", Event("y"))
        await response.event()
        assert b.metrics().responses_open == 1
    bodies += len(response.body)
    # lag (LagPolicy.ERROR raises Lagged in the response)
    lagging = b.subscribe("lag")
    for n in range(3):
        b.send("lag", Event(str(n)))
    bodies += len((await client_request(b.response(lagging))).body)

    # error: the render raises
    def broken(item: Event) -> Event:
        raise ValueError("no")

    failing = b.subscribe("error")
    b.send("error", Event("z"))
    b.remove("error")
    bodies += len((await client_request(b.response(failing, broken))).body)
    # send_timeout: the server's send hangs
    peer = AsgiPeer()
    task = asgi_serve(b.response(b.subscribe("slow")), peer)
    await peer.wait_for_bodies(1)
    peer.send_hangs = True
    b.send("slow", Event("stuck"))
    await asgi_ended(task)
    bodies += sum(map(len, peer.bodies))
    # cancelled: the server cancels the response's task
    peer = AsgiPeer()
    task = asgi_serve(b.response(b.subscribe("cancelled")), peer)
    await peer.wait_for_bodies(1)
    task.cancel()
    await asyncio.wait((task,))
    bodies += sum(map(len, peer.bodies))

    # shutdown: close() ends a channel() response
    async def forever(tx: Sender) -> None:
        await asyncio.Event().wait()

    async with AsgiClient(b.channel(forever)) as client, client.stream("GET", "/") as response:
        b.close()
        await response.read()
    bodies += len(response.body)
    ended = dict.fromkeys(ENDINGS, 1)
    snapshot = b.metrics()
    assert (snapshot.responses_open, dict(snapshot.responses_ended)) == (0, ended)
    assert snapshot.bytes_written == bodies


# ---------------------------------------------------------------------------
# The registry lock: leaves never wait for it
# ---------------------------------------------------------------------------


@async_test()
async def test_leave_while_the_lock_is_held_is_done_when_it_is_released() -> None:
    """A stream finalized while this thread holds the registry lock (as the GC can
    do at any allocation) does not deadlock: its leave is queued and done by the
    holder on release."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe("k")
    with b._lock:
        del stream  # the finalizer runs here, inside the locked section
        assert len(b._lock._leaving) == 1 and b.subscriber_count("k") == 1
    assert "k" not in b and not b._lock._leaving


def test_leave_while_another_thread_holds_the_lock_is_done_by_that_thread() -> None:
    """A leave on one thread while another thread holds the lock never blocks; the
    holder does it before it releases."""
    b: Broadcaster[str, int] = Broadcaster()
    streams: list[BroadcastStream[int]] = []

    async def subscribe() -> None:
        streams.append(b.subscribe("k"))

    asyncio.run(subscribe())
    locked, leave_done = threading.Event(), threading.Event()

    def holder() -> None:
        with b._lock:
            locked.set()
            leave_done.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    locked.wait(5)
    streams.pop().close()  # must return at once although the lock is held
    assert b.subscriber_count("k") == 1 and len(b._lock._leaving) == 1, "the leave must wait for the holder"
    leave_done.set()
    thread.join(5)
    assert "k" not in b and not b._lock._leaving


def test_leave_queued_during_the_release_is_done_without_waiting_for_the_lock() -> None:
    """The race the release loop exists for: a leave that another thread queues after
    the holder's last drain, but before its release, is still done by the holder, which
    retakes the lock without blocking (the leaver never waits for another thread:
    "leaving never blocks")."""
    b = Broadcaster[str, int]()
    streams: list[BroadcastStream[int]] = []

    async def subscribe() -> None:
        streams.extend([b.subscribe("k"), b.subscribe("k")])

    asyncio.run(subscribe())
    late = streams.pop()._sub

    class RecordingLock:
        """A lock whose first release lets a leave slip in; records each acquire's ``blocking``."""

        def __init__(self) -> None:
            self.inner = threading.Lock()
            self.raced = False
            self.blocking: list[bool] = []

        def acquire(self, blocking: bool = True) -> bool:
            self.blocking.append(blocking)
            return self.inner.acquire(blocking)

        def release(self) -> None:
            if not self.raced:
                self.raced = True
                b._lock._leaving.append(late)  # as another thread's failed leave would
            self.inner.release()

    lock = RecordingLock()
    b._lock._mutex = lock  # type: ignore[assignment]  # a test double with the same protocol
    streams.pop().close()
    assert lock.raced and len(lock.blocking) == 2, f"the scenario did not happen: {lock.blocking}"
    assert not any(lock.blocking), f"a leave waited for the lock: acquire(blocking=...) calls {lock.blocking}"
    assert "k" not in b and not b._lock._leaving, "the leave queued during the release was not done"


@async_test()
async def test_send_without_history_never_waits_for_the_lock() -> None:
    """send() without history reads the key's channel and its grouping by loop
    without the registry lock: it delivers while another thread holds the lock."""
    b = Broadcaster[str, int]()
    stream = b.subscribe("k")
    b.send("k", 0)  # groups the key's subscribers by loop, once
    locked, sent = threading.Event(), threading.Event()
    waited: list[bool] = []

    def holder() -> None:
        with b._lock:
            locked.set()
            waited.append(not sent.wait(2))

    thread = threading.Thread(target=holder)
    thread.start()
    assert locked.wait(5)
    count = b.send("k", 1)
    sent.set()
    thread.join(5)
    assert waited == [False], "send() waited for the registry lock"
    assert count == 1 and stream.queued == 2, f"count {count}, queued {stream.queued}"
    stream.close()


# ---------------------------------------------------------------------------
# on_change
# ---------------------------------------------------------------------------


@async_test()
async def test_on_change_reports_a_key_when_its_channel_appears_and_goes() -> None:
    """on_change(key) runs, with that key, when the first stream of a key
    subscribes and when the last one leaves (by close or by garbage
    collection), and not between."""
    changes: list[tuple[str, bool]] = []

    def hook(key: str) -> None:
        if key != "k":  # pytest.fail raises a BaseException: the registry does not catch it
            pytest.fail(f"on_change was called with {key!r}")
        changes.append((key, key in b))

    b: Broadcaster[str, int] = Broadcaster(on_change=hook)
    s1 = b.subscribe("k")
    s2 = b.subscribe("k")
    assert changes == [("k", True)]
    s1.close()
    assert changes == [("k", True)]
    del s2
    assert changes == [("k", True), ("k", False)]


@async_test()
async def test_on_change_reports_remove_close_and_expiry() -> None:
    """remove(), close() and the end of a linger report their keys too."""
    changes: list[str] = []
    b: Broadcaster[str, int] = Broadcaster(on_change=changes.append)
    streams = [b.subscribe(k) for k in ("a", "b", "c")]
    changes.clear()
    b.remove("a")
    b.remove("a")
    assert changes == ["a"]
    b.close()
    assert sorted(changes[1:]) == ["b", "c"]
    lingering: list[str] = []
    h: Broadcaster[str, int] = Broadcaster(history=2, linger=0.01, on_change=lingering.append)
    h.subscribe("x").close()
    assert lingering == ["x"], "a lingering channel still exists"
    await asyncio.sleep(0.03)  # timing under test: the linger ends
    assert "x" not in h and lingering == ["x", "x"]
    for stream in streams:
        stream.close()


def test_on_change_runs_after_the_lock_is_released(caplog: pytest.LogCaptureFixture) -> None:
    """The hook may call back into the broadcaster (it runs outside the lock),
    and an exception in it is logged, never breaking the registry."""
    seen: list[int] = []

    def hook(key: str) -> None:
        seen.append(b.subscriber_count(key))
        raise RuntimeError("hook bug")

    b: Broadcaster[str, int] = Broadcaster(on_change=hook)

    async def main() -> None:
        stream = b.subscribe("k")
        stream.close()

    asyncio.run(main())
    assert seen == [1, 0] and len(b) == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("on_change hook raised for key 'k'" in r.getMessage() for r in errors)


def test_on_change_must_be_callable() -> None:
    """on_change must be callable or None."""
    with pytest.raises(TypeError, match=r"^on_change must be callable or None, not int$"):
        Broadcaster(on_change=5)  # type: ignore[arg-type]  # the error under test


def test_on_change_calls_from_a_drained_queue_are_skipped() -> None:
    """_report_changes returns quietly when another releasing thread took the
    last key between its check and its pop (the race it tolerates)."""
    calls: list[str] = []
    b: Broadcaster[str, int] = Broadcaster(on_change=calls.append)

    class Racing(deque[Any]):
        def popleft(self) -> Any:
            raise IndexError("taken by another thread")

    b._changed = Racing(["k"])  # a test double: non-empty, yet popleft finds nothing
    b._report_changes()
    assert calls == []


@async_test()
async def test_on_change_reports_remove_of_a_live_key_only() -> None:
    """remove() reports a key that had a channel, and never one that had none."""
    changes: list[str] = []
    b = Broadcaster[str, int](on_change=changes.append)
    stream = b.subscribe("k")
    changes.clear()
    b.remove("k")
    assert changes == ["k"], f"remove of a live key reported {changes}"
    b.remove("unknown")
    assert changes == ["k"], f"remove of a key without a channel reported {changes}"
    stream.close()


def test_on_change_hook_error_is_logged_with_its_key(caplog: pytest.LogCaptureFixture) -> None:
    """An on_change hook that raises is logged as an ERROR naming the key, with its traceback."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    def hook(key: str) -> None:
        raise ValueError(key)

    @async_test()
    async def scenario() -> None:
        b = Broadcaster[str, int](on_change=hook)
        b.subscribe("k").close()

    scenario()
    records = [r for r in caplog.records if r.name == "broadcaster"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "Broadcaster on_change hook raised for key 'k'"),
        (logging.ERROR, "Broadcaster on_change hook raised for key 'k'"),
    ], f"wrong records: {[r.getMessage() for r in records]}"
    assert all(r.exc_info is not None and r.exc_info[0] is ValueError for r in records), "no traceback"


# ---------------------------------------------------------------------------
# The registry as a state machine, against a model (hypothesis)
#
# A Broadcaster, with and without history, driven through random interleavings
# of subscribe / send / read / close / drop-and-collect / remove / close-all
# against a plain model, compared after every step.
# ---------------------------------------------------------------------------

_KEYS = ("a", "b", "c")

# At most this many open streams at a time (closed ones stay held, and are
# read, closed again and dropped like the others).
_MAX_OPEN = 6


@dataclasses.dataclass(frozen=True)
class _Tag:
    """The model's name of a history id: key, channel lifetime, sequence number."""

    key: str
    lifetime: int
    seq: int


_Queued = tuple[int, "_Tag | None"]  # an item, and its tag with history


@dataclasses.dataclass
class _StreamModel:
    key: str
    policy: LagPolicy
    resumed: bool | None
    queue: deque[_Queued] = dataclasses.field(default_factory=deque)  # bounded by hand: drop oldest
    backlog: deque[_Queued] = dataclasses.field(default_factory=deque)  # replayed on resume, unbounded
    lagged: int = 0
    reported: int = 0
    ended: bool = False
    member: bool = False  # in its key's current channel
    seen_end: bool = False  # a read returned the end (after which reads keep returning it)
    last: _Tag | None = None  # the tag of the last item read (history)


@dataclasses.dataclass
class _ChannelModel:
    lifetime: int
    members: dict[int, None]
    history: deque[tuple[_Tag, int]] | None
    seq: int = 0


_Outcome = tuple[str, object]  # ("item", item) | ("lagged", missed) | ("end", None)


class _RegistryModel:
    """The documented semantics of a Broadcaster, in plain Python."""

    def __init__(self, buffer: int, history: int) -> None:
        self.buffer = buffer
        self.history = history
        self.channels: dict[str, _ChannelModel] = {}
        self.streams: dict[int, _StreamModel] = {}
        self.closed = False
        self._lifetimes = itertools.count()

    def subscribe(self, sid: int, key: str, policy: LagPolicy, has_id: bool, tag: _Tag | None) -> _StreamModel:
        stream = self.streams[sid] = _StreamModel(key, policy, resumed=False if has_id else None)
        if self.closed:
            stream.ended = True
            return stream
        channel = self.channels.get(key)
        if channel is None:
            history = deque[tuple[_Tag, int]](maxlen=self.history) if self.history else None
            channel = self.channels[key] = _ChannelModel(next(self._lifetimes), {}, history)
        channel.members[sid] = None
        stream.member = True
        if has_id and channel.history is not None and tag is not None:
            # Exact resume: an id of this channel lifetime, not older than what it retains.
            oldest = channel.seq - len(channel.history) + 1
            if (tag.key, tag.lifetime) == (key, channel.lifetime) and oldest - 1 <= tag.seq <= channel.seq:
                stream.backlog.extend((item, t) for t, item in channel.history if t.seq > tag.seq)
                stream.resumed = True
        return stream

    def send(self, key: str, item: int) -> int:
        channel = self.channels.get(key)
        if channel is None:
            return 0
        tag = None
        if channel.history is not None:
            channel.seq += 1
            tag = _Tag(key, channel.lifetime, channel.seq)
            channel.history.append((tag, item))
        for sid in channel.members:
            stream = self.streams[sid]
            assert not stream.ended, "model: a member is never ended"
            if len(stream.queue) == self.buffer:
                stream.queue.popleft()
                stream.lagged += 1
            stream.queue.append((item, tag))
        return len(channel.members)

    @staticmethod
    def available(stream: _StreamModel) -> bool:
        """Whether a read returns at once (an item, Lagged or the end)."""
        return stream.lagged != stream.reported or bool(stream.backlog) or bool(stream.queue) or stream.ended

    def read(self, sid: int) -> _Outcome:
        stream = self.streams[sid]
        assert self.available(stream), "model: read of an empty stream"
        if stream.lagged != stream.reported:
            missed, stream.reported = stream.lagged - stream.reported, stream.lagged
            if stream.policy is LagPolicy.ERROR:
                return ("lagged", missed)
            if stream.policy is LagPolicy.END:
                self.close(sid)
        if stream.backlog:
            item, tag = stream.backlog.popleft()
        elif stream.queue:
            item, tag = stream.queue.popleft()
        else:
            stream.seen_end = True
            return ("end", None)
        if tag is not None:
            stream.last = tag
        return ("item", item)

    def close(self, sid: int) -> None:
        stream = self.streams[sid]
        stream.ended = True
        stream.queue.clear()
        stream.backlog.clear()
        self._leave(sid)

    def drop(self, sid: int) -> None:
        self._leave(sid)
        del self.streams[sid]

    def _leave(self, sid: int) -> None:
        stream = self.streams[sid]
        if not stream.member:
            return
        stream.member = False
        channel = self.channels[stream.key]
        del channel.members[sid]
        if not channel.members and channel.history is None:
            del self.channels[stream.key]
        # With history the channel lingers (the machines use a linger far
        # longer than a test), keeping its history and key.

    def remove(self, key: str) -> None:
        channel = self.channels.pop(key, None)
        if channel is not None:
            for sid in channel.members:
                stream = self.streams[sid]
                stream.ended, stream.member = True, False

    def close_all(self) -> None:
        self.closed = True
        for key in list(self.channels):
            self.remove(key)


R = TypeVar("R")


async def _read(stream: BroadcastStream[int]) -> _Outcome:
    """One ``anext(stream)`` as an outcome (no exception object outlives it).
    The machines read only when the model says the read returns at once; a
    read still waiting after a second is an outcome (a failure), not a hang."""
    task: asyncio.Future[int] = asyncio.ensure_future(anext(stream))
    done, _ = await asyncio.wait((task,), timeout=1.0)
    if not done:
        task.cancel()
        await asyncio.wait((task,))
        return ("still waiting after 1 s", None)
    return _task_outcome(task)


def _task_outcome(task: asyncio.Future[int]) -> _Outcome:
    error = task.exception()
    if isinstance(error, Lagged):
        return ("lagged", error.missed)
    if isinstance(error, StopAsyncIteration):
        return ("end", None)
    if error is not None:
        return ("raised", repr(error))
    return ("item", task.result())


class _BroadcasterMachine(RuleBasedStateMachine):
    """Rules shared by both machines; subclasses make the broadcaster and the
    model in an ``@initialize`` rule. Everything runs on one event loop owned
    by the machine, registry calls inside a coroutine on it as in an app (so
    that, without history, deliveries and ends are synchronous).

    Hypothesis favours low values and the first rules in its order (by
    number of arguments, then name), so: arguments that pick a stream or a key
    are indices into lists ordered by interest (a loss to report first, keys
    with subscribers first), reaching every stream and key; the rules that
    feed the registry take one argument, and the ones that end streams are
    named to come last."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self._broadcaster: Broadcaster[str, int] | None = None
        self._model: _RegistryModel | None = None
        self.streams: dict[int, BroadcastStream[int]] = {}
        self.sids = itertools.count()
        self.items = itertools.count()
        # With history: the epoch of each channel lifetime, and every id seen.
        self.epochs: dict[int, str] = {}
        self.seen: list[tuple[str, _Tag]] = []

    def teardown(self) -> None:
        self.streams.clear()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    @property
    def b(self) -> Broadcaster[str, int]:
        assert self._broadcaster is not None, "initialized first"
        return self._broadcaster

    @property
    def model(self) -> _RegistryModel:
        assert self._model is not None, "initialized first"
        return self._model

    def start(
        self, broadcaster: Broadcaster[str, int], model: _RegistryModel, streams: list[tuple[str, LagPolicy]]
    ) -> None:
        self._broadcaster, self._model = broadcaster, model
        for key, policy in streams:
            self.add_stream(key, policy, None, None)

    # -- helpers --------------------------------------------------------------

    def on_loop(self, fn: Callable[[], R]) -> R:
        """``fn()`` called on the machine's loop, and its result."""

        async def call() -> R:
            return fn()

        return self.loop.run_until_complete(call())

    def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        return self.loop.run_until_complete(coroutine)

    def settle(self) -> None:
        """With history, run the deliveries and ends queued on the loop (call_soon)."""
        if self.model.history:
            self.loop.run_until_complete(asyncio.sleep(0))

    def key(self, index: int) -> str:
        """A key by index, those with subscribers first."""
        channels = self.model.channels
        return sorted(_KEYS, key=lambda k: k not in channels or not channels[k].members)[index]

    def pick(self, index: int, sids: list[int]) -> int:
        return sids[index % len(sids)]

    def readable(self) -> list[int]:
        """Streams a read returns from at once: a loss to report first, then a
        resumed backlog, then an item, then only the end (until a read returned
        it: runs are not spent re-reading ended streams)."""
        model = self.model

        def rank(sid: int) -> int:
            stream = model.streams[sid]
            if stream.lagged != stream.reported:
                return 0
            return 1 if stream.backlog else 2 if stream.queue else 3 if not stream.seen_end else 4

        ranked = sorted((rank(sid), sid) for sid in self.streams if model.available(model.streams[sid]))
        return [sid for r, sid in ranked if r < 4]

    def waiting(self) -> list[int]:
        """Streams a read waits on: open, nothing buffered, no loss to report."""
        return [sid for sid in sorted(self.streams) if not self.model.available(self.model.streams[sid])]

    def open_streams(self) -> int:
        return sum(not self.model.streams[sid].ended for sid in self.streams)

    def id_of(self, tag: _Tag) -> str:
        return f"{self.epochs[tag.lifetime]}-{tag.seq}"

    def observe(self, event_id: str | None, tag: _Tag) -> None:
        """Check the id a stream reports for ``tag``, and learn its epoch."""
        assert event_id is not None, f"no last_event_id for {tag}"
        epoch, _, number = event_id.rpartition("-")
        assert re.fullmatch(r"[0-9a-f]{12}", epoch) and number == str(tag.seq), f"id {event_id!r} for {tag}"
        known = self.epochs.setdefault(tag.lifetime, epoch)
        assert known == epoch, f"channel lifetime {tag.lifetime} changed epoch: {known} then {epoch}"
        assert list(self.epochs.values()).count(epoch) == 1, f"epoch {epoch} reused by another channel lifetime"
        if (event_id, tag) not in self.seen:
            self.seen.append((event_id, tag))

    def add_stream(self, key: str, policy: LagPolicy, last_event_id: str | None, tag: _Tag | None) -> int:
        sid = next(self.sids)
        self.streams[sid] = self.on_loop(lambda: self.b.subscribe(key, last_event_id=last_event_id)).on_lag(policy)
        expected = self.model.subscribe(sid, key, policy, last_event_id is not None, tag)
        assert self.streams[sid].resumed == expected.resumed, (
            f"subscribe({key!r}, last_event_id={last_event_id!r}): resumed {self.streams[sid].resumed}, "
            f"model {expected.resumed}"
        )
        return sid

    def send_items(self, key: str, count: int) -> None:
        for _ in range(count):
            item = next(self.items)
            got = self.on_loop(lambda: self.b.send(key, item))  # noqa: B023 (called at once)
            expected = self.model.send(key, item)
            assert got == expected, f"send({key!r}, {item}) addressed {got}, model {expected}"
        self.settle()

    def check_read(self, sid: int, got: _Outcome, expected: _Outcome) -> None:
        assert got == expected, f"stream {sid}: read {got}, model {expected}"
        tag = self.model.streams[sid].last
        if expected[0] == "item" and tag is not None:
            self.observe(self.streams[sid].last_event_id, tag)

    # -- rules ----------------------------------------------------------------

    @precondition(lambda self: self.open_streams() < _MAX_OPEN)
    @rule(spec=st.tuples(st.sampled_from(_KEYS), st.sampled_from(LagPolicy), st.sampled_from([None, "x-1"])))
    def subscribe(self, spec: tuple[str, LagPolicy, str | None]) -> None:
        """Subscribe (key, policy, last_event_id: none, or one no channel issued)."""
        key, policy, last_event_id = spec
        self.add_stream(key, policy, last_event_id, None)

    # Five items first: more than any buffer holds, so losses are common.
    @rule(batch=st.tuples(st.integers(0, len(_KEYS) - 1), st.sampled_from([5, 1, 2, 3, 4, 6])))
    def send(self, batch: tuple[int, int]) -> None:
        """Send (key index, count) items, one at a time."""
        key_index, count = batch
        self.send_items(self.key(key_index), count)

    @precondition(lambda self: self.readable())
    @rule(pick=st.integers(0, 15))
    def read(self, pick: int) -> None:
        """Read a stream that has something for its reader: an item, Lagged, or the end."""
        sid = self.pick(pick, self.readable())
        expected = self.model.read(sid)
        self.check_read(sid, self.run(_read(self.streams[sid])), expected)

    @precondition(lambda self: self.waiting())
    @rule(pick=st.integers(0, 15), then_send=st.booleans())
    def read_waiting(self, pick: int, then_send: bool) -> None:
        """A read of an empty open stream waits. Cancelled, it changes nothing
        (the invariant checks the stream is as it was); or a send to its key
        wakes it with that item."""
        sid = self.pick(pick, self.waiting())
        key, item = self.model.streams[sid].key, next(self.items)
        if then_send:
            expected_count = self.model.send(key, item)
            expected = self.model.read(sid)
        stream = self.streams[sid]

        async def go() -> tuple[_Outcome | None, int, _Outcome]:
            task: asyncio.Future[int] = asyncio.ensure_future(anext(stream))
            for _ in range(3):
                await asyncio.sleep(0)
            early = _task_outcome(task) if task.done() else None
            if not then_send or early is not None:
                task.cancel()
                await asyncio.wait((task,))
                return early, 0, ("cancelled", None)
            count = self.b.send(key, item)
            done, _ = await asyncio.wait((task,), timeout=1.0)
            if not done:
                task.cancel()
                await asyncio.wait((task,))
                return None, count, ("still waiting 1 s after the send", None)
            return None, count, _task_outcome(task)

        early, count, got = self.run(go())
        assert early is None, f"stream {sid}: a read of an empty stream returned at once: {early}"
        if then_send:
            assert count == expected_count, f"send({key!r}, {item}) addressed {count}, model {expected_count}"
            self.check_read(sid, got, expected)

    @precondition(lambda self: self.streams)
    @rule(pick=st.integers(0, 15), policy=st.sampled_from(LagPolicy))
    def switch_lag_policy(self, pick: int, policy: LagPolicy) -> None:
        """stream.on_lag(policy): the policy of the next reads."""
        sid = self.pick(pick, sorted(self.streams))
        assert self.streams[sid].on_lag(policy) is self.streams[sid]
        self.model.streams[sid].policy = policy

    @precondition(lambda self: self.streams)
    @rule(pick=st.integers(0, 15), drop=st.booleans())
    def unsubscribe(self, pick: int, drop: bool) -> None:
        """Close a stream (again: a no-op), or drop the last reference to it
        without closing it and collect garbage."""
        sid = self.pick(pick, sorted(self.streams))
        if drop:
            # A stream is in no reference cycle, so it goes with its last
            # reference; collect the young generation anyway, and everything
            # if it is still alive (a full collection costs milliseconds).
            ref = weakref.ref(self.streams.pop(sid))
            gc.collect(0)
            if ref() is not None:
                gc.collect()
            assert ref() is None, f"stream {sid} outlived its last reference and gc: {gc.get_referrers(ref())}"
            self.model.drop(sid)
        else:
            self.on_loop(self.streams[sid].close)
            self.model.close(sid)

    @rule(key_index=st.integers(0, len(_KEYS) - 1), how=st.sampled_from(["remove"] * 7 + ["close_all"]))
    def remove_or_close_all(self, key_index: int, how: str) -> None:
        """``remove(key)`` (of a key with subscribers, or not), or, rarely
        (it is final), ``close()``."""
        if how == "remove":
            key = self.key(key_index)
            self.on_loop(lambda: self.b.remove(key))
            self.model.remove(key)
        else:
            self.on_loop(self.b.close)
            self.model.close_all()
        self.settle()

    # -- the comparison after every step --------------------------------------

    @invariant()
    def registry_matches_the_model(self) -> None:
        b, model = self.b, self.model
        for key in _KEYS:
            channel = model.channels.get(key)
            members = 0 if channel is None else len(channel.members)
            assert b.subscriber_count(key) == members, (
                f"subscriber_count({key!r}) {b.subscriber_count(key)}, model {members}"
            )
            assert (key in b) == (channel is not None), f"{key!r} in b is {key in b}, model {channel is not None}"
        assert len(b) == len(model.channels), f"len(b) {len(b)}, model {len(model.channels)}"
        for sid, stream in self.streams.items():
            m = model.streams[sid]
            state = (stream.key, stream.lagged, stream.queued, stream.closed, stream.resumed)
            expected = (m.key, m.lagged, len(m.queue) + len(m.backlog), m.ended, m.resumed)
            assert state == expected, f"stream {sid} (key, lagged, queued, closed, resumed) {state}, model {expected}"
            last = None if m.last is None else self.id_of(m.last)
            assert stream.last_event_id == last, f"stream {sid} last_event_id {stream.last_event_id!r}, model {last!r}"


# The streams a run starts with (more come from the subscribe rules).
_INITIAL_STREAMS = st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(LagPolicy)), min_size=1, max_size=4)


class _RegistryMachine(_BroadcasterMachine):
    """Broadcaster(buffer=1..4), no history: deliveries are synchronous."""

    @initialize(buffer=st.integers(1, 4), streams=_INITIAL_STREAMS)
    def make(self, buffer: int, streams: list[tuple[str, LagPolicy]]) -> None:
        note(f"Broadcaster(buffer={buffer})")
        self.start(Broadcaster(buffer), _RegistryModel(buffer, 0), streams)


def test_property_registry_state_machine() -> None:
    """Random interleavings of subscribe / send / read / a waiting read
    (cancelled, or woken by a send) / on_lag / close / drop-and-collect /
    remove / close-all on a Broadcaster with buffers 1-4, three keys and every
    LagPolicy match the model after every step: items and their order, Lagged
    counts, silent skips, ends, lagged, queued, closed, send()'s count,
    subscriber_count, len() and key membership."""
    _run_machine(_RegistryMachine, settings=_budget(100, steps=40))


# ---------------------------------------------------------------------------
# Leak checks: many subscribe/read/close cycles leave nothing behind
# ---------------------------------------------------------------------------


@async_test(timeout=30.0)
async def test_leak_census_sees_live_streams_queues_tasks_and_finalizers() -> None:
    """The census is not vacuous: it counts open streams, their subscribers,
    queues, finalizers and running tasks, and drops them once they are gone."""
    b: Broadcaster[str, int] = Broadcaster()
    before = leak_census()
    streams = [b.subscribe(f"k{i}") for i in range(3)]
    for i in range(3):
        b.send(f"k{i}", i)
        b.send(f"k{i}", i + 1)  # two items: a queue
    task = asyncio.ensure_future(anext(streams[0]))
    during = leak_delta(before, leak_census())
    assert await task == 0
    for stream in streams:
        stream.close()
    del streams, stream, task
    await asyncio.sleep(0)  # the loop drops the handle that resumed us with the task
    after = leak_delta(before, leak_census())
    for name, at_least in [("BroadcastStream", 3), ("_Subscriber", 3), ("_Channel", 3), ("deque", 3)]:
        assert during.get(name, 0) >= at_least, f"the census missed {name}: {during}"
    assert during.get("finalize registrations") == 3, during
    assert during.get("Task", 0) >= 1, during
    assert after == {}, f"closed streams are still counted: {after}"


@async_test(timeout=30.0)
async def test_leak_meter_catches_a_small_leak() -> None:
    """The tracemalloc bound is tight enough: keeping one small object (a
    2-tuple of ints, 64 bytes with its list slot) every 10 cycles of 20,000
    (2,000 of them: 125 KiB) trips it."""
    kept: list[tuple[int, int]] = []

    async def leaky(n: int) -> None:
        for i in range(n):
            if i % 10 == 0:
                kept.append((i, -i))

    _, growth, top = await leak_measure(leaky, 1_000, 20_000)
    assert growth > LEAK_BOUND, f"a leak of {len(kept)} tuples went unseen: growth {growth} B\n" + "\n".join(top)


async def leak_cycle_close(b: Broadcaster[str, int], n: int) -> None:
    """Subscribe, send one item, read it, close (close(), async with, aclose())."""
    for i in range(n):
        stream = b.subscribe("k")
        b.send("k", i)
        if i % 3 == 0:
            assert await anext(stream) == i
            stream.close()
        elif i % 3 == 1:
            async with stream:
                assert await anext(stream) == i
        else:
            assert await anext(stream) == i
            await stream.aclose()
    assert len(b) == 0


async def leak_cycle_drop(b: Broadcaster[str, int], n: int) -> None:
    """Subscribe, send two items, read one, drop the stream without closing it;
    then (not counted as cycles) drop n / 100 streams that are each in a
    reference cycle, which only the collector frees."""
    for i in range(n):
        stream = b.subscribe("k")
        b.send("k", i)
        b.send("k", i + 1)
        assert await anext(stream) == i
        del stream
    assert len(b) == 0, "a dropped stream stayed subscribed"
    for _ in range(n // 100):
        box: list[object] = [b.subscribe("k")]
        box.append(box)
        del box
    gc.collect()
    assert len(b) == 0, "a stream dropped in a reference cycle stayed subscribed after a collection"


async def leak_cycle_lagged(b: Broadcaster[str, int], n: int) -> None:
    """Subscribe to a broadcaster of buffer 1, send three items, read under
    each lag policy in turn, close."""
    policies = (LagPolicy.ERROR, LagPolicy.SKIP, LagPolicy.END)
    for i in range(n):
        stream = b.subscribe("k").on_lag(policies[i % 3])
        b.send("k", 1)
        b.send("k", 2)
        b.send("k", 3)
        if i % 3 == 0:
            try:
                await anext(stream)
            except Lagged as lag:
                assert lag.missed == 2
            else:
                raise AssertionError("no Lagged")
            assert await anext(stream) == 3
        elif i % 3 == 1:
            assert await anext(stream) == 3
        else:
            assert stream.closed is False
            async for _ in stream:
                raise AssertionError("LagPolicy.END yielded")
        stream.close()
    assert len(b) == 0


async def leak_cycle_resume(b: Broadcaster[str, int], n: int, state: LeakResume) -> None:
    """With history: subscribe resuming from the id of two items ago (one item
    of backlog), send one, read both, close; the channel lingers between."""
    for i in range(n):
        last = state.ids[0] if len(state.ids) == 2 else None
        stream = b.subscribe("k", last_event_id=last)
        b.send("k", i)
        if last is not None:
            assert stream.resumed is True
            await anext(stream)  # the backlog: the previous cycle's item
        assert await anext(stream) == i
        assert stream.last_event_id is not None
        state.ids.append(stream.last_event_id)
        stream.close()
    assert len(b) == 1  # the lingering channel, with its history


# The cycles of the in-suite check: 100,000 in all, most of them the plain
# cycle (the cheapest: about 20 us under tracemalloc; a resume costs 55 us).
LEAK_CYCLES = {"close": 85_000, "drop": 5_000, "lagged": 5_000, "resume": 5_000}


@async_test(timeout=60.0)
async def test_leak_100000_subscribe_iterate_close_cycles_leave_nothing() -> None:
    """100,000 cycles (subscribe, send, read, then close / drop / lag / resume
    with history) leave no stream, subscriber, channel, queue, task, future or
    finalizer behind, and traced memory within LEAK_BOUND of the warm-up's."""
    plain: Broadcaster[str, int] = Broadcaster(buffer=4)
    small: Broadcaster[str, int] = Broadcaster(buffer=1)
    history: Broadcaster[str, int] = Broadcaster(history=8)
    state = LeakResume()

    async def workload(scale: int) -> None:
        await leak_cycle_close(plain, LEAK_CYCLES["close"] // scale)
        await leak_cycle_drop(plain, LEAK_CYCLES["drop"] // scale)
        await leak_cycle_lagged(small, LEAK_CYCLES["lagged"] // scale)
        await leak_cycle_resume(history, LEAK_CYCLES["resume"] // scale, state)

    # The workload's argument divides the counts: a twentieth to warm up.
    divisor = leak_divisor()
    delta, growth, top = await leak_measure(workload, 20 * divisor, divisor)
    leak_report(f"{sum(LEAK_CYCLES.values()) // divisor} subscribe cycles", delta, growth, top)


# ===========================================================================
# History and resume: Broadcaster(history=N)
# ===========================================================================

# ---------------------------------------------------------------------------
# Ids, resume, linger, send(id=...)
# ---------------------------------------------------------------------------


@async_test()
async def test_resumed_stream_drops_its_backlog_once_replayed_and_keeps_live_items_after_it() -> None:
    """A resumed stream yields its backlog, then what arrived live meanwhile
    (one item or a queue), in id order, through reads and takes alike (a take
    goes on from the backlog to the live items, with their ids); the drained
    backlog is dropped."""
    b: Broadcaster[str, int] = Broadcaster(history=8)
    first = b.subscribe("k")
    for n in range(3):
        b.send("k", n)
    await asyncio.sleep(0)  # deliveries with history go through the loop
    stream = b.subscribe("k", last_event_id=f"{b._channels['k'].epoch}-1")
    b.send("k", 3)
    await asyncio.sleep(0)
    sub = stream._sub
    assert sub.backlog is not None and len(sub.backlog) == 2 and sub.one is not broadcaster._EMPTY
    assert await anext(stream) == 1
    epoch = b._channels["k"].epoch
    assert stream._take(10) == ([2, 3], [f"{epoch}-3", f"{epoch}-4"], None) and sub.backlog is None
    assert stream.last_event_id == f"{epoch}-4"
    b.send("k", 4)
    b.send("k", 5)
    await asyncio.sleep(0)
    assert [await anext(stream), await anext(stream)] == [4, 5] and sub.queue is None
    assert stream._take(10) == ([], None, None) and stream.queued == 0
    first.close()


@async_test()
async def test_resumed_stream_take_gives_the_backlog_then_the_queue_within_its_limit() -> None:
    """A take from a resumed stream holding a backlog and several live items
    gives the backlog first, then the queue, in id order, never more than its
    limit (the rest stays for the next take)."""
    b: Broadcaster[str, int] = Broadcaster(history=8)
    first = b.subscribe("k")
    for n in range(3):
        b.send("k", n)
    await asyncio.sleep(0)  # deliveries with history go through the loop
    epoch = b._channels["k"].epoch
    stream = b.subscribe("k", last_event_id=f"{epoch}-1")
    for n in range(3, 6):
        b.send("k", n)
    await asyncio.sleep(0)
    assert stream.queued == 5, f"expected a backlog of 2 and 3 live items, got {stream.queued}"
    ids = [f"{epoch}-{seq}" for seq in range(2, 7)]
    assert stream._take(3) == ([1, 2, 3], ids[:3], None), "the first take"
    assert stream._take(10) == ([4, 5], ids[3:], None), "the second take"
    assert stream.queued == 0 and stream.last_event_id == ids[-1]
    first.close()


def test_history_defaults_and_properties() -> None:
    """By default a broadcaster keeps no history and lingers 30 s if it had one."""
    b: Broadcaster[str, int] = Broadcaster()
    assert (b.history, b.linger) == (0, 30.0)
    b2: Broadcaster[str, int] = Broadcaster(history=10, linger=2)
    assert (b2.history, b2.linger) == (10, 2.0) and isinstance(b2.linger, float)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"history": -1}, ValueError, "history must be >= 0, got -1"),
        ({"history": True}, TypeError, "history must be an int, not bool"),
        ({"history": 2.0}, TypeError, "history must be an int, not float"),
        ({"linger": 0}, ValueError, "linger must be > 0 and finite, got 0"),
        ({"linger": -1.0}, ValueError, "linger must be > 0 and finite, got -1.0"),
        ({"linger": float("inf")}, ValueError, "linger must be > 0 and finite, got inf"),
        ({"linger": None}, TypeError, "linger must be a number of seconds, not NoneType"),
        ({"linger": "1"}, TypeError, "linger must be a number of seconds, not str"),
    ],
)
def test_history_bad_arguments_are_rejected(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    """history must be an int >= 0 and linger a positive finite number."""
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        Broadcaster(**kwargs)


@async_test()
async def test_history_ids_are_epoch_and_increasing_sequence_per_key() -> None:
    """Each key's items get ids '<epoch>-<n>' with n = 1, 2, 3...; the epoch is
    fixed for a channel's lifetime and differs between keys."""
    b: Broadcaster[str, str] = Broadcaster(history=10)
    a, z = b.subscribe("a"), b.subscribe("z")
    for i in range(3):
        b.send("a", f"a{i}")
    b.send("z", "z0")
    got = await history_read(a, 3)
    ids = [i for i, _ in got]
    assert [item for _, item in got] == ["a0", "a1", "a2"]
    assert all(i is not None and re.fullmatch(r"[0-9a-f]{12}-[0-9]+", i) for i in ids), ids
    epochs = {i.rsplit("-", 1)[0] for i in ids if i}
    assert len(epochs) == 1 and [i.rsplit("-", 1)[1] for i in ids if i] == ["1", "2", "3"]
    [(z_id, _)] = await history_read(z, 1)
    assert z_id is not None and z_id.rsplit("-", 1)[0] not in epochs
    a.close()
    z.close()


@async_test()
async def test_history_new_channel_lifetime_gets_a_new_epoch() -> None:
    """After remove(key) the key's next channel uses another epoch, so the old
    ids are unknown to it."""
    b: Broadcaster[str, int] = Broadcaster(history=10)
    s = b.subscribe("k")
    b.send("k", 1)
    [(old, _)] = await history_read(s, 1)
    b.remove("k")
    s2 = b.subscribe("k")
    b.send("k", 2)
    [(new, _)] = await history_read(s2, 1)
    assert old and new and old.rsplit("-", 1)[0] != new.rsplit("-", 1)[0]
    s3 = b.subscribe("k", last_event_id=old)
    assert s3.resumed is False
    s.close()
    s2.close()
    s3.close()


@async_test()
async def test_history_resume_yields_exactly_the_missed_items_then_live() -> None:
    """subscribe(key, last_event_id=id) yields the retained items after id, then
    live items: nothing twice, nothing skipped."""
    b: Broadcaster[str, int] = Broadcaster(history=10)
    first = b.subscribe("k")
    for i in range(5):
        b.send("k", i)
    got = await history_read(first, 5)
    first.close()
    resumed = b.subscribe("k", last_event_id=got[1][0])
    assert resumed.resumed is True and resumed.queued == 3
    b.send("k", 5)
    again = await history_read(resumed, 4)
    assert [item for _, item in again] == [2, 3, 4, 5]
    assert [i for i, _ in again[:3]] == [i for i, _ in got[2:]]
    resumed.close()


@async_test()
async def test_history_resume_from_the_newest_id_replays_nothing() -> None:
    """A client that missed nothing resumes with an empty backlog and goes live."""
    b: Broadcaster[str, int] = Broadcaster(history=4)
    s = b.subscribe("k")
    b.send("k", 1)
    [(newest, _)] = await history_read(s, 1)
    s2 = b.subscribe("k", last_event_id=newest)
    assert (s2.resumed, s2.queued) == (True, 0)
    b.send("k", 2)
    assert await history_read(s2, 1) == [(newest.rsplit("-", 1)[0] + "-2" if newest else None, 2)]
    s.close()
    s2.close()


@async_test()
async def test_history_resume_from_an_evicted_id_says_so_and_goes_live() -> None:
    """An id older than the retained history gives resumed False and live items only."""
    b: Broadcaster[str, int] = Broadcaster(history=3)
    s = b.subscribe("k")
    for i in range(6):
        b.send("k", i)
    got = await history_read(s, 6)
    late = b.subscribe("k", last_event_id=got[1][0])  # items 2..5 would be needed, 3..5 kept
    assert (late.resumed, late.queued) == (False, 0)
    keeps = b.subscribe("k", last_event_id=got[2][0])  # the oldest retained item is 3: exact
    assert (keeps.resumed, keeps.queued) == (True, 3)
    b.send("k", 6)
    assert [item for _, item in await history_read(late, 1)] == [6]
    assert [item for _, item in await history_read(keeps, 4)] == [3, 4, 5, 6]
    for stream in (s, late, keeps):
        stream.close()


@pytest.mark.parametrize("bogus", ["", "nonsense", "000000000000-1", "-1", "1"])
@async_test()
async def test_history_resume_from_an_unknown_id_says_so(bogus: str) -> None:
    """Ids that were never issued by this channel give resumed False."""
    b: Broadcaster[str, int] = Broadcaster(history=3)
    s = b.subscribe("k")
    b.send("k", 1)
    late = b.subscribe("k", last_event_id=bogus)
    assert late.resumed is False and late.queued == 0
    s.close()
    late.close()


@async_test()
async def test_history_resumed_is_none_without_an_id_and_false_without_history() -> None:
    """resumed is None when no id is given, False when the broadcaster keeps no
    history (it cannot resume anything), and last_event_id stays None then."""
    with_history: Broadcaster[str, int] = Broadcaster(history=3)
    plain: Broadcaster[str, int] = Broadcaster()
    s1, s2 = with_history.subscribe("k"), plain.subscribe("k", last_event_id="abc-1")
    assert (s1.resumed, s2.resumed) == (None, False)
    plain.send("k", 1)
    assert await anext(s2) == 1 and s2.last_event_id is None
    s1.close()
    s2.close()


@async_test()
async def test_history_subscribe_rejects_a_non_str_last_event_id() -> None:
    """last_event_id must be a str or None."""
    b: Broadcaster[str, int] = Broadcaster(history=3)
    with pytest.raises(TypeError, match=r"^last_event_id must be a str or None, not int$"):
        b.subscribe("k", last_event_id=5)  # type: ignore[arg-type]  # the error under test
    assert len(b) == 0


@async_test()
async def test_history_retains_at_most_n_items_per_key() -> None:
    """Only the newest `history` items are kept: the oldest resumable id is the
    n-th newest."""
    b: Broadcaster[str, int] = Broadcaster(history=5, buffer=100)
    s = b.subscribe("k")
    for i in range(100):
        b.send("k", i)
    got = await history_read(s, 100)
    assert b._channels["k"].history is not None and len(b._channels["k"].history) == 5
    assert b.subscribe("k", last_event_id=got[94][0]).resumed is True
    assert b.subscribe("k", last_event_id=got[93][0]).resumed is False
    s.close()


@async_test()
async def test_history_channel_lingers_after_its_last_stream_then_goes() -> None:
    """With history, a channel whose last stream left stays (count 0, still in
    the registry, still collecting sends) for `linger` seconds, then is gone."""
    b: Broadcaster[str, int] = Broadcaster(history=10, linger=0.05)
    s = b.subscribe("k")
    b.send("k", 1)
    [(last, _)] = await history_read(s, 1)
    s.close()
    assert ("k" in b, len(b), b.subscriber_count("k")) == (True, 1, 0)
    assert b.send("k", 2) == 0, "a lingering channel has no one to address"
    resumed = b.subscribe("k", last_event_id=last)
    assert resumed.resumed is True and [x for _, x in await history_read(resumed, 1)] == [2]
    resumed.close()
    await asyncio.sleep(0.1)  # timing under test: the linger period passes
    assert ("k" in b, len(b)) == (False, 0)
    assert b.subscribe("k", last_event_id=last).resumed is False


@async_test()
async def test_history_channel_goes_the_moment_its_linger_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lingering channel stays until exactly `linger` seconds after its last
    stream left, and is gone at that moment (read on the module's clock)."""
    now = [1000.0]
    monkeypatch.setattr(broadcaster, "time", SimpleNamespace(monotonic=lambda: now[0]))
    b: Broadcaster[str, int] = Broadcaster(history=2, linger=2.5)
    b.subscribe("k").close()
    now[0] = 1002.25
    assert "k" in b, "the channel went before its linger was over"
    now[0] = 1002.5
    assert "k" not in b, "the channel outlived its linger"


@async_test()
async def test_history_channel_whose_linger_is_over_is_not_revived() -> None:
    """A subscribe after the linger time is over, with nothing using the
    registry meanwhile, finds the channel gone (on_change says so first): it
    cannot resume from the old history."""
    changes: list[str] = []
    b: Broadcaster[str, int] = Broadcaster(history=4, linger=0.01, on_change=changes.append)
    stream = b.subscribe("k")
    b.send("k", 1)
    epoch = b._channels["k"].epoch
    stream.close()
    await asyncio.sleep(0.05)  # the linger time under test passes, nothing touches the registry
    assert changes == ["k"], changes
    again = b.subscribe("k", last_event_id=f"{epoch}-0")
    assert again.resumed is False and again.queued == 0
    assert changes == ["k", "k", "k"], f"expected appear, go, appear: {changes}"
    again.close()


@async_test()
async def test_history_resubscribing_restarts_the_linger_period() -> None:
    """A subscribe during the linger keeps the channel; its own leaving starts a
    new full period."""
    b: Broadcaster[str, int] = Broadcaster(history=2, linger=0.15)
    b.subscribe("k").close()
    await asyncio.sleep(0.1)
    s = b.subscribe("k")
    assert "k" not in b._lingering
    await asyncio.sleep(0.1)  # past the first deadline, but the channel has a stream
    assert "k" in b
    s.close()
    await asyncio.sleep(0.1)  # within the second period
    assert "k" in b
    await asyncio.sleep(0.1)
    assert "k" not in b


@async_test()
async def test_history_expiry_is_swept_by_any_registry_operation() -> None:
    """An expired lingering channel is gone for subscribe, send and len alike."""
    b: Broadcaster[str, int] = Broadcaster(history=2, linger=0.01)
    for key in ("a", "b"):
        b.subscribe(key).close()
    await asyncio.sleep(0.05)
    assert b.send("a", 1) == 0 and "a" not in b._channels
    assert b._lingering == {} and b._channels == {}


@async_test()
async def test_history_remove_drops_history_at_once() -> None:
    """remove(key) forgets a lingering channel and its history immediately."""
    b: Broadcaster[str, int] = Broadcaster(history=10, linger=60)
    s = b.subscribe("k")
    b.send("k", 1)
    [(last, _)] = await history_read(s, 1)
    s.close()
    b.remove("k")
    assert "k" not in b and b._lingering == {}
    assert b.subscribe("k", last_event_id=last).resumed is False


@async_test()
async def test_history_close_drops_lingering_channels() -> None:
    """close() forgets lingering channels too."""
    b: Broadcaster[str, int] = Broadcaster(history=10, linger=60)
    b.subscribe("k").close()
    b.close()
    assert len(b) == 0 and b._lingering == {}


@async_test()
async def test_history_send_without_a_channel_creates_no_history() -> None:
    """A send to a key that never had a stream (or whose channel expired) is
    retained nowhere: no client can hold an id of it."""
    b: Broadcaster[str, int] = Broadcaster(history=10)
    assert b.send("k", 1) == 0 and len(b) == 0


@async_test()
async def test_history_deliveries_go_through_the_loop_in_order() -> None:
    """With history, send() on the loop queues the delivery behind what is
    already scheduled there (so ids arrive in order); the stream has it after
    one loop iteration."""
    b: Broadcaster[str, int] = Broadcaster(history=10)
    s = b.subscribe("k")
    assert b.send("k", 1) == 1
    assert s.queued == 0
    await asyncio.sleep(0)
    assert s.queued == 1
    s.close()


@async_test()
async def test_history_resume_while_deliveries_are_pending_on_the_loop() -> None:
    """Items already sent but not yet delivered when a stream resumes are in
    its backlog, and only there: the pending deliveries do not include it."""
    b: Broadcaster[str, int] = Broadcaster(history=10)
    first = b.subscribe("k")
    b.send("k", 0)
    [(id0, _)] = await history_read(first, 1)
    for i in range(1, 4):
        b.send("k", i)  # scheduled, not yet delivered
    resumed = b.subscribe("k", last_event_id=id0)
    assert resumed.queued == 3
    b.send("k", 4)
    assert [x for _, x in await history_read(resumed, 4)] == [1, 2, 3, 4]
    await asyncio.sleep(0)
    assert resumed.queued == 0, "an item arrived twice"
    assert [x for _, x in await history_read(first, 4)] == [1, 2, 3, 4]
    first.close()
    resumed.close()


@async_test()
async def test_history_resume_from_an_id_with_thousands_of_digits_is_a_gap() -> None:
    """An id of the channel's epoch with a number of 5,000 digits (more than
    int() takes on Python 3.10.7+) is a gap: no error, and the stream is a
    member like any other, gone when closed."""
    b: Broadcaster[str, int] = Broadcaster(history=3)
    first = b.subscribe("k")
    b.send("k", 1)
    await asyncio.sleep(0)
    await anext(first)
    epoch = first.last_event_id.rpartition("-")[0]  # type: ignore[union-attr]
    stream = b.subscribe("k", last_event_id=f"{epoch}-" + "9" * 5000)
    assert stream.resumed is False and b.subscriber_count("k") == 2
    stream.close()
    first.close()
    assert b.subscriber_count("k") == 0


@async_test(timeout=20)
async def test_history_resume_races_sends_from_another_thread_without_gap_or_duplicate() -> None:
    """While a thread sends 20,000 items, streams resume at several points from
    the id a first stream had reached: each gets exactly the items after that
    id, in order."""
    n = 20_000
    b: Broadcaster[str, int] = Broadcaster(history=n, buffer=n)
    first = b.subscribe("k")
    sender = threading.Thread(target=lambda: [b.send("k", i) for i in range(n)])
    sender.start()
    resumed: list[tuple[int, BroadcastStream[int]]] = []
    for _ in range(n):
        item = await asyncio.wait_for(anext(first), 5)
        if item % 3000 == 0:
            resumed.append((item, b.subscribe("k", last_event_id=first.last_event_id)))
    sender.join()
    assert len(resumed) >= 5
    for start, stream in resumed:
        assert stream.resumed is True
        got = [await asyncio.wait_for(anext(stream), 5) for _ in range(n - 1 - start)]
        assert got == list(range(start + 1, n)), f"resumed after {start}: gap or duplicate"
        assert stream.queued == 0
        stream.close()
    first.close()


@async_test()
async def test_history_resumed_stream_that_is_already_behind_lags() -> None:
    """A resumed stream's backlog does not count against its buffer, but live
    items arriving while it is replayed do: under ERROR the next read raises
    Lagged, then the backlog and the retained live items follow."""
    b: Broadcaster[str, int] = Broadcaster(history=20, buffer=2)
    first = b.subscribe("k").on_lag(LagPolicy.SKIP)
    b.send("k", 0)
    [(id0, _)] = await history_read(first, 1)
    for i in range(1, 11):
        b.send("k", i)
    resumed = b.subscribe("k", last_event_id=id0)
    assert resumed.queued == 10 and resumed.lagged == 0
    for i in range(11, 16):
        b.send("k", i)
    await asyncio.sleep(0)
    assert resumed.lagged == 3
    with pytest.raises(Lagged) as info:
        await anext(resumed)
    assert info.value.missed == 3
    rest = [x for _, x in await history_read(resumed, 12)]
    assert rest == [*range(1, 11), 14, 15]
    first.close()
    resumed.close()


@async_test()
async def test_history_remove_ends_streams_after_pending_deliveries() -> None:
    """remove() right after sends (deliveries still queued on the loop) lets
    every stream read them before it ends."""
    b: Broadcaster[str, int] = Broadcaster(history=5)
    s = b.subscribe("k")
    for i in range(3):
        b.send("k", i)
    b.remove("k")
    assert [x async for x in s] == [0, 1, 2]


@async_test()
async def test_history_close_of_a_resumed_stream_discards_its_backlog() -> None:
    """close() discards the backlog too: nothing is yielded after it."""
    b: Broadcaster[str, int] = Broadcaster(history=5)
    s = b.subscribe("k")
    b.send("k", 0)
    [(id0, _)] = await history_read(s, 1)
    b.send("k", 1)
    resumed = b.subscribe("k", last_event_id=id0)
    assert resumed.queued == 1
    resumed.close()
    assert resumed.queued == 0
    with pytest.raises(StopAsyncIteration):
        await anext(resumed)
    s.close()


@async_test()
async def test_history_send_from_a_thread_counts_and_delivers() -> None:
    """send() with history from another thread returns the count and delivers."""
    b: Broadcaster[str, int] = Broadcaster(history=5)
    s = b.subscribe("k")
    counts: list[int] = []
    thread = threading.Thread(target=lambda: counts.append(b.send("k", 7)))
    thread.start()
    assert await asyncio.wait_for(anext(s), 2) == 7
    thread.join()
    assert counts == [1] and s.last_event_id is not None
    s.close()


def test_history_send_skips_a_closed_loop() -> None:
    """With history too, subscribers of a closed loop are not addressed."""
    b: Broadcaster[str, int] = Broadcaster(history=5)
    holder: list[BroadcastStream[int]] = []

    async def subscribe() -> None:
        holder.append(b.subscribe("k"))

    asyncio.run(subscribe())
    assert b.send("k", 1) == 0
    holder.clear()


@async_test()
async def test_history_resume_checks_the_id_strictly() -> None:
    """Only ids this channel could have issued resume: '<epoch>-0' (nothing seen
    yet) replays the whole history; a number past the newest, with a leading
    zero or with non-ASCII digits does not."""
    b: Broadcaster[str, int] = Broadcaster(history=5)
    s = b.subscribe("k")
    b.send("k", 1)
    b.send("k", 2)
    await history_read(s, 2)
    epoch = (s.last_event_id or "").rsplit("-", 1)[0]
    whole = b.subscribe("k", last_event_id=f"{epoch}-0")
    assert (whole.resumed, whole.queued) == (True, 2)
    for bad in (f"{epoch}-3", f"{epoch}-01", f"{epoch}-\N{SUPERSCRIPT ONE}", f"{epoch}-", f"{epoch}--1", epoch):
        stream = b.subscribe("k", last_event_id=bad)
        assert stream.resumed is False, bad
        stream.close()
    s.close()
    whole.close()


@async_test()
async def test_send_with_an_explicit_id_is_written_and_resumed_exactly() -> None:
    """send(id=...) stores the item under that id: responses write it and
    subscribe(last_event_id=...) resumes after it by exact match."""
    b: Broadcaster[str, Event] = Broadcaster(history=10, config=SseConfig(keep_alive=None))
    s = b.subscribe("k")
    for n in range(1, 5):
        b.send("k", Event(f"m{n}"), id=f"1700000000000-{n}")
    got = await history_read(s, 4)
    assert [i for i, _ in got] == [f"1700000000000-{n}" for n in range(1, 5)]
    resumed = b.subscribe("k", last_event_id="1700000000000-2")
    assert resumed.resumed is True
    assert [e.data for _, e in await history_read(resumed, 2)] == ["m3", "m4"]
    assert b.subscribe("k", last_event_id="1700000000000-9").resumed is False
    live = b.subscribe("k")
    b.send("k", Event("m5"), id="1700000000000-5")
    b.remove("k")
    response = await client_request(b.response(live))
    assert response.body == ASGI_EMPTY_COMMENT + b"id: 1700000000000-5\ndata: m5\n\n"
    s.close()
    resumed.close()


@async_test()
async def test_send_with_an_explicit_id_is_checked() -> None:
    """An explicit id needs history and must be one line without NUL."""
    plain: Broadcaster[str, int] = Broadcaster()
    with pytest.raises(ValueError, match=r"^send\(id=\.\.\.\) needs a broadcaster with history$"):
        plain.send("k", 1, id="x")
    b: Broadcaster[str, int] = Broadcaster(history=2)
    for bad in ("a\nb", "a\rb", "a\x00b"):
        with pytest.raises(ValueError, match=r"^id must not contain CR, LF or NUL"):
            b.send("k", 1, id=bad)


@async_test()
async def test_send_with_an_id_that_cannot_be_written_leaves_no_trace() -> None:
    """An explicit id with a lone surrogate is refused before anything is
    retained or numbered: a later resume is exact."""
    b: Broadcaster[str, Event] = Broadcaster(history=8)
    keeper = b.subscribe("k")
    b.send("k", Event("a"))
    b.send("k", Event("b"))
    with pytest.raises(ValueError, match=r"^id contains a lone surrogate: '\\ud800'$"):
        b.send("k", Event("bad"), id="\ud800")
    b.send("k", Event("c"))
    await asyncio.sleep(0)  # deliveries with history go through the loop
    epoch = b._channels["k"].epoch
    resumed = b.subscribe("k", last_event_id=f"{epoch}-2")  # the client had a and b
    assert resumed.resumed and [(await anext(resumed)).data] == ["c"] and resumed.queued == 0
    assert [(await anext(keeper)).data for _ in range(3)] == ["a", "b", "c"]
    resumed.close()
    keeper.close()


@async_test()
async def test_history_delivery_skips_a_stream_closed_before_it_ran_and_reaches_the_others() -> None:
    """With history (deliveries through call_soon), a stream closed between send() and the
    delivery is skipped, and the streams after it still get the item."""
    b = Broadcaster[str, int](history=4)
    first, second = b.subscribe("k"), b.subscribe("k")
    assert b.send("k", 1) == 2
    first.close()
    await asyncio.sleep(0)  # run the delivery scheduled with call_soon
    assert second.queued == 1, "the stream after a closed one missed the item"
    assert await anext(second) == 1
    second.close()


@async_test()
async def test_history_resume_from_a_given_id_with_dashes_that_starts_with_the_epoch() -> None:
    """An id given to send(id=...) is matched exactly on resume, even one that starts with
    the channel's own epoch and a dash (only the last dash separates an own id's number)."""
    b = Broadcaster[str, int](history=4)
    live = b.subscribe("k")
    b.send("k", 1)
    assert await anext(live) == 1
    own = live.last_event_id
    assert own is not None
    epoch = own.rpartition("-")[0]
    b.send("k", 2, id=f"{epoch}-1-x")
    b.send("k", 3)
    resumed = b.subscribe("k", last_event_id=f"{epoch}-1-x")
    assert resumed.resumed is True, "an exact id given to send(id=...) was not found"
    assert await anext(resumed) == 3
    live.close()
    resumed.close()


@async_test()
async def test_history_of_one_yields_items_with_their_ids() -> None:
    """With history=1 a stream yields the items themselves and records their ids."""
    b = Broadcaster[str, int](history=1)
    stream = b.subscribe("k")
    b.send("k", 7)
    assert await anext(stream) == 7
    assert stream.last_event_id is not None and stream.last_event_id.endswith("-1"), stream.last_event_id
    stream.close()


@async_test()
async def test_history_channel_revived_from_linger_takes_more_subscribers() -> None:
    """A lingering channel revived by a subscribe keeps working: more streams can join and get its items."""
    b = Broadcaster[str, int](history=2)
    b.subscribe("k").close()  # the channel lingers now
    revived = b.subscribe("k")
    joined = b.subscribe("k")
    assert b.subscriber_count("k") == 2
    assert b.send("k", 1) == 2
    assert [await anext(revived), await anext(joined)] == [1, 1]
    revived.close()
    joined.close()


# ---------------------------------------------------------------------------
# Ids on the wire and on_gap
# ---------------------------------------------------------------------------


# -- History in SSE responses --------------------------------------------------
@async_test()
async def test_history_response_writes_each_items_id() -> None:
    """A response of a stream with history writes every event with its item's
    id (replacing an id of the event's own), and a browser sees that id."""
    b: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    peer = AsgiPeer()
    stream = b.subscribe("k")
    b.send("k", Event("one", event="chat"))
    b.send("k", Event("two\nlines", id="their-own"))
    b.remove("k")
    await b.response(stream)(peer.scope, peer.receive, peer.send)
    epoch = b.subscribe("k")  # a new channel; only to prove the old epoch shape
    epoch.close()
    frames = re.findall(rb".*?\n\n", b"".join(peer.bodies[1:-1]), re.DOTALL)
    assert len(frames) == 2
    assert re.fullmatch(rb"event: chat\nid: [0-9a-f]{12}-1\ndata: one\n\n", frames[0]), frames[0]
    assert re.fullmatch(rb"id: [0-9a-f]{12}-2\ndata: two\ndata: lines\n\n", frames[1]), frames[1]
    parsed = parse_event_stream(b"".join(peer.bodies))
    assert [e.data for e in parsed.events] == ["one", "two\nlines"]
    assert parsed.events[1].last_event_id.endswith("-2"), "the broadcaster's id must win"


@async_test()
async def test_history_response_frames_are_shared_between_responses() -> None:
    """Two responses writing the same Event item share one id-carrying frame
    (encoded once, not once per subscriber)."""
    b: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    peers = [AsgiPeer(), AsgiPeer()]
    streams = [b.subscribe("k"), b.subscribe("k")]
    b.send("k", Event("x"))
    b.remove("k")
    for peer, stream in zip(peers, streams, strict=True):
        await b.response(stream)(peer.scope, peer.receive, peer.send)
    assert peers[0].bodies[1] == peers[1].bodies[1]
    assert peers[0].bodies[1] is peers[1].bodies[1], "the frame was encoded twice"


@async_test()
async def test_history_response_with_render_maps_items_and_writes_ids() -> None:
    """response(stream, render) maps each item to its Event and adds its own id,
    also to the items written together in one message."""
    b: Broadcaster[str, dict[str, int]] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    peer = AsgiPeer()
    stream = b.subscribe("k")
    for n in (1, 2, 3):
        b.send("k", {"n": n})
    b.remove("k")
    await b.response(stream, Event.json)(peer.scope, peer.receive, peer.send)
    assert len(peer.bodies) == 3, peer.bodies
    pattern = rb'data: \{"n":1\}\nid: ([0-9a-f]{12})-1\n\ndata: \{"n":2\}\nid: \1-2\n\ndata: \{"n":3\}\nid: \1-3\n\n'
    assert re.fullmatch(pattern, peer.bodies[1]), peer.bodies[1]
    assert stream.last_event_id is not None and stream.last_event_id.endswith("-3")


@async_test()
async def test_response_render_without_history_maps_items() -> None:
    """render works for any source: a plain async iterable of other items; the
    events it makes are written as they are, with the ids they carry."""
    b: Broadcaster[str, int] = Broadcaster(config=SseConfig(keep_alive=None))

    async def numbers() -> AsyncIterator[int]:
        yield 1
        yield 2

    def render(n: int) -> Event:
        return Event(str(n), id=f"n{n}" if n == 2 else None)

    response = await client_request(b.response(numbers(), render))
    assert response.body == b":\n\ndata: 1\n\nid: n2\ndata: 2\n\n" and response.ended, response


def test_history_response_item_that_is_not_an_event_is_an_error_naming_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With history too, an item that is no Event ends the response with an
    ERROR naming its type, after the events before it (with their ids)."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b: Broadcaster[str, Any] = Broadcaster(history=4, config=SseConfig(keep_alive=None))
        stream = b.subscribe("k")
        for item in (Event("a"), "b", Event("c")):
            b.send("k", item)
        b.remove("k")
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(b.response(stream), peer))
        assert len(peer.bodies) == 3 and peer.ended, peer.sent
        assert re.fullmatch(rb"id: [0-9a-f]{12}-1\ndata: a\n\n", peer.bodies[1]), peer.bodies[1]

    scenario()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["SSE event source raised; ending the response"], errors
    assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "SSE events must be Event objects, got str"


@pytest.mark.parametrize(("last_id", "gap_written"), [("unknown-1", True), (None, False), ("newest", False)])
@async_test()
async def test_history_response_on_gap_is_written_only_when_resume_failed(
    last_id: str | None, gap_written: bool
) -> None:
    """on_gap is written right after the first chunk when the stream could not
    resume, and never when it resumed or no id was given."""
    b: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    first = b.subscribe("k")
    b.send("k", Event("a"))
    await anext(first)
    if last_id == "newest":
        last_id = first.last_event_id
    stream = b.subscribe("k", last_event_id=last_id)
    b.send("k", Event("b"))
    b.remove("k")
    response = await client_request(b.response(stream, on_gap=Event(event="reload", data="")))
    reload = b"event: reload\ndata: \n\n"
    assert response.body.startswith(ASGI_EMPTY_COMMENT + reload) is gap_written, response.body
    assert response.body.count(reload) == int(gap_written)
    first.close()


@async_test()
async def test_history_event_items_carry_their_ids_through_wrappers() -> None:
    """With history, a stream of Events yields copies whose id is the
    broadcaster's, so a wrapper (replay, a merge) keeps the ids on the wire."""
    b: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    stream = b.subscribe("k")
    original = Event("x", event="chat", id="mine")
    b.send("k", original)
    event = await anext(stream)
    assert event.id == stream.last_event_id and event.id != "mine"
    assert (event.data, event.event) == ("x", "chat") and original.id == "mine"
    peer = AsgiPeer()
    live = b.subscribe("k")
    b.send("k", Event("y"))
    b.remove("k")
    await b.response(replay([Event("first")], live))(peer.scope, peer.receive, peer.send)
    assert peer.bodies[1] == b"data: first\n\n"
    assert re.fullmatch(rb"id: [0-9a-f]{12}-2\ndata: y\n\n", peer.bodies[2]), peer.bodies[2]
    stream.close()


# ---------------------------------------------------------------------------
# History as a state machine, against a model (hypothesis)
# ---------------------------------------------------------------------------


async def history_read(stream: BroadcastStream[Any], n: int) -> list[tuple[str | None, Any]]:
    """Read ``n`` items, each with the stream's last_event_id after it."""
    got: list[tuple[str | None, Any]] = []
    for _ in range(n):
        item = await asyncio.wait_for(anext(stream), 2)
        got.append((stream.last_event_id, item))
    return got


_RESUME_KINDS = ("last", "retained", "evicted", "seen", "unissued", "leading-zero")


class _HistoryMachine(_BroadcasterMachine):
    """Broadcaster(buffer=1..4, history=1..4): ids, resume, lingering channels
    (with a linger far longer than the test, so none expires)."""

    @initialize(buffer=st.integers(1, 4), history=st.integers(1, 4), streams=_INITIAL_STREAMS)
    def make(self, buffer: int, history: int, streams: list[tuple[str, LagPolicy]]) -> None:
        note(f"Broadcaster(buffer={buffer}, history={history})")
        self.start(Broadcaster(buffer, history=history, linger=3600), _RegistryModel(buffer, history), streams)

    def resume_ids(self, kind: str) -> list[tuple[str, str, _Tag | None]]:
        """Ids of one kind to resume from, as (key, id, tag); tag None for an id
        no channel issues. The ids made up for a key need the epoch of its
        current channel lifetime, known once a stream read one of its items.

        last: the last id each stream read; seen: any id a stream read;
        retained: the id of a retained item, or the one just before the oldest
        (which replays the whole history); evicted: the one before that (too
        old by one); unissued: the next id; leading-zero: the newest id spelled
        "-0<n>"."""
        if kind == "last":
            lasts = [self.model.streams[sid].last for sid in sorted(self.streams)]
            return [(tag.key, self.id_of(tag), tag) for tag in lasts if tag is not None]
        if kind == "seen":
            return [(tag.key, event_id, tag) for event_id, tag in self.seen]
        ids: list[tuple[str, str, _Tag | None]] = []
        for key, channel in sorted(self.model.channels.items()):
            epoch = self.epochs.get(channel.lifetime)
            if epoch is None or channel.history is None:
                continue
            if kind == "leading-zero":
                ids.append((key, f"{epoch}-0{channel.seq}", None))
                continue
            oldest = channel.seq - len(channel.history) + 1
            seqs = {
                "retained": range(oldest - 1, channel.seq + 1),
                "evicted": [oldest - 2],
                "unissued": [channel.seq + 1],
            }[kind]
            # (no 0: it would be "before the first id", which no client has)
            ids += [
                (key, self.id_of(_Tag(key, channel.lifetime, seq)), _Tag(key, channel.lifetime, seq))
                for seq in seqs
                if seq >= 1
            ]
        return ids

    def read_all(self, sid: int) -> None:
        """Read what a stream has (items, losses) up to its end, checking each read."""
        model = self.model
        while model.available(model.streams[sid]) and not model.streams[sid].seen_end:
            expected = model.read(sid)
            self.check_read(sid, self.run(_read(self.streams[sid])), expected)

    @precondition(
        lambda self: not self.model.closed and any(self.model.streams[sid].last is not None for sid in self.streams)
    )
    @rule(
        spec=st.tuples(
            st.integers(0, 15),
            st.booleans(),
            st.sampled_from([2, 0, 1, 3, 5]),
            st.sampled_from([1, 0, 2]),
            st.sampled_from(["read", "later"]),
        )
    )
    def reconnect(self, spec: tuple[int, bool, int, int, str]) -> None:
        """A client reconnecting (spec: pick, close_old, missed, live, then): a
        stream that read an item is closed (or not), ``missed`` items are sent
        to its key, a new stream subscribes with the stream's last id, and
        ``live`` more items are sent: the new stream has exactly the retained
        items after the id then the live ones (no gap, no duplicate), or says
        it cannot resume (evicted, channel removed) and has the live ones;
        then all it has is read (or left to later steps)."""
        pick, close_old, sends, live, then = spec
        sid = self.pick(pick, [sid for sid in sorted(self.streams) if self.model.streams[sid].last is not None])
        old, tag = self.model.streams[sid], self.model.streams[sid].last
        assert tag is not None
        if close_old:
            self.on_loop(self.streams[sid].close)
            self.model.close(sid)
        self.send_items(old.key, sends)
        new = self.add_stream(old.key, old.policy, self.id_of(tag), tag)
        self.send_items(old.key, live)
        if then == "read":
            self.read_all(new)

    @precondition(lambda self: self.open_streams() < _MAX_OPEN)
    @rule(
        spec=st.tuples(
            st.sampled_from([*_RESUME_KINDS, "garbage"]),
            st.integers(0, 15),
            st.sampled_from([None, *_KEYS]),
            st.sampled_from(LagPolicy),
            st.sampled_from(["send-then-read", "read", "later"]),
        )
    )
    def subscribe_resume(self, spec: tuple[str, int, str | None, LagPolicy, str]) -> None:
        """Subscribe with a last event id (spec: kind, pick, other_key, policy,
        then): an id of that kind (see resume_ids; else of the next kind that
        has one; else garbage), to its own key or to ``other_key``. Then: send an item to the key
        and read all the stream has (the backlog, exactly the model's retained
        items after the id with their ids, then the live item: no gap, no
        duplicate); or read all it has at once; or leave it to later steps."""
        kind, pick, other_key, policy, then = spec
        ids = []
        if kind != "garbage":
            start = _RESUME_KINDS.index(kind)
            for other in _RESUME_KINDS[start:] + _RESUME_KINDS[:start]:
                ids = self.resume_ids(other)
                if ids:
                    break
        key, event_id, tag = ids[pick % len(ids)] if ids else ("a", "not-an-id", None)
        key = other_key or key
        note(f"resume {key!r} from {event_id!r} = {tag}")
        sid = self.add_stream(key, policy, event_id, tag)
        if then == "send-then-read":
            self.send_items(key, 1)
        if then != "later":
            self.read_all(sid)


def test_property_history_state_machine() -> None:
    """The same with history 1-4 (deliveries through the loop): ids in order
    per channel lifetime (a new epoch for each), exact resume from the last id a
    stream saw or any retained one (the backlog is the model's retained items
    after it, then live items, no gap, no duplicate), resumed False for evicted,
    unissued, malformed, foreign or other-lifetime ids, and channels that
    linger with their history after their last stream."""
    _run_machine(_HistoryMachine, settings=_budget(80, steps=40))


# ===========================================================================
# Keyed streams: subscribe_many() and merge()
# ===========================================================================

# ---------------------------------------------------------------------------
# Membership, delivery, order
# ---------------------------------------------------------------------------


def keyed_positions(stream: KeyedStream[Any, Any]) -> dict[str, str]:
    """The per-key ids of a keyed stream's last_event_id, by name (parsed by
    hand here, not by the module)."""
    lei = stream.last_event_id
    assert lei is not None, "a keyed stream with history has an id"
    pairs = [pair.split("=") for pair in lei.split(",")]
    return {urllib.parse.unquote(name): urllib.parse.unquote(id) for name, id in pairs}


@async_test()
async def test_keyed_items_come_tagged_in_delivery_order() -> None:
    """Each item comes as (key, item); one key's items in send order, the
    keys' items interleaved as they were sent."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe_many(["a", "b", "c"])
    for key, item in [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]:
        assert b.send(key, item) == 1
    assert stream.queued == 5
    assert [await anext(stream) for _ in range(5)] == [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]
    assert b.send("d", 6) == 0, "a key the stream does not follow reaches nobody"
    stream.close()


@async_test()
async def test_keyed_stream_is_a_member_of_every_keys_channel() -> None:
    """A keyed stream counts once in each of its keys, beside single-key
    streams; send() to a key counts it once; items reach both kinds."""
    b: Broadcaster[str, str] = Broadcaster()
    keyed = b.subscribe_many(["a", "b"])
    single = b.subscribe("a")
    assert (b.subscriber_count("a"), b.subscriber_count("b"), len(b)) == (2, 1, 2)
    assert b.send("a", "x") == 2 and b.send("b", "y") == 1
    assert [await anext(keyed), await anext(keyed)] == [("a", "x"), ("b", "y")]
    assert await anext(single) == "x"
    keyed.close()
    single.close()


@async_test()
async def test_keyed_stream_from_another_thread_gets_its_items() -> None:
    """send() from another thread reaches a keyed stream through its loop,
    tagged, in the thread's order."""
    b: Broadcaster[int, int] = Broadcaster(buffer=1000)
    stream = b.subscribe_many([1, 2])
    thread = threading.Thread(target=lambda: [b.send(i % 2 + 1, i) for i in range(200)])
    thread.start()
    got = [await asyncio.wait_for(anext(stream), 5) for _ in range(200)]
    thread.join()
    assert got == [(i % 2 + 1, i) for i in range(200)]
    stream.close()


@async_test()
async def test_keyed_stream_reader_cancelled_while_waiting_loses_nothing() -> None:
    """Cancelling a task blocked in __anext__ removes nothing and leaves the
    stream usable; no part keeps the cancelled waiter."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = merge(b.subscribe_many(["a"]), Broadcaster[str, int]().subscribe_many(["b"]))
    task = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(part.sub.waiter is None for part in stream._parts)
    b.send("a", 1)
    assert await anext(stream) == ("a", 1)
    stream.close()


# ---------------------------------------------------------------------------
# Bad input at subscribe_many()
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "at least one key"),
        ("ab", {}, TypeError, "iterable of keys, not str"),
        (b"ab", {}, TypeError, "iterable of keys, not bytes"),
        (5, {}, TypeError, "an iterable of keys, not int"),
        ([["unhashable"]], {}, TypeError, "unhashable"),
        (["a", "b", "a"], {}, ValueError, r"\['a'\] given more than once"),
        ([str(i) for i in range(101)], {}, ValueError, "at most 100 keys, got 101"),
        (["a"], {"name": "upper"}, TypeError, "name must be callable"),
        (["a"], {"name": lambda key: 1}, TypeError, "a key's name must be a str, not int"),
        (["a"], {"name": lambda key: ""}, ValueError, "must not be empty"),
        (["a"], {"name": lambda key: "x\ny"}, ValueError, "must not contain CR, LF or NUL"),
        ([1, "1"], {}, ValueError, "each key needs its own name"),
        (["a", "\ud800"], {}, ValueError, "a key's name contains a lone surrogate"),
        (["a"], {"last_event_id": 5}, TypeError, "last_event_id must be a str or None, not int"),
    ],
)
def test_keyed_subscribe_bad_input_is_refused_and_changes_nothing(
    keys: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each bad argument raises a clear error before anything is created."""
    b: Broadcaster[Any, int] = Broadcaster(history=3, on_change=lambda key: pytest.fail("no change expected"))

    async def main() -> None:
        with pytest.raises(error, match=match):
            b.subscribe_many(keys, **kwargs)
        assert len(b) == 0

    asyncio.run(main())


@pytest.mark.parametrize("history", [0, 3])
def test_keyed_subscribe_name_that_cannot_be_written_leaves_nothing_behind(history: int) -> None:
    """A name with a lone surrogate is refused before any channel is joined,
    with or without history."""
    changes: list[str] = []
    b: Broadcaster[str, int] = Broadcaster(history=history, on_change=changes.append)

    async def main() -> None:
        with pytest.raises(ValueError, match="lone surrogate"):
            b.subscribe_many(["a", "b"], name=lambda key: key if key == "a" else "\ud800")

    asyncio.run(main())
    assert len(b) == 0 and changes == []


def test_keyed_subscribe_needs_a_running_loop() -> None:
    """Outside async code, subscribe_many() says what it needs."""
    with pytest.raises(RuntimeError, match=r"subscribe_many\(\) needs a running event loop"):
        Broadcaster[str, int]().subscribe_many(["a"])


@async_test()
async def test_keyed_subscribe_refuses_keys_whose_id_would_not_fit_a_header() -> None:
    """With history, 100 keys of short names are fine, while keys whose id
    could exceed 8,192 bytes are refused; without history there is no id."""
    history: Broadcaster[str, int] = Broadcaster(history=1)
    history.subscribe_many([f"k{i}" for i in range(100)]).close()
    long_names = [f"{i:040d}" for i in range(100)]
    with pytest.raises(ValueError, match=r"100 keys could take 8999 bytes, over the 8192"):
        history.subscribe_many(long_names)
    assert len(history) == 100 and not any(name in history for name in long_names), "only the first keys linger"
    Broadcaster[str, int]().subscribe_many(long_names).close()


@async_test()
async def test_keyed_send_refuses_an_id_too_long_for_a_keyed_stream() -> None:
    """send(id=...) takes ids of at most 48 bytes once percent-escaped."""
    b: Broadcaster[str, int] = Broadcaster(history=2)
    stream = b.subscribe("k")
    assert b.send("k", 1, id="x" * 48) == 1
    with pytest.raises(ValueError, match="at most 48 bytes once percent-escaped"):
        b.send("k", 2, id="x" * 49)
    with pytest.raises(ValueError, match="at most 48 bytes"):
        b.send("k", 3, id="é" * 9)  # 9 x 6 escaped bytes
    await asyncio.sleep(0)  # with history, deliveries go through the loop
    assert stream.queued == 1
    stream.close()


# ---------------------------------------------------------------------------
# Leaving, ending, lag
# ---------------------------------------------------------------------------


@async_test()
async def test_keyed_close_leaves_every_channel_at_once() -> None:
    """close() takes the stream out of all its channels in one step, and
    on_change hears of each key."""
    changes: list[str] = []
    b: Broadcaster[str, int] = Broadcaster(on_change=changes.append)
    stream = b.subscribe_many(["a", "b", "c"])
    assert changes == ["a", "b", "c"]
    stream.close()
    assert changes == ["a", "b", "c", "a", "b", "c"] and len(b) == 0
    assert stream.closed and stream.keys == ("a", "b", "c"), "closing ends no key"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    stream.close()  # idempotent
    await stream.aclose()


@async_test()
async def test_keyed_stream_garbage_collected_leaves_every_channel() -> None:
    """A keyed stream dropped unclosed leaves all its channels (its parts'
    finalizers)."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe_many(["a", "b"])
    b.send("a", 1)
    ref = weakref.ref(stream)
    del stream
    gc.collect()
    assert ref() is None and len(b) == 0 and b.subscriber_count("a") == 0


@async_test()
async def test_keyed_channels_with_history_linger_per_key() -> None:
    """With history each key's channel lingers after the keyed stream leaves,
    and a later keyed subscribe resumes from it."""
    b: Broadcaster[str, int] = Broadcaster(history=4, linger=60)
    stream = b.subscribe_many(["a", "b"])
    lei = stream.last_event_id
    b.send("a", 1)
    stream.close()
    assert "a" in b and "b" in b and b.subscriber_count("a") == 0
    assert b.send("b", 2) == 0, "a lingering channel retains, reaching nobody"
    again = b.subscribe_many(["a", "b"], last_event_id=lei)
    assert again.resumed is True and again.gaps == ()
    assert [await anext(again), await anext(again)] == [("a", 1), ("b", 2)]
    again.close()


@async_test()
async def test_keyed_remove_ends_one_key_and_the_stream_goes_on() -> None:
    """remove(key) ends that key's part after what it delivered; the stream
    goes on with its other keys; it ends with its last key."""
    b: Broadcaster[str, int] = Broadcaster()
    stream = b.subscribe_many(["a", "b"])
    b.send("a", 1)
    b.remove("a")
    assert stream.keys == ("b",) and not stream.closed
    assert b.send("a", 2) == 0
    b.send("b", 3)
    assert [await anext(stream), await anext(stream)] == [("a", 1), ("b", 3)]
    b.subscribe("a").close()  # a new channel of "a": the stream is not in it
    b.send("b", 4)
    b.remove("b")
    assert not stream.keys and stream.closed
    assert await anext(stream) == ("b", 4), "drains what was delivered"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert len(b) == 0


@async_test()
async def test_keyed_remove_with_history_ends_after_the_scheduled_deliveries() -> None:
    """With history an end queues behind the deliveries already scheduled,
    as for single-key streams: nothing sent before remove() is lost."""
    b: Broadcaster[str, int] = Broadcaster(history=3)
    stream = b.subscribe_many(["a", "b"])
    b.send("a", 1)
    b.send("b", 2)
    b.remove("a")
    b.remove("b")
    assert stream.keys == ("a", "b"), "the ends have not reached the loop yet"
    assert [item async for item in stream] == [("a", 1), ("b", 2)]
    assert not stream.keys and stream.closed


@async_test()
async def test_keyed_broadcaster_close_ends_the_stream() -> None:
    """Broadcaster.close() ends every key, hence the stream; after it,
    subscribe_many() returns a closed stream (a gap for every key asked to
    resume)."""
    b: Broadcaster[str, int] = Broadcaster(history=2)
    stream = b.subscribe_many(["a", "b"])
    b.send("b", 1)
    b.close()
    assert [item async for item in stream] == [("b", 1)]
    late = b.subscribe_many(["a", "b"], last_event_id="a=x-1")
    assert late.closed and not late.keys and late.gaps == ("a", "b") and late.resumed is False
    assert late.last_event_id is None
    fresh = b.subscribe_many(["a"])
    assert fresh.closed and fresh.resumed is None and fresh.gaps == ()
    with pytest.raises(StopAsyncIteration):
        await anext(late)


@async_test()
async def test_keyed_one_buffer_bounds_the_whole_stream() -> None:
    """The buffer counts the items of every key together: a burst on one key
    drops the oldest items of any key; ERROR raises Lagged once, then the
    newest items follow."""
    b: Broadcaster[str, int] = Broadcaster(buffer=3)
    stream = b.subscribe_many(["a", "b"])
    b.send("a", 1)
    b.send("b", 2)
    for i in range(3, 7):
        b.send("b", i)
    assert stream.lagged == 3 and stream.queued == 3
    with pytest.raises(Lagged, match="3"):
        await anext(stream)
    assert [await anext(stream) for _ in range(3)] == [("b", 4), ("b", 5), ("b", 6)]
    stream.close()


@async_test()
async def test_keyed_lag_policies_skip_and_end() -> None:
    """SKIP carries on; END stops the stream at the next read and leaves every
    channel."""
    b: Broadcaster[str, int] = Broadcaster(buffer=1)
    skip = b.subscribe_many(["a", "b"]).on_lag(LagPolicy.SKIP)
    end = b.subscribe_many(["a", "b"]).on_lag(LagPolicy.END)
    b.send("a", 1)
    b.send("b", 2)
    assert await anext(skip) == ("b", 2)
    with pytest.raises(StopAsyncIteration):
        await anext(end)
    assert end.closed and b.subscriber_count("a") == b.subscriber_count("b") == 1
    with pytest.raises(TypeError, match="policy must be a LagPolicy"):
        skip.on_lag("skip")  # type: ignore[arg-type]
    skip.close()


@async_test()
async def test_keyed_lagged_part_raises_before_anything_is_taken() -> None:
    """In a merged stream, Lagged of one part is raised before any item of
    another part is taken, so none is lost."""
    one: Broadcaster[str, int] = Broadcaster(buffer=1)
    two: Broadcaster[str, int] = Broadcaster(buffer=5)
    stream = merge(two.subscribe_many(["x"]), one.subscribe_many(["y"]))
    two.send("x", 1)
    one.send("y", 2)
    one.send("y", 3)
    with pytest.raises(Lagged):
        stream._take(10)
    items, _, _ = stream._take(10)
    assert sorted(items) == [("x", 1), ("y", 3)]
    stream.close()


def test_keyed_repr_says_what_it_follows() -> None:
    """repr names the keys, open or closed, queued and lagged."""

    async def main() -> None:
        b: Broadcaster[str, int] = Broadcaster()
        stream = b.subscribe_many(["a", "b"])
        b.send("a", 1)
        assert repr(stream) == "<KeyedStream keys=['a', 'b'] open queued=1 lagged=0>"
        stream.close()
        assert repr(stream) == "<KeyedStream keys=['a', 'b'] closed queued=0 lagged=0>"

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Ids and exact resume per key
# ---------------------------------------------------------------------------


@async_test()
async def test_keyed_id_names_the_position_in_every_key() -> None:
    """The id is "<name>=<per-key id>" per key in the order given: each key's
    last item read, or its channel's position when the stream was made."""
    b: Broadcaster[str, Event] = Broadcaster(history=4)
    old = b.subscribe("b")
    b.send("b", Event("before"))
    stream = b.subscribe_many(["a", "b"])
    epochs = {key: b._channels[key].epoch for key in "ab"}
    assert stream.last_event_id == f"a={epochs['a']}-0,b={epochs['b']}-1"
    b.send("a", Event("x"))
    key, event = await anext(stream)
    assert (key, event) == ("a", Event("x")), "the item as sent: the stream's id is its own"
    assert stream.last_event_id == f"a={epochs['a']}-1,b={epochs['b']}-1"
    assert keyed_positions(stream) == {"a": f"{epochs['a']}-1", "b": f"{epochs['b']}-1"}
    old.close()
    stream.close()


@async_test()
async def test_keyed_resume_replays_every_key_exactly() -> None:
    """Resuming with the id replays, per key, what came after it, then live."""
    b: Broadcaster[str, int] = Broadcaster(history=10)
    first = b.subscribe_many(["a", "b"])
    b.send("a", 1)
    b.send("b", 2)
    assert await anext(first) == ("a", 1)
    lei = first.last_event_id
    for key, item in [("a", 3), ("b", 4)]:
        b.send(key, item)
    resumed = b.subscribe_many(["a", "b"], last_event_id=lei)
    b.send("a", 5)
    assert resumed.resumed is True and resumed.gaps == ()
    got = [await anext(resumed) for _ in range(4)]
    assert sorted(got) == [("a", 3), ("a", 5), ("b", 2), ("b", 4)]
    assert [x for k, x in got if k == "a"] == [3, 5] and [x for k, x in got if k == "b"] == [2, 4]
    assert resumed.queued == 0
    first.close()
    resumed.close()


@async_test()
async def test_keyed_resume_reports_the_keys_that_could_not() -> None:
    """A key added since, one whose channel is gone, and one read too long ago
    are gaps; the others resume exactly."""
    b: Broadcaster[str, int] = Broadcaster(history=2)
    keep = b.subscribe("old")
    first = b.subscribe_many(["ok", "old", "gone"])
    lei = first.last_event_id
    first.close()
    b.send("ok", 1)
    for i in range(3):
        b.send("old", i)  # more than the history keeps
    b.remove("gone")
    resumed = b.subscribe_many(["new", "ok", "old", "gone"], last_event_id=lei)
    assert resumed.resumed is False and resumed.gaps == ("new", "old", "gone")
    assert resumed.queued == 1 and await anext(resumed) == ("ok", 1)
    keep.close()
    resumed.close()


@pytest.mark.parametrize(
    "lei",
    [
        "",
        "a",
        "no-equals-sign",
        "a=1,a=2",
        "a=%ZZ",
        "%61=x",  # "a" escaped where it need not be: not the one form
        "a=%FF",
        "a=x y",
        ",".join(f"k{i}=1" for i in range(101)),
        "a=" + "x" * 8200,
        "3f9a0c1b7d2e-42",  # a single-key stream's id
        "=1",  # a position without a name
        "a=" + "1" * 49,  # a per-key id longer than any this module writes
    ],
)
def test_keyed_resume_from_a_malformed_or_foreign_id_is_a_gap_for_every_key(lei: str) -> None:
    """An id that is not one this module writes is not an error: every key is
    a gap, and the stream goes on live."""

    async def main() -> None:
        b: Broadcaster[str, int] = Broadcaster(history=3)
        stream = b.subscribe_many(["a", "b"], last_event_id=lei)
        assert stream.resumed is False and stream.gaps == ("a", "b") and stream.queued == 0
        b.send("a", 1)
        assert await anext(stream) == ("a", 1)
        stream.close()

    asyncio.run(main())


@async_test()
async def test_keyed_without_history_has_no_ids_and_cannot_resume() -> None:
    """Without history there are no ids; an id given is a gap for every key;
    no id at all: resumed is None."""
    b: Broadcaster[str, int] = Broadcaster()
    plain = b.subscribe_many(["a"])
    assert plain.last_event_id is None and plain.resumed is None and plain.gaps == ()
    asked = b.subscribe_many(["a", "b"], last_event_id="a=x-1")
    assert asked.resumed is False and asked.gaps == ("a", "b")
    b.send("a", 1)
    items, ids, lines = asked._take(5)
    assert items == [("a", 1)] and ids is None and lines == [b"event: a\n"]
    plain.close()
    asked.close()


@async_test()
async def test_keyed_names_and_bridge_ids_are_escaped_and_resume() -> None:
    """Names and per-key ids holding ",", "=", "%", spaces or non-ASCII are
    escaped in the id, and resume from it; name= maps other keys to text."""
    b: Broadcaster[tuple[str, int], str] = Broadcaster(history=5)
    keys = [("a,b=c", 1), ("100% é", 2)]

    def name(key: tuple[str, int]) -> str:
        return f"{key[0]}/{key[1]}"

    stream = b.subscribe_many(keys, name=name)
    b.send(keys[0], "x", id="1700000000000-0")
    b.send(keys[1], "y", id="id, with = and %")
    assert [await anext(stream) for _ in range(2)] == [(keys[0], "x"), (keys[1], "y")]
    lei = stream.last_event_id
    assert lei is not None and lei.isascii() and " " not in lei
    assert keyed_positions(stream) == {"a,b=c/1": "1700000000000-0", "100% é/2": "id, with = and %"}
    b.send(keys[1], "z", id="next")
    again = b.subscribe_many(keys, last_event_id=lei, name=name)
    assert again.resumed is True and await anext(again) == (keys[1], "z")
    stream.close()
    again.close()


@async_test(timeout=30)
async def test_keyed_resume_races_sends_from_another_thread_without_gap_or_duplicate() -> None:
    """While a thread sends 20,000 items over three keys, keyed streams resume
    at several points from the id a first stream had reached: each gets, per
    key, exactly the items after that id, in order."""
    n = 20_000
    keys = ["a", "b", "c"]
    b: Broadcaster[str, int] = Broadcaster(history=n, buffer=n)
    first = b.subscribe_many(keys)
    sender = threading.Thread(target=lambda: [b.send(keys[i % 3], i) for i in range(n)])
    sender.start()
    resumed: list[tuple[int, KeyedStream[str, int]]] = []
    for _ in range(n):
        _, item = await asyncio.wait_for(anext(first), 5)
        if item % 3001 == 0:
            resumed.append((item, b.subscribe_many(keys, last_event_id=first.last_event_id)))
    sender.join()
    assert len(resumed) >= 5
    for start, stream in resumed:
        assert stream.resumed is True
        got = [await asyncio.wait_for(anext(stream), 5) for _ in range(n - 1 - start)]
        assert sorted(x for _, x in got) == list(range(start + 1, n)), f"resumed after {start}: gap or duplicate"
        for key in keys:
            mine = [x for k, x in got if k == key]
            assert mine == sorted(mine) and all(keys[x % 3] == key for x in mine)
        assert stream.queued == 0
        stream.close()
    first.close()


_KEYED_TEXT = st.characters(codec="utf-8").filter(lambda c: c not in "\r\n\x00")
_KEYED_NAMES = st.text(_KEYED_TEXT, min_size=1, max_size=8)
_KEYED_IDS = st.text(_KEYED_TEXT, max_size=4)  # at most 48 bytes escaped


@given(st.dictionaries(_KEYED_NAMES, _KEYED_IDS, min_size=1, max_size=12))
@_budget(300)
def test_property_keyed_id_round_trips_any_names_and_per_key_ids(positions: dict[str, str]) -> None:
    """Any names and per-key ids (no CR, LF, NUL or lone surrogate) written as
    a keyed stream's id (format_positions) read back as they were
    (parse_positions), and the id is one ASCII line without spaces."""
    text = broadcaster.format_positions(positions)
    assert text.isascii() and not re.search(r"\s", text)
    assert broadcaster.parse_positions(text) == positions


@given(st.one_of(st.text(max_size=40), st.from_regex(r"[a-z%=,0-9A-F-]{0,120}", fullmatch=True)))
@_budget(300)
def test_property_keyed_any_text_reads_as_positions_or_none(text: str) -> None:
    """Whatever a client sends, reading it gives positions that write back to
    exactly that text, or None."""
    positions = broadcaster.parse_positions(text)
    if positions is not None:
        assert broadcaster.format_positions(positions) == text


@pytest.mark.parametrize(
    ("positions", "error", "match"),
    [
        ({}, ValueError, "at least one position"),
        ({"": "1"}, ValueError, "must not be empty"),
        ({"a\n": "1"}, ValueError, "must not contain CR, LF or NUL"),
        ({"a": "1\r"}, ValueError, "must not contain CR, LF or NUL"),
        ({"a": 1}, TypeError, "id must be a str, not int"),
        ({"a": "é" * 9}, ValueError, "at most 48 bytes"),
        ({str(i): "1" for i in range(101)}, ValueError, "at most 100 keys, got 101"),
        ({"\ud800": "1"}, ValueError, "lone surrogate"),
        ({"a": "\ud800"}, ValueError, "lone surrogate"),
        ({f"{i:050d}": "x" * 48 for i in range(90)}, ValueError, "over the 8192"),
    ],
)
def test_keyed_format_positions_refuses_what_an_id_cannot_carry(
    positions: dict[str, Any], error: type[Exception], match: str
) -> None:
    """format_positions says what it cannot write; parse_positions takes a str."""
    with pytest.raises(error, match=match):
        broadcaster.format_positions(positions)
    with pytest.raises(TypeError, match="last_event_id must be a str, not bytes"):
        broadcaster.parse_positions(b"a=1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# merge(): one stream over several broadcasters
# ---------------------------------------------------------------------------


@async_test()
async def test_merge_reads_every_stream_and_ids_name_the_keys_with_history() -> None:
    """A merged stream yields the items of both broadcasters; its id names
    only the keys with history; resuming that part from it is exact, while
    the part without history is given no id."""
    messages: Broadcaster[str, str] = Broadcaster(history=5)
    presence: Broadcaster[str, int] = Broadcaster()
    stream = merge(messages.subscribe_many(["lobby"]), presence.subscribe_many(["lobby"]))
    messages.send("lobby", "hi")
    presence.send("lobby", 3)
    messages.send("lobby", "there")
    got = [await anext(stream) for _ in range(3)]
    assert sorted(got, key=str) == sorted([("lobby", "hi"), ("lobby", 3), ("lobby", "there")], key=str)
    assert [x for _, x in got if isinstance(x, str)] == ["hi", "there"]
    assert list(keyed_positions(stream)) == ["lobby"]
    lei = stream.last_event_id
    stream.close()
    messages.send("lobby", "missed")
    again = merge(messages.subscribe_many(["lobby"], last_event_id=lei), presence.subscribe_many(["lobby"]))
    assert again.resumed is True and again.gaps == ()
    assert await anext(again) == ("lobby", "missed")
    again.close()


@async_test()
async def test_merge_response_writes_ids_only_with_the_items_that_move_a_position() -> None:
    """In a response of a merged stream, an item of a broadcaster with history
    is written with the stream's id; one without history with no id (the
    client's last id stays the position it has reached)."""
    messages: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    presence: Broadcaster[str, Event] = Broadcaster()
    stream = merge(messages.subscribe_many(["lobby"]), presence.subscribe_many(["lobby"]))
    messages.send("lobby", Event("hi", event="message"))
    presence.send("lobby", Event("2", event="presence"))
    messages.remove("lobby")
    presence.remove("lobby")
    response = await client_request(messages.response(stream, lambda pair: pair[1]))
    epoch = re.search(rb"lobby=([0-9a-f]{12})-1", response.body)
    assert epoch is not None, response.body
    lei = b"lobby=" + epoch[1] + b"-1"
    assert sorted(response.body.split(b"\n\n")) == sorted(
        [b":", b"event: message\ndata: hi\nid: " + lei, b"event: presence\ndata: 2", b""]
    )


@async_test()
async def test_merge_response_never_lets_an_events_own_id_replace_the_position() -> None:
    """An event of a broadcaster without history that carries an id of its
    own is written without it, so the client keeps the position it reached
    and a reconnection resumes every key."""
    messages: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    presence: Broadcaster[str, Event] = Broadcaster()
    stream = merge(messages.subscribe_many(["a"]), presence.subscribe_many(["p"]))
    peer = AsgiPeer()
    task = asgi_serve(messages.response(stream), peer)
    messages.send("a", Event("1"))
    await peer.wait_until(lambda: b"data: 1" in b"".join(peer.bodies))
    presence.send("p", Event("2", id="user-7"))
    await peer.wait_until(lambda: b"data: 2" in b"".join(peer.bodies))
    peer.disconnect()
    await asgi_ended(task)
    parsed = parse_event_stream(b"".join(peer.bodies))
    assert [(e.type, e.data) for e in parsed.events] == [("a", "1"), ("p", "2")]
    assert b"user-7" not in b"".join(peer.bodies)
    assert parsed.events[1].last_event_id == parsed.events[0].last_event_id
    again = messages.subscribe_many(["a"], last_event_id=parsed.last_event_id)
    assert again.resumed is True
    again.close()


@async_test()
async def test_merge_reads_its_streams_in_turn() -> None:
    """With items waiting in several streams, reads take from each in turn
    (one busy broadcaster cannot starve another), in each one's order; a
    bounded take leaves the rest queued."""
    one: Broadcaster[str, int] = Broadcaster()
    two: Broadcaster[str, int] = Broadcaster()
    stream = merge(one.subscribe_many(["a"]), two.subscribe_many(["b"]))
    for i in range(3):
        one.send("a", i)
        two.send("b", 10 + i)
    got = [await anext(stream) for _ in range(4)]
    assert got == [("a", 0), ("b", 10), ("a", 1), ("b", 11)]
    items, ids, lines = stream._take(1)
    assert len(items) == 1 and ids is None and lines is not None and stream.queued == 1
    items, _, _ = stream._take(5)
    assert len(items) == 1 and stream.queued == 0
    stream.close()


@async_test()
async def test_merge_takes_the_streams_over_and_combines_resume_state() -> None:
    """The given streams are empty afterwards; resumed and gaps combine;
    keys lists every part's keys; closing the merged stream leaves every
    channel of every broadcaster."""
    one: Broadcaster[str, int] = Broadcaster(history=2)
    two: Broadcaster[str, int] = Broadcaster(history=2)
    a = one.subscribe_many(["a"], last_event_id="a=nope-1")
    b2 = two.subscribe_many(["b"])
    merged = merge(a, b2)
    assert a.closed and a.keys == () and a.last_event_id is None
    with pytest.raises(StopAsyncIteration):
        await anext(a)
    assert merged.keys == ("a", "b") and merged.resumed is False and merged.gaps == ("a",)
    assert merge(two.subscribe_many(["c"])).resumed is None
    merged.close()
    assert one.subscriber_count("a") == 0 and two.subscriber_count("b") == 0
    assert merged.closed


@async_test()
async def test_merge_bad_input_is_refused() -> None:
    """No stream, a non-stream, one stream twice or already merged, streams
    of two loops, clashing names with history, too many keys: clear errors."""
    one: Broadcaster[str, int] = Broadcaster(history=1)
    two: Broadcaster[str, int] = Broadcaster(history=1)
    with pytest.raises(ValueError, match="at least one stream"):
        merge()
    with pytest.raises(TypeError, match="must be a KeyedStream, not BroadcastStream"):
        merge(one.subscribe("x"))  # type: ignore[call-overload]
    s = one.subscribe_many(["a"])
    with pytest.raises(ValueError, match="merged once"):
        merge(s, s)
    merge(s).close()
    with pytest.raises(ValueError, match="merged once"):
        merge(s)
    with pytest.raises(ValueError, match="distinct names"):
        merge(one.subscribe_many(["a"]), two.subscribe_many(["a"]))
    with pytest.raises(ValueError, match="at most 100 keys, got 120"):
        merge(one.subscribe_many([f"a{i}" for i in range(60)]), two.subscribe_many([f"b{i}" for i in range(60)]))
    with pytest.raises(ValueError, match="over the 8192"):
        merge(
            one.subscribe_many([f"{i:035d}" for i in range(50)]),
            two.subscribe_many([f"{i:036d}" for i in range(50)]),
        )
    elsewhere: list[KeyedStream[str, int]] = []

    def other_loop() -> None:
        async def make() -> None:
            elsewhere.append(two.subscribe_many(["z"]))

        asyncio.run(make())

    thread = threading.Thread(target=other_loop)
    thread.start()
    thread.join()
    with pytest.raises(ValueError, match="one event loop"):
        merge(one.subscribe_many(["y"]), elsewhere[0])
    gc.collect()


# ---------------------------------------------------------------------------
# Keyed streams in a response
# ---------------------------------------------------------------------------


@async_test()
async def test_keyed_response_names_each_events_key_and_writes_the_streams_id() -> None:
    """Without render each event is written with its key's name as its type
    and the stream's id; a browser sees the key and can resume every key."""
    b: Broadcaster[str, Event] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    stream = b.subscribe_many(["lobby", "help"])
    b.send("lobby", Event("hi", event="chat"))
    b.send("help", Event("?"))
    b.remove("lobby")
    b.remove("help")
    peer = AsgiPeer()
    await asgi_call(b.response(stream), peer)
    assert len(peer.bodies) == 3, "both events in one body message"
    parsed = parse_event_stream(b"".join(peer.bodies))
    assert [(e.type, e.data) for e in parsed.events] == [("lobby", "hi"), ("help", "?")]
    lobby, help_, rest = peer.bodies[1].split(b"\n\n")
    assert lobby == b"event: chat\ndata: hi\nevent: lobby\nid: " + parsed.events[0].last_event_id.encode()
    assert help_ == b"data: ?\nevent: help\nid: " + parsed.events[1].last_event_id.encode() and rest == b""
    assert parsed.last_event_id == stream.last_event_id
    first = dict(pair.split("=") for pair in parsed.events[0].last_event_id.split(","))
    assert list(first) == ["lobby", "help"] and first["help"].endswith("-0")


@async_test()
async def test_keyed_response_render_gets_the_pair_and_ids_still_apply() -> None:
    """render receives (key, item); the stream's id is added to its event."""
    b: Broadcaster[str, int] = Broadcaster(history=5, config=SseConfig(keep_alive=None))
    stream = b.subscribe_many(["a", "b"])
    b.send("b", 7)
    b.remove("a")
    b.remove("b")

    def render(pair: tuple[str, int]) -> Event:
        return Event.json({"key": pair[0], "n": pair[1]}, event="update")

    response = await client_request(b.response(stream, render))
    parsed = parse_event_stream(response.body)
    assert [(e.type, e.data) for e in parsed.events] == [("update", '{"key":"b","n":7}')]
    assert parsed.last_event_id.startswith("a=") and ",b=" in parsed.last_event_id


@async_test()
async def test_keyed_response_on_gap_is_told_the_keys_to_reload() -> None:
    """on_gap as a function gets the gaps and its event is written first; as
    an Event it is written as it is; a function returning something else is
    refused at response()."""
    b: Broadcaster[str, Event] = Broadcaster(history=2, config=SseConfig(keep_alive=None))
    keep = b.subscribe_many(["a"])
    stream = b.subscribe_many(["a", "b"], last_event_id=keep.last_event_id)
    assert stream.gaps == ("b",)
    with pytest.raises(TypeError, match="on_gap's result must be an Event, not list"):
        b.response(stream, on_gap=list)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_gap must be an Event, a function of the gaps, or None, not str"):
        b.response(stream, on_gap="reload")  # type: ignore[call-overload]
    app = b.response(stream, on_gap=lambda gaps: Event.json(list(gaps), event="reload"))
    b.remove("a")
    b.remove("b")
    response = await client_request(app)
    assert response.body == b':\n\nevent: reload\ndata: ["b"]\n\n' and response.ended, response
    keep.close()


@async_test()
async def test_keyed_response_to_head_reads_nothing_and_leaves_every_channel() -> None:
    """HEAD: the headers and an empty body; the keyed stream is never read,
    and it is closed, leaving every channel."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe_many(["a", "b"])
    b.send("a", Event("x"))
    response = await client_request(b.response(stream), "HEAD")
    assert (response.status, response.raw_headers, response.body) == (200, ASGI_SSE_HEADERS, b"")
    assert response.ended
    assert stream.closed and stream.queued == 0 and len(b) == 0


@async_test()
async def test_keyed_response_client_leaving_leaves_every_channel() -> None:
    """A client leaving finishes the response and closes the stream: it
    leaves every channel at once."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    async with AsgiClient(b.response(b.subscribe_many(["a", "b"]))) as client:
        async with client.stream("GET", "/events") as response:
            b.send("b", Event("x"))
            assert await response.event() == SseEvent("b", "x", "")
            assert response.body == b":\n\ndata: x\nevent: b\n\n"
            assert len(b) == 2
        assert len(b) == 0


def test_keyed_response_of_plain_items_needs_a_render(caplog: pytest.LogCaptureFixture) -> None:
    """Without render, a keyed stream's items must be Events: anything else
    ends the response cleanly with an error naming its type."""

    async def main() -> AsgiPeer:
        b: Broadcaster[str, int] = Broadcaster(config=SseConfig(keep_alive=None))
        stream = b.subscribe_many(["a"])
        b.send("a", 1)
        peer = AsgiPeer()
        await asgi_call(b.response(stream), peer)  # type: ignore[arg-type]
        assert len(b) == 0, "the stream was closed"
        return peer

    peer = asyncio.run(main())
    assert peer.bodies == [b":\n\n", b""]
    [record] = asgi_records(caplog, logging.ERROR)
    assert record.exc_info is not None and "got int" in str(record.exc_info[1])


@async_test()
async def test_keyed_replay_keeps_the_keyed_streams_ids_and_gaps() -> None:
    """replay(items, keyed) writes the items as given, then the keyed stream
    with its event lines and ids; on_gap follows the keyed stream's gaps."""
    b: Broadcaster[str, Event] = Broadcaster(history=2, config=SseConfig(keep_alive=None))
    stream = b.subscribe_many(["a"], last_event_id="a=gone-1")
    b.send("a", Event("live"))
    b.remove("a")
    peer = AsgiPeer()
    stored = replay([Event("stored")], stream)  # stored events, then keyed pairs: a replay of objects
    await asgi_call(b.response(stored, on_gap=Event(event="reload", data="")), peer)  # type: ignore[arg-type]
    parsed = parse_event_stream(b"".join(peer.bodies))
    assert [(e.type, e.data) for e in parsed.events] == [("reload", ""), ("message", "stored"), ("a", "live")]
    assert parsed.last_event_id.startswith("a=")


# ---------------------------------------------------------------------------
# Keyed streams as a state machine, against a model (hypothesis)
# ---------------------------------------------------------------------------


class _KeyedMachine(RuleBasedStateMachine):
    """Keyed streams over three keys of a Broadcaster(history=1..3) with a
    buffer no burst fills: subscribe_many (fresh, or resuming from an id a
    stream had), send from a second thread, read, close, remove, against a
    model of channel lifetimes and per-key positions, checked after every
    step. Items are unique ints; a channel lifetime is the list of items it
    retained from its creation on."""

    KEYS = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = concurrent.futures.ThreadPoolExecutor(1)
        self.b: Broadcaster[str, int] = Broadcaster(buffer=10_000, history=1)
        self.history = 1
        self.items = itertools.count()
        # key -> the items of its channel's current lifetime; absent: no channel
        self.lifetimes: dict[str, list[int]] = {}
        self.streams: dict[int, KeyedStream[str, int]] = {}
        # sid -> keys; open keys; items delivered, not read; position per key:
        # (the lifetime's list object, how many of its items were read).
        self.keys: dict[int, tuple[str, ...]] = {}
        self.open: dict[int, set[str]] = {}
        self.pending: dict[int, list[tuple[str, int]]] = {}
        self.read_to: dict[int, dict[str, tuple[list[int], int]]] = {}
        # ids streams had, with the positions they stood for
        self.ids: list[tuple[str, dict[str, tuple[list[int], int]]]] = []
        self.sids = itertools.count()

    def teardown(self) -> None:
        for stream in self.streams.values():
            self.on_loop(stream.close)
        self.streams.clear()
        self.thread.shutdown()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def on_loop(self, fn: Callable[[], R]) -> R:
        async def call() -> R:
            return fn()

        result = self.loop.run_until_complete(call())
        self.loop.run_until_complete(asyncio.sleep(0))  # what was scheduled meanwhile
        return result

    @initialize(history=st.integers(1, 3))
    def make(self, history: int) -> None:
        self.history = history
        self.b = Broadcaster(buffer=10_000, history=history, linger=3600)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True), resume=st.integers(0, 8))
    def subscribe(self, keys: list[str], resume: int) -> None:
        sid = next(self.sids)
        lei, wanted = self.ids[-1 - resume] if resume < len(self.ids) else (None, {})
        note(f"s{sid} = subscribe_many({keys}, last_event_id={lei!r})")
        stream = self.on_loop(lambda: self.b.subscribe_many(keys, last_event_id=lei))
        gaps: list[str] = []
        self.pending[sid] = []
        self.read_to[sid] = {}
        for key in keys:
            lifetime = self.lifetimes.setdefault(key, [])
            had = wanted.get(key)
            retained = lifetime[-self.history :]
            if had is not None and had[0] is lifetime and len(lifetime) - had[1] <= len(retained):
                self.pending[sid] += [(key, x) for x in lifetime[had[1] :]]
                self.read_to[sid][key] = had
            else:
                self.read_to[sid][key] = (lifetime, len(lifetime))
                if lei is not None:
                    gaps.append(key)
        assert stream.gaps == tuple(gaps)
        assert stream.resumed is (None if lei is None else not gaps)
        self.streams[sid] = stream
        self.keys[sid] = tuple(keys)
        self.open[sid] = set(keys)

    @rule(key=st.sampled_from(KEYS))
    def send(self, key: str) -> None:
        item = next(self.items)
        count = self.thread.submit(self.b.send, key, item).result()
        self.on_loop(lambda: None)  # the deliveries, scheduled from the thread
        lifetime = self.lifetimes.get(key)
        members = [sid for sid in self.streams if key in self.open[sid]]
        assert count == (len(members) if lifetime is not None else 0)
        if lifetime is not None:
            lifetime.append(item)
            for sid in members:
                self.pending[sid].append((key, item))

    @precondition(lambda self: self.streams)
    @rule(index=st.integers(0, 10), n=st.integers(1, 5))
    def read(self, index: int, n: int) -> None:
        sid = sorted(self.streams)[index % len(self.streams)]
        stream = self.streams[sid]
        n = min(n, len(self.pending[sid]))
        for _ in range(n):
            got = self.loop.run_until_complete(asyncio.wait_for(anext(stream), 2))
            expected = self.pending[sid].pop(0)
            assert got == expected
            key, item = got
            lifetime, _ = self.read_to[sid][key]
            self.read_to[sid][key] = (lifetime, lifetime.index(item) + 1)
        lei = stream.last_event_id
        assert lei is not None
        self.ids.append((lei, dict(self.read_to[sid])))

    @precondition(lambda self: self.streams)
    @rule(index=st.integers(0, 10))
    def zclose(self, index: int) -> None:
        sid = sorted(self.streams)[index % len(self.streams)]
        self.on_loop(self.streams.pop(sid).close)
        del self.open[sid]

    @rule(key=st.sampled_from(KEYS))
    def zremove(self, key: str) -> None:
        self.on_loop(lambda: self.b.remove(key))
        self.lifetimes.pop(key, None)
        for sid in self.streams:
            self.open[sid].discard(key)

    @invariant()
    def matches_the_model(self) -> None:
        for key in self.KEYS:
            members = sum(key in keys for keys in self.open.values())
            assert self.b.subscriber_count(key) == members
            assert (key in self.b) == (key in self.lifetimes)
        for sid, stream in self.streams.items():
            assert stream.queued == len(self.pending[sid])
            assert stream.keys == tuple(k for k in self.keys[sid] if k in self.open[sid])
            assert stream.closed == (not self.open[sid])


def test_property_keyed_state_machine() -> None:
    """Random interleavings of subscribe_many (fresh or resuming from any id
    a stream had), send from another thread, read, close and remove over
    three keys match the model after every step: each stream's items and
    their order, resume outcomes and gaps, send()'s count, subscriber_count,
    key membership, keys, queued and closed."""
    _run_machine(_KeyedMachine, settings=_budget(60, steps=40))


# ===========================================================================
# response(): the ASGI layer
# ===========================================================================

# ---------------------------------------------------------------------------
# The start message and the first chunk
# ---------------------------------------------------------------------------


@async_test()
async def test_response_start_message_has_exactly_the_sse_headers() -> None:
    """The start message is status 200 with exactly the three SSE headers."""
    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event]().response(AsgiRecordingSource()), peer)
    assert peer.sent[0] == asgi_start(), f"wrong start message: {peer.sent[0]}"


@async_test()
async def test_response_start_message_appends_config_headers() -> None:
    """SseConfig.headers are added after the built-in headers, names and values as bytes."""
    config = SseConfig(headers=(("x-request-id", "42"), ("access-control-allow-origin", "*")))
    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event](config=config).response(AsgiRecordingSource()), peer)
    expected = asgi_start([*ASGI_SSE_HEADERS, (b"x-request-id", b"42"), (b"access-control-allow-origin", b"*")])
    assert peer.start == expected, f"config headers not appended: {peer.start['headers']}"


@async_test()
async def test_response_config_header_replaces_a_builtin_header() -> None:
    """A config header named like a built-in one replaces it: the name appears once."""
    config = SseConfig(headers=(("cache-control", "no-store"),))
    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event](config=config).response(AsgiRecordingSource()), peer)
    expected = asgi_start(
        [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"x-accel-buffering", b"no"),
            (b"cache-control", b"no-store"),
        ]
    )
    assert peer.start == expected, f"cache-control not replaced: {peer.start['headers']}"


@async_test()
async def test_response_first_chunk_is_an_empty_comment_before_any_event() -> None:
    """Right after start comes b":\\n\\n" with more_body, even when an event is already waiting."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    event = Event("ready")
    b.send("k", event)
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(2)
    peer.disconnect()
    await asgi_ended(task)
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode())], f"wrong message order: {peer.sent}"


@async_test()
async def test_response_first_chunk_is_the_retry_frame_when_configured() -> None:
    """With SseConfig(retry=3000) the first chunk is b"retry: 3000\\n\\n" with more_body."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(retry=3000))
    event = Event("x")
    peer = AsgiPeer()
    await asgi_call(b.response(AsgiRecordingSource([event])), peer)
    expected = [asgi_start(), asgi_body(b"retry: 3000\n\n"), asgi_body(event.encode()), ASGI_FINAL]
    assert peer.sent == expected, f"retry frame not first: {peer.sent}"


# ---------------------------------------------------------------------------
# Events, and the events waiting together
# ---------------------------------------------------------------------------


@async_test()
async def test_response_writes_stream_events_in_order_those_waiting_together() -> None:
    """Events sent before and after the response started arrive in order, as
    their exact frames; those waiting together share one body message."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    events = [Event("one", id="1"), Event("two\nlines", event="multi"), Event(comment="note"), Event.json({"n": 4})]
    b.send("k", events[0])
    b.send("k", events[1])
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(2)
    b.send("k", events[2])
    b.send("k", events[3])
    await peer.wait_for_bodies(3)
    b.remove("k")
    await asgi_ended(task)
    bodies = [events[0].encode() + events[1].encode(), events[2].encode() + events[3].encode()]
    assert peer.sent == [asgi_start(), ASGI_FIRST, *map(asgi_body, bodies), ASGI_FINAL], f"wrong messages: {peer.sent}"
    assert peer.bodies[1:3] == [
        b"id: 1\ndata: one\n\nevent: multi\ndata: two\ndata: lines\n\n",
        b': note\n\ndata: {"n":4}\n\n',
    ], "the frames on the wire are not the events' exact bytes"


@async_test()
async def test_response_streams_a_plain_async_generator() -> None:
    """A plain async generator of events is streamed in order (read ahead in a
    task of the response's, so the events it yields at once go out together),
    then ends with the final chunk."""
    events = [Event("a"), Event("b", id="2"), Event("c", event="e")]

    async def source() -> AsyncIterator[Event]:
        for event in events:
            yield event

    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event]().response(source()), peer)
    expected = [asgi_start(), ASGI_FIRST, asgi_body(b"".join(e.encode() for e in events)), ASGI_FINAL]
    assert peer.sent == expected, f"wrong messages: {peer.sent}"


@async_test()
async def test_response_exhausted_source_ends_with_one_final_message() -> None:
    """An exhausted source gives one {body b"", more_body False} and nothing after it."""
    event = Event("only")
    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event]().response(AsgiRecordingSource([event])), peer)
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode()), ASGI_FINAL], f"wrong end: {peer.sent}"


@async_test()
async def test_response_exhausted_source_is_closed() -> None:
    """After the source is exhausted the response aclose()s it, once, and reads no more."""
    source = AsgiRecordingSource([Event("only")])
    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event]().response(source), peer)
    assert source.calls == ["__anext__", "__anext__", "aclose"], f"wrong calls on the source: {source.calls}"


@async_test()
async def test_response_of_a_plain_source_never_writes_on_gap() -> None:
    """A plain async iterable (or a channel) cannot have failed to resume:
    on_gap is never written for it."""
    peer = AsgiPeer()
    gap = Event(comment="gap")
    await asgi_call(Broadcaster[str, Event]().response(AsgiRecordingSource([Event("x")]), on_gap=gap), peer)
    assert peer.bodies == [b":\n\n", b"data: x\n\n", b""], peer.bodies


@async_test()
async def test_response_reads_a_plain_source_at_most_two_messages_ahead() -> None:
    """A plain async iterable is read ahead by a task of the response's, so that
    what it yields at once goes out together; while the client does not take
    what was written, it is read no further than the message being written, a
    full queue (64 each) and the item in hand."""
    yielded = [0]

    async def numbers() -> AsyncIterator[Event]:
        for n in range(1000):
            yielded[0] += 1
            yield Event(str(n))

    peer = AsgiPeer()
    send = FaultSend(peer, 2, block=True)  # the first message of events never completes
    task = asgi_serve(Broadcaster[str, Event]().response(numbers()), peer, send)
    await send.entered.wait()
    for _ in range(20):  # loop iterations: give the reading task every chance to run ahead
        await asyncio.sleep(0)
    assert yielded[0] == 2 * 64 + 1, f"read {yielded[0]} items ahead of a stuck client"
    peer.disconnect()
    await asgi_ended(task)


def split_frames(body: bytes) -> list[bytes]:
    """The SSE frames of ``body``: this module's frames hold no blank line but
    the one that ends them."""
    frames = re.findall(rb".*?\n\n", body, re.DOTALL)
    assert b"".join(frames) == body, f"a partial frame in {body!r}"
    return frames


@async_test()
async def test_response_writes_the_events_waiting_together_in_one_message() -> None:
    """Events a stream holds when the response reads are written in one body
    message, in order, each frame whole; the next event, sent once that
    message is written, goes out on its own (nothing waits for more)."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    stream = b.subscribe("k")
    events = [Event("one", event="a"), Event("two\nlines", id="7"), Event(comment="c"), Event("")]
    for event in events:
        b.send("k", event)
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(2)
    assert peer.bodies[1:] == [b"".join(e.encode() for e in events)], peer.bodies
    b.send("k", Event("later"))
    await peer.wait_for_bodies(3)
    assert peer.bodies[2] == Event("later").encode(), peer.bodies
    b.remove("k")
    await asgi_ended(task)
    parsed = parse_event_stream(b"".join(peer.bodies))
    assert [(e.type, e.data) for e in parsed.events] == [
        ("a", "one"),
        ("message", "two\nlines"),
        ("message", ""),
        ("message", "later"),
    ]


@async_test()
async def test_response_gathers_a_channels_queued_events_in_one_message() -> None:
    """A channel() closure that sends several events before the response runs
    gets them written in one message, then the final chunk."""
    events = [Event(f"e{i}") for i in range(5)]

    async def closure(tx: Sender) -> None:
        for event in events:
            await tx.send(event)

    peer = AsgiPeer()
    await asgi_ended(asgi_serve(Broadcaster[str, Event]().channel(closure), peer))
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(b"".join(e.encode() for e in events)), ASGI_FINAL]


@pytest.mark.parametrize("history", [0, 200], ids=["plain", "history"])
@async_test()
async def test_response_gathers_at_most_64_events_per_message(history: int) -> None:
    """A backlog of waiting events (a large buffer, or a history replay) is
    written in messages of at most 64 events, in order, every one whole."""
    b: Broadcaster[str, Event] = Broadcaster(buffer=200, history=history, config=SseConfig(keep_alive=None))
    early = b.subscribe("k")
    events = [Event(str(i)) for i in range(150)]
    for event in events:
        b.send("k", event)
    stream = b.subscribe("k", last_event_id=f"{b._channels['k'].epoch}-0") if history else early
    assert stream.queued == 150 and stream.resumed is (True if history else None)
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(4)
    b.remove("k")
    await asgi_ended(task)
    bodies = peer.bodies[1:-1]
    assert [len(split_frames(body)) for body in bodies] == [64, 64, 22], bodies
    data = [e.data for e in parse_event_stream(b"".join(bodies)).events]
    assert data == [str(i) for i in range(150)], data
    early.close()


@async_test()
async def test_response_renders_event_items_waiting_together() -> None:
    """With render, Event items waiting together are written as render makes
    them, not as they came (their own frames are not the ones to write)."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    stream = b.subscribe("k")
    for data in ("a", "b", "c"):
        b.send("k", Event(data))
    b.remove("k")
    peer = AsgiPeer()
    await asgi_ended(asgi_serve(b.response(stream, lambda e: Event((e.data or "").upper(), event="up")), peer))
    expected = b"".join(Event(d, event="up").encode() for d in "ABC")
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(expected), ASGI_FINAL], peer.sent


def test_response_writes_the_events_before_a_waiting_item_that_is_no_event(caplog: pytest.LogCaptureFixture) -> None:
    """Items that are no Event among those waiting: the events before the
    first of them are written in the message (none is skipped over), then the
    response ends with an ERROR naming its type."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b: Broadcaster[str, Any] = Broadcaster(config=SseConfig(keep_alive=None))
        stream = b.subscribe("k")
        for item in (Event("a"), Event("b"), "c", 4, Event("e")):
            b.send("k", item)
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(b.response(stream), peer))
        ab = asgi_body(Event("a").encode() + Event("b").encode())
        assert peer.sent == [asgi_start(), ASGI_FIRST, ab, ASGI_FINAL], peer.sent
        assert stream.closed

    scenario()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["SSE event source raised; ending the response"], errors
    assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "SSE events must be Event objects, got str"


def test_response_render_raising_stop_async_iteration_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A render that raises StopAsyncIteration does not end the response as if
    the source were exhausted: it is an ERROR after the events before it."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    def render(n: int) -> Event:
        if n == 3:
            raise StopAsyncIteration
        return Event(str(n))

    @async_test()
    async def scenario() -> None:
        b: Broadcaster[str, int] = Broadcaster(config=SseConfig(keep_alive=None))
        stream = b.subscribe("k")
        for n in (1, 2, 3, 4):
            b.send("k", n)
        peer = AsgiPeer()
        await asgi_call(b.response(stream, render), peer)
        assert peer.bodies == [b":\n\n", b"data: 1\n\ndata: 2\n\n", b""], peer.bodies

    scenario()
    asgi_logged_stop(caplog, "render raised StopAsyncIteration()")


@pytest.mark.parametrize("policy", list(LagPolicy), ids=lambda p: p.name)
@async_test()
async def test_response_reports_a_due_lag_before_taking_anything(policy: LagPolicy) -> None:
    """A lag that is due is reported before any item is taken: ERROR ends the
    response with nothing more written, END ends it too, SKIP writes what is
    left after the lag in one message."""
    b: Broadcaster[str, Event] = Broadcaster(buffer=2, config=SseConfig(keep_alive=None))
    stream = b.subscribe("k").on_lag(policy)
    for n in range(4):
        b.send("k", Event(str(n)))
    assert stream.queued == 2
    b.remove("k")
    peer = AsgiPeer()
    await asgi_ended(asgi_serve(b.response(stream), peer))
    after = [asgi_body(Event("2").encode() + Event("3").encode())] if policy is LagPolicy.SKIP else []
    assert peer.sent == [asgi_start(), ASGI_FIRST, *after, ASGI_FINAL], peer.sent


# ---------------------------------------------------------------------------
# HEAD
# ---------------------------------------------------------------------------


@async_test()
async def test_response_head_sends_headers_and_an_empty_body_only() -> None:
    """HEAD gets the start message and one empty final body, no first chunk."""
    peer = AsgiPeer(method="HEAD")
    await asgi_call(Broadcaster[str, Event]().response(AsgiRecordingSource([Event("x")])), peer)
    assert peer.sent == [asgi_start(), ASGI_FINAL], f"wrong HEAD response: {peer.sent}"


@async_test()
async def test_response_head_never_iterates_the_source_and_closes_it() -> None:
    """HEAD never calls __anext__ on the source and aclose()s it."""
    source = AsgiRecordingSource([Event("x")])
    await client_request(Broadcaster[str, Event]().response(source), "HEAD")
    assert source.calls == ["aclose"], f"HEAD touched the source: {source.calls}"


@async_test()
async def test_response_head_releases_a_stream_subscription() -> None:
    """HEAD on a stream response leaves no subscriber and no channel behind."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    await client_request(b.response(stream), "HEAD")
    assert b.subscriber_count("k") == 0, "HEAD left the subscription alive"
    assert "k" not in b, "HEAD left the channel in the registry"
    assert stream.closed, "HEAD did not close the stream"


# ---------------------------------------------------------------------------
# Keep-alives and the one timer
# ---------------------------------------------------------------------------


@async_test()
async def test_response_keep_alive_writes_empty_comments_on_silence() -> None:
    """An idle stream gets b":\\n\\n" about every keep_alive seconds, never sooner."""
    interval = 0.05
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=interval))
    peer = AsgiPeer()
    send = AsgiStampedSend(peer)
    task = asgi_serve(b.response(AsgiRecordingSource(wait=True)), peer, send)
    await peer.wait_for_bodies(4)
    peer.disconnect()
    await asgi_ended(task)
    assert peer.bodies[:4] == [ASGI_EMPTY_COMMENT] * 4, f"keep-alives are not empty comments: {peer.bodies}"
    times = [t for t, _ in send.stamps[:4]]
    gaps = [later - earlier for earlier, later in pairwise(times)]
    assert all(gap >= 0.8 * interval for gap in gaps), f"a keep-alive came before {interval} s of silence: {gaps}"
    assert times[3] - times[0] < 3.0, f"three keep-alives took {times[3] - times[0]:.2f} s at a {interval} s interval"
    assert all(m["more_body"] is True for m in peer.sent[1:]), f"a keep-alive ended the body: {peer.sent}"


@async_test()
async def test_response_keep_alive_uses_the_configured_comment() -> None:
    """With keep_alive_comment="ping" the keep-alive frame is b": ping\\n\\n"."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=0.05, keep_alive_comment="ping"))
    peer = AsgiPeer()
    task = asgi_serve(b.response(AsgiRecordingSource(wait=True)), peer)
    await peer.wait_for_bodies(3)
    peer.disconnect()
    await asgi_ended(task)
    assert peer.sent[:4] == [asgi_start(), ASGI_FIRST, asgi_body(b": ping\n\n"), asgi_body(b": ping\n\n")], (
        f"wrong keep-alive frames: {peer.sent}"
    )


@async_test()
async def test_response_without_keep_alive_writes_nothing_on_silence() -> None:
    """With keep_alive=None an idle stream writes nothing after the first chunk."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    peer = AsgiPeer()
    task = asgi_serve(b.response(AsgiRecordingSource(wait=True)), peer)
    await peer.wait_for_bodies(1)
    asyncio.get_running_loop().call_later(0.25, peer.disconnect)  # the silence under test
    await asgi_ended(task)
    assert peer.sent == [asgi_start(), ASGI_FIRST], f"something was written without keep-alive: {peer.sent}"


@async_test()
async def test_response_keep_alive_timer_restarts_after_each_event() -> None:
    """Events every half keep_alive leave no room for a keep-alive between them."""
    interval = 0.2
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=interval))
    stream = b.subscribe("k")
    peer = AsgiPeer()
    send = AsgiStampedSend(peer)
    task = asgi_serve(b.response(stream), peer, send)
    events = [Event(str(i)) for i in range(6)]
    for n, event in enumerate(events, start=2):
        await asyncio.sleep(interval / 2)  # the pace under test
        b.send("k", event)
        await peer.wait_for_bodies(n)
    b.remove("k")
    await asgi_ended(task)
    assert [body for body in peer.bodies if body != ASGI_EMPTY_COMMENT] == [e.encode() for e in events] + [b""]
    # A keep-alive is legitimate only after a real `interval` of silence (a
    # loaded machine may stall the test's sleep); one after an event that came
    # less than `interval` earlier means the timer did not restart.
    silences = [t - earlier for (earlier, _), (t, body) in pairwise(send.stamps) if body == ASGI_EMPTY_COMMENT]
    assert all(s >= 0.8 * interval for s in silences), f"keep-alive after only {silences} s of silence"


@async_test()
async def test_response_waiting_never_cancels_the_source() -> None:
    """A generator slower than keep_alive sees no CancelledError or GeneratorExit, and all its items arrive."""
    seen: list[str] = []
    events = [Event("slow 1"), Event("slow 2")]

    async def source() -> AsyncIterator[Event]:
        try:
            for event in events:
                await asyncio.sleep(0.15)  # the slowness under test
                yield event
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise

    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=0.05))
    peer = AsgiPeer()
    await asgi_call(b.response(source()), peer)
    assert seen == [], f"the source was interrupted while it worked: {seen}"
    assert [body for body in peer.bodies if body != ASGI_EMPTY_COMMENT] == [e.encode() for e in events] + [b""]
    assert peer.bodies.count(ASGI_EMPTY_COMMENT) >= 2, f"no keep-alive while the source was slow: {peer.bodies}"


def test_response_slow_event_send_within_the_timeout_outlasts_a_keep_alive_wake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An event send() slower than keep_alive but within send_timeout does not end the
    response when the timer wakes for a keep-alive in the middle of it."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b = Broadcaster[str, Event](config=SseConfig(keep_alive=0.05, send_timeout=5.0))
        stream = b.subscribe("k")
        peer = AsgiPeer()
        slow = Event("slow")

        async def send(message: AsgiMessage) -> None:
            if message.get("body") == slow.encode():
                await asyncio.sleep(0.2)  # the slow client under test: 4 keep-alive periods
            await peer.send(message)

        task = asgi_serve(b.response(stream), peer, send)
        await peer.wait_for_bodies(1)
        b.send("k", slow)
        await peer.wait_until(lambda: slow.encode() in peer.bodies)
        b.remove("k")
        await asgi_ended(task)
        assert peer.ended, f"the response did not end cleanly: {peer.sent}"

    scenario()
    records = [r.getMessage() for r in caplog.records if r.name == "broadcaster" and r.levelno >= logging.INFO]
    assert records == [], f"the slow send was treated as a timeout: {records}"


def count_timer_ticks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the runs of the responses' timer (``_SseResponse._tick``, the one
    wake-up for keep-alives and send timeouts); returns a one-element list
    holding the count."""
    count = [0]
    tick = _SseResponse._tick

    def counting_tick(self: _SseResponse) -> None:
        count[0] += 1
        tick(self)

    monkeypatch.setattr(_SseResponse, "_tick", counting_tick)
    return count


@async_test()
async def test_response_send_that_hangs_midway_through_a_wait_times_out_without_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A send() that starts hanging halfway through the timer's wait times out
    send_timeout after it began, and the timer wakes twice for it (at the
    deadline of the previous write, then at this one's), never polls."""
    ticks = count_timer_ticks(monkeypatch)
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=0.1))
    stream = b.subscribe("k")
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(1)
    await asyncio.sleep(0.05)  # timing under test: the send starts halfway through the timer's wait
    peer.send_hangs = True
    loop = asyncio.get_running_loop()
    began = loop.time()
    b.send("k", Event("stuck"))
    await asgi_ended(task, within=2.0)
    assert loop.time() - began >= 0.09, f"ended after {loop.time() - began:.3f} s, before send_timeout"
    assert peer.sent == [asgi_start(), ASGI_FIRST], f"wrong messages: {peer.sent}"
    assert ticks[0] == 2, f"the timer ran {ticks[0]} times for one timeout"


def coarse_loop_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Make the running loop's clock advance in steps of 1/64 s (as Windows'
    monotonic clock did before Python 3.13), so that a deadline that is a
    whole number of steps away is read exactly; returns the step."""
    step = 1 / 64
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: time.monotonic() // step * step)
    return step


@pytest.mark.parametrize("clock", ["fine", "coarse"])
@async_test()
async def test_response_keep_alives_are_written_without_spinning(monkeypatch: pytest.MonkeyPatch, clock: str) -> None:
    """Between keep-alives the timer sleeps until the next one is due: one
    wake-up per keep-alive (never polls), also on a coarse clock, which reads
    the very moment a keep-alive falls due."""
    interval = 4 * coarse_loop_clock(monkeypatch) if clock == "coarse" else 0.05
    ticks = count_timer_ticks(monkeypatch)
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=interval, send_timeout=None))
    stream = b.subscribe("k")
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(3)  # the first chunk and two keep-alives
    b.remove("k")
    await asgi_ended(task)
    assert peer.bodies[1:3] == [b":\n\n", b":\n\n"], f"wrong bodies: {peer.bodies}"
    assert ticks[0] == 2, f"the timer ran {ticks[0]} times for two keep-alives"


@async_test()
async def test_response_send_timeout_on_a_coarse_clock_ends_the_response_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a coarse loop clock, which reads the very moment a hung send() reaches
    send_timeout, the send is abandoned then: the timer runs once for it (it
    does not poll until the clock moves on)."""
    timeout = 4 * coarse_loop_clock(monkeypatch)
    ticks = count_timer_ticks(monkeypatch)
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=timeout))
    peer = AsgiPeer()
    peer.send_hangs = True
    await asgi_ended(asgi_serve(b.response(b.subscribe("k")), peer))
    assert peer.sent == [], f"wrong messages: {peer.sent}"
    assert ticks[0] == 1, f"the timer ran {ticks[0]} times for one timeout"


@async_test()
async def test_response_timer_run_at_a_write_deadline_waits_on_for_the_keep_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With send_timeout shorter than keep_alive, the timer armed by a write
    runs at that write's deadline, finds it done and no keep-alive due, and
    re-arms for the keep-alive without waking the response: the source is read
    only when the keep-alive is due (and after each write), and the timer runs
    twice in all (never polls)."""
    ticks = count_timer_ticks(monkeypatch)
    takes = [0]
    take = BroadcastStream._take

    def counting_take(self: BroadcastStream[Any], limit: int) -> tuple[list[Any], list[str] | None, None]:
        takes[0] += 1
        return take(self, limit)

    monkeypatch.setattr(BroadcastStream, "_take", counting_take)
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=0.1, send_timeout=0.01))
    peer = AsgiPeer()
    task = asgi_serve(b.response(b.subscribe("k")), peer)
    await peer.wait_for_bodies(2)  # the first chunk, then a keep-alive
    seen = (ticks[0], takes[0])
    b.remove("k")
    await asgi_ended(task)
    assert peer.bodies == [b":\n\n", b":\n\n", b""], peer.bodies
    # Reads: after the first chunk, when the keep-alive is due, after it. A
    # stalled loop may run the first timer only once the keep-alive is due.
    assert seen[1] == 3 and seen[0] in (1, 2), f"the timer ran {seen[0]} times and the source was read {seen[1]} times"


@async_test()
async def test_response_idle_past_its_send_timeout_is_not_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timer armed by the last write finds no send in progress when it
    runs, on an idle response without keep-alives: it does nothing, and the
    response goes on."""
    ticked = asyncio.Event()
    tick = _SseResponse._tick

    def noted_tick(self: _SseResponse) -> None:
        tick(self)
        ticked.set()

    monkeypatch.setattr(_SseResponse, "_tick", noted_tick)
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=0.02))
    peer = AsgiPeer()
    task = asgi_serve(b.response(b.subscribe("k")), peer)
    await peer.wait_for_bodies(1)
    await ticked.wait()
    b.send("k", Event("later"))
    await peer.wait_for_bodies(2)
    b.remove("k")
    await asgi_ended(task)
    assert peer.bodies == [b":\n\n", b"data: later\n\n", b""], peer.bodies


@async_test()
async def test_response_whose_abandoned_send_returns_anyway_goes_on() -> None:
    """A server's send() that swallows the cancellation of a timed-out send and
    returns is taken as having written: the response goes on with the next
    event, and the cancellation request is taken back (the task is not
    cancelled later)."""
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=0.02))
    peer = AsgiPeer()
    swallowed = asyncio.Event()
    send = asgi_stalled_send(peer, lambda exc: swallowed.set())
    task = asgi_serve(b.response(b.subscribe("k")), peer, send)
    await peer.wait_for_bodies(1)
    b.send("k", Event("slow"))
    await swallowed.wait()
    b.send("k", Event("next"))
    await peer.wait_for_bodies(3)
    b.remove("k")
    await asgi_ended(task)
    assert peer.bodies == [b":\n\n", b"data: slow\n\n", b"data: next\n\n", b""], peer.bodies


@async_test()
async def test_response_whose_abandoned_send_fails_otherwise_takes_its_cancellation_back() -> None:
    """A server's send() that turns the cancellation of a timed-out send into
    another error (as a transport may) ends the response as that error says,
    and leaves no cancellation pending in the server's task (3.11+ counts
    them)."""
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=0.02))
    peer = AsgiPeer()

    def reset(exc: asyncio.CancelledError) -> None:
        raise ConnectionResetError("peer reset") from None

    send = asgi_stalled_send(peer, reset)
    task = asyncio.ensure_future(asgi_pending_cancellations(b.response(b.subscribe("k")), peer, send))
    await peer.wait_for_bodies(1)
    b.send("k", Event("slow"))
    assert await task == 0, "a cancellation request was left pending"
    assert peer.bodies == [b":\n\n"], peer.bodies


@async_test()
async def test_response_abandons_a_send_with_a_cancellation_that_says_so() -> None:
    """The cancellation with which a response abandons a timed-out send()
    carries the message "SSE response: send abandoned", so that the server's
    send sees why it is cancelled."""
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=0.02))
    peer = AsgiPeer()
    seen: list[tuple[Any, ...]] = []

    def record(exc: asyncio.CancelledError) -> None:
        seen.append(exc.args)
        raise exc

    task = asgi_serve(b.response(b.subscribe("k")), peer, asgi_stalled_send(peer, record))
    await peer.wait_for_bodies(1)
    b.send("k", Event("slow"))
    await asgi_ended(task)
    assert seen == [("SSE response: send abandoned",)], f"the send was cancelled with {seen}"


@async_test()
async def test_response_whose_abandoned_send_raises_a_bare_cancellation_knows_it_on_3_11() -> None:
    """A server's send() that answers the abandonment of a timed-out send with a
    CancelledError of its own, without the message: Python 3.11+ counts the
    cancellation requests, so the response knows it for its own and ends (none
    left pending); 3.10 has only the message to go by, and lets it propagate."""
    b = Broadcaster[str, Event](config=SseConfig(keep_alive=None, send_timeout=0.02))
    peer = AsgiPeer()

    def bare(exc: asyncio.CancelledError) -> None:
        raise asyncio.CancelledError from None

    send = asgi_stalled_send(peer, bare)
    task = asyncio.ensure_future(asgi_pending_cancellations(b.response(b.subscribe("k")), peer, send))
    await peer.wait_for_bodies(1)
    b.send("k", Event("slow"))
    await asyncio.wait((task,), timeout=3.0)
    if sys.version_info >= (3, 11):
        assert not task.cancelled(), "the abandonment was taken for a cancellation of the server's"
        assert task.result() == 0, "a cancellation request was left pending"
    else:
        assert task.cancelled(), "a cancellation without the message was swallowed on 3.10"
    assert peer.bodies == [b":\n\n"], peer.bodies


def test_response_client_leaving_as_its_send_times_out_abandons_the_send_once() -> None:
    """The client leaves and the send in progress times out in the same loop
    iteration: the send is abandoned once, the app returns (no cancellation
    escapes), and no cancellation is left pending in the server's task."""

    async def scenario() -> tuple[bool, int]:
        b = Broadcaster[str, Event](config=SseConfig(send_timeout=0.05, keep_alive=None))
        loop = asyncio.get_running_loop()
        left = loop.create_future()
        calls = 0

        async def receive() -> AsgiMessage:
            await left
            return ASGI_DISCONNECT

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:  # the first event: it hangs, and the client leaves as it times out

                def arrange() -> None:
                    left.set_result(None)  # receive() returns at the next iteration...
                    loop.call_soon(time.sleep, 0.1)  # ...which blocks the loop past the send's deadline

                loop.call_soon(arrange)
                await asyncio.Event().wait()

        scope = {"type": "http", "method": "GET", "headers": []}
        task = asyncio.ensure_future(b.response(b.subscribe("k"))(scope, receive, send))
        await asyncio.sleep(0)
        b.send("k", Event("x"))
        await asyncio.wait((task,), timeout=2)
        return task.cancelled(), int(getattr(task, "cancelling", lambda: 0)())

    cancelled, pending = asyncio.run(scenario())
    assert not cancelled, "the response raised a cancellation nobody asked for"
    assert pending == 0, f"{pending} cancellation request(s) left pending"


# ---------------------------------------------------------------------------
# The client side: receive(), disconnects
# ---------------------------------------------------------------------------


def test_response_disconnect_ends_without_a_final_chunk(caplog: pytest.LogCaptureFixture) -> None:
    """http.disconnect ends the response at once with nothing more sent and one
    DEBUG record, and closes the source once."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    event = Event("a")
    source = AsgiRecordingSource([event], wait=True)

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        task = asgi_serve(Broadcaster[str, Event]().response(source), peer)
        await peer.wait_for_bodies(2)
        peer.disconnect()
        await asgi_ended(task)
        assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode())], f"sent after disconnect: {peer.sent}"

    scenario()
    assert source.calls[-1] == "aclose" and source.calls.count("aclose") == 1, f"source not closed once: {source.calls}"
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broadcaster"]
    assert records == [(logging.DEBUG, "SSE client disconnected")], f"wrong records: {records}"


@async_test()
async def test_response_disconnect_releases_the_subscription() -> None:
    """After the client leaves a streaming response the stream is closed and
    its key has no subscriber and no channel."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    async with AsgiClient(b.response(stream)) as client, client.stream("GET", "/events") as response:
        b.send("k", Event("x"))
        assert await response.event() == SseEvent("message", "x", "")
    assert b.subscriber_count("k") == 0, "the subscription outlived the client"
    assert "k" not in b, "the channel outlived its only client"
    assert stream.closed, "the stream was not closed"


@async_test()
async def test_response_ignores_request_body_messages_before_a_disconnect() -> None:
    """http.request messages (more_body True, then False) are read and dropped; streaming goes on."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    peer = AsgiPeer()
    peer.push({"type": "http.request", "body": b"abc", "more_body": True})
    peer.push({"type": "http.request", "body": b"def", "more_body": False})
    third_receive = asyncio.Event()
    receives = 0

    async def receive() -> AsgiMessage:
        nonlocal receives
        receives += 1
        if receives == 3:
            third_receive.set()
        return await peer.receive()

    task = asgi_serve(b.response(stream), peer, receive=receive)
    task.add_done_callback(lambda _: third_receive.set())  # fail fast if the body ends it
    await third_receive.wait()
    assert not task.done(), f"the request body ended the response: {peer.sent}"
    event = Event("after the body")
    b.send("k", event)
    await peer.wait_for_bodies(2)
    peer.disconnect()
    await asgi_ended(task)
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode())], (
        f"request body disturbed the stream: {peer.sent}"
    )


def test_response_second_request_message_after_a_body_without_more_body_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An http.request without ``more_body`` ends the request body: another http.request after
    it is a protocol error, logged as an ERROR, and the response ends cleanly."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b = Broadcaster[str, Event]()
        peer = AsgiPeer()
        task = asgi_serve(b.response(b.subscribe("k")), peer)
        await peer.wait_for_bodies(1)
        peer.push({"type": "http.request", "body": b""})
        peer.push({"type": "http.request", "body": b""})
        await asgi_ended(task, within=1.0)
        assert peer.sent == [asgi_start(), ASGI_FIRST, ASGI_FINAL], f"wrong messages: {peer.sent}"

    scenario()
    records = [r for r in caplog.records if r.name == "broadcaster"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "ASGI receive() failed; ending the SSE response")
    ], f"wrong records: {[r.getMessage() for r in records]}"
    assert records[0].exc_info is not None, "no traceback logged"
    error = records[0].exc_info[1]
    assert isinstance(error, RuntimeError), f"wrong error: {error!r}"
    assert str(error) == "unexpected ASGI message while streaming: 'http.request'", f"wrong message: {error}"


def test_response_receive_raising_cancelled_error_is_logged_as_a_runtime_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """receive() raising CancelledError by itself is reported as a RuntimeError
    naming it, and the response ends cleanly."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))

        async def receive() -> MutableMapping[str, Any]:
            raise asyncio.CancelledError("receive gave up")

        await b.response(b.subscribe("k"))(peer.scope, receive, peer.send)
        assert peer.ended

    scenario()
    [record] = asgi_records(caplog, logging.ERROR)
    assert record.getMessage() == "ASGI receive() failed; ending the SSE response"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert str(record.exc_info[1]) == "ASGI receive() raised CancelledError('receive gave up')"


@async_test()
async def test_response_runs_one_task_of_its_own_while_streaming() -> None:
    """A streaming response runs in the server's task plus exactly one task of
    its own, its pending receive(); that one is gone when the response ends."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    peer = AsgiPeer()
    before = asyncio.all_tasks()
    task = asgi_serve(b.response(b.subscribe("k")), peer)
    b.send("k", Event("x"))
    await peer.wait_for_bodies(2)
    await peer.wait_until(lambda: len(asyncio.all_tasks() - before) == 2)
    assert len(asyncio.all_tasks() - before - {task}) == 1, asyncio.all_tasks() - before
    b.remove("k")
    await asgi_ended(task)
    assert asyncio.all_tasks() - before == set()


@async_test()
async def test_response_returns_only_after_its_pending_receive_has_finished() -> None:
    """The app returns only once its pending receive() is done, even when the
    server's receive() takes a few loop steps to honour the cancellation."""
    finished: list[bool] = []
    waiting = asyncio.Event()

    async def receive() -> AsgiMessage:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            for _ in range(5):
                await asyncio.sleep(0)
            finished.append(True)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    peer = AsgiPeer()
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    task = asgi_serve(b.response(b.subscribe("k")), peer, receive=receive)
    await waiting.wait()
    b.remove("k")
    await asgi_ended(task)
    assert finished == [True], "the app returned while its receive() was still running"


def test_response_receive_failing_as_it_is_cancelled_is_retrieved_and_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server's receive() that raises instead of honouring the response's
    cancellation of it (the response is finishing) has its error read and
    logged at DEBUG: asyncio reports no exception never retrieved."""
    caplog.set_level(logging.DEBUG)

    @fault_test()
    async def scenario(probe: FaultProbe) -> None:
        b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
        waiting = asyncio.Event()

        async def receive() -> AsgiMessage:
            try:
                waiting.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise OSError("transport closed while receiving") from None
            raise AssertionError("unreachable")  # pragma: no cover

        peer = AsgiPeer()
        task = asgi_serve(b.response(b.subscribe("k")), peer, receive=receive)
        await waiting.wait()
        b.remove("k")
        await asgi_ended(task)
        assert peer.ended
        assert probe.logged() == [("DEBUG", "OSError")], probe.messages()
        assert probe.messages() == ["ASGI receive() raised while cancelled"], probe.messages()

    scenario()


# ---------------------------------------------------------------------------
# Writes: send() failing, timing out
# ---------------------------------------------------------------------------

# Where a send() fails: the message index it fails at and what was sent before.
ASGI_SEND_POSITIONS = ["start", "first_chunk", "event", "keep_alive", "final"]


async def asgi_fail_send(position: str, error: Exception) -> None:
    """Make the response's send() raise ``error`` at ``position``, and check that
    nothing is sent after it and the subscription is released."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=0.05 if position == "keep_alive" else None))
    stream = b.subscribe("k")
    one, two = Event("one"), Event("two")
    at, expected = {
        "start": (0, []),
        "first_chunk": (1, [asgi_start()]),
        "event": (2, [asgi_start(), ASGI_FIRST]),  # fails on the message of `one` and `two`
        "keep_alive": (2, [asgi_start(), ASGI_FIRST]),
        "final": (3, [asgi_start(), ASGI_FIRST, asgi_body(one.encode())]),
    }[position]
    if position in ("event", "final"):
        b.send("k", one)
    if position == "event":
        b.send("k", two)  # waiting with `one`: both go in one message
    if position == "final":
        b.remove("k")
    peer = AsgiPeer()
    calls = 0

    async def send(message: AsgiMessage) -> None:
        nonlocal calls
        calls += 1
        if calls - 1 == at:
            raise error
        await peer.send(message)

    await asgi_ended(asgi_serve(b.response(stream), peer, send))
    assert calls == at + 1, f"{calls - at - 1} send() call(s) after the failing one"
    assert peer.sent == expected, f"wrong messages before the failure: {peer.sent}"
    assert stream.closed and b.subscriber_count("k") == 0 and "k" not in b, "the subscription outlived the failure"


@async_test()
async def test_response_without_send_timeout_still_writes_every_message() -> None:
    """SseConfig(send_timeout=None) writes start, first chunk, events and the
    final chunk with no timeout around them."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(send_timeout=None, keep_alive=None))
    peer = AsgiPeer()
    stream = b.subscribe("k")
    b.send("k", Event("x"))
    b.remove("k")
    await b.response(stream)(peer.scope, peer.receive, peer.send)
    assert peer.bodies == [b":\n\n", b"data: x\n\n", b""] and peer.ended


@async_test()
async def test_response_without_send_timeout_waits_out_a_slow_send() -> None:
    """With send_timeout=None a send that takes several keep-alive intervals is
    waited for (no keep-alive is squeezed in beside it), and streaming goes on."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(send_timeout=None, keep_alive=0.02))
    peer = AsgiPeer()
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow_send(message: MutableMapping[str, Any]) -> None:
        if message.get("body") == b"data: slow\n\n":
            entered.set()
            await gate.wait()
        await peer.send(message)

    stream = b.subscribe("k")
    task = asyncio.ensure_future(b.response(stream)(peer.scope, peer.receive, slow_send))
    await peer.wait_for_bodies(1)
    b.send("k", Event("slow"))
    await entered.wait()
    await asyncio.sleep(0.1)  # timing under test: five keep-alive intervals pass during the send
    assert peer.bodies == [b":\n\n"], "nothing may be written while a send is in progress"
    gate.set()
    await peer.wait_for_bodies(2)
    assert peer.bodies[1] == b"data: slow\n\n"
    peer.disconnect()
    await task
    assert b.subscriber_count("k") == 0


def test_response_send_timeout_on_an_event_is_logged_with_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """An event send() that hangs past send_timeout is logged once at INFO, naming the timeout."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b = Broadcaster[str, Event](config=SseConfig(send_timeout=0.1))
        stream = b.subscribe("k")
        peer = AsgiPeer()
        task = asgi_serve(b.response(stream), peer)
        await peer.wait_for_bodies(1)
        peer.send_hangs = True
        b.send("k", Event("stuck"))
        await asgi_ended(task)
        assert peer.sent == [asgi_start(), ASGI_FIRST], f"wrong messages: {peer.sent}"

    scenario()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broadcaster"]
    assert records == [(logging.INFO, "SSE client did not accept a write within 0.1 s; ending the response")], (
        f"wrong records: {records}"
    )


@pytest.mark.parametrize("position", ASGI_SEND_POSITIONS)
def test_response_send_oserror_is_logged_at_debug_with_the_error(
    position: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An OSError from send() at any position is logged once, at DEBUG, with the error."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        await asgi_fail_send(position, OSError("connection reset"))

    scenario()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broadcaster"]
    assert records == [(logging.DEBUG, "SSE client disconnected: OSError('connection reset')")], (
        f"wrong records: {records}"
    )


@pytest.mark.parametrize("position", ASGI_SEND_POSITIONS)
def test_response_send_failure_is_logged_with_its_message(position: str, caplog: pytest.LogCaptureFixture) -> None:
    """A non-OSError from send() at any position is logged once as an ERROR saying the response ends."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        await asgi_fail_send(position, RuntimeError("server bug"))

    scenario()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broadcaster"]
    assert records == [(logging.ERROR, "ASGI send() failed; ending the SSE response")], f"wrong records: {records}"


def test_logs_never_hold_event_data_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Every way a response ends with an error or a warning, while it holds
    events whose data, type and id are secret: the records at INFO and above
    (their messages, arguments and tracebacks) name none of it."""
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-token"
    event = Event(f"data {secret}", event=f"type-{secret}", id=f"id-{secret}")

    @async_test()
    async def scenario() -> None:
        # A lag, a send timeout, a failing send, a failing receive, an item
        # that is no Event (its text is secret), a render that raises.
        b: Broadcaster[str, Any] = Broadcaster(buffer=1, config=SseConfig(keep_alive=None, send_timeout=0.05))
        lagging = b.subscribe("lag")
        for _ in range(3):
            b.send("lag", event)
        await client_request(b.response(lagging))
        peer = AsgiPeer()
        task = asgi_serve(b.response(b.subscribe("slow")), peer)
        await peer.wait_for_bodies(1)
        peer.send_hangs = True
        b.send("slow", event)
        await asgi_ended(task)
        peer = AsgiPeer()
        task = asgi_serve(b.response(b.subscribe("fail")), peer)
        await peer.wait_for_bodies(1)
        peer.send_error = RuntimeError("server bug")
        b.send("fail", event)
        await asgi_ended(task)
        peer = AsgiPeer()
        peer.push({"type": "http.bogus"})
        stream = b.subscribe("receive")
        b.send("receive", event)
        await asgi_ended(asgi_serve(b.response(stream), peer))
        b.send("odd", 0)
        odd = b.subscribe("odd")
        b.send("odd", f"not an event {secret}")
        b.remove("odd")
        await client_request(b.response(odd))
        broken = b.subscribe("render")
        b.send("render", event)
        b.remove("render")
        await client_request(b.response(broken, lambda item: Event(str(1 / 0))))

    scenario()
    loud = [record for record in caplog.records if record.levelno >= logging.INFO]
    assert {record.levelno for record in loud} >= {logging.INFO, logging.WARNING, logging.ERROR}
    for record in loud:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert secret not in text, text


def test_response_send_timeout_on_the_start_is_logged_with_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A send() of the response start that hangs past send_timeout ends the
    response: nothing sent, the source never read and closed, one INFO record
    naming the timeout."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        source = AsgiRecordingSource([Event("x")])
        peer = AsgiPeer()
        peer.send_hangs = True
        await asgi_ended(asgi_serve(Broadcaster[str, Event](config=SseConfig(send_timeout=0.1)).response(source), peer))
        assert peer.sent == [], f"wrong messages: {peer.sent}"
        assert source.calls == ["aclose"], f"wrong calls on the source: {source.calls}"

    scenario()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broadcaster"]
    assert records == [(logging.INFO, "SSE client did not accept a write within 0.1 s; ending the response")], (
        f"wrong records: {records}"
    )


def test_response_send_raising_cancelled_error_propagates_as_a_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    """send() raising CancelledError of its own for an event is a cancellation
    of the response, as any CancelledError in the server's task is (a response
    cannot tell it from one of the server's): it propagates, nothing more is
    sent, nothing is logged at ERROR, and the subscription is released."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
        stream = b.subscribe("k")
        b.send("k", Event("x"))

        async def send(message: MutableMapping[str, Any]) -> None:
            if message.get("body") == b"data: x\n\n":
                raise asyncio.CancelledError("send gave up")
            await peer.send(message)

        with pytest.raises(asyncio.CancelledError, match=r"^send gave up$"):
            await b.response(stream)(peer.scope, peer.receive, send)
        assert peer.sent == [asgi_start(), ASGI_FIRST], peer.sent
        assert stream.closed and b.subscriber_count("k") == 0

    scenario()
    assert asgi_records(caplog, logging.ERROR) == []


# ---------------------------------------------------------------------------
# How the source ends the response: exhausted, failing, lag, remove, close
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["data: forged\n\n", b"data: forged\n\n", None])
def test_response_source_yielding_a_non_event_ends_cleanly(item: object, caplog: pytest.LogCaptureFixture) -> None:
    """A source yielding a non-Event: the events before it are written, nothing
    of it, then the final chunk; one ERROR, a TypeError naming the item's type."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    good = Event("good")

    async def source() -> AsyncIterator[Any]:
        yield good
        yield item
        yield Event("never")

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await asgi_call(Broadcaster[str, Event]().response(source()), peer)
        assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(good.encode()), ASGI_FINAL], (
            f"wrong messages: {peer.sent}"
        )

    scenario()
    errors = asgi_errors(caplog)
    assert [r.getMessage() for r in errors] == ["SSE event source raised; ending the response"], (
        f"wrong ERROR records: {[r.getMessage() for r in errors]}"
    )
    assert errors[0].exc_info is not None, "no traceback logged"
    error = errors[0].exc_info[1]
    assert isinstance(error, TypeError), f"wrong error: {error!r}"
    assert str(error) == f"SSE events must be Event objects, got {type(item).__name__}", f"wrong message: {error}"


@async_test()
async def test_response_lagged_under_skip_policy_streams_the_retained_items() -> None:
    """Under LagPolicy.SKIP the response writes the retained items and goes on."""
    b: Broadcaster[str, Event] = Broadcaster(buffer=2)
    stream = b.subscribe("k").on_lag(LagPolicy.SKIP)
    events = [Event(str(i)) for i in range(6)]
    for event in events[:5]:
        b.send("k", event)
    async with AsgiClient(b.response(stream)) as client, client.stream("GET", "/events") as response:
        assert await response.events(2) == [SseEvent("message", "3", ""), SseEvent("message", "4", "")]
        b.send("k", events[5])
        assert await response.event() == SseEvent("message", "5", "")
        b.remove("k")
        assert [event async for event in response] == []
    assert response.raw_headers == ASGI_SSE_HEADERS
    assert response.body == ASGI_EMPTY_COMMENT + b"".join(event.encode() for event in events[3:]), response.body
    assert response.ended, "the response did not end"


@async_test()
async def test_response_lagged_under_end_policy_ends_cleanly() -> None:
    """Under LagPolicy.END a lagged stream ends the response with the final chunk and nothing buffered."""
    b: Broadcaster[str, Event] = Broadcaster(buffer=2)
    stream = b.subscribe("k").on_lag(LagPolicy.END)
    for i in range(5):
        b.send("k", Event(str(i)))
    response = await client_request(b.response(stream))
    assert (response.status, response.raw_headers) == (200, ASGI_SSE_HEADERS)
    assert response.body == ASGI_EMPTY_COMMENT and response.ended, response
    assert b.subscriber_count("k") == 0 and "k" not in b, "subscription outlived the response"


@async_test()
async def test_response_remove_writes_buffered_events_then_ends() -> None:
    """remove(key) while a response streams: the buffered events are written, then the final chunk."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(1)
    events = [Event(str(i)) for i in range(3)]
    for event in events:
        b.send("k", event)
    b.remove("k")
    await asgi_ended(task)
    expected = [asgi_start(), ASGI_FIRST, asgi_body(b"".join(e.encode() for e in events)), ASGI_FINAL]
    assert peer.sent == expected, f"wrong messages: {peer.sent}"


@async_test()
async def test_response_broadcaster_close_writes_buffered_events_then_ends() -> None:
    """Broadcaster.close() while a response streams: the buffered events are written, then the final chunk."""
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(1)
    events = [Event(str(i)) for i in range(3)]
    for event in events:
        b.send("k", event)
    b.close()
    await asgi_ended(task)
    expected = [asgi_start(), ASGI_FIRST, asgi_body(b"".join(e.encode() for e in events)), ASGI_FINAL]
    assert peer.sent == expected, f"wrong messages: {peer.sent}"


async def shutdown_bodies(config: SseConfig, n: int) -> list[bytes]:
    """The bodies of ``n`` responses of streams, plus one of a ``channel()``
    and one that starts after the shutdown, as clients read them, when the
    broadcaster is closed while they stream."""
    b: Broadcaster[str, Event] = Broadcaster(config=config)

    async def forever(tx: Sender) -> None:
        await tx.send(Event("from a channel"))
        await asyncio.Event().wait()

    apps = [b.response(b.subscribe("k")) for _ in range(n)] + [b.channel(forever)]
    async with contextlib.AsyncExitStack() as stack:
        responses = [await stack.enter_async_context(AsgiClient(app).stream("GET", "/")) for app in apps]
        b.send("k", Event("last"))
        assert (await responses[-1].event()).data == "from a channel"
        b.close()
        for response in responses:
            await response.read()
        late = await client_request(b.response(b.subscribe("k")))
    return [response.body for response in [*responses, late]]


_SHUTDOWN_RETRY = re.compile(rb"retry: ([0-9]+)\n\n")


@async_test()
async def test_response_at_shutdown_writes_a_retry_chosen_in_the_window() -> None:
    """With shutdown_retry, every response that close() ends writes, after
    what it had to write, one ``retry:`` frame at random in the window
    (inclusive, in ms), and a response that starts after the close too: the
    clients reconnect spread over it."""
    config = SseConfig(keep_alive=None, shutdown_retry=(1, 2.5))
    bodies = await shutdown_bodies(config, 60)
    retries = []
    for body in bodies:
        found = _SHUTDOWN_RETRY.search(body)
        assert found is not None and body.endswith(found[0]), body
        retries.append(int(found[1]))
        assert parse_event_stream(body).retry == retries[-1]
    assert all(1000 <= retry <= 2500 for retry in retries), retries
    assert len(set(retries)) > 10, f"the retries do not spread: {sorted(retries)}"
    assert bodies[0] == b":\n\ndata: last\n\n" + f"retry: {retries[0]}\n\n".encode()


@async_test()
async def test_response_at_shutdown_without_shutdown_retry_ends_as_before() -> None:
    """The default: close() ends the responses with the final empty message,
    and no retry frame."""
    bodies = await shutdown_bodies(SseConfig(keep_alive=None), 3)
    assert bodies[:3] == [b":\n\ndata: last\n\n"] * 3
    assert bodies[3] == b":\n\ndata: from a channel\n\n" and bodies[4] == b":\n\n"


@async_test()
async def test_response_that_ends_before_the_shutdown_writes_no_retry() -> None:
    """Only a shutdown writes the retry frame: a key removed, or a source
    exhausted, ends as always."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None, shutdown_retry=(1, 1)))
    stream = b.subscribe("k")
    b.send("k", Event("x"))
    b.remove("k")
    assert (await client_request(b.response(stream))).body == b":\n\ndata: x\n\n"
    b.close()
    assert (await client_request(b.response(b.subscribe("k")))).body == b":\n\nretry: 1000\n\n"


def test_response_lag_is_logged_as_a_warning_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    """A stream that lagged (LagPolicy.ERROR) ends its response cleanly, with one
    WARNING stating how many items it missed, and leaves the registry."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b = Broadcaster[str, Event](buffer=1)
        stream = b.subscribe("k")
        b.send("k", Event("one"))
        b.send("k", Event("two"))
        b.send("k", Event("three"))
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(b.response(stream), peer))
        assert peer.sent == [asgi_start(), ASGI_FIRST, ASGI_FINAL], f"wrong messages: {peer.sent}"
        assert b.subscriber_count("k") == 0 and "k" not in b, "subscription outlived the response"

    scenario()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broadcaster"]
    assert records == [(logging.WARNING, "SSE stream ended: subscriber lagged behind and missed 2 item(s)")], (
        f"wrong records: {records}"
    )


@async_test()
async def test_response_on_gap_is_a_body_message_with_more_body() -> None:
    """The on_gap event of a stream that could not resume is sent as one more_body message after the first chunk."""
    b = Broadcaster[str, Event](history=2)
    stream = b.subscribe("k", last_event_id="unknown-1")
    assert stream.resumed is False, "the scenario needs a stream that could not resume"
    gap = Event("reload", event="gap")
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream, on_gap=gap), peer)
    await peer.wait_for_bodies(2)
    b.remove("k")
    await asgi_ended(task)
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(gap.encode()), ASGI_FINAL], f"wrong messages: {peer.sent}"


def test_response_source_whose_aclose_raises_is_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """An event source whose aclose() raises is logged once as an ERROR, with its traceback."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    class Source:
        def __aiter__(self) -> Source:
            return self

        async def __anext__(self) -> Event:
            raise StopAsyncIteration

        async def aclose(self) -> None:
            raise ValueError("close failed")

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(Broadcaster[str, Event]().response(Source()), peer))
        assert peer.sent == [asgi_start(), ASGI_FIRST, ASGI_FINAL], f"wrong messages: {peer.sent}"

    scenario()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["closing the SSE event source raised"], (
        f"wrong ERROR records: {[r.getMessage() for r in errors]}"
    )
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError, "no traceback of the close error"


def test_response_source_raising_cancelled_error_is_logged_as_a_runtime_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A CancelledError raised by the event source itself is reported as a
    RuntimeError naming it, with the response's source-error message."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    async def source() -> AsyncIterator[Event]:
        raise asyncio.CancelledError("from the source")
        yield Event("never")  # pragma: no cover - makes this an async generator

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await Broadcaster[str, Event](config=SseConfig(keep_alive=None)).response(source())(
            peer.scope, peer.receive, peer.send
        )
        assert peer.ended

    scenario()
    [record] = asgi_records(caplog, logging.ERROR)
    assert record.getMessage() == "SSE event source raised; ending the response"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert str(record.exc_info[1]) == "the SSE event source raised CancelledError('from the source')"


# ---------------------------------------------------------------------------
# Cancellation and misuse
# ---------------------------------------------------------------------------


@async_test()
async def test_response_cancellation_closes_the_source() -> None:
    """Cancelling the app's task while the source waits aclose()s the source."""
    source = AsgiRecordingSource(wait=True)
    peer = AsgiPeer()
    receive, streaming = asgi_watched_receive(peer)
    task = asgi_serve(Broadcaster[str, Event]().response(source), peer, receive=receive)
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.calls == ["__anext__", "aclose"], f"wrong calls on the source: {source.calls}"


@async_test()
async def test_response_cancellation_as_a_send_completes_is_not_swallowed() -> None:
    """A cancel that lands just as a send() completes still propagates."""
    # On 3.10/3.11 asyncio.wait_for() returns the inner result in that case and
    # drops the cancellation (bpo-42130, fixed in 3.12 by the timeouts rewrite).
    b: Broadcaster[str, Event] = Broadcaster()
    stream = b.subscribe("k")
    peer = AsgiPeer()
    task = asgi_serve(b.response(stream), peer)
    await peer.wait_for_bodies(1)  # the first chunk's send() just returned
    task.cancel()
    done, _ = await asyncio.wait((task,), timeout=1.0)
    if not done:  # the cancellation was lost: end the response to leave no task behind
        peer.disconnect()
        await task
    assert done and task.cancelled(), "the cancellation was swallowed: the response went on streaming"
    assert stream.closed and b.subscriber_count("k") == 0, "subscription outlived the task"


@async_test()
async def test_response_cancelled_during_a_send_leaves_the_cancellation_pending() -> None:
    """Cancelling the server's task while a send() is in progress propagates out
    of the app with the cancellation request still counted in the task (3.11+),
    as asyncio.timeout() and TaskGroup, which count them, expect."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    peer = AsgiPeer()
    entered = asyncio.Event()

    async def send(message: MutableMapping[str, Any]) -> None:
        if message.get("body") == b"data: stuck\n\n":
            entered.set()
            await asyncio.Event().wait()
        await peer.send(message)

    async def server() -> int | None:
        try:
            await b.response(b.subscribe("k"))(peer.scope, peer.receive, send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            return cast("int | None", getattr(task, "cancelling", lambda: None)())
        raise AssertionError("the app returned although it was cancelled")

    task = asyncio.ensure_future(server())
    await peer.wait_for_bodies(1)
    b.send("k", Event("stuck"))
    await entered.wait()
    task.cancel()
    pending = await task
    assert pending == (1 if sys.version_info >= (3, 11) else None), f"{pending} cancellation request(s) pending"


@pytest.mark.parametrize("kind", ["websocket", "lifespan"])
def test_response_rejects_a_non_http_scope(kind: str) -> None:
    """A non-http scope raises RuntimeError naming it, sends nothing and closes the source."""
    source = AsgiRecordingSource([Event("x")])
    peer_sent: list[AsgiMessage] = []

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        scope = {**peer.scope, "type": kind}
        app = Broadcaster[str, Event]().response(source)
        with pytest.raises(RuntimeError, match=rf"^SSE responses serve 'http' scopes only, got '{kind}'$"):
            await asgi_call(app, peer, scope)
        peer_sent.extend(peer.sent)

    scenario()
    assert peer_sent == [], f"sent on a {kind} scope: {peer_sent}"
    assert source.calls == ["aclose"], f"wrong calls on the source: {source.calls}"


@async_test()
async def test_response_app_can_be_called_only_once() -> None:
    """A second call of the same app raises RuntimeError and sends nothing."""
    app = Broadcaster[str, Event]().response(AsgiRecordingSource())
    first = AsgiPeer()
    await asgi_call(app, first)
    second = AsgiPeer()
    with pytest.raises(RuntimeError, match=r"^an SSE response app can be called only once: make one per request$"):
        await asgi_call(app, second)
    assert second.sent == [], f"the second call sent: {second.sent}"


@async_test()
async def test_response_and_channel_check_their_arguments() -> None:
    """response() and channel() refuse what they cannot use, at once: events
    that are not an async iterable, a render that is not callable, an on_gap
    that is not an Event, a closure that is not callable."""
    b: Broadcaster[str, Event] = Broadcaster()
    bad_calls: list[tuple[Callable[[], object], str]] = [
        (lambda: b.response([Event("x")]), "events must be an async iterable, not list"),  # type: ignore[call-overload]
        (lambda: b.response(b.subscribe("k"), "render"), "render must be callable or None, not str"),  # type: ignore[call-overload]
        (
            lambda: b.response(b.subscribe("k"), on_gap="reload"),  # type: ignore[call-overload]
            "on_gap must be an Event, a function of the gaps, or None, not str",
        ),
        (lambda: b.channel(None), "fn must be callable, not NoneType"),  # type: ignore[arg-type]
    ]
    for call, message in bad_calls:
        with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
            call()
    assert b.subscriber_count("k") == 0, "a refused response kept its subscription"


# ---------------------------------------------------------------------------
# Leak checks: thousands of responses torn down leave nothing behind
# ---------------------------------------------------------------------------


LEAK_SCOPE = {"type": "http", "method": "GET", "path": "/events", "headers": []}


class LeakBatch:
    """Responses started together; ``ready`` resolves once all are streaming."""

    def __init__(self, size: int) -> None:
        self.waiting = size
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def streaming(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.ready.set_result(None)


LEAK_EVENT_DATA = b"data: x\n"  # in LEAK_EVENT's frame, with or without an id line


class LeakPeer:
    """The lightest server side of one request: it disconnects at its first
    receive() if ``early``, else once it was sent its first event."""

    __slots__ = ("_batch", "_early", "_gone")

    def __init__(self, batch: LeakBatch, early: bool) -> None:
        self._batch = batch
        self._early = early
        self._gone: asyncio.Future[AsgiMessage] = asyncio.get_running_loop().create_future()

    async def receive(self) -> AsgiMessage:
        self._batch.streaming()
        if self._early:
            return ASGI_DISCONNECT
        return await self._gone

    async def send(self, message: AsgiMessage) -> None:
        body = message["body"] if message["type"] == "http.response.body" else b""
        if LEAK_EVENT_DATA in body and not self._gone.done():
            self._gone.set_result(ASGI_DISCONNECT)


LEAK_EVENT = Event("x")

LEAK_GAP = Event(event="reload", data="")

LEAK_BATCH = 100

# Batches of LEAK_BATCH concurrent responses: 5,000 responses in all, half of
# tests/soak.py's 10,000, to keep the in-suite checks within 10 s on a loaded 2-core
# machine (tracemalloc triples the cost of each); tests/soak.py runs 10,000
# every 15 to 30 s, for as long as it is asked to.
LEAK_RESPONSES = {"response": 15, "response_untimed": 15, "resume": 10, "channel": 10}


async def leak_closure(tx: Sender) -> None:
    await tx.send(LEAK_EVENT)
    await asyncio.get_running_loop().create_future()


async def leak_asgi_batch(kind: str, b: Broadcaster[str, Event], early: bool, state: LeakResume) -> None:
    """LEAK_BATCH responses of ``kind``, all torn down by their client's disconnect."""
    batch = LeakBatch(LEAK_BATCH)
    apps: list[Any] = []
    for _ in range(LEAK_BATCH):
        if kind == "channel":
            apps.append(b.channel(leak_closure))
        elif kind == "resume":
            stream = b.subscribe("k", last_event_id=state.ids[-1] if state.ids else "unknown-1")
            apps.append(b.response(stream, on_gap=LEAK_GAP))
        else:  # response, response_untimed
            apps.append(b.response(b.subscribe("k")))
    peers = [LeakPeer(batch, early) for _ in range(LEAK_BATCH)]
    tasks = [
        asyncio.ensure_future(app(LEAK_SCOPE, peer.receive, peer.send)) for app, peer in zip(apps, peers, strict=True)
    ]
    del apps
    await batch.ready
    if kind != "channel" and not early:
        observer = b.subscribe("k")
        b.send("k", LEAK_EVENT)
        await anext(observer)
        if observer.last_event_id is not None:
            state.ids.append(observer.last_event_id)
        observer.close()
    for task in tasks:
        await task


@async_test(timeout=60.0)
async def test_leak_5000_asgi_responses_torn_down_by_disconnect_leave_nothing() -> None:
    """5,000 SSE responses (response() of streams, with and without send
    timeouts, of resumed history streams, and channel()), 100 at a time, each
    torn down by its client's disconnect (at once, or after its first event)
    leave no stream, task, queue, Sender or app object behind, and traced
    memory within LEAK_BOUND of the warm-up's."""
    # The default configuration (every send but the events' within a 30 s
    # timeout, a 15 s keep-alive timer armed then cancelled per response), and
    # one without timers or timeout tasks.
    plain: Broadcaster[str, Event] = Broadcaster()
    untimed: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None, send_timeout=None))
    history: Broadcaster[str, Event] = Broadcaster(history=8)
    broadcasters = {"response": plain, "response_untimed": untimed, "resume": history, "channel": plain}
    state = LeakResume()
    baseline = asyncio.all_tasks()
    filler = history.subscribe("k")  # fill the history first: it holds 8 entries from now on
    for _ in range(history.history):
        history.send("k", LEAK_EVENT)
    filler.close()

    async def workload(divisor: int) -> None:
        for kind, batches in LEAK_RESPONSES.items():
            for i in range(max(2, batches // divisor)):
                await leak_asgi_batch(kind, broadcasters[kind], i % 2 == 1, state)

    divisor = leak_divisor()
    delta, growth, top = await leak_measure(workload, 1_000, divisor)
    total = sum(max(2, batches // divisor) for batches in LEAK_RESPONSES.values()) * LEAK_BATCH
    assert asyncio.all_tasks() == baseline, "responses left tasks running"
    assert len(plain) == len(untimed) == 0 and not plain._sources, "a response's subscription or source outlived it"
    assert len(history) == 1, "the history channel should linger, alone"
    leak_report(f"{total} ASGI responses", delta, growth, top)


# ===========================================================================
# Faults: response() and channel() against a misbehaving server, source and cancellations
#
# Every fault runs against both kinds of app, response() and channel(), through
# FaultRig; FaultSend and FaultReceive are the server's side with a fault at a
# chosen call. Fault tests run under @fault_test: @async_test plus a FaultProbe
# that fails the test if asyncio reported anything ("Task exception was never
# retrieved", an exception in a callback or a finalizer, a coroutine never
# awaited) and records every log record, so each test states exactly what was
# logged, at which level, with which exception.
# ===========================================================================

# ---------------------------------------------------------------------------
# The probe and the server side
# ---------------------------------------------------------------------------


def fault_exc_name(record: logging.LogRecord) -> str | None:
    """The name of the exception type a record carries a traceback of, if any."""
    kind = record.exc_info[0] if record.exc_info else None
    return None if kind is None else kind.__name__


class FaultProbe:
    """What a fault test observes besides the wire: log records, and what must
    never happen (loop exception handler calls, unraisable exceptions, warnings
    such as "coroutine ... was never awaited")."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []  # of the broadcaster logger
        self.foreign: list[logging.LogRecord] = []  # WARNING+ of any other logger
        self.loop_errors: list[dict[str, Any]] = []
        self.unraisable: list[str] = []
        self.warnings: list[str] = []
        self.baseline: set[asyncio.Task[Any]] = set()

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)

    def running(self) -> set[asyncio.Task[Any]]:
        """Tasks still running, other than the harness's and the test's own."""
        return asyncio.all_tasks() - self.baseline

    def logged(self) -> list[tuple[str, str | None]]:
        """The broadcaster's records as (level name, exception type name or None)."""
        return [(record.levelname, fault_exc_name(record)) for record in self.records]

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]

    def serious(self) -> list[tuple[str, str | None]]:
        """The broadcaster's records at WARNING and above."""
        return [(r.levelname, fault_exc_name(r)) for r in self.records if r.levelno >= logging.WARNING]

    @contextmanager
    def watching(self) -> Iterator[None]:
        probe = self

        class Recorder(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.name == "broadcaster":
                    probe.records.append(record)
                elif record.levelno >= logging.WARNING:
                    probe.foreign.append(record)

        def unraisable(info: Any) -> None:
            probe.unraisable.append(f"{info.exc_type.__name__}: {info.exc_value!r} in {info.object!r}")

        handler = Recorder(logging.DEBUG)
        root, ours = logging.getLogger(), logging.getLogger("broadcaster")
        old_level, old_hook = ours.level, sys.unraisablehook
        root.addHandler(handler)
        ours.setLevel(logging.DEBUG)
        sys.unraisablehook = unraisable
        # What exists now is not the test's: freezing it makes the collection
        # below look only at what the test made (and fast).
        gc.freeze()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    yield
                finally:
                    gc.collect()  # unretrieved task exceptions and finalizers report now
                    self.warnings.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        finally:
            gc.unfreeze()
            sys.unraisablehook = old_hook
            ours.setLevel(old_level)
            root.removeHandler(handler)

    def check_quiet(self) -> None:
        """Nothing crashed, leaked an unretrieved exception or went unawaited."""
        loop_errors = [f"{c.get('message')}: {c.get('exception')!r}" for c in self.loop_errors]
        assert loop_errors == [], f"the event loop's exception handler was called: {loop_errors}"
        assert self.unraisable == [], f"unraisable exceptions: {self.unraisable}"
        assert self.warnings == [], f"warnings: {self.warnings}"
        foreign = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.foreign]
        assert foreign == [], f"other loggers reported problems: {foreign}"


ProbedTest = Callable[..., Coroutine[Any, Any, None]]


def fault_test(timeout: float = 5.0) -> Callable[[ProbedTest], Callable[..., None]]:
    """``@async_test(timeout)`` whose test gets a ``FaultProbe`` as its first
    argument (pytest parameters follow) and fails if the probe saw the loop's
    exception handler called, an unraisable exception or a warning."""

    def decorate(fn: ProbedTest) -> Callable[..., None]:
        def test(*args: Any, **kwargs: Any) -> None:
            probe = FaultProbe()

            async def body() -> None:
                asyncio.get_running_loop().set_exception_handler(probe.on_loop_error)
                probe.baseline = asyncio.all_tasks()
                await fn(probe, *args, **kwargs)

            with probe.watching():
                async_test(timeout)(body)()
            probe.check_quiet()

        functools.update_wrapper(test, fn)
        signature = inspect.signature(fn)
        test.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=list(signature.parameters.values())[1:]
        )
        return test

    return decorate


class FaultServerBug(Exception):
    """An exception type of the server's own, that no code here knows of."""


class FaultSend:
    """The server's send(): forwards to ``peer``; its call number ``at`` (0 is
    the start message) raises ``error``, or blocks until ``gate`` is set
    (``block``), or blocks and, when cancelled, takes until ``release`` is set
    to finish (``slow_cancel``: a server flushing or locking on the way out)."""

    def __init__(
        self,
        peer: AsgiPeer,
        at: int | None = None,
        error: BaseException | None = None,
        *,
        block: bool = False,
        slow_cancel: bool = False,
    ) -> None:
        self.peer = peer
        self.at = at
        self.error = error
        self.block = block or slow_cancel
        self.slow_cancel = slow_cancel
        self.calls = 0
        self.entered = asyncio.Event()  # the faulty call began
        self.entered_at = 0.0  # loop time at which it began
        self.gate = asyncio.Event()
        self.cancelled = False  # the blocked call was cancelled
        self.cleaning = asyncio.Event()  # slow_cancel: the cancelled call is cleaning up
        self.release = asyncio.Event()  # slow_cancel: lets that clean-up finish

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        index = self.calls
        self.calls += 1
        if index == self.at:
            self.entered.set()
            self.entered_at = asyncio.get_running_loop().time()
            if self.error is not None:
                raise self.error
            if self.block:
                try:
                    await self.gate.wait()
                except asyncio.CancelledError:
                    self.cancelled = True
                    if self.slow_cancel:
                        self.cleaning.set()
                        await self.release.wait()
                    raise
        await self.peer.send(message)


class FaultRaise:
    """A queued receive() outcome: raise ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class FaultReceive:
    """The server's receive(): hands out the queued outcomes in order (a message,
    or anything else a faulty server might return, or a ``FaultRaise``), and
    waits when there is none."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.called = asyncio.Event()  # the first call: the response is streaming
        self.drained = asyncio.Event()  # the last queued outcome was handed out

    def push(self, *outcomes: object) -> None:
        self.drained.clear()
        for outcome in outcomes:
            self._queue.put_nowait(outcome)

    async def __call__(self) -> Any:
        self.called.set()
        outcome = await self._queue.get()
        if self._queue.empty():
            self.drained.set()
        if isinstance(outcome, FaultRaise):
            raise outcome.error
        return outcome


FAULT_KEEP_ALIVE = 0.02

FAULT_SEND_TIMEOUT = 0.05

FAULT_KEEP_ALIVE_FRAME = asgi_body(ASGI_EMPTY_COMMENT)


class FaultRig:
    """One SSE response under test, of either kind: ``response`` (of a stream of
    key "k") or ``channel`` (whose closure sends what the test emits).

    ``emit`` makes an event reach the response, ``end`` ends its source
    cleanly, ``unreleased`` lists what the response left behind.
    """

    def __init__(
        self,
        kind: str,
        *,
        keep_alive: float | None = None,
        send_timeout: float | None = 30.0,
        history: int = 0,
        method: str = "GET",
        buffer: int = 64,
        on_gap: Event | None = None,
        wrap: Callable[[BroadcastStream[Event]], AsyncIterable[Event]] | None = None,
    ) -> None:
        self.kind = kind
        config = SseConfig(keep_alive=keep_alive, send_timeout=send_timeout)
        self.b: Broadcaster[str, Event] = Broadcaster(buffer=buffer, config=config, history=history)
        self.peer = AsgiPeer(method=method)
        self.stream: BroadcastStream[Event] | None = None
        self.tx: Sender | None = None
        self.closure_log: list[str] = []
        self.closure_started = asyncio.Event()
        self._commands: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        if kind == "response":
            self.stream = self.b.subscribe("k", last_event_id="unknown-1" if history else None)
            source: AsyncIterable[Event] = self.stream if wrap is None else wrap(self.stream)
            self.app = self.b.response(source, on_gap=on_gap)
        else:
            assert kind == "channel", kind
            self.app = self.b.channel(self._closure)

    async def _closure(self, tx: Sender) -> None:
        self.tx = tx
        self.closure_log.append("started")
        self.closure_started.set()
        try:
            while (command := await self._commands.get()) is not None:
                if isinstance(command, BaseException):
                    raise command
                await tx.send(command)
        except BaseException as exc:
            self.closure_log.append(type(exc).__name__)
            raise
        self.closure_log.append("returned")

    def emit(self, *events: Event) -> None:
        for event in events:
            if self.kind == "response":
                self.b.send("k", event)
            else:
                self._commands.put_nowait(event)

    def emit_paced(self, *events: Event) -> None:
        """Emit the first event now and each next one once the one before it is
        written, so that every event goes out in a body message of its own
        (events waiting together are written together)."""
        pending = list(events)
        written = b""

        def emit_next(message: AsgiMessage | None) -> None:
            nonlocal written
            if pending and (message is None or message.get("body") == written):
                event = pending.pop(0)
                written = event.encode()
                self.emit(event)

        self.peer.on_sent = emit_next
        emit_next(None)

    def end(self) -> None:
        if self.kind == "response":
            self.b.remove("k")
        else:
            self._commands.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        """Make the source raise ``error`` after what was emitted (channel only)."""
        assert self.kind == "channel"
        self._commands.put_nowait(error)

    def unreleased(self) -> list[str]:
        problems: list[str] = []
        if self.stream is not None:
            if not self.stream.closed:
                problems.append("the stream is not closed")
            if self.b.subscriber_count("k"):
                problems.append(f"{self.b.subscriber_count('k')} subscriber(s) left")
            if not self.b.history and "k" in self.b:
                problems.append("the channel outlived the response")
        else:
            if self.b._sources:
                problems.append("the broadcaster still tracks the channel source")
            if self.tx is not None and not self.tx.closed:
                problems.append("the Sender is still open")
            if self.closure_log and self.closure_log[-1] == "started":
                problems.append("the closure is still running")
        return problems


def fault_bodies(*events: Event) -> list[AsgiMessage]:
    return [asgi_body(event.encode()) for event in events]


# Where a send() call is in a response: its call number, for the rig of that position.
FAULT_SEND_AT = {
    "start": 0,
    "first_chunk": 1,
    "gap": 2,  # the on_gap frame (response of a history stream that could not resume)
    "event1": 2,  # the first event
    "event3": 4,  # the third event
    "keep_alive": 2,
    "final": 3,  # after one event
    "head_final": 1,  # the empty body of a HEAD response
}

FAULT_SEND_POSITIONS = [("response", position) for position in FAULT_SEND_AT] + [
    ("channel", position) for position in FAULT_SEND_AT if position != "gap"
]

FAULT_GAP = Event(comment="gap")


def fault_send_rig(
    kind: str, position: str, *, send_timeout: float | None = 30.0
) -> tuple[FaultRig, list[AsgiMessage]]:
    """A rig scripted to reach ``position`` and the messages it writes when nothing fails."""
    rig = FaultRig(
        kind,
        keep_alive=FAULT_KEEP_ALIVE if position == "keep_alive" else None,
        send_timeout=send_timeout,
        history=4 if position == "gap" else 0,
        method="HEAD" if position == "head_final" else "GET",
        on_gap=FAULT_GAP if position == "gap" else None,
    )
    if position == "head_final":
        return rig, [asgi_start(), ASGI_FINAL]
    normal = [asgi_start(), ASGI_FIRST]
    if position == "gap":
        normal.append(asgi_body(FAULT_GAP.encode()))
    events = [Event(f"e{i}") for i in range({"event1": 1, "event3": 3, "final": 1}.get(position, 0))]
    rig.emit_paced(*events)
    normal += fault_bodies(*events)
    if position == "keep_alive":
        normal.append(FAULT_KEEP_ALIVE_FRAME)
    if position == "final":
        rig.end()
        normal.append(ASGI_FINAL)
    return rig, normal


def fault_ids(value: object) -> str:
    return value.__name__ if isinstance(value, type) else str(value)


# ---------------------------------------------------------------------------
# The fault matrix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error_type",
    [OSError, ConnectionResetError, BrokenPipeError, RuntimeError, ValueError, KeyError, FaultServerBug],
    ids=fault_ids,
)
@pytest.mark.parametrize(("kind", "position"), FAULT_SEND_POSITIONS)
@fault_test()
async def test_fault_send_raising_at_each_position_ends_the_response_once_logged(
    probe: FaultProbe, kind: str, position: str, error_type: type[Exception]
) -> None:
    """send() raising at start, first chunk, on_gap, 1st/3rd event, keep-alive,
    final chunk or HEAD body: the app returns, nothing more is sent, the source
    is released, and one record is logged: DEBUG for an OSError (a disconnect),
    ERROR with the traceback for anything else."""
    rig, normal = fault_send_rig(kind, position)
    at = FAULT_SEND_AT[position]
    send = FaultSend(rig.peer, at, error_type("injected"))
    await asgi_ended(asgi_serve(rig.app, rig.peer, send))
    assert send.calls == at + 1, f"{send.calls - at - 1} send() call(s) after the failing one"
    assert rig.peer.sent == normal[:at], f"wrong messages before the failure: {rig.peer.sent}"
    assert rig.unreleased() == [], rig.unreleased()
    assert not probe.running(), f"left running: {probe.running()}"
    if issubclass(error_type, OSError):
        assert probe.logged() == [("DEBUG", None)], f"a disconnect must be one DEBUG record: {probe.messages()}"
        assert "disconnected" in probe.messages()[0] and error_type.__name__ in probe.messages()[0]
    else:
        assert probe.logged() == [("ERROR", error_type.__name__)], f"expected one ERROR: {probe.messages()}"


@pytest.mark.parametrize(("kind", "position"), FAULT_SEND_POSITIONS)
@fault_test()
async def test_fault_send_hanging_at_each_position_ends_at_the_send_timeout(
    probe: FaultProbe, kind: str, position: str
) -> None:
    """send() hanging forever at any position: after send_timeout the hung send
    is cancelled, the app returns, nothing more is sent, the source is released,
    and one INFO record says so."""
    rig, normal = fault_send_rig(kind, position, send_timeout=FAULT_SEND_TIMEOUT)
    at = FAULT_SEND_AT[position]
    send = FaultSend(rig.peer, at, block=True)
    await asgi_ended(asgi_serve(rig.app, rig.peer, send), within=3.0)
    waited = asyncio.get_running_loop().time() - send.entered_at
    assert waited >= FAULT_SEND_TIMEOUT - 0.005, f"ended {waited:.3f} s after the send began, before send_timeout"
    assert send.cancelled, "the hung send() was abandoned, not cancelled"
    assert send.calls == at + 1, f"{send.calls - at - 1} send() call(s) after the hung one"
    assert rig.peer.sent == normal[:at], f"wrong messages: {rig.peer.sent}"
    assert rig.unreleased() == [], rig.unreleased()
    assert probe.logged() == [("INFO", None)], f"expected one INFO record: {probe.messages()}"
    assert "did not accept a write within" in probe.messages()[0]


@pytest.mark.parametrize(("kind", "position"), FAULT_SEND_POSITIONS)
@fault_test()
async def test_fault_send_raising_cancelled_error_is_never_swallowed(
    probe: FaultProbe, kind: str, position: str
) -> None:
    """send() raising CancelledError of its own (nobody cancelled the app): the
    failure is visible, either propagated as the app's CancelledError or logged
    at ERROR, and nothing is sent after the failing send."""
    rig, normal = fault_send_rig(kind, position)
    at = FAULT_SEND_AT[position]
    send = FaultSend(rig.peer, at, asyncio.CancelledError())
    task = asgi_serve(rig.app, rig.peer, send)
    await asyncio.wait((task,), timeout=3.0)
    assert task.done(), "the response did not end"
    assert send.calls == at + 1, f"sent after the failing send(): {rig.peer.sent[at:]}"
    assert rig.peer.sent == normal[:at], f"wrong messages: {rig.peer.sent}"
    logged = probe.logged()
    assert task.cancelled() or [level for level, _ in logged] == ["ERROR"], (
        f"send() raising CancelledError was swallowed: the app returned normally and logged {logged}"
    )
    assert rig.unreleased() == [], rig.unreleased()


# outcome name -> (what receive() hands out, the exception type logged, or None for a disconnect)
FAULT_RECEIVE_OUTCOMES: dict[str, tuple[Callable[[], list[object]], str | None]] = {
    "raises_RuntimeError": (lambda: [FaultRaise(RuntimeError("receive broke"))], "RuntimeError"),
    "raises_ConnectionResetError": (lambda: [FaultRaise(ConnectionResetError("gone"))], None),
    "websocket.connect": (lambda: [{"type": "websocket.connect"}], "RuntimeError"),
    "http.response.start": (lambda: [{"type": "http.response.start", "status": 200}], "RuntimeError"),
    "second_request_body": (
        lambda: [
            {"type": "http.request", "body": b"", "more_body": False},
            {"type": "http.request", "body": b"again", "more_body": False},
        ],
        "RuntimeError",
    ),
    "no_type": (lambda: [{"body": b""}], "KeyError"),
    "not_a_mapping": (lambda: [None], "TypeError"),
}

FAULT_RECEIVE_MOMENTS = ["at_once", "after_body", "after_events", "during_event_send", "during_keep_alive_send"]


@pytest.mark.parametrize("outcome", list(FAULT_RECEIVE_OUTCOMES))
@pytest.mark.parametrize("moment", FAULT_RECEIVE_MOMENTS)
@pytest.mark.parametrize("kind", ["response", "channel"])
@fault_test()
async def test_fault_receive_misbehaving_at_each_moment_ends_the_response_once_logged(
    probe: FaultProbe, kind: str, moment: str, outcome: str
) -> None:
    """receive() raising or returning an unexpected message (another protocol's,
    a second request body, no type, not a mapping) at once, after the request
    body, after events, during an event send or during a keep-alive send: the
    response ends, cleanly (final chunk, one ERROR naming the error) unless it
    was an OSError (a disconnect: no final chunk, one DEBUG record). A send in
    progress is cut short when the client left, and completes otherwise."""
    make, error_name = FAULT_RECEIVE_OUTCOMES[outcome]
    rig = FaultRig(kind, keep_alive=FAULT_KEEP_ALIVE if moment == "during_keep_alive_send" else None)
    receive = FaultReceive()
    e0, e1 = Event("e0"), Event("e1")
    send = FaultSend(rig.peer, 2, block=True) if moment.startswith("during") else FaultSend(rig.peer)
    expected = [asgi_start(), ASGI_FIRST]
    if moment == "after_body":
        receive.push({"type": "http.request", "body": b"a", "more_body": True})
        receive.push({"type": "http.request", "body": b"b", "more_body": False})
    if moment in ("at_once", "after_body"):
        receive.push(*make())
    task = asgi_serve(rig.app, rig.peer, send, receive)
    if moment == "after_events":
        rig.emit_paced(e0, e1)
        await rig.peer.wait_for_bodies(3)
        expected += fault_bodies(e0, e1)
        receive.push(*make())
    elif moment.startswith("during"):
        if moment == "during_event_send":
            rig.emit(e0)
        await send.entered.wait()
        receive.push(*make())
        await receive.drained.wait()
        send.gate.set()  # too late for a send that the client's departure cut short
        if error_name is not None:
            expected += fault_bodies(e0) if moment == "during_event_send" else [FAULT_KEEP_ALIVE_FRAME]
    await asgi_ended(task)
    if moment.startswith("during"):
        assert send.cancelled == (error_name is None), f"send in progress cancelled: {send.cancelled}"
    if error_name is None:
        assert rig.peer.sent == expected, f"wrong messages after a disconnect: {rig.peer.sent}"
        assert probe.logged() == [("DEBUG", None)], f"a disconnect must be one DEBUG record: {probe.messages()}"
        assert probe.messages() == ["SSE client disconnected"], probe.messages()
    else:
        assert rig.peer.sent == [*expected, ASGI_FINAL], f"wrong messages: {rig.peer.sent}"
        assert probe.logged() == [("ERROR", error_name)], f"expected one ERROR: {probe.messages()}"
        assert "receive() failed" in probe.messages()[0]
        if outcome in ("websocket.connect", "http.response.start"):
            exc_info = probe.records[0].exc_info
            assert exc_info is not None and str(exc_info[1]) == f"unexpected ASGI message while streaming: {outcome!r}"
    assert rig.unreleased() == [], rig.unreleased()


@pytest.mark.parametrize("failure", ["raises", "times_out"])
@fault_test()
async def test_fault_send_failing_after_a_failed_receive_sends_nothing_more(probe: FaultProbe, failure: str) -> None:
    """receive() fails while an event is being sent, and then that send fails
    too (it raises, or times out): nothing more is sent (no last message to a
    server whose send just failed), and each failure is logged once."""
    rig = FaultRig("response", send_timeout=FAULT_SEND_TIMEOUT)
    receive = FaultReceive()
    entered, fail = asyncio.Event(), asyncio.Event()

    async def send(message: MutableMapping[str, Any]) -> None:
        if message.get("body") == b"data: e0\n\n":
            entered.set()
            await fail.wait()  # until the test fails it; forever if it times out
            raise FaultServerBug("send broke")
        await rig.peer.send(message)

    task = asgi_serve(rig.app, rig.peer, send, receive)
    rig.emit(Event("e0"))
    await entered.wait()
    receive.push(FaultRaise(RuntimeError("receive broke")))
    await receive.drained.wait()
    if failure == "raises":
        fail.set()
    await asgi_ended(task)
    assert rig.peer.sent == [asgi_start(), ASGI_FIRST], f"sent after the failed send: {rig.peer.sent}"
    levels = [level for level, _ in probe.logged()]
    assert levels == (["ERROR", "ERROR"] if failure == "raises" else ["ERROR", "INFO"]), probe.messages()
    assert rig.unreleased() == [], rig.unreleased()


@pytest.mark.parametrize("kind", ["response", "channel"])
@fault_test()
async def test_fault_receive_raising_cancelled_error_is_never_swallowed(probe: FaultProbe, kind: str) -> None:
    """receive() raising CancelledError of its own (nobody cancelled the app)
    is visible: propagated as the app's CancelledError or logged at ERROR."""
    rig = FaultRig(kind)
    receive = FaultReceive()
    receive.push(FaultRaise(asyncio.CancelledError()))
    task = asgi_serve(rig.app, rig.peer, FaultSend(rig.peer), receive)
    await asyncio.wait((task,), timeout=3.0)
    assert task.done(), "the response did not end"
    assert task.cancelled() or [level for level, _ in probe.serious()] == ["ERROR"], (
        f"receive() raising CancelledError was swallowed: the response ended with {rig.peer.sent[2:]} "
        f"and logged {probe.logged()}"
    )
    assert rig.unreleased() == [], rig.unreleased()


@pytest.mark.parametrize(
    ("error", "record"),
    [
        (ValueError("source broke"), ("ERROR", "ValueError")),
        (ConnectionResetError("database gone"), ("ERROR", "ConnectionResetError")),
        (Lagged(3), ("WARNING", None)),  # the message names the loss; no traceback
    ],
    ids=["ValueError", "ConnectionResetError", "Lagged"],
)
@pytest.mark.parametrize("before", [0, 2], ids=["first_item", "middle_item"])
@pytest.mark.parametrize("kind", ["response", "channel"])
@fault_test()
async def test_fault_source_raising_at_first_or_middle_item_ends_cleanly_once_logged(
    probe: FaultProbe, kind: str, before: int, error: Exception, record: tuple[str, str | None]
) -> None:
    """The source (a response's iterable, a channel's closure) raising before any
    item or after two: the items before are written, then the final chunk; one
    record (WARNING for Lagged, else ERROR with the traceback) and an OSError of
    the source is NOT mistaken for a client disconnect."""
    events = [Event(f"e{i}") for i in range(before)]
    error = type(error)(*error.args)  # a fresh one for each run
    peer = AsgiPeer()
    source = AsgiRecordingSource([*events, error])
    rig = FaultRig("channel")
    if kind == "channel":
        rig.emit(*events)
        rig.fail(error)
    app = Broadcaster[str, Event]().response(source) if kind == "response" else rig.app
    await asgi_ended(asgi_serve(app, peer, FaultSend(peer), FaultReceive()))
    # Both kinds of source fill the response's queue ahead of it (a plain
    # iterable is read by a task of the response's): the two events are
    # written together.
    bodies = [asgi_body(b"".join(e.encode() for e in events))] if events else []
    assert peer.sent == [asgi_start(), ASGI_FIRST, *bodies, ASGI_FINAL], peer.sent
    assert probe.logged() == [record], f"expected one {record}: {probe.messages()}"
    if kind == "response":
        assert source.calls == ["__anext__"] * (before + 1) + ["aclose"], source.calls
    else:
        assert rig.closure_log == ["started", type(error).__name__], rig.closure_log
        assert rig.unreleased() == [], rig.unreleased()


@pytest.mark.parametrize("before", [0, 2], ids=["first_item", "middle_item"])
@fault_test()
async def test_fault_render_raising_ends_cleanly_once_logged(probe: FaultProbe, before: int) -> None:
    """response(stream, render) whose render raises for an item: the items before
    are written, then the final chunk, one ERROR; the subscription is released."""
    peer = AsgiPeer()

    def render(n: int) -> Event:
        if n == before:
            raise ValueError(f"cannot render {n}")
        return Event(str(n))

    numbers: Broadcaster[str, int] = Broadcaster()
    stream = numbers.subscribe("k")
    for n in range(before + 2):
        numbers.send("k", n)
    app = numbers.response(stream, render)
    await asgi_ended(asgi_serve(app, peer, FaultSend(peer), FaultReceive()))
    # The items before the failing one were waiting with it: written together
    # before the response ends.
    before_bodies = [asgi_body(b"".join(Event(str(n)).encode() for n in range(before)))] if before else []
    expected = [asgi_start(), ASGI_FIRST, *before_bodies, ASGI_FINAL]
    assert peer.sent == expected, peer.sent
    assert probe.logged() == [("ERROR", "ValueError")], probe.messages()
    assert stream.closed and numbers.subscriber_count("k") == 0 and "k" not in numbers


class FaultBadClose(AsgiRecordingSource):
    """A recording source whose aclose() raises ``error`` (after recording the call)."""

    def __init__(self, error: Exception, items: list[Event | Exception] | None = None, *, wait: bool = True) -> None:
        super().__init__(items or [], wait=wait)
        self.error = error

    async def aclose(self) -> None:
        await super().aclose()
        raise self.error


# ending -> (the broadcaster records expected before the aclose ERROR)
FAULT_ACLOSE_ENDINGS: dict[str, list[tuple[str, str | None]]] = {
    "exhausted": [],
    "disconnect": [("DEBUG", None)],
    "send_oserror": [("DEBUG", None)],
    "send_error": [("ERROR", "RuntimeError")],
    "send_timeout": [("INFO", None)],
    "source_error": [("ERROR", "KeyError")],
    "cancelled": [],
    "head": [],
    "non_http_scope": [],
}


@pytest.mark.parametrize("aclose_error", [ValueError, OSError], ids=fault_ids)
@pytest.mark.parametrize("ending", list(FAULT_ACLOSE_ENDINGS))
@fault_test()
async def test_fault_source_aclose_raising_after_any_ending_is_logged_once(
    probe: FaultProbe, ending: str, aclose_error: type[Exception]
) -> None:
    """The source's aclose() raising, whatever ended the response (exhausted,
    disconnect, failing or hung send, source error, cancellation, HEAD, a bad
    scope): logged once at ERROR with its traceback (an OSError too: it is not
    the client's), after the record of the ending, which is never hidden by it;
    aclose() is called exactly once."""
    items: list[Event | Exception] = [Event("e0")]
    if ending == "source_error":
        items.append(KeyError("source broke"))
    source = FaultBadClose(aclose_error("aclose broke"), items, wait=ending != "exhausted")
    config = SseConfig(keep_alive=None, send_timeout=FAULT_SEND_TIMEOUT if ending == "send_timeout" else 30.0)
    app = Broadcaster[str, Event](config=config).response(source)
    peer = AsgiPeer(method="HEAD" if ending == "head" else "GET")
    scope = {**peer.scope, "type": "websocket"} if ending == "non_http_scope" else peer.scope
    fault: BaseException | None = {"send_oserror": OSError("reset"), "send_error": RuntimeError("bug")}.get(ending)
    send = FaultSend(peer, 2, fault, block=ending in ("send_timeout", "cancelled"))
    receive = FaultReceive()
    if ending == "disconnect":
        receive.push(ASGI_DISCONNECT)
    task = asyncio.ensure_future(app(scope, receive, send))
    if ending == "cancelled":
        await send.entered.wait()
        task.cancel()
    await asyncio.wait((task,), timeout=3.0)
    assert task.done(), "the response did not end"
    if ending == "cancelled":
        assert task.cancelled(), "the cancellation was lost"
    elif ending == "non_http_scope":
        with pytest.raises(RuntimeError, match="'http' scopes only"):
            task.result()
    else:
        task.result()
    assert source.calls.count("aclose") == 1, source.calls
    expected = [*FAULT_ACLOSE_ENDINGS[ending], ("ERROR", aclose_error.__name__)]
    assert probe.logged() == expected, f"wrong records: {probe.messages()}"
    assert probe.messages()[-1] == "closing the SSE event source raised"


@pytest.mark.parametrize("ending", ["disconnect", "cancelled"])
@fault_test()
async def test_fault_source_raising_while_being_cancelled_is_logged_once(probe: FaultProbe, ending: str) -> None:
    """A source that raises instead of honouring the cancellation of its read
    (the response is ending: disconnect, or the app cancelled) is logged once at
    ERROR; the ending itself is unchanged."""

    class Stubborn(AsgiRecordingSource):
        async def __anext__(self) -> Event:
            try:
                return await super().__anext__()
            except asyncio.CancelledError:
                raise ValueError("cleanup failed") from None

    source = Stubborn(wait=True)
    peer = AsgiPeer()
    receive = FaultReceive()
    task = asgi_serve(Broadcaster[str, Event]().response(source), peer, FaultSend(peer), receive)
    await receive.called.wait()
    if ending == "disconnect":
        receive.push(ASGI_DISCONNECT)
        await asgi_ended(task)
        assert probe.logged() == [("DEBUG", None), ("ERROR", "ValueError")], probe.messages()
    else:
        task.cancel()
        await asyncio.wait((task,))
        assert task.cancelled(), "the cancellation was lost"
        assert probe.logged() == [("ERROR", "ValueError")], probe.messages()
    assert peer.sent == [asgi_start(), ASGI_FIRST], peer.sent
    assert source.calls == ["__anext__", "aclose"], source.calls


@pytest.mark.parametrize("kind", ["response", "channel"])
@fault_test()
async def test_fault_source_raising_cancelled_error_is_logged_like_any_error(probe: FaultProbe, kind: str) -> None:
    """A source that ends with a CancelledError of its own (it awaited something
    someone else cancelled) is an error of the source: one ERROR, the final chunk.
    channel() does so; response() must too."""
    event = Event("before")
    rig = FaultRig(kind)
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()

    async def source() -> AsyncIterator[Event]:
        yield event
        await cancelled

    async def closure(tx: Sender) -> None:
        await tx.send(event)
        await cancelled

    app = rig.b.response(source()) if kind == "response" else rig.b.channel(closure)
    await asgi_ended(asgi_serve(app, rig.peer, FaultSend(rig.peer), FaultReceive()))
    assert rig.peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode()), ASGI_FINAL], rig.peer.sent
    assert [level for level, _ in probe.logged()] == ["ERROR"], (
        f"a source ending with CancelledError was swallowed silently: {probe.messages()}"
    )


FAULT_CANCEL_POINTS = [
    *(("response", p) for p in ("start", "first_chunk", "gap", "waiting", "event1", "keep_alive", "final")),
    *(("response", p) for p in ("head_final", "source_aclose")),
    *(("channel", p) for p in ("start", "first_chunk", "waiting", "event1", "keep_alive", "final", "head_final")),
    ("channel", "backpressure"),
]


class FaultSlowItems:
    """An item source that never yields and whose aclose() waits for ``release``
    (a database cursor closing), recording whether that wait was cancelled."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[str] = []

    def __aiter__(self) -> FaultSlowItems:
        return self

    async def __anext__(self) -> Event:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.calls.append("aclose")
        self.closing.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.calls.append("aclose cancelled")
            raise


async def fault_reach(point: str, rig: FaultRig, send: FaultSend, receive: FaultReceive, items: FaultSlowItems) -> None:
    """Return once the response is suspended at ``point``."""
    if point == "backpressure":
        rig.emit(*(Event(f"e{i}") for i in range(5)))
    if send.at is not None:
        await send.entered.wait()
    else:
        await receive.called.wait()
    if point == "backpressure":
        for _ in range(100):  # loop iterations until the closure blocks in tx.send, waiting for room
            if rig.tx is not None and rig.tx._putters:
                break
            await asyncio.sleep(0)
        assert rig.tx is not None and rig.tx._putters, "the closure never waited for room"
    elif point == "waiting" and rig.kind == "channel":
        await rig.closure_started.wait()
    elif point == "source_aclose":
        receive.push(ASGI_DISCONNECT)
        await items.closing.wait()


@pytest.mark.parametrize(("kind", "point"), FAULT_CANCEL_POINTS)
@fault_test()
async def test_fault_cancel_at_each_await_propagates_and_leaves_nothing(
    probe: FaultProbe, kind: str, point: str
) -> None:
    """Cancelling the app's task while it awaits the start send, the first chunk,
    on_gap, events, an event send, a keep-alive send, the final send, a HEAD
    body, the source's aclose(), or (channel) while the closure waits for room:
    CancelledError propagates, the send in progress is cancelled, nothing more
    is sent, nothing is left running at that moment, the source is released and
    no WARNING or ERROR is logged."""
    items = FaultSlowItems()
    wrap = (lambda stream: replay(items, stream)) if point == "source_aclose" else None
    if point in FAULT_SEND_AT:
        rig, normal = fault_send_rig(kind, point)
        at: int | None = FAULT_SEND_AT[point]
    else:
        rig = FaultRig(kind, buffer=1 if point == "backpressure" else 64, wrap=wrap)
        normal, at = [asgi_start(), ASGI_FIRST], 2 if point == "backpressure" else None
    send = FaultSend(rig.peer, at, block=True)
    receive = FaultReceive()
    task = asgi_serve(rig.app, rig.peer, send, receive)
    await fault_reach(point, rig, send, receive, items)
    task.cancel()
    await asyncio.wait((task,))
    left = probe.running()
    assert task.cancelled(), "the cancellation was lost"
    assert not left, f"left running when the app's task ended: {left}"
    if at is not None:
        assert send.cancelled, "the send in progress was not cancelled"
        assert send.calls == at + 1 and rig.peer.sent == normal[:at], f"wrong messages: {rig.peer.sent}"
    else:
        assert rig.peer.sent == normal, f"wrong messages: {rig.peer.sent}"
    if point == "source_aclose":
        assert items.calls == ["aclose", "aclose cancelled"], items.calls
    if rig.closure_log:
        assert rig.closure_log[-1] in ("CancelledError", "returned"), rig.closure_log
    assert rig.unreleased() == [], rig.unreleased()
    assert probe.serious() == [], f"cancellation was logged: {probe.messages()}"


async def fault_cancel_during_cleanup(
    probe: FaultProbe, task: asyncio.Task[None], release: asyncio.Event, *, repeat: bool = False
) -> list[str]:
    """Cancel ``task`` (again at every loop iteration if ``repeat``, as anyio's
    cancel scopes do) while a helper of it is slow to finish (it waits for
    ``release``); return the tasks still running when ``task`` ended (empty if
    it waited for them), then release the helper and let everything end."""
    left: list[str] = []
    task.cancel()
    for _ in range(100):  # loop iterations, not time: the helper cannot finish before `release`
        if task.done():
            left = sorted(map(repr, probe.running()))
            break
        if repeat:
            task.cancel()
        await asyncio.sleep(0)
    release.set()
    await asyncio.wait((task,), timeout=3.0)
    assert task.done(), "the app did not end once its helper finished"
    assert task.cancelled(), "the cancellation was lost"
    return left


@fault_test()
async def test_fault_cancel_while_an_abandoned_send_unwinds_is_not_lost(probe: FaultProbe) -> None:
    """The client leaves while an event send is in progress, so the response
    abandons that send, which takes a moment to honour it; the server cancels
    the app meanwhile: that cancellation is not taken for the abandonment (it
    propagates), and the app ends only after the send has (none left running)."""
    rig = FaultRig("response")
    send = FaultSend(rig.peer, 2, slow_cancel=True)
    receive = FaultReceive()
    task = asgi_serve(rig.app, rig.peer, send, receive)
    rig.emit(Event("e0"))
    await send.entered.wait()
    receive.push(ASGI_DISCONNECT)
    await send.cleaning.wait()  # the abandoned send is unwinding
    left = await fault_cancel_during_cleanup(probe, task, send.release)
    assert not left, f"the app ended while these still ran: {left}"
    assert rig.unreleased() == [], rig.unreleased()


@fault_test()
async def test_fault_cancel_while_a_timed_out_send_is_cancelled_waits_for_it(probe: FaultProbe) -> None:
    """The start send hangs past send_timeout and takes a moment to honour its
    abandonment; the server cancels the app meanwhile: the cancellation
    propagates, and the app ends only after that send has (none left running)."""
    rig = FaultRig("response", send_timeout=FAULT_SEND_TIMEOUT)
    send = FaultSend(rig.peer, 0, slow_cancel=True)
    task = asgi_serve(rig.app, rig.peer, send, FaultReceive())
    await send.cleaning.wait()  # timed out: the app is awaiting the cancelled send
    left = await fault_cancel_during_cleanup(probe, task, send.release)
    assert not left, f"the app ended while these still ran: {left}"
    assert rig.unreleased() == [], rig.unreleased()


@pytest.mark.parametrize("position", ["start", "event1"])
@fault_test()
async def test_fault_repeated_cancellation_still_waits_for_the_helpers(probe: FaultProbe, position: str) -> None:
    """A cancellation delivered again at every loop iteration (anyio's cancel
    scopes, e.g. Starlette middleware) while a send is slow to honour it: the
    app ends only after every task it started has ended."""
    rig, _ = fault_send_rig("response", position)
    send = FaultSend(rig.peer, FAULT_SEND_AT[position], slow_cancel=True)
    task = asgi_serve(rig.app, rig.peer, send, FaultReceive())
    await send.entered.wait()
    left = await fault_cancel_during_cleanup(probe, task, send.release, repeat=True)
    assert not left, f"the app ended while these still ran: {left}"
    assert rig.unreleased() == [], rig.unreleased()


@fault_test()
async def test_fault_cancel_while_a_channel_closure_is_slow_to_exit(probe: FaultProbe) -> None:
    """The client leaves, the closure takes a moment to exit after its
    cancellation and then raises, and the server cancels the app meanwhile: the
    app ends only after the closure (none left running), and the closure's
    error is still logged once."""
    rig = FaultRig("channel")
    release, cleaning = asyncio.Event(), asyncio.Event()

    async def closure(tx: Sender) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()
            raise ValueError("late failure") from None

    receive = FaultReceive()
    task = asgi_serve(rig.b.channel(closure), rig.peer, FaultSend(rig.peer), receive)
    await receive.called.wait()
    receive.push(ASGI_DISCONNECT)
    await cleaning.wait()  # the app is in the source's aclose(), awaiting the closure
    left = await fault_cancel_during_cleanup(probe, task, release)
    assert not left, f"the app ended while its closure still ran: {left}"
    assert probe.serious() == [("ERROR", "ValueError")], f"the closure's error was not logged once: {probe.messages()}"
    assert probe.messages() == ["SSE client disconnected", "SSE channel closure raised while it was being closed"], (
        f"wrong records: {probe.messages()}"
    )
    assert not rig.b._sources


@fault_test()
async def test_fault_cancel_as_a_channel_closure_exits_keeps_its_error(probe: FaultProbe) -> None:
    """The server cancels the app just as the closure, cancelled after a
    disconnect, exits with an error: that error is still logged once, never
    dropped with the Sender."""
    rig = FaultRig("channel")
    exiting = asyncio.Event()

    async def closure(tx: Sender) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            exiting.set()
            raise ValueError("late failure") from None

    receive = FaultReceive()
    task = asgi_serve(rig.b.channel(closure), rig.peer, FaultSend(rig.peer), receive)
    await receive.called.wait()
    receive.push(ASGI_DISCONNECT)
    await exiting.wait()  # the closure has ended; the app has not yet seen it
    task.cancel()
    await asyncio.wait((task,))
    assert task.cancelled(), "the cancellation was lost"
    assert probe.serious() == [("ERROR", "ValueError")], f"the closure's error was dropped: {probe.messages()}"
    assert probe.messages() == ["SSE client disconnected", "SSE channel closure raised while it was being closed"], (
        f"wrong records: {probe.messages()}"
    )
    assert not rig.b._sources


# ---------------------------------------------------------------------------
# The probe itself: it fails a test for each thing it is meant to catch
# ---------------------------------------------------------------------------


def fault_raise_zero_division() -> None:
    raise ZeroDivisionError("in a callback")


class FaultFinalized:
    """An object whose finalizer raises."""


@pytest.mark.parametrize(
    ("misdeed", "caught"),
    [
        ("unretrieved_task_exception", "exception handler was called: .*Task exception was never retrieved"),
        ("exception_in_callback", "exception handler was called: .*Exception in callback"),
        ("never_awaited_coroutine", "was never awaited"),
        ("finalizer_raising", "unraisable exceptions"),
        ("asyncio_error_log", "other loggers reported problems"),
        ("task_left_running", "test left tasks running"),
    ],
)
def test_fault_probe_fails_a_test_that_crashes_the_loop_or_leaves_a_mess(misdeed: str, caught: str) -> None:
    """The harness of the fault tests is not vacuous: each thing it promises to
    catch, done once by a test, fails that test."""

    forgotten: list[asyncio.Task[None]] = []

    @fault_test(timeout=2.0)
    async def scenario(probe: FaultProbe) -> None:
        loop = asyncio.get_running_loop()
        if misdeed == "unretrieved_task_exception":

            async def boom() -> None:
                raise ValueError("never retrieved")

            task = loop.create_task(boom())
            await asyncio.wait((task,))
            del task
        elif misdeed == "exception_in_callback":
            ran = asyncio.Event()
            loop.call_soon(fault_raise_zero_division)
            loop.call_soon(ran.set)
            await ran.wait()
        elif misdeed == "never_awaited_coroutine":
            coroutine = asyncio.sleep(0)
            del coroutine
        elif misdeed == "finalizer_raising":
            weakref.finalize(FaultFinalized(), fault_raise_zero_division)
        elif misdeed == "asyncio_error_log":
            logging.getLogger("asyncio").error("something broke")
        else:
            forgotten.append(loop.create_task(asyncio.sleep(3600)))

    with pytest.raises(AssertionError, match=caught):
        scenario()


# ===========================================================================
# Shutdown on a signal: close_on_signals() and shutdown_trigger()
#
# Real signals, sent to this process with os.kill: Python runs their handlers
# in the main thread, where @async_test runs the loop. ServerHandlers stands
# in for a server's own handlers; the fixture restores the process's.
# ===========================================================================


class ServerHandlers:
    """A server's Python handler of SIGINT and SIGTERM: records each call,
    with how many responses the broadcaster had ended by shutdown then
    (read on the loop: a signal handler must not take the registry lock)."""

    def __init__(self, b: Broadcaster[Any, Any]) -> None:
        self.b = b
        self.loop = asyncio.get_running_loop()
        self.calls: list[tuple[int, int]] = []
        self.log: list[str] = []  # "server" at each call, for tests that log other steps too
        self.frames: list[object] = []  # the frame each call got (Python passes the interrupted one)
        self._called = asyncio.Event()

    def __call__(self, signum: int, frame: object) -> None:
        self.log.append("server")
        self.frames.append(frame)
        self.loop.call_soon_threadsafe(self._record, signum)  # safe in a signal handler

    def _record(self, signum: int) -> None:
        self.calls.append((signum, self.b.metrics().responses_ended["shutdown"]))
        self._called.set()

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self)

    async def wait_calls(self, n: int = 1) -> None:
        while len(self.calls) < n:
            self._called.clear()
            await self._called.wait()


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def installed(sig: signal.Signals) -> object:
    """The handler of ``sig`` now (as a plain object: compared, not called)."""
    return signal.getsignal(sig)


@pytest.fixture
def saved_signals() -> Iterator[None]:
    """Restore the handlers of SIGINT and SIGTERM the process had, and start
    and end with no broadcaster armed (the process has one signal chain:
    an armed broadcaster another test left unclosed would be closed too)."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    broadcaster._CHAIN._armed.clear()
    try:
        yield
    finally:
        broadcaster._CHAIN._armed.clear()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.asynccontextmanager
async def open_streams(b: Broadcaster[str, Event], *keys: str) -> AsyncIterator[list[AsgiResponse]]:
    """An SSE response of ``b`` for each key, each with its headers read."""
    async with contextlib.AsyncExitStack() as stack:
        responses = []
        for key in keys:
            client = await stack.enter_async_context(AsgiClient(b.response(b.subscribe(key))))
            responses.append(await stack.enter_async_context(client.stream("GET", f"/{key}")))
        yield responses


@pytest.mark.usefixtures("saved_signals")
@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGINT", "SIGTERM"])
@async_test()
async def test_close_on_signals_ends_every_response_before_passing_the_signal_on(sig: signal.Signals) -> None:
    """A signal closes the broadcaster; every response writes what it was sent
    and ends cleanly; only then does the server's handler get the signal, and
    the handlers are the server's again."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()
    assert installed(sig) is server, "nothing is chained before a response runs"
    async with open_streams(b, "a", "b") as responses:
        assert installed(sig) is not server
        b.send("a", Event("last"))
        os.kill(os.getpid(), sig)
        await server.wait_calls()
        assert server.calls == [(sig, 2)]
        assert all(frame is not None for frame in server.frames), "the signal's frame is passed on"
        assert [response.ended for response in responses] == [True, True]
        assert [event.data for event in await responses[0].events(1)] == ["last"]
        assert installed(sig) is server
        assert b.subscribe("a").closed


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_chains_once_however_often_it_is_called() -> None:
    """A second call, and later responses, chain nothing more: one signal
    reaches the server's handler once."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()
    async with open_streams(b, "a"):
        chained = installed(signal.SIGTERM)
        b.close_on_signals()
        async with open_streams(b, "b"):
            assert installed(signal.SIGTERM) is chained
            os.kill(os.getpid(), signal.SIGTERM)
            await server.wait_calls()
    assert server.calls == [(signal.SIGTERM, 2)]


class StuckResponse(NamedTuple):
    server: ServerHandlers
    peer: AsgiPeer
    app: asyncio.Future[None]
    removed: asyncio.Event  # set once the broadcaster is closed


async def stuck_response(timeout: float) -> StuckResponse:
    """A broadcaster with close_on_signals(timeout=...) in front of the
    server's handlers, and one response of it whose client will take
    nothing more once ``peer.send_hangs`` is set."""
    removed = asyncio.Event()
    b: Broadcaster[str, Event] = Broadcaster(
        config=SseConfig(keep_alive=None, send_timeout=None),
        on_change=lambda key: None if key in b else removed.set(),
    )
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals(timeout=timeout)
    peer = AsgiPeer()
    app = asyncio.ensure_future(b.response(b.subscribe("k"))(peer.scope, peer.receive, peer.send))
    await peer.wait_for_bodies(1)
    return StuckResponse(server, peer, app, removed)


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_sends_a_second_signal_straight_to_the_server() -> None:
    """While the shutdown waits for a response that cannot finish (its
    client takes nothing), a second Ctrl-C reaches the server at once; the
    first reaches it when the wait is over (``timeout``)."""
    server, peer, app, removed = await stuck_response(timeout=0.2)
    peer.send_hangs = True  # the final body message never completes
    os.kill(os.getpid(), signal.SIGINT)
    await removed.wait()  # the shutdown has closed the broadcaster
    os.kill(os.getpid(), signal.SIGINT)
    await server.wait_calls(1)
    assert server.calls == [(signal.SIGINT, 0)]  # the second, during the wait
    await server.wait_calls(2)
    assert server.calls == [(signal.SIGINT, 0), (signal.SIGINT, 0)]  # the first, after the timeout
    assert not app.done()
    app.cancel()
    await asyncio.wait((app,))


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_leaves_a_signal_without_a_python_handler_alone() -> None:
    """A signal with its default action or ignored is not chained: chaining
    would change what it does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    b.close_on_signals()
    async with open_streams(b, "a"):
        assert (installed(signal.SIGINT), installed(signal.SIGTERM)) == (signal.SIG_IGN, signal.SIG_DFL)


@pytest.mark.usefixtures("saved_signals")
def test_close_on_signals_leaves_pythons_own_ctrl_c_alone() -> None:
    """KeyboardInterrupt (``default_int_handler``) and asyncio.run's handler
    (Python 3.11+) are Python's, not a server's: Ctrl-C keeps interrupting
    at once, even a loop stuck in blocking code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    b.close_on_signals()
    seen: list[object] = []

    async def serve_one() -> None:
        seen.append(installed(signal.SIGINT))  # asyncio.run's, on Python 3.11+
        async with open_streams(b, "a"):
            assert installed(signal.SIGINT) is seen[0]

    asyncio.run(serve_one())
    assert installed(signal.SIGINT) is signal.default_int_handler
    loop = asyncio.new_event_loop()  # a loop of one's own: SIGINT stays Python's
    try:
        b.close_on_signals()
        seen.clear()
        loop.run_until_complete(serve_one())
        assert seen == [signal.default_int_handler]
    finally:
        loop.close()


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_chains_at_the_first_response_in_the_main_thread() -> None:
    """A response on another thread's loop chains nothing (Python runs signal
    handlers in the main thread only); the next one in the main thread does."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()

    async def elsewhere() -> None:
        async with open_streams(b, "a"):
            assert installed(signal.SIGTERM) is server

    await asyncio.to_thread(asyncio.run, elsewhere())
    async with open_streams(b, "b"):
        assert installed(signal.SIGTERM) is not server


@pytest.mark.usefixtures("saved_signals")
def test_close_on_signals_passes_a_signal_on_at_once_when_its_loop_does_not_run() -> None:
    """Once the loop that chained the handlers is closed, or while it is
    stopped, a signal goes straight to the server's handler."""
    calls: list[int] = []

    def server(signum: int, frame: Any) -> None:
        assert frame is not None, "the signal's frame is passed on"
        calls.append(signum)

    for sig in SIGNALS:
        signal.signal(sig, server)
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    b.close_on_signals()

    async def serve_one() -> None:
        async with open_streams(b, "a"):
            pass

    asyncio.run(serve_one())
    assert installed(signal.SIGTERM) is not server
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM]
    stopped = asyncio.new_event_loop()  # not running, not closed
    try:
        b.close_on_signals()  # armed again: its next response chains on this loop
        stopped.run_until_complete(serve_one())
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        stopped.close()
    assert not b.metrics().streams and b.subscriber_count("a") == 0


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_keeps_working_after_a_close_from_another_thread() -> None:
    """close() outside the main thread cannot give the signals back: the
    chained handler stays, and a signal then goes on to the server once the
    (already closed) broadcaster has nothing left to wait for."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()
    async with open_streams(b, "a") as (response,):
        chained = installed(signal.SIGTERM)
        await asyncio.to_thread(b.close)
        await response.read()
        assert installed(signal.SIGTERM) is chained
        os.kill(os.getpid(), signal.SIGTERM)
        await server.wait_calls()
    assert server.calls == [(signal.SIGTERM, 1)]
    assert installed(signal.SIGTERM) is chained  # still there, passing signals straight on


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_behind_another_handler_passes_later_signals_straight_on() -> None:
    """Chained behind another library's handler (which close() cannot
    remove), the first signal starts the shutdown and each later one goes
    straight on to the server's handler."""
    server, peer, app, removed = await stuck_response(timeout=60)
    ours = signal.getsignal(signal.SIGTERM)
    assert callable(ours)
    seen: list[int] = []

    def library(signum: int, frame: Any) -> None:
        seen.append(signum)
        ours(signum, frame)

    signal.signal(signal.SIGTERM, library)
    peer.send_hangs = True
    os.kill(os.getpid(), signal.SIGTERM)
    await removed.wait()  # the shutdown has begun
    os.kill(os.getpid(), signal.SIGTERM)
    await server.wait_calls(1)  # the second, at once
    assert seen == [signal.SIGTERM, signal.SIGTERM]
    assert installed(signal.SIGTERM) is library
    app.cancel()  # the stuck response returns: the first goes on
    await server.wait_calls(2)
    assert server.calls == [(signal.SIGTERM, 0), (signal.SIGTERM, 0)]
    await asyncio.wait((app,))


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_shutdown_trigger_returns_once_a_signal_ended_every_response() -> None:
    """The trigger returns after the signal, with the broadcaster closed and
    its responses ended cleanly; a later signal has its default effect."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    trigger = asyncio.ensure_future(b.shutdown_trigger())
    async with open_streams(b, "a", "b") as responses:
        assert installed(signal.SIGTERM) != signal.SIG_DFL, "the trigger handles the signal"
        os.kill(os.getpid(), signal.SIGTERM)
        await trigger
        assert [response.ended for response in responses] == [True, True]
        assert b.metrics().responses_ended["shutdown"] == 2
    assert installed(signal.SIGTERM) == signal.SIG_DFL
    assert installed(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_shutdown_trigger_waits_only_for_the_responses_of_its_own_loop() -> None:
    """A response stuck on another thread's loop is closed but not waited for
    (the trigger's ``timeout`` is far beyond the test's)."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None, send_timeout=None))
    trigger = asyncio.ensure_future(b.shutdown_trigger(timeout=60))
    started, release = threading.Event(), threading.Event()

    async def stuck() -> None:
        peer = AsgiPeer()
        app = asyncio.ensure_future(b.response(b.subscribe("k"))(peer.scope, peer.receive, peer.send))
        await peer.wait_for_bodies(1)
        peer.send_hangs = True
        started.set()
        assert await asyncio.to_thread(release.wait, 5)
        app.cancel()
        await asyncio.wait((app,))

    elsewhere = asyncio.ensure_future(asyncio.to_thread(asyncio.run, stuck()))
    assert await asyncio.to_thread(started.wait, 5), "no response got stuck"
    os.kill(os.getpid(), signal.SIGINT)
    await trigger
    assert b.subscriber_count("k") == 0
    release.set()
    await elsewhere


def only_shutdown(b: Broadcaster[Any, Any]) -> bool:
    """Whether every response of ``b`` ended, one of them, by shutdown."""
    ended = b.metrics().responses_ended
    return ended["shutdown"] == 1 and sum(ended.values()) == 1


def merged(messages: Broadcaster[str, Event], presence: Broadcaster[str, Event]) -> AsgiApp:
    """A response of ``messages`` that also reads a stream of ``presence``
    (what a page that follows both over one connection gets)."""
    return messages.response(merge(messages.subscribe_many(["a"]), presence.subscribe_many(["a"])))


@async_test()
async def test_close_ends_a_response_that_also_reads_another_broadcasters_stream() -> None:
    """close() ends the broadcaster's responses, each once it has written what
    its source holds, though the other broadcaster's stream goes on."""
    messages: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    presence: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    async with AsgiClient(merged(messages, presence)) as client, client.stream("GET", "/") as response:
        messages.send("a", Event("hi"))
        assert (await response.event()).data == "hi"
        presence.send("a", Event("2 here"))
        messages.close()
        await response.read()
        assert [event.data for event in await response.events(1)] == ["2 here"]
    assert only_shutdown(messages)
    assert presence.subscriber_count("a") == 0


@async_test()
async def test_close_from_another_thread_ends_such_a_response_on_its_loop() -> None:
    messages: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    presence: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    async with AsgiClient(merged(messages, presence)) as client, client.stream("GET", "/") as response:
        await asyncio.to_thread(messages.close)
        await response.read()
    assert only_shutdown(messages)


@async_test()
async def test_a_response_called_after_close_ends_at_once_over_another_broadcasters_stream() -> None:
    """A response made before close() and called after it writes what its
    source holds, then ends."""
    messages: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    presence: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    app = merged(messages, presence)
    presence.send("a", Event("1 here"))
    messages.close()
    async with AsgiClient(app) as client:
        response = await client.request("GET", "/")
    assert response.body.startswith(ASGI_EMPTY_COMMENT)
    assert [(event.type, event.data) for event in broadcaster.SseParser().feed(response.body)] == [("a", "1 here")]
    assert only_shutdown(messages)


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_ends_a_response_that_merges_two_broadcasters() -> None:
    """The broadcaster whose response reads another's stream too: a signal
    still ends it before the server hears of the signal."""
    messages: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    presence: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(messages)
    server.install()
    messages.close_on_signals(timeout=60)
    async with AsgiClient(merged(messages, presence)) as client, client.stream("GET", "/") as response:
        os.kill(os.getpid(), signal.SIGTERM)
        await server.wait_calls()
        assert response.ended
    assert server.calls == [(signal.SIGTERM, 1)]


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_closes_every_armed_broadcaster_and_tells_the_server_once() -> None:
    """Two armed broadcasters: one signal closes both and reaches the server
    once, after both responses ended; a second Ctrl-C then goes straight to
    the server."""
    a: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(a)
    server.install()
    a.close_on_signals()
    b.close_on_signals(timeout=60)
    async with open_streams(a, "x") as (first,), open_streams(b, "y") as (second,):
        os.kill(os.getpid(), signal.SIGINT)
        await server.wait_calls()
        assert first.ended and second.ended
        assert b.metrics().responses_ended["shutdown"] == 1
        os.kill(os.getpid(), signal.SIGINT)
        await server.wait_calls(2)
    assert server.calls == [(signal.SIGINT, 1), (signal.SIGINT, 1)]
    assert installed(signal.SIGINT) is server


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_waits_for_a_response_still_writing_its_end() -> None:
    """The server hears of the signal only once every response has returned:
    here the client takes 0.2 s to take the last message."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()
    peer = AsgiPeer()

    async def slow_send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            await asyncio.sleep(0.2)  # a slow client, not a wait for anything
        await peer.send(message)

    app = asyncio.ensure_future(b.response(b.subscribe("k"))(peer.scope, peer.receive, slow_send))
    app.add_done_callback(lambda _: server.log.append("response returned"))
    await peer.wait_for_bodies(1)
    os.kill(os.getpid(), signal.SIGTERM)
    await server.wait_calls()
    assert server.log == ["response returned", "server"]
    assert peer.ended


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_while_the_main_thread_holds_the_registry_lock() -> None:
    """The handler runs between two bytecodes of the main thread, here while
    it holds the broadcaster's lock: it takes no lock itself, so nothing
    deadlocks, and the shutdown runs once the loop gets control back."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()
    async with open_streams(b, "k") as (response,):
        with b._lock:
            os.kill(os.getpid(), signal.SIGTERM)
            assert not server.calls
        await server.wait_calls()
        assert response.ended
    assert server.calls == [(signal.SIGTERM, 1)]


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_close_on_signals_chains_nothing_for_a_broadcaster_closed_before_its_first_response() -> None:
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    server = ServerHandlers(b)
    server.install()
    b.close_on_signals()
    b.close()
    async with AsgiClient(b.response(b.subscribe("k"))) as client:
        assert (await client.request("GET", "/")).body == ASGI_EMPTY_COMMENT
    assert installed(signal.SIGTERM) is server


@async_test()
async def test_close_writes_what_was_sent_just_before_it_with_history() -> None:
    """With history, deliveries go through the loop: close() right after a
    send on the same loop still lets the response write it."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None), history=10)
    async with AsgiClient(b.response(b.subscribe("k"))) as client, client.stream("GET", "/") as response:
        b.send("k", Event("0"))
        await response.event()
        b.send("k", Event("1"))
        await asyncio.sleep(0)  # the response is woken by "1" and queued to run
        b.send("k", Event("last words"))
        b.close()
        await response.read()
        assert [event.data for event in await response.events(2)] == ["1", "last words"]


@async_test()
async def test_close_lets_a_response_over_an_iterable_of_its_streams_write_everything() -> None:
    """An async iterable over the broadcaster's own stream is read ahead by a
    feeder: close() does not stop the response before the feeder has handed
    on everything the stream was sent."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None), buffer=256)

    async def wrapped(stream: BroadcastStream[Event]) -> AsyncIterator[Event]:
        async for event in stream:
            await asyncio.sleep(0)
            yield event

    async with AsgiClient(b.response(wrapped(b.subscribe("k")))) as client, client.stream("GET", "/") as response:
        for n in range(200):
            b.send("k", Event(str(n)))
        b.close()
        await response.read()
        assert [event.data for event in await response.events(200)] == [str(n) for n in range(200)]


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_the_signal_and_its_frame_go_on_whichever_way_they_take() -> None:
    """The server's handler gets the interrupted frame, as from Python: after
    a shutdown, and straight on when nothing is armed (and when the loop does
    not run: test_close_on_signals_passes_a_signal_on_at_once_when_its_loop_does_not_run)."""
    server, peer, app, _ = await stuck_response(timeout=0.05)
    chained = signal.getsignal(signal.SIGTERM)
    assert callable(chained) and chained is not server
    peer.send_hangs = True
    os.kill(os.getpid(), signal.SIGTERM)  # a shutdown, which gives up waiting
    await server.wait_calls()
    signal.signal(signal.SIGTERM, chained)  # as if close() could not give it back
    os.kill(os.getpid(), signal.SIGTERM)  # nothing armed: straight on
    await server.wait_calls(2)
    assert len(server.frames) == 2 and all(frame is not None for frame in server.frames)
    app.cancel()
    await asyncio.wait((app,))


def test_close_on_signals_and_shutdown_trigger_wait_1_s_by_default() -> None:
    """The documented default bound of the wait."""
    for method in (Broadcaster.close_on_signals, Broadcaster.shutdown_trigger):
        assert inspect.signature(method).parameters["timeout"].default == 1.0


@pytest.mark.usefixtures("saved_signals")
@async_test()
async def test_shutdown_trigger_gives_up_waiting_after_its_timeout() -> None:
    """A response that cannot finish (its client takes nothing) holds the
    trigger back no longer than ``timeout``."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None, send_timeout=None))
    trigger = asyncio.ensure_future(b.shutdown_trigger(timeout=0.05))
    peer = AsgiPeer()
    app = asyncio.ensure_future(b.response(b.subscribe("k"))(peer.scope, peer.receive, peer.send))
    await peer.wait_for_bodies(1)
    peer.send_hangs = True
    os.kill(os.getpid(), signal.SIGTERM)
    await trigger
    assert not app.done()
    app.cancel()
    await asyncio.wait((app,))


@pytest.mark.parametrize("timeout", [0, -1, float("inf")])
@async_test()
async def test_close_on_signals_and_shutdown_trigger_refuse_a_bad_timeout(timeout: float) -> None:
    """The wait's bound is a positive, finite number of seconds."""
    b: Broadcaster[str, Event] = Broadcaster()
    with pytest.raises(ValueError, match="timeout must be > 0"):
        b.close_on_signals(timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        await b.shutdown_trigger(timeout)
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        b.close_on_signals(timeout="1")  # type: ignore[arg-type]


# ===========================================================================
# channel() and Sender
# ===========================================================================


@async_test()
async def test_channel_closure_starts_only_when_the_app_is_called() -> None:
    """channel(fn) does not run fn until the app is called."""
    started = False

    async def closure(tx: Sender) -> None:
        nonlocal started
        started = True

    app = Broadcaster[str, Event]().channel(closure)
    for _ in range(10):
        await asyncio.sleep(0)  # give a wrongly started task every chance to run
    assert not started, "the closure ran before the app was called"
    await client_request(app)
    assert started, "the closure never ran"


@async_test()
async def test_channel_head_never_starts_the_closure() -> None:
    """HEAD on a channel() app sends headers and an empty body and never runs fn."""
    started = False

    async def closure(tx: Sender) -> None:
        nonlocal started
        started = True

    response = await client_request(Broadcaster[str, Event]().channel(closure), "HEAD")
    assert (response.status, response.raw_headers, response.body) == (200, ASGI_SSE_HEADERS, b""), response
    assert response.ended and not started, "HEAD ran the closure"


@async_test()
async def test_channel_disconnect_cancels_the_closure_promptly() -> None:
    """A disconnect while fn sleeps cancels fn at once and ends the response with no final chunk."""
    seen: list[str] = []
    event = Event("hello")

    async def closure(tx: Sender) -> None:
        await tx.send(event)
        try:
            await asyncio.get_running_loop().create_future()
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise

    peer = AsgiPeer()
    task = asgi_serve(Broadcaster[str, Event]().channel(closure), peer)
    await peer.wait_for_bodies(2)
    peer.disconnect()
    await asgi_ended(task, within=1.0)
    assert seen == ["CancelledError"], f"the closure was not cancelled: {seen}"
    assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode())], f"sent after disconnect: {peer.sent}"


@async_test()
async def test_channel_cancelled_closure_is_freed_without_the_garbage_collector() -> None:
    """A closure cancelled by a disconnect leaves no reference cycle (its task's
    exception holds the closure's frames): the task is freed by reference
    counting once the app is dropped. A Broadcaster.close() that reaches the
    source after that (scheduled from another thread) is harmless."""

    async def closure(tx: Sender) -> None:
        await tx.send(Event("x"))
        await asyncio.get_running_loop().create_future()

    b: Broadcaster[str, Event] = Broadcaster()
    peer = AsgiPeer()
    app = b.channel(closure)
    source = app._source  # type: ignore[attr-defined]
    task = asgi_serve(app, peer)
    await peer.wait_for_bodies(2)
    closure_task = weakref.ref(source._task)
    peer.disconnect()
    gc.disable()
    try:
        await asgi_ended(task)
        source.end()  # what a late close() runs
        assert source._sender.closed
        del app, task, source
        assert closure_task() is None, f"the closure's task lives on: {gc.get_referrers(closure_task())}"
    finally:
        gc.enable()


def test_channel_send_after_disconnect_raises_client_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    """Once the client is gone tx.send raises ClientDisconnected, and fn letting it out is not an error."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    outcome: list[str] = []

    async def closure(tx: Sender) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            try:
                await tx.send(Event("too late"))
            except ClientDisconnected:
                outcome.append("ClientDisconnected")
                raise
            outcome.append("sent")

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        task = asgi_serve(Broadcaster[str, Event]().channel(closure), peer)
        await peer.wait_for_bodies(1)
        peer.disconnect()
        await asgi_ended(task)
        assert peer.sent == [asgi_start(), ASGI_FIRST], f"sent after disconnect: {peer.sent}"

    scenario()
    assert outcome == ["ClientDisconnected"], f"tx.send after the client left: {outcome}"
    assert asgi_errors(caplog) == [], f"ClientDisconnected was logged as an error: {asgi_errors(caplog)}"


@async_test()
async def test_channel_back_pressures_a_fast_closure() -> None:
    """A closure cannot run more than buffer events beyond the message a blocked
    client holds (the events that were queued when it was written), and all
    arrive later, in order."""
    b: Broadcaster[str, Event] = Broadcaster(buffer=2)
    events = [Event(str(i)) for i in range(10)]
    returned = 0

    async def closure(tx: Sender) -> None:
        nonlocal returned
        for event in events:
            await tx.send(event)
            returned += 1

    peer = AsgiPeer()
    gate, blocked = asyncio.Event(), asyncio.Event()

    async def send(message: AsgiMessage) -> None:
        if len(peer.sent) >= 2 and not gate.is_set():  # start and first chunk pass
            blocked.set()
            await gate.wait()
        await peer.send(message)

    task = asgi_serve(b.channel(closure), peer, send)
    await blocked.wait()
    for _ in range(50):
        await asyncio.sleep(0)  # let the closure run as far as it can
    # The closure filled the queue (`buffer` events) before the first write;
    # that write took them all and blocks; then the queue filled again.
    assert returned == 2 * b.buffer, f"{returned} tx.send calls returned while the client was blocked"
    gate.set()
    await asgi_ended(task)
    assert peer.bodies[1] == events[0].encode() + events[1].encode(), peer.bodies
    assert split_frames(b"".join(peer.bodies[1:])) == [e.encode() for e in events], peer.bodies
    assert peer.ended


@async_test()
async def test_channel_send_rejects_a_non_event() -> None:
    """tx.send with something that is not an Event raises TypeError naming its type."""
    raised: list[BaseException] = []

    async def closure(tx: Sender) -> None:
        with pytest.raises(TypeError, match=r"^Sender\.send\(\) event must be an Event, not str$") as info:
            await tx.send("data: forged\n\n")  # type: ignore[arg-type]  # the misuse under test
        raised.append(info.value)

    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event]().channel(closure), peer)
    assert len(raised) == 1, "tx.send accepted a str"
    assert peer.sent == [asgi_start(), ASGI_FIRST, ASGI_FINAL], f"wrong messages: {peer.sent}"


def test_channel_closure_leaking_stop_async_iteration_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A StopAsyncIteration that escapes a closure (it read an exhausted
    iterator) does not pass for the end of the response: it is an ERROR, as
    PEP 479 makes it in a generator, after what the closure sent."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    async def closure(tx: Sender) -> None:
        await tx.send(Event("one"))
        await anext(aiter(AsgiRecordingSource()))  # a bug: StopAsyncIteration escapes

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await asgi_call(Broadcaster[str, Event]().channel(closure), peer)
        assert peer.bodies == [b":\n\n", b"data: one\n\n", b""], peer.bodies

    scenario()
    asgi_logged_stop(caplog, "the SSE channel closure raised StopAsyncIteration()")


@async_test()
async def test_channel_sender_closed_only_after_the_response() -> None:
    """Sender.closed is False while the response runs and True once it is over."""
    during: list[bool] = []
    senders: list[Sender] = []

    async def closure(tx: Sender) -> None:
        senders.append(tx)
        during.append(tx.closed)
        await tx.send(Event("x"))
        during.append(tx.closed)

    await client_request(Broadcaster[str, Event]().channel(closure))
    assert during == [False, False], f"Sender.closed during the response: {during}"
    assert senders[0].closed, "Sender.closed is False after the response"


def test_channel_cancellation_cancels_the_closure(caplog: pytest.LogCaptureFixture) -> None:
    """Cancelling the app's task cancels fn too, propagates CancelledError and logs no error."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    seen: list[str] = []

    waiting: list[asyncio.Event] = []

    async def closure(tx: Sender) -> None:
        waiting[0].set()
        try:
            await asyncio.get_running_loop().create_future()
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise

    @async_test()
    async def scenario() -> None:
        waiting.append(asyncio.Event())
        peer = AsgiPeer()
        task = asgi_serve(Broadcaster[str, Event]().channel(closure), peer)
        await waiting[0].wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert peer.sent == [asgi_start(), ASGI_FIRST], f"sent during cancellation: {peer.sent}"

    scenario()
    assert seen == ["CancelledError"], f"the closure was not cancelled: {seen}"
    assert asgi_errors(caplog) == [], f"cancellation was logged as an error: {asgi_errors(caplog)}"


def test_client_disconnected_is_an_exception() -> None:
    """ClientDisconnected is an Exception, so a closure's `except Exception` can handle it."""
    assert issubclass(ClientDisconnected, Exception), "ClientDisconnected is not an Exception"


@async_test()
async def test_sender_event_sent_after_its_reader_was_cancelled_stays_queued() -> None:
    """An event sent while the response's wake-up future is cancelled (the
    response itself was cancelled while it waited) is kept for the next take:
    that future is only a wake-up."""
    sender = Sender(2)
    waiter = asyncio.get_running_loop().create_future()
    sender._reader = waiter
    waiter.cancel()
    await sender.send(Event("a"))
    assert sender._reader is None and sender._take(10) == [Event("a")]


@async_test()
async def test_sender_cancelled_putter_is_skipped_when_room_frees() -> None:
    """A closure cancelled while it waits for room does not take the room: the
    next read wakes the others, and the queue holds exactly what was accepted."""
    sender = Sender(1)
    await sender.send(Event("1"))
    blocked = asyncio.ensure_future(sender.send(Event("2")))
    waiting = asyncio.ensure_future(sender.send(Event("3")))
    await asyncio.sleep(0)
    blocked.cancel()  # its room future is cancelled, still listed
    assert sender._take(1) == [Event("1")]  # wakes the putters, skipping the cancelled one
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await waiting
    assert sender._take(1) == [Event("3")]
    assert not sender._items


def test_close_ends_running_channel_responses_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    """close() cancels every running channel() closure; what it sent is written,
    then the final chunk; nothing is logged as an error, and a send after the
    cancellation raises ClientDisconnected inside the closure."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    seen: list[str] = []

    @async_test()
    async def scenario() -> None:
        b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))

        async def closure(tx: Sender) -> None:
            await tx.send(Event("before close"))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                try:
                    await tx.send(Event("after close"))
                except ClientDisconnected:
                    seen.append("ClientDisconnected")
                raise

        peer = AsgiPeer()
        task = asyncio.ensure_future(b.channel(closure)(peer.scope, peer.receive, peer.send))
        await peer.wait_for_bodies(2)
        assert len(b._sources) == 1
        b.close()
        await asyncio.wait_for(task, 2)
        assert peer.bodies == [b":\n\n", b"data: before close\n\n", b""] and peer.ended
        assert b._sources == set()

    scenario()
    assert seen == ["cancelled", "ClientDisconnected"]
    assert asgi_errors(caplog) == [], [r.getMessage() for r in asgi_errors(caplog)]


def test_close_ends_a_closure_that_returns_on_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    """A closure that swallows close()'s cancellation and returns still ends
    the response cleanly, with nothing logged as an error."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    @async_test()
    async def scenario() -> None:
        b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
        started = asyncio.Event()

        async def closure(tx: Sender) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return

        peer = AsgiPeer()
        task = asyncio.ensure_future(b.channel(closure)(peer.scope, peer.receive, peer.send))
        await started.wait()
        b.close()
        await asyncio.wait_for(task, 2)
        assert peer.bodies == [b":\n\n", b""]

    scenario()
    assert asgi_errors(caplog) == []


@async_test()
async def test_channel_response_after_close_ends_without_starting_the_closure() -> None:
    """After close(), a channel() response writes its headers and ends cleanly;
    the closure never runs."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    b.close()
    calls: list[Sender] = []

    async def closure(tx: Sender) -> None:
        calls.append(tx)

    peer = AsgiPeer()
    await b.channel(closure)(peer.scope, peer.receive, peer.send)
    assert calls == [] and peer.bodies == [b":\n\n", b""] and b._sources == set()


def test_close_from_another_thread_ends_channel_responses_on_their_loop() -> None:
    """close() called from a plain thread ends a channel() response through its loop."""
    b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
    started = threading.Event()
    bodies: list[bytes] = []

    async def closure(tx: Sender) -> None:
        await tx.send(Event("x"))
        started.set()
        await asyncio.Event().wait()

    async def serve() -> None:
        bodies.append((await client_request(b.channel(closure))).body)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert started.wait(5)
    b.close()
    thread.join(5)
    assert bodies == [b":\n\ndata: x\n\n"], "the response did not end with its event written"


def test_close_skips_channel_responses_of_a_closed_loop() -> None:
    """A channel() source left registered on a loop that was closed without
    cleaning up is skipped by close(), without error."""
    b: Broadcaster[str, Event] = Broadcaster()

    async def closure(tx: Sender) -> None:
        pass

    source = _FedSource(closure, 1, "SSE channel closure", owner=b)
    loop = asyncio.new_event_loop()
    source.loop = loop
    assert b._register_source(source)
    loop.close()
    b.close()
    assert b._sources == set()


@async_test()
async def test_sender_send_after_close_raises_client_disconnected_with_its_message() -> None:
    """Sender.send() on a finished response raises ClientDisconnected saying why."""
    sender = Sender(1)
    sender._close()
    with pytest.raises(ClientDisconnected) as info:
        await sender.send(Event("x"))
    assert str(info.value) == "the client is gone or the response is over", f"wrong message: {info.value}"


@async_test()
async def test_channel_response_that_ended_is_forgotten_by_its_broadcaster() -> None:
    """A channel() response that ended (closure returned, or client gone) leaves no source registered."""
    b = Broadcaster[str, Event]()

    async def returns(tx: Sender) -> None:
        await tx.send(Event("one"))

    response = await client_request(b.channel(returns))
    assert response.ended, f"the response did not end: {response}"
    assert not b._sources, f"a finished response is still registered: {b._sources}"

    started = asyncio.Event()

    async def waits(tx: Sender) -> None:
        started.set()
        await asyncio.Event().wait()

    async with AsgiClient(b.channel(waits)) as client, client.stream("GET", "/events"):
        await started.wait()
        assert b._sources, "the streaming response is not registered"
    assert not b._sources, f"a disconnected response is still registered: {b._sources}"


def test_channel_closure_ended_by_a_foreign_cancellation_is_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closure that ends by a cancellation it did not get from the response is an
    ERROR: a RuntimeError naming the CancelledError, which is its cause."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    event = Event("before")

    async def closure(tx: Sender) -> None:
        await tx.send(event)
        cancelled = asyncio.get_running_loop().create_future()
        cancelled.cancel()
        await cancelled

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(Broadcaster[str, Event]().channel(closure), peer))
        assert peer.sent == [asgi_start(), ASGI_FIRST, asgi_body(event.encode()), ASGI_FINAL], (
            f"wrong messages: {peer.sent}"
        )

    scenario()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["SSE event source raised; ending the response"], (
        f"wrong ERROR records: {[r.getMessage() for r in errors]}"
    )
    assert errors[0].exc_info is not None, "no traceback logged"
    error = errors[0].exc_info[1]
    assert isinstance(error, RuntimeError), f"wrong error: {error!r}"
    assert str(error) == "the SSE channel closure raised CancelledError()", f"wrong message: {error}"
    assert isinstance(error.__cause__, asyncio.CancelledError), f"wrong cause: {error.__cause__!r}"


def test_channel_closure_raising_a_cancellation_while_handling_another_is_reported_with_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closure that raises CancelledError("outer") while it handles another
    cancellation is reported with its own: the RuntimeError names
    CancelledError('outer'), which is its cause, not the one it handled."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    async def closure(tx: Sender) -> None:
        inner = asyncio.get_running_loop().create_future()
        inner.cancel("inner")
        try:
            await inner
        except asyncio.CancelledError:
            raise asyncio.CancelledError("outer") from None

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(Broadcaster[str, Event]().channel(closure), peer))
        assert peer.sent == [asgi_start(), ASGI_FIRST, ASGI_FINAL], f"wrong messages: {peer.sent}"

    scenario()
    [record] = asgi_records(caplog, logging.ERROR)
    assert record.exc_info is not None, "no traceback logged"
    error = record.exc_info[1]
    assert str(error) == "the SSE channel closure raised CancelledError('outer')", f"wrong message: {error}"
    assert error is not None and isinstance(error.__cause__, asyncio.CancelledError), f"wrong cause: {error!r}"
    assert error.__cause__.args == ("outer",), f"wrong cause: {error.__cause__!r}"


def test_channel_closure_raising_a_bare_cancellation_while_handling_another_is_reported_with_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closure that raises a bare CancelledError() while it handles another
    cancellation is reported with that bare one, on every Python (not with
    the one it handled, which is only its context)."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    async def closure(tx: Sender) -> None:
        inner = asyncio.get_running_loop().create_future()
        inner.cancel("inner")
        try:
            await inner
        except asyncio.CancelledError:
            raise asyncio.CancelledError from None

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(Broadcaster[str, Event]().channel(closure), peer))

    scenario()
    [record] = asgi_records(caplog, logging.ERROR)
    assert record.exc_info is not None, "no traceback logged"
    assert str(record.exc_info[1]) == "the SSE channel closure raised CancelledError()", str(record.exc_info[1])


@async_test()
async def test_channel_closure_is_ended_by_close_before_close_returns() -> None:
    """Broadcaster.close() called on the response's loop closes its Sender at once, not a tick later."""
    b = Broadcaster[str, Event]()
    senders: list[Sender] = []
    started = asyncio.Event()

    async def closure(tx: Sender) -> None:
        senders.append(tx)
        started.set()
        await asyncio.Event().wait()

    async with AsgiClient(b.channel(closure)) as client, client.stream("GET", "/events") as response:
        await started.wait()
        b.close()
        assert senders[0].closed, "close() left the running channel() response open until the next tick"
        await response.read()
    assert response.ended, f"the response did not end: {response}"


@async_test()
async def test_channel_source_cancelled_before_its_closure_started_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A channel() source closed before its closure's task ever ran ends silently (no error to report)."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")
    ran: list[str] = []

    async def closure(tx: Sender) -> None:
        ran.append("started")

    source = _FedSource(closure, 1, "SSE channel closure", owner=Broadcaster[str, Event]())
    assert source._take(1) == ([], None, None)  # the first take starts the closure's task, which has not run yet
    await source.aclose()
    assert ran == [], "the closure ran; the scenario needs it cancelled before its first step"
    records = [r.getMessage() for r in caplog.records if r.name == "broadcaster"]
    assert records == [], f"unexpected log records: {records}"


def test_channel_closure_error_after_a_disconnect_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A closure that raises after its client left is logged once, as an ERROR of
    closing the response's source, with the closure's exception."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    async def closure(tx: Sender) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    @async_test()
    async def scenario() -> None:
        peer = AsgiPeer()
        task = asgi_serve(Broadcaster[str, Event]().channel(closure), peer)
        await peer.wait_for_bodies(1)
        peer.disconnect()
        await asgi_ended(task)
        assert peer.sent == [asgi_start(), ASGI_FIRST], f"sent after disconnect: {peer.sent}"

    scenario()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["closing the SSE event source raised"], (
        f"wrong ERROR records: {[r.getMessage() for r in errors]}"
    )
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError, "no traceback of the closure's error"


# ===========================================================================
# replay() and last_event_id()
# ===========================================================================

# ---------------------------------------------------------------------------
# replay(items, live)
# ---------------------------------------------------------------------------


class _RecordingLive:
    """An async iterator over fixed items that counts its aclose() calls."""

    def __init__(self, items: Iterable[str]) -> None:
        self._items = iter(items)
        self.aclosed = 0

    def __aiter__(self) -> _RecordingLive:
        return self

    async def __anext__(self) -> str:
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.aclosed += 1


async def _drain(iterator: AsyncIterator[str]) -> list[str]:
    return [item async for item in iterator]


@async_test()
async def test_replay_yields_items_then_live() -> None:
    """A plain list is yielded first, then everything from live."""
    assert await _drain(replay(["a", "b"], _RecordingLive(["c", "d"]))) == ["a", "b", "c", "d"]


@async_test()
async def test_replay_accepts_async_items() -> None:
    """Items may be an async iterable (an async generator)."""

    async def missed() -> AsyncIterator[str]:
        yield "a"
        yield "b"

    assert await _drain(replay(missed(), _RecordingLive(["c"]))) == ["a", "b", "c"]


@async_test()
async def test_replay_without_live_ends_after_items() -> None:
    """With live=None iteration ends after the items."""
    assert await _drain(replay(iter(["a", "b"]))) == ["a", "b"]


@async_test()
async def test_replay_aclose_before_iteration_closes_live() -> None:
    """aclose() closes live even when iteration never started."""
    live = _RecordingLive(["x"])
    await replay(["a"], live).aclose()
    assert live.aclosed == 1, f"live was aclosed {live.aclosed} times"


@async_test()
async def test_replay_aclose_is_idempotent() -> None:
    """A second aclose() closes nothing again."""
    live = _RecordingLive(["x"])
    stream = replay(["a"], live)
    await stream.aclose()
    await stream.aclose()
    assert live.aclosed == 1, f"live was aclosed {live.aclosed} times"


@async_test()
async def test_replay_iterated_reads_in_the_callers_task_and_leaves_nothing_running() -> None:
    """Iterated directly, replay() reads its async items in the caller's task
    (as an async generator would): leaving the loop early leaves no task
    behind, and aclose() runs the items' clean-up."""
    cleaned: list[str] = []
    before = asyncio.all_tasks()

    async def missed() -> AsyncIterator[str]:
        try:
            for text in ("a", "b", "c"):
                yield text
        finally:
            cleaned.append("items")

    resumed = replay(missed(), _RecordingLive(["d"]))
    async for text in resumed:
        assert text == "a"
        break
    assert asyncio.all_tasks() == before, asyncio.all_tasks() - before
    await resumed.aclose()
    assert cleaned == ["items"]


@async_test()
async def test_replay_aclose_closes_a_live_part_that_was_exhausted() -> None:
    """aclose() closes every part, the exhausted ones too (a custom live
    iterable may hold something until it is closed), in a response as when
    iterated."""
    for in_response in (False, True):
        live = _RecordingLive([])
        resumed = replay(["a"], live)
        if in_response:
            peer = AsgiPeer()
            await asgi_call(Broadcaster[str, str]().response(resumed, Event), peer)
            assert peer.bodies == [b":\n\n", b"data: a\n\n", b""], peer.bodies
        else:
            assert [text async for text in resumed] == ["a"]
            await resumed.aclose()
        assert live.aclosed == 1, f"live was not closed once (in a response: {in_response})"


@async_test()
async def test_replay_aclose_unsubscribes_a_broadcast_stream() -> None:
    """aclose() before iteration ends a real subscription: the channel is gone."""
    b: Broadcaster[str, str] = Broadcaster()
    resumed = replay(["old"], b.subscribe("room"))
    assert b.subscriber_count("room") == 1
    await resumed.aclose()
    assert (b.subscriber_count("room"), "room" in b) == (0, False), "the subscription outlived aclose()"


@async_test()
async def test_replay_delivers_what_was_sent_after_subscribe() -> None:
    """Subscribe, load, replay: items sent between subscribing and replaying follow the replayed ones."""
    b: Broadcaster[str, str] = Broadcaster()
    stream = b.subscribe("room")
    b.send("room", "new1")
    async with replay(["old1", "old2"], stream) as resumed:
        b.send("room", "new2")
        got = [await anext(resumed) for _ in range(4)]
    assert got == ["old1", "old2", "new1", "new2"]


@async_test()
async def test_replay_aclose_runs_finally_of_unfinished_async_items() -> None:
    """aclose() closes a started async-generator ``items``: its finally runs."""
    log: list[str] = []

    async def missed() -> AsyncIterator[str]:
        try:
            yield "a"
            yield "b"
        finally:
            log.append("finally")

    live = _RecordingLive(["c"])
    resumed = replay(missed(), live)
    assert await anext(resumed) == "a"
    await resumed.aclose()
    assert (log, live.aclosed) == (["finally"], 1), f"log={log} live.aclosed={live.aclosed}"


@async_test()
async def test_replay_aclose_closes_unfinished_sync_generator_items() -> None:
    """aclose() closes a started plain generator ``items``: its finally runs."""
    log: list[str] = []

    def missed() -> Iterator[str]:
        try:
            yield "a"
            yield "b"
        finally:
            log.append("finally")

    resumed = replay(missed())
    assert await anext(resumed) == "a"
    await resumed.aclose()
    assert log == ["finally"], "the generator's finally did not run"


class _SizedIterator:
    """A plain iterator that reports how many items remain (``len``) and records close()."""

    def __init__(self, items: list[str]) -> None:
        self._items = items
        self.closed = False

    def __iter__(self) -> _SizedIterator:
        return self

    def __next__(self) -> str:
        if not self._items:
            raise StopIteration
        return self._items.pop(0)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self.closed = True


@async_test()
async def test_replay_aclose_closes_items_that_test_false() -> None:
    """aclose() closes ``items`` even when it is falsy (a sized iterator with nothing left to yield)."""
    items = _SizedIterator(["a"])
    resumed = replay(items, _RecordingLive(["b"]))
    assert await anext(resumed) == "a"
    await resumed.aclose()
    assert items.closed, "items was not closed because bool(items) is False"


@async_test()
async def test_replay_aclose_closes_live_when_items_close_raises() -> None:
    """If closing ``items`` raises, live is closed anyway and the error propagates."""

    async def missed() -> AsyncIterator[str]:
        try:
            yield "a"
        finally:
            raise RuntimeError("items cleanup failed")

    live = _RecordingLive(["b"])
    resumed = replay(missed(), live)
    assert await anext(resumed) == "a"
    with pytest.raises(RuntimeError, match=r"^items cleanup failed$"):
        await resumed.aclose()
    assert live.aclosed == 1, "live was not closed after items' close raised"


@async_test()
async def test_replay_stops_after_aclose() -> None:
    """After aclose() iteration stops, even with items and live left."""
    resumed = replay(["a", "b"], _RecordingLive(["c"]))
    assert await anext(resumed) == "a"
    await resumed.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(resumed)


@async_test()
async def test_replay_aclose_ends_a_read_waiting_on_live() -> None:
    """A reader blocked on an empty live stream ends (StopAsyncIteration) when the replay is closed."""
    b: Broadcaster[str, str] = Broadcaster()
    resumed = replay([], b.subscribe("room"))
    reader = asyncio.ensure_future(anext(resumed))
    await asyncio.sleep(0)
    assert not reader.done(), "the read did not wait for live"
    await resumed.aclose()
    with pytest.raises(StopAsyncIteration):
        await reader


@async_test()
async def test_replay_async_with_closes_on_exit() -> None:
    """Leaving ``async with`` closes live, also on an exception."""
    live = _RecordingLive(["b"])
    with pytest.raises(KeyError):
        async with replay(["a"], live) as resumed:
            assert await anext(resumed) == "a"
            raise KeyError("boom")
    assert live.aclosed == 1, "leaving async with did not close live"


@async_test()
async def test_replay_in_a_response_writes_live_ids_and_gathers_what_waits() -> None:
    """In a response, replay(missed, stream) is read as the stream alone is:
    the replayed items go out together, then the live events that wait go out
    together too, each with its history id."""
    b: Broadcaster[str, Event] = Broadcaster(history=8, config=SseConfig(keep_alive=None))
    stream = b.subscribe("k")
    missed = [Event("m1", id="old-1"), Event("m2", id="old-2")]
    b.send("k", Event("a"))
    b.send("k", Event("b"))
    b.remove("k")  # what was sent is delivered first, then the stream ends
    peer = AsgiPeer()
    await asgi_call(b.response(replay(missed, stream)), peer)
    epoch = stream.last_event_id.rpartition("-")[0] if stream.last_event_id else ""
    live = Event("a", id=f"{epoch}-1").encode() + Event("b", id=f"{epoch}-2").encode()
    assert peer.bodies == [b":\n\n", missed[0].encode() + missed[1].encode(), live, b""], peer.bodies


def test_replay_in_a_response_reads_async_items_then_live_and_ends_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    """In a response, replay(async items, stream) writes the items, then the
    live events, and ends cleanly once both are exhausted, logging nothing."""
    caplog.set_level(logging.DEBUG, logger="broadcaster")

    async def missed() -> AsyncIterator[Event]:
        yield Event("m1")
        yield Event("m2")

    @async_test()
    async def scenario() -> None:
        b: Broadcaster[str, Event] = Broadcaster(config=SseConfig(keep_alive=None))
        stream = b.subscribe("k")
        b.send("k", Event("live"))
        b.remove("k")
        peer = AsgiPeer()
        await asgi_ended(asgi_serve(b.response(replay(missed(), stream)), peer))
        expected = [b":\n\n", Event("m1").encode() + Event("m2").encode(), Event("live").encode(), b""]
        assert peer.bodies == expected, peer.bodies
        assert peer.ended and stream.closed

    scenario()
    records = [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == "broadcaster"]
    assert records == [], f"a clean end was logged: {records}"


@async_test()
async def test_replay_in_a_response_writes_its_plain_items_64_to_a_message() -> None:
    """In a response, replay()'s plain items go out as waiting events do: at
    most 64 in one body message."""
    items = [Event(str(n)) for n in range(65)]
    peer = AsgiPeer()
    await asgi_call(Broadcaster[str, Event](config=SseConfig(keep_alive=None)).response(replay(items)), peer)
    frames = [event.encode() for event in items]
    assert peer.bodies == [b":\n\n", b"".join(frames[:64]), frames[64], b""], [len(body) for body in peer.bodies]


@async_test()
async def test_replay_in_a_response_renders_live_items_with_their_ids() -> None:
    """With render, the live items of replay(missed, stream) are written with
    the ids of their history entries, as for the stream alone."""
    b: Broadcaster[str, int] = Broadcaster(history=8, config=SseConfig(keep_alive=None))
    stream = b.subscribe("k")
    b.send("k", 7)
    b.remove("k")
    response = await client_request(b.response(replay([6], stream), lambda n: Event(str(n))))
    assert stream.last_event_id is not None
    assert response.body == f":\n\ndata: 6\n\ndata: 7\nid: {stream.last_event_id}\n\n".encode(), response.body


@pytest.mark.parametrize("resumed", [False, True, None])
@async_test()
async def test_replay_in_a_response_writes_on_gap_as_its_live_stream_would(resumed: bool | None) -> None:
    """on_gap is written first when the live stream of replay() could not
    resume (resumed is False), and not when it resumed or was given no id."""
    b: Broadcaster[str, Event] = Broadcaster(history=8, config=SseConfig(keep_alive=None))
    keeper = b.subscribe("k")  # keeps the channel, so that its ids stay known
    b.send("k", Event("x"))
    await asyncio.sleep(0)
    last = {False: "unknown-1", True: keeper.last_event_id or f"{b._channels['k'].epoch}-0", None: None}[resumed]
    stream = b.subscribe("k", last_event_id=last)
    assert stream.resumed is resumed
    gap = Event(event="reload", data="")
    b.remove("k")
    response = await client_request(b.response(replay([Event("mine")], stream), on_gap=gap))
    assert response.body.startswith(ASGI_EMPTY_COMMENT + gap.encode()) == (resumed is False), response.body
    assert response.body.count(gap.encode()) == int(resumed is False), response.body
    keeper.close()


@async_test()
async def test_replay_without_a_contract_live_never_writes_on_gap() -> None:
    """replay() without live, or over a plain async iterable, has nothing to
    resume: on_gap is never written."""
    gap = Event(comment="gap")

    async def no_events() -> AsyncIterator[Event]:
        none: tuple[Event, ...] = ()
        for event in none:
            yield event

    for resumed in (replay([Event("a")]), replay([Event("a")], no_events())):
        assert resumed.resumed is None
        peer = AsgiPeer()
        await asgi_call(Broadcaster[str, Event]().response(resumed, on_gap=gap), peer)
        assert gap.encode() not in peer.bodies, peer.bodies


# ---------------------------------------------------------------------------
# last_event_id(scope)
# ---------------------------------------------------------------------------


def _lei_scope(header: bytes | None = None, query: bytes = b"") -> dict[str, Any]:
    headers = [(b"accept", b"text/event-stream")]
    if header is not None:
        headers.append((b"last-event-id", header))
    return {"type": "http", "method": "GET", "headers": headers, "query_string": query}


def test_last_event_id_from_header() -> None:
    """The Last-Event-ID header value is returned."""
    assert last_event_id(_lei_scope(b"42")) == "42"


def test_last_event_id_header_decoded_as_utf8() -> None:
    """The header is decoded as UTF-8, not latin-1."""
    assert last_event_id(_lei_scope("é😀".encode())) == "é😀"


def test_last_event_id_header_wins_over_query() -> None:
    """When both are present the header wins."""
    assert last_event_id(_lei_scope(b"from-header", b"last_event_id=from-query")) == "from-header"


def test_last_event_id_from_query_when_header_absent() -> None:
    """Without the header, the ``last_event_id`` query parameter is used, percent-decoded."""
    assert last_event_id(_lei_scope(query=b"a=1&last_event_id=a%20b%C3%A9&b=2")) == "a bé"


@pytest.mark.parametrize("header", [b"", b"\xff\xfe", b"\xc3"], ids=repr)
def test_last_event_id_empty_or_undecodable_header_falls_back_to_query(header: bytes) -> None:
    """An empty or non-UTF-8 header is ignored in favour of the query parameter."""
    assert last_event_id(_lei_scope(header, b"last_event_id=q")) == "q"


@pytest.mark.parametrize("header", [b"", b"\xff"], ids=repr)
def test_last_event_id_empty_or_undecodable_header_alone_is_none(header: bytes) -> None:
    """An empty or non-UTF-8 header with no query parameter gives None."""
    assert last_event_id(_lei_scope(header)) is None


def test_last_event_id_nothing_is_none() -> None:
    """No header and no query parameter gives None."""
    assert last_event_id(_lei_scope(query=b"a=1")) is None


@pytest.mark.parametrize("query", [b"last_event_id=", b"last_event_id", b"last_event_id=&x=1"], ids=repr)
def test_last_event_id_empty_query_value_is_none(query: bytes) -> None:
    """An empty ``last_event_id`` query value gives None, not ""."""
    assert last_event_id(_lei_scope(query=query)) is None


@pytest.mark.parametrize("query", [b"last_event_id=%ff", b"last_event_id=%C3", b"last_event_id=a%80b"], ids=repr)
def test_last_event_id_query_not_utf8_is_none(query: bytes) -> None:
    """A percent-encoded query value that is not UTF-8 gives None."""
    assert last_event_id(_lei_scope(query=query)) is None


def test_last_event_id_undecodable_other_parameter_does_not_hide_it() -> None:
    """A non-UTF-8 value in another query parameter does not hide a valid ``last_event_id``."""
    assert last_event_id(_lei_scope(query=b"utm=%E9t%E9&last_event_id=5")) == "5"


def test_last_event_id_scope_without_headers_or_query() -> None:
    """A scope with neither ``headers`` nor ``query_string`` gives None."""
    assert last_event_id({"type": "http"}) is None


# ===========================================================================
# SseParser: reading an event stream as a browser does
#
# Checked against the web-platform-tests streams above and, byte for byte,
# against the reference parser of these tests (written independently of it).
# ===========================================================================


def shipped_session(
    server: Callable[[str], bytes], connections: int, cut: int | None
) -> tuple[list[SseMessage], int | None]:
    """What SseParser makes of ``connections`` connections to ``server``, as a
    browser runs them (a fresh parser per connection, carrying the last event
    id), with each body fed in two pieces cut at ``cut``, or byte by byte
    (``cut`` None)."""
    events: list[SseMessage] = []
    last_event_id, retry = "", None
    for _ in range(connections):
        parser = broadcaster.SseParser(last_event_id=last_event_id)
        body = server(last_event_id)
        pieces = [body[i : i + 1] for i in range(len(body))] if cut is None else [body[:cut], body[cut:]]
        for piece in pieces:
            for event in parser.feed(piece):
                events.append(SseMessage(event.type, event.data, event.last_event_id))
        last_event_id = parser.last_event_id
        retry = parser.retry if parser.retry is not None else retry
    return events, retry


@pytest.mark.parametrize("case", _WPT_CASES, ids=[case.name for case in _WPT_CASES])
def test_parser_gives_what_each_wpt_format_stream_asserts_however_it_is_cut(case: _WptCase) -> None:
    """Every WPT eventsource/format-* stream, cut at every byte into two
    pieces and fed byte by byte, gives the events and the retry its test
    asserts."""
    body = case.server("")
    for cut in [None, *range(len(body) + 1)]:
        assert shipped_session(case.server, case.connections, cut) == (case.events, case.retry), (case.name, cut)


_STREAM_BYTES = st.lists(
    st.sampled_from(
        [
            b"data: x",
            b"data:",
            b"data",
            b"event: e",
            b"event:",
            b"id: 7",
            b"id: a\0b",
            b"id",
            b"retry: 250",
            b"retry: x",
            b"retry:",
            b": note",
            b":",
            b"\r\n",
            b"\r",
            b"\n",
            b"\xef\xbb\xbf",
            b"\xff",
            b"\xc3",
            b"\xa9",
            b"field: v",
            b"data:  two",
            b" data: x",
            b"\x00",
        ]
    ),
    max_size=40,
).map(b"".join)


@given(st.one_of(_STREAM_BYTES, st.binary(max_size=200)), st.lists(st.integers(0, 200), max_size=6))
@_budget(400)
def test_property_parser_reads_any_bytes_as_the_reference_parser_does(stream: bytes, cuts: list[int]) -> None:
    """Any bytes, cut anywhere: the same events, last event id and retry as
    the reference parser of these tests (which reads the whole stream at
    once)."""
    expected = parse_event_stream(stream)
    parser = broadcaster.SseParser()
    got: list[SseMessage] = []
    bounds = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    for start, end in pairwise(bounds):
        got += [SseMessage(e.type, e.data, e.last_event_id) for e in parser.feed(stream[start:end])]
    assert got == expected.events
    assert (parser.last_event_id, parser.retry) == (expected.last_event_id, expected.retry)


@given(_VALID_EVENT_KWARGS)
@_budget(300)
def test_property_parser_reads_back_any_event(kwargs: dict[str, Any]) -> None:
    """An Event's frame, parsed: its type, data and id come back (an event
    without data dispatches nothing, as in a browser)."""
    event = Event(**kwargs)
    parser = broadcaster.SseParser(last_event_id="before")
    got = parser.feed(event.encode())
    if event.data is None:
        assert got == []
    else:
        expected_id = "before" if event.id is None else event.id
        assert got == [
            broadcaster.SseEvent(
                event.event or "message", event.data.replace("\r\n", "\n").replace("\r", "\n"), expected_id
            )
        ]
    if event.retry is not None:
        assert parser.retry == event.retry


def test_parser_keeps_a_crlf_whole_across_empty_and_partial_chunks() -> None:
    """A CR that ends a chunk and the LF of the next make one line end, also
    with empty chunks, or a character cut in two, in between: the same events
    as the whole stream read at once by the reference parser."""
    for middle in ([b""], [b"", b""], [b"\xc3", b"\xa9"]):
        chunks = [b"data: a\r", *middle, b"\ndata: b\r\n\r\n"]
        parser = broadcaster.SseParser()
        got = [event for chunk in chunks for event in parser.feed(chunk)]
        expected = parse_event_stream(b"".join(chunks)).events
        assert [SseMessage(e.type, e.data, e.last_event_id) for e in got] == expected, middle
    assert expected == [SseMessage("message", "a\nb", "")]


def test_parser_reports_comments_when_asked_and_checks_its_input() -> None:
    """With comments=True the comment lines are kept, in order (one leading
    space removed); bytes only; the last event id it starts from is carried
    into the first event; a retry too long for int() is ignored."""
    parser = broadcaster.SseParser(comments=True, last_event_id="5")
    stream = b": hello\n:\ndata: x\n\n:  two spaces\n:tight\nretry: " + b"9" * 5000 + b"\nretry: 10\n"
    assert parser.feed(stream) == [broadcaster.SseEvent("message", "x", "5")]
    assert parser.comments == ["hello", "", " two spaces", "tight"]
    assert parser.retry == 10
    # The longest retry int() takes (4,300 digits) is read; one digit more is ignored.
    assert parser.feed(b"retry: " + b"1" * 4300 + b"\n") == [] and parser.retry == int("1" * 4300)
    parser.feed(b"retry: " + b"2" * 4301 + b"\n")
    assert parser.retry == int("1" * 4300)
    quiet = broadcaster.SseParser()
    assert quiet.feed(b": hidden\n") == [] and quiet.comments == []
    with pytest.raises(TypeError, match="chunk must be bytes, not str"):
        parser.feed("data: x\n\n")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="last_event_id must be a str, not int"):
        broadcaster.SseParser(last_event_id=5)  # type: ignore[arg-type]


# ===========================================================================
# AsgiClient: an ASGI app driven in process
#
# Apps written here send exactly the messages each test needs; the module's
# own apps show the client in its use.
# ===========================================================================


def client_app(*messages: AsgiMessage, then: str = "return") -> AsgiApp:
    """An app that sends ``messages``, then (``then``) returns, waits for
    the disconnect and returns, or hangs until cancelled."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
        if then == "disconnect":
            while (await receive())["type"] != "http.disconnect":
                pass
        elif then == "hang":
            await asyncio.Event().wait()

    return app


def client_sse(*bodies: bytes, more: bool = True) -> list[AsgiMessage]:
    """The messages of an event-stream response with ``bodies``, ended unless ``more``."""
    messages = [asgi_start(), *(asgi_body(body) for body in bodies)]
    return messages if more else [*messages, ASGI_FINAL]


class ClientRecorder:
    """An app that records each scope and each message it receives, and
    answers 200 with the request body."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.received: list[AsgiMessage] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        request = await receive()
        self.received.append(request)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send(asgi_body(request["body"], more_body=False))
        self.received.append(await receive())


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


@async_test()
async def test_client_request_scope_is_a_servers() -> None:
    """The scope is what uvicorn would give: HTTP/1.1, spec 2.3, the path
    unquoted and raw, the query of the path and the pairs, header names in
    lower case, a host header, the body with its content-length; after the
    whole response, receive() says http.disconnect."""
    app = ClientRecorder()
    async with AsgiClient(app) as client:
        response = await client.request(
            "POST", "/a%20b/é?x=1", query=[("room", "a&b"), ("room", "c")], headers={"X-Token": "t"}, body=b"hi"
        )
    assert (response.status, response.body, response.text) == (200, b"hi", "hi")
    [scope] = app.scopes
    assert scope["type"] == "http" and scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "POST", "http")
    assert (scope["path"], scope["raw_path"]) == ("/a b/é", b"/a%20b/%C3%A9")
    assert scope["query_string"] == b"x=1&room=a%26b&room=c"
    assert scope["headers"] == [(b"host", b"testserver"), (b"x-token", b"t"), (b"content-length", b"2")]
    assert (scope["client"], scope["server"], scope["root_path"], scope["state"]) == (
        ("127.0.0.1", 50000),
        ("testserver", 80),
        "",
        {},
    )
    assert app.received == [{"type": "http.request", "body": b"hi", "more_body": False}, ASGI_DISCONNECT]


@async_test()
async def test_client_json_body_and_a_host_of_ones_own() -> None:
    """``json`` sends compact UTF-8 JSON with its content-type; a host
    header given is kept instead of the default one."""
    app = ClientRecorder()
    async with AsgiClient(app) as client:
        response = await client.request("PUT", "/", json={"text": "é"}, headers=[("Host", "example.org")])
        several = await client.request("POST", "/", query={"a/b": "c/d&e f"}, json={"a": [1, 2], "b": None})
    assert several.body == b'{"a":[1,2],"b":null}'
    assert app.scopes[1]["query_string"] == b"a%2Fb=c%2Fd%26e%20f"
    assert response.body == '{"text":"é"}'.encode()
    assert app.scopes[0]["headers"] == [
        (b"host", b"example.org"),
        (b"content-type", b"application/json"),
        (b"content-length", b"13"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "GET POST"}, ValueError, "method must be an HTTP token"),
        ({"method": 1}, TypeError, "method must be a str, not int"),
        ({"path": "events"}, ValueError, "path must start with '/'"),
        ({"query": "a=1"}, TypeError, "query must be a mapping or"),
        ({"query": [("a", "1", "2")]}, TypeError, "each of query must be a"),
        ({"query": {"a": 1}}, TypeError, "query value must be a str, not int"),
        ({"headers": {"x": "a\r\nb"}}, ValueError, "must not contain CR, LF or NUL"),
        ({"headers": {"Content-Length": "3"}}, ValueError, "is owned by the client"),
        ({"headers": 5}, TypeError, "headers must be a mapping or"),
        ({"body": "text"}, TypeError, "body must be bytes, not str"),
        ({"body": b"x", "json": 1}, ValueError, "give a body or json, not both"),
        ({"json": float("nan")}, ValueError, "Out of range float values"),
        ({"json": "\ud800"}, ValueError, "json contains a lone surrogate"),
        ({"path": b"/"}, TypeError, "path must be a str, not bytes"),
        ({"query": [(1, "a")]}, TypeError, "query name must be a str, not int"),
        ({"headers": [(1, "a")]}, TypeError, "header name must be a str, not int"),
    ],
)
def test_client_bad_request_is_refused_before_the_app_runs(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Each bad argument is a TypeError or ValueError at the call, naming
    it; the app is never called."""
    app = ClientRecorder()
    client = AsgiClient(app)
    arguments: dict[str, Any] = {"method": "GET", "path": "/", **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        client.stream(**arguments)
    assert app.scopes == []


def test_client_bad_construction_is_refused() -> None:
    with pytest.raises(TypeError, match="app must be callable, not str"):
        AsgiClient("app")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lifespan must be a bool, not int"):
        AsgiClient(ClientRecorder(), lifespan=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be > 0 and finite"):
        AsgiClient(ClientRecorder(), timeout=0)


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


@async_test()
async def test_client_response_headers_body_and_json() -> None:
    """Header names come in lower case, repeated ones joined (and kept as
    sent in raw_headers); an ordinary body reads whole, as JSON too."""
    start = {
        "type": "http.response.start",
        "status": 401,
        "headers": [(b"Content-Type", b"application/json"), (b"vary", b"a"), (b"vary", b"b")],
    }
    app = client_app(start, asgi_body(b'{"detail":'), asgi_body(b'"no"}', more_body=False))
    async with AsgiClient(app) as client:
        response = await client.request("GET", "/")
    assert response.status == 401
    assert response.headers == {"content-type": "application/json", "vary": "a, b"}
    assert response.raw_headers == [(b"content-type", b"application/json"), (b"vary", b"a"), (b"vary", b"b")]
    assert response.json() == {"detail": "no"}
    assert repr(response) == "<AsgiResponse GET /: 401, ended, 15 bytes>"


@async_test()
async def test_client_events_one_at_a_time_n_at_a_time_and_to_the_end() -> None:
    """Events are parsed across body messages cut anywhere: event(),
    events(n), then ``async for`` to the end of the body; retry, the last
    event id and comments are the parser's."""
    bodies = (b": hi\nretry: 7\n\ndata: 1\n", b"\nid: x\ndata: 2\n\nevent: e\nda", b"ta: 3\n\ndata: 4\n\n")
    app = client_app(*client_sse(*bodies, more=False))
    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        assert await response.event() == SseEvent("message", "1", "")
        assert await response.events(2) == [SseEvent("message", "2", "x"), SseEvent("e", "3", "x")]
        assert [event async for event in response] == [SseEvent("message", "4", "x")]
        assert [event async for event in response] == []
        assert (response.parser.retry, response.parser.last_event_id, response.parser.comments) == (7, "x", ["hi"])
        assert response.ended and repr(response).endswith(f"ended, {len(b''.join(bodies))} bytes>")


@async_test()
async def test_client_reads_events_of_an_open_stream_one_by_one() -> None:
    """``async for`` hands out each event as it comes, while the body is
    still open; a body message without ``body`` adds nothing."""
    more = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        await send(asgi_body(b"data: 1\n\n"))
        await more.wait()
        await send({"type": "http.response.body", "more_body": True})
        await send(asgi_body(b"data: 2\n\n", more_body=False))

    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        async for event in response:
            assert event == SseEvent("message", "1", "")
            assert repr(response) == "<AsgiResponse GET /: 200, open, 9 bytes>"
            break
        more.set()
        assert [event.data async for event in response] == ["2"]
        assert response.body == b"data: 1\n\ndata: 2\n\n"


@async_test()
async def test_client_events_that_never_come_are_an_eof_error() -> None:
    """A body that ends with fewer events than asked for is an EOFError,
    and the events stay for the next read."""
    app = client_app(*client_sse(b"data: 1\n\n", more=False))
    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        with pytest.raises(EOFError, match=r"GET /: the body ended with 1 of 2 events unread"):
            await response.events(2)
        assert await response.event() == SseEvent("message", "1", "")
        with pytest.raises(EOFError, match="with 0 of 1 events unread"):
            await response.event()
        with pytest.raises(ValueError, match="n must be >= 1, got 0"):
            await response.events(0)


@async_test()
async def test_client_reads_a_gzip_event_stream_message_by_message() -> None:
    """A gzip body (flushed at each message, as a compressing middleware
    does) is decompressed as it comes: each event is read before the app
    sends the next."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    read = asyncio.Event()
    sent: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start([*ASGI_SSE_HEADERS, (b"content-encoding", b"gzip")]))
        for n in range(3):
            read.clear()
            sent.append(f"data: {n}\n\n".encode())
            await send(asgi_body(compressor.compress(sent[-1]) + compressor.flush(zlib.Z_SYNC_FLUSH)))
            await read.wait()
        await send(asgi_body(compressor.flush(), more_body=False))

    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        for n in range(3):
            assert await response.event() == SseEvent("message", str(n), "")
            assert len(sent) == n + 1
            read.set()
        assert [event async for event in response] == []
    assert response.body == b"".join(sent)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"content-type", b"application/json")], "its content-type is 'application/json'"),
        ([], "its content-type is ''"),
        ([(b"content-type", b"text/event-stream"), (b"content-encoding", b"br")], "its content-encoding is 'br'"),
    ],
)
@async_test()
async def test_client_events_of_what_is_not_an_event_stream_are_a_value_error(
    headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    """Only a text/event-stream body in an encoding the client reads has events."""
    app = client_app(asgi_start(headers), asgi_body(b"data: 1\n\n", more_body=False))
    async with AsgiClient(app) as client:
        response = await client.request("GET", "/")
        with pytest.raises(ValueError, match=re.escape(f"GET /: no events to read: {reason}")):
            await response.event()
    assert response.body == b"data: 1\n\n"


@async_test()
async def test_client_response_is_used_once_and_inside_its_block() -> None:
    async with AsgiClient(client_app(*client_sse(more=False))) as client:
        response = client.stream("GET", "/")
        with pytest.raises(RuntimeError, match=r"use the response as `async with client.stream"):
            await response.event()
        async with response:
            pass
        with pytest.raises(RuntimeError, match="GET /: a response is used once"):
            await response.__aenter__()


# ---------------------------------------------------------------------------
# Leaving, and the module's own apps
# ---------------------------------------------------------------------------


@async_test()
async def test_client_leaving_a_stream_ends_its_subscription() -> None:
    """The module's response: leaving the block disconnects and waits for
    the app, so the subscription is gone when the block ends."""
    rooms: Broadcaster[str, Event] = Broadcaster()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await rooms.response(rooms.subscribe(scope["path"]))(scope, receive, send)

    async with AsgiClient(app) as client:
        async with client.stream("GET", "/a") as response:
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert rooms.subscriber_count("/a") == 1
            rooms.send("/a", Event("hi", event="greeting"))
            assert await response.event() == SseEvent("greeting", "hi", "")
        assert rooms.subscriber_count("/a") == 0
        assert not response.ended  # the client left: no end of body was sent


@async_test()
async def test_client_resumes_with_last_event_id() -> None:
    """A Last-Event-ID header given by the test reaches the app: the
    module's history answers with what came after it."""
    rooms: Broadcaster[str, Event] = Broadcaster(history=10)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await rooms.response(rooms.subscribe("a", last_event_id(scope)))(scope, receive, send)

    async with AsgiClient(app) as client:
        async with client.stream("GET", "/") as response:
            for text in ("1", "2", "3"):
                rooms.send("a", Event(text))
            first = await response.event()
        async with client.stream("GET", "/", headers={"Last-Event-ID": first.last_event_id}) as response:
            assert [event.data for event in await response.events(2)] == ["2", "3"]


@async_test()
async def test_client_what_the_app_sends_after_the_disconnect_is_dropped() -> None:
    """As under uvicorn: once the client left, sends are dropped, not errors."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"
        await send(asgi_body(b"data: late\n\n"))
        await send(ASGI_FINAL)

    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        pass
    assert (response.body, response.ended) == (b"", False)


# ---------------------------------------------------------------------------
# Every wait is bounded
# ---------------------------------------------------------------------------


@async_test()
async def test_client_app_that_never_starts_its_response_is_a_timeout() -> None:
    """No response start within the timeout: TimeoutError naming it; the app
    is then told the client left, and returns."""
    async with AsgiClient(client_app(then="disconnect"), timeout=0.05) as client:
        with pytest.raises(TimeoutError, match=r"^GET /events: no response start within 0.05 s$"):
            async with client.stream("GET", "/events"):
                pass  # pragma: no cover (never entered)


@async_test()
async def test_client_waits_for_events_and_body_are_timeouts() -> None:
    app = client_app(*client_sse(b": quiet\n\n"), then="disconnect")
    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        with pytest.raises(TimeoutError, match=r"^GET /: no event within 0.01 s$"):
            await response.event(timeout=0.01)
        with pytest.raises(TimeoutError, match=r"^GET /: no 3 events within 0.01 s$"):
            await response.events(3, timeout=0.01)
        with pytest.raises(TimeoutError, match=r"no end of the body \(an endless stream\?\) within 0.01 s"):
            await response.read(timeout=0.01)
        with pytest.raises(ValueError, match="timeout must be > 0 and finite"):
            await response.read(timeout=-1)


@async_test()
async def test_client_app_that_never_returns_after_the_disconnect_is_cancelled_and_reported() -> None:
    """Leaving, the app has the timeout to return; past it, it is cancelled
    and the block raises TimeoutError saying so."""
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async with AsgiClient(app, timeout=0.05) as client:
        message = r"^GET /: the app did not return within 0.05 s of the client's disconnect; cancelled$"
        with pytest.raises(TimeoutError, match=message):
            async with client.stream("GET", "/"):
                pass
    assert cancelled.is_set()


@async_test()
async def test_client_app_that_survives_its_cancellation_is_reported_still_running() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await release.wait()  # after the cancellation it swallowed

    async with AsgiClient(app, timeout=0.05) as client:
        with pytest.raises(TimeoutError, match=r"cancelled, and it is still running$"):
            async with client.stream("GET", "/") as response:
                pass
    release.set()
    await asyncio.wait((response._call.task,))  # type: ignore[union-attr]


@async_test()
async def test_client_cancelled_while_leaving_cancels_the_app_and_waits_for_it() -> None:
    left = asyncio.Event()
    app_done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        await receive()
        await receive()
        left.set()
        try:
            await asyncio.Event().wait()
        finally:
            app_done.set()

    async def use() -> None:
        async with AsgiClient(app) as client, client.stream("GET", "/"):
            pass

    task = asyncio.ensure_future(use())
    await left.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert app_done.is_set()


@async_test()
async def test_client_cancelled_block_stays_cancelled_whatever_the_app_raises() -> None:
    """A test cancelled inside a response's block, or while it waits for
    the start: the app is cancelled at once, and the cancellation goes on
    (not an error the app raises as it is cancelled)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/started":
            await send(asgi_start())
        try:
            await asyncio.Event().wait()
        finally:
            raise ClientAppError("while cancelled")

    for path in ("/started", "/never"):
        entered = asyncio.Event()

        async def use(path: str = path, entered: asyncio.Event = entered) -> None:
            async with AsgiClient(app) as client:
                if path == "/never":
                    entered.set()
                async with client.stream("GET", path):
                    entered.set()
                    await asyncio.Event().wait()

        task = asyncio.ensure_future(use())
        await entered.wait()
        task.cancel()
        await asyncio.wait((task,))
        assert task.cancelled(), task


@async_test()
async def test_client_a_response_start_after_the_client_left_is_dropped() -> None:
    """An app that starts its response only after the client gave up: the
    test sees the timeout, and what the app sends then is dropped."""
    late = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"
        await send(asgi_start())
        await send(asgi_body(b"data: late\n\n", more_body=False))
        late.set()

    async with AsgiClient(app, timeout=0.05) as client:
        with pytest.raises(TimeoutError, match=r"^GET /: no response start within 0.05 s$"):
            async with client.stream("GET", "/"):
                pass  # pragma: no cover (never entered)
    assert late.is_set()


@async_test()
async def test_client_two_waits_on_one_response_are_both_woken() -> None:
    go = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        await go.wait()
        await send(asgi_body(b"data: 1\n\n", more_body=False))

    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        both = asyncio.gather(response.read(), response.event())
        await asyncio.sleep(0)
        go.set()
        assert list(await both) == [b"data: 1\n\n", SseEvent("message", "1", "")]


@async_test()
async def test_client_json_keeps_a_content_type_given() -> None:
    app = ClientRecorder()
    async with AsgiClient(app) as client:
        await client.request("POST", "/", json=[1], headers={"Content-Type": "application/vnd.api+json"})
    assert [value for name, value in app.scopes[0]["headers"] if name == b"content-type"] == [
        b"application/vnd.api+json"
    ]


# ---------------------------------------------------------------------------
# What the app raises, and what it gets wrong
# ---------------------------------------------------------------------------


class ClientAppError(Exception):
    pass


@async_test()
async def test_client_app_error_before_the_start_is_raised_on_entering() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ClientAppError("no")

    async with AsgiClient(app) as client:
        with pytest.raises(ClientAppError, match="no"):
            async with client.stream("GET", "/"):
                pass  # pragma: no cover (never entered)


@async_test()
async def test_client_app_error_while_streaming_is_raised_by_the_wait_once() -> None:
    """Raised by the wait that sees it, and not again when leaving."""
    go = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        await go.wait()
        raise ClientAppError("while streaming")

    async with AsgiClient(app) as client, client.stream("GET", "/") as response:
        go.set()
        with pytest.raises(ClientAppError, match="while streaming"):
            await response.event()


@async_test()
async def test_client_app_error_after_the_disconnect_is_raised_when_leaving() -> None:
    async with AsgiClient(client_app(asgi_start(), then="disconnect")) as client:
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(asgi_start())
        await receive()
        await receive()
        raise ClientAppError("on the way out")

    async with AsgiClient(app) as client:
        with pytest.raises(ClientAppError, match="on the way out"):
            async with client.stream("GET", "/"):
                pass


@async_test()
async def test_client_app_raising_cancelled_error_by_itself_is_a_runtime_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise asyncio.CancelledError

    async with AsgiClient(app) as client:
        with pytest.raises(RuntimeError, match=r"GET /: the app raised CancelledError\(\)"):
            await client.request("GET", "/")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "GET /: the app returned without sending response start"),
        (client_sse(b"data: 1\n"), "GET /: the app returned without sending event"),
        ([asgi_body(b"x")], "GET /: the app sent 'http.response.body' first"),
        ([asgi_start(), asgi_start()], "GET /: the app sent 'http.response.start' after its start"),
        ([asgi_start(), ASGI_FINAL, ASGI_FINAL], "the app sent 'http.response.body' after the end of the body"),
        ([asgi_start(), {"type": "http.response.trailers"}], "the app sent 'http.response.trailers' after its start"),
    ],
)
@async_test()
async def test_client_app_that_breaks_the_protocol_is_a_runtime_error(
    messages: list[AsgiMessage], message: str
) -> None:
    """Returning early, or a message out of order: RuntimeError, raised in
    the app by its send() or in the test by the wait."""
    async with AsgiClient(client_app(*messages)) as client:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            async with client.stream("GET", "/") as response:
                await response.event()


# ---------------------------------------------------------------------------
# Lifespan
# ---------------------------------------------------------------------------


class ClientLifespanApp:
    """An app with a lifespan: it answers startup and shutdown with
    ``answers``, sets state, and serves requests only after startup."""

    def __init__(self, startup: str = "complete", shutdown: str = "complete") -> None:
        self.startup, self.shutdown = startup, shutdown
        self.events: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            assert self.events == ["startup"]
            await client_app(asgi_start([(b"content-type", b"application/json")]), then="disconnect")(
                scope, receive, send
            )
            return
        assert scope["asgi"] == {"version": "3.0", "spec_version": "2.0"}
        for phase, answer in (("startup", self.startup), ("shutdown", self.shutdown)):
            message = await receive()
            assert message == {"type": f"lifespan.{phase}"}
            self.events.append(phase)
            scope["state"]["ready"] = True
            if answer == "raise":
                raise ClientAppError(f"{phase} broke")
            if answer == "hang":
                await asyncio.Event().wait()
            if answer == "failed-quietly":  # no message
                await send({"type": f"lifespan.{phase}.failed"})
                return
            await send({"type": f"lifespan.{phase}.{answer}", "message": f"{phase} said no"})


@async_test()
async def test_client_lifespan_runs_around_the_block_and_its_state_reaches_requests() -> None:
    app = ClientLifespanApp()
    client = AsgiClient(app, lifespan=True)
    with pytest.raises(RuntimeError, match="lifespan=True is used inside `async with AsgiClient"):
        client.stream("GET", "/")
    async with client:
        async with client.stream("GET", "/") as response:
            assert response.status == 200
        with pytest.raises(RuntimeError, match="this AsgiClient is already in use"):
            await client.__aenter__()
    assert app.events == ["startup", "shutdown"]
    async with AsgiClient(app) as plain:  # without lifespan, nothing of it runs
        assert plain._life is None


@async_test()
async def test_client_lifespan_state_is_copied_into_each_request() -> None:
    app = ClientRecorder()

    async def with_lifespan(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            scope["state"]["db"] = "connected"
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append(dict(scope["state"]))
        scope["state"]["db"] = "changed by a request"
        await app(scope, receive, send)

    seen: list[dict[str, Any]] = []
    async with AsgiClient(with_lifespan, lifespan=True) as client:
        await client.request("GET", "/")
        await client.request("GET", "/")
    assert seen == [{"db": "connected"}] * 2, "each request gets a copy of the lifespan's state"


@pytest.mark.parametrize(
    ("startup", "shutdown", "error", "message"),
    [
        ("failed", "complete", RuntimeError, "lifespan.startup with lifespan.startup.failed: startup said no"),
        ("raise", "complete", ClientAppError, "startup broke"),
        ("hang", "complete", TimeoutError, "lifespan: no lifespan.startup.complete within 0.05 s"),
        ("failed-quietly", "complete", RuntimeError, "lifespan.startup with lifespan.startup.failed: $"),
        ("complete", "failed", RuntimeError, "lifespan.shutdown.failed: shutdown said no"),
        ("complete", "raise", ClientAppError, "shutdown broke"),
        ("complete", "hang", TimeoutError, "lifespan: no lifespan.shutdown.complete within 0.05 s"),
    ],
)
@async_test()
async def test_client_lifespan_failure_is_raised_and_the_app_is_stopped(
    startup: str, shutdown: str, error: type[Exception], message: str
) -> None:
    """A failed or broken phase is raised (the app's message, or its
    exception); the lifespan task is cancelled, not left behind."""
    app = ClientLifespanApp(startup, shutdown)
    with pytest.raises(error, match=re.escape(message.removesuffix("$")) + "$" * message.endswith("$")):
        async with AsgiClient(app, lifespan=True, timeout=0.05):
            pass


@async_test()
async def test_client_cancelled_in_its_block_cancels_the_lifespan_and_stays_cancelled() -> None:
    entered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        try:
            await receive()
        finally:
            raise ClientAppError("while cancelled")

    async def use() -> None:
        async with AsgiClient(app, lifespan=True):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(use())
    await entered.wait()
    task.cancel()
    await asyncio.wait((task,))
    assert task.cancelled(), task


@async_test()
async def test_client_lifespan_that_never_returns_after_shutdown_is_reported() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        await asyncio.Event().wait()

    message = "lifespan: the app did not return within 0.05 s of lifespan.shutdown; cancelled"
    with pytest.raises(TimeoutError, match=re.escape(message)):
        async with AsgiClient(app, lifespan=True, timeout=0.05):
            pass


@async_test()
async def test_client_lifespan_unexpected_answer_is_a_runtime_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        await asyncio.Event().wait()

    with pytest.raises(RuntimeError, match=r"answered lifespan\.startup with lifespan\.shutdown\.complete$"):
        async with AsgiClient(app, lifespan=True, timeout=0.05):
            pass
