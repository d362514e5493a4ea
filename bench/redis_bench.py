"""Cross-process delivery through Redis: our bridge vs encode/broadcaster's redis backend.

    python bench/redis_bench.py [--quick] [--out FILE] [--python PY] [--redis-server PATH]

One ``redis-server`` (started here on a free 127.0.0.1 port, no persistence),
``--procs`` subscriber processes with ``--subs`` subscribers each on one
channel, and one publisher process. Every implementation gets the same load,
back to back on the same Redis:

* burst: ``--messages`` published one after the other as fast as the publisher
  can (each publish awaited); the figure is the delivery rate, subscriber
  deliveries per second from the first publish to the last delivery;
* paced: ``--rate`` messages a second for ``--seconds``; the figures are the
  publish-to-delivery latency percentiles (p50, p99, max) over every delivery.

Implementations (each subscriber process is a fresh interpreter):

* ``ours``: ``examples/redis_bridge.py`` with stream history (each publish is
  one Lua script: XADD + SPUBLISH), the local ``Broadcaster`` fanning out;
* ``ours, pub/sub``: the same with ``history=0`` (SPUBLISH only), like-for-like
  with encode's pub/sub backend;
* ``encode``: encode/broadcaster 0.3.x ``Broadcast("redis://...")`` (redis-py
  PubSub, one asyncio.Queue per subscriber);
* ``encode, stream``: its ``redis-stream://`` backend (XADD, XREAD COUNT 1).

encode/broadcaster also imports as ``broadcaster``, so the two libraries live
in two virtual environments (created on first use under ``bench/.venvs/``, or
``$BENCH_VENVS``, with the same pinned redis-py) and never share a process.
Prints a table and writes JSON (``bench/redis_results.json`` unless ``--out``).
Every wait is bounded; a run that loses messages says so instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = Path(os.environ.get("BENCH_VENVS", BENCH / ".venvs"))
HOST = "127.0.0.1"
REDIS_PY = "redis==8.1.0"
ENVS = {
    "redis-ours": [REDIS_PY],
    "redis-peers": ["broadcaster[redis]==0.3.1", REDIS_PY],
}
IMPLS = {
    "ours": ("redis-ours", "ours"),
    "ours-pubsub": ("redis-ours", "ours, pub/sub"),
    "encode": ("redis-peers", "encode/broadcaster"),
    "encode-stream": ("redis-peers", "encode, stream"),
}
CHANNEL = "bench"
PREFIX = "rb:"


# ---------------------------------------------------------------------------
# Worker side: runs in an implementation's venv (``--role sub`` or ``pub``)
# ---------------------------------------------------------------------------


def _import_ours() -> Any:
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    import redis_bridge  # noqa: PLC0415

    return redis_bridge


class Ours:
    def __init__(self, url: str, history: int) -> None:
        bridge_module = _import_ours()
        from broadcaster import Event  # noqa: PLC0415  (ours: ROOT is first on sys.path)

        self.Event = Event
        self.bridge = bridge_module.RedisBridge(url, history=history, prefix=PREFIX)

    async def __aenter__(self) -> Ours:
        await self.bridge.start()
        if not await self.bridge.wait_available(10):
            raise RuntimeError("the bridge did not connect")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bridge.aclose()

    async def subscribe(self) -> Any:
        return await self.bridge.subscribe(CHANNEL)

    @staticmethod
    def data(item: Any) -> str:
        return str(item.data)

    async def publish(self, text: str) -> None:
        await self.bridge.publish(CHANNEL, self.Event(text))


class Encode:
    def __init__(self, url: str, stream: bool) -> None:
        import broadcaster  # noqa: PLC0415  (encode/broadcaster: this venv has no other)

        assert hasattr(broadcaster, "Broadcast"), f"not encode/broadcaster: {broadcaster.__file__}"
        self.broadcast = broadcaster.Broadcast(url.replace("redis://", "redis-stream://") if stream else url)
        self._contexts: list[Any] = []

    async def __aenter__(self) -> Encode:
        await self.broadcast.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for context in reversed(self._contexts):
            await context.__aexit__(None, None, None)
        await self.broadcast.disconnect()

    async def subscribe(self) -> Any:
        context = self.broadcast.subscribe(channel=PREFIX + CHANNEL)
        self._contexts.append(context)
        subscriber = await context.__aenter__()
        return subscriber.__aiter__()

    @staticmethod
    def data(item: Any) -> str:
        return str(item.message)

    async def publish(self, text: str) -> None:
        await self.broadcast.publish(PREFIX + CHANNEL, text)


def _make(impl: str, url: str) -> Any:
    if impl == "ours":
        return Ours(url, history=1000)
    if impl == "ours-pubsub":
        return Ours(url, history=0)
    return Encode(url, stream=impl == "encode-stream")


async def _subscriber_process(impl: str, url: str, subs: int, messages: int, timeout: float) -> dict[str, Any]:
    """``subs`` subscribers in this process; each reads ``messages`` messages
    ``"<seq> <monotonic_ns at publish>"`` and records the latency of each."""
    async with _make(impl, url) as lib:
        streams = [await lib.subscribe() for _ in range(subs)]
        print("ready", flush=True)
        cpu = time.process_time()
        latencies: list[int] = []
        first: list[int] = []
        last: list[int] = []
        received = [0] * subs

        async def read(index: int, stream: Any) -> None:
            data = lib.data
            record = latencies.append
            async for item in stream:
                now = time.monotonic_ns()
                sent = int(data(item).split(" ", 1)[1])
                if received[index] == 0:
                    first.append(now)
                record(now - sent)
                received[index] += 1
                if received[index] == messages:
                    last.append(now)
                    return

        tasks = [asyncio.ensure_future(read(i, s)) for i, s in enumerate(streams)]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.wait(tasks)
        for stream in streams:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        return {
            "cpu_s": time.process_time() - cpu,
            "received": sum(received),
            "first_ns": min(first, default=0),
            "last_ns": max(last, default=0) if not pending else time.monotonic_ns(),
            "latencies_us": [lat // 1000 for lat in latencies],
        }


async def _publisher_process(impl: str, url: str, messages: int, rate: float, concurrency: int) -> dict[str, Any]:
    """Publish ``messages`` messages: paced at ``rate`` a second by one task, or
    (``rate`` 0) as fast as ``concurrency`` tasks can, each awaiting its publish."""
    async with _make(impl, url) as lib:
        cpu = time.process_time()
        start = time.monotonic_ns()
        if rate:
            for seq in range(messages):
                delay = (start + int(seq * 1e9 / rate) - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                await lib.publish(f"{seq} {time.monotonic_ns()}")
        else:
            counter = iter(range(messages))

            async def publisher() -> None:
                for seq in counter:
                    await lib.publish(f"{seq} {time.monotonic_ns()}")

            await asyncio.gather(*(publisher() for _ in range(concurrency)))
        return {"first_ns": start, "end_ns": time.monotonic_ns(), "cpu_s": time.process_time() - cpu}


def worker_main(args: argparse.Namespace) -> None:
    if args.role == "sub":
        result = asyncio.run(_subscriber_process(args.impl, args.url, args.subs, args.messages, args.timeout))
    else:
        result = asyncio.run(_publisher_process(args.impl, args.url, args.messages, args.rate, args.concurrency))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# Harness side
# ---------------------------------------------------------------------------


def ensure_env(name: str, base_python: str) -> str:
    """The interpreter of venv ``name`` (created with ``base_python`` if needed)."""
    target = VENVS / name
    python = target / "bin" / "python"
    stamp = target / ".redis-bench-stamp"
    want = " ".join(ENVS[name])
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    print(f"[setup] creating {target} ({want})", flush=True)
    if target.exists():
        shutil.rmtree(target)
    subprocess.run([base_python, "-m", "venv", str(target)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *ENVS[name]], check=True)
    stamp.write_text(want)
    return str(python)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Redis:
    def __init__(self, server: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", "/tmp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.call("PING") != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.url = f"redis://{HOST}:{self.port}/0"

    def call(self, *args: str) -> Any:
        """One command over a raw socket (RESP), for the harness's few needs."""
        try:
            with socket.create_connection((HOST, self.port), timeout=5) as sock:
                sock.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args))
                reply = sock.recv(65536).decode()
        except OSError:
            return None
        if reply.startswith("+"):
            return reply[1:].strip()
        if reply.startswith(":"):
            return int(reply[1:])
        return reply

    def numsub(self) -> int:
        """Subscribers of the channel, sharded or not (the reply's last integer)."""
        total = 0
        for command in ("NUMSUB", "SHARDNUMSUB"):
            reply = self.call("PUBSUB", command, PREFIX + CHANNEL)
            if isinstance(reply, str) and reply.startswith("*2"):
                total += int(reply.strip().split("\r\n")[-1].lstrip(":"))
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _spawn(python: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [python, str(Path(__file__).resolve()), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=BENCH,
    )


def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"worker failed (exit {proc.returncode}):\n{err[-3000:]}")


