"""A small ASGI app for ``tests/test_browser.py`` (not a test module itself).

Run as ``python tests/sse_app.py --port 0``: uvicorn on 127.0.0.1, printing
``sse_app running on http://127.0.0.1:PORT/`` once it listens. Two broadcasters
of ``Event`` keyed by any name, both with ``SseConfig(retry=100)`` so browsers
reconnect 100 ms after a drop:

* ``plain``: no history; events go out exactly as sent, ids included;
* ``history``: ``history=1000, linger=30``; the broadcaster gives every event
  its id, resumes from ``Last-Event-ID`` and writes ``GAP`` (``event: gap``,
  empty data) first when it cannot;
* ``closing``: no history, ``shutdown_retry=(1.5, 1.5)``, and a ``close``
  action: once closed, each response ends with ``retry: 1500``.

Routes (``{mode}`` is ``plain`` or ``history``, ``{key}`` any path segment):

* ``GET /page?src=URL&types=JSON``  a page whose ``EventSource(URL)`` records,
  in ``window.log``, every event of the listed types (default ``["message"]``)
  as ``["event", type, data, lastEventId]``, and its ``open`` and ``error``
  events as ``["open"]`` and ``["error", readyState]``, in the order they fired;
  with ``src`` given several times, one ``EventSource`` per URL, each logging
  in its own ``window.logs[i]`` (``window.sources[i]``; ``log`` and ``source``
  are the first's)
* ``GET /{mode}/{key}/events``      the stream: ``subscribe(key,
  last_event_id=last_event_id(scope))`` then ``response(stream, on_gap=GAP)``;
  each request is recorded for ``/requests``
* ``GET /{mode}/many/events?key=K&key=K...``  one stream over every ``key``:
  ``subscribe_many(keys, last_event_id=...)``, each event written with its key
  as its type; ``event: gap`` with the JSON list of the keys that could not
  resume, first, when some could not; recorded for ``/requests`` with
  ``"keys"`` and ``"gaps"``
* ``POST /{mode}/{key}/send``       body: a JSON list of ``Event`` keyword
  arguments (``data``, ``event``, ``id``, ``retry``, ``comment``); each is sent
  in order; answers the JSON list of what each ``send`` returned
* ``POST /{mode}/{key}/pump?count=N&interval=S``  starts sending
  ``Event(data=str(i))`` for i = 1..N, one every S seconds, in the background
* ``GET /{mode}/{key}/pumped``      ``{"done": bool, "sent": [...]}``: what each
  pumped ``send`` returned so far (subscribers addressed; 0 when nobody, or only
  a lingering history, was there)
* ``POST /{mode}/{key}/remove``     ``remove(key)``: ends the key's streams and
  drops its history
* ``POST /{mode}/{key}/end``        ends the key's open streams (``stream.close()``)
  but keeps its history: a clean server-side end a client can resume from
* ``POST /closing/{key}/close``     ``close()`` of the ``closing`` broadcaster (for good)
* ``GET /requests``                 every stream request so far: ``{"mode", "key",
  "last_event_id"`` (the ``Last-Event-ID`` header, or null), ``"resumed",
  "at"}`` (``at``: the server's monotonic clock, in seconds)

SIGTERM or Ctrl-C closes every broadcaster first (``close_on_signals()``), so
open streams end cleanly and the process exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, BroadcastStream, Event, SseConfig, last_event_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONFIG: Final = SseConfig(retry=100)
GAP: Final = Event(event="gap", data="")
EVENT_FIELDS: Final = frozenset({"data", "event", "id", "retry", "comment"})

PAGE: Final = b"""\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>sse_app</title></head>
<body>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const types = JSON.parse(params.get("types") || '["message"]');
window.logs = [];
window.sources = params.getAll("src").map((src, i) => {
  const log = (window.logs[i] = []);
  const source = new EventSource(src);
  const record = (e) => log.push(["event", e.type, e.data, e.lastEventId]);
  for (const type of types) source.addEventListener(type, record);
  source.addEventListener("open", () => log.push(["open"]));
  source.addEventListener("error", () => log.push(["error", source.readyState]));
  return source;
});
window.log = window.logs[0];
window.source = window.sources[0];
</script>
</body>
</html>
"""


class App:
    """The ASGI app; see the module docstring."""

    def __init__(self) -> None:
        self.broadcasters: dict[str, Broadcaster[str, Event]] = {
            "plain": Broadcaster(config=CONFIG),
            "history": Broadcaster(config=CONFIG, history=1000, linger=30),
            "closing": Broadcaster(config=dataclasses.replace(CONFIG, shutdown_retry=(1.5, 1.5))),
        }
        self.requests: list[dict[str, object]] = []
        self.pumped: dict[tuple[str, str], list[int]] = {}
        self.pumps: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.streams: dict[tuple[str, str], set[BroadcastStream[Event]]] = {}
        for broadcaster in self.broadcasters.values():
            broadcaster.close_on_signals()

    def close(self) -> None:
        for broadcaster in self.broadcasters.values():
            broadcaster.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            self.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        method: str = scope["method"]
        parts = scope["path"].split("/")[1:]
        if parts == ["page"] and method == "GET":
            await respond(send, 200, PAGE, b"text/html; charset=utf-8")
        elif parts == ["requests"] and method == "GET":
            await respond(send, 200, json.dumps(self.requests).encode())
        elif len(parts) == 3 and parts[0] in self.broadcasters:
            await self.route(scope, receive, send, parts[0], parts[1], parts[2])
        else:
            await respond(send, 404, b'{"error": "not found"}')

    async def route(self, scope: Scope, receive: Receive, send: Send, mode: str, key: str, action: str) -> None:
        b = self.broadcasters[mode]
        method: str = scope["method"]
        if action == "events" and method == "GET":
            await self.events(scope, receive, send, mode, key)
        elif action == "send" and method == "POST":
            specs = json.loads(await read_body(receive))
            events = [Event(**{k: v for k, v in spec.items() if k in EVENT_FIELDS}) for spec in specs]
            await respond(send, 200, json.dumps([b.send(key, event) for event in events]).encode())
        elif action == "pump" and method == "POST":
            query = parse_qs(scope["query_string"].decode())
            count, interval = int(query["count"][0]), float(query["interval"][0])
            sent = self.pumped[mode, key] = []
            self.pumps[mode, key] = asyncio.create_task(pump(b, key, count, interval, sent))
            await respond(send, 200, b"{}")
        elif action == "pumped" and method == "GET":
            task = self.pumps.get((mode, key))
            body = {"done": task is not None and task.done(), "sent": self.pumped.get((mode, key), [])}
            await respond(send, 200, json.dumps(body).encode())
        elif action == "remove" and method == "POST":
            b.remove(key)
            await respond(send, 200, b"{}")
        elif action == "close" and method == "POST" and mode == "closing":
            b.close()
            await respond(send, 200, b"{}")
        elif action == "end" and method == "POST":
            ended = list(self.streams.get((mode, key), ()))
            for stream in ended:
                stream.close()
            await respond(send, 200, json.dumps({"ended": len(ended)}).encode())
        else:
            await respond(send, 404, b'{"error": "not found"}')

    async def events(self, scope: Scope, receive: Receive, send: Send, mode: str, key: str) -> None:
        header = next((v.decode() for n, v in scope["headers"] if n == b"last-event-id"), None)
        if key == "many":
            keys = parse_qs(scope["query_string"].decode()).get("key", [])
            many = self.broadcasters[mode].subscribe_many(keys, last_event_id=last_event_id(scope))
            self.requests.append(
                {"mode": mode, "key": "many", "keys": keys, "last_event_id": header}
                | {"resumed": many.resumed, "gaps": list(many.gaps)}
            )
            gap = functools.partial(Event.json, event="gap")
            await self.broadcasters[mode].response(many, on_gap=lambda gaps: gap(list(gaps)))(scope, receive, send)
            return
        stream = self.broadcasters[mode].subscribe(key, last_event_id=last_event_id(scope))
        record = {"mode": mode, "key": key, "last_event_id": header, "resumed": stream.resumed, "at": time.monotonic()}
        self.requests.append(record)
        streams = self.streams.setdefault((mode, key), set())
        streams.add(stream)
        try:
            await self.broadcasters[mode].response(stream, on_gap=GAP)(scope, receive, send)
        finally:
            streams.discard(stream)


async def pump(b: Broadcaster[str, Event], key: str, count: int, interval: float, sent: list[int]) -> None:
    for i in range(1, count + 1):
        sent.append(b.send(key, Event(str(i))))
        await asyncio.sleep(interval)


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description="The test app of tests/test_browser.py.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = App()
    with socket.create_server(("127.0.0.1", args.port)) as sock, contextlib.suppress(KeyboardInterrupt):
        host, port = sock.getsockname()[:2]
        print(f"sse_app running on http://{host}:{port}/", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
