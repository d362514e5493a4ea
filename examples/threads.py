"""Publishing from a plain thread into SSE subscribers on the event loop.

Run it from a checkout::

    pip install '.[examples]'            # uvicorn
    python examples/threads.py           # http://127.0.0.1:8000/ticks
    python examples/threads.py --port 0 --interval 0.1   # any free port, 10 ticks a second

then ``curl -N http://127.0.0.1:8000/ticks`` (in as many terminals as you like).

What it demonstrates, in a plain ASGI app (no framework):

* a synchronous worker, ``Ticker``: a ``threading.Thread`` running blocking
  code (``time.sleep`` stands in for a blocking read: a sensor, a serial port,
  a sync database driver) that calls ``b.send(...)`` directly with each
  result. ``send`` is thread-safe and never blocks: from a thread that is not
  the subscribers' event loop it hands the item to that loop with
  ``call_soon_threadsafe``, so one thread's sends arrive in order;
* no queue: there is no ``queue.Queue`` or ``janus`` bridge and no asyncio
  task reading one, the broadcaster's per-subscriber buffers are the queue.
  With nobody subscribed, ``send`` returns 0 and keeps nothing;
* a clean stop: the thread is started at ASGI lifespan startup. Ctrl-C or
  SIGTERM ends every open stream with a clean end of body:
  ``broadcaster.close_on_signals()``, called at lifespan startup, so uvicorn
  does not wait for ever for streams that never end by themselves; lifespan
  shutdown then tells the thread to stop (a ``threading.Event``) and joins it
  (it finishes its current tick, at most one interval).

HTTP API: ``GET /ticks`` ``text/event-stream`` of ``tick`` events with id n
and JSON ``{"n", "thread", "at"}`` (a counter, the producing thread's name, a
Unix time); ``GET /stats`` JSON ``{"subscribers", "ticks"}``. ``HEAD`` works on
both; other paths get 404, other methods 405.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final

import uvicorn

# Import the checkout's broadcaster.py (see examples/chat.py): first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event, replay  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KEY: Final = "ticks"


class Ticker:
    """A sync worker thread that publishes a tick every ``interval`` seconds."""

    def __init__(self, broadcaster: Broadcaster[str, Event], interval: float) -> None:
        self.broadcaster = broadcaster
        self.interval = interval
        self.ticks = 0  # written by the thread only
        self.stop_requested = threading.Event()
        # daemon=True only as a safety net (a crash before stop() must not
        # keep the process alive); the normal way out is stop() and join().
        self.thread = threading.Thread(target=self.run, name="ticker", daemon=True)

    def run(self) -> None:
        """The thread's body: blocking work, then a send, until told to stop."""
        name = threading.current_thread().name
        while not self.stop_requested.is_set():
            time.sleep(self.interval)  # the blocking work; a real worker reads a device here
            if self.stop_requested.is_set():
                break
            self.ticks += 1
            event = Event.json({"n": self.ticks, "thread": name, "at": round(time.time(), 3)},
                               event="tick", id=str(self.ticks))
            self.broadcaster.send(KEY, event)  # thread-safe, never blocks

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to stop (it notices within one interval). Idempotent."""
        self.stop_requested.set()


class Ticks:
    """The ASGI app: the tick stream, the stats and the ticker's lifespan."""

    def __init__(self, interval: float) -> None:
        self.broadcaster: Broadcaster[str, Event] = Broadcaster(buffer=64)
        self.ticker = Ticker(self.broadcaster, interval)

    def close(self) -> None:
        """Stop the producer and end every open stream (each drains first)."""
        self.ticker.stop()
        self.broadcaster.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"this app serves HTTP only, not {scope['type']!r}")
        path: str = scope["path"]
        method: str = scope["method"]
        if path not in ("/ticks", "/stats"):
            await respond(scope, send, 404, b'{"error": "not found"}')
        elif method not in ("GET", "HEAD"):
            await respond(scope, send, 405, b'{"error": "method not allowed"}', [(b"allow", b"GET, HEAD")])
        elif path == "/stats":
            stats = {"subscribers": self.broadcaster.subscriber_count(KEY), "ticks": self.ticker.ticks}
            await respond(scope, send, 200, json.dumps(stats).encode())
        elif method == "HEAD":  # headers only: nothing to subscribe
            nothing: tuple[Event, ...] = ()
            await self.broadcaster.response(replay(nothing))(scope, receive, send)
        else:
            await self.broadcaster.response(self.broadcaster.subscribe(KEY))(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # SIGINT/SIGTERM end every stream cleanly, then the server
                # shuts down (it waits for the responses to finish first).
                self.broadcaster.close_on_signals()
                self.ticker.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Comes after every response has finished (after a signal,
                # the broadcaster is closed already; close() is idempotent).
                self.close()
                # Wait for the thread's last tick without blocking the loop.
                await asyncio.get_running_loop().run_in_executor(None, self.ticker.thread.join)
                await send({"type": "lifespan.shutdown.complete"})
                return


async def respond(
    scope: Scope, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete JSON response (the headers only for HEAD)."""
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Publishing from a thread (broadcaster.py demo).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks (default 1)")
    args = parser.parse_args(argv)
    if not 0 < args.interval <= 60:
        parser.error("--interval must be > 0 and at most 60 seconds")
    # broadcaster.py logs through `logging` (logger "broadcaster"): show its
    # INFO and above next to uvicorn's lines.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # The socket is bound here, so that the URL printed is the one listening
    # (with --port 0, the port the system chose); uvicorn serves on it.
    try:
        sock = socket.create_server(("127.0.0.1", args.port))
    except OSError as exc:
        parser.exit(1, f"threads: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
    with sock:
        host, port = sock.getsockname()[:2]
        print(f"threads running on http://{host}:{port}/ticks - try: curl -N http://{host}:{port}/ticks", flush=True)
        config = uvicorn.Config(Ticks(args.interval), log_level="info")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass


if __name__ == "__main__":
    main()