def run_case(
    python: str, impl: str, redis: Redis, procs: int, subs: int, messages: int, rate: float, concurrency: int
) -> dict[str, Any]:
    """One measurement: subscriber processes, then the publisher once all are subscribed."""
    timeout = 30 + (messages / rate if rate else messages / 500)
    common = ["--impl", impl, "--url", redis.url, "--messages", str(messages)]
    subscribers = [
        _spawn(python, "--role", "sub", *common, "--subs", str(subs), "--timeout", str(timeout)) for _ in range(procs)
    ]
    try:
        for proc in subscribers:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "ready" once its subscribers are subscribed
            if line.strip() != "ready":
                raise RuntimeError(f"{impl} subscriber did not start: {line!r} {proc.communicate()[1][-2000:]}")
        if impl != "encode-stream":  # pub/sub: wait until Redis has every process's subscription
            deadline = time.monotonic() + 10
            while redis.numsub() < procs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{impl}: only {redis.numsub()} of {procs} processes subscribed")
                time.sleep(0.02)
        else:
            time.sleep(0.3)  # its subscribe only records the stream's last id
        publisher = _spawn(python, "--role", "pub", *common, "--rate", str(rate), "--concurrency", str(concurrency))
        pub = _result(publisher, timeout)
        subs_results = [_result(proc, timeout + 10) for proc in subscribers]
    finally:
        for proc in subscribers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    expected = procs * subs * messages
    received = sum(r["received"] for r in subs_results)
    latencies = sorted(lat for r in subs_results for lat in r["latencies_us"])
    last = max(r["last_ns"] for r in subs_results)
    seconds = (last - pub["first_ns"]) / 1e9
    return {
        "impl": impl,
        "mode": "paced" if rate else "burst",
        "procs": procs,
        "subs_per_proc": subs,
        "messages": messages,
        "rate": rate,
        "expected": expected,
        "received": received,
        "seconds": round(seconds, 4),
        "publish_seconds": round((pub["end_ns"] - pub["first_ns"]) / 1e9, 4),
        "deliveries_per_s": round(received / seconds) if seconds > 0 else 0,
        "sub_cpu_us_per_delivery": round(sum(r["cpu_s"] for r in subs_results) * 1e6 / max(1, received), 2),
        "pub_cpu_us_per_message": round(pub["cpu_s"] * 1e6 / messages, 1),
        "p50_ms": round(_percentile(latencies, 50) / 1000, 3),
        "p99_ms": round(_percentile(latencies, 99) / 1000, 3),
        "max_ms": round(latencies[-1] / 1000, 3) if latencies else 0.0,
    }


