"""The ASGI app that ``tests/test_servers.py`` runs under every server.

Not a test module (pytest collects ``test_*.py`` only): each server imports it
as ``sse_servers_app:app``, with ``tests/`` as its working directory or on
``sys.path``. It is a plain ASGI app around one ``Broadcaster[str, Event]``
that calls ``b.close_on_signals()`` at import, as the README recommends for
the server command lines (uvicorn, granian, daphne).

Environment:

``SSE_KEEP_ALIVE``
    seconds of ``SseConfig.keep_alive`` (default 15).
``SSE_SIGNAL_HOOK``
    ``1`` (default) calls ``b.close_on_signals()``; ``0`` leaves shutdown to a
    launcher (``serve_hypercorn.py``, with ``b.shutdown_trigger``).
``SSE_SHUTDOWN_RETRY``
    ``low,high``: ``SseConfig.shutdown_retry`` in seconds (default: unset).

Endpoints (``{key}`` is any path segment):

``GET|HEAD /events/{key}``
    ``b.response(b.subscribe(key))``.
``GET|HEAD /many/{key},{key},...``
    ``b.response(b.subscribe_many(keys))``: one stream over every key, each
    event written with its key as its type.
``GET|HEAD /channel/{key}``
    ``b.channel(fn)``: ``fn`` sends ``Event("started", event="status")``, then
    sleeps until it is cancelled. Its start, cancellation and end are counted
    per key, and each cancellation is logged at INFO as
    ``channel closure cancelled: {key}``.
``POST /publish/{key}``
    body: one JSON object, or a list of them, with the fields of ``Event``
    (``data``, ``event``, ``id``, ``retry``, ``comment``); each is sent with
    ``b.send(key, Event(**fields))`` in order. Answers ``{"delivered": [n, ...]}``.
``GET /stats/{key}``
    ``{"subscribers": b.subscriber_count(key), "present": key in b,
    "channels": len(b), "inflight": b.metrics().responses_open, "channel":
    {"started", "running", "cancelled", "ended"}, "pid": pid}``.
``POST /log-error/{marker}``
    logs ``marker`` at ERROR level (the tests check that they would see one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's broadcaster.py

from broadcaster import Broadcaster, Event, Sender, SseConfig  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

if not logging.getLogger().handlers:  # every record carries its level name
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log: Final = logging.getLogger("sse_servers_app")

KEEP_ALIVE: Final = float(os.environ.get("SSE_KEEP_ALIVE", "15"))
EVENT_FIELDS: Final = frozenset({"data", "event", "id", "retry", "comment"})

_WINDOW: Final = os.environ.get("SSE_SHUTDOWN_RETRY")
SHUTDOWN_RETRY: Final = None if _WINDOW is None else (float(_WINDOW.split(",")[0]), float(_WINDOW.split(",")[1]))
b: Final[Broadcaster[str, Event]] = Broadcaster(config=SseConfig(keep_alive=KEEP_ALIVE, shutdown_retry=SHUTDOWN_RETRY))
if os.environ.get("SSE_SIGNAL_HOOK", "1") == "1":
    b.close_on_signals()
channel_stats: Final[dict[str, dict[str, int]]] = {}


def stats_of(key: str) -> dict[str, int]:
    return channel_stats.setdefault(key, {"started": 0, "running": 0, "cancelled": 0, "ended": 0})


def closure(key: str) -> Callable[[Sender], Awaitable[None]]:
    async def fn(sender: Sender) -> None:
        counts = stats_of(key)
        counts["started"] += 1
        counts["running"] += 1
        try:
            await sender.send(Event("started", event="status"))
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            counts["cancelled"] += 1
            log.info("channel closure cancelled: %s", key)
            raise
        finally:
            counts["running"] -= 1
            counts["ended"] += 1

    return fn


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body


def event_of(fields: object) -> Event:
    if not isinstance(fields, dict) or not set(fields) <= EVENT_FIELDS:
        raise ValueError(f"not an event: {fields!r}")
    return Event(**fields)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            b.close()  # too late for open streams (see close_on_signals), harmless
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    method = scope["method"]
    parts = scope["path"].split("/")
    if len(parts) != 3:
        await respond(send, 404, b"{}")
        return
    _, kind, key = parts
    key = unquote(key)
    if kind == "events" and method in ("GET", "HEAD"):
        await b.response(b.subscribe(key))(scope, receive, send)
    elif kind == "many" and method in ("GET", "HEAD"):
        await b.response(b.subscribe_many(key.split(",")))(scope, receive, send)
    elif kind == "channel" and method in ("GET", "HEAD"):
        await b.channel(closure(key))(scope, receive, send)
    elif kind == "publish" and method == "POST":
        payload = json.loads(await read_body(receive))
        events = [event_of(fields) for fields in (payload if isinstance(payload, list) else [payload])]
        delivered = [b.send(key, event) for event in events]
        await respond(send, 200, json.dumps({"delivered": delivered}).encode())
    elif kind == "stats" and method == "GET":
        stats = {
            "subscribers": b.subscriber_count(key),
            "present": key in b,
            "channels": len(b),
            "inflight": b.metrics().responses_open,
            "channel": stats_of(key),
            "pid": os.getpid(),
        }
        await respond(send, 200, json.dumps(stats).encode())
    elif kind == "log-error" and method == "POST":
        log.error("%s", key)
        await respond(send, 200, b"{}")
    else:
        await respond(send, 404, b"{}")
