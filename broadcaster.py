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
    its last stream leaves: closed, ended by the policy, or garbage-collected
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

Threads and loops
    Every ``Broadcaster`` method is thread-safe. A stream is bound to the event
    loop that subscribed it and is read on that loop only. ``send`` called on
    that loop delivers synchronously; called from any other thread it delivers
    through ``loop.call_soon_threadsafe``, so one thread's sends to one key keep
    their order.

Server-Sent Events
    :class:`Event` validates and encodes one frame at construction, so an event
    sent to 10,000 subscribers is encoded once. ``response()`` and ``channel()``
    return ASGI 3 apps that write the ``text/event-stream`` body: headers and a
    first chunk at once, then each event as soon as it is read (with the
    events already waiting behind it in the same body message), keep-alive
    comments on silence, disconnect detection by a concurrent ``receive()``
    watcher, a bound on every ``send()``, and on every way out the event
    source is closed and no task is left behind.
"""

# pyright: strict, reportPrivateUsage=false
# (One module: a leading underscore marks what is not public API, and the
# module's own classes share such members; the rule is meant for other modules.)

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import re
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    MutableMapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Final, Generic, TypeVar, cast, overload
from urllib.parse import unquote_to_bytes

__all__ = [
    "Broadcaster",
    "BroadcastStream",
    "Event",
    "LagPolicy",
    "Lagged",
    "Sender",
    "SseConfig",
    "ClientDisconnected",
    "last_event_id",
    "replay",
]

logger: Final = logging.getLogger("broadcaster")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S")
_S = TypeVar("_S", bound="BroadcastStream[Any]")

# ASGI types, loose on purpose: they are the conventional ones (the same as
# ``starlette.types``), so an app returned here is assignable to any framework's
# app type under ``mypy --strict``.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------------------
# Encoding: one SSE frame per Event (WHATWG HTML, "Server-sent events")
# ---------------------------------------------------------------------------

# The line breaks of the event-stream format: CRLF, lone CR, lone LF. Nothing
# else (str.splitlines would also split on U+2028, VT, FF, ..., which a browser
# keeps inside the data).
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
# Characters that would end or truncate a one-line field on the client: CR and
# LF end the line, and a browser ignores an ``id`` containing NUL.
_FIELD_FORBIDDEN: Final = re.compile(r"[\r\n\x00]")


# The checks below take ``object``: annotations are not enforced at run time,
# and every public entry point validates what it is given.

_X = TypeVar("_X")


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


# ---------------------------------------------------------------------------
# Configuration of the SSE responses
# ---------------------------------------------------------------------------

# Header names on the wire: lowercase RFC 9110 tokens.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Control characters other than HTAB, which RFC 9110 forbids in a field value
# (servers such as h11 would refuse them at send time, mid-response).
_HEADER_VALUE_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers that describe the framing of the body; the server owns them, and a
# user value would corrupt the stream (a content-length on an endless body).
_FRAMING_HEADERS: Final = frozenset({"connection", "content-length", "transfer-encoding"})
_BASE_HEADERS: Final = (
    ("content-type", "text/event-stream; charset=utf-8"),
    # Proxies and browsers must not cache or coalesce a live stream.
    ("cache-control", "no-cache"),
    # nginx buffers proxied responses unless told not to.
    ("x-accel-buffering", "no"),
)


def _check_seconds(name: str, value: object) -> float:
    """A positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


def _check_header(pair: object) -> tuple[str, str]:
    """A (name, value) pair of strs (their content is checked by SseConfig)."""
    if isinstance(pair, tuple):
        items = cast("tuple[object, ...]", pair)
        if len(items) == 2:
            return _check_str("header name", items[0]), _check_str("header value", items[1])
    raise TypeError(f"each header must be a (name, value) tuple, got {pair!r}")


def _check_optional_seconds(name: str, value: object) -> float | None:
    """A positive, finite number of seconds, or None (which disables something)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be > 0 and finite (use None to disable), got {value!r}")
    return float(value)


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
            is treated as dead and the response ends. The default, 30 s, is far
            above any healthy write (a server's send returns once the bytes are
            in the socket buffer) and well under the minutes a dead peer can hold
            a TCP connection open. ``None`` waits forever.
        headers: extra response headers as ``(name, value)`` pairs. A name equal
            to a built-in header's replaces it.

    Raises:
        TypeError: a field of the wrong type.
        ValueError: a non-positive or non-finite time; CR or LF in the comment;
            a header name that is not a lowercase token, a framing header
            (``connection``, ``content-length``, ``transfer-encoding``) or a
            value that is not latin-1 or holds CR, LF or NUL.
    """

    keep_alive: float | None = 15.0
    keep_alive_comment: str = ""
    retry: int | None = None
    send_timeout: float | None = 30.0
    headers: tuple[tuple[str, str], ...] = ()
    # Derived once, so a response does no work to build them.
    _start: tuple[tuple[bytes, bytes], ...] = dataclasses.field(init=False, repr=False, compare=False)
    _first_chunk: bytes = dataclasses.field(init=False, repr=False, compare=False)
    _keep_alive_frame: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_optional_seconds("keep_alive", self.keep_alive)
        _check_optional_seconds("send_timeout", self.send_timeout)
        comment = _check_str("keep_alive_comment", self.keep_alive_comment)
        if "\r" in comment or "\n" in comment:
            raise ValueError(f"keep_alive_comment must not contain CR or LF: {comment!r}")
        keep_alive = _utf8("keep_alive_comment", f": {comment}\n\n" if comment else ":\n\n")
        first = b":\n\n" if self.retry is None else f"retry: {_check_int('retry', self.retry, 0)}\n\n".encode()
        extra: list[tuple[bytes, bytes]] = []
        pairs = cast(
            "tuple[object, ...]", _check_type("headers", self.headers, tuple, "a tuple of (name, value) pairs")
        )
        for pair in pairs:
            name, value = _check_header(pair)
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name must be a lowercase token: {name!r}")
            if name in _FRAMING_HEADERS:
                raise ValueError(f"header {name!r} is owned by the server and would corrupt the stream")
            if _FIELD_FORBIDDEN.search(value):
                raise ValueError(f"header {name!r} value must not contain CR, LF or NUL: {value!r}")
            if _HEADER_VALUE_CONTROL.search(value):
                raise ValueError(f"header {name!r} value must not contain control characters: {value!r}")
            if value != value.strip(" \t"):
                raise ValueError(f"header {name!r} value must not start or end with whitespace: {value!r}")
            try:
                extra.append((name.encode("ascii"), value.encode("latin-1")))
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r} value must be latin-1: {value!r}") from None
        names = {name for name, _ in extra}
        start = [(n.encode(), v.encode()) for n, v in _BASE_HEADERS if n.encode() not in names] + extra
        object.__setattr__(self, "_start", tuple(start))
        object.__setattr__(self, "_first_chunk", first)
        object.__setattr__(self, "_keep_alive_frame", keep_alive)


