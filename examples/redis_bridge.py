"""Scale ``broadcaster.py`` out over Redis: one file to copy next to it.

Every worker process runs a :class:`RedisBridge`. A message published on any
worker reaches every subscriber on every worker::

    from broadcaster import Event, last_event_id
    from redis_bridge import RedisBridge

    bridge = RedisBridge("redis://127.0.0.1:6379/0")   # await bridge.start() at startup

    async def events(scope, receive, send):            # GET /rooms/{room}/events
        room = scope["path"].split("/")[2]
        await bridge.response(room, last_event_id(scope), on_gap=RELOAD)(scope, receive, send)

    async def post(room: str, text: str) -> str | None:
        return await bridge.publish(room, Event(text, event="message"))  # the global id

It needs ``redis`` (redis-py >= 5, its asyncio API) besides ``broadcaster.py``
and the standard library.

How it works
============

Publish
    ``publish(key, event)`` encodes the event once into bytes (``encode``) and
    runs one Lua script on Redis that appends it to the key's stream
    (``XADD {prefix}{key} MAXLEN ~ history * p <payload>``) and publishes
    ``<stream id>\\n<payload>`` on the key's pub/sub channel (same name), with
    ``SPUBLISH`` (sharded pub/sub) on Redis >= 7, else ``PUBLISH``. The stream
    id is the event's global id. Doing both in one script is not only crash
    safety (a publisher dying between the two commands would lose the live
    delivery): it makes the pub/sub order the id order, which resuming relies
    on. Without history (``history=0``) it only publishes, and events carry no
    id. A failure raises :class:`BridgeUnavailable`; nothing is lost silently.

Subscriptions follow the local channels
    The bridge owns a :class:`~broadcaster.Broadcaster` (``bridge.broadcaster``)
    whose ``on_change`` hook tells it when a key gains its first local stream
    or loses its last. On its own event loop it then re-reads ``key in
    broadcaster`` and (un)subscribes the key's channel on one dedicated Redis
    connection, so ``PUBSUB SHARDNUMSUB`` counts one subscription per worker
    that serves the key, and none once it serves it no more. Each message
    received becomes ONE :class:`~broadcaster.Event` (with ``id=`` the global
    id) sent to the local broadcaster, so every local response shares one
    encoding. A burst from Redis is handed out a quarter of a stream buffer
    at a time, letting the responses write in between, so that only a slow
    client lags (never all of them at once).

Resume across processes
    ``subscribe(key, last_event_id)`` subscribes locally first, waits until
    Redis confirmed the channel subscription, then reads what the client
    missed with ``XRANGE`` from its id, and goes live, dropping live events
    whose id is not above the last one replayed: no gap, no duplicate, on any
    worker. An id Redis no longer has (trimmed, expired, or from before a Redis
    restart) or never had is a gap: ``stream.resumed`` is False and
    ``response(..., on_gap=...)`` writes ``on_gap`` first. With
    ``local_history`` the local broadcaster keeps a history too, under the
    same global ids (``send(key, event, id=...)``): a client reconnecting to
    the same worker resumes from it without asking Redis.

Redis goes away
    The listener notices at once when the connection closes, and within
    ``ping_interval + ping_timeout`` when Redis stops answering. It then ends
    every local stream (``broadcaster.remove(key)``: each response writes a
    clean end, and clients reconnect instead of hanging), and until Redis is
    back ``subscribe`` raises :class:`BridgeUnavailable` (``response`` answers
    with a stream that ends at once, so an ``EventSource`` retries) and so does
    ``publish``. It reconnects by itself with a bounded, jittered backoff and
    subscribes the keys the broadcaster has then.

Many keys on one connection
    ``subscribe_many(keys, last_event_id)`` (and ``response_many``) give one
    client several keys over one connection, as ``Broadcaster.subscribe_many``
    does in one process. Each event goes out with the stream's id: the Redis
    id reached in every key (``broadcaster.format_positions``). A
    reconnection to any worker reads each key's position from it
    (``broadcaster.parse_positions``) and replays, per key, what Redis has
    after it; a key Redis no longer has the position of, or one added to the
    list, is a gap (``stream.gaps``; ``on_gap`` is told which). A key that
    the client is new to starts at the newest event in Redis before this
    worker's subscription is confirmed, and what is published in between is
    replayed, so it misses nothing either. Needs history.

Lifecycle: ``await bridge.start()`` / ``await bridge.aclose()``, or ``async
with bridge:``. The bridge owns every task it starts.

Limits: one Redis server (or a primary behind a proxy); not Redis Cluster.
Keys are ``str``. The local broadcaster is used through the bridge: a
``bridge.broadcaster.send()`` reaches this process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Final, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from broadcaster import (
    Broadcaster,
    BroadcastStream,
    Event,
    KeyedStream,
    SseConfig,
    format_positions,
    parse_positions,
    replay,
)

__all__ = [
    "RedisBridge",
    "BridgeStream",
    "BridgeKeyedStream",
    "BridgeUnavailable",
    "encode_event",
    "decode_event",
]

logger: Final = logging.getLogger("redis_bridge")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# XADD the payload to the key's stream, trimmed to about ARGV[1] entries, then
# publish "<id>\n<payload>" on the channel of the same name with ARGV[3]
# (SPUBLISH or PUBLISH), and let the stream expire ARGV[4] ms after the last
# publish (0: never). Atomic: the pub/sub order is the id order.
_PUBLISH_LUA: Final = """\
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'p', ARGV[2])
redis.call(ARGV[3], KEYS[1], id .. '\\n' .. ARGV[2])
if ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return id
"""
_PUBLISH_SHA: Final = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()

_STREAM_ID: Final = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
# XRANGE page size when replaying what a client missed.
_PAGE: Final = 512

_MESSAGE: Final = (b"smessage", b"message")
_SUBSCRIBED: Final = (b"ssubscribe", b"subscribe")
_UNSUBSCRIBED: Final = (b"sunsubscribe", b"unsubscribe")


class BridgeUnavailable(Exception):
    """Redis cannot be reached (or refused the command): nothing was published,
    or the subscription cannot be served. The message says what failed."""


# ---------------------------------------------------------------------------
# Items as bytes: the default codec carries an Event's fields as JSON
# ---------------------------------------------------------------------------

_FIELDS: Final = (("d", "data"), ("e", "event"), ("i", "id"), ("r", "retry"), ("c", "comment"))


def encode_event(event: Event) -> bytes:
    """The default encoder: the event's fields as compact UTF-8 JSON
    (``{"d": data, "e": event, "i": id, "r": retry, "c": comment}``, absent
    fields omitted)."""
    fields = {short: getattr(event, name) for short, name in _FIELDS if getattr(event, name) is not None}
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def decode_event(data: bytes, id: str | None) -> Event:
    """The default decoder: the :class:`Event` that :func:`encode_event` encoded,
    with ``id`` (the global id, when the bridge keeps history) replacing its own.

    Raises:
        ValueError: not such a payload (or an invalid event).
    """
    fields = json.loads(data)
    if not isinstance(fields, dict) or not fields.keys() <= {"d", "e", "i", "r", "c"}:
        raise ValueError(f"not an encoded Event: {data[:80]!r}")
    try:
        return Event(
            fields.get("d"),
            event=fields.get("e"),
            id=fields.get("i") if id is None else id,
            retry=fields.get("r"),
            comment=fields.get("c"),
        )
    except TypeError as exc:
        raise ValueError(f"not an encoded Event: {exc}") from None


def parse_id(value: str | None) -> tuple[int, int] | None:
    """A Redis stream id ``"<ms>-<seq>"`` as a comparable pair, else None."""
    if value is None:
        return None
    found = _STREAM_ID.fullmatch(value)
    return None if found is None else (int(found[1]), int(found[2]))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------
# The stream a subscriber reads
# ---------------------------------------------------------------------------


class _Closing:
    """``aclose()`` and ``async with`` for a stream whose ``close()`` is sync."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_C = TypeVar("_C", bound=_Closing)
