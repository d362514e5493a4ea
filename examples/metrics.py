"""``Broadcaster.metrics()`` exported to Prometheus, with ``prometheus_client``.

Run it from a checkout::

    pip install '.[examples]'              # uvicorn and prometheus_client
    python examples/metrics.py             # http://127.0.0.1:8000/metrics
    python examples/metrics.py --port 0 --buffer 4   # any free port; 4-item stream buffers

then, from other terminals::

    curl -N http://127.0.0.1:8000/events/news                       # a stream
    curl -d 'hello' 'http://127.0.0.1:8000/publish/news?count=3'     # three events
    curl http://127.0.0.1:8000/metrics                              # what Prometheus scrapes

What it demonstrates: a ``prometheus_client`` collector that reads one
``b.metrics()`` snapshot per scrape (nothing is counted twice, and the
broadcaster needs no dependency), the numbers as gauges (what is open now)
and counters (totals), and the ending of responses as one counter labelled
by how they ended. Point Prometheus at ``/metrics``; useful alerts: a rising
``sse_dropped_total`` or ``sse_responses_ended_total{how="lag"}`` (clients
too slow for the rate, or ``buffer`` too small), ``{how="send_timeout"}``
(dead clients), ``{how="error"}``, and ``sse_streams`` near ``max_streams``.
Ctrl-C or SIGTERM ends every open stream with a clean end of body:
``b.close_on_signals()`` (in ``App``), so uvicorn exits at once instead of
waiting for ever for streams that never end by themselves.

HTTP API:

* ``GET /events/{key}``: the key as ``text/event-stream``;
* ``POST /publish/{key}?count=N``: the body (UTF-8) sent ``N`` times (default
  1) at once, without yielding in between: more than ``--buffer`` at once
  makes every stream of the key lag -> ``{"sent": N, "delivered": d}``;
* ``GET /metrics``: the Prometheus text format.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Import the checkout's broadcaster.py (see examples/chat.py): first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BroadcasterCollector(Collector):
    """The numbers of ``b.metrics()``, named ``<prefix>_...``, read at each scrape."""

    def __init__(self, b: Broadcaster[Any, Any], prefix: str = "sse") -> None:
        self.b = b
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        m = self.b.metrics()
        p = self.prefix
        yield GaugeMetricFamily(f"{p}_channels", "Keys with a stream.", value=m.channels)
        yield GaugeMetricFamily(f"{p}_lingering", "Keys whose history outlives their streams.", value=m.lingering)
        yield GaugeMetricFamily(f"{p}_streams", "Open streams.", value=m.streams)
        yield GaugeMetricFamily(f"{p}_responses_open", "SSE responses running.", value=m.responses_open)
        yield CounterMetricFamily(f"{p}_sends", "send() calls.", value=m.sends)
        yield CounterMetricFamily(f"{p}_deliveries", "Items handed to streams.", value=m.deliveries)
        yield CounterMetricFamily(f"{p}_dropped", "Items dropped from full stream buffers.", value=m.dropped)
        yield CounterMetricFamily(f"{p}_lag_reports", "Losses reported to readers.", value=m.lag_reports)
        yield CounterMetricFamily(f"{p}_resumes", "Exact resumes from a last event id.", value=m.resumes)
        yield CounterMetricFamily(f"{p}_gaps", "Resumes that could not be exact.", value=m.gaps)
        yield CounterMetricFamily(f"{p}_bytes_written", "Body bytes written.", value=m.bytes_written)
        ended = CounterMetricFamily(f"{p}_responses_ended", "SSE responses that ended, by how.", labels=["how"])
        for how, count in m.responses_ended.items():
            ended.add_metric([how], count)
        yield ended


class App:
    """The ASGI app: the streams, the publish endpoint and ``/metrics``."""

    def __init__(self, buffer: int) -> None:
        self.b: Broadcaster[str, Event] = Broadcaster(buffer)
        # SIGINT/SIGTERM end every stream cleanly, then the server shuts down.
        self.b.close_on_signals()
        registry = CollectorRegistry()
        registry.register(BroadcasterCollector(self.b))
        self.exporter = make_asgi_app(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start; close at the shutdown
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            self.b.close()  # the responses are gone by now: refuses late subscriptions
            await send({"type": "lifespan.shutdown.complete"})
            return
        parts = scope["path"].strip("/").split("/")
        method = scope["method"]
        if parts == ["metrics"] and method == "GET":
            await self.exporter(scope, receive, send)
        elif len(parts) == 2 and parts[0] == "events" and method == "GET":
            await self.b.response(self.b.subscribe(parts[1]))(scope, receive, send)
        elif len(parts) == 2 and parts[0] == "publish" and method == "POST":
            await self.publish(scope, receive, send, parts[1])
        else:
            await respond(send, 404, {"error": "not found"})

    async def publish(self, scope: Scope, receive: Receive, send: Send, key: str) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        count = int(parse_qs(scope["query_string"].decode()).get("count", ["1"])[0])
        event = Event(body.decode("utf-8", errors="replace"))
        delivered = sum(self.b.send(key, event) for _ in range(count))  # no await: one burst
        await respond(send, 200, {"sent": count, "delivered": delivered})


async def respond(send: Send, status: int, value: object) -> None:
    body = json.dumps(value).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


DEFAULT_BUFFER: Final = 64


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="broadcaster.py metrics exported to Prometheus.")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--buffer", type=int, default=DEFAULT_BUFFER, help="items a stream buffers")
    args = parser.parse_args(argv)
    # The socket is bound here, so that the URL printed is the one listening
    # (with --port 0, the port the system chose); uvicorn serves on it.
    try:
        sock = socket.create_server(("127.0.0.1", args.port))
    except OSError as exc:
        parser.exit(1, f"metrics: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
    with sock:
        host, port = sock.getsockname()[:2]
        print(f"metrics running on http://{host}:{port}/metrics", flush=True)
        config = uvicorn.Config(App(args.buffer), log_level="info")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass


if __name__ == "__main__":
    main()
