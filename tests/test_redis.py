"""Tests of the Redis scale-out: ``examples/redis_bridge.py`` and the demo app
``examples/redis_app.py``, against a real ``redis-server``.

A fixture starts ``redis-server`` on a free port (no persistence, loopback
only) and stops it at the end; the app runs as real uvicorn processes
(``sys.executable examples/redis_app.py --port 0 --redis URL``) whose port is
read from the line they print, with stdout and stderr drained all along, and
which are stopped with SIGTERM and a bounded wait. Module-scoped: one Redis and
three workers for the fan-out, resume and unsubscribe tests (worker A has a
per-worker history, B and C do not, so both resume paths meet); the outage test
has a Redis and two workers of its own, since it stops that Redis.

The SSE clients speak HTTP/1.1 on raw sockets (the tests see the status, the
headers and the chunked body): an asyncio client that parses event by event
with the module's SseParser,
and for the 300-client fan-out one thread reading every socket in bulk under a
selector (an asyncio client per stream would cost the small CI machine more
CPU than the three workers). Plain requests go through urllib. Every read has
a timeout and every wait a deadline. The unit tests at the end drive the
bridge in-process against the same Redis.

Without ``redis-server``, redis-py or uvicorn these tests skip with the reason,
except under ``CI=true``, where a skip would hide a broken setup: they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import _support
import pytest
from _support import HOST, drain, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APP = EXAMPLES / "redis_app.py"
TIMEOUT = 10.0  # the most any single read may take
REDIS_SERVER = shutil.which("redis-server")
MISSING = [name for name in ("redis", "uvicorn") if importlib.util.find_spec(name) is None]

if TYPE_CHECKING or not MISSING:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(EXAMPLES))
    import redis
    from redis_bridge import (
        BridgeKeyedStream,
        BridgeStream,
        BridgeUnavailable,
        RedisBridge,
        decode_event,
        encode_event,
        parse_id,
    )

    import broadcaster
    from broadcaster import Event, SseEvent, SseParser


def require() -> None:
    """Skip (fail under CI=true) unless redis-server, redis-py and uvicorn are there."""
    missing = list(MISSING)
    if REDIS_SERVER is None:
        missing.append("redis-server (Debian package redis-server)")
    if missing:
        hint = "pip install --group test; apt-get install redis-server"
        _support.skip(f"the Redis tests need {', '.join(missing)}: {hint}")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll ``condition`` every 20 ms until it holds; the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


# ---------------------------------------------------------------------------
# Processes: redis-server and the demo app
# ---------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence; it can be
    stopped and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self.url = f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", "."],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        threading.Thread(target=drain, args=(self.proc.stdout, self._log), daemon=True).start()
        wait_for(self._pings, f"redis-server answering on port {self.port}")

    def _log(self, line: str | None) -> None:
        if line is not None:
            self.log.append(line)

    def _pings(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"redis-server exited with {self.proc.returncode}: {''.join(self.log)}")
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def call(self, *args: object) -> Any:
        """One command through a fresh redis-py connection."""
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=5)
        try:
            execute: Callable[..., Any] = client.execute_command  # typed loosely across redis-py versions
            return execute(*args)
        finally:
            client.close()

    def shard_subscribers(self, channel: str) -> int:
        reply = self.call("PUBSUB", "SHARDNUMSUB", channel)
        return int(reply[1])

    def xrange_calls(self) -> int:
        info = self.call("INFO", "commandstats")
        stats = info.get("cmdstat_xrange", {})
        return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


class Worker(_support.Process):
    """``examples/redis_app.py`` as a subprocess on a free port. After SIGTERM
    it must exit within 10 s, killed by the re-raised SIGTERM, with no
    traceback in its log."""

    def __init__(self, cwd: Path, redis_url: str, *args: str) -> None:
        argv = [sys.executable, str(APP), "--port", "0", "--redis", redis_url, *args]
        super().__init__(argv, cwd, "redis_app running on", ready_within=None, exit_within=10, errors=("Traceback",))


def start_workers(cwd: Path, redis_url: str, *argss: tuple[str, ...]) -> list[Worker]:
    """Start the workers in parallel, then wait for each to listen."""
    workers = [Worker(cwd, redis_url, *args) for args in argss]
    try:
        for worker in workers:
            worker.wait_ready(20)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


LINGER = 1.0  # --linger of worker A (the one with a per-worker history)


@pytest.fixture(scope="module")
def workers(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    """A (per-worker history of 100, linger 1 s), B and C, on one Redis."""
    cwd = tmp_path_factory.mktemp("cwd")
    started = start_workers(cwd, redis_server.url, ("--local-history", "100", "--linger", str(LINGER)), (), ())
    try:
        yield started
        for worker in started:
            worker.terminate()
    finally:
        for worker in started:
            worker.kill()


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    status, _, data = _support.request(port, method, path, body, content_type=None, timeout=TIMEOUT)
    return status, data


def publish(port: int, key: str, text: str) -> str:
    status, body = request(port, "POST", f"/publish/{key}", text.encode())
    assert status == 200, body
    ident: str = json.loads(body)["id"]
    return ident


def stats(port: int, path: str = "/stats") -> dict[str, Any]:
    status, body = request(port, "GET", path)
    assert status == 200, body
    value: dict[str, Any] = json.loads(body)
    return value


class SseClient:
    """One SSE stream on a raw asyncio connection: the chunked body read by
    hand, its events parsed by the module's SseParser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()  # unparsed chunked body
        self.parser = SseParser(comments=True)
        self.events: deque[SseEvent] = deque()  # parsed, not read yet
        self.ended = False
        self.head = b""  # the status line and headers

    @property
    def worker(self) -> str:
        """The pid of the worker that serves the stream (its x-worker header)."""
        found = re.search(rb"\r\nx-worker: (\d+)\r\n", self.head, re.IGNORECASE)
        assert found, self.head
        return found[1].decode()

    @classmethod
    async def open(cls, port: int, path: str, last_event_id: str | None = None) -> SseClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        extra = "" if last_event_id is None else f"Last-Event-ID: {last_event_id}\r\n"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        client = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = head.split(b" ", 2)[1]
        assert status == b"200", head
        assert b"transfer-encoding: chunked" in head.lower(), head
        client.head = head
        first = await client._chunk()
        assert first == b"retry: 1000\n\n", first
        client.parser.feed(first)
        return client

    async def _chunk(self) -> bytes | None:
        """The next chunk of the body; None for the last one."""
        while True:
            end = self.raw.find(b"\r\n")
            if end >= 0:
                size = int(self.raw[:end], 16)
                if len(self.raw) >= end + 4 + size:
                    data = bytes(self.raw[end + 2 : end + 2 + size])
                    assert self.raw[end + 2 + size : end + 4 + size] == b"\r\n"
                    del self.raw[: end + 4 + size]
                    return data if size else None
            more = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not more:
                raise EOFError("the server closed the connection mid-body")
            self.raw += more

    async def event(self) -> SseEvent | None:
        """The next event; None at the clean end of the body."""
        while not self.events:
            chunk = await self._chunk()
            if chunk is None:
                self.ended = True
                return None
            self.events.extend(self.parser.feed(chunk))
        return self.events.popleft()

    async def reload(self) -> None:
        """The next event is the reload event (a resume that cannot be exact)."""
        event = await self.event()
        assert event is not None and (event.type, event.data) == ("reload", ""), event

    async def messages(self, n: int) -> list[tuple[str, str]]:
        """The next ``n`` events, as (last event id, data); fails at the end of the body."""
        got: list[tuple[str, str]] = []
        while len(got) < n:
            event = await self.event()
            assert event is not None, f"the stream ended after {len(got)} of {n} messages"
            got.append((event.last_event_id, event.data))
        return got

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def sse(port: int, path: str, last_event_id: str | None = None) -> AsyncIterator[SseClient]:
    client = await SseClient.open(port, path, last_event_id)
    try:
        yield client
    finally:
        client.close()


