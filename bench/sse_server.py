"""Cases 3 and 7, server side: one SSE stack under uvicorn (httptools, asyncio loop) on 127.0.0.1.

``sse_server.py STACK PORT ACK_PORT MAX_SECONDS``

Every stack serves ``GET /sse`` (one SSE stream of key ``"k"``) and provides
``publish(payload)``; the shell around it, the same for all, serves:

- ``GET /start?conns=&count=&window=&paced=&rate=``: starts the publisher task
  and answers at once. The publisher waits until ``conns`` streams are
  subscribed, then sends ``count`` messages as fast as delivery allows, with at
  most ``window`` messages in flight: message ``s`` is sent only once every
  connection has received message ``s - window`` (the client acknowledges the
  count that *all* its connections have, over UDP to ``ACK_PORT``). Then
  ``paced`` more at ``rate`` messages/s (same window, as a safety bound).
- ``GET /stats``: the server's CPU share during each phase, as JSON.

and, for case 7 (``connections.py``, whose orchestrator paces the messages
itself):

- ``GET /publish?seq=``: sends one message ``seq`` now (same payload as the
  publisher's) and answers ``{"seq": seq}``.
- ``GET /info``: ``{"ready": ..., "pid": ...}``, the number of SSE streams
  subscribed so far (a running total) and the server's pid; ``/info?trim=1``
  first collects garbage and trims the heap (``trim_heap``).

A message's data is ``"<seq> <monotonic_ns at send> xxxx...~"`` (96 characters): the
client and the server share the machine's monotonic clock, so the client
computes send-to-receive latency, and counts complete events by the ``~`` that
ends each data line.

Stacks: ``ours`` (this repository's ``Broadcaster.response``), ``sse-starlette``
(``EventSourceResponse`` + encode/broadcaster ``memory://``), ``fastapi``
(FastAPI's built-in SSE, ``response_class=fastapi.sse.EventSourceResponse``,
+ encode/broadcaster) ``raw`` (the floor: a raw ASGI app, one deque and one
waiter future per connection, no registry; each wake-up writes everything
queued as one body message) and ``raw-watch`` (the same, plus a pending
``receive()`` task per connection to notice clients that leave).

The process exits by itself after MAX_SECONDS whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs

PAYLOAD_LEN = 96
BUFFER = 64  # ours: per-stream buffer; the client's window stays below it


_PAD = "x" * PAYLOAD_LEN


def make_payload(seq: int) -> str:
    """Message ``seq``'s data, stamped with the send time: ``"<seq> <monotonic_ns> xx...~"``."""
    head = f"{seq} {time.monotonic_ns()} "
    return head + _PAD[: PAYLOAD_LEN - len(head) - 1] + "~"