# ---------------------------------------------------------------------------
# Streams and the registry
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


_EMPTY: Final[Any] = object()  # a _Subscriber's ``one`` when it holds no item


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
    # costs 760 bytes, more than the rest of an idle subscription.
    one: Any = _EMPTY
    queue: deque[Any] | None = None
    # History entries a resumed stream yields before its queue (not bounded by
    # the buffer: they are references to items the channel retains anyway).
    backlog: deque[Any] | None = None
    # Items dropped so far, and how many of them the reader has been told of.
    lagged: int = 0
    reported: int = 0
    # No item will be added any more: the reader drains the queue, then stops.
    ended: bool = False
    # The future a reader blocked in __anext__ sleeps on; None when no one waits.
    waiter: asyncio.Future[None] | None = None


class _Entry:
    """An item with its id, as a channel with history retains and delivers it.

    An :class:`Event` item is stored as a copy whose ``id`` is the entry's, so
    the id travels with the event through any wrapper of the stream (and the
    copy is encoded once, for every subscriber)."""

    __slots__ = ("id", "item")

    def __init__(self, id: str, item: object) -> None:
        self.id = id
        if isinstance(item, Event) and item.id != id:
            item = dataclasses.replace(item, id=id)
        self.item = item

    def with_id(self, frame: bytes) -> bytes:
        """``frame`` with this entry's id as its last field. The last ``id:``
        line of an event wins on the client, so it replaces any id of its own."""
        return frame[:-1] + f"id: {self.id}\n\n".encode()


class _Channel:
    """The subscribers of one key, and its history when the broadcaster keeps one."""

    __slots__ = ("members", "groups", "history", "epoch", "seq", "expires")

    def __init__(self, history: int) -> None:
        # Insertion-ordered set of the key's subscribers.
        self.members: dict[_Subscriber, None] = {}
        # ``members`` grouped by event loop, as immutable tuples for send() to
        # iterate without a lock; None after any change (rebuilt lazily).
        self.groups: tuple[tuple[asyncio.AbstractEventLoop, tuple[_Subscriber, ...]], ...] | None = None
        # The last ``history`` entries, oldest first; None without history.
        self.history: deque[_Entry] | None = deque(maxlen=history) if history else None
        # Ids are f"{epoch}-{seq}": the epoch is random per channel lifetime, so
        # an id of another lifetime or process is never mistaken for one of ours.
        self.epoch = secrets.token_hex(6) if history else ""
        self.seq = 0
        # time.monotonic() deadline of a lingering channel (no members); else None.
        self.expires: float | None = None


def _wake(sub: _Subscriber) -> None:
    waiter = sub.waiter
    if waiter is not None:
        sub.waiter = None
        if not waiter.done():
            waiter.set_result(None)


def _deliver(subs: tuple[_Subscriber, ...], item: object, buffer: int) -> None:
    """Append ``item`` to every open subscriber's queue (on their loop's thread)."""
    for sub in subs:
        if sub.ended:
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
        queue.append(item)


def _after(channel: _Channel, last_id: str) -> deque[_Entry] | None:
    """The retained entries after ``last_id``, or None if the channel cannot
    tell what comes after it: an id it did not issue, or one so old that some
    entry after it has been dropped already. Its own ids are found by their
    number (``<epoch>-0`` means "before the first item", so it replays the
    whole history while nothing has been dropped); ids given to
    ``send(id=...)`` by an exact match."""
    history = channel.history
    assert history is not None, "only channels with history resume"
    epoch, _, number = last_id.rpartition("-")
    if epoch != channel.epoch:
        for index, entry in enumerate(history):
            if entry.id == last_id:
                return deque(itertools.islice(history, index + 1, None))
        return None
    if not (number.isascii() and number.isdigit()) or str(int(number)) != number:
        return None
    seq = int(number)
    oldest = channel.seq - len(history) + 1  # the sequence number of history[0]
    if not oldest - 1 <= seq <= channel.seq:
        return None
    return deque(itertools.islice(history, seq - oldest + 1, None))


def _groups(channel: _Channel) -> tuple[tuple[asyncio.AbstractEventLoop, tuple[_Subscriber, ...]], ...]:
    """Group the channel's members by loop and cache that (lock held)."""
    groups = tuple((loop, tuple(subs)) for loop, subs in _by_loop(channel.members).items())
    channel.groups = groups
    return groups


def _dispatch(
    groups: Iterable[tuple[asyncio.AbstractEventLoop, Sequence[_Subscriber]]],
    fn: Callable[..., None],
    args: tuple[Any, ...],
    *,
    direct: bool,
) -> int:
    """Run ``fn(subs, *args)`` for each loop's subscribers on that loop's thread.

    For the caller's own loop, at once if ``direct``, else through ``call_soon``
    (behind what is already queued there); for any other loop through
    ``call_soon_threadsafe``. Returns how many subscribers were addressed; those
    of a closed loop are skipped, since nobody can read them.
    """
    running = _running_loop()
    count = 0
    for loop, subs in groups:
        if loop is running and direct:
            fn(subs, *args)
        else:
            try:
                (loop.call_soon if loop is running else loop.call_soon_threadsafe)(fn, subs, *args)
            except RuntimeError:  # that loop is closed
                continue
        count += len(subs)
    return count


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _by_loop(subs: Iterable[_Subscriber]) -> dict[asyncio.AbstractEventLoop, list[_Subscriber]]:
    groups: dict[asyncio.AbstractEventLoop, list[_Subscriber]] = {}
    for sub in subs:
        groups.setdefault(sub.loop, []).append(sub)
    return groups