class BulkStreams:
    """Many SSE streams read in bulk by one thread: plain sockets under a
    selector, read every 20 ms (so the kernel batches many frames into one
    read), parsed once all the expected messages are there. Far cheaper than
    an asyncio client per stream, which matters with 300 of them on a small
    machine; the other tests use the frame-by-frame ``SseClient``."""

    MARKER = b"\ndata: "

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.raw: dict[socket.socket, bytearray] = {}

    def open(self, port: int, path: str) -> None:
        """One more stream; returns once its response has started (200, chunked)."""
        sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.socks.append(sock)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        raw = bytearray()
        while b"\r\n\r\n" not in raw:
            more = sock.recv(65536)
            assert more, "the server closed the connection"
            raw += more
        head, _, rest = bytes(raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower(), head
        sock.setblocking(False)
        self.raw[sock] = bytearray(rest)

    def read(self, n: int, timeout: float) -> None:
        """Read until every stream holds ``n`` messages (fails at ``timeout``)."""
        deadline = time.monotonic() + timeout
        counts = {sock: [0, 0] for sock in self.socks}  # messages found, scan position
        with selectors.DefaultSelector() as selector:
            for sock in self.socks:
                selector.register(sock, selectors.EVENT_READ)
            pending = set(self.socks)
            while True:
                for sock in list(pending):
                    raw, found = self.raw[sock], counts[sock]
                    while (at := raw.find(self.MARKER, found[1])) >= 0:
                        found[0] += 1
                        found[1] = at + len(self.MARKER)
                    if found[0] >= n:
                        pending.discard(sock)
                        selector.unregister(sock)
                if not pending:
                    return
                assert time.monotonic() < deadline, f"{len(pending)} streams did not get {n} messages in {timeout} s"
                time.sleep(0.02)
                for ready, _ in selector.select(timeout=1):
                    sock = cast("socket.socket", ready.fileobj)
                    more = sock.recv(1 << 20)
                    assert more, f"a stream ended after {counts[sock][0]} messages: {bytes(self.raw[sock][-200:])!r}"
                    self.raw[sock] += more

    def messages(self, sock: socket.socket) -> list[tuple[str, str]]:
        """The (id, data) of the messages of one stream (frames ``id: ...\\ndata: ...``)."""
        raw, body, pos = bytes(self.raw[sock]), bytearray(), 0
        while pos < len(raw):  # de-chunk
            end = raw.index(b"\r\n", pos)
            size = int(raw[pos:end], 16)
            assert size, "the body ended"
            body += raw[end + 2 : end + 2 + size]
            pos = end + 4 + size
        assert body.startswith(b"retry: 1000\n\n"), bytes(body[:40])
        events = SseParser().feed(bytes(body))
        assert all(event.type == "message" for event in events), events
        return [(event.last_event_id, event.data) for event in events]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class Publisher:
    """POSTs over one keep-alive connection (the publish endpoint of one worker)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Publisher:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def publish(self, key: str, text: str) -> tuple[int, bytes]:
        body = text.encode()
        self.writer.write(
            f"POST /publish/{key} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        return status, await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)

    def close(self) -> None:
        self.writer.close()


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------


def test_fan_out_300_clients_on_3_workers_1000_messages(workers: list[Worker]) -> None:
    """300 clients, 100 per worker, one key; 1,000 messages published round
    robin through the three workers (three concurrent publishers, each in
    order): every client gets every message exactly once, all in the same
    order, which is the order of the global ids and keeps each publisher's
    order; the ids are the ones the publish endpoint returned."""
    key = "fan"
    per_worker, total = 100, 1000

    async def publish_all() -> list[tuple[str, str]]:
        publishers = [await Publisher.open(w.port) for w in workers]

        async def publish_from(index: int) -> list[tuple[str, str]]:
            sent: list[tuple[str, str]] = []
            for n in range(index, total, len(publishers)):
                text = f"p{index}:{n}"
                status, body = await publishers[index].publish(key, text)
                assert status == 200, body
                sent.append((json.loads(body)["id"], text))
            return sent

        try:
            return [item for batch in await asyncio.gather(*map(publish_from, range(3))) for item in batch]
        finally:
            for publisher in publishers:
                publisher.close()

    streams = BulkStreams()
    try:
        for worker in workers:
            for _ in range(per_worker):
                streams.open(worker.port, f"/events/{key}")
        errors: list[BaseException] = []

        def read() -> None:
            try:
                streams.read(total, timeout=60)
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            sent = asyncio.run(publish_all())
        finally:
            reader.join(timeout=70)
        assert not reader.is_alive()
        if errors:
            raise errors[0]
        received = [streams.messages(sock) for sock in streams.socks]
    finally:
        streams.close()

    expected = sorted(sent, key=lambda item: parse_id(item[0]) or (0, 0))
    assert len({ident for ident, _ in sent}) == total
    for got in received:
        assert got == expected  # every message once, in id order
    for index in range(3):  # which is each publisher's own order
        mine = [int(text.split(":")[1]) for _, text in expected if text.startswith(f"p{index}:")]
        assert mine == list(range(index, total, 3))


def test_resume_on_another_worker_while_publishing(workers: list[Worker], redis_server: RedisServer) -> None:
    """A client cut off from worker A reconnects to worker B with its
    Last-Event-ID while messages keep coming: it gets exactly what it missed,
    then the rest, as a client that stayed connected on C saw them. Across
    workers the missed messages come from Redis (XRANGE)."""
    a, b, c = workers
    key = "resume"
    total = 300

    async def main() -> None:
        async with sse(c.port, f"/events/{key}") as observer:
            cut = await SseClient.open(a.port, f"/events/{key}")
            publisher = await Publisher.open(b.port)

            async def publish_all() -> None:
                for n in range(total):
                    status, _ = await publisher.publish(key, f"m{n}")
                    assert status == 200
                    await asyncio.sleep(0.002)

            task = asyncio.ensure_future(publish_all())
            try:
                first = await cut.messages(50)
                cut.close()  # cut off mid-stream
                await asyncio.sleep(0.1)  # messages keep coming meanwhile
                xranges = redis_server.xrange_calls()
                async with sse(b.port, f"/events/{key}", last_event_id=first[-1][0]) as resumed:
                    assert redis_server.xrange_calls() > xranges  # B asked Redis what was missed
                    rest = await resumed.messages(total - 50)
                everything = await observer.messages(total)
                await task
            finally:
                task.cancel()
                publisher.close()
        assert [data for _, data in everything] == [f"m{n}" for n in range(total)]
        assert first + rest == everything

    run(main())


def test_resume_on_the_same_worker_from_its_own_history(workers: list[Worker], redis_server: RedisServer) -> None:
    """Worker A keeps a per-worker history: a client reconnecting to A resumes
    from it, exactly, without asking Redis."""
    a, b, _ = workers
    key = "same"

    async def main() -> None:
        async with sse(a.port, f"/events/{key}") as client:
            ids = [publish(b.port, key, f"s{n}") for n in range(10)]
            first = await client.messages(4)
        xranges = redis_server.xrange_calls()
        async with sse(a.port, f"/events/{key}", last_event_id=first[-1][0]) as again:
            ids += [publish(b.port, key, f"s{n}") for n in range(10, 12)]
            rest = await again.messages(8)
        assert redis_server.xrange_calls() == xranges
        assert first + rest == [(ident, f"s{n}") for n, ident in enumerate(ids)]

    run(main())


def test_an_id_that_cannot_be_resumed_gets_reload_first(workers: list[Worker]) -> None:
    """An unknown or malformed Last-Event-ID: the reload event first, then live."""
    _, b, c = workers

    async def main() -> None:
        for worker, last in ((b, "1-0"), (c, "garbage"), (workers[0], "1-0")):
            async with sse(worker.port, "/events/gap", last_event_id=last) as client:
                await client.reload()
                ident = publish(c.port, "gap", "live")
                assert await client.messages(1) == [(ident, "live")]

    run(main())


def test_last_subscriber_leaving_unsubscribes_the_worker(workers: list[Worker], redis_server: RedisServer) -> None:
    """One Redis subscription per worker serving a key (PUBSUB SHARDNUMSUB),
    whatever its number of local streams, and none once the last one left;
    with a per-worker history, only after the linger."""
    a, b, c = workers
    key = "lonely"
    channel = f"sse:{key}"
    count = redis_server.shard_subscribers

    async def main() -> None:
        assert count(channel) == 0
        b1 = await SseClient.open(b.port, f"/events/{key}")
        assert count(channel) == 1  # confirmed before the response started
        b2 = await SseClient.open(b.port, f"/events/{key}")
        c1 = await SseClient.open(c.port, f"/events/{key}")
        assert count(channel) == 2
        assert stats(b.port, f"/stats/{key}") == {"key": key, "subscribers": 2, "subscribed": True}
        b1.close()
        b2.close()
        await asyncio.to_thread(wait_for, lambda: count(channel) == 1, "B unsubscribed", 5)
        assert stats(b.port, f"/stats/{key}") == {"key": key, "subscribers": 0, "subscribed": False}
        publish(c.port, key, "still there")
        assert (await c1.messages(1))[0][1] == "still there"
        c1.close()
        await asyncio.to_thread(wait_for, lambda: count(channel) == 0, "C unsubscribed", 5)

        a1 = await SseClient.open(a.port, f"/events/{key}")
        assert count(channel) == 1
        a1.close()
        took = await asyncio.to_thread(wait_for, lambda: count(channel) == 0, "A unsubscribed", LINGER + 5)
        assert took >= LINGER * 0.8  # its history lingered first

    run(main())


# ---------------------------------------------------------------------------
# Redis stops, and comes back
# ---------------------------------------------------------------------------


@pytest.fixture
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, list[Worker]]]:
    """A Redis of its own (this test stops it) and two workers."""
    require()
    server = RedisServer(tmp_path_factory.mktemp("redis-outage"))
    server.start()
    started: list[Worker] = []
    try:
        started = start_workers(tmp_path_factory.mktemp("cwd"), server.url, (), ())
        yield server, started
        for worker in started:
            worker.terminate()
    finally:
        for worker in started:
            worker.kill()
        server.stop()


def test_redis_failover_ends_every_stream_of_three_workers_within_1s(tmp_path: Path) -> None:
    """``redis_app.py --workers 3`` (one port, three processes) with 150
    streams: when Redis stops, every stream of every worker ends cleanly (the
    final chunk) within 1 s, each worker noticing the closed connection
    itself, not waiting for its ping; the app then exits cleanly on SIGTERM,
    with warnings as errors in all four processes."""
    require()
    server = RedisServer(tmp_path)
    server.start()
    try:
        argv = [sys.executable, str(APP), "--port", "0", "--redis", server.url, "--workers", "3"]
        # The supervisor stops its workers on SIGTERM, then exits normally.
        supervisor = _support.Process(argv, tmp_path, "redis_app running on", ready_within=20, exit_code=0, exit_within=10)
        with supervisor as app:
            pids: set[str] = set()
            while len(pids) < 3:  # then each worker's, once it listens
                line = app.stdout.get(timeout=20)
                assert line is not None, app.stderr
                pids |= set(re.findall(r"\(pid (\d+)\)", line))

            async def main() -> dict[str, list[float]]:
                streams: list[SseClient] = []
                try:
                    # The kernel hands each connection to one worker: open
                    # 150, and more until each worker serves 20.
                    while len(streams) < 150 or min(Counter(s.worker for s in streams)[p] for p in pids) < 20:
                        assert len(streams) < 600, Counter(s.worker for s in streams)
                        streams.append(await SseClient.open(app.port, f"/events/k{len(streams) % 10}"))
                    start = time.monotonic()
                    await asyncio.to_thread(server.stop)

                    async def ended(stream: SseClient) -> float:
                        assert await stream.event() is None  # the final chunk, nothing before it
                        return time.monotonic() - start

                    times = await asyncio.gather(*(ended(stream) for stream in streams))
                finally:
                    for stream in streams:
                        stream.close()
                by_worker: dict[str, list[float]] = {pid: [] for pid in pids}
                for stream, seconds in zip(streams, times, strict=True):
                    by_worker[stream.worker].append(seconds)
                return by_worker

            by_worker: dict[str, list[float]] = {}

            async def measure() -> None:
                by_worker.update(await main())

            run(measure())
            slowest = {pid: max(seconds) for pid, seconds in by_worker.items()}
            print(f"failover, slowest stream end per worker: {slowest} (streams: {sum(map(len, by_worker.values()))})")
            assert all(seconds < 1.0 for seconds in slowest.values()), slowest
            app.terminate()
    finally:
        server.stop()


def test_redis_stops_and_comes_back(outage: tuple[RedisServer, list[Worker]]) -> None:
    """Redis stops: open streams end cleanly (final chunk) within seconds,
    publishing answers 503 with the reason, a new stream ends at once (so an
    EventSource retries). Redis comes back on the same port: the workers
    reconnect and resubscribe by themselves, and delivery resumes; an id from
    before the restart (Redis kept no data) gets the reload event."""
    server, (w1, w2) = outage
    key = "outage"

    async def main() -> None:
        s1 = await SseClient.open(w1.port, f"/events/{key}")
        s2 = await SseClient.open(w2.port, f"/events/{key}")
        before = publish(w2.port, key, "before")
        assert await s1.messages(1) == await s2.messages(1) == [(before, "before")]

        server.stop()
        start = time.monotonic()
        for client in (s1, s2):
            assert await client.event() is None  # the clean end of the body
            client.close()
        assert time.monotonic() - start < 5

        status, body = request(w1.port, "POST", f"/publish/{key}", b"lost?")
        assert status == 503
        assert json.loads(body)["error"].startswith("Redis unavailable: publishing to 'outage' failed")
        assert stats(w2.port)["redis"] is False
        async with sse(w2.port, f"/events/{key}") as refused:
            assert await refused.event() is None
            assert refused.parser.comments == ["redis unavailable: reconnect later"]

        server.start()

        def reconnected() -> bool:
            return all(stats(worker.port)["redis"] for worker in (w1, w2))

        await asyncio.to_thread(wait_for, reconnected, "both workers reconnected", 15)
        async with sse(w1.port, f"/events/{key}", last_event_id=before) as s3, sse(w2.port, f"/events/{key}") as s4:
            await s3.reload()
            assert server.shard_subscribers(f"sse:{key}") == 2
            after = publish(w1.port, key, "after")
            assert await s3.messages(1) == await s4.messages(1) == [(after, "after")]

    run(main())
    log = w1.stderr
    assert "Redis unavailable" in log and "Redis is back" in log, log


def test_sigterm_ends_open_streams_cleanly_and_the_worker_exits_within_3s(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM to a worker with open streams of two keys (one of which got a
    message): each stream ends with the clean end of its body, nothing before
    it; the worker exits within 3 s, killed by the SIGTERM that uvicorn
    re-raises, with no traceback in its log."""
    [worker] = start_workers(tmp_path, redis_server.url, ())
    with worker:

        async def main() -> None:
            streams = [await SseClient.open(worker.port, f"/events/sigterm-{n % 2}") for n in range(4)]
            try:
                # Through Redis and back: read before the signal.
                last = publish(worker.port, "sigterm-0", "last")
                for stream in streams[::2]:
                    assert await stream.messages(1) == [(last, "last")]
                elapsed = await asyncio.to_thread(worker.terminate)
                for stream in streams:
                    assert await stream.event() is None  # the clean end of the body
                assert elapsed < 3.0, elapsed
            finally:
                for stream in streams:
                    stream.close()

        run(main())


# ---------------------------------------------------------------------------
# The bridge in-process
# ---------------------------------------------------------------------------


def test_codec_round_trip() -> None:
    """encode_event/decode_event carry every field; the global id replaces the event's own."""
    require()
    events = [
        Event("plain"),
        Event("multi\nline\r\ndata ✓ \u2028", event="chat", id="own", retry=1500, comment="a\nb"),
        Event(comment="only a comment"),
        Event("", event="reload"),
        Event(retry=0),
    ]
    for event in events:
        data = encode_event(event)
        assert decode_event(data, None) == event
        assert decode_event(data, None).encode() == event.encode()
        assert decode_event(data, "5-1") == Event(
            event.data, event=event.event, id="5-1", retry=event.retry, comment=event.comment
        )
    assert encode_event(Event("x", event="e")) == b'{"d":"x","e":"e"}'
    for bad in (b"[]", b'{"z": 1}', b'{"d": 5}', b'{"r": "1"}', b"{}"):
        with pytest.raises(ValueError, match=r"encoded Event|at least one"):
            decode_event(bad, None)


def test_stream_ids_compare_as_numbers() -> None:
    require()
    assert parse_id("10-0") == (10, 0)
    assert parse_id("9-5") < parse_id("10-0")  # type: ignore[operator]
    assert parse_id("5-9") < parse_id("5-10")  # type: ignore[operator]
    for bad in (None, "", "5", "5-", "-5", "05-1", "a-1", "1-1-1", " 1-1", "1-1\n"):
        assert parse_id(bad) is None


def bridge_test(body: Callable[[RedisBridge], Awaitable[None]], url: str, **options: Any) -> None:
    """Run ``body(bridge)`` with a started bridge of a fresh key prefix."""

    async def main() -> None:
        async with RedisBridge(url, prefix=f"t{uuid.uuid4().hex[:8]}:", **options) as bridge:
            assert await bridge.wait_available(5)
            await body(bridge)

    asyncio.run(main())


async def take(stream: BridgeStream, n: int) -> list[tuple[str | None, str | None]]:
    return [(event.id, event.data) for event in [await asyncio.wait_for(anext(stream), TIMEOUT) for _ in range(n)]]


def test_replay_boundary_drops_live_duplicates(redis_server: RedisServer) -> None:
    """A resumed stream yields what Redis has after the client's id, then live
    events with a higher id only: live copies of replayed events, and of the
    client's own last one, are dropped."""

    async def body(bridge: RedisBridge) -> None:
        ids = [await bridge.publish("k", Event(f"m{n}")) for n in range(10)]
        stream = await bridge.subscribe("k", ids[3])
        assert stream.resumed is True
        local = bridge.broadcaster
        for n in (2, 3, 9):  # late live copies, as from a slow listener
            local.send("k", Event(f"m{n}", id=ids[n]))
        new = await bridge.publish("k", Event("m10"))
        got = await take(stream, 7)
        assert got == [(ids[n], f"m{n}") for n in range(4, 10)] + [(new, "m10")]
        assert stream.last_event_id == new
        # Resuming from the newest id: nothing to replay, the next one is live.
        stream2 = await bridge.subscribe("k", new)
        assert stream2.resumed is True
        newer = await bridge.publish("k", Event("m11"))
        assert await take(stream2, 1) == await take(stream, 1) == [(newer, "m11")]
        stream.close()
        stream2.close()

    bridge_test(body, redis_server.url)


def test_unknown_trimmed_and_malformed_ids_are_gaps(redis_server: RedisServer) -> None:
    """resumed is False for an id Redis never had, one it trimmed, and one that
    is not a stream id; the stream then goes on live."""

    async def body(bridge: RedisBridge) -> None:
        ids = [await bridge.publish("k", Event(f"m{n}")) for n in range(250)]
        assert redis_server.call("XLEN", f"{bridge._prefix}k") < 250  # MAXLEN ~ 5 trimmed whole nodes
        for last in ("1-0", ids[0], "nonsense", "99999999999999-0"):
            assert last is not None
            stream = await bridge.subscribe("k", last)
            assert stream.resumed is False, last
            live = await bridge.publish("k", Event("live"))
            assert await take(stream, 1) == [(live, "live")]
            stream.close()
        stream = await bridge.subscribe("k", ids[-1])
        assert stream.resumed is True
        stream.close()

    bridge_test(body, redis_server.url, history=5)


async def publish_all(bridge: RedisBridge, key: str, numbers: range) -> list[str | None]:
    """Publish ``<key>-<n>`` for each n, in order; their ids."""
    return [await bridge.publish(key, Event(f"{key}-{n}")) for n in numbers]


async def take_keyed(stream: BridgeKeyedStream, n: int) -> list[tuple[str, str | None, str | None]]:
    """(key, data, the stream's id after it) of the next ``n`` events."""
    got = [await asyncio.wait_for(anext(stream), TIMEOUT) for _ in range(n)]
    return [(key, event.data, event.id) for key, event in got]


def test_keyed_stream_resumes_every_key_exactly_on_another_worker(redis_server: RedisServer) -> None:
    """Two workers (two bridges on one Redis): a multi-key stream on the first
    reads some events, its client goes; events go on being published to every
    key; a stream on the second worker, resumed from the first's id, yields
    exactly what each key missed (from Redis), then live events, each once,
    with ids that name every key's Redis id."""

    async def main() -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        async with RedisBridge(redis_server.url, prefix=prefix) as a, RedisBridge(redis_server.url, prefix=prefix) as b:
            assert await a.wait_available(5) and await b.wait_available(5)
            keys = ["k0", "k1", "k2"]
            before = await a.publish("k1", Event("old"))  # published before anyone followed k1
            first = await a.subscribe_many(keys)
            assert first.resumed is None and first.gaps == () and first.keys == tuple(keys)
            assert broadcaster.parse_positions(first.last_event_id) == {"k0": "0-0", "k1": before, "k2": "0-0"}
            ids = {key: await publish_all(a, key, range(3)) for key in keys}
            got = await take_keyed(first, 9)
            assert sorted((k, d) for k, d, _ in got) == sorted((k, f"{k}-{n}") for k in keys for n in range(3))
            for key in keys:  # each key in publish order
                assert [d for k, d, _ in got if k == key] == [f"{key}-{n}" for n in range(3)]
            lei = got[-1][2]
            assert lei == first.last_event_id
            assert broadcaster.parse_positions(lei) == {key: ids[key][-1] for key in keys}
            first.close()
            missed = {key: await publish_all(b, key, range(3, 5)) for key in keys}
            second = await b.subscribe_many(keys, lei)
            assert second.resumed is True and second.gaps == ()
            live = await b.publish("k2", Event("k2-5"))
            got = await take_keyed(second, 7)
            for key in keys:
                assert [d for k, d, _ in got if k == key] == [f"{key}-{n}" for n in (3, 4)] + (["k2-5"] if key == "k2" else [])
            final = broadcaster.parse_positions(second.last_event_id)
            assert got[-1][2] == second.last_event_id
            assert final == {"k0": missed["k0"][-1], "k1": missed["k1"][-1], "k2": live}
            second.close()

    require()
    asyncio.run(main())


def test_keyed_stream_reports_the_keys_it_cannot_resume(redis_server: RedisServer) -> None:
    """A key whose id Redis trimmed, and a key added to the list, are gaps; the
    others resume exactly; a malformed id makes every key a gap; a response
    writes on_gap's event first, then each event named by its key."""

    async def body(bridge: RedisBridge) -> None:
        first = await bridge.subscribe_many(["a", "b"])
        ida = await bridge.publish("a", Event("a0"))
        idb = await bridge.publish("b", Event("b0"))
        await take_keyed(first, 2)
        lei = first.last_event_id
        first.close()
        for n in range(250):  # more than b's stream keeps
            await bridge.publish("b", Event(f"b{n + 1}"))
        after_a = await bridge.publish("a", Event("a1"))
        stream = await bridge.subscribe_many(["a", "b", "c"], lei)
        assert stream.resumed is False and stream.gaps == ("b", "c")
        assert await take_keyed(stream, 1) == [("a", "a1", stream.last_event_id)]
        positions = broadcaster.parse_positions(stream.last_event_id)
        assert positions is not None and positions["a"] == after_a and positions["b"] != idb
        stream.close()
        bad = await bridge.subscribe_many(["a", "b"], "not an id")
        assert bad.resumed is False and bad.gaps == ("a", "b")
        bad.close()
        assert ida is not None

        peer = AsgiServerSide()
        app = bridge.response_many(["a"], lei, on_gap=lambda gaps: Event.json(list(gaps), event="reload"))
        task = asyncio.ensure_future(app(peer.scope, peer.receive, peer.send))
        await peer.wait_for(lambda body: b"a1" in body)
        peer.disconnect()
        await asyncio.wait_for(task, TIMEOUT)
        assert b"event: reload" not in peer.body, "a resumed exactly: no reload"
        frame = peer.body.split(b"\n\n")[1]
        assert frame == b"event: a\nid: " + broadcaster.format_positions({"a": after_a}).encode() + b"\ndata: a1"

    require()
    bridge_test(body, redis_server.url, history=5)


class AsgiServerSide:
    """The server side of one in-memory GET: collects the body, feeds a
    disconnect when told, and lets a test await what it has received."""

    def __init__(self) -> None:
        self.scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
        self.body = b""
        self._gone = asyncio.Event()
        self._changed = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        self.body += message.get("body", b"")
        self._changed.set()

    async def wait_for(self, ok: Callable[[bytes], bool]) -> None:
        while not ok(self.body):
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), TIMEOUT)

    def disconnect(self) -> None:
        self._gone.set()