def _percentile(values: list[int], pct: float) -> float:
    if not values:
        return 0.0
    return float(values[min(len(values) - 1, int(len(values) * pct / 100))])


def harness_main(args: argparse.Namespace) -> None:
    server = args.redis_server or shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is needed (Debian: apt-get install redis-server)")
    pythons = {name: ensure_env(name, args.python) for name in ENVS}
    impls = [impl for impl in IMPLS if impl in args.only.split(",")] if args.only else list(IMPLS)
    procs, subs = args.procs, args.subs
    messages, rate, seconds = args.messages, args.rate, args.seconds
    if args.quick:
        subs, messages, seconds = min(subs, 50), min(messages, 500), min(seconds, 1.0)
    redis = Redis(server)
    results: list[dict[str, Any]] = []
    try:
        version = redis.call("INFO", "server")
        redis_version = version.split("redis_version:")[1].split("\r\n")[0] if "redis_version:" in version else "?"
        for repeat in range(args.repeat):
            order = impls[repeat % len(impls) :] + impls[: repeat % len(impls)]  # rotate: a noisy machine
            for impl in order:
                env = IMPLS[impl][0]
                for rate_now, count in ((0.0, messages), (rate, max(1, int(rate * seconds)))):
                    case = run_case(pythons[env], impl, redis, procs, subs, count, rate_now, args.concurrency)
                    case["repeat"] = repeat
                    results.append(case)
                    print(
                        f"[{IMPLS[impl][1]}] {case['mode']}: {case['received']}/{case['expected']} "
                        f"in {case['seconds']} s, p99 {case['p99_ms']} ms",
                        flush=True,
                    )
    finally:
        redis.stop()
    summary = _summarise(results, impls)
    _print_table(summary, procs, subs, messages, rate, seconds, redis_version, args.concurrency)
    out = Path(args.out) if args.out else BENCH / "redis_results.json"
    out.write_text(
        json.dumps(
            {
                "redis_version": redis_version,
                "redis_py": REDIS_PY,
                "python": subprocess.run(
                    [args.python, "-c", "import sys; print(sys.version.split()[0])"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip(),
                "load": {
                    "procs": procs,
                    "subs_per_proc": subs,
                    "messages": messages,
                    "concurrency": args.concurrency,
                    "rate": rate,
                    "seconds": seconds,
                },
                "summary": summary,
                "runs": results,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")


def _summarise(results: list[dict[str, Any]], impls: list[str]) -> list[dict[str, Any]]:
    """Medians over the repeats, per implementation."""
    rows = []
    for impl in impls:
        burst = [r for r in results if r["impl"] == impl and r["mode"] == "burst"]
        paced = [r for r in results if r["impl"] == impl and r["mode"] == "paced"]
        rows.append(
            {
                "impl": impl,
                "name": IMPLS[impl][1],
                "burst_deliveries_per_s": round(statistics.median(r["deliveries_per_s"] for r in burst)),
                "burst_publish_per_s": round(statistics.median(r["messages"] / r["publish_seconds"] for r in burst)),
                "burst_p99_ms": statistics.median(r["p99_ms"] for r in burst),
                "sub_cpu_us_per_delivery": statistics.median(r["sub_cpu_us_per_delivery"] for r in burst),
                "pub_cpu_us_per_message": statistics.median(r["pub_cpu_us_per_message"] for r in burst),
                "paced_p50_ms": statistics.median(r["p50_ms"] for r in paced),
                "paced_p99_ms": statistics.median(r["p99_ms"] for r in paced),
                "paced_max_ms": statistics.median(r["max_ms"] for r in paced),
                "lost": sum(r["expected"] - r["received"] for r in burst + paced),
            }
        )
    return rows


def _print_table(
    rows: list[dict[str, Any]],
    procs: int,
    subs: int,
    messages: int,
    rate: float,
    seconds: float,
    version: str,
    concurrency: int,
) -> None:
    print(
        f"\nRedis {version}, {procs} subscriber processes x {subs} subscribers, one channel; "
        f"burst: {messages} messages by {concurrency} publishing tasks; paced: {rate:g}/s for {seconds:g} s"
    )
    head = f"{'implementation':<20} {'deliveries/s':>13} {'publish/s':>10} {'burst p99':>10} "
    head += f"{'paced p50':>10} {'paced p99':>10} {'paced max':>10} {'sub us/dlv':>11} {'pub us/msg':>11} {'lost':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<20} {r['burst_deliveries_per_s']:>13,} {r['burst_publish_per_s']:>10,} "
            f"{r['burst_p99_ms']:>8.1f}ms {r['paced_p50_ms']:>8.2f}ms {r['paced_p99_ms']:>8.2f}ms "
            f"{r['paced_max_ms']:>8.1f}ms {r['sub_cpu_us_per_delivery']:>11.2f} {r['pub_cpu_us_per_message']:>11.1f} "
            f"{r['lost']:>6}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("sub", "pub"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=3, help="subscriber processes (default 3)")
    parser.add_argument("--subs", type=int, default=100, help="subscribers per process (default 100)")
    parser.add_argument("--messages", type=int, default=2000, help="messages of the burst (default 2000)")
    parser.add_argument("--concurrency", type=int, default=8, help="publishing tasks in the burst (default 8)")
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s when paced (default 500)")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of the paced run (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, order rotated (default 3)")
    parser.add_argument("--only", help="comma-separated: " + ",".join(IMPLS))
    parser.add_argument("--quick", action="store_true", help="a smaller load, for a smoke run")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venvs")
    parser.add_argument("--redis-server", help="path of redis-server (default: on PATH)")
    parser.add_argument("--out", help="JSON output (default bench/redis_results.json)")
    args = parser.parse_args()
    if args.role:
        worker_main(args)
    else:
        harness_main(args)


if __name__ == "__main__":
    main()
