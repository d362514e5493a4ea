"""Case 3, client side: N raw-socket SSE connections in one asyncio process.

``sse_client.py PARAMS_JSON`` with port, ack_port, conns, count, window, paced,
rate, mark (the bytes that end a complete event: ``~\\n\\n``, or ``~\\r\\n\\r\\n``
for sse-starlette's CRLF frames), sample (every how many connections parse every
event for latency and order) and timeout.

It opens the connections (``GET /sse``), waits for every ``200`` response,
then calls ``GET /start``. Per read, a connection counts complete events with
one ``bytes.count`` of the end mark (C speed: the client must not be the
bottleneck; its own CPU share is reported). One connection in ``sample``
also parses every event (``seq`` and send timestamp) into latencies and checks
that seqs arrive complete and in order. The count that every connection has
reached is sent to the server as a UDP datagram each time it grows: the
server's publisher keeps at most ``window`` messages beyond it.

Prints one JSON line: delivered events/s over the windowed phase (from the
send time of message 0 to the moment the last connection has the last
message), latency percentiles of each phase, the client's and the server's CPU
share, and any error. Exits after ``timeout`` seconds whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import socket
import sys
import threading
import time

EVENT = re.compile(rb"data: (\d+) (\d+) x*~")


class Shared:
    def __init__(self, p: dict) -> None:
        self.p = p
        self.conns = p["conns"]
        self.counts = [0] * self.conns
        self.low = 0  # events that every connection has
        self.at_low = self.conns  # connections whose count == low
        self.headers = 0
        self.errors: list[str] = []
        self.loop = asyncio.get_running_loop()
        self.all_headers = self.loop.create_future()
        self.phase_a = self.loop.create_future()
        self.done = self.loop.create_future()
        self.t_a = 0
        self.ack = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ack.connect(("127.0.0.1", p["ack_port"]))
        self.ack.setblocking(False)
        self.first_send = 1 << 62  # send time of message 0 (monotonic ns)
        self.count = p["count"]
        self.total = p["count"] + p["paced"]

    def advanced(self, i: int, old: int, new: int, now: int) -> None:
        self.counts[i] = new
        if old != self.low:
            return
        self.at_low -= 1
        if self.at_low:
            return
        counts = self.counts
        self.low = low = min(counts)
        self.at_low = counts.count(low)
        try:
            self.ack.send(b"%d" % low)
        except BlockingIOError:
            pass
        if low >= self.count and not self.phase_a.done():
            self.t_a = now
            self.phase_a.set_result(now)
        if low >= self.total and not self.done.done():
            self.done.set_result(now)

    def fail(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)
        if not self.done.done():
            self.done.set_result(None)


class SseProtocol(asyncio.Protocol):
    def __init__(self, shared: Shared, index: int, mark: bytes, sampled: bool) -> None:
        self.shared = shared
        self.index = index
        self.mark = mark
        self.keep = len(mark) - 1
        self.tail = b""
        self.count = 0
        self.header_buf: bytes | None = b""
        self.sampled = sampled
        self.pending = b""
        self.expect = 0
        self.latencies: list[int] = []  # receive - send, ns, one per event in seq order
        self.seqs_ok = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(b"GET /sse HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.header_buf is not None:
            self.header_buf += data
            end = self.header_buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.header_buf[:end], self.header_buf[end + 4:]
            self.header_buf = None
            shared = self.shared
            if not head.startswith(b"HTTP/1.1 200"):
                shared.fail(f"conn {self.index}: {head[:60]!r}")
                return
            shared.headers += 1
            if shared.headers == shared.conns:
                shared.all_headers.set_result(None)
        buf = self.tail + data
        k = buf.count(self.mark)
        self.tail = buf[-self.keep:]
        if self.sampled:
            pending = self.pending + data
            end = pending.rfind(self.mark)
            if end >= 0:
                end += len(self.mark)
                lat = self.latencies
                expect = self.expect
                for seq, ts in EVENT.findall(pending, 0, end):
                    if expect == 0:
                        self.shared.first_send = min(self.shared.first_send, int(ts))
                    if int(seq) != expect:
                        self.seqs_ok = False
                    expect = int(seq) + 1
                    lat.append(now - int(ts))
                self.expect = expect
                pending = pending[end:]
            self.pending = pending
        if k:
            old = self.count
            self.count = old + k
            self.shared.advanced(self.index, old, old + k, now)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        if self.count < self.shared.total:
            self.shared.fail(f"conn {self.index} closed after {self.count} events: {exc!r}")


async def http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1]


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    n = len(values)

    def pick(q: float) -> float:
        return values[min(n - 1, int(q * n))] / 1e6  # ms

    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": values[-1] / 1e6, "samples": n}


async def run(p: dict) -> dict:
    shared = Shared(p)
    loop = shared.loop
    mark = p["mark"].encode().decode("unicode_escape").encode()
    protocols = [SseProtocol(shared, i, mark, i % p["sample"] == 0) for i in range(p["conns"])]
    for first in range(0, len(protocols), 100):  # connect in batches of 100
        await asyncio.gather(*(
            loop.create_connection(lambda proto=proto: proto, "127.0.0.1", p["port"])
            for proto in protocols[first:first + 100]
        ))
    await asyncio.wait_for(shared.all_headers, 30)
    query = "&".join(f"{k}={p[k]}" for k in ("conns", "count", "window", "paced", "rate"))
    await http_get(p["port"], "/start?" + query)
    t0, c0 = time.monotonic_ns(), time.process_time()
    result: dict = {}
    await asyncio.wait([shared.phase_a, shared.done], return_when=asyncio.FIRST_COMPLETED)
    ta, ca = time.monotonic_ns(), time.process_time()
    if shared.phase_a.done():
        await shared.done
    tb, cb = time.monotonic_ns(), time.process_time()
    if shared.errors:
        result["error"] = "; ".join(shared.errors[:3])
    # Phase boundaries and latencies from the sampled connections.
    sampled = [pr for pr in protocols if pr.sampled]
    lat_a = [v for pr in sampled for v in pr.latencies[: p["count"]]]
    lat_b = [v for pr in sampled for v in pr.latencies[p["count"]:]]
    result["seq_order_ok"] = all(pr.seqs_ok for pr in sampled)
    result["delivered"] = sum(pr.count for pr in protocols)
    result["expected"] = p["conns"] * shared.total
    if shared.phase_a.done():
        # From the send time of message 0 (in every sampled connection's first
        # event) to the moment the last connection had message count - 1.
        seconds = (shared.t_a - shared.first_send) / 1e9
        result["throughput"] = {
            "events_per_s": p["conns"] * p["count"] / seconds if seconds else None,
            "msgs_per_s": p["count"] / seconds if seconds else None,
            "seconds": seconds,
            "client_cpu_share": (ca - c0) / ((ta - t0) / 1e9),
            **percentiles(lat_a),
        }
    if p["paced"] and shared.done.done() and not shared.errors:
        result["paced"] = {
            "rate_msgs_per_s": p["rate"],
            "achieved_msgs_per_s": p["paced"] / ((tb - ta) / 1e9),
            "client_cpu_share": (cb - ca) / ((tb - ta) / 1e9),
            **percentiles(lat_b),
        }
    try:
        result["server"] = json.loads(await asyncio.wait_for(http_get(p["port"], "/stats"), 10))
    except Exception as exc:  # noqa: BLE001 - report, do not fail the run
        result["server_error"] = repr(exc)
    for pr in protocols:
        if pr.transport is not None:
            pr.transport.close()
    await asyncio.sleep(0.1)
    return result


def main() -> None:
    p = json.loads(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    watchdog = threading.Timer(p["timeout"] + 5, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    try:
        result = asyncio.run(asyncio.wait_for(run(p), p["timeout"]))
    except (asyncio.TimeoutError, TimeoutError):
        result = {"error": f"client timed out after {p['timeout']} s"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