def test_subscriptions_follow_local_channels(redis_server: RedisServer) -> None:
    """The bridge subscribes a key with its first local stream and unsubscribes
    it with its last, also when streams come and go faster than Redis answers."""

    async def body(bridge: RedisBridge) -> None:
        channel = f"{bridge._prefix}k"

        def subscribers() -> int:
            return redis_server.shard_subscribers(channel)

        first = await bridge.subscribe("k")
        assert bridge.subscribed("k") and subscribers() == 1
        second = await bridge.subscribe("k")
        first.close()
        assert subscribers() == 1
        for _ in range(5):  # leave and come back at once: in flight both ways
            second.close()
            second = await bridge.subscribe("k")
            assert bridge.subscribed("k")
        assert subscribers() == 1
        event = Event("through")
        ident = await bridge.publish("k", event)
        assert await take(second, 1) == [(ident, "through")]
        second.close()
        await asyncio.to_thread(wait_for, lambda: subscribers() == 0, "unsubscribed", 5)
        assert not bridge.subscribed("k")

        many = [await bridge.subscribe(f"key{n}") for n in range(50)]
        assert all(redis_server.shard_subscribers(f"{bridge._prefix}key{n}") == 1 for n in range(0, 50, 7))
        for stream in many:
            stream.close()
        await asyncio.to_thread(
            wait_for, lambda: redis_server.shard_subscribers(f"{bridge._prefix}key49") == 0, "unsubscribed", 5
        )
        assert len(bridge.broadcaster) == 0

    bridge_test(body, redis_server.url)


