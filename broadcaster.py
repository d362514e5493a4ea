"""Keyed broadcast channels for Server-Sent Events, as raw ASGI apps.

Theory of operation
===================

A :class:`Broadcaster` is a registry of independent *channels*, one per *key*
(a chat room, a user id, a dashboard). ``subscribe(key)`` returns a
:class:`BroadcastStream`: an async iterator of every item later sent to that key,
in send order. ``send(key, item)`` hands the item to every current subscriber of
the key and returns at once; it never waits for a reader.

Bound and lag
    Each stream buffers at most ``buffer`` undelivered items. When an item
    arrives at a full stream the *oldest* buffered item is dropped, the sender is
    never slowed, and the stream's ``lagged`` total grows by one. What the reader
    sees of the loss is its :class:`LagPolicy`: ``ERROR`` (default) raises
    :class:`Lagged` once, ``SKIP`` carries on silently, ``END`` stops the stream.

Life of a channel
    A channel is born at the first ``subscribe`` of its key and dies the moment
    its last stream leaves: closed, stopped by the policy, or garbage-collected
    without being closed (a ``weakref.finalize`` on the stream; the registry never
    holds a stream, only its private delivery state). ``remove(key)`` ends every
    stream of the key once it has drained what was already delivered to it and
    forgets the channel; ``close()`` does that for every key, for good, and
    also ends the running ``channel()`` responses (graceful shutdown).

History and resume (opt-in: ``Broadcaster(history=N)``)
    Each channel then keeps its last N items, each with an id it assigns: an
    epoch unique to this channel's lifetime, a dash, and a sequence number
    (``"3f9a0c1b7d2e-42"``). ``subscribe(key, last_event_id=id)`` first yields
    the retained items after ``id``, then live items, with no gap and no
    duplicate; an id it cannot resume from (another epoch, or older than the
    history) sets ``stream.resumed`` to False instead. A channel whose last
    stream left lingers ``linger`` seconds with its history, so a lone client
    can reconnect; sends to it extend the history. SSE responses of such streams
    write each item's id on the wire. In this mode every delivery goes through
    the stream's event loop (``call_soon``), so every stream sees ids in order.

Bridges
    ``Broadcaster(on_change=fn)`` calls ``fn(key)`` whenever a key gains or
    loses its channel, and ``send(key, item, id=...)`` retains an item under an
    id from elsewhere: what a bridge to another transport (Redis, in
    ``examples/redis_bridge.py``) needs to serve only the keys this process has
    and to keep ids global.

Limits and numbers
    ``Broadcaster(max_streams=, max_streams_per_key=, max_keys=)`` refuse a
    subscription past a limit (:class:`StreamLimit`, :class:`KeyLimit`),
    changing nothing; ``try_later()`` answers the refused client.
    ``metrics()`` is a snapshot of what is open and of totals (sends,
    deliveries, drops, how responses ended...), counted by each thread into
    its own counters (``_Counts``). ``SseConfig(shutdown_retry=...)`` spreads
    the reconnections of the clients that ``close()`` ends.

Shutdown
    An SSE response never finishes by itself, so a server shutting down
    gracefully would wait for ever. ``close_on_signals()`` arms the
    broadcaster: the process's one handler of SIGINT and SIGTERM, chained in
    front of the server's own, closes the armed broadcasters on the event
    loop, waits for their responses to end, then passes the signal on;
    ``shutdown_trigger()`` does the same for a server that takes a trigger
    (hypercorn). ``close()`` ends the broadcaster's running responses too.

Threads and loops
    Every ``Broadcaster`` method is thread-safe. A stream is bound to the event
    loop that subscribed it and is read on that loop only. ``send`` called on
    that loop delivers synchronously (without history); called from any other
    thread it delivers through ``loop.call_soon_threadsafe``, so one thread's
    sends to one key keep their order. The registry's lock and what it guards are described in one
    place: "The concurrency model", above ``_RegistryLock``.

Server-Sent Events
    :class:`Event` validates and encodes one frame at construction, so an event
    sent to 10,000 subscribers is encoded once. ``response()`` and ``channel()``
    return ASGI 3 apps that write the ``text/event-stream`` body: headers and a
    first chunk at once, then each event as soon as it can be read (with the
    events already waiting behind it in the same body message), keep-alive
    comments on silence, disconnect detection by a concurrent ``receive()``,
    a bound on every ``send()``, and on every way out the event source is
    closed and no task is left behind. What a response reads is an event
    source (the contract ``_EventSource``): a stream or ``replay()`` of one,
    read without a task of their own, so that such a response runs in the
    server's task plus one task (its pending ``receive()``); or a
    ``channel()`` closure, or any other async iterable, which runs (is read
    ahead) in one more task.

Testing
    :class:`AsgiClient` drives any ASGI app (these, or a whole Starlette or
    FastAPI application) in the test's own event loop, as a server would:
    each response is read as it is sent, its events parsed by
    :class:`SseParser` (which reads any event stream as a browser does),
    and every wait is bounded, so a test of an endless stream cannot hang.

How things end (the words this module uses, and only in these senses)
    *close*
        what an owner does to what it holds: ``BroadcastStream.close()`` (its
        reader is done: it leaves its channel and discards what it buffered),
        ``Broadcaster.close()`` (shutdown: ends every stream and ``channel()``
        response, forgets every channel, refuses new subscriptions),
        ``aclose()`` of an event source. A stream is *closed* once no item
        will be added to it any more, whoever closed or ended it.
    *end*
        what the registry does to a stream (``remove``, ``Broadcaster.close``)
        or to a ``channel()`` response (``Broadcaster.close``): nothing more is
        added, what was already delivered is still read, then iteration stops.
        The stream is closed at once and *exhausted* once drained.
    *leave*
        a stream stops being a member of its channel (when it is closed by its
        reader, stopped by ``LagPolicy.END``, or garbage-collected).
    *remove*
        a channel is taken out of the registry at once (``remove(key)``,
        ``Broadcaster.close()``), with its history.
    *expire*
        a lingering channel (history kept after its last stream left) is
        removed because its ``linger`` time is over.
    *finish*
        an SSE response returns: *cleanly* with a last empty body message, or
        without it when the client is gone or a write failed.

This file, in order: checking arguments; futures and closing (small
helpers); encoding (Event, the ids of keyed streams); configuration
(SseConfig); lag policies and exceptions; delivery state (what the registry
holds, and delivering); the event-source contract; the registry lock and the
concurrency model; streams (BroadcastStream, KeyedStream, merge()); the
registry (Broadcaster); the ASGI layer (_SseResponse); shutdown on a signal
(_SignalChain, _CHAIN); other event sources (channel()'s Sender, _FedSource,
replay(), last_event_id()); reading an event stream as a client (SseParser);
testing an app in process (AsgiClient).
"""

# pyright: strict
# (One module: a leading underscore marks what is not public API. The module's
# own classes share a few such members across class boundaries; each of those
# places says so with a "pyright: ignore[reportPrivateUsage]" comment.)

from __future__ import annotations

import asyncio
import codecs
import collections
import dataclasses
import enum
import functools
import itertools
import json
import logging
import math
import random
import re
import secrets
import signal
import sys
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar, cast, overload, runtime_checkable
from urllib.parse import quote, unquote, unquote_to_bytes

__all__ = [
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

# The version, in this one place (the build reads it); semantic versioning
# of the names in __all__ (see CHANGELOG.md).
__version__ = "0.2.0.dev0"

logger: Final = logging.getLogger("broadcaster")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S")
K_co = TypeVar("K_co", bound=Hashable, covariant=True)
K2 = TypeVar("K2", bound=Hashable)
K3 = TypeVar("K3", bound=Hashable)
T2 = TypeVar("T2")
T3 = TypeVar("T3")
_S = TypeVar("_S", bound="BroadcastStream[Any]")
_KS = TypeVar("_KS", bound="KeyedStream[Any, Any]")
_X = TypeVar("_X")

# ASGI types, loose on purpose: they are the conventional ones (the same as
# ``starlette.types``), so an app returned here is assignable to any framework's
# app type under ``mypy --strict``.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------------------
# Checking arguments
#
# Every check of a caller's argument, each written once. Public entry points
# call them before changing anything, so bad input raises TypeError or
# ValueError with a precise message and leaves no trace. They take ``object``:
# annotations are not enforced at run time.
# ---------------------------------------------------------------------------

# The line breaks of the event-stream format: CRLF, lone CR, lone LF. Nothing
# else (str.splitlines would also split on U+2028, VT, FF, ..., which a browser
# keeps inside the data).
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
# Characters that would end or truncate a one-line field on the client: CR and
# LF end the line, and a browser ignores an ``id`` containing NUL.
_FIELD_FORBIDDEN: Final = re.compile(r"[\r\n\x00]")
# Header names on the wire: lowercase RFC 9110 tokens.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Control characters other than HTAB, which RFC 9110 forbids in a field value
# (servers such as h11 would refuse them at send time, mid-response); CR, LF and
# NUL have a check of their own, with a more precise message.
_HEADER_VALUE_CONTROL: Final = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Headers that describe the framing of the body; the server owns them, and a
# user value would corrupt the stream (a content-length on an endless body).
_FRAMING_HEADERS: Final = frozenset({"connection", "content-length", "transfer-encoding"})


def _check_type(name: str, value: object, kind: type[_X], expected: str) -> _X:
    """``value`` if it is a ``kind``, else TypeError: "<name> must be <expected>"."""
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")
    return value


def _check_str(name: str, value: object) -> str:
    return _check_type(name, value, str, "a str")


def _check_int(name: str, value: object, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_seconds(name: str, value: object, *, optional: bool = False) -> float | None:
    """A positive, finite number of seconds; also None if ``optional`` (None
    then disables what it times)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a number of seconds or None" if optional else "a number of seconds"
        raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")
    if not 0 < value < float("inf"):
        hint = " (use None to disable)" if optional else ""
        raise ValueError(f"{name} must be > 0 and finite{hint}, got {value!r}")
    return float(value)


def _check_window(name: str, value: object) -> None:
    """None, or a ``(low, high)`` tuple of seconds, ``0 <= low <= high`` and finite."""
    if value is None:
        return
    items = cast("tuple[object, ...]", value) if isinstance(value, tuple) else ()
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise TypeError(f"{name} must be a (low, high) tuple of seconds or None, got {value!r}")
    low, high = cast("tuple[float, float]", items)
    if not 0 <= low <= high < float("inf"):
        raise ValueError(f"{name} must have 0 <= low <= high, finite, got {value!r}")


def _check_callable(name: str, value: object, *, optional: bool = False) -> None:
    """A callable; also None if ``optional``."""
    if not callable(value) and not (optional and value is None):
        expected = "callable or None" if optional else "callable"
        raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")


def _check_async_iterable(name: str, value: object) -> None:
    """An async iterable (it has ``__aiter__``)."""
    if not isinstance(value, AsyncIterable):
        raise TypeError(f"{name} must be an async iterable, not {type(value).__name__}")


def _check_line(name: str, value: object) -> str:
    """A str with no CR or LF (a comment line)."""
    text = _check_str(name, value)
    if "\r" in text or "\n" in text:
        raise ValueError(f"{name} must not contain CR or LF: {text!r}")
    return text


def _check_field(name: str, value: object) -> str:
    """A one-line field: a str with no CR, LF or NUL."""
    text = _check_str(name, value)
    if _FIELD_FORBIDDEN.search(text):
        raise ValueError(f"{name} must not contain CR, LF or NUL: {text!r}")
    return text


def _utf8(what: str, text: str) -> bytes:
    """UTF-8 bytes of ``text``; a lone surrogate is a ValueError, never replaced."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} contains a lone surrogate: {exc.object[exc.start : exc.end]!r}") from None


def _check_header(pair: object, owner: str = "the server") -> tuple[bytes, bytes]:
    """A ``(name, value)`` pair of strs that is a header a server (or a
    client: ``owner``) will write as given: a lowercase token name that is
    not a framing header, and a latin-1 value without control characters or
    edge whitespace. Returns the pair encoded for the wire."""
    items = cast("tuple[object, ...]", pair) if isinstance(pair, tuple) else ()
    if len(items) != 2:
        raise TypeError(f"each header must be a (name, value) tuple, got {pair!r}")
    name, value = _check_str("header name", items[0]), _check_str("header value", items[1])
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"header name must be a lowercase token: {name!r}")
    if name in _FRAMING_HEADERS:
        raise ValueError(f"header {name!r} is owned by {owner} and would corrupt the stream")
    if _FIELD_FORBIDDEN.search(value):
        raise ValueError(f"header {name!r} value must not contain CR, LF or NUL: {value!r}")
    if _HEADER_VALUE_CONTROL.search(value):
        raise ValueError(f"header {name!r} value must not contain control characters: {value!r}")
    if value != value.strip(" \t"):
        raise ValueError(f"header {name!r} value must not start or end with whitespace: {value!r}")
    try:
        return name.encode("ascii"), value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header {name!r} value must be latin-1: {value!r}") from None


# ---------------------------------------------------------------------------
# Futures and closing
#
# Small helpers every part below uses: wake a sleeper, read the outcome of a
# task, wait for tasks to finish, close what may be closed.
# ---------------------------------------------------------------------------


