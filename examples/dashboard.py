"""A live metrics dashboard: ``Broadcaster.channel()`` with an imperative sender.

Run it from a checkout::

    pip install '.[examples]'              # uvicorn
    python examples/dashboard.py           # http://127.0.0.1:8000/
    python examples/dashboard.py --port 0 --interval 0.2   # any free port, 5 updates a second

and open the printed URL, or ``curl -N http://127.0.0.1:8000/metrics``.

What it demonstrates, in a plain ASGI app (no framework):

* ``b.channel(fn)``: a coroutine per client that pushes events with
  ``await sender.send(event)`` in its own loop, here a snapshot of the
  process's metrics every ``--interval`` seconds (default 1): uptime, how late
  the event loop woke up for the tick, CPU time, open dashboard streams and
  asyncio tasks. ``send`` waits while the client's queue (``buffer`` events)
  is full, so a slow client paces its own closure and nobody else's;
* the closure runs until the stream ends: the response cancels it at once
  when the client disconnects (not at its next send), and so does
  ``Broadcaster.close()``, which ends every running ``channel()`` response
  cleanly after what its closure sent. The closure logs it at INFO
  (``client #N: metrics closure cancelled after K events``);
* graceful shutdown: Ctrl-C or SIGTERM ends every open stream with a clean
  end of body: ``broadcaster.close_on_signals()`` (in ``Dashboard``), so
  uvicorn exits at once instead of waiting for ever for streams that never
  end by themselves.

HTTP API: ``GET /`` the page (inline JS, no build step); ``GET /metrics``
``text/event-stream`` of ``metrics`` events, JSON ``{"client", "n",
"uptime_s", "loop_lag_ms", "cpu_s", "clients", "tasks"}``. ``HEAD`` works on
both; other paths get 404, other methods 405.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final

import uvicorn

# Import the checkout's broadcaster.py (see examples/chat.py): first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event, Sender  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log: Final = logging.getLogger("dashboard")


class Dashboard:
    """The ASGI app: the page, and one ``channel()`` response per client."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # Only channel() is used: each client gets its own closure, nothing is
        # subscribed. buffer=8: a client 8 updates behind pauses its closure.
        self.broadcaster: Broadcaster[str, Event] = Broadcaster(buffer=8)
        # SIGINT/SIGTERM close the broadcaster, which cancels every closure
        # and ends its stream cleanly, before the server shuts down (it would
        # wait for ever for the streams otherwise).
        self.broadcaster.close_on_signals()
        self.started = time.monotonic()
        self.clients = 0  # open metrics streams
        self.last_client = 0

    async def metrics(self, sender: Sender) -> None:
        """One client's closure: a metrics event every ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        self.last_client += 1
        client = self.last_client
        self.clients += 1
        log.info("client #%d connected (%d open)", client, self.clients)
        sent = 0
        try:
            due = loop.time()
            while True:
                now = loop.time()
                snapshot = {
                    "client": client,
                    "n": sent + 1,
                    "uptime_s": round(time.monotonic() - self.started, 3),
                    "loop_lag_ms": round(max(0.0, now - due) * 1000, 3),
                    "cpu_s": round(time.process_time(), 3),
                    "clients": self.clients,
                    "tasks": len(asyncio.all_tasks()),
                }
                await sender.send(Event.json(snapshot, event="metrics"))
                sent += 1
                # The next tick on a fixed schedule (no drift); after a stall
                # (a slow client), carry on from now rather than catch up.
                due = max(due + self.interval, loop.time())
                await asyncio.sleep(due - loop.time())
        except asyncio.CancelledError:
            # The client left, or the server is shutting down (the broadcaster
            # was closed): the response cancels this closure at once, then
            # writes what was sent and the end of body. Log it, and let the
            # cancellation go.
            log.info("client #%d: metrics closure cancelled after %d events", client, sent)
            raise
        finally:
            self.clients -= 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs it with lifespan="off"
            raise RuntimeError(f"the dashboard serves HTTP only, not {scope['type']!r}")
        path: str = scope["path"]
        if path not in ("/", "/metrics"):
            await respond(scope, send, 404, b"not found\n")
        elif scope["method"] not in ("GET", "HEAD"):
            await respond(scope, send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        elif path == "/":
            await respond(scope, send, 200, PAGE, content_type=b"text/html; charset=utf-8")
        else:
            # A fresh closure per client; for HEAD it never starts.
            await self.broadcaster.channel(self.metrics)(scope, receive, send)


async def respond(
    scope: Scope,
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    """A complete, non-streaming response (the headers only for HEAD)."""
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Live metrics over SSE (broadcaster.py channel() demo).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default 1)")
    args = parser.parse_args(argv)
    if not 0 < args.interval <= 3600:
        parser.error("--interval must be > 0 and at most 3600 seconds")
    # The closures' INFO lines (and broadcaster.py's, logger "broadcaster"),
    # next to uvicorn's.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # The socket is bound here, so that the URL printed is the one listening
    # (with --port 0, the port the system chose); uvicorn serves on it.
    try:
        sock = socket.create_server(("127.0.0.1", args.port))
    except OSError as exc:
        parser.exit(1, f"dashboard: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
    with sock:
        host, port = sock.getsockname()[:2]
        print(f"dashboard running on http://{host}:{port}/ - open it in a browser", flush=True)
        config = uvicorn.Config(Dashboard(args.interval), log_level="info", lifespan="off")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass


PAGE: Final = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>broadcaster.py dashboard</title>
<style>
  :root { font: 15px/1.45 system-ui, sans-serif; color-scheme: light dark; }
  body { max-width: 32rem; margin: 2rem auto; padding: 0 1rem; }
  table { border-collapse: collapse; width: 100%; }
  td { padding: .3rem .5rem; border-bottom: 1px solid #8885; }
  td:last-child { text-align: right; font-variant-numeric: tabular-nums; }
  #status.down { color: #d33; }
</style>
</head>
<body>
<h1>broadcaster.py dashboard</h1>
<p id="status">connecting</p>
<table><tbody id="metrics"></tbody></table>
<script>
"use strict";
const LABELS = { client: "this dashboard", n: "updates received", uptime_s: "server uptime (s)",
  loop_lag_ms: "event loop lag (ms)", cpu_s: "process CPU time (s)", clients: "open dashboards",
  tasks: "asyncio tasks" };
const status = document.getElementById("status");
const rows = new Map();
const source = new EventSource("/metrics");
source.addEventListener("open", () => { status.textContent = "live"; status.className = ""; });
source.addEventListener("error", () => { status.textContent = "reconnecting\\u2026"; status.className = "down"; });
source.addEventListener("metrics", (e) => {
  for (const [key, value] of Object.entries(JSON.parse(e.data))) {
    if (!rows.has(key)) {
      const tr = document.createElement("tr");
      tr.append(document.createElement("td"), document.createElement("td"));
      tr.cells[0].textContent = LABELS[key] || key;
      document.getElementById("metrics").append(tr);
      rows.set(key, tr.cells[1]);
    }
    rows.get(key).textContent = String(value);
  }
});
</script>
</body>
</html>
""".encode()


if __name__ == "__main__":
    main()