def test_plain_pub_sub_without_history_or_sharding(redis_server: RedisServer) -> None:
    """history=0: no stream, no ids, no resume; sharded=False: PUBLISH/SUBSCRIBE."""

    async def body(bridge: RedisBridge) -> None:
        stream = await bridge.subscribe("k", "1-0")
        assert stream.resumed is False
        assert redis_server.call("PUBSUB", "NUMSUB", f"{bridge._prefix}k")[1] == 1
        assert await bridge.publish("k", Event("x", id="mine")) is None
        assert await take(stream, 1) == [("mine", "x")]
        assert redis_server.call("EXISTS", f"{bridge._prefix}k") == 0
        stream.close()

    bridge_test(body, redis_server.url, history=0, sharded=False)


def test_lost_connection_ends_streams_and_reconnects(redis_server: RedisServer) -> None:
    """CLIENT KILL of the listener's connection: the local streams end, and the
    bridge reconnects by itself and serves again."""

    async def body(bridge: RedisBridge) -> None:
        stream = await bridge.subscribe("k")
        redis_server.call("CLIENT", "KILL", "TYPE", "pubsub")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), TIMEOUT)
        assert await bridge.wait_available(5)
        again = await bridge.subscribe("k")
        ident = await bridge.publish("k", Event("back"))
        assert await take(again, 1) == [(ident, "back")]
        again.close()

    bridge_test(body, redis_server.url, backoff=(0.05, 0.2))


