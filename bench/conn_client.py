"""Case 7, client side: one share of the N open SSE connections, in one asyncio process.

``conn_client.py PARAMS_JSON`` with port, proc (this process's index), conns
(its share), count (messages it will receive: seqs 0 .. count-1), mark (the
bytes that end a complete event: ``~\\n\\n``, or ``~\\r\\n\\r\\n`` for
sse-starlette's CRLF frames), connect_timeout and timeout.

It opens its connections (``GET /sse``, raw sockets, batches of 100) and waits
for every ``200`` response, then reports on stdout, one JSON line each:

- ``{"proc", "ready": k, "failed": f, "connect_s", "errors"}`` once: k
  connections have their response head, f could not connect or got none within
  connect_timeout or 10 s without progress (a server that cannot hold them all);
- ``{"proc", "seq", "sent_ns", "first_ns", "last_ns"}`` each time *all* its k
  connections have message ``seq``: ``sent_ns`` is the send time in the data
  (``time.monotonic_ns()`` in the server, the same clock), ``first_ns`` /
  ``last_ns`` when the first / last of its connections had it;
- ``{"proc", "error"}`` when a connection is lost or a message arrives out of
  order;
- ``{"proc", "final": true, ...}`` last, after stdin is closed (the
  orchestrator's signal to hang up): it then closes every connection and exits.

Every connection parses every event (seq and send time; a few messages only,
so this costs little). Exits by itself after ``timeout`` seconds whatever
happens, and when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import sys
import threading
import time

EVENT = re.compile(rb"data: (\d+) (\d+) x*~")


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Shared:
    def __init__(self, p: dict) -> None:
        self.proc = p["proc"]
        self.conns = p["conns"]
        self.count = p["count"]
        self.headers = 0
        self.live = 0  # connections with a response head when the messages start
        self.have = [0] * self.count
        self.first = [0] * self.count
        self.errors: list[str] = []
        self.closing = False

    def error(self, text: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(text)
            emit({"proc": self.proc, "error": text})

    def got(self, seq: int, sent: int, now: int) -> None:
        if seq >= self.count:
            self.error(f"unexpected seq {seq}")
            return
        h = self.have[seq] = self.have[seq] + 1
        if h == 1:
            self.first[seq] = now
        if h == self.live:
            emit({"proc": self.proc, "seq": seq, "sent_ns": sent, "first_ns": self.first[seq], "last_ns": now})


class SseProtocol(asyncio.Protocol):
    def __init__(self, shared: Shared, index: int, mark: bytes) -> None:
        self.shared = shared
        self.index = index
        self.mark = mark
        self.header_buf: bytes | None = b""
        self.pending = b""
        self.expect = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(b"GET /sse HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        shared = self.shared
        if self.header_buf is not None:
            self.header_buf += data
            end = self.header_buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.header_buf[:end], self.header_buf[end + 4:]
            self.header_buf = None
            if not head.startswith(b"HTTP/1.1 200"):
                shared.error(f"conn {self.index}: {head[:60]!r}")
                return
            shared.headers += 1
        pending = self.pending + data
        end = pending.rfind(self.mark)
        if end < 0:
            self.pending = pending
            return
        end += len(self.mark)
        for seq, sent in EVENT.findall(pending, 0, end):
            s = int(seq)
            if s != self.expect:
                shared.error(f"conn {self.index}: seq {s} where {self.expect} was due")
            self.expect = s + 1
            shared.got(s, int(sent), now)
        self.pending = pending[end:]

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        if not self.shared.closing and self.header_buf is None:
            self.shared.error(f"conn {self.index} lost after {self.expect} messages: {exc!r}")


async def run(p: dict) -> None:
    loop = asyncio.get_running_loop()
    shared = Shared(p)
    hang_up = asyncio.Event()

    def watch_stdin() -> None:  # EOF (the orchestrator closed it, or died): hang up
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(hang_up.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    mark = p["mark"].encode().decode("unicode_escape").encode()
    protocols = [SseProtocol(shared, i, mark) for i in range(p["conns"])]
    failed = 0
    t0 = time.monotonic()
    for first in range(0, len(protocols), 100):  # connect in batches of 100
        done = await asyncio.gather(*(
            loop.create_connection(lambda proto=proto: proto, "127.0.0.1", p["port"])
            for proto in protocols[first:first + 100]
        ), return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                failed += 1
                if failed <= 3:
                    shared.errors.append(f"connect: {outcome!r}")
        if time.monotonic() - t0 > p["connect_timeout"]:
            break
    connected = sum(1 for pr in protocols if pr.transport is not None)
    # Wait for the response heads: until all are in, the connect timeout, or
    # 10 s without progress (a server that cannot take more).
    deadline = max(t0 + p["connect_timeout"], time.monotonic() + 1.0)
    seen, progress = shared.headers, time.monotonic()
    while shared.headers < connected and time.monotonic() < min(deadline, progress + 10.0):
        await asyncio.sleep(0.02)
        if shared.headers != seen:
            seen, progress = shared.headers, time.monotonic()
    shared.live = shared.headers
    emit({"proc": shared.proc, "ready": shared.headers, "failed": p["conns"] - shared.headers,
          "connect_s": time.monotonic() - t0, "errors": shared.errors[:3]})
    c0 = time.process_time()
    await hang_up.wait()
    cpu = time.process_time() - c0
    shared.closing = True
    for pr in protocols:
        if pr.transport is not None:
            pr.transport.close()
    await asyncio.sleep(0.1)
    emit({"proc": shared.proc, "final": True, "cpu_s_after_ready": cpu, "have": shared.have,
          "errors": shared.errors})


def main() -> None:
    p = json.loads(sys.argv[1])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    watchdog = threading.Timer(p["timeout"] + 5, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    try:
        asyncio.run(asyncio.wait_for(run(p), p["timeout"]))
    except (asyncio.TimeoutError, TimeoutError):
        emit({"proc": p["proc"], "error": f"client timed out after {p['timeout']} s"})


if __name__ == "__main__":
    main()
