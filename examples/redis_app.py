"""Server-Sent Events on several processes, fanned out through Redis.

A plain ASGI app around ``redis_bridge.RedisBridge`` (``examples/redis_bridge.py``).
Start Redis, then one process, or several workers sharing one port::

    redis-server --port 6379 --save '' --appendonly no &
    python examples/redis_app.py --workers 3          # http://127.0.0.1:8000/

    curl -N http://127.0.0.1:8000/events/news                 # a subscriber (any worker)
    curl -d 'hello' http://127.0.0.1:8000/publish/news        # published on any worker

Every subscriber gets every message, whichever worker it and the publisher
landed on; ``GET /stats`` says which worker answered.

HTTP API (``{key}`` matches ``[A-Za-z0-9_.:-]{1,64}``, else 400):

* ``GET /events/{key}``: the key's events as ``text/event-stream``, each with
  its global id (the Redis stream id). A reconnecting client sends
  ``Last-Event-ID`` (or ``?last_event_id=``) and gets exactly what it missed,
  on any worker; when that id cannot be resumed, a ``reload`` event (empty data)
  comes first. While Redis is unavailable, the stream ends at once (200, a
  comment, the end), so an ``EventSource`` retries after its delay; when Redis
  goes away, open streams end cleanly the same way.
* ``POST /publish/{key}[?event=name]``: the body (UTF-8 text, at most 64 KiB)
  is published as the ``data`` of one event -> 200 ``{"id": "<global id>"}``;
  503 ``{"error": "Redis unavailable: ..."}`` when Redis cannot take it (nothing
  was published); 400 on a body that is not UTF-8, 413 on a larger one.
* ``GET /stats``: ``{"pid", "redis": bool, "channels": n}``. Every response
  of a stream has an ``x-worker`` header: the pid of the worker serving it.
* ``GET /stats/{key}``: ``{"key", "subscribers": n, "subscribed": bool}``:
  this worker's local streams of the key, and whether it holds a Redis
  subscription for it.

Options: ``--port`` (0: any free port; the printed URL says which), ``--redis
URL``, ``--workers N``, ``--history N`` (Redis stream length per key; 0: pub/sub
only, no resume), ``--local-history N`` and ``--linger S`` (a per-worker
history, for resuming on the same worker without asking Redis).

Ctrl-C or SIGTERM ends every open stream with a clean end of body:
``bridge.broadcaster.close_on_signals()``, called at lifespan startup, so
uvicorn does not wait for ever for streams that never end by themselves; the
lifespan shutdown then closes the bridge. With ``--workers N`` every worker
does so, and the supervisor stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import uvicorn

# Run from a checkout: broadcaster.py is in the repository root, redis_bridge.py
# next to this file (the script's own directory is on sys.path already).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from redis_bridge import BridgeUnavailable, RedisBridge

from broadcaster import Event, SseConfig, last_event_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KEY: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_BODY: Final = 64 * 1024
RELOAD: Final = Event(event="reload", data="")
USAGE: Final = b"""redis_app: Server-Sent Events fanned out through Redis