def test_unresponsive_redis_is_detected_by_ping(redis_server: RedisServer) -> None:
    """A Redis that stops answering (CLIENT PAUSE) without closing the
    connection: the watchdog's PING gets no reply in time, the streams end."""

    async def body(bridge: RedisBridge) -> None:
        stream = await bridge.subscribe("k")
        await asyncio.sleep(0.3)  # idle: the watchdog pings
        redis_server.call("CLIENT", "PAUSE", "1500", "ALL")
        start = time.monotonic()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), TIMEOUT)
        assert time.monotonic() - start < 1.5
        assert await bridge.wait_available(5)

    bridge_test(body, redis_server.url, ping_interval=0.2, ping_timeout=0.4, backoff=(0.05, 0.2))


def test_redis_unreachable(tmp_path: Path) -> None:
    """No Redis at all: publish and subscribe raise BridgeUnavailable at once,
    and the response is a stream that ends at once."""
    require()
    url = f"redis://{HOST}:{free_port()}/0"

    async def main() -> None:
        async with RedisBridge(url, backoff=(0.05, 0.1)) as bridge:
            assert not await bridge.wait_available(0.2)
            with pytest.raises(BridgeUnavailable, match="Redis unavailable: publishing to 'k' failed"):
                await bridge.publish("k", Event("x"))
            with pytest.raises(BridgeUnavailable, match="Redis unavailable"):
                await bridge.subscribe("k")
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                await asyncio.sleep(10)
                return {"type": "http.disconnect"}

            async def send(message: Any) -> None:
                sent.append(dict(message))

            scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
            await asyncio.wait_for(bridge.response("k")(scope, receive, send), TIMEOUT)
            assert sent[0]["status"] == 200
            assert [m.get("body") for m in sent[1:]] == [b":\n\n", b": redis unavailable: reconnect later\n\n", b""]
            assert len(bridge.broadcaster) == 0

    asyncio.run(main())