_S = TypeVar("_S")


class BridgeStream(_Closing):
    """The events of one key for one client: what it missed (replayed from
    Redis), then live ones, each with its global id; made by
    :meth:`RedisBridge.subscribe`.

    An async iterator of :class:`Event` and an async context manager. It ends
    when its local stream ends (``Redis`` lost, ``aclose()`` of the bridge);
    ``Lagged`` propagates as from a ``BroadcastStream``.
    """

    __slots__ = ("_bridge", "_stream", "_backlog", "_after", "_resumed", "_last")

    def __init__(
        self,
        bridge: RedisBridge,
        stream: BroadcastStream[Event],
        backlog: deque[Event],
        after: tuple[int, int] | None,
        resumed: bool | None,
    ) -> None:
        self._bridge = bridge
        self._stream = stream
        self._backlog = backlog
        # Live events up to this id were replayed already (or seen by the client).
        self._after = after
        self._resumed = resumed
        self._last: str | None = None

    @property
    def key(self) -> str:
        return str(self._stream.key)

    @property
    def resumed(self) -> bool | None:
        """True: it yields exactly what came after the client's id. False: it
        could not resume from that id (a gap: unknown, trimmed or expired).
        None: no id was given."""
        return self._resumed

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event it yielded."""
        return self._last

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def __aiter__(self) -> BridgeStream:
        return self

    async def __anext__(self) -> Event:
        if self._backlog:
            event = self._backlog.popleft()
        else:
            while True:
                event = await self._stream.__anext__()
                after = self._after
                if after is not None:
                    ident = parse_id(event.id)
                    if ident is not None and ident <= after:
                        continue  # replayed already, or the client had it
                    self._after = None  # live events come in id order from here
                break
        self._last = event.id
        return event

    def close(self) -> None:
        """Leave the key now. Idempotent."""
        if not self._stream.closed:
            self._stream.close()
            self._bridge._left(self.key)
        self._backlog.clear()

    def __repr__(self) -> str:
        return f"<BridgeStream key={self.key!r} resumed={self._resumed} backlog={len(self._backlog)}>"


class BridgeKeyedStream(_Closing):
    """The events of several keys for one client, on one connection: what it
    missed in each key (replayed from Redis), then live ones, as ``(key,
    event)`` pairs; made by :meth:`RedisBridge.subscribe_many`.

    Each event carries the stream's id (its ``id``): the Redis id reached in
    every key (``broadcaster.format_positions``), so a reconnection to any
    worker resumes every key exactly. An async iterator and an async context
    manager; it ends when its local stream ends (Redis lost, ``aclose()`` of
    the bridge, or every key removed).
    """

    __slots__ = ("_bridge", "_stream", "_backlog", "_after", "_positions", "_resumed", "_gaps")

    def __init__(
        self,
        bridge: RedisBridge,
        stream: KeyedStream[str, Event],
        backlog: deque[tuple[str, Event]],
        after: dict[str, tuple[int, int]],
        positions: dict[str, str],
        gaps: tuple[str, ...],
        resumed: bool | None,
    ) -> None:
        self._bridge = bridge
        self._stream = stream
        self._backlog = backlog
        # Per key, live events up to this id were replayed already.
        self._after = after
        # Per key, the Redis id of the last event yielded (or where it started).
        self._positions = positions
        self._gaps = gaps
        self._resumed = resumed

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._positions)

    @property
    def resumed(self) -> bool | None:
        """As for a keyed stream: None without an id, else whether every key resumed."""
        return self._resumed

    @property
    def gaps(self) -> tuple[str, ...]:
        """The keys that could not resume (their id unknown, trimmed or expired)."""
        return self._gaps

    @property
    def last_event_id(self) -> str:
        """The position reached in every key, as the id to resume from."""
        return format_positions(self._positions)

    def __aiter__(self) -> BridgeKeyedStream:
        return self

    async def __anext__(self) -> tuple[str, Event]:
        if self._backlog:
            key, event = self._backlog.popleft()
        else:
            while True:
                key, event = await self._stream.__anext__()
                after = self._after.get(key)
                ident = parse_id(event.id)
                if after is not None and ident is not None and ident <= after:
                    continue  # replayed already
                self._after.pop(key, None)  # live events come in id order from here
                break
        if event.id is not None:
            self._positions[key] = event.id
        return key, dataclasses.replace(event, id=self.last_event_id)

    def close(self) -> None:
        """Leave every key now. Idempotent."""
        if not self._stream.closed:
            self._stream.close()
            for key in self._positions:
                self._bridge._left(key)
        self._backlog.clear()

    def __repr__(self) -> str:
        return f"<BridgeKeyedStream keys={list(self._positions)!r} gaps={list(self._gaps)!r}>"


def _named(pair: tuple[str, Event]) -> Event:
    """A keyed event as a bridge response writes it: the key as its type."""
    key, event = pair
    return dataclasses.replace(event, event=key)


# ---------------------------------------------------------------------------
# The bridge
# ---------------------------------------------------------------------------


class RedisBridge:
    """Fan-out across processes through Redis; see the module docstring.

    Args:
        redis: a ``redis://``, ``rediss://`` or ``unix://`` URL, or a
            ``redis.asyncio.Redis`` client (with ``decode_responses=False``;
            the bridge does not close a client it was given). A client made
            from a URL never retries a command by itself (a retried XADD could
            publish twice); the bridge's errors say when Redis failed.
        history: entries kept per key in its Redis stream (``MAXLEN ~``) for
            resuming on any worker; 0 publishes over pub/sub only (no ids, no
            resume).
        stream_ttl: seconds a key's stream outlives its last publish (so the
            streams of keys nobody uses any more go); None keeps them.
        prefix: of every Redis key and channel name (``prefix + key``).
        buffer, config: of the local broadcaster (see ``Broadcaster``).
        local_history, linger: give the local broadcaster a history too: a
            client reconnecting to the same worker resumes from it without
            asking Redis (ids are the global ones). A key's channel (and its
            Redis subscription) then lingers ``linger`` seconds after its last
            stream. Needs ``history``.
        encode, decode: the codec of events on Redis (default: JSON of the
            event's fields); ``decode(payload, global_id)`` must put the id in
            the event.
        sharded: use sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``); None
            detects it (Redis >= 7) on every (re)connection. All workers on
            one Redis must agree: pin it when servers may differ.
        ping_interval, ping_timeout: the listener pings Redis after
            ``ping_interval`` seconds of silence and gives up on the connection
            when no reply came ``ping_timeout`` seconds later.
        ready_timeout: the longest ``subscribe`` waits for Redis to confirm a
            subscription before it raises ``BridgeUnavailable``.
        backoff: the first and the longest wait (seconds) between reconnection
            attempts (doubled each time, with jitter).
        connect_timeout, command_timeout: socket timeouts of the connections
            made from a URL (``command_timeout=None``: a publish may wait
            forever for a Redis that stopped answering).

    Raises:
        ValueError, TypeError: invalid arguments.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis,
        *,
        history: int = 1000,
        stream_ttl: float | None = 3600.0,
        prefix: str = "sse:",
        buffer: int = 64,
        config: SseConfig | None = None,
        local_history: int = 0,
        linger: float = 30.0,
        encode: Callable[[Event], bytes] = encode_event,
        decode: Callable[[bytes, str | None], Event] = decode_event,
        sharded: bool | None = None,
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        ready_timeout: float = 5.0,
        backoff: tuple[float, float] = (0.1, 5.0),
        connect_timeout: float = 2.0,
        command_timeout: float | None = 5.0,
    ) -> None:
        _check_options(history, local_history, stream_ttl, prefix, backoff)
        for name, value in (
            ("ping_interval", ping_interval),
            ("ping_timeout", ping_timeout),
            ("ready_timeout", ready_timeout),
            ("connect_timeout", connect_timeout),
            ("command_timeout", 1.0 if command_timeout is None else command_timeout),
        ):
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
        if isinstance(redis, str):
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                redis,
                socket_connect_timeout=connect_timeout,
                socket_timeout=command_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._owns_client = True
        elif isinstance(redis, aioredis.Redis):
            if redis.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("the bridge needs a Redis client with decode_responses=False (payloads are bytes)")
            self._client = redis
            self._owns_client = False
        else:
            raise TypeError(f"redis must be a URL or a redis.asyncio.Redis, not {type(redis).__name__}")
        # Called through a plain signature: redis-py's annotations of it differ between versions.
        self._execute = cast("Callable[..., Awaitable[Any]]", self._client.execute_command)
        self._history = history
        self._ttl_ms = "0" if stream_ttl is None else str(max(1, round(stream_ttl * 1000)))
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._encode = encode
        self._decode = decode
        self._sharded_option = sharded
        self._sharded: bool | None = sharded
        self._ping_interval = float(ping_interval)
        self._ping_timeout = float(ping_timeout)
        self._ready_timeout = float(ready_timeout)
        self._backoff = (float(backoff[0]), float(backoff[1]))
        self._connect_timeout = float(connect_timeout)
        self._broadcaster: Broadcaster[str, Event] = Broadcaster(
            buffer, config, history=local_history, linger=linger, on_change=self._on_change
        )

        # -- state, touched on the bridge's loop only (except _changed) --------
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Keys whose channel appeared or went (appended from any thread).
        self._changed: deque[str] = deque()
        # Keys that may have a local channel: the ones to (un)subscribe.
        self._keys: set[str] = set()
        # The listener connection is up, and what it has on Redis: keys
        # subscribed (confirmed), keys with a (un)subscribe command in flight.
        self._up = False
        self._up_event = asyncio.Event()
        self._subscribed: set[str] = set()
        self._inflight: set[str] = set()
        self._outbox: list[tuple[str, ...]] = []
        self._wake: asyncio.Event | None = None
        self._last_read = 0.0
        # Subscribers waiting for a key's subscription to be confirmed.
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # With local history: timers that look at a key again once it stopped lingering.
        self._sweeps: dict[str, asyncio.TimerHandle] = {}
        self._outage: str | None = None

    # -- public ---------------------------------------------------------------

    @property
    def broadcaster(self) -> Broadcaster[str, Event]:
        """The local fan-out. Subscribe through the bridge; its own ``send()``
        reaches this process only."""
        return self._broadcaster

    @property
    def available(self) -> bool:
        """True while the listener is connected to Redis."""
        return self._up

    @property
    def history(self) -> int:
        return self._history

    def subscribed(self, key: str) -> bool:
        """Whether this worker's subscription to ``key`` is confirmed by Redis."""
        return self._up and key in self._subscribed and key not in self._inflight

    async def start(self) -> None:
        """Start the listener on the running loop. It returns at once; the
        bridge connects (and reconnects) in the background: see
        :meth:`wait_available`."""
        if self._loop is not None:
            raise RuntimeError("RedisBridge.start() was called already")
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="redis-bridge")
        self._drain()

    async def wait_available(self, timeout: float | None = None) -> bool:
        """Wait until the listener is connected; False after ``timeout`` seconds."""
        if self._up:
            return True
        waiter = asyncio.ensure_future(self._up_event.wait())
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            waiter.cancel()
            await asyncio.wait((waiter,))
        return self._up

    async def aclose(self) -> None:
        """End every local stream, stop the listener, close what the bridge
        opened. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._broadcaster.close()
        for handle in self._sweeps.values():
            handle.cancel()
        self._sweeps.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))
        self._fail_waiters(BridgeUnavailable("the Redis bridge is closed"))
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisBridge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def publish(self, key: str, event: Event) -> str | None:
        """Publish ``event`` to ``key`` on every worker; returns its global id
        (the Redis stream id), or None without history.

        Raises:
            BridgeUnavailable: Redis could not be reached or refused it; the
                event was not published (with history: not retained either).
            TypeError: ``key`` not a str, ``event`` not an Event.
        """
        name = self._name(key)
        if not isinstance(event, Event):
            raise TypeError(f"event must be an Event, not {type(event).__name__}")
        if self._closing:
            raise BridgeUnavailable("the Redis bridge is closed")
        payload = self._encode(event)
        try:
            command = "SPUBLISH" if await self._sharding() else "PUBLISH"
            if not self._history:
                await self._execute(command, name, b"\n" + payload)
                return None
            args = (1, name, self._history, payload, command, self._ttl_ms)
            try:
                ident = await self._execute("EVALSHA", _PUBLISH_SHA, *args)
            except NoScriptError:  # a new or restarted Redis: load the script
                ident = await self._execute("EVAL", _PUBLISH_LUA, *args)
        except (RedisError, OSError) as exc:
            raise BridgeUnavailable(f"Redis unavailable: publishing to {key!r} failed: {exc}") from exc
        return _text(ident)

    async def subscribe(self, key: str, last_event_id: str | None = None) -> BridgeStream:
        """A stream of ``key``'s events, resumed after ``last_event_id`` (the
        client's ``Last-Event-ID``) when given and still in Redis.

        Returns once Redis confirmed this worker's subscription to the key, so
        every event published from then on reaches the stream.

        Raises:
            BridgeUnavailable: Redis is unreachable (the bridge is reconnecting),
                or did not confirm the subscription within ``ready_timeout``.
            RuntimeError: the bridge was not started.
        """
        self._name(key)
        self._check_serving()
        local = self._broadcaster
        stream = local.subscribe(key, last_event_id if local.history else None)
        try:
            if stream.resumed:  # the local history had it: no need to ask Redis
                return BridgeStream(self, stream, deque(), None, True)
            await self._ready(key)
            if last_event_id is None:
                return BridgeStream(self, stream, deque(), None, None)
            if not self._history:
                return BridgeStream(self, stream, deque(), None, False)
            backlog, after = await self._missed(key, last_event_id)
            return BridgeStream(self, stream, backlog, after, after is not None)
        except BaseException:
            stream.close()
            self._left(key)
            raise

    async def subscribe_many(self, keys: list[str], last_event_id: str | None = None) -> BridgeKeyedStream:
        """One stream of several keys' events (a ``KeyedStream`` of the local
        broadcaster underneath), each key resumed after its position in
        ``last_event_id`` (an id this stream wrote, on any worker) when it is
        still in Redis. Returns once Redis confirmed this worker's
        subscription to every key. Needs history (``history > 0``): the
        positions are Redis ids.

        Raises:
            BridgeUnavailable: as for :meth:`subscribe`.
            RuntimeError: the bridge was not started, or has no history.
            TypeError, ValueError: as for ``Broadcaster.subscribe_many``.
        """
        for key in keys:
            self._name(key)
        if not self._history:
            raise RuntimeError("subscribe_many() needs a bridge with history: its ids are Redis ids")
        self._check_serving()
        wanted = None if last_event_id is None else parse_positions(last_event_id)
        # Where each key starts: the client's position, else the newest event
        # in Redis before this worker's subscription is confirmed; what comes
        # after it is replayed below, and live duplicates are dropped.
        given = {key: (wanted or {}).get(key) for key in keys}
        starts = {key: given[key] or await self._newest(key) for key in keys}
        stream = self._broadcaster.subscribe_many(keys)
        try:
            for key in keys:
                await self._ready(key)
            backlog: deque[tuple[str, Event]] = deque()
            after: dict[str, tuple[int, int]] = {}
            positions: dict[str, str] = {}
            gaps: list[str] = []
            for key in keys:
                start = starts[key]
                missed, upto = await self._missed(key, start)
                if upto is None:  # the client's id is not in Redis any more: a gap
                    gaps.append(key)
                    start = await self._newest(key)
                    missed, upto = await self._missed(key, start)
                    if upto is None:  # trimmed in between: start from now
                        missed, upto = deque(), parse_id(start)
                elif last_event_id is not None and given[key] is None:  # not in the id: a key added
                    gaps.append(key)
                positions[key] = start
                backlog += [(key, event) for event in missed]
                if upto is not None:
                    after[key] = upto
            resumed = None if last_event_id is None else not gaps
            return BridgeKeyedStream(self, stream, backlog, after, positions, tuple(gaps), resumed)
        except BaseException:
            stream.close()
            for key in keys:
                self._left(key)
            raise

    def response_many(
        self,
        keys: list[str],
        last_event_id: str | None = None,
        *,
        on_gap: Callable[[tuple[str, ...]], Event] | None = None,
    ) -> ASGIApp:
        """An ASGI app streaming ``keys`` on one connection, every event with
        its key as its type and the stream's id; ``on_gap(gaps)`` goes first
        when some keys could not be resumed. When Redis is unavailable: as
        :meth:`response`."""
        local = self._broadcaster

        def respond(stream: BridgeKeyedStream) -> ASGIApp:
            first = [("", on_gap(stream.gaps))] if on_gap is not None and stream.gaps else []
            return local.response(replay(first, stream), _named)

        return self._app(keys, functools.partial(self.subscribe_many, keys, last_event_id), respond)

    def response(self, key: str, last_event_id: str | None = None, *, on_gap: Event | None = None) -> ASGIApp:
        """An ASGI app streaming ``key`` as Server-Sent Events, every event with
        its global id; ``on_gap`` goes first when ``last_event_id`` could not
        be resumed. When Redis is unavailable, the response is a stream that
        ends at once (a comment, then the end): an ``EventSource`` reconnects
        after its retry delay (a 503 would make it give up for good)."""
        local = self._broadcaster

        def respond(stream: BridgeStream) -> ASGIApp:
            if on_gap is not None and stream.resumed is False:
                return local.response(replay((on_gap,), stream))
            return local.response(stream)

        return self._app(key, functools.partial(self.subscribe, key, last_event_id), respond)

    def _app(self, what: object, subscribe: Callable[[], Awaitable[_S]], respond: Callable[[_S], ASGIApp]) -> ASGIApp:
        """The ASGI app of a bridged response: ``respond(await subscribe())``;
        headers only for ``HEAD``; a stream that ends at once while Redis is
        unavailable."""
        local = self._broadcaster

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope.get("type") != "http" or scope.get("method") == "HEAD":
                await local.response(replay(()))(scope, receive, send)
                return
            try:
                stream = await subscribe()
            except BridgeUnavailable as exc:
                logger.info("SSE request for %r while %s", what, exc)
                await local.response(replay((_UNAVAILABLE,)))(scope, receive, send)
                return
            await respond(stream)(scope, receive, send)

        return app

    # -- internals: names, sharding --------------------------------------------

    def _check_serving(self) -> None:
        """Raise unless the bridge can serve a subscription now."""
        if self._loop is None:
            raise RuntimeError("start the bridge first: await bridge.start()")
        if self._closing:
            raise BridgeUnavailable("the Redis bridge is closed")
        if not self._up:
            raise BridgeUnavailable(f"Redis unavailable: {self._outage or 'not connected yet'}")

    def _name(self, key: str) -> str:
        """The Redis name of ``key``. Checked here, so that a key Redis cannot
        take never reaches the listener's connection (shared by every key)."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if not _valid_key(key):
            raise ValueError(f"key must be encodable as UTF-8: {key!r}")
        return self._prefix + key

    async def _sharding(self) -> bool:
        sharded = self._sharded
        if sharded is None:
            info = await self._execute("INFO", "server")
            sharded = self._sharded = _supports_sharding(info)
        return sharded

    # -- internals: local channels -> Redis subscriptions ------------------------

    def _on_change(self, key: str) -> None:
        # Any thread, possibly inside the garbage collector: only a deque append
        # and a wake-up of the loop.
        self._changed.append(key)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while self._changed:
            try:
                key = self._changed.popleft()
            except IndexError:  # pragma: no cover - another drain took it
                return
            self._reconcile(key)

    def _left(self, key: str) -> None:
        """A bridged stream of ``key`` closed. With local history the key's
        channel lingers, and only goes when the registry is next used: look
        again when the linger is over, so the Redis subscription goes too."""
        local = self._broadcaster
        loop = self._loop
        if not local.history or loop is None or self._closing:
            return
        old = self._sweeps.pop(key, None)
        if old is not None:
            old.cancel()
        self._sweeps[key] = loop.call_later(local.linger + 0.05, self._sweep, key)

    def _sweep(self, key: str) -> None:
        self._sweeps.pop(key, None)
        self._reconcile(key)

    def _reconcile(self, key: str) -> None:
        """Make Redis match whether ``key`` has a local channel (on the loop)."""
        if self._closing:
            return
        local = self._broadcaster
        wanted = key in local
        if wanted and not _valid_key(key):  # subscribed around the bridge: cannot be served
            logger.error("ending the streams of %r: not a key the bridge can subscribe (a UTF-8 str)", key)
            local.remove(key)
            return
        if not self._up:
            # No Redis: a stream of this key would wait forever. End it now;
            # its client reconnects (and resumes) once Redis is back.
            self._keys.discard(key)
            if wanted:
                local.remove(key)
            return
        if wanted:
            self._keys.add(key)
        if key in self._inflight:
            return  # looked at again when Redis answers
        have = key in self._subscribed
        if wanted != have:
            sub = "SSUBSCRIBE" if self._sharded else "SUBSCRIBE"
            unsub = "SUNSUBSCRIBE" if self._sharded else "UNSUBSCRIBE"
            self._command(sub if wanted else unsub, self._prefix + key)
            self._inflight.add(key)
            return
        if not wanted:
            self._keys.discard(key)
        # Settled: subscribed (ready), or nothing to wait for any more.
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _ready(self, key: str) -> None:
        """Return once Redis confirmed the subscription to ``key``."""
        self._reconcile(key)
        if self.subscribed(key):
            return
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiters.setdefault(key, []).append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=self._ready_timeout)
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]
        if not waiter.done():
            waiter.cancel()
            raise BridgeUnavailable(
                f"Redis unavailable: it did not confirm the subscription to {key!r} within {self._ready_timeout:g} s"
            )
        waiter.result()  # BridgeUnavailable if the connection was lost meanwhile

    def _fail_waiters(self, error: BridgeUnavailable) -> None:
        waiters, self._waiters = self._waiters, {}
        for group in waiters.values():
            for waiter in group:
                if not waiter.done():
                    waiter.set_exception(error)

    async def _newest(self, key: str) -> str:
        """The id of the newest event of the key's stream, or ``0-0`` when it
        has none (then every event in it is new)."""
        try:
            entries = await self._execute("XREVRANGE", self._prefix + key, "+", "-", "COUNT", 1)
        except (RedisError, OSError) as exc:
            raise BridgeUnavailable(f"Redis unavailable: reading where {key!r} stands failed: {exc}") from exc
        return _text(entries[0][0]) if entries else "0-0"

    async def _missed(self, key: str, last_id: str) -> tuple[deque[Event], tuple[int, int] | None]:
        """The events after ``last_id`` in the key's stream, and the id up to
        which live events are duplicates; (empty, None) for a gap. ``0-0``
        means "before the first event": everything in the stream is missed."""
        after = parse_id(last_id)
        if after is None:
            return deque(), None
        name = self._prefix + key
        backlog: deque[Event] = deque()
        start = last_id
        first = True
        try:
            while True:
                page = await self._execute("XRANGE", name, start, "+", "COUNT", _PAGE)
                entries = list(page or ())
                if first and last_id != "0-0":
                    # The client's id must still be there, else entries after it may be gone.
                    if not entries or _text(entries[0][0]) != last_id:
                        return deque(), None
                    entries = entries[1:]
                first = False
                for ident, fields in entries:
                    gid = _text(ident)
                    event = self._decode_entry(key, fields, gid)
                    if event is not None:
                        backlog.append(event)
                    parsed = parse_id(gid)
                    if parsed is not None:
                        after = parsed
                if len(page or ()) < _PAGE:
                    return backlog, after
                start = f"{after[0]}-{after[1] + 1}"
        except (RedisError, OSError) as exc:
            raise BridgeUnavailable(f"Redis unavailable: reading what {key!r} missed failed: {exc}") from exc

    def _decode_entry(self, key: str, fields: object, gid: str) -> Event | None:
        payload: object = None
        if isinstance(fields, dict):
            payload = fields.get(b"p")
        elif isinstance(fields, (list, tuple)) and len(fields) >= 2:
            payload = fields[1]
        if not isinstance(payload, bytes):
            logger.error("skipping stream entry %s of %r: no payload", gid, key)
            return None
        return self._decode_payload(key, payload, gid)

    def _decode_payload(self, key: str, payload: bytes, gid: str | None) -> Event | None:
        try:
            return self._decode(payload, gid)
        except Exception:
            logger.exception("skipping an event of %r that does not decode (id %s)", key, gid)
            return None

    # -- internals: the listener -----------------------------------------------

    def _command(self, *args: str) -> None:
        self._outbox.append(args)
        if self._wake is not None:
            self._wake.set()

    def _connection(self) -> AbstractConnection:
        """A dedicated connection for pub/sub: RESP2 (pub/sub messages are
        plain replies), no read timeout (the watchdog pings), no retries (the
        bridge reconnects itself)."""
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(
            protocol=2,
            socket_timeout=None,
            socket_connect_timeout=kwargs.get("socket_connect_timeout") or self._connect_timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            retry_on_error=[],
            health_check_interval=0,
            decode_responses=False,
        )
        if "maint_notifications_config" in kwargs:  # redis-py >= 7: RESP3 only
            kwargs.pop("maint_notifications_config")
        connection: AbstractConnection = pool.connection_class(**kwargs)
        return connection

    async def _run(self) -> None:
        """Connect, serve, and on any failure end the local streams and
        reconnect after a growing, jittered delay."""
        loop = asyncio.get_running_loop()
        first, longest = self._backoff
        delay = first
        while True:
            started = loop.time()
            try:
                await self._session()
            except (RedisError, OSError, EOFError) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug: log it, and still reconnect
                logger.exception("Redis bridge listener failed")
                reason = f"listener failed: {exc!r}"
            self._went_down(reason)
            if loop.time() - started > longest:
                delay = first  # it had been up for a while: retry soon
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, longest)

    async def _session(self) -> None:
        """One listener connection, from connecting to its failure (raises)."""
        conn = self._connection()
        try:
            # Connecting (with its AUTH/SELECT/HELLO) and INFO read without a
            # timeout on this connection, and the watchdog is not running yet:
            # a Redis that accepts but does not answer must not hang us here.
            setup = asyncio.ensure_future(self._setup(conn))
            try:
                await asyncio.wait((setup,), timeout=self._connect_timeout + self._ping_timeout)
            finally:
                if not setup.done():
                    setup.cancel()
                    await asyncio.wait((setup,))
                if not setup.cancelled():
                    # Retrieved here, whichever way this goes on: when this is
                    # cancelled (the bridge closing) just as the setup failed,
                    # its error is not read below, and asyncio would report
                    # it as never retrieved.
                    setup.exception()
            if setup.cancelled():
                raise ConnectionError("Redis accepted the connection but did not answer")
            setup.result()
            loop = asyncio.get_running_loop()
            self._outbox = []
            self._wake = asyncio.Event()
            self._last_read = loop.time()
            self._up = True
            self._up_event.set()
            if self._outage is not None:
                logger.warning("Redis is back (%s); resubscribing", self._outage)
            self._outage = None
            for key in list(self._keys):
                self._reconcile(key)
            self._drain()
            tasks = (
                loop.create_task(self._read(conn)),
                loop.create_task(self._write(conn)),
                loop.create_task(self._watch()),
            )
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                raise ConnectionError("the Redis listener stopped")  # pragma: no cover
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
        finally:
            self._up = False
            self._up_event.clear()
            self._wake = None
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _setup(self, conn: AbstractConnection) -> None:
        await cast("Callable[[], Awaitable[None]]", conn.connect)()
        if self._sharded_option is None:
            await conn.send_command("INFO", "server", check_health=False)
            self._sharded = _supports_sharding(await conn.read_response())

    def _went_down(self, reason: str) -> None:
        if self._outage is None:
            logger.warning("Redis unavailable (%s): ending the local streams, reconnecting", reason)
        self._outage = reason
        self._subscribed.clear()
        self._inflight.clear()
        self._outbox = []
        self._fail_waiters(BridgeUnavailable(f"Redis unavailable: {reason}"))
        # Down: reconciling a key ends its streams. (A key whose change is
        # still queued is ended when that change is handled.)
        for key in list(self._keys):
            self._reconcile(key)

    async def _read(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        local = self._broadcaster
        prefix = self._prefix_bytes
        skip = len(prefix)
        ids = local.history > 0
        burst, unread = max(1, local.buffer // 4), 0
        while True:
            reply = await conn.read_response()
            self._last_read = loop.time()
            if not isinstance(reply, list) or len(reply) < 3:
                continue  # PONG outside of subscribed mode
            kind, channel, data = reply[0], reply[1], reply[2]
            if not (isinstance(channel, bytes) and channel.startswith(prefix)):
                continue  # ["pong", ""] in subscribed mode
            key = channel[skip:].decode()
            if kind in _MESSAGE:
                gid_bytes, _, payload = bytes(data).partition(b"\n")
                gid = gid_bytes.decode() or None
                event = self._decode_payload(key, payload, gid)
                if event is None:
                    continue
                if ids and gid is not None:
                    local.send(key, event, id=gid)
                else:
                    local.send(key, event)
                # A burst from Redis is in the buffer already, and reading it
                # never waits: without yielding, the local streams would not be
                # read meanwhile and overflow their buffers (Lagged), however
                # fast their clients. A quarter of a buffer between yields
                # keeps them far from full and still batches the writes.
                unread += 1
                if unread >= burst:
                    unread = 0
                    await asyncio.sleep(0)
            elif kind in _SUBSCRIBED:
                self._inflight.discard(key)
                self._subscribed.add(key)
                self._reconcile(key)
            elif kind in _UNSUBSCRIBED:
                if key in self._inflight:
                    self._inflight.discard(key)
                elif key in self._subscribed and key in local:
                    # Redis dropped it on its own: what was sent meanwhile is
                    # lost here, so end the streams; their clients resume.
                    logger.warning("Redis dropped the subscription to %r; ending its streams", key)
                    local.remove(key)
                self._subscribed.discard(key)
                self._reconcile(key)

    async def _write(self, conn: AbstractConnection) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            batch, self._outbox = self._outbox, []
            if batch:
                await conn.send_packed_command(conn.pack_commands(batch), check_health=False)

    async def _watch(self) -> None:
        """Ping Redis after ``ping_interval`` of silence; fail without a reply."""
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_read
            if idle < self._ping_interval:
                await asyncio.sleep(self._ping_interval - idle)
                continue
            sent = loop.time()
            self._command("PING")
            await asyncio.sleep(self._ping_timeout)
            if self._last_read < sent:
                raise ConnectionError(f"Redis did not answer a PING within {self._ping_timeout:g} s")


_UNAVAILABLE: Final = Event(comment="redis unavailable: reconnect later")


def _check_options(
    history: int, local_history: int, stream_ttl: float | None, prefix: str, backoff: tuple[float, float]
) -> None:
    if isinstance(history, bool) or not isinstance(history, int) or history < 0:
        raise ValueError(f"history must be an int >= 0, got {history!r}")
    if local_history and not history:
        raise ValueError("local_history needs history: the local ids must be the global (Redis stream) ids")
    if stream_ttl is not None and not stream_ttl > 0:
        raise ValueError(f"stream_ttl must be > 0 or None, got {stream_ttl!r}")
    if not 0 < backoff[0] <= backoff[1] < float("inf"):
        raise ValueError(f"backoff must be (first, longest) with 0 < first <= longest, got {backoff!r}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")


def _valid_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def _supports_sharding(info: object) -> bool:
    """Whether an ``INFO server`` reply (text, or redis-py's dict) is of Redis >= 7."""
    if isinstance(info, dict):
        version = str(info.get("redis_version", ""))
    else:
        found = re.search(r"^redis_version:([0-9]+)", _text(info), re.MULTILINE)
        version = found[1] if found else ""
    major = version.split(".", 1)[0]
    return major.isdigit() and int(major) >= 7