def _end(subs: Iterable[_Subscriber]) -> None:
    """Let every subscriber drain its queue and then stop (on their loop's thread)."""
    for sub in subs:
        sub.ended = True
        _wake(sub)


class BroadcastStream(AsyncIterator[T_co], Generic[T_co]):
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

    __slots__ = ("_sub", "_policy", "_leave", "_ids", "_resumed", "_last", "__weakref__")

    def __init__(
        self,
        sub: _Subscriber,
        leave: Callable[[_Subscriber], None],
        ids: bool = False,
        resumed: bool | None = None,
    ) -> None:
        self._sub = sub
        self._policy = LagPolicy.ERROR
        # With history, the queues hold _Entry objects: the stream yields their
        # items and keeps the last entry (for its id, and for the SSE response).
        self._ids = ids
        self._resumed = resumed
        self._last: _Entry | None = None
        # Leaving the channel happens exactly once: at close(), or when the
        # stream is garbage-collected. The finalizer holds ``sub``, never self.
        self._leave = weakref.finalize(self, leave, sub)
        self._leave.atexit = False

    def on_lag(self: _S, policy: LagPolicy) -> _S:
        """Set what the next read does after items were dropped; returns self."""
        self._policy = _check_type("policy", policy, LagPolicy, "a LagPolicy")
        return self

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
        sub = self._sub
        return (sub.one is not _EMPTY) + (len(sub.queue) if sub.queue else 0) + (len(sub.backlog) if sub.backlog else 0)

    @property
    def resumed(self) -> bool | None:
        """Whether ``subscribe(key, last_event_id=...)`` could resume: True if the
        stream replays everything after that id, False if it could not (unknown
        or too old an id: tell the client to reload its state), None if no id
        was given."""
        return self._resumed

    @property
    def last_event_id(self) -> str | None:
        """The id of the last item this stream yielded (None without history)."""
        return None if self._last is None else self._last.id

    @property
    def closed(self) -> bool:
        """True once no item will be added: closed, removed or broadcaster closed."""
        return self._sub.ended

    def __aiter__(self: _S) -> _S:
        return self

    def _take(self, limit: int) -> list[Any]:
        """Remove and return, in order, up to ``limit`` of the items the next
        reads would return without waiting (none while a lag is due: the next
        read must report it). With history they are the entries, and the last
        one becomes ``_last``. The SSE pump writes them with the item it read."""
        sub = self._sub
        if sub.lagged != sub.reported:
            return []
        queue = sub.backlog or sub.queue
        if queue:
            if len(queue) > limit:
                taken = [queue.popleft() for _ in range(limit)]
            else:  # all of it: drop the drained deque
                taken = list(queue)
                if queue is sub.backlog:
                    sub.backlog = None
                else:
                    sub.queue = None
        elif sub.one is not _EMPTY:
            taken = [sub.one]
            sub.one = _EMPTY
        else:
            return []
        if self._ids:
            self._last = taken[-1]
        return taken

    def _report_lag(self) -> None:
        """Apply the lag policy to the items dropped since the last report."""
        sub = self._sub
        missed = sub.lagged - sub.reported
        sub.reported = sub.lagged
        if self._policy is LagPolicy.ERROR:
            raise Lagged(missed)
        if self._policy is LagPolicy.END:
            self.close()

    async def __anext__(self) -> T_co:
        sub = self._sub
        while True:
            if sub.lagged != sub.reported:
                self._report_lag()
            if sub.backlog:
                entry = sub.backlog.popleft()
                if not sub.backlog:
                    sub.backlog = None
            elif sub.one is not _EMPTY:
                entry = sub.one
                sub.one = _EMPTY
            elif sub.queue:
                entry = sub.queue.popleft()
                if not sub.queue:
                    sub.queue = None
            elif sub.ended:
                raise StopAsyncIteration
            else:
                waiter = sub.loop.create_future()
                sub.waiter = waiter
                try:
                    await waiter
                finally:
                    if sub.waiter is waiter:
                        sub.waiter = None
                continue
            if self._ids:
                self._last = entry
                entry = entry.item
            item: T_co = entry
            return item

    def close(self) -> None:
        """Leave the channel now and discard what is buffered. Idempotent."""
        sub = self._sub
        sub.ended = True
        sub.queue = sub.backlog = None
        sub.one = _EMPTY
        _wake(sub)
        self._leave()

    async def aclose(self) -> None:
        """The same as :meth:`close`, for ``contextlib.aclosing`` and friends."""
        self.close()

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        sub = self._sub
        state = "ended" if sub.ended else "open"
        return f"<BroadcastStream key={sub.key!r} {state} queued={self.queued} lagged={sub.lagged}>"


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
        ValueError: ``buffer < 1``, ``history < 0``, or ``linger`` not a
            positive finite number.
    """

    def __init__(
        self,
        buffer: int = 64,
        config: SseConfig | None = None,
        *,
        history: int = 0,
        linger: float = 30.0,
        on_change: Callable[[K], object] | None = None,
    ) -> None:
        self._buffer: Final = _check_int("buffer", buffer, 1)
        self._config: Final = (
            SseConfig() if config is None else _check_type("config", config, SseConfig, "an SseConfig")
        )
        self._history: Final = _check_int("history", history, 0)
        self._linger: Final = _check_seconds("linger", linger)
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable or None, not {type(on_change).__name__}")
        self._on_change: Final = on_change
        # Keyed by K; typed Hashable so a subscriber's key indexes it too.
        self._channels: dict[Hashable, _Channel] = {}
        self._closed = False
        # Guards _channels and every _Channel.members. Leaving never blocks on
        # it: a leave (which may run inside the garbage collector, on any thread,
        # even while this thread holds the lock) is queued in _leaving and done
        # by whoever holds the lock when it releases it; see _unlock().
        self._lock = threading.Lock()
        self._leaving: deque[_Subscriber] = deque()
        # Channels with history and no members, by key, in expiry order (every
        # channel lingers equally long); swept whenever the lock is released.
        self._lingering: dict[Hashable, _Channel] = {}
        # The running channel() responses, for close() to end.
        self._sources: set[_ChannelSource] = set()
        # Keys whose channel appeared or went, for on_change (lock held to
        # append; handed to on_change after the lock is released).
        self._changed: deque[Any] = deque()  # of K

    # -- locking ------------------------------------------------------------

    def _unlock(self) -> None:
        """Release the lock after doing every queued leave.

        Invariant: a subscriber appended to ``_leaving`` is removed by a thread
        that holds the lock after the append. A leaver that fails to take the
        lock relies on the holder; the holder re-checks after releasing.
        """
        while True:
            while self._leaving:
                self._drop(self._leaving.popleft())
            if self._lingering:
                self._expire()
            self._lock.release()
            if not self._leaving or not self._lock.acquire(blocking=False):
                break
        if self._changed:
            self._notify()

    def _changes(self, key: Hashable) -> None:
        # Lock held: the channel of ``key`` appeared or went.
        if self._on_change is not None:
            self._changed.append(key)

    def _notify(self) -> None:
        """Hand the changed keys to on_change, outside the lock."""
        on_change = self._on_change
        assert on_change is not None, "keys are recorded only for an on_change hook"
        while self._changed:
            try:
                key = self._changed.popleft()
            except IndexError:  # another releasing thread took the last one
                return
            try:
                on_change(key)
            except Exception:
                logger.exception("Broadcaster on_change hook raised for key %r", key)

    def _leave(self, sub: _Subscriber) -> None:
        """Take ``sub`` out of its channel now, or as soon as the lock is free."""
        self._leaving.append(sub)
        if self._lock.acquire(blocking=False):
            self._unlock()

    def _drop(self, sub: _Subscriber) -> None:
        # Lock held. A subscriber whose channel was removed (or replaced by a
        # newer channel of the same key) is in no channel: nothing to do.
        channel = self._channels.get(sub.key)
        if channel is None or sub not in channel.members:
            return
        del channel.members[sub]
        channel.groups = None
        if channel.members:
            return
        if channel.history is None:
            del self._channels[sub.key]
            self._changes(sub.key)
        else:
            channel.expires = time.monotonic() + self._linger
            self._lingering[sub.key] = channel

    def _adopt(self, source: _ChannelSource) -> bool:
        """Register a starting channel() source; False if closed already."""
        self._lock.acquire()
        try:
            if self._closed:
                return False
            self._sources.add(source)
            return True
        finally:
            self._unlock()

    def _disown(self, source: _ChannelSource) -> None:
        self._lock.acquire()
        try:
            self._sources.discard(source)
        finally:
            self._unlock()

    def _expire(self) -> None:
        # Lock held. Forget the lingering channels whose time is up.
        now = time.monotonic()
        while self._lingering:
            key = next(iter(self._lingering))
            expires = self._lingering[key].expires
            assert expires is not None, "a lingering channel has a deadline"
            if expires > now:
                return
            del self._lingering[key]
            del self._channels[key]
            self._changes(key)

    def _sweep(self) -> None:
        """Expire lingering channels now (for reads that take no lock otherwise)."""
        if self._lingering:
            self._lock.acquire()
            self._unlock()

    # -- the registry ---------------------------------------------------------

    def subscribe(self, key: K, last_event_id: str | None = None) -> BroadcastStream[T]:
        """A new stream of every item sent to ``key`` from now on.

        Creates the key's channel if it has none. After ``close()`` the stream is
        returned already ended (it yields nothing), so a request that arrives
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
        """
        if last_event_id is not None:
            _check_type("last_event_id", last_event_id, str, "a str or None")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("Broadcaster.subscribe() needs a running event loop: call it from async code") from None
        hash(key)
        sub = _Subscriber(key, loop)
        resumed: bool | None = None if last_event_id is None else False
        self._lock.acquire()
        try:
            if self._closed:
                sub.ended = True
            else:
                channel = self._channels.get(key)
                if channel is None:
                    channel = self._channels[key] = _Channel(self._history)
                    self._changes(key)
                elif channel.expires is not None:
                    channel.expires = None
                    del self._lingering[key]
                channel.members[sub] = None
                channel.groups = None
                if last_event_id is not None and channel.history is not None:
                    # Under the lock, as send() appends and snapshots under it:
                    # every later entry reaches this stream live, every earlier
                    # one is in the backlog.
                    backlog = _after(channel, last_event_id)
                    if backlog is not None:
                        sub.backlog = backlog or None  # None: nothing to replay
                        resumed = True
        finally:
            self._unlock()
        return BroadcastStream(sub, self._leave, self._history > 0, resumed)

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
            ValueError: ``id`` without history, or holding CR, LF or NUL.
        """
        if self._history:
            if id is not None:
                _check_field("id", id)
            return self._send_with_history(key, item, id)
        if id is not None:
            raise ValueError("send(id=...) needs a broadcaster with history")
        channel = self._channels.get(key)
        if channel is None:
            return 0
        groups = channel.groups
        if groups is None:
            self._lock.acquire()
            try:
                groups = _groups(channel)
            finally:
                self._unlock()
        if len(groups) == 1 and groups[0][0] is _running_loop():
            # The common case, spelled out (a third of the cost of a send to
            # one stream): every subscriber is on the caller's loop.
            _deliver(groups[0][1], item, self._buffer)
            return len(groups[0][1])
        return _dispatch(groups, _deliver, (item, self._buffer), direct=True)

    def _send_with_history(self, key: K, item: T, id: str | None) -> int:
        self._lock.acquire()
        try:
            channel = self._channels.get(key)
            if channel is None:
                return 0
            assert channel.history is not None, "a broadcaster with history gives every channel one"
            channel.seq += 1
            entry = _Entry(f"{channel.epoch}-{channel.seq}" if id is None else id, item)
            channel.history.append(entry)
            groups = channel.groups if channel.groups is not None else _groups(channel)
            # Scheduled while the lock is held, so the deliveries of concurrent
            # sends queue up on every loop in the order of their ids.
            return _dispatch(groups, _deliver, (entry, self._buffer), direct=False)
        finally:
            self._unlock()

    def subscriber_count(self, key: K) -> int:
        """How many streams are subscribed to ``key`` (0 if it has no channel)."""
        channel = self._channels.get(key)
        return 0 if channel is None else len(channel.members)

    def remove(self, key: K) -> None:
        """End every stream of ``key`` once it drains what it was sent, and forget
        the channel and its history at once. A later ``subscribe(key)`` makes a
        fresh one. No-op for a key without a channel."""
        self._lock.acquire()
        try:
            channel = self._channels.pop(key, None)
            self._lingering.pop(key, None)
            if channel is not None:
                self._changes(key)
        finally:
            self._unlock()
        if channel is not None:
            self._end_all(channel)

    def close(self) -> None:
        """End every stream of every key (each drains first) and every running
        ``channel()`` response, and refuse new ones: later ``subscribe`` calls
        return ended streams, ``send`` returns 0. Idempotent.

        Thread-safe, but not for a signal handler: one runs in the middle of
        whatever the main thread was doing, possibly holding the registry lock.
        From a handler, ``loop.call_soon_threadsafe(broadcaster.close)``.
        """
        self._lock.acquire()
        try:
            self._closed = True
            channels = list(self._channels.values())
            for key in self._channels:
                self._changes(key)
            self._channels.clear()
            self._lingering.clear()
            sources, self._sources = self._sources, set()
        finally:
            self._unlock()
        for channel in channels:
            self._end_all(channel)
        running = _running_loop()
        for source in sources:
            assert source._loop is not None, "an adopted source has started on a loop"
            if source._loop is running:
                source._shutdown()
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    source._loop.call_soon_threadsafe(source._shutdown)

    def _end_all(self, channel: _Channel) -> None:
        # The channel is out of the registry: its members no longer change.
        # With history the end queues up behind the deliveries already
        # scheduled on each loop, so every stream drains them first.
        _dispatch(_by_loop(channel.members).items(), _end, (), direct=not self._history)

    @property
    def buffer(self) -> int:
        """The per-stream bound given at construction."""
        return self._buffer

    @property
    def config(self) -> SseConfig:
        """The SSE configuration given at construction."""
        return self._config

    @property
    def history(self) -> int:
        """How many items each channel retains (0: no history, no ids)."""
        return self._history

    @property
    def linger(self) -> float:
        """Seconds a channel with history outlives its last stream."""
        return self._linger

    def __len__(self) -> int:
        """The number of live channels: keys with at least one stream, and with
        history, keys whose channel still lingers."""
        self._sweep()
        return len(self._channels)

    def __contains__(self, key: object) -> bool:
        self._sweep()
        return key in self._channels

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Broadcaster {state} channels={len(self._channels)} buffer={self._buffer}>"

    # -- SSE responses --------------------------------------------------------

    @overload
    def response(self, events: AsyncIterable[Event], *, on_gap: Event | None = None) -> ASGIApp: ...

    @overload
    def response(
        self, events: AsyncIterable[S], render: Callable[[S], Event], *, on_gap: Event | None = None
    ) -> ASGIApp: ...

    def response(
        self,
        events: AsyncIterable[Any],
        render: Callable[[Any], Event] | None = None,
        *,
        on_gap: Event | None = None,
    ) -> ASGIApp:
        """An ASGI app that streams ``events`` as ``text/event-stream``.

        ``render`` maps each item to its :class:`Event` (needed unless the items
        are Events). When ``events`` is a stream of a broadcaster with history,
        each event is written with its item's id (replacing any id of its own),
        so the client's ``Last-Event-ID`` resumes it; ``on_gap``, if given, is
        written first when that stream could not resume (``resumed is False``),
        so the client knows to reload its state.

        Call it once per request. ``events`` is closed (``aclose()``, when it has
        one) on every way out; see :class:`_SseApp` for the wire behaviour.
        """
        return _SseApp(events, self._config, render, on_gap)

    def channel(self, fn: Callable[[Sender], Awaitable[None]]) -> ASGIApp:
        """An ASGI app that streams what ``fn`` sends through its :class:`Sender`.

        ``fn`` starts when the response starts (never for ``HEAD``); its queue
        holds ``buffer`` events, so a fast ``fn`` waits for a slow client. Every
        event it sent is written before the end. The response ends cleanly when
        ``fn`` returns, ends cleanly with an ERROR log when it raises, and
        cancels it when the client goes away. ``close()`` cancels it too and
        ends the response cleanly after what it sent; after ``close()`` a new
        channel response ends at once without starting ``fn``.
        """
        return _SseApp(_ChannelSource(fn, self._buffer, self), self._config)