def test_local_history_resumes_without_redis(redis_server: RedisServer) -> None:
    """With local_history, a reconnect to the same process resumes from its own
    history (the global ids), never calling XRANGE."""

    async def body(bridge: RedisBridge) -> None:
        stream = await bridge.subscribe("k")
        ids = [await bridge.publish("k", Event(f"m{n}")) for n in range(5)]
        got = await take(stream, 2)
        stream.close()

        async def no_xrange(key: str, last_id: str) -> Any:
            raise AssertionError("asked Redis")

        bridge._missed = no_xrange  # type: ignore[method-assign]
        again = await bridge.subscribe("k", got[-1][0])
        assert again.resumed is True
        assert await take(again, 3) == [(ids[n], f"m{n}") for n in range(2, 5)]
        again.close()

    bridge_test(body, redis_server.url, local_history=10, linger=5.0)


def test_options_are_checked() -> None:
    require()
    with pytest.raises(ValueError, match="local_history needs history"):
        RedisBridge("redis://127.0.0.1:1/0", history=0, local_history=10)
    with pytest.raises(ValueError, match="history"):
        RedisBridge("redis://127.0.0.1:1/0", history=-1)
    with pytest.raises(ValueError, match="ping_timeout"):
        RedisBridge("redis://127.0.0.1:1/0", ping_timeout=0)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisBridge(redis.asyncio.Redis(decode_responses=True))
    with pytest.raises(TypeError, match="redis must be"):
        RedisBridge(42)  # type: ignore[arg-type]