def trim_heap() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc's
    ``malloc_trim``), so that RSS counts memory in use, not memory start-up
    freed (such as compiling a module from source) that later allocations would
    reuse unseen."""
    import ctypes  # noqa: PLC0415 - only case 7 needs it
    import gc  # noqa: PLC0415

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS keeps what start-up freed
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Shell:
    """The publisher and the control endpoints, identical for every stack."""

    def __init__(self) -> None:
        self.ready = 0  # SSE connections subscribed
        self.acked = 0  # messages every connection has received (from the client)
        self.ack_event = asyncio.Event()
        self.stats: dict[str, Any] = {}
        self.task: asyncio.Task[None] | None = None

    def subscribed(self) -> None:
        self.ready += 1

    def on_ack(self, value: int) -> None:
        if value > self.acked:
            self.acked = value
            self.ack_event.set()

    async def _wait_acked(self, upto: int) -> None:
        while self.acked < upto:
            self.ack_event.clear()
            await self.ack_event.wait()

    async def publisher(self, publish, is_async: bool, conns: int, count: int, window: int, paced: int, rate: float) -> None:
        while self.ready < conns:
            await asyncio.sleep(0.005)

        async def one(seq: int) -> None:
            payload = make_payload(seq)
            if is_async:
                await publish(payload)
            else:
                publish(payload)

        t0, c0 = time.monotonic(), time.process_time()
        for seq in range(count):
            if seq - self.acked >= window:
                await self._wait_acked(seq - window + 1)
            await one(seq)
        await self._wait_acked(count)
        t1, c1 = time.monotonic(), time.process_time()
        self.stats["throughput"] = {"seconds": t1 - t0, "cpu_share": (c1 - c0) / (t1 - t0)}
        if paced:
            start = time.monotonic()
            for k in range(paced):
                seq = count + k
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if seq - self.acked >= window:
                    await self._wait_acked(seq - window + 1)
                await one(seq)
            await self._wait_acked(count + paced)
            t2, c2 = time.monotonic(), time.process_time()
            self.stats["paced"] = {"seconds": t2 - t1, "cpu_share": (c2 - c1) / (t2 - t1)}

    def wrap(self, sse_app, publish, is_async: bool):
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            path = scope["path"]
            if path in {"/publish", "/info"}:  # case 7's controls
                if path == "/publish":
                    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
                    seq = int(q["seq"])
                    payload = make_payload(seq)
                    if is_async:
                        await publish(payload)
                    else:
                        publish(payload)
                    body = json.dumps({"seq": seq}).encode()
                else:
                    if scope["query_string"] == b"trim=1":
                        trim_heap()
                    body = json.dumps({"ready": self.ready, "pid": os.getpid()}).encode()
                headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            if path == "/start" or path == "/stats":
                if path == "/start":
                    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
                    self.task = asyncio.get_running_loop().create_task(
                        self.publisher(
                            publish, is_async, int(q["conns"]), int(q["count"]), int(q["window"]),
                            int(q.get("paced", 0)), float(q.get("rate", 1)),
                        )
                    )
                    body = b"started"
                else:
                    if self.task is not None:  # the last ack may still be on its way
                        await asyncio.wait([self.task], timeout=5)
                        if self.task.done() and self.task.exception():
                            self.stats["error"] = repr(self.task.exception())
                    body = json.dumps(self.stats).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            await sse_app(scope, receive, send)

        return app


# -- the stacks ----------------------------------------------------------------


def stack_ours(shell: Shell):
    from broadcaster import Broadcaster, Event

    b: Any = Broadcaster(buffer=BUFFER)

    async def app(scope, receive, send):
        stream = b.subscribe("k")
        shell.subscribed()
        await b.response(stream)(scope, receive, send)

    def publish(payload: str) -> None:
        b.send("k", Event(payload))

    return app, publish, False, None


def _encode_broadcast():
    from broadcaster import Broadcast

    return Broadcast("memory://")


def stack_sse_starlette(shell: Shell):
    from sse_starlette import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.routing import Route

    bc = _encode_broadcast()

    async def events():
        async with bc.subscribe("k") as sub:
            shell.subscribed()
            async for ev in sub:
                yield {"data": ev.message}

    async def sse(request):
        return EventSourceResponse(events())

    return Starlette(routes=[Route("/sse", sse)]), lambda payload: bc.publish("k", payload), True, bc


def stack_fastapi(shell: Shell):
    from fastapi import FastAPI
    from fastapi.sse import EventSourceResponse, ServerSentEvent

    bc = _encode_broadcast()
    api = FastAPI()

    @api.get("/sse", response_class=EventSourceResponse)
    async def sse():
        async with bc.subscribe("k") as sub:
            shell.subscribed()
            async for ev in sub:
                yield ServerSentEvent(raw_data=ev.message)

    return api, lambda payload: bc.publish("k", payload), True, bc


class _Conn:
    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None


def stack_raw(shell: Shell, watch: bool = False):
    """Floor (d); with ``watch``, floor (d'): the same plus the least an app
    needs to notice a client that leaves, one pending ``receive()`` in a task
    of its own that wakes the loop (the memory any ASGI app that detects
    disconnects holds per connection)."""
    conns: list[_Conn] = []
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]}

    async def app(scope, receive, send):
        await send(start)
        await send({"type": "http.response.body", "body": b":\n\n", "more_body": True})
        conn = _Conn()
        conns.append(conn)
        shell.subscribed()
        loop = asyncio.get_running_loop()
        items = conn.items
        watcher = None
        if watch:
            await receive()  # the (empty) request body
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(lambda _: conn.waiter is not None and not conn.waiter.done() and conn.waiter.set_result(None))
        try:
            while watcher is None or not watcher.done():
                while not items and (watcher is None or not watcher.done()):
                    conn.waiter = loop.create_future()
                    await conn.waiter
                body = b"".join(items)
                items.clear()
                await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            conns.remove(conn)
            if watcher is not None:
                watcher.cancel()

    def publish(payload: str) -> None:
        frame = f"data: {payload}\n\n".encode()
        for conn in conns:
            conn.items.append(frame)
            waiter = conn.waiter
            if waiter is not None:
                conn.waiter = None
                waiter.set_result(None)

    return app, publish, False, None


STACKS = {
    "ours": stack_ours,
    "candidate": stack_ours,
    "sse-starlette": stack_sse_starlette,
    "fastapi": stack_fastapi,
    "raw": stack_raw,
    "raw-watch": lambda shell: stack_raw(shell, watch=True),
}


class _AckProtocol(asyncio.DatagramProtocol):
    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.shell.on_ack(int(data))


async def main(stack: str, port: int, ack_port: int) -> None:
    import uvicorn

    shell = Shell()
    sse_app, publish, is_async, bc = STACKS[stack](shell)
    imported = sys.modules.get("broadcaster")
    if imported is not None:  # never the other library of the same name
        ours_dir = os.environ.get("BENCH_OURS_DIR")
        is_ours = ours_dir is not None and os.path.realpath(imported.__file__ or "") == os.path.realpath(
            os.path.join(ours_dir, "broadcaster.py"))
        if is_ours != bool(ours_dir):
            raise SystemExit(f"{stack}: imported the wrong broadcaster module: {imported.__file__}")
    if bc is not None:
        await bc.connect()
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _AckProtocol(shell), local_addr=("127.0.0.1", ack_port))
    config = uvicorn.Config(
        shell.wrap(sse_app, publish, is_async), host="127.0.0.1", port=port, http="httptools", loop="asyncio",
        lifespan="off", log_level="warning", access_log=False, backlog=4096, timeout_graceful_shutdown=1,
    )
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "broadcaster.py")):
        raise SystemExit("bench/broadcaster.py must not exist")
    ours_dir = os.environ.get("BENCH_OURS_DIR")
    if ours_dir:
        sys.path.insert(0, ours_dir)
    stack, port, ack_port, max_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    watchdog = threading.Timer(max_seconds, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    asyncio.run(main(stack, port, ack_port))
