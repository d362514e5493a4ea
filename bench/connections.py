"""Case 7: many open SSE connections on one uvicorn worker: RSS per connection, one-to-all latency.

One session = one server process (``sse_server.py``, the same stacks and the
same uvicorn set-up as case 3: httptools, asyncio loop, 127.0.0.1) + enough
client processes (``conn_client.py``, at most 5,000 connections each) to hold
N connections open on key ``"k"``, all started fresh. The orchestrator (this
module, in ``run.py``'s process) drives it:

1. **Warm-up.** One SSE connection is opened, waits until the server counts it
   subscribed, receives one message (``GET /publish``) and is closed; so the
   imports and code paths of a connection, a subscription, a send, a
   disconnect and the control endpoints are loaded before the baseline.
2. **Baseline.** ``GET /info?trim=1`` makes the server collect garbage and
   ``malloc_trim(0)`` (every stack alike): without it, memory that start-up
   freed but kept resident (our server compiles ``broadcaster.py`` from
   source, as no ``.pyc`` is written: a few MiB) is reused by the first
   connections unseen, and RSS per connection came out ~2.5 KiB low at N =
   1,000 for ours only. Then the server's VmRSS (``/proc/<pid>/status``, read
   by the orchestrator) is sampled every 0.2 s until the last three samples
   lie within max(64 KiB, 0.2 %) of each other (at most 5 s): the median of
   those three. This is the RSS before the first measured connection.
3. **N connections.** The clients open their shares (batches of 100 per
   process) and report when every connection has its ``200`` head; the
   orchestrator then polls ``GET /info`` until the server counts all N
   subscribed. A client that cannot open, or get a head for, all of its share
   within the connect timeout reports how many it holds: the session records
   "held k of N" and ends there (the run carries on).
4. **Steady state.** Message 0 goes to all N; once every client reports that
   all its connections have it, RSS is read as in step 2. RSS per connection =
   (that - baseline) / N, in KiB. (RSS is read again after the last message:
   ``kib_per_conn_end``; and once before message 0, all N open and
   subscribed but nothing sent yet: ``kib_per_conn_open``.)
5. **One-to-all latency.** Messages 1..M (M = 5), one at a time: ``GET
   /publish`` stamps ``time.monotonic_ns()`` into the data and publishes; each
   client reports the moment the *last* of its connections had the message;
   latency = max over clients of that moment - the send stamp (the processes
   share the clock). The next message goes 0.25 s after every client has the
   previous one. Per session: the median and the max of the M latencies, and
   the server's CPU time per message (utime + stime from ``/proc/<pid>/stat``,
   10 ms ticks, over the M messages).
6. Clients hang up (stdin closed), then the server gets SIGINT, then SIGKILL.

The clients run on the same 2 cores as the server: while the server writes N
events, they read and parse them, so the latency includes the clients' share
of the second core (the same work for every stack). Message 0 (the first
delivery to each connection) is left out of the latency.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

from sse_http import _free_port, _wait_port

STACKS = ["ours", "raw", "raw-watch", "sse-starlette"]
LABELS = {
    "ours": "(a) ours: Broadcaster.response(b.subscribe(key)), default SseConfig",
    "candidate": "(a*) ours, patched",
    "sse-starlette": "(b) sse-starlette + encode/broadcaster",
    "raw": "(d) floor: raw ASGI, deque + waiter future per conn",
    "raw-watch": "(d') floor (d) + a pending receive() task per conn (notices clients that leave)",
}
PER_PROCESS = 5000  # connections per client process
MESSAGES = 5  # latency messages after the steady-state one
GAP = 0.25  # s between one message reaching everyone and the next send
WARMUP_SEQ = 999_999


# -- /proc readings ------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks (USER_HZ = 100)


def settled_rss(pid: int, interval: float = 0.2, window: int = 3, longest: float = 5.0) -> dict:
    """Sample VmRSS until the last ``window`` samples agree within max(64 KiB,
    0.2 %) (or ``longest`` s): their median, in KiB."""
    samples: list[int] = []
    end = time.monotonic() + longest
    settled = False
    while True:
        samples.append(rss_kib(pid))
        last = samples[-window:]
        if len(last) == window and max(last) - min(last) <= max(64, 0.002 * max(last)):
            settled = True
            break
        if time.monotonic() > end:
            break
        time.sleep(interval)
    return {"kib": sorted(last)[len(last) // 2], "samples": samples, "settled": settled}


# -- control requests ------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head[:60]!r}")
    return body


def get_json(port: int, path: str, timeout: float = 30) -> dict:
    return json.loads(http_get(port, path, timeout))


def wait_ready(port: int, target: int, seconds: float) -> int:
    """Poll /info until ``target`` streams were subscribed in all; the count."""
    end = time.monotonic() + seconds
    while True:
        ready = get_json(port, "/info")["ready"]
        if ready >= target or time.monotonic() > end:
            return ready
        time.sleep(0.05)


def warm_up(port: int, mark: bytes) -> None:
    """One SSE connection that subscribes, gets one message and goes."""
    before = get_json(port, "/info")["ready"]
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(b"GET /sse HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("warm-up connection closed before its response head")
            buf += chunk
        if wait_ready(port, before + 1, 10) < before + 1:
            raise RuntimeError("warm-up connection never subscribed")
        http_get(port, f"/publish?seq={WARMUP_SEQ}")
        while mark not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("warm-up connection closed before its message")
            buf += chunk
    time.sleep(0.5)  # let the server see the disconnect and clean up


# -- one session ---------------------------------------------------------------------


def _start_client(ctx, i: int, params: dict, lines: queue.Queue) -> tuple[subprocess.Popen, Any]:
    argv, env = ctx.envs.command("client", "conn_client.py", json.dumps(params))
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):  # not a report line
                lines.put(json.loads(line))
        lines.put({"proc": i, "eof": True})

    threading.Thread(target=pump, daemon=True).start()
    return proc, err


def session(ctx, stack: str, n: int, timeout: float) -> dict:
    """One server + its clients at N connections; a flat dict of figures, or {"error": ...}."""
    deadline = time.monotonic() + timeout
    port, ack_port = _free_port(), _free_port()  # ack_port: sse_server's UDP endpoint, unused here
    mark = "~\r\n\r\n" if stack == "sse-starlette" else "~\n\n"  # sse-starlette ends lines with CRLF
    argv, env = ctx.envs.command(stack, "sse_server.py", stack, str(port), str(ack_port), str(timeout + 30))
    server_err = tempfile.TemporaryFile()
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=server_err)
    clients: list[tuple[subprocess.Popen, Any]] = []
    lines: queue.Queue = queue.Queue()
    out: dict[str, Any] = {"n": n}

    def next_line(what: str) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"session timed out waiting for {what}")
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(f"session timed out waiting for {what}") from None
        if "error" in line or "eof" in line:
            raise RuntimeError(f"client {line['proc']}: {line.get('error') or 'exited early'} (waiting for {what})")
        return line

    try:
        if not _wait_port(port, 30):
            raise RuntimeError("server did not start")
        pid = server.pid
        warm_up(port, mark.encode())
        base_ready = get_json(port, "/info?trim=1")["ready"]
        base = settled_rss(pid)
        out["rss_base_kib"] = base["kib"]

        procs = math.ceil(n / PER_PROCESS)
        shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        connect_timeout = max(30.0, min(120.0, n / 100))
        for i, share in enumerate(shares):
            params = {"port": port, "proc": i, "conns": share, "count": 1 + MESSAGES, "mark": mark,
                      "connect_timeout": connect_timeout, "timeout": max(5.0, deadline - time.monotonic())}
            clients.append(_start_client(ctx, i, params, lines))
        t0 = time.monotonic()
        held, connect_s, connect_errors = 0, 0.0, []
        for _ in shares:
            line = next_line("the connections")
            held += line["ready"]
            connect_s = max(connect_s, line["connect_s"])
            connect_errors += line["errors"]
        out["connect_s"] = connect_s
        if held < n:
            raise RuntimeError(f"held {held} of {n} connections" + (f": {connect_errors[0]}" if connect_errors else ""))
        ready = wait_ready(port, base_ready + n, max(5.0, min(60.0, deadline - time.monotonic())))
        if ready < base_ready + n:
            raise RuntimeError(f"{ready - base_ready} of {n} subscribed")
        out["open_s"] = time.monotonic() - t0
        out["kib_per_conn_open"] = (settled_rss(pid)["kib"] - base["kib"]) / n

        def one(seq: int) -> dict:
            http_get(port, f"/publish?seq={seq}", timeout=max(1.0, deadline - time.monotonic()))
            got = [next_line(f"message {seq}") for _ in shares]
            if any(g["seq"] != seq for g in got):
                raise RuntimeError(f"message {seq}: reports of {sorted(g['seq'] for g in got)}")
            sent = got[0]["sent_ns"]
            return {"last_ms": (max(g["last_ns"] for g in got) - sent) / 1e6,
                    "first_ms": (min(g["first_ns"] for g in got) - sent) / 1e6}

        first = one(0)
        out["msg0_ms"] = first["last_ms"]
        loaded = settled_rss(pid)
        out["rss_loaded_kib"] = loaded["kib"]
        out["rss_samples"] = loaded["samples"]
        out["rss_settled"] = base["settled"] and loaded["settled"]
        out["kib_per_conn"] = (loaded["kib"] - base["kib"]) / n

        lat, firsts = [], []
        cpu0 = cpu_seconds(pid)
        for seq in range(1, 1 + MESSAGES):
            time.sleep(GAP)
            r = one(seq)
            lat.append(r["last_ms"])
            firsts.append(r["first_ms"])
        out["server_cpu_ms_per_msg"] = (cpu_seconds(pid) - cpu0) * 1e3 / MESSAGES
        out["latencies_ms"] = lat
        out["lat_median_ms"] = ctx.median(lat)
        out["lat_max_ms"] = max(lat)
        out["first_median_ms"] = ctx.median(firsts)
        out["kib_per_conn_end"] = (rss_kib(pid) - base["kib"]) / n
    except Exception as exc:  # record it, carry on with the run
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if server.poll() is not None:
            server_err.seek(0)
            tail = server_err.read()[-300:].decode(errors="replace")
            out["error"] += f" | server exit {server.returncode}: {tail}"
    finally:
        for proc, _ in clients:  # hang up: stdin EOF
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
        for proc, err in clients:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err.close()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_err.close()
    return out


# -- orchestrator -------------------------------------------------------------------


KEYS = ["kib_per_conn", "kib_per_conn_open", "kib_per_conn_end", "lat_median_ms", "lat_max_ms", "first_median_ms",
        "msg0_ms", "server_cpu_ms_per_msg", "connect_s", "open_s", "rss_base_kib", "rss_loaded_kib"]


def run(ctx) -> dict:
    stacks = ctx.with_candidate(STACKS)
    sizes = [1000, 5000] if ctx.quick else [1000, 5000, 15000]
    reps = ctx.reps(quick=1, full=3)
    timeout = 120 if ctx.quick else 300
    raw: dict[int, dict[str, list[dict]]] = {n: {s: [] for s in stacks} for n in sizes}
    for rep in range(reps):
        for n in sizes:
            order = stacks[rep % len(stacks):] + stacks[: rep % len(stacks)]
            for stack in order:
                t0 = time.monotonic()
                r = session(ctx, stack, n, timeout)
                r["seconds"] = time.monotonic() - t0
                raw[n][stack].append(r)
                ctx.log(
                    f"connections rep {rep + 1}/{reps} N={n} {stack}: "
                    + (f"ERROR {r['error']} | " if "error" in r else "")
                    + (f"{r['kib_per_conn']:.2f} KiB/conn ({r['kib_per_conn_open']:.2f} before any message; "
                       f"base {r['rss_base_kib'] / 1024:.1f} MiB) " if "kib_per_conn" in r else "")
                    + (f"one-to-all median {r['lat_median_ms']:.1f} ms max {r['lat_max_ms']:.1f} ms, "
                       f"server {r['server_cpu_ms_per_msg']:.0f} ms CPU/msg " if "lat_median_ms" in r else "")
                    + (f"| opened in {r['open_s']:.1f} s " if "open_s" in r else "")
                    + f"| {r['seconds']:.1f} s"
                )
    out: dict[str, Any] = {"sizes": sizes, "stacks": stacks, "messages": MESSAGES, "per_process": PER_PROCESS,
                           "labels": LABELS, "reps": reps, "points": {}}
    for n in sizes:
        point = out["points"][str(n)] = {}
        for stack in stacks:
            runs = [r for r in raw[n][stack] if "error" not in r]
            entry: dict[str, Any] = {"runs": len(runs), "errors": [r["error"] for r in raw[n][stack] if "error" in r],
                                     "all": raw[n][stack]}
            for key in KEYS:
                values = [r[key] for r in runs if key in r]
                if values:
                    entry[key] = ctx.median(values)
            # Ratios within each repetition (same machine state), then the median.
            for other in ("raw", "raw-watch", "sse-starlette"):
                if other not in raw[n] or other == stack:
                    continue
                for key, name in (("kib_per_conn", "rss_ratio"), ("lat_median_ms", "lat_ratio")):
                    ratios = ctx.paired_ratios(raw[n][stack], raw[n][other], key)
                    if ratios:
                        entry.setdefault(name, {})[other] = ctx.median(ratios)
                        entry.setdefault(name + "_all", {})[other] = ratios
            point[stack] = entry
    return out