# ---------------------------------------------------------------------------
# Helpers for resuming: Last-Event-ID and replay
# ---------------------------------------------------------------------------


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


class _Replay(AsyncIterator[T], Generic[T]):
    """What :func:`replay` returns: ``items``, then ``live``.

    ``aclose()`` closes both, even when iteration never started (which a bare
    async generator cannot promise: its ``finally`` would not run).
    """

    __slots__ = ("_sync_items", "_async_items", "_live", "_closed")

    def __init__(self, items: Iterable[T] | AsyncIterable[T], live: AsyncIterable[T] | None) -> None:
        # At most one of the two is set until the items are exhausted.
        self._sync_items: Iterator[T] | None = None
        self._async_items: AsyncIterator[T] | None = None
        if isinstance(items, AsyncIterable):
            self._async_items = aiter(items)
        else:
            self._sync_items = iter(items)
        self._live = None if live is None else aiter(live)
        self._closed = False

    def __aiter__(self) -> _Replay[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        if self._sync_items is not None:
            try:
                return next(self._sync_items)
            except StopIteration:
                self._sync_items = None
        if self._async_items is not None:
            try:
                return await anext(self._async_items)
            except StopAsyncIteration:
                self._async_items = None
        if self._live is None:
            raise StopAsyncIteration
        return await anext(self._live)

    async def aclose(self) -> None:
        """Close the replayed items' iterator and ``live``. Idempotent."""
        self._closed = True
        items = self._sync_items if self._sync_items is not None else self._async_items
        self._sync_items = self._async_items = None
        live, self._live = self._live, None
        try:
            if items is not None:
                await _close(items)
        finally:
            if live is not None:
                await _close(live)

    async def __aenter__(self) -> _Replay[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _close(iterator: object) -> None:
    """``aclose()`` an async iterator, or ``close()`` a generator, if it can."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def replay(items: Iterable[T] | AsyncIterable[T], live: AsyncIterable[T] | None = None) -> _Replay[T]:
    """Yield ``items`` (plain or async iterable), then everything from ``live``.

    The race-free order to resume a client is: subscribe first, then load what
    it missed, then ``replay(missed, stream)``. Loading first would lose what is
    sent between the load and the subscribe; subscribing first can at worst
    deliver an item both in ``missed`` and live, which the app can drop by id.
    """
    return _Replay(items, live)


# ---------------------------------------------------------------------------
# The ASGI layer
# ---------------------------------------------------------------------------


class Sender:
    """How a ``channel()`` closure sends events to its one client.

    Its queue holds at most ``limit`` events; ``send`` waits for room, so a fast
    closure is paced by a slow client.
    """

    __slots__ = ("_items", "_limit", "_closed", "_finished", "_error", "_reader", "_putters")

    def __init__(self, limit: int) -> None:
        self._items: deque[Event] = deque()
        self._limit = limit
        # The response is over (client gone, or ended): send() raises.
        self._closed = False
        # The closure returned or raised (with _error): the reader stops after the queue.
        self._finished = False
        self._error: BaseException | None = None
        # The response's reader, when it waits for an event or the end.
        self._reader: asyncio.Future[None] | None = None
        # Closures waiting for room; all are woken when room frees and re-check.
        self._putters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        """True once the response is over; ``send`` then raises ClientDisconnected."""
        return self._closed

    async def send(self, event: Event) -> None:
        """Queue ``event`` for the client, waiting while the queue is full.

        Raises:
            TypeError: ``event`` is not an :class:`Event`.
            ClientDisconnected: the client is gone or the response is over.
        """
        _check_type("Sender.send() event", event, Event, "an Event")
        while True:
            if self._closed or self._finished:
                raise ClientDisconnected("the client is gone or the response is over")
            if len(self._items) < self._limit:
                break
            room = asyncio.get_running_loop().create_future()
            self._putters.append(room)
            await room
        self._items.append(event)
        self._wake_reader()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None:
            self._reader = None
            if not reader.done():
                reader.set_result(None)

    def _wake_putters(self) -> None:
        putters, self._putters = self._putters, []
        for room in putters:
            if not room.done():
                room.set_result(None)

    async def _get(self) -> Event:
        while True:
            if self._items:
                event = self._items.popleft()
                self._wake_putters()
                return event
            if self._finished:
                error, self._error = self._error, None
                # ClientDisconnected means the closure saw the response end.
                if error is not None and not isinstance(error, ClientDisconnected):
                    raise error
                raise StopAsyncIteration
            reader = asyncio.get_running_loop().create_future()
            self._reader = reader
            try:
                await reader
            finally:
                if self._reader is reader:
                    self._reader = None

    def _finish(self, error: BaseException | None) -> None:
        self._finished = True
        self._error = error
        self._wake_reader()
        self._wake_putters()

    def _close(self) -> None:
        self._closed = True
        self._wake_putters()


class _ChannelSource:
    """The event source of a ``channel()`` response: ``fn`` run in a task it owns.

    The task starts at the first read, unless the broadcaster is closed (then
    the response just ends). While it runs the broadcaster knows the source, so
    that ``Broadcaster.close()`` can end it; ``aclose`` cancels and awaits it.
    """

    __slots__ = ("_fn", "_sender", "_task", "_owner", "_loop")

    def __init__(self, fn: Callable[[Sender], Awaitable[None]], limit: int, owner: Broadcaster[Any, Any]) -> None:
        self._fn = fn
        self._sender = Sender(limit)
        self._task: asyncio.Task[None] | None = None
        self._owner = owner
        self._loop: asyncio.AbstractEventLoop | None = None

    def __aiter__(self) -> _ChannelSource:
        return self

    async def __anext__(self) -> Event:
        if self._task is None and self._loop is None:
            self._loop = asyncio.get_running_loop()
            if self._owner._adopt(self):
                self._task = self._loop.create_task(self._run())
            else:  # the broadcaster is closed: end at once
                self._sender._close()
                self._sender._finish(None)
        return await self._sender._get()

    def _take(self, limit: int) -> list[Event]:
        """Remove and return, in order, up to ``limit`` of the events queued."""
        items = self._sender._items
        taken = [items.popleft() for _ in range(min(limit, len(items)))]
        if taken:
            self._sender._wake_putters()
        return taken

    def _shutdown(self) -> None:
        """End the response for ``Broadcaster.close()`` (on the source's loop):
        the closure is cancelled, what it already sent is still written, then
        the response ends cleanly. Harmless once the response has ended (a
        close() from another thread can be scheduled just before that)."""
        self._sender._close()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        error: BaseException | None = None
        try:
            await self._fn(self._sender)
        except Exception as exc:
            error = exc
        except BaseException as exc:
            # A closure that ends by a cancellation it did not get from us (it
            # awaited something that was cancelled) still ends the response.
            if not self._sender._closed:
                error = RuntimeError(f"the channel closure exited with {exc!r}")
                error.__cause__ = exc
            raise
        finally:
            self._sender._finish(error)

    async def aclose(self) -> None:
        sender = self._sender
        sender._close()
        task = self._task
        if task is None:
            return
        self._owner._disown(self)
        task.cancel()
        try:
            await _settle(task)
        finally:
            # The ended task's exception holds the closure's frames, which hold
            # this source: forget the task, or the three live on in a cycle.
            self._task = None
            # An error the closure raised that the response never read (it ended
            # first, e.g. on disconnect) is still reported, once. Sending after the
            # client left is how a closure learns it left: not an error.
            error, sender._error = sender._error, None
            if error is not None and not isinstance(error, ClientDisconnected):
                logger.error("SSE channel closure raised after the response ended", exc_info=error)


_FINAL: Final = {"type": "http.response.body", "body": b"", "more_body": False}

# How many events the pump writes in one body message at most: the one it read
# and those that were waiting behind it (the default buffer: a message holds
# no more than a stream could).
_GATHER: Final = 64


class _Writes:
    """What the event pump tells the supervisor of a response (one loop, no lock)."""

    __slots__ = ("lock", "sending_since", "last_write", "stopping")

    def __init__(self, now: float) -> None:
        # Serialises the pump's event writes with the supervisor's keep-alives.
        self.lock = asyncio.Lock()
        # Loop time at which the send() in progress started; None between sends.
        self.sending_since: float | None = None
        # Loop time at which the last write ended: keep-alive silence starts there.
        self.last_write = now
        # Set by the supervisor before it cancels the helpers: a CancelledError
        # they see before that is not ours but the source's, send()'s or receive()'s.
        self.stopping = False


class _SseApp:
    """The ASGI app of one SSE response (see ``Broadcaster.response``).

    Wire behaviour: ``http.response.start`` with status 200 and the configured
    headers; at once a first body chunk (the ``retry:`` frame, or ``:\\n\\n``),
    because some servers and middleware hold the headers back until the first
    body message; then ``more_body`` messages of whole events, written as soon
    as one is read: the events a stream (or a ``channel()`` queue) already holds
    at that moment go out in the same message, up to 64 of them; a keep-alive
    comment after ``keep_alive`` seconds of silence. ``HEAD`` gets the headers
    and an empty body, and the source is never read.

    Ends: source exhausted, :class:`Lagged` (WARNING), a source exception (ERROR,
    with traceback) or a failing ``receive()`` (ERROR) end cleanly with a final
    ``more_body=False`` message. A disconnect (``http.disconnect``, or
    ``OSError`` from ``send``), a send timeout and a failing ``send()`` (ERROR)
    end it with nothing more sent. Cancellation propagates. On every way out the
    source is closed and both helper tasks are cancelled and awaited.

    Raises:
        RuntimeError: a non-``http`` scope (the source is closed first), or a
            second call.
    """

    __slots__ = ("_source", "_config", "_render", "_on_gap", "_called")

    def __init__(
        self,
        source: AsyncIterable[Any],
        config: SseConfig,
        render: Callable[[Any], Event] | None = None,
        on_gap: Event | None = None,
    ) -> None:
        self._source = source
        self._config = config
        self._render = render
        self._on_gap = on_gap
        self._called = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._called:
            raise RuntimeError("an SSE response app can be called only once: make one per request")
        self._called = True
        try:
            if scope.get("type") != "http":
                raise RuntimeError(f"SSE responses serve 'http' scopes only, got {scope.get('type')!r}")
            await self._respond(scope, receive, send)
        finally:
            await self._close_source()

    async def _close_source(self) -> None:
        try:
            await _close(self._source)
        except Exception:
            logger.exception("closing the SSE event source raised")

    async def _send(self, send: Send, message: Message) -> bool:
        """Send a message outside the pump, within the send timeout; False if the
        client is gone or the send failed."""
        timeout = self._config.send_timeout
        try:
            if timeout is None:
                await send(message)
            else:
                await _within(timeout, send(message))
        except asyncio.TimeoutError:
            logger.info("SSE client did not accept a write within %s s; ending the response", timeout)
            return False
        except OSError as exc:
            logger.debug("SSE client disconnected: %r", exc)
            return False
        except Exception:
            logger.exception("ASGI send() failed; ending the SSE response")
            return False
        return True

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self._config
        # A fresh list: middleware may edit the headers of a message in place.
        start = {"type": "http.response.start", "status": 200, "headers": list(config._start)}
        if not await self._send(send, start):
            return
        if scope.get("method") == "HEAD":
            await self._send(send, dict(_FINAL))
            return
        if not await self._send(send, {"type": "http.response.body", "body": config._first_chunk, "more_body": True}):
            return
        gap = self._on_gap
        if gap is not None and isinstance(self._source, BroadcastStream) and self._source.resumed is False:
            gap_frame = {"type": "http.response.body", "body": gap._frame, "more_body": True}
            if not await self._send(send, gap_frame):
                return
        loop = asyncio.get_running_loop()
        writes = _Writes(loop.time())
        pump = loop.create_task(self._pump(send, writes))
        watch = loop.create_task(_watch(receive, writes))
        finish = False
        try:
            finish = await self._supervise(send, writes, pump, watch)
        finally:
            writes.stopping = True
            pump.cancel()
            watch.cancel()
            await _settle(pump, watch)
            finish = _report(pump, watch) and finish
        if finish:
            await self._send(send, dict(_FINAL))

    async def _supervise(
        self, send: Send, writes: _Writes, pump: asyncio.Task[bool], watch: asyncio.Task[None]
    ) -> bool:
        """Wait for the pump or the watcher to end, writing keep-alives on
        silence and timing out a stuck send; False if a send timed out.

        While no send is in progress, a send that starts later cannot time out
        before ``send_timeout`` from now, so waking at most that often is exact.
        """
        loop = asyncio.get_running_loop()
        keep_alive = self._config.keep_alive
        timeout = self._config.send_timeout
        frame = {"type": "http.response.body", "body": self._config._keep_alive_frame, "more_body": True}
        while True:
            now = loop.time()
            since = writes.sending_since
            wait: float | None
            if since is not None:
                if timeout is not None and now - since >= timeout:
                    logger.info("SSE client did not accept a write within %s s; ending the response", timeout)
                    return False
                wait = keep_alive if timeout is None else since + timeout - now
            else:
                if keep_alive is not None and now - writes.last_write >= keep_alive:
                    async with writes.lock:
                        if not await self._send(send, dict(frame)):
                            return False
                    writes.last_write = loop.time()
                    continue
                wait = timeout
                if keep_alive is not None:
                    due = writes.last_write + keep_alive - now
                    wait = due if wait is None else min(wait, due)
            done, _ = await asyncio.wait((pump, watch), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if done:
                return True

    async def _pump(self, send: Send, writes: _Writes) -> bool:
        """Write every event of the source; True if the source is exhausted,
        False if the client went away or send() failed. Source errors propagate.

        The events a stream or a ``channel()`` queue already holds when the pump
        has read one go out with it in the same body message (up to ``_GATHER``
        events): one ASGI send and one socket write for a burst instead of one
        each, and nothing waits for more to come. An error met while rendering
        them is raised once the events before it are written."""
        source = aiter(self._source)
        take: Callable[[int], list[Any]] | None = None
        if isinstance(self._source, (BroadcastStream, _ChannelSource)):
            take = self._source._take
        # A stream with history yields items but takes entries (for their ids).
        entries = self._source if isinstance(self._source, BroadcastStream) and self._source._ids else None
        while True:
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return True
            except asyncio.CancelledError as exc:
                if writes.stopping:
                    raise
                raise RuntimeError(f"the SSE event source raised {exc!r}") from exc
            body = self._frame(item, None if entries is None else entries._last)
            error: Exception | None = None
            if take is not None:
                body, error = self._gather(body, take(_GATHER - 1), entries is not None)
            if not await self._write(send, writes, body):
                return False
            if error is not None:
                raise error

    async def _write(self, send: Send, writes: _Writes, body: bytes) -> bool:
        """Send one body message of events; False if the client went away or
        send() failed."""
        loop = asyncio.get_running_loop()
        async with writes.lock:
            writes.sending_since = loop.time()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            except OSError as exc:
                logger.debug("SSE client disconnected: %r", exc)
                return False
            except Exception:
                logger.exception("ASGI send() failed; ending the SSE response")
                return False
            except asyncio.CancelledError:
                if writes.stopping:
                    raise
                logger.exception("ASGI send() failed; ending the SSE response")
                return False
            writes.sending_since = None
            writes.last_write = loop.time()
        return True

    def _gather(self, first: bytes, taken: list[Any], entries: bool) -> tuple[bytes, Exception | None]:
        """The body of one message: ``first`` and the frames of the items
        ``taken`` from the source (history entries if ``entries``), and the
        error that stopped it at an item, if any."""
        frames = [first]
        if self._render is None:
            # The common case at C speed: Event items carry their frames (with
            # history, id'd copies). Any other item is redone below, to raise.
            events = [entry.item for entry in taken] if entries else taken
            frames += [event._frame for event in events if isinstance(event, Event)]
            if len(frames) == len(taken) + 1:
                return b"".join(frames), None
            del frames[1:]
        try:
            for waiting in taken:
                frames.append(self._frame(waiting.item, waiting) if entries else self._frame(waiting, None))
        except Exception as exc:
            return b"".join(frames), exc
        return b"".join(frames), None

    def _frame(self, item: object, entry: _Entry | None) -> bytes:
        """The SSE frame of an item of the source: rendered if there is a
        ``render``, then with the id of its history ``entry`` if it has one
        (an Event item carries that id already)."""
        render = self._render
        event = item if render is None else render(item)
        if not isinstance(event, Event):
            raise TypeError(f"SSE events must be Event objects, got {type(event).__name__}")
        if entry is not None and render is not None:
            return entry.with_id(event._frame)
        return event._frame


async def _settle(*tasks: asyncio.Task[Any]) -> None:
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


async def _within(timeout: float, awaitable: Awaitable[None]) -> None:
    """Await ``awaitable`` in a task of its own for at most ``timeout`` seconds;
    raise ``asyncio.TimeoutError`` (after cancelling it) past that.

    Not ``asyncio.wait_for``: on Python 3.10 and 3.11 it swallows a cancellation
    of the caller that arrives as the inner await completes (bpo-42130), and a
    server cancelling a response must always win.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
            await _settle(task)
    if not done:
        raise asyncio.TimeoutError
    task.result()


async def _watch(receive: Receive, writes: _Writes) -> None:
    """Return when the client disconnects (``http.disconnect``, or an OSError
    from ``receive``). Request body messages are read and dropped; anything
    else is a protocol error."""
    more_body = True
    while True:
        try:
            message = await receive()
        except OSError:
            return
        except asyncio.CancelledError as exc:
            if writes.stopping:
                raise
            raise RuntimeError(f"ASGI receive() raised {exc!r}") from exc
        kind = message["type"]
        if kind == "http.disconnect":
            return
        if kind == "http.request" and more_body:
            more_body = bool(message.get("more_body", False))
            continue
        raise RuntimeError(f"unexpected ASGI message while streaming: {kind!r}")


def _report(pump: asyncio.Task[bool], watch: asyncio.Task[None]) -> bool:
    """Log how a response ended; True if it may end with a final chunk.

    A client that left (watcher returned, or the pump saw it) gets nothing more;
    an end on the server's side (source exhausted or failed, receive failed)
    gets a clean end.
    """
    finish = True
    if watch.done() and not watch.cancelled():
        error = watch.exception()
        if error is None:
            logger.debug("SSE client disconnected")
            finish = False
        else:
            logger.error("ASGI receive() failed; ending the SSE response", exc_info=error)
    if pump.done() and not pump.cancelled():
        error = pump.exception()
        if error is None:
            finish = finish and pump.result()
        elif isinstance(error, Lagged):
            logger.warning("SSE stream ended: %s", error)
        else:
            logger.error("SSE event source raised; ending the response", exc_info=error)
    return finish