def _complete(waiter: asyncio.Future[None] | None) -> None:
    """Wake whoever sleeps on ``waiter``, if anyone still does."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


# Python 3.10's Task.result() of a task that raised CancelledError by itself
# raises a new, bare CancelledError whose context is the task's own; later
# versions raise the task's own.
_RESULT_IS_A_COPY: Final = sys.version_info < (3, 11)


def _outcome(done: asyncio.Future[_X], what: str) -> _X:
    """The result of a finished task, or its exception re-raised; a
    CancelledError as ``RuntimeError(f"{what} {error!r}")``.

    Callers ask only about tasks they did not cancel (see "Cancellations" in
    the concurrency model), so a cancellation here is the task's own failure
    (it awaited something that was cancelled), and is reported as an error,
    never taken for a cancellation of the response."""
    try:
        return done.result()
    except asyncio.CancelledError as exc:
        # Python 3.10 raises a bare copy, whose context is the task's own.
        own = exc.__context__ if _RESULT_IS_A_COPY and isinstance(exc.__context__, asyncio.CancelledError) else exc
        raise RuntimeError(f"{what} {own!r}") from own


async def _join(*tasks: asyncio.Future[Any]) -> None:
    """Wait until every task is done, even through cancellations of the caller
    (anyio's cancel scopes repeat them); then re-raise the last one."""
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as exc:
            cancelled = exc
            continue
        break
    if cancelled is not None:
        raise cancelled


async def _close(closable: object) -> None:
    """``aclose()`` an async iterator, or ``close()`` a generator, if it can."""
    aclose = getattr(closable, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(closable, "close", None)
    if close is not None:
        close()


_C = TypeVar("_C", bound="_AsyncClosing")


class _AsyncClosing:
    """``async with`` for a class that has ``aclose()``: leaving the block,
    with or without an exception, closes it."""

    __slots__ = ()

    aclose: Callable[[], Awaitable[None]]

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _close_each(closables: Iterable[object]) -> None:
    """:func:`_close` every one, in order, even when one raises; then raise the
    first error."""
    error: BaseException | None = None
    for closable in closables:
        try:
            await _close(closable)
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


# ---------------------------------------------------------------------------
# Encoding: one SSE frame per Event (WHATWG HTML, "Server-sent events")
#
# Event is the unit the ASGI layer writes; its frame is computed once.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event, validated and encoded once at construction.

    The frame has LF line endings and its fields in this order: one ``: text``
    line per line of ``comment``, ``event:``, ``id:``, ``retry:``, one
    ``data:`` line per line of ``data`` (split on CRLF, CR and LF), then a blank
    line. ``data=""`` writes ``data: `` (the event fires with empty data);
    ``event=""`` writes no ``event:`` line (the client sees ``message``);
    ``id=""`` writes ``id: `` (it resets the client's last event id). An event
    with only a comment dispatches nothing on the client.

    Raises:
        TypeError: a field of the wrong type (``retry`` must be an int, not a
            bool or a float).
        ValueError: ``event`` or ``id`` containing CR, LF or NUL; a negative
            ``retry``; a lone surrogate anywhere; an event that would write no
            field at all.
    """

    data: str | None = None
    _: dataclasses.KW_ONLY
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    _frame: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(": " + line for line in _LINE_BREAK.split(_check_str("comment", self.comment)))
        if self.event is not None and _check_field("event", self.event):
            lines.append("event: " + self.event)
        if self.id is not None:
            lines.append("id: " + _check_field("id", self.id))
        if self.retry is not None:
            lines.append(f"retry: {_check_int('retry', self.retry, 0)}")
        if self.data is not None:
            lines.extend("data: " + line for line in _LINE_BREAK.split(_check_str("data", self.data)))
        if not lines:
            raise ValueError("an Event needs at least one of data, event (non-empty), id, retry or comment")
        lines.append("\n")
        object.__setattr__(self, "_frame", _utf8("Event", "\n".join(lines)))

    @classmethod
    def json(
        cls,
        value: object,
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
    ) -> Event:
        """An event whose data is ``value`` as compact JSON (UTF-8, no NaN).

        Raises what ``json.dumps`` raises (TypeError for an unserialisable value,
        ValueError for NaN or infinity) and what ``Event`` raises.
        """
        data = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return cls(data, event=event, id=id, retry=retry)

    def encode(self) -> bytes:
        """The wire frame, computed once at construction."""
        return self._frame


def _with_id(frame: bytes, id: str) -> bytes:
    """``frame`` with ``id: <id>`` as its last field. The last ``id:`` line of
    an event wins on the client, so it replaces any id of the frame's own."""
    return frame[:-1] + f"id: {id}\n\n".encode()


# The id of a keyed stream: the position reached in each of its keys, as
# "<name>=<id>" pairs joined by ",", in the stream's order of keys. Names and
# per-key ids are percent-escaped as UTF-8 (every byte outside _SAFE, so
# neither holds "," "=" "%", a space or a control character); a text is read
# back only in the form _escape writes, so one id has one meaning. Bounds: a
# stream has at most _MAX_KEYS keys, a per-key id is at most _MAX_KEY_ID bytes
# escaped (send() refuses longer ones), and subscribe_many() and merge()
# refuse keys whose ids could exceed _MAX_ID bytes, so that the id fits in a
# request header: the client sends it back as Last-Event-ID.
_SAFE: Final = "!#$&'()*+-./:;<>?@[]^_`{|}~"
_MAX_KEYS: Final = 100
_MAX_KEY_ID: Final = 48
_MAX_ID: Final = 8192


def _escape(text: str) -> str:
    return quote(text, safe=_SAFE)


def _check_id_room(names: Iterable[str]) -> None:
    """Refuse keys (by their names) whose id could exceed _MAX_ID bytes."""
    names = list(names)
    most = sum(len(_escape(name)) + 1 + _MAX_KEY_ID for name in names) + len(names) - 1
    if most > _MAX_ID:
        raise ValueError(
            f"the id of a stream over these {len(names)} keys could take {most} bytes, over the "
            f"{_MAX_ID} that fit in a Last-Event-ID header: use fewer keys, or shorter names for them"
        )


def parse_positions(last_event_id: str) -> dict[str, str] | None:
    """The position a keyed stream's id names in each key: the per-key ids,
    by key name, in order. None when ``last_event_id`` is not such an id
    (malformed, another kind of id, or longer than 8,192 bytes). Bounded
    work, whatever a client sent. For a bridge that resumes keyed streams
    from its own storage; see :func:`format_positions`.

    Raises:
        TypeError: ``last_event_id`` not a str.
    """
    text = _check_str("last_event_id", last_event_id)
    if len(text) > _MAX_ID:
        return None
    pairs = text.split(",")
    if len(pairs) > _MAX_KEYS:
        return None
    positions: dict[str, str] = {}
    for pair in pairs:
        escaped_name, equals, escaped_id = pair.partition("=")
        try:
            name, id = unquote(escaped_name, errors="strict"), unquote(escaped_id, errors="strict")
        except UnicodeDecodeError:
            return None
        if not (equals and name) or _escape(name) != escaped_name or _escape(id) != escaped_id or name in positions:
            return None
        if len(escaped_id) > _MAX_KEY_ID:  # not an id this module writes
            return None
        positions[name] = id
    return positions


def format_positions(positions: Mapping[str, str]) -> str:
    """The id of a keyed stream that has reached, in each key named in
    ``positions``, the per-key id given (the inverse of
    :func:`parse_positions`): what a bridge writes with each event it serves.

    Raises:
        TypeError: a name or an id that is not a str.
        ValueError: no position, an empty name, a name or an id holding CR,
            LF or NUL, an id over 48 bytes escaped, or more than 100 keys.
    """
    if not positions:
        raise ValueError("format_positions() needs at least one position")
    if len(positions) > _MAX_KEYS:
        raise ValueError(f"a stream takes at most {_MAX_KEYS} keys, got {len(positions)}")
    pairs: list[str] = []
    for name, id in positions.items():
        if not _utf8("a key's name", _check_field("a key's name", name)):
            raise ValueError("a key's name must not be empty")
        _utf8("id", _check_field("id", id))
        escaped = _escape(id)
        if len(escaped) > _MAX_KEY_ID:
            raise ValueError(f"id must take at most {_MAX_KEY_ID} bytes once percent-escaped: {id!r}")
        pairs.append(f"{_escape(name)}={escaped}")
    text = ",".join(pairs)
    if len(text) > _MAX_ID:
        raise ValueError(f"these positions make an id of {len(text)} bytes, over the {_MAX_ID} a stream's id may take")
    return text


def _check_keys(keys: object, name: Callable[[Any], str]) -> dict[Hashable, str]:
    """The keys of a keyed stream, in order, with their names (see
    ``Broadcaster.subscribe_many`` for the rules they must follow)."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be an iterable of keys, not {type(keys).__name__} (for one key: [key])")
    if not isinstance(keys, Iterable):
        raise TypeError(f"keys must be an iterable of keys, not {type(keys).__name__}")
    given = tuple(cast("Iterable[Hashable]", keys))
    if not given:
        raise ValueError("subscribe_many() needs at least one key")
    if len(given) > _MAX_KEYS:
        raise ValueError(f"a stream takes at most {_MAX_KEYS} keys, got {len(given)}")
    if len(set(given)) != len(given):
        twice = [key for key, count in collections.Counter(given).items() if count > 1]
        raise ValueError(f"each key may be given once: {twice!r} given more than once")
    _check_callable("name", name)
    names = {key: _check_field("a key's name", name(key)) for key in given}
    for text in names.values():
        _utf8("a key's name", text)
    if not all(names.values()):
        raise ValueError("a key's name must not be empty")
    if len(set(names.values())) != len(names):
        raise ValueError(f"each key needs its own name: {sorted(names.values())!r}")
    return names


# ---------------------------------------------------------------------------
# Configuration of the SSE responses
#
# SseConfig is given to a Broadcaster and read by every response it makes;
# what a response writes besides events is derived from it once.
# ---------------------------------------------------------------------------

_BASE_HEADERS: Final = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # Proxies and browsers must not cache or coalesce a live stream.
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied responses unless told not to.
    (b"x-accel-buffering", b"no"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class SseConfig:
    """How the SSE responses of a :class:`Broadcaster` behave on the wire.

    Attributes:
        keep_alive: seconds of silence after which a comment frame is written,
            so proxies and clients keep an idle stream open; ``None`` disables it.
        keep_alive_comment: the text of that comment (``":\\n\\n"`` when empty,
            ``": text\\n\\n"`` otherwise).
        retry: reconnection time in ms, written as the first frame of every
            response (``retry: N``) when set.
        send_timeout: the most one ASGI ``send()`` may take; past it the client
            is treated as dead and the response finishes. The default, 30 s, is far
            above any healthy write (a server's send returns once the bytes are
            in the socket buffer) and well under the minutes a dead peer can hold
            a TCP connection open. ``None`` waits forever.
        headers: extra response headers as ``(name, value)`` pairs. A name equal
            to a built-in header's replaces it.
        shutdown_retry: ``(low, high)`` seconds, or ``None`` (the default).
            When set, a response that finishes once its broadcaster is closed
            (``Broadcaster.close()``, at shutdown) writes ``retry: N`` just
            before its end, N chosen at random between ``low`` and ``high``
            seconds, so that its clients reconnect spread over that window
            instead of all at once. The client keeps that reconnection time
            until a stream sets another (``retry`` above does, at the start).

    Raises:
        TypeError: a field of the wrong type.
        ValueError: a non-positive or non-finite time; a ``shutdown_retry``
            that is not ``0 <= low <= high``, finite; CR or LF in the comment;
            a header name that is not a lowercase token, a framing header
            (``connection``, ``content-length``, ``transfer-encoding``) or a
            value that is not latin-1 or holds CR, LF or NUL.
    """

    keep_alive: float | None = 15.0
    keep_alive_comment: str = ""
    retry: int | None = None
    send_timeout: float | None = 30.0
    headers: tuple[tuple[str, str], ...] = ()
    shutdown_retry: tuple[float, float] | None = None
    # Derived once, so a response does no work to build them.
    _start: tuple[tuple[bytes, bytes], ...] = dataclasses.field(init=False, repr=False, compare=False)
    _first_chunk: bytes = dataclasses.field(init=False, repr=False, compare=False)
    _keep_alive_frame: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_seconds("keep_alive", self.keep_alive, optional=True)
        _check_seconds("send_timeout", self.send_timeout, optional=True)
        _check_window("shutdown_retry", self.shutdown_retry)
        comment = _check_line("keep_alive_comment", self.keep_alive_comment)
        keep_alive = _utf8("keep_alive_comment", f": {comment}\n\n" if comment else ":\n\n")
        first = b":\n\n" if self.retry is None else f"retry: {_check_int('retry', self.retry, 0)}\n\n".encode()
        pairs = cast(
            "tuple[object, ...]", _check_type("headers", self.headers, tuple, "a tuple of (name, value) pairs")
        )
        extra = [_check_header(pair) for pair in pairs]
        names = {name for name, _ in extra}
        start = [(name, value) for name, value in _BASE_HEADERS if name not in names] + extra
        object.__setattr__(self, "_start", tuple(start))
        object.__setattr__(self, "_first_chunk", first)
        object.__setattr__(self, "_keep_alive_frame", keep_alive)


# ---------------------------------------------------------------------------
# What a reader can be told: lag policies and exceptions
#
# The public vocabulary of losses and ends, raised to readers of streams and
# to channel() closures.
# ---------------------------------------------------------------------------


class LagPolicy(enum.Enum):
    """What a stream does at its next read after items were dropped for it."""

    ERROR = "error"
    """Raise :class:`Lagged` once, then continue from the oldest retained item."""
    SKIP = "skip"
    """Continue silently from the oldest retained item."""
    END = "end"
    """Stop iteration at once, discarding what is still buffered."""


class Lagged(Exception):
    """A stream fell ``buffer`` items behind and ``missed`` items were dropped."""

    def __init__(self, missed: int) -> None:
        super().__init__(missed)
        self.missed: Final = missed

    def __str__(self) -> str:
        return f"subscriber lagged behind and missed {self.missed} item(s)"


class ClientDisconnected(Exception):
    """The client of a ``channel()`` response is gone; nothing more can be sent."""


class LimitReached(Exception):
    """``subscribe()`` or ``subscribe_many()`` refused: an admission limit of
    the broadcaster is reached, and nothing changed. ``limit`` names it (the
    argument of :class:`Broadcaster`), ``value`` is its value. Answer the
    client with ``Broadcaster.try_later()``."""

    def __init__(self, message: str, limit: str, value: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


class StreamLimit(LimitReached):
    """Refused: ``max_streams`` streams are open, or one of the keys has
    ``max_streams_per_key``."""


class KeyLimit(LimitReached):
    """Refused: a new key's channel would pass ``max_keys`` (lingering
    channels, which hold history, count)."""


# ---------------------------------------------------------------------------
# Delivery state: what the registry holds, and the functions that deliver
#
# _Subscriber is one stream's state (the registry holds it, never the stream);
# _Entry an item retained with its id; _Channel one key's subscribers and
# history. The functions below run on a subscriber's loop thread and are
# used by the registry (deliveries, ends) and by the streams (wake-ups).
# ---------------------------------------------------------------------------

_EMPTY: Final[Any] = object()  # a _Subscriber's ``one`` when it holds no item

# How an SSE response ended, as Metrics.responses_ended counts them.
_ENDINGS: Final[tuple[str, ...]] = (
    "source_done",
    "client_gone",
    "send_timeout",
    "lag",
    "error",
    "shutdown",
    "cancelled",
)


class _Counts:
    """What one thread counted for one broadcaster (see ``Broadcaster.metrics``).

    Only that thread writes it, so no increment is lost, however many
    threads send at once (with or without the GIL); ``metrics()`` sums
    every thread's. A subscriber holds its loop thread's, for the drops and
    lag reports it counts there.
    """

    __slots__ = ("sends", "deliveries", "dropped", "lag_reports", "resumes", "gaps", "opened", "ended", "written")

    def __init__(self) -> None:
        self.sends = 0
        self.deliveries = 0
        self.dropped = 0
        self.lag_reports = 0
        self.resumes = 0
        self.gaps = 0
        self.opened = 0  # SSE responses started
        self.ended = dict.fromkeys(_ENDINGS, 0)
        self.written = 0  # body bytes

    def add(self, other: _Counts) -> None:
        """Add ``other``'s counts to these."""
        for name in self.__slots__:
            if name != "ended":
                setattr(self, name, getattr(self, name) + getattr(other, name))
        for how, n in other.ended.items():
            self.ended[how] += n


_NO_COUNTS: Final = _Counts()  # what a subscriber made by hand counts into (tests)


@dataclasses.dataclass(eq=False, slots=True)
class _Subscriber:
    """The delivery state of one stream: what the registry holds instead of it.

    Mutated only on ``loop``'s thread (deliveries from other threads are
    scheduled there), so it needs no lock.
    """

    key: Hashable
    loop: asyncio.AbstractEventLoop
    # Undelivered items: one alone is held in ``one``; from two on, all are in
    # ``queue`` (maxlen is the broadcaster's buffer, so an append to a full
    # queue drops the oldest item), which goes once drained: an empty deque
    # costs 760 bytes, more than the rest of an idle subscription. Invariant:
    # ``one`` is _EMPTY or ``queue`` is None.
    one: Any = _EMPTY
    queue: deque[Any] | None = None
    # History entries a resumed stream yields before its queue (not bounded by
    # the buffer: they are references to items the channel retains anyway);
    # None once drained.
    backlog: deque[Any] | None = None
    # Items dropped so far, and how many of them the reader has been told of.
    lagged: int = 0
    reported: int = 0
    # No item will be added any more: the reader drains the queue, then stops.
    closed: bool = False
    # The future a reader sleeps on until something can be read; None or a
    # done future when no one waits.
    waiter: asyncio.Future[None] | None = None
    # Counted among the broadcaster's open streams (registry lock).
    counted: bool = False
    # Its loop thread's counts of its broadcaster: drops and lag reports.
    counts: _Counts = _NO_COUNTS

    def all_keys(self) -> tuple[Hashable, ...]:
        """The keys whose channels this subscriber joined."""
        return (self.key,)


@dataclasses.dataclass(eq=False, slots=True)
class _KeyedSubscriber(_Subscriber):
    """The delivery state of a :class:`KeyedStream`'s part: one subscriber in
    the channels of several keys (``key`` holds them all, in order). Its
    records are ``(key, record)`` pairs; an end reaches it one key at a time,
    and it is closed once every key has ended."""

    # The keys not ended yet (by remove() or Broadcaster.close()).
    open: set[Hashable] = dataclasses.field(default_factory=set[Hashable])

    def all_keys(self) -> tuple[Hashable, ...]:
        return cast("tuple[Hashable, ...]", self.key)


# The members of a channel on one loop: (loop, single-key subscribers, keyed
# subscribers, the counts of the thread that runs that loop). Delivered to
# as a unit (see _deliver_group); a send on that loop's thread counts into
# those counts (theirs; see _Counts) without a thread-local lookup.
_Group = tuple[asyncio.AbstractEventLoop, tuple[_Subscriber, ...], tuple[_Subscriber, ...], "_Counts"]


class _Entry:
    """An item with its id, as a channel with history retains and delivers it.

    An :class:`Event` item is stored as a copy whose ``id`` is the entry's, so
    the id travels with the event through any wrapper of the stream (and the
    copy is encoded once, for every subscriber). ``bare`` is the item as it
    was sent, what keyed streams yield: their id is the stream's, not a
    key's."""

    __slots__ = ("id", "item", "bare")

    def __init__(self, id: str, item: object) -> None:
        self.id = id
        self.bare = item
        if isinstance(item, Event) and item.id != id:
            item = dataclasses.replace(item, id=id)
        self.item = item


class _Channel:
    """The subscribers of one key, and its history when the broadcaster keeps one."""

    __slots__ = ("members", "groups", "history", "epoch", "seq", "expires")

    def __init__(self, history: int) -> None:
        # Insertion-ordered set of the key's subscribers (registry lock held to
        # change it).
        self.members: dict[_Subscriber, None] = {}
        # ``members`` grouped by event loop, as immutable tuples for send() to
        # iterate without the lock; None after any change (rebuilt lazily).
        self.groups: tuple[_Group, ...] | None = None
        # The last ``history`` entries, oldest first; None without history.
        self.history: deque[_Entry] | None = deque(maxlen=history) if history else None
        # Ids are f"{epoch}-{seq}": the epoch is random per channel lifetime, so
        # an id of another lifetime or process is never mistaken for one of ours.
        self.epoch = secrets.token_hex(6) if history else ""
        self.seq = 0
        # time.monotonic() deadline of a lingering channel (no members); else None.
        self.expires: float | None = None

    def regroup(self) -> tuple[_Group, ...]:
        """Group the members by loop, single-key streams apart from keyed
        ones, and cache that (registry lock held, or the channel out of the
        registry)."""
        by_loop: dict[asyncio.AbstractEventLoop, tuple[list[_Subscriber], list[_Subscriber]]] = {}
        for sub in self.members:
            by_loop.setdefault(sub.loop, ([], []))[isinstance(sub, _KeyedSubscriber)].append(sub)
        self.groups = tuple(
            (loop, tuple(plain), tuple(keyed), (plain or keyed)[0].counts) for loop, (plain, keyed) in by_loop.items()
        )
        return self.groups

    def position(self) -> str:
        """The id that means "everything retained so far has been read": the
        last entry's (so that an id given to ``send(id=...)`` by a bridge
        stays global), or ``<epoch>-<seq>`` while nothing is retained."""
        history = self.history
        assert history is not None, "only channels with history have positions"
        return history[-1].id if history else f"{self.epoch}-{self.seq}"

    def after(self, last_id: str) -> deque[_Entry] | None:
        """The retained entries after ``last_id``, or None if this channel cannot
        tell what comes after it: an id it did not issue, or one so old that
        some entry after it has been dropped already. Its own ids are found by
        their number (``<epoch>-0`` means "before the first item", so it replays
        the whole history while nothing has been dropped); ids given to
        ``send(id=...)`` by an exact match. Registry lock held."""
        history = self.history
        assert history is not None, "only channels with history resume"
        epoch, _, number = last_id.rpartition("-")
        if epoch != self.epoch:
            for index, entry in enumerate(history):
                if entry.id == last_id:
                    return deque(itertools.islice(history, index + 1, None))
            return None
        # No int() of more digits than the sequence has (a client's id may
        # hold thousands: int() refuses those, and they cannot be ours).
        digits = number.isascii() and number.isdigit() and len(number) <= len(str(self.seq))
        if not digits or str(int(number)) != number:
            return None
        seq = int(number)
        oldest = self.seq - len(history) + 1  # the sequence number of history[0]
        if not oldest - 1 <= seq <= self.seq:
            return None
        return deque(itertools.islice(history, seq - oldest + 1, None))


def _wake(sub: _Subscriber) -> None:
    """Wake the reader of ``sub``, if it sleeps (on the path of every delivery
    to an idle stream: :func:`_complete`, spelled out)."""
    waiter = sub.waiter
    if waiter is not None:
        sub.waiter = None
        if not waiter.done():
            waiter.set_result(None)


def _deliver(subs: tuple[_Subscriber, ...], item: object, buffer: int) -> None:
    """Append ``item`` to every open subscriber's queue (on their loop's thread)."""
    for sub in subs:
        if sub.closed:
            continue
        queue = sub.queue
        if queue is None:
            if sub.one is _EMPTY:
                sub.one = item
                # A reader waits only on an empty stream: the first item wakes it.
                _wake(sub)
                continue
            queue = sub.queue = deque((sub.one,), maxlen=buffer)
            sub.one = _EMPTY
        if len(queue) == buffer:
            sub.lagged += 1  # the append below drops the oldest item
            sub.counts.dropped += 1
        queue.append(item)


def _deliver_group(
    plain: tuple[_Subscriber, ...], keyed: tuple[_Subscriber, ...], item: object, key: Hashable, buffer: int
) -> None:
    """Deliver ``item``, sent to ``key``, to one loop's subscribers of that
    key: as it is to single-key streams, as ``(key, item)`` to keyed ones."""
    if plain:
        _deliver(plain, item, buffer)
    if keyed:
        _deliver(keyed, (key, item), buffer)


def _end_group(plain: tuple[_Subscriber, ...], keyed: tuple[_Subscriber, ...], key: Hashable) -> None:
    """End the part ``key`` plays in one loop's subscribers of it: a stream
    ends (it drains what it holds, then stops) with its last key."""
    for sub in plain:
        sub.closed = True
        _wake(sub)
    for sub in keyed:
        assert isinstance(sub, _KeyedSubscriber), "regroup() puts only keyed subscribers here"
        sub.open.discard(key)
        if not sub.open:
            sub.closed = True
            _wake(sub)


def _pop(sub: _Subscriber) -> Any:
    """The one dequeue: remove and return the oldest record readable now, or
    _EMPTY. The backlog comes first; a drained deque is dropped."""
    queue = sub.backlog if sub.backlog is not None else sub.queue
    if queue is None:
        record = sub.one
        sub.one = _EMPTY
        return record
    assert sub.one is _EMPTY or sub.queue is None, "a lone item is held only while there is no queue"
    record = queue.popleft()
    if not queue:
        if queue is sub.backlog:
            sub.backlog = None
        else:
            sub.queue = None
    return record


def _pop_many(sub: _Subscriber, limit: int) -> list[Any]:
    """Up to ``limit`` records, as ``_pop`` would return them one by one, in
    order. Those queued in one deque are taken in one piece, all but the
    last, which ``_pop`` takes (it alone drops a drained deque)."""
    records: list[Any] = []
    while len(records) < limit:
        queue = sub.backlog if sub.backlog is not None else sub.queue
        if queue is not None and len(queue) > 1:
            records += [queue.popleft() for _ in range(min(limit - len(records), len(queue)) - 1)]
        record = _pop(sub)
        if record is _EMPTY:
            break
        records.append(record)
    return records


def _queued(sub: _Subscriber) -> int:
    """How many records ``sub`` holds."""
    return (sub.one is not _EMPTY) + (len(sub.queue) if sub.queue else 0) + (len(sub.backlog) if sub.backlog else 0)


def _report_lag(sub: _Subscriber, policy: LagPolicy) -> bool:
    """Count the items ``sub`` dropped since the last report as reported:
    Lagged under ``LagPolicy.ERROR``; True under END (the reader closes)."""
    missed = sub.lagged - sub.reported
    sub.reported = sub.lagged
    sub.counts.lag_reports += 1
    if policy is LagPolicy.ERROR:
        raise Lagged(missed)
    return policy is LagPolicy.END


def _discard(sub: _Subscriber) -> None:
    """Close ``sub`` for its reader, dropping what it holds (on its loop's thread)."""
    sub.closed = True
    sub.queue = sub.backlog = None
    sub.one = _EMPTY
    _wake(sub)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _run_on(
    loop: asyncio.AbstractEventLoop,
    running: asyncio.AbstractEventLoop | None,
    defer: bool,
    fn: Callable[..., None],
    *args: Any,
) -> bool:
    """Run ``fn(*args)`` on ``loop``'s thread: at once if ``loop`` is the
    ``running`` one (behind what is already queued there if ``defer``), else
    through ``call_soon_threadsafe``. False, doing nothing, if ``loop`` is
    closed (nobody can read its streams any more)."""
    if loop is not running:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that loop is closed
            return False
    elif defer:
        loop.call_soon(fn, *args)
    else:
        fn(*args)
    return True


def _on_loops(groups: Iterable[_Group], defer: bool, fn: Callable[..., None], *args: Any) -> int:
    """``fn(plain, keyed, *args)`` for each loop's subscribers, on that loop's
    thread (see :func:`_run_on`); how many subscribers were addressed."""
    running = _running_loop()
    count = 0
    for loop, plain, keyed, _ in groups:
        if _run_on(loop, running, defer, fn, plain, keyed, *args):
            count += len(plain) + len(keyed)
    return count


# ---------------------------------------------------------------------------
# The event-source contract
#
# What an SSE response reads its events from. BroadcastStream, replay() and
# _FedSource (a channel() closure, or any other async iterable, read in a task)
# implement it.
# ---------------------------------------------------------------------------


@runtime_checkable
class _EventSource(Protocol):
    """A source of events for an SSE response, read without waiting.

    The response reads in rounds: ``_take`` what can be read now; if nothing,
    ``_wait`` with a future and sleep until the source (or the client, or the
    clock) completes it; repeat. The response never cancels a read: the
    source's own waiting happens, if at all, in a task the source owns.
    """

    @property
    def gaps(self) -> tuple[Any, ...]:
        """The keys the source was asked to resume and could not: the client
        missed items of theirs that it cannot be given (``on_gap`` is then
        written first). Empty when it resumed or was not asked to."""
        ...

    def _take(self, limit: int) -> tuple[list[Any], list[str | None] | None, list[bytes] | None]:
        """Remove and return, oldest first, up to ``limit`` items that can be
        read now; their ids: None when the source writes no ids, else one per
        item (written with the item's frame unless its event carries that id
        already; None for an item written without one); and their ``event:``
        lines: None, or for a keyed source (its
        items are ``(key, event)`` pairs) one per item, naming the key, written
        when the response has no ``render``. Nothing readable yet: ``([],
        None, None)``.

        Raises:
            StopAsyncIteration: the source is exhausted.
            Exception: what the source fails with (``Lagged`` from a stream
                under ``LagPolicy.ERROR``, the error of a ``channel()``
                closure, ...); the response logs it and finishes cleanly.
        """
        ...

    def _wait(self, waiter: asyncio.Future[None]) -> None:
        """Complete ``waiter`` (if not done) as soon as ``_take`` may return
        something or end. Called only after ``_take`` returned nothing."""
        ...

    async def aclose(self) -> None:
        """Release everything the source holds (subscription, tasks);
        idempotent. Called once the response is over, whatever ended it."""
        ...


# ---------------------------------------------------------------------------
# The registry lock, and the concurrency model
#
# _RegistryLock is the one lock of a Broadcaster (below); streams hold it to
# leave their channel. The whole concurrency model of the module is here.
#
# Threads. Every Broadcaster method may be called from any thread. Each
# stream belongs to the event loop that subscribed it, and only that loop's
# thread touches its _Subscriber's delivery state (one, queue, backlog,
# lagged, reported, closed, waiter): deliveries and ends meant for it from
# any other thread are scheduled there with call_soon_threadsafe (_run_on).
# An SSE response, its Sender and its source's task are likewise touched
# only on the loop that runs the response.
#
# The lock guards the registry: the channels by key (_channels), each
# channel's members and history (with its seq and expiry), the grouping of
# members by loop (built under it), the lingering channels, _closed, the
# running channel() sources, appends to the keys changed for on_change, the
# open streams' count (_streams, and each subscriber's ``counted``), and the
# list of each thread's counts with the sum of the ended threads' (metrics()).
# It is held only for those updates. Under it run only: the keys' own
# __hash__ and __eq__ (dict lookups), and, with history, the scheduling of
# deliveries with call_soon(_threadsafe), on purpose: concurrent sends then
# queue up on every loop in the order of their ids. Deliveries themselves,
# ends and on_change run after it is released.
#
# Read without the lock, and why that is safe:
# - send() without history: _channels.get(key) and channel.groups. A dict
#   lookup is atomic, and groups is an immutable tuple that is replaced,
#   never changed: a send sees the grouping of just before or just after a
#   concurrent subscribe or leave, and either order is a valid one for a
#   send that races with it. A stream that left meanwhile is closed (_deliver
#   skips it) or unreachable (the item lands in a queue that nobody reads and
#   that is freed with it). A channel removed meanwhile only reaches streams
#   being ended: their ends are scheduled on the same loops after the
#   delivery, or have marked them closed already, and _deliver skips them.
#   (A keyed stream with other keys still open is not closed: it gets such
#   an item of the ended key, as if it had been sent just before the end.)
# - subscriber_count(): len(channel.members); __repr__: _closed and
#   len(_channels). Momentary values, as any count read by another thread is.
# - on_change's queue (_changed): appended under the lock, popped after its
#   release by whichever thread released it (deque pops are atomic).
# - The counts (_Counts): each is written by one thread only (the sending
#   thread's, found through a thread-local; a subscriber's and a group's are
#   those of the thread running their loop), and read by metrics() under the
#   lock as they are at that moment; no increment is lost.
# - The running SSE responses (_responses): each response adds itself and
#   discards itself, in its own thread; close() reads a copy and has each
#   one stopped on its own loop (_run_on), and a shutdown's wait keeps the
#   responses of its own loop. A response that starts after close() set
#   _closed stops itself; one that started before is in close()'s copy. A
#   set's add, discard and copy are atomic (under the GIL, and by the set's
#   own lock in free-threaded builds).
# - _signals_pending: a flag, set by close_on_signals() and cleared by the
#   response that chains the handlers (or by close()). The process's signal
#   chain (_CHAIN) guards its armed broadcasters with a lock of its own,
#   never taken in a signal handler; its handlers are installed and removed
#   in the main thread only. A handler runs in the main thread between two
#   bytecodes, possibly while that thread holds a lock, so it takes none: it
#   only schedules the shutdown on the loop (call_soon_threadsafe).
# With history, send() takes the lock: retaining an item, numbering it and
# choosing its recipients must be one step for resume to be exact.
#
# Leaving never waits for the lock. A stream leaves its channel through its
# weakref.finalize: run once by close() (or LagPolicy.END), or by the garbage
# collector when the stream is dropped unclosed - which may happen on any
# thread, at any allocation, even in a thread that holds the lock already.
# So the finalizer calls _RegistryLock.leave(sub), which queues sub and only
# tries to take the lock; whoever holds the lock does every queued leave
# (Broadcaster._leave) before releasing it, and checks the queue again
# after releasing, in case a leave was queued between its last look and the
# release. The path is: stream unreachable -> weakref.finalize ->
# _RegistryLock.leave -> Broadcaster._leave (lock held) -> the channel goes,
# or lingers with its history -> on_change after the release.
#
# Cancellations. The module cancels a task only after noting that it does,
# where the task's outcome will be read: a response detaches its pending
# receive() (_unwatch), _FedSource closes its Sender before cancelling its
# feeder, and a response notes why it abandons a send (_abandon) before
# cancelling the server's task out of it. A CancelledError without such a
# note is not ours: it propagates from the server's task, and it is the
# task's own failure anywhere else (_outcome turns it into a RuntimeError).
# AsgiClient, a test's client, runs each call of an app in one task, owned
# by the block that started it (a response's, or the client's for the
# lifespan): it awaits the task, and cancels it only past its bound or when
# that block is cancelled itself, noting it first (_AppCall.cancel).
# ---------------------------------------------------------------------------


class _RegistryLock:
    """The lock of one Broadcaster's registry; ``with lock:`` holds it.

    Its release first does the leaves queued meanwhile and expires the
    lingering channels whose time is over, then reports changed keys to
    ``on_change`` once the lock is free (see the concurrency model above).
    """

    __slots__ = ("_mutex", "_leaving", "_registry")

    def __init__(self, registry: Broadcaster[Any, Any]) -> None:
        self._mutex = threading.Lock()
        # Subscribers whose streams left; removed by the lock's next holder.
        self._leaving: deque[_Subscriber] = deque()
        self._registry = registry

    def __enter__(self) -> None:
        self._mutex.acquire()

    def leave(self, sub: _Subscriber) -> None:
        """Take ``sub`` out of its channel now, or as soon as the lock is free;
        never waits. Called only by a stream's ``weakref.finalize``."""
        self._leaving.append(sub)
        if self._mutex.acquire(blocking=False):
            self.__exit__()

    def __exit__(self, *exc_info: object) -> None:
        """The release: the leaves queued meanwhile and what is due are done
        first. (The checks before each call save a call per release: it is
        on the path of every subscribe and leave.)"""
        registry = self._registry
        while True:
            while self._leaving:
                registry._leave(self._leaving.popleft())  # pyright: ignore[reportPrivateUsage]
            if registry._lingering:  # pyright: ignore[reportPrivateUsage]
                registry._expire_lingering()  # pyright: ignore[reportPrivateUsage]
            self._mutex.release()
            if not self._leaving or not self._mutex.acquire(blocking=False):
                break
        if registry._changed:  # pyright: ignore[reportPrivateUsage]
            registry._report_changes()  # pyright: ignore[reportPrivateUsage]


# ---------------------------------------------------------------------------
# Streams
#
# BroadcastStream is what subscribe() returns: the reader's side of one
# _Subscriber, and an event source for response().
# ---------------------------------------------------------------------------


class BroadcastStream(_AsyncClosing, AsyncIterator[T_co], Generic[T_co]):
    """The items sent to one key, in send order; made by ``Broadcaster.subscribe``.

    An async iterator and an async context manager (leaving it closes it).
    Iteration stops after ``remove(key)`` or ``Broadcaster.close()`` once the
    buffered items are read, at once after ``close()``/``aclose()``, and at the
    next read after a loss under ``LagPolicy.END``.

    Cancellation: ``__anext__`` either returns an item or raises; cancelling a
    task blocked in it removes nothing from the buffer and leaves the stream
    usable.

    A stream belongs to the event loop that created it; read it there only.
    """

    __slots__ = ("_sub", "_policy", "_finalizer", "_entries", "_resumed", "_last", "__weakref__")

    def __init__(
        self,
        sub: _Subscriber,
        lock: _RegistryLock,
        entries: bool,
        resumed: bool | None,
    ) -> None:
        self._sub = sub
        self._policy = LagPolicy.ERROR
        # With history the queues hold _Entry objects: the stream yields their
        # items and keeps the last entry read (for its id).
        self._entries = entries
        self._resumed = resumed
        self._last: _Entry | None = None
        # Leaving the channel happens exactly once: at close(), or when the
        # stream is garbage-collected. The finalizer holds ``sub``, never self.
        self._finalizer = weakref.finalize(self, _RegistryLock.leave, lock, sub)
        self._finalizer.atexit = False

    # -- reading ----------------------------------------------------------------

    def on_lag(self: _S, policy: LagPolicy) -> _S:
        """Set what the next read does after items were dropped; returns self."""
        self._policy = _check_type("policy", policy, LagPolicy, "a LagPolicy")
        return self

    def __aiter__(self: _S) -> _S:
        return self

    async def __anext__(self) -> T_co:
        sub = self._sub
        while True:
            if sub.lagged != sub.reported:
                self._report_lag()
            # Looked at before the call: a reader that finds its stream empty
            # (the most common read of all) pays no call.
            if sub.one is not _EMPTY or sub.queue is not None or sub.backlog is not None:
                record = _pop(sub)
                if self._entries:
                    self._last = record
                    record = record.item
                item: T_co = record
                return item
            if sub.closed:
                raise StopAsyncIteration
            waiter = sub.waiter = sub.loop.create_future()
            try:
                await waiter
            finally:
                if sub.waiter is waiter:
                    sub.waiter = None

    # -- what it is -------------------------------------------------------------

    @property
    def key(self) -> Hashable:
        """The key this stream was subscribed to."""
        return self._sub.key

    @property
    def lagged(self) -> int:
        """Running total of items dropped because this stream was full."""
        return self._sub.lagged

    @property
    def queued(self) -> int:
        """Items delivered to this stream (or replayed to it) and not read yet."""
        return _queued(self._sub)

    @property
    def resumed(self) -> bool | None:
        """Whether ``subscribe(key, last_event_id=...)`` could resume: True if the
        stream replays everything after that id, False if it could not (unknown
        or too old an id: tell the client to reload its state), None if no id
        was given."""
        return self._resumed

    @property
    def gaps(self) -> tuple[Hashable, ...]:
        """``(key,)`` when ``resumed`` is False, else ``()``: the keys whose
        missed items could not be replayed (as for :class:`KeyedStream`)."""
        return (self._sub.key,) if self._resumed is False else ()

    @property
    def last_event_id(self) -> str | None:
        """The id of the last item this stream yielded (None without history)."""
        return None if self._last is None else self._last.id

    @property
    def closed(self) -> bool:
        """True once no item will be added to this stream: at once after its
        own ``close()``; at the read that finds a loss under ``LagPolicy.END``;
        after ``remove(key)`` or ``Broadcaster.close()``, once the end has
        reached the stream's loop (at once when called on that loop without
        history; with history, behind the deliveries already scheduled
        there). Items delivered before may still be read (see ``queued``):
        iteration stops once they are."""
        return self._sub.closed

    def __repr__(self) -> str:
        sub = self._sub
        state = "closed" if sub.closed else "open"
        return f"<BroadcastStream key={sub.key!r} {state} queued={self.queued} lagged={sub.lagged}>"

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Leave the channel now and discard what is buffered. Idempotent."""
        _discard(self._sub)
        self._finalizer()

    async def aclose(self) -> None:
        """The same as :meth:`close`, for ``contextlib.aclosing`` and friends."""
        self.close()

    # -- internals: the event-source contract -----------------------------------

    def _report_lag(self) -> None:
        """Apply the lag policy to the items dropped since the last report."""
        if _report_lag(self._sub, self._policy):
            self.close()

    def _take(self, limit: int) -> tuple[list[Any], list[str] | None, None]:
        """The event-source read (see :class:`_EventSource`): the lag policy
        applies first, as at ``__anext__``; then the records ``_pop`` would
        return, in order."""
        sub = self._sub
        if sub.lagged != sub.reported:
            self._report_lag()
        records = _pop_many(sub, limit)
        if not records:
            if sub.closed:
                raise StopAsyncIteration
            return records, None, None
        if not self._entries:
            return records, None, None
        self._last = records[-1]
        return [entry.item for entry in records], [entry.id for entry in records], None

    def _wait(self, waiter: asyncio.Future[None]) -> None:
        self._sub.waiter = waiter


class _Part:
    """One broadcaster's share of a :class:`KeyedStream`: a subscriber in the
    channels of some of its keys, and with history the position the reader
    has reached in each key. Leaves its channels through its own
    ``weakref.finalize``, as a stream does."""

    __slots__ = ("sub", "entries", "names", "lines", "prefixes", "marks", "finalizer", "__weakref__")

    def __init__(
        self,
        sub: _KeyedSubscriber,
        lock: _RegistryLock,
        names: dict[Hashable, str],
        positions: dict[Hashable, str] | None,
    ) -> None:
        self.sub = sub
        # With history the records are (key, _Entry) pairs, else (key, item).
        self.entries = positions is not None
        self.names = names
        # What a response writes by default to name the key of an event.
        self.lines = {key: f"event: {name}\n".encode() for key, name in names.items()}
        # With history, per key: "<name>=" and "<name>=<id>", escaped.
        self.prefixes = {key: _escape(name) + "=" for key, name in names.items()} if positions is not None else {}
        self.marks = {key: self.prefixes[key] + _escape(id) for key, id in positions.items()} if positions else {}
        self.finalizer = weakref.finalize(self, _RegistryLock.leave, lock, sub)
        self.finalizer.atexit = False

    def read(self, key: Hashable, record: Any) -> Any:
        """The item of one of this part's records, as ``(key, item)``, the
        item as it was sent; with history the key's position moves to its id."""
        if self.entries:
            self.marks[key] = self.prefixes[key] + _escape(record.id)
            return key, record.bare
        return key, record


class KeyedStream(_AsyncClosing, AsyncIterator[tuple[K_co, T_co]], Generic[K_co, T_co]):
    """The items sent to several keys, as ``(key, item)`` pairs, in the order
    they reached the stream; made by ``Broadcaster.subscribe_many`` (and
    combined across broadcasters by :func:`merge`).

    The items of one key come in send order. The stream is a member of every
    key's channel, as a stream from ``subscribe`` would be (``send`` counts it
    once per key), and leaves them all at once: at ``close()``, at a loss
    under ``LagPolicy.END``, or when it is garbage-collected. ``remove(key)``
    ends that key's part only: the stream goes on with its other keys (see
    ``keys``) and stops once every key has ended and what they delivered is
    read. The broadcaster's ``buffer`` bounds the whole stream (each
    broadcaster's, after ``merge``): under a burst on one key, the oldest
    items of any key are dropped first.

    Items come as they were sent: an Event does not carry the id its key gave
    it. With history, ``last_event_id`` names the position reached in every
    key: resuming from it with ``subscribe_many(keys, last_event_id=...)`` replays,
    per key, exactly what came after. A response writes it as each event's
    id. Cancellation, threads and loops: as for :class:`BroadcastStream`.
    """

    __slots__ = ("_parts", "_reading", "_policy", "_resumed", "_gaps", "_turn", "__weakref__")

    def __init__(self, parts: list[_Part], resumed: bool | None, gaps: tuple[Hashable, ...]) -> None:
        self._parts = parts
        # The parts not exhausted yet; and the one the next read starts at
        # (in turn, so that a busy key of one broadcaster cannot starve the
        # others).
        self._reading = list(parts)
        self._turn = 0
        self._policy = LagPolicy.ERROR
        self._resumed = resumed
        self._gaps = gaps

    # -- reading ----------------------------------------------------------------

    def on_lag(self: _KS, policy: LagPolicy) -> _KS:
        """Set what the next read does after items were dropped; returns self."""
        self._policy = _check_type("policy", policy, LagPolicy, "a LagPolicy")
        return self

    def __aiter__(self: _KS) -> _KS:
        return self

    async def __anext__(self) -> tuple[K_co, T_co]:
        while True:
            reading = self._reading
            for part in reading:  # before anything is taken, as in _take
                sub = part.sub
                if sub.lagged != sub.reported:
                    self._report_lag(sub)
            if len(reading) == 1:  # the common case, spelled out
                part = reading[0]
                sub = part.sub
                if sub.one is not _EMPTY or sub.queue is not None or sub.backlog is not None:
                    return cast("tuple[K_co, T_co]", part.read(*_pop(sub)))
            count = len(reading)
            for turn in range(self._turn, self._turn + count):
                part = reading[turn % count]
                sub = part.sub
                if sub.one is not _EMPTY or sub.queue is not None or sub.backlog is not None:
                    self._turn = turn + 1
                    return cast("tuple[K_co, T_co]", part.read(*_pop(sub)))
            # Nothing to read: the closed parts are exhausted.
            self._reading = [part for part in self._reading if not part.sub.closed]
            if not self._reading:
                raise StopAsyncIteration
            waiter = self._parts[0].sub.loop.create_future()
            self._wait(waiter)
            try:
                await waiter
            finally:
                for part in self._parts:
                    if part.sub.waiter is waiter:
                        part.sub.waiter = None

    # -- what it is -------------------------------------------------------------

    @property
    def keys(self) -> tuple[K_co, ...]:
        """The keys whose part has not ended (by ``remove(key)`` or
        ``Broadcaster.close()``), in the order given. Closing the stream
        ends none: this tells what the registry ended."""
        keys = [key for part in self._parts for key in part.sub.all_keys() if key in part.sub.open]
        return cast("tuple[K_co, ...]", tuple(keys))

    @property
    def resumed(self) -> bool | None:
        """Whether ``subscribe_many(keys, last_event_id=...)`` could resume: True
        if it replays what came after that id in every key, False if some key
        could not (see ``gaps``), None if no id was given."""
        return self._resumed

    @property
    def gaps(self) -> tuple[K_co, ...]:
        """The keys that could not resume, in the order given: the id named no
        position in them (a key added since, an id of another stream, or a
        malformed one), or one that their channel cannot resume from (unknown,
        or older than its history), or their broadcaster keeps no history.
        The client should reload their state; ``response(..., on_gap=...)``
        can tell it which. Empty when ``resumed`` is not False."""
        return cast("tuple[K_co, ...]", self._gaps)

    @property
    def last_event_id(self) -> str | None:
        """The position reached in every key with history, as an id to resume
        from (see the class docstring); None when no key has history."""
        return self._id() if any(part.entries for part in self._parts) else None

    @property
    def lagged(self) -> int:
        """Running total of items dropped because this stream was full."""
        return sum(part.sub.lagged for part in self._parts)

    @property
    def queued(self) -> int:
        """Items delivered to this stream (or replayed to it) and not read yet."""
        return sum(_queued(part.sub) for part in self._parts)

    @property
    def closed(self) -> bool:
        """True once no item will be added to this stream: after its own
        ``close()``, a loss under ``LagPolicy.END``, or once every key has
        ended (see :attr:`BroadcastStream.closed` for when an end is seen).
        Items delivered before may still be read (see ``queued``)."""
        return all(part.sub.closed for part in self._parts)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<KeyedStream keys={list(self.keys)!r} {state} queued={self.queued} lagged={self.lagged}>"

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Leave every channel now and discard what is buffered. Idempotent."""
        self._reading = []
        for part in self._parts:
            _discard(part.sub)
            part.finalizer()

    async def aclose(self) -> None:
        """The same as :meth:`close`, for ``contextlib.aclosing`` and friends."""
        self.close()

    # -- internals: the event-source contract -----------------------------------

    def _report_lag(self, sub: _Subscriber) -> None:
        """Apply the lag policy to the items ``sub`` dropped since the last report."""
        if _report_lag(sub, self._policy):
            self.close()

    def _take(self, limit: int) -> tuple[list[Any], list[str | None] | None, list[bytes] | None]:
        """The event-source read (see :class:`_EventSource`): the lag policy
        of every part first, then from each part in turn its records in
        order, until ``limit``. Each item's id is the stream's id once it is
        read (when some key has history)."""
        reading = self._reading
        if not reading:
            raise StopAsyncIteration
        for part in reading:  # before anything is taken, so that Lagged loses nothing
            if part.sub.lagged != part.sub.reported:
                self._report_lag(part.sub)
        with_ids = any(part.entries for part in self._parts)
        items: list[Any] = []
        item_ids: list[str | None] = []
        lines: list[bytes] = []
        start = self._turn % len(reading)
        self._turn = start + 1
        for part in reading[start:] + reading[:start]:
            for key, record in _pop_many(part.sub, limit - len(items)):
                items.append(part.read(key, record))
                lines.append(part.lines[key])
                if with_ids:  # an item without history moves no position: no id
                    item_ids.append(self._id() if part.entries else None)
            if len(items) == limit:
                break
        # A part is exhausted once closed and drained.
        self._reading = [part for part in self._reading if not part.sub.closed or _queued(part.sub)]
        if not items:
            if not self._reading:
                raise StopAsyncIteration
            return items, None, None
        return items, (item_ids if with_ids else None), lines

    def _id(self) -> str:
        """The position in every key with history, as an id."""
        return ",".join(mark for part in self._parts for mark in part.marks.values())

    def _wait(self, waiter: asyncio.Future[None]) -> None:
        for part in self._reading:
            part.sub.waiter = waiter


@overload
def merge(first: KeyedStream[K, T], /) -> KeyedStream[K, T]: ...


@overload
def merge(first: KeyedStream[K, T], second: KeyedStream[K2, T2], /) -> KeyedStream[K | K2, T | T2]: ...


@overload
def merge(
    first: KeyedStream[K, T], second: KeyedStream[K2, T2], third: KeyedStream[K3, T3], /
) -> KeyedStream[K | K2 | K3, T | T2 | T3]: ...


@overload
def merge(*streams: KeyedStream[Any, Any]) -> KeyedStream[Any, Any]: ...


def merge(*streams: KeyedStream[Any, Any]) -> KeyedStream[Any, Any]:
    """One stream of the items of ``streams`` (of several broadcasters, or of
    one), for one response: each keeps its keys, buffer and history, and the
    merged stream's id names the position in every key that has history,
    so resuming each of them with that id (``subscribe_many(keys,
    last_event_id=id)`` on its broadcaster) is exact per key. Give the
    broadcasters without history no id: they cannot resume, so every key of
    theirs would be a gap.

    The streams given are taken over: they are empty afterwards; read and
    close the merged one. Keys of streams without history may repeat across
    them (their events then come once per stream); with the default
    rendering, keys of one name look alike to the client: give such a
    response a ``render``. Its lag policy is ERROR until ``on_lag``. Its
    ``resumed`` is None if no stream was given an id, else False if any
    stream has gaps; ``gaps`` lists them all.

    Raises:
        TypeError: an argument that is not a KeyedStream.
        ValueError: no stream, one given twice or already merged, streams of
            different event loops, more than 100 keys in all, or two keys
            with history of the same name (their positions would clash in
            the id), or keys whose id could exceed 8,192 bytes.
    """
    if not streams:
        raise ValueError("merge() needs at least one stream")
    for stream in streams:
        _check_type("merge() argument", stream, KeyedStream, "a KeyedStream")
    if len({id(stream) for stream in streams}) != len(streams) or not all(s._parts for s in streams):  # pyright: ignore[reportPrivateUsage]
        raise ValueError("each stream may be merged once: it is empty afterwards")
    parts = [part for stream in streams for part in stream._parts]  # pyright: ignore[reportPrivateUsage]
    if len({part.sub.loop for part in parts}) != 1:
        raise ValueError("merge() takes streams of one event loop")
    count = sum(len(part.names) for part in parts)
    if count > _MAX_KEYS:
        raise ValueError(f"a stream takes at most {_MAX_KEYS} keys, got {count}")
    names = [name for part in parts if part.entries for name in part.names.values()]
    if len(set(names)) != len(names):
        raise ValueError(f"keys with history need distinct names across the merged streams: {sorted(names)!r}")
    if names:
        _check_id_room(names)
    states = [stream.resumed for stream in streams]
    resumed = None if all(state is None for state in states) else False not in states
    gaps = tuple(key for stream in streams for key in stream.gaps)
    for stream in streams:
        stream._parts, stream._reading = [], []  # pyright: ignore[reportPrivateUsage]
    return KeyedStream(parts, resumed, gaps)


# ---------------------------------------------------------------------------
# The registry: Broadcaster
#
# The public registry. It builds the responses and sources of the sections
# below it (response(), channel()), which call back into it: the one cycle
# between sections.
# ---------------------------------------------------------------------------


# What response() writes first for a source that could not resume some keys:
# an event, or a function of those keys (a tuple) that makes one.
_OnGap: TypeAlias = Event | Callable[[tuple[Any, ...]], Event] | None


@dataclasses.dataclass(frozen=True, slots=True)
class Metrics:
    """What ``Broadcaster.metrics()`` saw: numbers to watch, since the
    broadcaster was made (totals) or at that moment (the others).

    Attributes:
        channels: keys with a stream now.
        lingering: keys without a stream whose history is kept for a while.
        streams: streams open now (a keyed stream counts once).
        sends: ``send()`` calls (total).
        deliveries: items handed to streams: each send counts the streams it
            addressed (total).
        dropped: items dropped from a full stream's buffer (total).
        lag_reports: times a stream's lag policy acted on a loss: raised
            ``Lagged``, ended the stream, or went on silently (total).
        resumes: subscriptions given a last event id that resumed exactly.
        gaps: subscriptions given a last event id that could not (in some
            key, for a keyed stream).
        responses_open: SSE responses of ``response()`` and ``channel()``
            running now (a ``HEAD`` counts too, and ends as ``source_done``).
        responses_ended: responses that finished, by how (totals):
            ``source_done`` (the stream or closure ended), ``client_gone``,
            ``send_timeout``, ``lag`` (``Lagged``), ``error`` (the source, a
            render, ``send()`` or ``receive()`` raised), ``shutdown`` (ended
            by ``close()``), ``cancelled`` (the server cancelled it).
        bytes_written: body bytes the responses handed to the server (total).
    """

    channels: int
    lingering: int
    streams: int
    sends: int
    deliveries: int
    dropped: int
    lag_reports: int
    resumes: int
    gaps: int
    responses_open: int
    responses_ended: Mapping[str, int]
    bytes_written: int


class Broadcaster(Generic[K, T]):
    """A registry of broadcast channels, one per key; see the module docstring.

    Args:
        buffer: how many unread items each stream holds before the oldest is
            dropped (>= 1). It also bounds the queue of a ``channel()`` response.
        config: how the SSE responses behave (default ``SseConfig()``).
        history: how many recent items each channel keeps, with ids, for
            ``subscribe(key, last_event_id=...)`` to resume from; 0 (the
            default) keeps none and assigns no ids.
        linger: with history, how many seconds a channel whose last stream
            left keeps its history for a reconnecting client before it goes.
        max_streams, max_streams_per_key, max_keys: admission limits (None:
            none): the streams open at once, those of one key, and the
            channels (keys with a stream or a lingering history). A
            subscription past one raises :class:`StreamLimit` or
            :class:`KeyLimit` and changes nothing. A keyed stream counts once
            in ``max_streams`` and once in each of its keys.
        on_change: called with a key each time it gains a channel (its first
            subscribe) or loses it (last stream gone, linger over, ``remove``,
            ``close``), so a bridge to another transport can follow exactly the
            keys this process serves. It is a hint, not a log: it runs after
            the change, in whichever thread made it (possibly inside the garbage
            collector, finalizing a stream), and calls from several threads may
            arrive out of order, so it should re-read the state (``key in b``)
            on its own loop, e.g. through ``loop.call_soon_threadsafe``.
            Exceptions it raises are logged and dropped.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``buffer < 1``, ``history < 0``, a limit below 1, or
            ``linger`` not a positive finite number.
    """

    def __init__(
        self,
        buffer: int = 64,
        config: SseConfig | None = None,
        *,
        history: int = 0,
        linger: float = 30.0,
        max_streams: int | None = None,
        max_streams_per_key: int | None = None,
        max_keys: int | None = None,
        on_change: Callable[[K], object] | None = None,
    ) -> None:
        self._buffer: Final = _check_int("buffer", buffer, 1)
        self._config: Final = (
            SseConfig() if config is None else _check_type("config", config, SseConfig, "an SseConfig")
        )
        self._history: Final = _check_int("history", history, 0)
        self._linger: Final = cast("float", _check_seconds("linger", linger))
        limits = {"max_streams": max_streams, "max_streams_per_key": max_streams_per_key, "max_keys": max_keys}
        self._limits: Final = {name: _check_int(name, value, 1) for name, value in limits.items() if value is not None}
        _check_callable("on_change", on_change, optional=True)
        self._on_change: Final = on_change
        self._lock: Final = _RegistryLock(self)
        # Everything below is guarded by _lock; see the concurrency model.
        # The channels by key (keyed by K; typed Hashable so that a
        # subscriber's key indexes it too).
        self._channels: dict[Hashable, _Channel] = {}
        self._streams = 0  # open streams (a keyed stream counts once)
        # Each thread's counts (see _Counts): its own through _local; the
        # live threads' (with the thread) and the sum of those that ended,
        # for metrics(), which folds an ended thread's into that sum.
        self._local = threading.local()
        self._all_counts: list[tuple[weakref.ref[threading.Thread], _Counts]] = []
        self._retired = _Counts()
        self._closed = False
        # Channels with history and no members, by key, in expiry order (every
        # channel lingers equally long); expired whenever the lock is released.
        self._lingering: dict[Hashable, _Channel] = {}
        # The running channel() responses, for close() to end.
        self._sources: set[_FedSource] = set()
        # Not guarded by the lock (see the concurrency model): the running SSE
        # responses, for close() to stop and a shutdown to wait for; and
        # whether close_on_signals() armed it and no response in the main
        # thread has chained the signal handlers since.
        self._responses: set[_SseResponse] = set()
        self._signals_pending = False
        # Keys whose channel appeared or went, for on_change (appended with
        # the lock held, handed to on_change after it is released).
        self._changed: deque[Any] = deque()  # of K

    # -- the registry ---------------------------------------------------------

    def subscribe(self, key: K, last_event_id: str | None = None) -> BroadcastStream[T]:
        """A new stream of every item sent to ``key`` from now on.

        Creates the key's channel if it has none. After ``close()`` the stream is
        returned already closed (it yields nothing), so a request that arrives
        during shutdown ends cleanly instead of failing.

        With ``last_event_id`` (the id of the last item the client got, as from
        :func:`last_event_id`), a broadcaster with history first yields the
        retained items sent after it, then live ones: no gap, no duplicate, even
        with concurrent sends. ``stream.resumed`` tells whether that worked: it
        is False when the id is unknown (another channel lifetime or process, or
        a broadcaster without history) or older than the retained history, and
        the stream then just goes on live; None without ``last_event_id``.

        Raises:
            RuntimeError: no event loop is running in this thread.
            TypeError: ``key`` is not hashable, or ``last_event_id`` not a str.
            StreamLimit, KeyLimit: an admission limit is reached (nothing
                changed).
        """
        if last_event_id is not None:
            _check_type("last_event_id", last_event_id, str, "a str or None")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("Broadcaster.subscribe() needs a running event loop: call it from async code") from None
        hash(key)
        counts = self._counts()
        sub = _Subscriber(key, loop, counts=counts)
        resumed: bool | None = None if last_event_id is None else False
        with self._lock:
            if self._lingering:  # a channel whose linger is over is not revived
                self._expire_lingering()
            if self._closed:
                sub.closed = True
            else:
                if self._limits:
                    self._admit((key,))
                self._count(sub)
                channel = self._join(key, sub)
                if last_event_id is not None and channel.history is not None:
                    # Under the lock, as send() retains and picks recipients
                    # under it: every later entry reaches this stream live,
                    # every earlier one is in the backlog.
                    backlog = channel.after(last_event_id)
                    if backlog is not None:
                        sub.backlog = backlog or None  # None: nothing to replay
                        resumed = True
                if resumed is not None:
                    counts.resumes += resumed
                    counts.gaps += not resumed
        return BroadcastStream(sub, self._lock, self._history > 0, resumed)

    def subscribe_many(
        self,
        keys: Iterable[K],
        last_event_id: str | None = None,
        *,
        name: Callable[[K], str] = str,
    ) -> KeyedStream[K, T]:
        """One stream of every item later sent to any of ``keys``, as ``(key,
        item)`` pairs: one connection for many keys (see :class:`KeyedStream`).

        Creates the keys' channels as ``subscribe`` does, all at once. Each key
        has a name, ``name(key)`` (``str(key)`` by default): a response writes
        it as each event's type (``event:``) unless it has a ``render``, and,
        with history, the stream's ids name each key's position by it. Names
        must be non-empty, one line, distinct, and the same for a key in every
        process and after every restart (``str`` of a str, an int or a UUID
        is).

        With ``last_event_id`` (a ``KeyedStream.last_event_id`` the client
        got, as from :func:`last_event_id`) and history, every key whose
        position the id names, and whose channel still has what came after
        it, first yields that, then live items: no gap and no duplicate in any
        key, even with concurrent sends. The others go on live and are listed
        in ``stream.gaps`` (``resumed`` is then False): the client should
        reload them. An id that is not one of a keyed stream, malformed or too
        long, is a gap for every key, not an error.

        At most 100 keys, and (with history) no more than fit an 8,192-byte id:
        each key takes its escaped name plus 50 bytes.

        Raises:
            RuntimeError: no event loop is running in this thread.
            TypeError: ``keys`` a str, bytes or not iterable, a key not
                hashable, ``name`` not callable or returning a non-str,
                ``last_event_id`` not a str.
            ValueError: no keys, more than 100, the same key twice, a name
                that is empty, not one line, or the same as another's, or keys
                whose id could exceed 8,192 bytes.
            StreamLimit, KeyLimit: an admission limit is reached (nothing
                changed).
        """
        names = _check_keys(keys, name)
        if self._history:
            _check_id_room(names.values())
        if last_event_id is not None:
            _check_type("last_event_id", last_event_id, str, "a str or None")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "Broadcaster.subscribe_many() needs a running event loop: call it from async code"
            ) from None
        # Read before taking the lock: bounded work, whatever the client sent.
        wanted = None if last_event_id is None else parse_positions(last_event_id)
        counts = self._counts()
        sub = _KeyedSubscriber(tuple(names), loop, counts=counts, open=set(names))
        positions: dict[Hashable, str] | None = {} if self._history else None
        resumable: list[Hashable] = []
        with self._lock:
            if self._lingering:  # a channel whose linger is over is not revived
                self._expire_lingering()
            if self._closed:
                sub.closed = True
                sub.open.clear()
                positions = None
            else:
                if self._limits:
                    self._admit(names)
                self._count(sub)
                backlog: list[tuple[Hashable, _Entry]] = []
                for key, key_name in names.items():
                    channel = self._join(key, sub)
                    if positions is None:
                        continue
                    # Under the lock, as for subscribe(): exact per key.
                    last = None if wanted is None else wanted.get(key_name)
                    after = None if last is None else channel.after(last)
                    positions[key] = channel.position() if last is None or after is None else last
                    if after is not None:
                        resumable.append(key)
                        backlog += [(key, entry) for entry in after]
                sub.backlog = deque(backlog) if backlog else None
        gaps = () if last_event_id is None else tuple(key for key in names if key not in resumable)
        resumed = None if last_event_id is None else not gaps
        if resumed is not None and sub.counted:  # (not after close())
            counts.resumes += resumed
            counts.gaps += not resumed
        return KeyedStream([_Part(sub, self._lock, names, positions)], resumed, gaps)

    def send(self, key: K, item: T, *, id: str | None = None) -> int:
        """Deliver ``item`` to every current subscriber of ``key``; never waits.

        Returns how many subscribers it addressed (0, creating nothing, for a key
        without subscribers). Safe from any thread: subscribers on another loop
        than the caller's get the item through ``call_soon_threadsafe`` (those
        of a closed loop are skipped and not counted).

        With history, the item is also retained under a new id, even when the
        key's channel has no stream left but still lingers; the deliveries then
        go through every stream's loop, in id order. ``id`` replaces the
        assigned id: for ids from elsewhere, such as a bridge relaying another
        process's sends (they must increase; they are matched exactly on resume).

        Raises:
            ValueError: ``id`` without history, holding CR, LF or NUL, or
                longer than 48 bytes once percent-escaped.
        """
        if self._history:
            if id is not None:
                _utf8("id", _check_field("id", id))
                if len(_escape(id)) > _MAX_KEY_ID:
                    raise ValueError(
                        f"id must take at most {_MAX_KEY_ID} bytes once percent-escaped (the id of a "
                        f"keyed stream holds one per key): {id!r}"
                    )
            addressed, counts = self._send_with_history(key, item, id), self._counts()
        elif id is not None:
            raise ValueError("send(id=...) needs a broadcaster with history")
        # Without the lock: see the concurrency model. Counted into the counts
        # of the sending thread (see _Counts).
        elif (channel := self._channels.get(key)) is None:
            addressed, counts = 0, self._counts()
        else:
            groups = channel.groups
            if groups is None:
                with self._lock:
                    groups = channel.regroup()
            if len(groups) == 1 and groups[0][0] is _running_loop():
                # The common case, spelled out (it saves a third of a send to
                # one stream): every subscriber is on the caller's loop, whose
                # thread's counts the group holds.
                _, plain, keyed, counts = groups[0]
                if plain:
                    _deliver(plain, item, self._buffer)
                if keyed:
                    _deliver(keyed, (key, item), self._buffer)
                addressed = len(plain) + len(keyed)
            else:
                addressed, counts = _on_loops(groups, False, _deliver_group, item, key, self._buffer), self._counts()
        counts.sends += 1
        counts.deliveries += addressed
        return addressed

    def subscriber_count(self, key: K) -> int:
        """How many streams are subscribed to ``key`` (0 if it has no channel)."""
        channel = self._channels.get(key)
        return 0 if channel is None else len(channel.members)

    def remove(self, key: K) -> None:
        """End every stream of ``key`` once it drains what it was sent, and forget
        the channel and its history at once. A later ``subscribe(key)`` makes a
        fresh one. No-op for a key without a channel."""
        with self._lock:
            channel = self._channels.pop(key, None)
            self._lingering.pop(key, None)
            if channel is not None:
                self._record_change(key)
        if channel is not None:
            self._end_channel(key, channel)

    def close(self) -> None:
        """End every stream of every key (each drains first) and every running
        response (each writes what its source holds, then ends cleanly, even
        one that also reads streams of another broadcaster), and refuse new
        ones: later ``subscribe`` calls return closed streams, ``send``
        returns 0. Idempotent.

        Thread-safe, but not for a signal handler: one runs in the middle of
        whatever the main thread was doing, possibly holding the registry lock.
        From a handler, ``loop.call_soon_threadsafe(broadcaster.close)``.
        """
        with self._lock:
            self._closed = True
            channels = list(self._channels.items())
            for key in self._channels:
                self._record_change(key)
            self._channels.clear()
            self._lingering.clear()
            sources, self._sources = self._sources, set()
        for key, channel in channels:
            self._end_channel(key, channel)
        running = _running_loop()
        for source in sources:
            assert source.loop is not None, "a tracked source has started on a loop"
            _run_on(source.loop, running, False, source.end)
        for response in list(self._responses):
            # Behind what is queued on its loop: deliveries and ends made just before.
            _run_on(response._loop, running, True, response._stop)  # pyright: ignore[reportPrivateUsage]
        self._signals_pending = False
        _CHAIN.disarm(self)

    # -- shutdown on a signal -------------------------------------------------

    def close_on_signals(self, *, timeout: float = 1.0) -> None:
        """Make SIGINT and SIGTERM (Ctrl-C, a service manager's or a
        container's stop) end every SSE response of this broadcaster cleanly,
        so that the server's graceful shutdown ends at once instead of waiting
        for ever for streams that never finish.

        Call it once, anywhere, best at module level next to the broadcaster
        (a lifespan does not run under every server: daphne has none). It
        only arms: the first response of an armed broadcaster that runs in
        the main thread puts a handler in front of the server's own handler of
        each signal (the server installed its handlers before serving
        anything, and until a response runs there is nothing to end). On a
        signal that handler has the event loop close every armed broadcaster
        (every stream ends; each response writes what it was sent and its end
        of body), wait until their responses on that loop have returned (at
        most the largest ``timeout`` of them, plus 50 ms for the server to
        write what they sent), then pass the signal on to the server's
        handler, once. Closing the last armed broadcaster gives the signals
        back to the server's handlers, so a second Ctrl-C during the wait
        goes straight to the server.

        Held back this way: servers that handle the signals with Python
        handlers, as uvicorn and daphne do (daphne needs the wait: its
        handler cancels every running response). A server that handles them
        in asyncio (granian's workers, hypercorn's command line) gets them
        at once, but the close runs first, so its graceful shutdown finds the
        streams ending. ``hypercorn.asyncio.serve()`` installs no handler:
        give it :meth:`shutdown_trigger`. Left alone, as chaining would
        change what the signal does: a signal whose handler is not a Python
        function (its default action, or a handler set in C) or is Python's
        own (``KeyboardInterrupt``, or ``asyncio.run``'s); and everything
        outside the main thread, where Python runs no handler.

        Raises:
            TypeError, ValueError: ``timeout`` is not a positive, finite
                number of seconds.
        """
        _CHAIN.arm(self, cast("float", _check_seconds("timeout", timeout)))
        self._signals_pending = True

    async def shutdown_trigger(self, timeout: float = 1.0) -> None:
        """Return once SIGINT or SIGTERM has arrived, this broadcaster is
        closed and its responses running on this loop have returned (waited
        for at most ``timeout`` seconds): for a server that takes a shutdown
        trigger, like hypercorn's ``serve(app, config,
        shutdown_trigger=b.shutdown_trigger)``.

        The signals are handled with ``loop.add_signal_handler`` until the
        first one arrives; a second one then has its default effect (a second
        Ctrl-C ends the process). Unix only, as asyncio's signal handling is.

        Raises:
            TypeError, ValueError: ``timeout`` is not a positive, finite
                number of seconds.
        """
        timeout = cast("float", _check_seconds("timeout", timeout))
        loop = asyncio.get_running_loop()
        signalled: asyncio.Future[None] = loop.create_future()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, _complete, signalled)
        try:
            await signalled
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
        self.close()
        await _responses_ended((self,), timeout)

    # -- SSE responses --------------------------------------------------------

    @overload
    def response(self, events: AsyncIterable[Event], *, on_gap: _OnGap = None) -> ASGIApp: ...

    @overload
    def response(self, events: KeyedStream[Any, Event], *, on_gap: _OnGap = None) -> ASGIApp: ...

    @overload
    def response(self, events: AsyncIterable[S], render: Callable[[S], Event], *, on_gap: _OnGap = None) -> ASGIApp: ...

    def response(
        self,
        events: AsyncIterable[Any],
        render: Callable[[Any], Event] | None = None,
        *,
        on_gap: _OnGap = None,
    ) -> ASGIApp:
        """An ASGI app that streams ``events`` as ``text/event-stream``.

        ``render`` maps each item to its :class:`Event` (needed unless the items
        are Events, or ``events`` is a :class:`KeyedStream` of Events: each is
        then written with its key's name as its type, ``event: <name>``).
        When ``events`` carries ids (a stream of a broadcaster with history,
        or ``replay()`` over one), each event is written with its item's id
        (replacing any id of its own), so the client's ``Last-Event-ID``
        resumes it. ``on_gap``, if given, is written first when ``events``
        could not resume some keys (its ``gaps``), so the client knows to
        reload their state: an Event, or a function of the gaps (a tuple of
        keys) that returns one, called here. A stream, ``replay()`` and any
        other async iterable alike have their waiting events written
        together.

        Call it once per request. ``events`` is closed (``aclose()``, when it has
        one) on every way out of the app (if ``on_gap`` raises here, it is
        not: the caller still holds it); see :class:`_SseResponse` for the wire behaviour.
        """
        _check_async_iterable("events", events)
        _check_callable("render", render, optional=True)
        if on_gap is not None and not isinstance(on_gap, Event) and not callable(on_gap):
            raise TypeError(f"on_gap must be an Event, a function of the gaps, or None, not {type(on_gap).__name__}")
        source = events if isinstance(events, _EventSource) else _iterable_source(events)
        gap = None
        if on_gap is not None and source.gaps:
            gap = on_gap if isinstance(on_gap, Event) else on_gap(source.gaps)
            _check_type("on_gap's result", gap, Event, "an Event")
        return _SseResponse(source, self._config, render, gap, owner=self)

    def channel(self, fn: Callable[[Sender], Awaitable[None]]) -> ASGIApp:
        """An ASGI app that streams what ``fn`` sends through its :class:`Sender`.

        ``fn`` starts when the response starts (never for ``HEAD``); its queue
        holds ``buffer`` events, so a fast ``fn`` waits for a slow client. Every
        event it sent is written before the end. The response finishes cleanly
        when ``fn`` returns, cleanly with an ERROR log when it raises, and
        cancels it when the client goes away. ``close()`` cancels it too and
        ends the response cleanly after what it sent; after ``close()`` a new
        channel response ends at once without starting ``fn``.
        """
        _check_callable("fn", fn)
        return _SseResponse(_FedSource(fn, self._buffer, "SSE channel closure", owner=self), self._config, owner=self)

    def try_later(self, seconds: float, *, status: int = 200) -> ASGIApp:
        """An ASGI app that asks the client to come back in ``seconds``: the
        answer to a :class:`LimitReached`, or to any refusal for now.

        An ``EventSource`` gives up for good on any status but 200, so for
        browsers (``status=200``, the default) it is an event stream (this
        broadcaster's headers) that sets ``retry:`` to ``seconds`` and ends
        at once: the browser reconnects then. For other clients, ``status``
        429 or 503 answers that status with ``Retry-After`` (whole seconds,
        rounded up) and a short text.

        Raises:
            TypeError, ValueError: ``seconds`` not a positive finite number, or
                another ``status``.
        """
        after = cast(float, _check_seconds("seconds", seconds))
        if _check_int("status", status, 0) not in (200, 429, 503):
            raise ValueError(f"status must be 200, 429 or 503, got {status!r}")
        if status == 200:
            headers = self._config._start  # pyright: ignore[reportPrivateUsage]
            body = f": try again later\nretry: {max(1, math.ceil(after * 1000))}\n\n".encode()
        else:
            body = b"try again later\n"
            headers = (
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"retry-after", str(math.ceil(after)).encode()),
                (b"content-length", str(len(body)).encode()),
            )

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope.get("type") != "http":
                raise RuntimeError(f"try_later() answers 'http' scopes only, got {scope.get('type')!r}")
            # A fresh list: middleware may edit the headers of a message in place.
            await send({"type": "http.response.start", "status": status, "headers": list(headers)})
            head = scope.get("method") == "HEAD"
            await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})

        return app

    # -- what it is -------------------------------------------------------------

    @property
    def buffer(self) -> int:
        """The bound given at construction: the unread items a stream holds
        before it drops the oldest (and a ``channel()`` queue's length)."""
        return self._buffer

    @property
    def config(self) -> SseConfig:
        """The SSE configuration given at construction."""
        return self._config

    @property
    def history(self) -> int:
        """How many items each channel retains, with their ids, for clients
        to resume from (0: no history, no ids), as given at construction.

        A channel keeps them while it has a stream, then ``linger`` seconds."""
        return self._history

    @property
    def linger(self) -> float:
        """Seconds a channel with history outlives its last stream."""
        return self._linger

    def __len__(self) -> int:
        """The number of live channels: keys with at least one stream, and with
        history, keys whose channel still lingers."""
        with self._lock:
            self._expire_lingering()
            return len(self._channels)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            self._expire_lingering()
            return key in self._channels

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Broadcaster {state} channels={len(self._channels)} buffer={self._buffer}>"

    def metrics(self) -> Metrics:
        """A snapshot of the numbers to watch (see :class:`Metrics`).

        Cheap to count: each thread counts into its own counters, so a send
        takes no lock for it and no increment is lost, however many threads
        send at once; this sums them (and keeps one sum for the threads that
        ended). Numbers that change meanwhile, in other threads, are read as
        they are at that moment.
        """
        with self._lock:
            self._expire_lingering()
            lingering = len(self._lingering)
            channels = len(self._channels) - lingering
            streams = self._streams
            live: list[tuple[weakref.ref[threading.Thread], _Counts]] = []
            total = _Counts()
            for thread, counts in self._all_counts:
                alive = thread()
                if alive is not None and alive.is_alive():
                    live.append((thread, counts))
                    total.add(counts)
                else:  # final: fold it into the sum of the threads that ended
                    self._retired.add(counts)
            self._all_counts = live
            total.add(self._retired)
        return Metrics(
            channels=channels,
            lingering=lingering,
            streams=streams,
            sends=total.sends,
            deliveries=total.deliveries,
            dropped=total.dropped,
            lag_reports=total.lag_reports,
            resumes=total.resumes,
            gaps=total.gaps,
            responses_open=total.opened - sum(total.ended.values()),
            responses_ended=MappingProxyType(total.ended),
            bytes_written=total.written,
        )

    # -- internals (registry lock held unless said otherwise) -----------------

    def _join(self, key: Hashable, sub: _Subscriber) -> _Channel:
        """Make ``sub`` a member of the channel of ``key``: a new channel, a
        lingering one revived, or the live one."""
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel(self._history)
            self._record_change(key)
        elif channel.expires is not None:
            channel.expires = None
            del self._lingering[key]
        channel.members[sub] = None
        channel.groups = None
        return channel

    def _send_with_history(self, key: K, item: T, id: str | None) -> int:
        # Lock not held: takes it.
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                return 0
            assert channel.history is not None, "a broadcaster with history gives every channel one"
            seq = channel.seq + 1
            entry = _Entry(f"{channel.epoch}-{seq}" if id is None else id, item)
            channel.seq = seq
            channel.history.append(entry)
            groups = channel.groups if channel.groups is not None else channel.regroup()
            # Scheduled while the lock is held, so the deliveries of concurrent
            # sends queue up on every loop in the order of their ids.
            return _on_loops(groups, True, _deliver_group, entry, key, self._buffer)

    def _end_channel(self, key: Hashable, channel: _Channel) -> None:
        # Lock not held. The channel is out of the registry: its members no
        # longer change. With history the ends queue up behind the deliveries
        # already scheduled on each loop, so every stream drains them first.
        _on_loops(channel.regroup(), bool(self._history), _end_group, key)

    def _counts(self) -> _Counts:
        """This thread's counts (lock not needed)."""
        try:
            counts: _Counts = self._local.counts
        except AttributeError:
            counts = self._local.counts = _Counts()
            with self._lock:
                self._all_counts.append((weakref.ref(threading.current_thread()), counts))
        return counts

    def _admit(self, keys: Iterable[Hashable]) -> None:
        """Raise the LimitReached that one more stream of ``keys`` would pass."""
        limits = self._limits
        most = limits.get("max_streams")
        if most is not None and self._streams >= most:
            raise StreamLimit(f"{self._streams} streams are open: max_streams is {most}", "max_streams", most)
        per_key = limits.get("max_streams_per_key")
        new = 0
        for key in keys:
            channel = self._channels.get(key)
            if channel is None:
                new += 1
            elif per_key is not None and len(channel.members) >= per_key:
                # (No repr of the key: only its __hash__ and __eq__ run under the lock.)
                message = f"a key has {len(channel.members)} streams: max_streams_per_key is {per_key}"
                raise StreamLimit(message, "max_streams_per_key", per_key)
        most = limits.get("max_keys")
        if most is not None and new and len(self._channels) + new > most:
            message = f"{len(self._channels)} channels and {new} new: max_keys is {most}"
            raise KeyLimit(message, "max_keys", most)

    def _count(self, sub: _Subscriber) -> None:
        """Count ``sub`` among the open streams, until it leaves."""
        sub.counted = True
        self._streams += 1

    def _leave(self, sub: _Subscriber) -> None:
        """Take a subscriber whose stream left out of its channels; a channel
        goes with its last member, or lingers if it has history. A channel
        that was removed (or replaced by a newer channel of the same key) no
        longer holds the subscriber: nothing to do there."""
        if sub.counted:
            sub.counted = False
            self._streams -= 1
        for key in sub.all_keys():
            channel = self._channels.get(key)
            if channel is None or sub not in channel.members:
                continue
            del channel.members[sub]
            channel.groups = None
            if channel.members:
                continue
            if channel.history is None:
                del self._channels[key]
                self._record_change(key)
            else:
                channel.expires = time.monotonic() + self._linger
                self._lingering[key] = channel

    def _expire_lingering(self) -> None:
        """Remove the lingering channels whose time is over."""
        now = time.monotonic()
        while self._lingering:
            key = next(iter(self._lingering))
            expires = self._lingering[key].expires
            assert expires is not None, "a lingering channel has a deadline"
            if expires > now:
                return
            del self._lingering[key]
            del self._channels[key]
            self._record_change(key)

    def _record_change(self, key: Hashable) -> None:
        """Note that the channel of ``key`` appeared or went, for on_change."""
        if self._on_change is not None:
            self._changed.append(key)

    def _report_changes(self) -> None:
        """Hand the changed keys to on_change (lock not held)."""
        on_change = self._on_change
        while self._changed:
            assert on_change is not None, "keys are recorded only for an on_change hook"
            try:
                key = self._changed.popleft()
            except IndexError:  # another releasing thread took the last one
                return
            try:
                on_change(key)
            except Exception:
                logger.exception("Broadcaster on_change hook raised for key %r", key)

    def _register_source(self, source: _FedSource) -> bool:
        """Track a starting channel() source; False if closed already (lock
        not held: takes it)."""
        with self._lock:
            if self._closed:
                return False
            self._sources.add(source)
            return True

    def _unregister_source(self, source: _FedSource) -> None:
        # Lock not held: takes it.
        with self._lock:
            self._sources.discard(source)


# ---------------------------------------------------------------------------
# The ASGI layer: one SSE response
#
# _SseResponse is the app response() and channel() return. It reads an event
# source (the contract above) and writes to the server, from the server's own
# task; its one task is the pending receive().
# ---------------------------------------------------------------------------

_FINAL: Final = {"type": "http.response.body", "body": b"", "more_body": False}

# How many events one body message holds at most: the one that woke the
# response and those waiting behind it (the default buffer: a message holds
# no more than a stream could).
_GATHER: Final = 64

# What _SseResponse._client holds once the client has left.
_GONE: Final = "gone"

# The message of the cancellation with which a response abandons a send in
# progress: the CancelledError that comes out of that send carries it, unless
# the server's task was cancelled by someone else too.
_ABANDONED: Final = "SSE response: send abandoned"

# Task.uncancel() (Python 3.11+) takes back a cancellation request once it is
# handled and returns how many others are pending; Python 3.10 counts none, so
# there the message of the CancelledError is all that tells ours apart.
_COUNTS_CANCELLATIONS: Final = hasattr(asyncio.Task, "uncancel")
_uncancel: Final[Callable[[asyncio.Task[Any]], int]] = getattr(asyncio.Task, "uncancel", lambda task: 0)  # pyright: ignore[reportUnknownLambdaType]


def _body_message(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}


class _SseResponse:
    """The ASGI app of one SSE response (see ``Broadcaster.response``).

    Wire behaviour: ``http.response.start`` with status 200 and the configured
    headers; at once a first body chunk (the ``retry:`` frame, or ``:\\n\\n``),
    because some servers and middleware hold the headers back until the first
    body message; ``on_gap`` if the source could not resume; then
    ``more_body`` messages of whole events, written as soon as they can be
    read: the events the source holds at that moment go out together, up to
    64 in one message; a keep-alive comment after ``keep_alive`` seconds
    without a write. ``HEAD`` gets the headers and an empty body, and the
    source is never read.

    How it finishes: source exhausted, its broadcaster closed (once what the
    source holds is written), :class:`Lagged` (WARNING), a source
    exception (ERROR, with traceback) or a failing ``receive()`` (ERROR)
    finish cleanly with a last ``more_body=False`` message (a send in progress
    when ``receive()`` fails completes first); that message is empty, or
    when its broadcaster is closed and ``shutdown_retry`` is set, a
    ``retry:`` frame. How it ended is counted (``Metrics``). A disconnect
    (``http.disconnect``, or ``OSError`` from ``send``), a send timeout and a
    failing ``send()`` (ERROR) finish with nothing more sent. Cancellation
    propagates. On every way out the source is closed and the pending
    ``receive()`` is cancelled and awaited.

    How it runs: in the server's task, which writes, and sleeps on one future
    (``_wake``) while nothing can be written. Four things complete that
    future: the source (through ``_wait``), the pending ``receive()`` (the one
    task of the response's own) when the client leaves or it fails, the one
    timer (``_tick``) when a keep-alive is due, and its broadcaster's
    ``close()`` (``_stop``). The timer is also the send
    timeout: when a send has taken ``send_timeout``, it cancels the server's
    task out of that send, and so does the client's departure while a send is
    in progress. ``_write`` knows that cancellation for its own by ``_abandon``
    and, on Python 3.10, by the message it carries (``_ABANDONED``); it takes
    the request back and finishes the response; any other cancellation
    propagates. (On Python 3.10, which counts no cancellations, one that the
    server makes in the very loop iteration of the abandonment merges with
    it, and is taken for it.)

    Raises:
        RuntimeError: a non-``http`` scope (the source is closed first), or a
            second call.
    """

    __slots__ = (
        "_source",
        "_config",
        "_render",
        "_on_gap",
        # The broadcaster that made it (its close() is a shutdown; it counts
        # the response in its loop thread's counts), and how the response is
        # ending, once known (one of _ENDINGS; the first reason stands).
        "_owner",
        "_counts",
        "_ending",
        "_called",
        # Set when called: the server's send and receive, its task and loop.
        "_send",
        "_receive",
        "_task",
        "_loop",
        # The future the task sleeps on while nothing can be written, or None.
        "_wake",
        # The one timer, armed for the earliest of: the send in progress times
        # out, a keep-alive is due; None when nothing is due.
        "_timer",
        # Loop time at which the send in progress started (None between sends),
        # and at which the last write completed.
        "_sending_since",
        "_last_write",
        # Why the send in progress is being abandoned ("timeout" or "client"),
        # set just before the task is cancelled for it; else None.
        "_abandon",
        # The pending receive() (None when there is none), and whether request
        # body messages may still come.
        "_receiving",
        "_more_body",
        # None while the client is there; _GONE once it left; the exception
        # if its receive() failed.
        "_client",
        # True once its broadcaster is closed (see _stop).
        "_stopping",
    )

    # Set when called, and read only after that.
    _send: Send
    _receive: Receive
    _task: asyncio.Task[Any]
    _loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        source: _EventSource,
        config: SseConfig,
        render: Callable[[Any], Event] | None = None,
        on_gap: Event | None = None,
        *,
        owner: Broadcaster[Any, Any],
    ) -> None:
        self._source = source
        self._config = config
        self._render = render
        self._on_gap = on_gap
        self._owner = owner
        self._counts = _NO_COUNTS
        self._ending: str | None = None
        self._called = False
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sending_since: float | None = None
        self._last_write = 0.0
        self._abandon: str | None = None
        self._receiving: asyncio.Future[Message] | None = None
        self._more_body = True
        self._client: object = None
        self._stopping = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One coroutine for the whole response (its frame is what an idle
        # connection holds); the steps it awaits are coroutines of their own.
        if self._called:
            raise RuntimeError("an SSE response app can be called only once: make one per request")
        self._called = True
        self._send = send
        try:
            if scope.get("type") != "http":
                raise RuntimeError(f"SSE responses serve 'http' scopes only, got {scope.get('type')!r}")
            task = asyncio.current_task()
            assert task is not None, "asyncio runs every coroutine in a task"
            self._task, self._loop = task, task.get_loop()
            owner = self._owner
            self._counts = owner._counts()  # pyright: ignore[reportPrivateUsage]
            self._counts.opened += 1
            owner._responses.add(self)  # pyright: ignore[reportPrivateUsage]
            try:
                if owner._closed:  # pyright: ignore[reportPrivateUsage]
                    self._stop()
                elif owner._signals_pending and threading.current_thread() is threading.main_thread():  # pyright: ignore[reportPrivateUsage]
                    owner._signals_pending = False  # pyright: ignore[reportPrivateUsage]
                    _CHAIN.chain(self._loop)
                await self._respond(scope, receive)
            except asyncio.CancelledError:
                self._end_as("cancelled")
                raise
            finally:
                self._counts.ended[self._ending or "source_done"] += 1
                owner._responses.discard(self)  # pyright: ignore[reportPrivateUsage]
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            try:
                await self._source.aclose()
            except Exception:
                logger.exception("closing the SSE event source raised")

    async def _respond(self, scope: Scope, receive: Receive) -> None:
        """The response, once it is called: the head, the events, the end."""
        if not await self._write_head(scope.get("method") == "HEAD"):
            return
        self._receive = receive
        self._watch()
        try:
            finish = await self._write_events()
        except Lagged as exc:
            logger.warning("SSE stream ended: %s", exc)
            self._end_as("lag")
            finish = True
        except Exception:
            logger.exception("SSE event source raised; ending the response")
            self._end_as("error")
            finish = True
        finally:
            await self._unwatch()
        if finish:
            self._end_as("shutdown" if self._owner._closed else "source_done")  # pyright: ignore[reportPrivateUsage]
            await self._write(self._final())

    def _stop(self) -> None:
        """Its broadcaster is closed: finish once what the source holds now
        is written, even if the source would go on (a stream of another
        broadcaster, merged in); close() ended the broadcaster's own streams
        just before, on this loop. A fed source (a ``channel()`` closure, any
        other async iterable) is left to end by itself: close() ends a
        closure, and an iterable over the broadcaster's streams ends when
        they do, once all they were sent is written."""
        if not isinstance(self._source, _FedSource):
            self._stopping = True
            _complete(self._wake)

    def _end_as(self, how: str) -> None:
        """Note how the response ends (the first reason stands)."""
        if self._ending is None:
            self._ending = how

    def _final(self) -> Message:
        """The last body message: empty, or at shutdown with ``shutdown_retry``
        the ``retry:`` frame that spreads the reconnections."""
        window = self._config.shutdown_retry
        if window is None or self._ending != "shutdown":
            return dict(_FINAL)
        retry = random.randint(round(window[0] * 1000), round(window[1] * 1000))
        return {"type": "http.response.body", "body": f"retry: {retry}\n\n".encode(), "more_body": False}

    async def _write_head(self, head: bool) -> bool:
        """The start message; then the whole empty body for ``HEAD`` (False:
        nothing more to write), else the first chunk and ``on_gap`` when due.
        False if a write did not complete."""
        config = self._config
        # A fresh list: middleware may edit the headers of a message in place.
        start = {"type": "http.response.start", "status": 200, "headers": list(config._start)}  # pyright: ignore[reportPrivateUsage]
        if not await self._write(start):
            return False
        if head:
            await self._write(dict(_FINAL))
            return False
        if not await self._write(_body_message(config._first_chunk)):  # pyright: ignore[reportPrivateUsage]
            return False
        gap = self._on_gap
        return gap is None or await self._write(_body_message(gap.encode()))

    async def _write_events(self) -> bool:
        """Write the source's events as they come, and keep-alives on silence,
        until the source is exhausted (True: finish cleanly), the client leaves
        (False) or its receive() fails (True), or a write fails (False, even
        after a failed receive()).
        Raises what the source raises, once the events read before it are
        written."""
        loop = self._loop
        keep_alive = self._config.keep_alive
        while self._client is None:
            try:
                written = await self._write_ready()
            except StopAsyncIteration:
                return True
            if written is None:
                if self._stopping:
                    return True
                if keep_alive is not None and loop.time() - self._last_write >= keep_alive:
                    written = await self._write(_body_message(self._config._keep_alive_frame))  # pyright: ignore[reportPrivateUsage]
                else:
                    wake = self._wake = loop.create_future()
                    self._source._wait(wake)  # pyright: ignore[reportPrivateUsage]
                    if keep_alive is not None:
                        self._schedule(self._last_write + keep_alive)
                    try:
                        await wake
                    finally:
                        self._wake = None
                    continue
            if not written:  # nothing more goes to a server whose send failed
                return False
        return self._client is not _GONE

    async def _write_ready(self) -> bool | None:
        """Write what the source holds now, up to 64 events in one message:
        None if it holds nothing, else whether the write completed. Raises
        StopAsyncIteration once the source is exhausted, and what the source
        raises (after the events before it are written)."""
        items, ids, lines = self._source._take(_GATHER)  # pyright: ignore[reportPrivateUsage]
        if not items:
            return None
        body, error = self._body(items, ids, lines)
        if body and not await self._write(_body_message(body)):
            return False
        if error is not None:
            raise error
        return True

    async def _write(self, message: Message) -> bool:
        """Send one message within ``send_timeout``; False if it did not
        complete: the client is gone, the send failed or timed out (each
        logged once, here or by the watcher), or it was abandoned."""
        loop, send = self._loop, self._send
        since = self._sending_since = loop.time()
        timeout = self._config.send_timeout
        if timeout is not None:
            self._schedule(since + timeout)
        try:
            await send(message)
        except asyncio.CancelledError as exc:
            abandon, others = self._take_back_abandon()
            # Ours only if this send was abandoned and no other cancellation is
            # pending: 3.11+ counts them; 3.10 only has the message to go by.
            if abandon is None or others or not (_COUNTS_CANCELLATIONS or exc.args == (_ABANDONED,)):
                raise
            if abandon == "timeout":
                logger.info("SSE client did not accept a write within %s s; ending the response", timeout)
            self._end_as("send_timeout" if abandon == "timeout" else "client_gone")
            return False
        except OSError as exc:
            logger.debug("SSE client disconnected: %r", exc)
            self._end_as("client_gone")
            return False
        except Exception:
            logger.exception("ASGI send() failed; ending the SSE response")
            self._end_as("error")
            return False
        finally:
            self._sending_since = None
            # A send abandoned that returned or failed otherwise all the same.
            self._take_back_abandon()
        self._last_write = loop.time()
        self._counts.written += len(message.get("body", b""))
        return True

    # -- the one timer: keep-alives and the send timeout --------------------------

    def _schedule(self, when: float) -> None:
        """Have ``_tick`` run at ``when`` at the latest."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        """Abandon a send that has taken ``send_timeout``; wake the response for
        a keep-alive that is due; else re-arm for what comes next."""
        self._timer = None
        now = self._loop.time()
        since = self._sending_since
        timeout = self._config.send_timeout
        if since is not None:
            if timeout is None:  # armed for a keep-alive, but a send began since
                return
            if now - since >= timeout:
                self._abandon_send("timeout")
            else:
                self._schedule(since + timeout)
            return
        keep_alive = self._config.keep_alive
        if keep_alive is not None and self._wake is not None:
            if now - self._last_write >= keep_alive:
                _complete(self._wake)
            else:
                self._schedule(self._last_write + keep_alive)

    def _abandon_send(self, why: str) -> None:
        """Cancel the server's task out of the send in progress, for ``why``
        (once: the first reason stands)."""
        if self._abandon is None:
            self._abandon = why
            self._task.cancel(_ABANDONED)

    def _take_back_abandon(self) -> tuple[str | None, int]:
        """Why the send in progress was abandoned (None: it was not), and how
        many other cancellation requests are pending once ours, if any, is
        taken back."""
        abandon, self._abandon = self._abandon, None
        return abandon, (0 if abandon is None else _uncancel(self._task))

    # -- the watcher: the pending receive() ----------------------------------------

    def _watch(self) -> None:
        """Start the receive() that tells when the client leaves."""
        receiving = self._receiving = asyncio.ensure_future(self._receive())
        receiving.add_done_callback(self._received)

    def _received(self, receiving: asyncio.Future[Message]) -> None:
        if receiving is not self._receiving:  # cancelled by _unwatch
            return
        self._receiving = None
        try:
            message = _outcome(receiving, "ASGI receive() raised")
            kind = message["type"]
            if kind == "http.request" and self._more_body:
                # Request body messages are read and dropped.
                self._more_body = bool(message.get("more_body", False))
                self._watch()
                return
            if kind != "http.disconnect":
                raise RuntimeError(f"unexpected ASGI message while streaming: {kind!r}")
            logger.debug("SSE client disconnected")
            self._client = _GONE
        except OSError:
            logger.debug("SSE client disconnected")
            self._client = _GONE
        except Exception as exc:
            logger.error("ASGI receive() failed; ending the SSE response", exc_info=exc)
            self._client = exc
        self._end_as("client_gone" if self._client is _GONE else "error")
        # Nothing more is written to a client that left, not even the rest of
        # a send in progress; after a failed receive() the send completes and
        # the response finishes cleanly.
        if self._client is _GONE and self._sending_since is not None:
            self._abandon_send("client")
        else:
            _complete(self._wake)

    async def _unwatch(self) -> None:
        """Cancel the pending receive() and wait until it is done."""
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            receiving.cancel()
            await _join(receiving)
            if not receiving.cancelled() and receiving.exception() is not None:
                logger.debug("ASGI receive() raised while cancelled", exc_info=receiving.exception())

    # -- frames ----------------------------------------------------------------

    def _body(
        self, items: list[Any], ids: list[str | None] | None, lines: list[bytes] | None
    ) -> tuple[bytes, Exception | None]:
        """One body message: the frames of ``items``, each with its id (from
        ``ids``) unless its event carries that id already, and without a
        ``render`` its ``event:`` line (from ``lines``); and the error that
        stopped it at an item, if any (the frames before it are kept)."""
        frames: list[bytes]
        if self._render is None and lines is None:
            # The common case at C speed: Event items carry their frames (with
            # history, copies that carry their ids). Anything else is redone
            # below, one by one, to raise at the right item.
            if ids is None:
                frames = [event._frame for event in items if isinstance(event, Event)]  # pyright: ignore[reportPrivateUsage]
            else:
                frames = [
                    event._frame  # pyright: ignore[reportPrivateUsage]
                    for event, id in zip(items, ids, strict=True)
                    if isinstance(event, Event) and event.id == id
                ]
            if len(frames) == len(items):
                return b"".join(frames), None
        frames = []
        try:
            for index, item in enumerate(items):
                frames.append(
                    self._frame(
                        item,
                        None if ids is None else ids[index],
                        None if lines is None else lines[index],
                        ids is not None,
                    )
                )
        except StopAsyncIteration as exc:  # from render: it must not pass for the end of the source
            error = RuntimeError(f"render raised {exc!r}")
            error.__cause__ = exc
            return b"".join(frames), error
        except Exception as exc:
            return b"".join(frames), exc
        return b"".join(frames), None

    def _frame(self, item: Any, id: str | None, line: bytes | None, ids: bool) -> bytes:
        """The frame of one item of the source: rendered if there is a
        ``render``, else (a keyed source's ``(key, event)`` pair) its event
        named by ``line``; then with ``id`` unless the event carries it
        already. When the source writes ids (``ids``), an item it gives no
        id (None: the client's position has not moved) is written without
        an id of its own either, which would replace that position."""
        render = self._render
        if render is not None:
            event, line = render(item), None
        else:
            event = item if line is None else item[1]
        if not isinstance(event, Event):
            raise TypeError(f"SSE events must be Event objects, got {type(event).__name__}")
        if ids and id is None and event.id is not None:
            event = dataclasses.replace(event, id=None)
        frame = event.encode() if line is None else event.encode()[:-1] + line + b"\n"
        if id is None or event.id == id:
            return frame
        return _with_id(frame, id)


# ---------------------------------------------------------------------------
# Shutdown on a signal
#
# A server that shuts down gracefully waits for its responses to finish, and
# an SSE response never finishes by itself: the server would wait for ever.
# The cure is Broadcaster.close() when the signal arrives, which ends every
# response cleanly. The process has one _SignalChain: for the broadcasters
# that close_on_signals() armed, it puts a handler in front of the server's
# own (Python) handler of SIGINT and SIGTERM, which has the event loop close
# them all, wait (bounded) for their responses to return, then pass the
# signal on once. The ASGI lifespan shutdown is no use: servers send it only
# after the responses are gone.
# ---------------------------------------------------------------------------

_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

# How long, after the last response returned, the server is given to write
# what that response sent it (an HTTP/2 server may write its END_STREAM from
# a task of its own, which nothing here can await).
_FLUSH: Final = 0.05

_Handler: TypeAlias = Callable[[int, FrameType | None], object]


def _server_handles(handler: object) -> bool:
    """Whether ``handler``, a signal's current handler, is a server's: a
    Python function other than Python's own (``default_int_handler``, which
    raises KeyboardInterrupt, and asyncio.run's, which cancels the main task).
    ``SIG_DFL``, ``SIG_IGN`` and handlers set in C are not Python functions."""
    if not callable(handler) or handler is signal.default_int_handler:
        return False
    # asyncio.run's (Python 3.11+) is a partial of a method of its Runner.
    owner = getattr(getattr(handler, "func", handler), "__self__", None)
    return not isinstance(owner, getattr(asyncio, "Runner", ()))


async def _responses_ended(owners: Iterable[Broadcaster[Any, Any]], timeout: float) -> None:
    """Wait until every response of ``owners`` running on this loop has
    returned (its server task done), for at most ``timeout`` seconds; then give
    the server a moment (``_FLUSH``) to write what they sent."""
    loop = asyncio.get_running_loop()
    tasks = {
        response._task  # pyright: ignore[reportPrivateUsage]
        for owner in owners
        for response in list(owner._responses)  # pyright: ignore[reportPrivateUsage]
        if response._loop is loop  # pyright: ignore[reportPrivateUsage]
    }
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
        await asyncio.sleep(_FLUSH)


class _SignalChain:
    """The process's handling of SIGINT and SIGTERM for the broadcasters that
    ``close_on_signals()`` armed (``_CHAIN``).

    Its handlers are chained by the first response of an armed broadcaster
    that runs in the main thread (the server installed its own handlers
    before serving anything; until a response runs there is nothing to
    end), one per signal, whose loop is that of the latest such response. A
    signal starts one shutdown: every armed broadcaster is closed, and once
    their responses have returned, the signal goes on to the handler chained
    behind. Closing the last armed broadcaster gives the signals back to the
    server's handlers, so a later signal goes straight to the server."""

    __slots__ = ("_lock", "_armed", "_task")

    def __init__(self) -> None:
        # Guards _armed; never taken in a signal handler.
        self._lock = threading.Lock()
        # The armed broadcasters, each with its timeout (weakly: an armed
        # broadcaster dropped unclosed is simply gone).
        self._armed: weakref.WeakKeyDictionary[Broadcaster[Any, Any], float] = weakref.WeakKeyDictionary()
        # The shutdown a signal started (owned here while it runs).
        self._task: asyncio.Task[None] | None = None

    def arm(self, owner: Broadcaster[Any, Any], timeout: float) -> None:
        with self._lock:
            self._armed[owner] = timeout

    def chain(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the main thread, from a response running on ``loop``: chain a
        handler in front of each signal's, if the server handles it in Python
        and ours is not there already (then it takes ``loop``)."""
        for sig in _SIGNALS:
            current = signal.getsignal(sig)
            if isinstance(current, _Chained):
                current.loop = loop
            elif _server_handles(current):
                signal.signal(sig, _Chained(self, loop, cast("_Handler", current)))

    def disarm(self, owner: Broadcaster[Any, Any]) -> None:
        """``owner`` is closed. Once no broadcaster is armed, give each signal
        back to the handler behind ours, if ours is still the one installed
        (from the main thread only; elsewhere ours stays, passing each signal
        straight on)."""
        with self._lock:
            self._armed.pop(owner, None)
            if self._armed:
                return
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                current = signal.getsignal(sig)
                if isinstance(current, _Chained):
                    signal.signal(sig, current.previous)

    def begin(self, handler: _Chained, signum: int, frame: FrameType | None) -> None:
        """On the loop: a signal starts the shutdown, unless nothing is armed
        (a shutdown closed them all already); then it goes straight on."""
        with self._lock:
            armed = list(self._armed.items())
        if not armed:
            handler.previous(signum, frame)
            return
        self._task = handler.loop.create_task(self._shut_down(handler, signum, frame, armed))

    async def _shut_down(
        self, handler: _Chained, signum: int, frame: FrameType | None, armed: list[tuple[Broadcaster[Any, Any], float]]
    ) -> None:
        try:
            for owner, _ in armed:
                owner.close()  # the last one gives the signals back: a second Ctrl-C reaches the server
            await _responses_ended([owner for owner, _ in armed], max(timeout for _, timeout in armed))
        finally:
            # From a callback of its own: what the server's handler raises
            # (KeyboardInterrupt, SystemExit) leaves the loop as a signal's would.
            handler.loop.call_soon(handler.previous, signum, frame)


class _Chained:
    """The handler of one signal, in front of the one it replaced."""

    __slots__ = ("chain", "loop", "previous")

    def __init__(self, chain: _SignalChain, loop: asyncio.AbstractEventLoop, previous: _Handler) -> None:
        self.chain = chain
        self.loop = loop
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, which may hold a
        # lock of this module: nothing here takes one. call_soon_threadsafe
        # only appends to the loop's queue and wakes it. The loop is the main
        # thread's, which is here: it can neither stop nor close meanwhile.
        # One that is not running (stopped, or closed) could not shut
        # anything down: the signal goes on at once, as if nothing were
        # chained.
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.chain.begin, self, signum, frame)
        else:
            self.previous(signum, frame)


_CHAIN: Final = _SignalChain()


# ---------------------------------------------------------------------------
# Other event sources: channel(), any async iterable, replay()
#
# Sender is the writing end of a bounded queue, and _FedSource the event
# source that runs a coroutine feeding it, in a task of its own: the closure
# of a channel() response, or _forward over an async iterable that is not an
# event source already (response() wraps it so). replay() chains sources;
# last_event_id() reads where a client is from its request.
# ---------------------------------------------------------------------------


class Sender:
    """How a ``channel()`` closure sends events to its one client.

    Its queue holds at most ``limit`` events; ``send`` waits for room, so a fast
    closure is paced by a slow client.
    """

    __slots__ = ("_items", "_limit", "_closed", "_exited", "_error", "_reader", "_putters")

    def __init__(self, limit: int) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        # Sends are refused: the response is over, or ending (client gone,
        # Broadcaster.close(): what is queued may still be written).
        self._closed = False
        # What feeds the queue returned or raised (with _error): the response
        # stops once it has written what is queued.
        self._exited = False
        self._error: BaseException | None = None
        # The future the response sleeps on until an item or the end comes.
        self._reader: asyncio.Future[None] | None = None
        # Feeders waiting for room; all are woken when room frees and re-check.
        self._putters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        """True once sends are refused (``send`` raises ClientDisconnected): the
        client is gone, or the response is over or ending (after
        ``Broadcaster.close()`` what was queued is still written)."""
        return self._closed

    async def send(self, event: Event) -> None:
        """Queue ``event`` for the client, waiting while the queue is full.

        Raises:
            TypeError: ``event`` is not an :class:`Event`.
            ClientDisconnected: the client is gone or the response is over.
        """
        _check_type("Sender.send() event", event, Event, "an Event")
        await self._put(event)

    # -- internals: the feeder's side, then the response's (for _FedSource) ----

    async def _put(self, item: object) -> None:
        while True:
            if self._closed or self._exited:
                raise ClientDisconnected("the client is gone or the response is over")
            if len(self._items) < self._limit:
                break
            room = asyncio.get_running_loop().create_future()
            self._putters.append(room)
            await room
        self._items.append(item)
        reader, self._reader = self._reader, None
        _complete(reader)

    def _take(self, limit: int) -> list[Any]:
        """Up to ``limit`` queued items (see :class:`_EventSource`)."""
        items = self._items
        if items:
            taken = [items.popleft() for _ in range(min(limit, len(items)))]
            self._wake_putters()
            return taken
        if self._exited:
            error, self._error = self._error, None
            # ClientDisconnected means the feeder saw the response end.
            if error is not None and not isinstance(error, ClientDisconnected):
                raise error
            raise StopAsyncIteration
        return []

    def _close(self) -> None:
        """Refuse sends from now on: the response is over or ending."""
        self._closed = True
        self._wake_putters()

    def _feeder_exited(self, error: BaseException | None) -> None:
        """What feeds the queue returned (``error`` None) or failed."""
        self._exited = True
        self._error = error
        reader, self._reader = self._reader, None
        _complete(reader)
        self._wake_putters()

    def _wake_putters(self) -> None:
        putters, self._putters = self._putters, []
        for room in putters:
            _complete(room)


class _FedSource:
    """An event source fed by a coroutine that it runs in a task of its own:
    a ``channel()`` closure, or :func:`_forward` over an async iterable.

    The task starts at the first read, unless the source belongs to a closed
    broadcaster (then the response just ends); while it runs, the broadcaster
    (if any) tracks the source, so that ``Broadcaster.close()`` can end it.
    ``aclose`` cancels and awaits the task, then closes ``closes``.
    """

    __slots__ = ("_feed", "_sender", "_task", "_owner", "_what", "_closes", "loop")

    def __init__(
        self,
        feed: Callable[[Sender], Awaitable[None]],
        limit: int,
        what: str,
        owner: Broadcaster[Any, Any] | None = None,
        closes: object = None,
    ) -> None:
        self._feed = feed
        self._sender = Sender(limit)
        self._task: asyncio.Task[None] | None = None
        # What it is, in messages: "SSE channel closure" or "SSE event source".
        self._what = what
        self._owner = owner
        self._closes = closes
        # The loop the response runs on; None until the first read.
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def gaps(self) -> tuple[()]:
        return ()

    def end(self) -> None:
        """End the response for ``Broadcaster.close()`` (on the source's loop):
        the feeder is cancelled, what it already sent is still written, then
        the response finishes cleanly. Harmless once the response is over (a
        close() from another thread can be scheduled just before that)."""
        self._sender._close()  # pyright: ignore[reportPrivateUsage]
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        """Cancel the feeder and wait for it, close ``closes``; then raise what
        the feeder failed with if the response never read it (it finished
        first, e.g. on a disconnect), or log it if this is cancelled
        meanwhile: it is never lost. A closure that sends after its client
        left gets ClientDisconnected: that is how it learns, not an error."""
        self._sender._close()  # pyright: ignore[reportPrivateUsage]
        # The ended task's exception holds the feeder's frames, which hold
        # this source: forget the task, or they live on in a cycle.
        task, self._task = self._task, None
        try:
            try:
                if task is not None:
                    if self._owner is not None:
                        self._owner._unregister_source(self)  # pyright: ignore[reportPrivateUsage]
                    task.cancel()
                    await _join(task)
            finally:
                await _close(self._closes)
        except BaseException:
            error = self._unread_error()
            if error is not None:
                logger.error("%s raised while it was being closed", self._what, exc_info=error)
            raise
        error = self._unread_error()
        if error is not None:
            raise error

    # -- internals: the event-source contract, the feeder's task -------------------

    def _take(self, limit: int) -> tuple[list[Any], None, None]:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            if self._owner is None or self._owner._register_source(self):  # pyright: ignore[reportPrivateUsage]
                self._task = self.loop.create_task(self._run())
                self._task.add_done_callback(self._exited)
            else:  # the broadcaster is closed: end at once
                self._sender._close()  # pyright: ignore[reportPrivateUsage]
                self._sender._feeder_exited(None)  # pyright: ignore[reportPrivateUsage]
        return self._sender._take(limit), None, None  # pyright: ignore[reportPrivateUsage]

    def _wait(self, waiter: asyncio.Future[None]) -> None:
        self._sender._reader = waiter  # pyright: ignore[reportPrivateUsage]

    async def _run(self) -> None:
        await self._feed(self._sender)

    def _exited(self, task: asyncio.Task[None]) -> None:
        # A cancellation is ours once the sender is closed (we close it, then
        # cancel); any other is the feeder's own failure.
        error: BaseException | None = None
        if not (task.cancelled() and self._sender.closed):
            try:
                _outcome(task, f"the {self._what} raised")
            except StopAsyncIteration as exc:  # it must not pass for the end of the source
                error = RuntimeError(f"the {self._what} raised {exc!r}")
                error.__cause__ = exc
            except Exception as exc:
                error = exc
        self._sender._feeder_exited(error)  # pyright: ignore[reportPrivateUsage]

    def _unread_error(self) -> BaseException | None:
        sender = self._sender
        error, sender._error = sender._error, None  # pyright: ignore[reportPrivateUsage]
        return None if isinstance(error, ClientDisconnected) else error


async def _forward(iterable: AsyncIterable[Any], sender: Sender) -> None:
    """Feed the items of ``iterable`` to a response (as many ahead as the
    sender's queue holds)."""
    async for item in iterable:
        await sender._put(item)  # pyright: ignore[reportPrivateUsage]


def _iterable_source(iterable: AsyncIterable[Any]) -> _FedSource:
    """Any async iterable as an event source: read ahead in a task, at most
    one message's worth (``_GATHER``) of items, and closed at the end."""
    return _FedSource(functools.partial(_forward, iterable), _GATHER, "SSE event source", closes=iterable)


class _Replay(_AsyncClosing, AsyncIterator[T], Generic[T]):
    """What :func:`replay` returns: ``items``, then ``live``.

    Iterated, it awaits each part in the caller's task, as an async generator
    would. Read by a response, it is an event source whose ids and
    ``resumed`` are ``live``'s, and a part that is a plain async iterable is
    read ahead by a task of the response's. Read it one way or the other, not
    both. ``aclose()`` closes every part, even when iteration never started
    (which a bare async generator cannot promise: its ``finally`` would not
    run) or a part was exhausted.
    """

    __slots__ = ("_items", "_parts", "_sources", "_at", "_live")

    def __init__(self, items: Iterable[T] | AsyncIterable[T], live: AsyncIterable[T] | None) -> None:
        # The plain items, until exhausted; then the async parts in order (the
        # items if they are async, then live), and the event source that a
        # response reads each of them through, made at its first read.
        self._items: Iterator[T] | None = None
        self._parts: list[AsyncIterator[T]] = []
        if isinstance(items, AsyncIterable):
            self._parts.append(aiter(items))
        else:
            self._items = iter(items)
        if live is not None:
            self._parts.append(aiter(live))
        self._sources: list[_EventSource | None] = [None] * len(self._parts)
        self._at = 0  # the part being read
        self._live = live

    @property
    def resumed(self) -> bool | None:
        """``live``'s, or None when it has none."""
        live: Any = self._live
        return getattr(live, "resumed", None) if isinstance(live, _EventSource) else None

    @property
    def gaps(self) -> tuple[Any, ...]:
        """``live``'s, or ``()`` when it has none."""
        live = self._live
        return live.gaps if isinstance(live, _EventSource) else ()

    def __aiter__(self) -> _Replay[T]:
        return self

    async def __anext__(self) -> T:
        if self._items is not None:
            try:
                return next(self._items)
            except StopIteration:
                self._items = None
        while self._at < len(self._parts):
            try:
                return await anext(self._parts[self._at])
            except StopAsyncIteration:
                self._at += 1
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Close the replayed items' iterator and ``live``; then iteration
        stops. Idempotent."""
        items, self._items = self._items, None
        parts = [part if source is None else source for part, source in zip(self._parts, self._sources, strict=True)]
        self._parts, self._sources = [], []
        await _close_each([items, *parts])

    # -- internals: the event-source contract ------------------------------------

    def _take(self, limit: int) -> tuple[list[Any], list[str | None] | None, list[bytes] | None]:
        if self._items is not None:
            items = list(itertools.islice(self._items, limit))
            if items:
                return items, None, None
            self._items = None
        while self._at < len(self._parts):
            try:
                return self._source()._take(limit)  # pyright: ignore[reportPrivateUsage]
            except StopAsyncIteration:
                self._at += 1
        raise StopAsyncIteration

    def _wait(self, waiter: asyncio.Future[None]) -> None:
        self._source()._wait(waiter)  # pyright: ignore[reportPrivateUsage]

    def _source(self) -> _EventSource:
        """The event source of the part being read."""
        source = self._sources[self._at]
        if source is None:
            part = self._parts[self._at]
            source = self._sources[self._at] = part if isinstance(part, _EventSource) else _iterable_source(part)
        return source


def replay(items: Iterable[T] | AsyncIterable[T], live: AsyncIterable[T] | None = None) -> _Replay[T]:
    """Yield ``items`` (plain or async iterable), then everything from ``live``.

    The race-free order to resume a client is: subscribe first, then load what
    it missed, then ``replay(missed, stream)``. Loading first would lose what is
    sent between the load and the subscribe; subscribing first can at worst
    deliver an item both in ``missed`` and live, which the app can drop by id.
    In a ``response()``, the events of ``live`` keep their ids and ``on_gap``
    follows ``live.resumed``, as for ``live`` alone.
    """
    return _Replay(items, live)


def last_event_id(scope: Scope) -> str | None:
    """The client's last event id from an ASGI HTTP scope, or None.

    The ``Last-Event-ID`` header (decoded as UTF-8) wins; when it is absent,
    empty or not UTF-8, the ``last_event_id`` query parameter is used, because a
    browser's ``EventSource`` cannot set headers on its first request.
    """
    for name, value in scope.get("headers", ()):
        if name == b"last-event-id":
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                break
            if text:
                return text
            break
    # Parsed by hand, so another parameter that is not UTF-8 cannot hide it.
    for part in bytes(scope.get("query_string", b"")).split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == b"last_event_id":
            try:
                text = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return None
            return text or None
    return None


# ---------------------------------------------------------------------------
# Reading an event stream: the client's side
#
# SseParser interprets the bytes of any text/event-stream as a browser does
# (WHATWG HTML, "Interpreting an event stream"), for tests and clients. It
# depends on nothing above.
# ---------------------------------------------------------------------------


# A retry of more digits is ignored: int() refuses them (Python 3.10.7+).
_MAX_DIGITS: Final = 4300


@dataclasses.dataclass(frozen=True, slots=True)
class SseEvent:
    """One event as a browser's ``EventSource`` dispatches it: its ``type``
    (``"message"`` unless the stream named one), its ``data``, and the last
    event id at that moment (carried over from earlier events)."""

    type: str
    data: str
    last_event_id: str


class SseParser:
    """An incremental parser of ``text/event-stream`` bytes, as the WHATWG HTML
    Standard says a browser interprets them: UTF-8 (invalid bytes become
    U+FFFD; one leading BOM is dropped), lines ending in CRLF, CR or LF,
    ``data``, ``event``, ``id`` (ignored if it holds NUL) and ``retry``
    (ignored unless ASCII digits) fields, other fields ignored, one space
    after the colon removed. A blank line dispatches the event, if it has
    data; the last event id is carried from event to event. What follows the
    last blank line is not an event yet: a stream that ends there loses it,
    as a browser does.

    Feed it bytes as they come, cut anywhere; each call returns the events
    completed by them. With ``comments=True`` the text of each comment line
    (``: text``, one leading space removed) is appended to ``comments`` (read
    and clear it as you like). Work is linear in the bytes fed, however long
    a line is. ``last_event_id`` may start from the one a reconnecting client
    sends.
    """

    __slots__ = (
        "_decoder",
        "_comments",
        "_line",
        "_skip_lf",
        "_started",
        "_data",
        "_type",
        "_id",
        "last_event_id",
        "retry",
        "comments",
    )

    def __init__(self, *, comments: bool = False, last_event_id: str = "") -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._comments = comments
        self._line: list[str] = []  # the pieces of the line being read
        self._skip_lf = False  # the last piece ended in CR: a LF right after it is the same line end
        self._started = False  # past the first character (the BOM check)
        self._data: list[str] = []
        self._type = ""
        self._id = _check_str("last_event_id", last_event_id)  # the last event ID buffer
        #: The last event id string: what a reconnection sends as Last-Event-ID.
        self.last_event_id = last_event_id
        #: The reconnection time in ms the stream set last, or None.
        self.retry: int | None = None
        #: The comments read so far, with ``comments=True``.
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events that ``chunk`` completes, in order."""
        text = self._decoder.decode(_check_type("chunk", chunk, bytes, "bytes"))
        if not text:  # nothing, or part of a character: no state to change
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF whose CR ended the last chunk
        # A CR ending the text ends a line; a LF starting the next one is
        # part of the same line end.
        self._skip_lf = text.endswith("\r")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        if len(lines) == 1:  # no line end yet: one more piece of the line
            self._line.append(text)
            return []
        if self._line:
            self._line.append(lines[0])
            lines[0] = "".join(self._line)
        last = lines.pop()  # what follows the last line end: the next line's start
        self._line = [last] if last else []
        return self._interpret(lines)

    def _interpret(self, lines: list[str]) -> list[SseEvent]:
        """Interpret whole lines; the events they dispatch."""
        out: list[SseEvent] = []
        data, kind, ident = self._data, self._type, self._id
        for line in lines:
            if not line:  # dispatch
                self.last_event_id = ident
                if data:
                    out.append(SseEvent(kind or "message", "\n".join(data), ident))
                    data = []
                kind = ""
                continue
            name, _, value = line.partition(":")
            if not name:  # a comment: the line starts with a colon
                if self._comments:
                    self.comments.append(value[1:] if value.startswith(" ") else value)
                continue
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
            elif name == "id":
                if "\0" not in value:
                    ident = value
            elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= _MAX_DIGITS:
                self.retry = int(value)
        self._data, self._type, self._id = data, kind, ident
        return out


# ---------------------------------------------------------------------------
# Testing an endpoint in process: AsgiClient
#
# AsgiClient drives any ASGI 3 app in the caller's event loop as a server
# would, with no socket: the lifespan, requests, each response read as it is
# sent (its events parsed by SseParser), the disconnect, and a bound on every
# wait. Each call of the app (_AppCall: a request's AsgiResponse, or the
# _Lifespan) runs in one task, owned by whoever started it: the client for
# the lifespan, the ``stream()`` block for a request. Nothing above uses it.
# ---------------------------------------------------------------------------

# The method of a request: an RFC 9110 token.
_METHOD: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What may stay unescaped in a request's raw path.
_PATH_SAFE: Final = "/%!$&'()*+,;=:@-._~"
# The body of a request given no json.
_NO_JSON: Final = object()


class _AppCall:
    """One call of the app: its task, and the waits on what it sends.

    Its owner keeps what the app sends and calls ``wake()`` on each message;
    the task's end wakes too. Every wait is bounded by the client's timeout,
    and ends early with the app's exception if it fails.
    """

    __slots__ = ("what", "timeout", "task", "_changed", "_reported")

    def __init__(self, what: str, timeout: float, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.what = what  # named in every error: "GET /events", "lifespan"
        self.timeout = timeout
        self._changed: asyncio.Future[None] | None = None  # a waiter, woken by the next message
        self._reported = False  # the app's outcome was raised to the caller

        async def call() -> None:
            await app(scope, receive, send)

        self.task = asyncio.get_running_loop().create_task(call())
        self.task.add_done_callback(lambda _: self.wake())

    def wake(self) -> None:
        _complete(self._changed)

    async def until(self, ready: Callable[[], bool], what: str, timeout: object) -> None:
        """Return once ``ready()`` holds. Raise what the app raised if it
        failed first, RuntimeError if it returned first, TimeoutError naming
        ``what`` after ``timeout`` seconds (None: the client's)."""
        limit = self.timeout if timeout is None else cast(float, _check_seconds("timeout", timeout))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not ready():
            if self.task.done():
                self.raise_failure()
                raise RuntimeError(f"{self.what}: the app returned without sending {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.what}: no {what} within {limit:g} s")
            if self._changed is None or self._changed.done():  # (shared by concurrent waiters)
                self._changed = loop.create_future()
            await asyncio.wait((self._changed,), timeout=remaining)

    def raise_failure(self) -> None:
        """Raise what the app raised, if it did (its task is done)."""
        self._reported = True
        _outcome(self.task, f"{self.what}: the app raised")

    async def end(self, after: str) -> None:
        """Wait for the app to return (it was told ``after``), at most the
        timeout; past it, cancel it and raise TimeoutError. Then raise what
        it raised, unless a wait did already. A cancellation of the caller
        cancels the app too (see ``cancel``)."""
        try:
            await asyncio.wait((self.task,), timeout=self.timeout)
        except asyncio.CancelledError:
            await self.cancel()
            raise
        if not self.task.done():
            await self.cancel()
            state = "cancelled" if self.task.done() else "cancelled, and it is still running"
            raise TimeoutError(f"{self.what}: the app did not return within {self.timeout:g} s of {after}; {state}")
        if not self._reported:
            self.raise_failure()

    async def cancel(self) -> None:
        """Cancel the app and give it the timeout to return. What it raises
        is dropped: the caller raises an error of its own."""
        self._reported = True
        self.task.cancel()
        await asyncio.wait((self.task,), timeout=self.timeout)
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieved, so asyncio does not log it


class _Lifespan(_AppCall):
    """The app's lifespan: ``lifespan.startup`` at once, ``lifespan.shutdown``
    at ``phase("shutdown")``; ``state`` is what request scopes copy."""

    __slots__ = ("state", "_replies", "_asked", "_shutdown")

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.state: dict[str, Any] = {}
        self._replies: list[str] = []  # each message the app sent: its type (and a failure's message)
        self._asked = False  # receive() has handed out lifespan.startup
        self._shutdown: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        super().__init__("lifespan", timeout, app, scope, self._receive, self._send)

    async def _receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "lifespan.startup"}
        await asyncio.wait((self._shutdown,))
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: Message) -> None:
        kind = str(message.get("type"))
        self._replies.append(f"{kind}: {message.get('message', '')}" if kind.endswith(".failed") else kind)
        self.wake()

    async def phase(self, phase: str) -> None:
        """Run ``phase`` (startup, shutdown) and wait for the app's answer:
        RuntimeError if it failed; the app is then cancelled. After the
        shutdown, wait for the app to return."""
        before = len(self._replies)
        if phase == "shutdown":
            _complete(self._shutdown)
        try:
            await self.until(lambda: len(self._replies) > before, f"lifespan.{phase}.complete", None)
            reply = self._replies[before]
            if reply != f"lifespan.{phase}.complete":
                raise RuntimeError(f"lifespan: the app answered lifespan.{phase} with {reply}")
        except BaseException:
            await self.cancel()
            raise
        if phase == "shutdown":
            await self.end("lifespan.shutdown")


class AsgiResponse:
    """A response of the app under test, read as it arrives: what
    :meth:`AsgiClient.stream` makes, to use as ``async with`` (entering it
    sends the request and waits for the status and headers; leaving it
    sends ``http.disconnect`` and waits for the app to return), and what
    :meth:`AsgiClient.request` returns complete.

    ``status``, ``headers`` (names in lower case; repeated ones joined with
    ``", "``; ``raw_headers`` has them as sent) and ``body`` (what has
    arrived, ungzipped when the response says ``content-encoding: gzip``)
    can be read at any time. A ``text/event-stream`` body is also parsed as
    it arrives: :meth:`event`, :meth:`events` and ``async for`` hand out its
    events in order, and ``parser`` (an :class:`SseParser`) holds its
    ``retry``, ``last_event_id`` and ``comments``. Every wait raises what
    the app raised if it fails meanwhile, and TimeoutError past ``timeout``
    (the client's if None).
    """

    __slots__ = ("status", "raw_headers", "headers", "ended", "parser", "_what", "_timeout", "_app", "_scope",
                 "_request", "_left", "_body", "_events", "_inflate", "_unreadable", "_call")  # fmt: skip

    def __init__(self, app: ASGIApp, what: str, scope: Scope, body: bytes, timeout: float) -> None:
        #: The status code (0 until the app sends it).
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: dict[str, str] = {}
        #: The app has sent the end of the body.
        self.ended = False
        self.parser = SseParser(comments=True)
        self._what = what
        self._timeout = timeout
        self._app = app
        self._scope = scope
        self._request: Message | None = {"type": "http.request", "body": body, "more_body": False}
        # Done when receive() answers http.disconnect: the client left, or
        # the response is complete (as uvicorn does).
        self._left: asyncio.Future[None] | None = None
        self._body = bytearray()
        self._events: deque[SseEvent] = deque()
        self._inflate: Any = None  # a zlib decompressor, for a gzip body
        self._unreadable = ""  # why events cannot be read, or ""
        self._call: _AppCall | None = None  # the app's task, once entered

    def __repr__(self) -> str:
        state = "ended" if self.ended else "open"
        return f"<AsgiResponse {self._what}: {self.status}, {state}, {len(self._body)} bytes>"

    async def __aenter__(self) -> AsgiResponse:
        if self._call is not None:
            raise RuntimeError(f"{self._what}: a response is used once")
        self._left = asyncio.get_running_loop().create_future()
        self._call = _AppCall(self._what, self._timeout, self._app, self._scope, self._receive, self._send)
        try:
            await self._call.until(lambda: self.status != 0, "response start", None)
        except BaseException as exc:
            await self._leave(exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._leave(exc)

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return bytes(self._body)

    @property
    def text(self) -> str:
        """The body received so far, decoded as UTF-8."""
        return self._body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self._body)

    async def read(self, *, timeout: float | None = None) -> bytes:
        """The whole body, once the app has ended it."""
        await self._running().until(lambda: self.ended, "end of the body (an endless stream?)", timeout)
        return self.body

    async def event(self, *, timeout: float | None = None) -> SseEvent:
        """The next event: EOFError if the body ends first."""
        [event] = await self.events(1, timeout=timeout)
        return event

    async def events(self, n: int, *, timeout: float | None = None) -> list[SseEvent]:
        """The next ``n`` events, waited for together: EOFError if the body
        ends first (the events are kept for the next read)."""
        _check_int("n", n, 1)
        await self._until_events(n, timeout)
        if len(self._events) < n:
            raise EOFError(f"{self._what}: the body ended with {len(self._events)} of {n} events unread")
        return [self._events.popleft() for _ in range(n)]

    def __aiter__(self) -> AsgiResponse:
        return self

    async def __anext__(self) -> SseEvent:
        await self._until_events(1, None)
        if not self._events:
            raise StopAsyncIteration
        return self._events.popleft()

    # -- internals ---------------------------------------------------------------

    async def _leave(self, exc: BaseException | None) -> None:
        """The client leaves: ``http.disconnect``, then the app must return.
        When the block is being cancelled (``exc``), the app is cancelled at
        once instead, and the cancellation goes on."""
        call = self._running()
        _complete(self._left)
        if isinstance(exc, asyncio.CancelledError):
            await call.cancel()
        else:
            await call.end("the client's disconnect")

    def _running(self) -> _AppCall:
        if self._call is None:
            raise RuntimeError(f"{self._what}: use the response as `async with client.stream(...) as response:`")
        return self._call

    async def _until_events(self, n: int, timeout: float | None) -> None:
        call = self._running()
        if self._unreadable:
            raise ValueError(f"{self._what}: no events to read: {self._unreadable}")
        await call.until(lambda: len(self._events) >= n or self.ended, "event" if n == 1 else f"{n} events", timeout)

    # -- internals: the server's side of the request --------------------------------

    async def _receive(self) -> Message:
        request, self._request = self._request, None
        if request is not None:
            return request
        await asyncio.wait((cast("asyncio.Future[None]", self._left),))
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if not self.ended and cast("asyncio.Future[None]", self._left).done():
            return  # after the client left: dropped, as uvicorn does
        kind = message.get("type")
        if self.ended or kind != ("http.response.body" if self.status else "http.response.start"):
            state = "after the end of the body" if self.ended else "after its start" if self.status else "first"
            raise RuntimeError(f"{self._what}: the app sent {kind!r} {state}")
        if self.status:
            self._received(bytes(message.get("body", b"")), bool(message.get("more_body", False)))
        else:
            self._started(int(message["status"]), message.get("headers", ()))
        self._running().wake()

    def _started(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.raw_headers = [(bytes(name).lower(), bytes(value)) for name, value in headers]
        for raw_name, raw_value in self.raw_headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value
        media = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        coding = self.headers.get("content-encoding", "identity").strip().lower()
        self._unreadable = "" if media == "text/event-stream" else f"its content-type is {media!r}"
        if coding == "gzip":
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding != "identity":
            self._unreadable = f"its content-encoding is {coding!r}"

    def _received(self, chunk: bytes, more: bool) -> None:
        if self._inflate is not None:
            chunk = self._inflate.decompress(chunk)
        self._body += chunk
        if not self._unreadable:
            self._events.extend(self.parser.feed(chunk))
        if not more:
            self.ended = True
            _complete(self._left)


class AsgiClient:
    """A client of an ASGI 3 app, in process: for testing endpoints, endless
    event streams included, with no server, socket or extra dependency.

    Use it as ``async with AsgiClient(app) as client:``. With
    ``lifespan=True`` the app's lifespan starts there and shuts down at the
    end of the block (``lifespan.*.failed`` is a RuntimeError with the app's
    message; an exception the app raises comes through as it is; request
    scopes get a copy of its ``state``). Then::

        async with client.stream("GET", "/events", headers={"Last-Event-ID": "7"}) as response:
            assert response.status == 200
            event = await response.event()

    Entering ``stream()`` sends the request and waits for the status and
    headers; leaving it sends ``http.disconnect`` and waits for the app to
    return, so what the app cleans up is done when the block ends. ``await
    client.request(...)`` returns a complete response (a 401 with its JSON,
    say). Every wait is bounded by ``timeout`` seconds: past it, a
    TimeoutError names what did not come; an app that does not return after
    the disconnect is cancelled, and reported so. What the app raises is
    raised in the test by the first wait that sees it, else when the
    response's block ends.

    Requests look like uvicorn's: HTTP/1.1 from 127.0.0.1 to ``testserver``
    (a ``host`` header unless given), ASGI spec 2.3 (what the app sends
    after the client left is dropped). It runs on asyncio: under
    ``asyncio.run``, pytest-asyncio or anyio's pytest plugin (asyncio
    backend).
    """

    __slots__ = ("_app", "_lifespan", "_timeout", "_life")

    def __init__(self, app: ASGIApp, *, lifespan: bool = False, timeout: float = 5.0) -> None:
        _check_callable("app", app)
        self._app = app
        self._lifespan = _check_type("lifespan", lifespan, bool, "a bool")
        self._timeout = cast(float, _check_seconds("timeout", timeout))
        self._life: _Lifespan | None = None

    async def __aenter__(self) -> AsgiClient:
        if self._life is not None:
            raise RuntimeError("this AsgiClient is already in use")
        if self._lifespan:
            self._life = _Lifespan(self._app, self._timeout)
            try:
                await self._life.phase("startup")
            except BaseException:
                self._life = None
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        life, self._life = self._life, None
        if life is None:
            return
        if isinstance(exc, asyncio.CancelledError):
            await life.cancel()  # the cancellation goes on
        else:
            await life.phase("shutdown")

    def stream(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        json: object = _NO_JSON,
    ) -> AsgiResponse:
        """A request, sent when the response is entered (``async with``).

        ``path`` may carry a query string; ``query`` pairs are added to it.
        ``headers`` names are case-insensitive. ``json`` sends a value as a
        JSON body (with its content-type), instead of ``body``.
        """
        if self._lifespan and self._life is None:
            raise RuntimeError("a client with lifespan=True is used inside `async with AsgiClient(...)`")
        what, scope, content = self._request(method, path, query, headers, body, json)
        return AsgiResponse(self._app, what, scope, content, self._timeout)

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        json: object = _NO_JSON,
    ) -> AsgiResponse:
        """Send a request and return its whole response, once the app has
        returned (the arguments are ``stream()``'s)."""
        async with self.stream(method, path, query=query, headers=headers, body=body, json=json) as response:
            await response.read()
        return response

    def _request(
        self, method: object, path: object, query: object, headers: object, body: object, value: object
    ) -> tuple[str, Scope, bytes]:
        """Check a request's arguments: a name for it, its scope, its body."""
        if not _METHOD.fullmatch(_check_str("method", method)):
            raise ValueError(f"method must be an HTTP token: {method!r}")
        target = _check_str("path", path)
        if not target.startswith("/"):
            raise ValueError(f"path must start with '/': {target!r}")
        raw_path, _, raw_query = quote(target, safe=_PATH_SAFE + "?").partition("?")
        pairs = [(_check_str("query name", n), _check_str("query value", v)) for n, v in _pairs("query", query)]
        added = "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in pairs)
        query_string = "&".join(part for part in (raw_query, added) if part)
        content = _check_type("body", body, bytes, "bytes")
        fields = [
            _check_header((_check_str("header name", n).lower(), v), "the client")
            for n, v in _pairs("headers", headers)
        ]
        if value is not _NO_JSON:
            if content:
                raise ValueError("give a body or json, not both")
            content = _utf8("json", json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
            fields += [(b"content-type", b"application/json")] * all(name != b"content-type" for name, _ in fields)
        names = {name for name, _ in fields}
        fields = [(b"host", b"testserver")] * (b"host" not in names) + fields
        fields += [(b"content-length", str(len(content)).encode())] * bool(content)
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("ascii"),
            "query_string": query_string.encode("ascii"),
            "root_path": "",
            "headers": fields,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {} if self._life is None else dict(self._life.state),
        }
        return f"{method} {target}", scope, content


def _pairs(name: str, value: object) -> list[tuple[object, object]]:
    """A mapping's items, or an iterable's (name, value) pairs."""
    if isinstance(value, Mapping):
        return list(cast("Mapping[object, object]", value).items())
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a mapping or (name, value) pairs, not {type(value).__name__}")
    pairs = list(cast("Iterable[object]", value))
    for pair in pairs:
        if not isinstance(pair, tuple) or len(cast("tuple[object, ...]", pair)) != 2:
            raise TypeError(f"each of {name} must be a (name, value) pair, got {pair!r}")
    return cast("list[tuple[object, object]]", pairs)