def test_a_setup_that_fails_as_the_bridge_closes_is_not_reported_as_never_retrieved() -> None:
    """The listener's connection setup fails in the very loop iteration in
    which the bridge's listener is cancelled (the bridge closing while Redis
    is down, as at a worker's shutdown): its error is retrieved, so asyncio
    reports no "Task exception was never retrieved"."""
    require()

    async def main() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        bridge = RedisBridge("redis://127.0.0.1:1/0")
        failing = asyncio.Event()

        async def setup(conn: object) -> None:
            failing.set()
            raise redis.exceptions.ConnectionError("refused")

        bridge._setup = setup  # type: ignore[method-assign]
        session = asyncio.ensure_future(bridge._session())
        await failing.wait()  # the setup has raised in the same step
        session.cancel()  # before the session resumes to read it
        await asyncio.wait((session,))
        assert session.cancelled()
        del session
        gc.collect()
        return reported

    assert asyncio.run(main()) == []


def test_a_burst_from_redis_does_not_overflow_the_local_buffers(redis_server: RedisServer) -> None:
    """Hundreds of messages arriving at once (all in the listener's socket
    buffer) reach a reader whose buffer holds 2, without a loss: the listener
    lets the local readers run after each message it hands out."""

    async def body(bridge: RedisBridge) -> None:
        stream = await bridge.subscribe("k")
        got: list[str | None] = []

        async def read() -> None:
            async for event in stream:
                got.append(event.data)
                if len(got) == 300:
                    return

        reader = asyncio.ensure_future(read())
        client = redis.asyncio.Redis(host=HOST, port=redis_server.port)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for n in range(300):  # one round trip: Redis sends them back to back
                    pipe.execute_command("SPUBLISH", f"{bridge._prefix}k", b"\n" + encode_event(Event(f"m{n}")))
                await pipe.execute()
        finally:
            await client.aclose()
        await asyncio.wait_for(reader, TIMEOUT)
        assert got == [f"m{n}" for n in range(300)]
        assert stream._stream.lagged == 0

    bridge_test(body, redis_server.url, buffer=2)


def test_a_redis_that_accepts_but_never_answers() -> None:
    """A server that accepts connections and never answers: the bridge does
    not hang (neither connecting, nor publishing, nor closing) and says why."""
    require()
    with socket.create_server((HOST, 0)) as silent:  # the kernel accepts; nobody answers
        url = f"redis://{HOST}:{silent.getsockname()[1]}/0"

        async def main() -> None:
            bridge = RedisBridge(
                url, connect_timeout=0.2, ping_timeout=0.2, command_timeout=0.3, sharded=True, backoff=(0.05, 0.1)
            )
            await bridge.start()
            start = time.monotonic()
            try:
                assert not await bridge.wait_available(1.0)
                with pytest.raises(BridgeUnavailable, match="Redis unavailable: publishing to 'k' failed"):
                    await bridge.publish("k", Event("x"))
                with pytest.raises(BridgeUnavailable, match=r"did not answer|Timeout|not connected"):
                    await bridge.subscribe("k")
            finally:
                await bridge.aclose()
            assert time.monotonic() - start < 3

        asyncio.run(main())