GET  /events/{key}             the key's events (text/event-stream; Last-Event-ID resumes)
POST /publish/{key}?event=x    publish the body as one event -> {"id": ...}, 503 if Redis is down
GET  /stats, /stats/{key}      this worker: pid, Redis state, local streams
"""


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RedisApp:
    """The ASGI app of one worker process."""

    def __init__(self, redis_url: str, *, history: int = 1000, local_history: int = 0, linger: float = 30.0) -> None:
        self.bridge = RedisBridge(
            redis_url,
            history=history,
            local_history=local_history,
            linger=linger,
            # x-worker: which process serves the stream (with --workers N,
            # the kernel hands each connection to one of them).
            config=SseConfig(retry=1000, headers=(("x-worker", str(os.getpid())),)),
            backoff=(0.1, 2.0),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                await self._route(scope, receive, send)
            except HttpError as error:
                await _json(send, error.status, {"error": error.message})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # SIGINT/SIGTERM end every local stream cleanly, then the
                # server shuts down (it waits for the responses to finish
                # before the lifespan shutdown).
                self.bridge.broadcaster.close_on_signals()
                await self.bridge.start()
                # Serve even if Redis is not there yet: the bridge keeps trying.
                await self.bridge.wait_available(5.0)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.bridge.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        parts = scope["path"].strip("/").split("/")
        if parts == [""] and method in ("GET", "HEAD"):
            await _respond(send, 200, USAGE, b"text/plain; charset=utf-8")
            return
        if parts == ["stats"] and method == "GET":
            local = self.bridge.broadcaster
            await _json(send, 200, {"pid": os.getpid(), "redis": self.bridge.available, "channels": len(local)})
            return
        if len(parts) != 2 or parts[0] not in ("events", "publish", "stats"):
            raise HttpError(404, "not found")
        kind, key = parts
        if not KEY.fullmatch(key):
            raise HttpError(400, "bad key")
        if kind == "events" and method in ("GET", "HEAD"):
            await self.bridge.response(key, last_event_id(scope), on_gap=RELOAD)(scope, receive, send)
        elif kind == "publish" and method == "POST":
            await self._publish(scope, receive, send, key)
        elif kind == "stats" and method == "GET":
            count = self.bridge.broadcaster.subscriber_count(key)
            await _json(send, 200, {"key": key, "subscribers": count, "subscribed": self.bridge.subscribed(key)})
        else:
            raise HttpError(405, "method not allowed")

    async def _publish(self, scope: Scope, receive: Receive, send: Send, key: str) -> None:
        body = await _body(receive)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "the body must be UTF-8") from None
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        name = query.get("event", [None])[0]
        try:
            event = Event(text, event=name)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        try:
            ident = await self.bridge.publish(key, event)
        except BridgeUnavailable as exc:
            raise HttpError(503, str(exc)) from None
        await _json(send, 200, {"id": ident})


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "client gone")
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, value: object) -> None:
    await _respond(send, status, json.dumps(value).encode(), b"application/json")


def serve(args: argparse.Namespace, sock: socket.socket) -> None:
    """One worker: the app on ``sock`` (bound already, here or by the
    supervisor of ``--workers``) until Ctrl-C or SIGTERM."""
    app = RedisApp(args.redis, history=args.history, local_history=args.local_history, linger=args.linger)
    config = uvicorn.Config(app, log_level="info", lifespan="on")
    with sock:
        host, port = sock.getsockname()[:2]
        print(f"redis_app running on http://{host}:{port}/ (pid {os.getpid()})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
            uvicorn.Server(config).run(sockets=[sock])


def supervise(args: argparse.Namespace) -> None:
    """``--workers N``: bind the port once, run N worker processes on it (the
    kernel spreads the connections), stop them all on Ctrl-C or SIGTERM."""
    with socket.create_server(("127.0.0.1", args.port)) as sock:
        sock.set_inheritable(True)
        host, port = sock.getsockname()[:2]
        command = [
            sys.executable,
            __file__,
            f"--redis={args.redis}",
            f"--history={args.history}",
            f"--local-history={args.local_history}",
            f"--linger={args.linger}",
            f"--fd={sock.fileno()}",
        ]
        workers = [subprocess.Popen(command, pass_fds=[sock.fileno()]) for _ in range(args.workers)]
        print(f"redis_app running on http://{host}:{port}/ with {args.workers} workers", flush=True)

        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            for worker in workers:
                worker.wait()
        except KeyboardInterrupt:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SSE fanned out through Redis (broadcaster.py + redis_bridge.py).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the port")
    parser.add_argument("--history", type=int, default=1000, help="Redis stream length per key (0: no resume)")
    parser.add_argument("--local-history", type=int, default=0, help="per-worker history (0: none)")
    parser.add_argument("--linger", type=float, default=30.0, help="seconds a key's local history outlives its streams")
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # a worker of --workers
    args = parser.parse_args(argv)
    if args.fd is not None:
        serve(args, socket.socket(fileno=args.fd))
    elif args.workers > 1:
        supervise(args)
    else:
        # Bound here, so that the URL printed is the one listening (with
        # --port 0, the port the system chose).
        try:
            sock = socket.create_server(("127.0.0.1", args.port))
        except OSError as exc:
            parser.exit(1, f"redis_app: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
        serve(args, sock)


if __name__ == "__main__":
    main()
