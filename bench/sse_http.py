"""Case 3: HTTP end to end. uvicorn + httptools on 127.0.0.1, 1,000 SSE clients on one key.

One session = one server process (``sse_server.py``, in the stack's
environment) + one client process (``sse_client.py``, 1,000 raw-socket
connections), both started fresh, both on the same 2-core machine. Phases:

1. ``windowed``: the publisher sends ``count`` messages as fast as delivery
   allows, keeping at most ``window`` (32) messages in flight: it sends message
   ``s`` only after the client reported (UDP ack) that every connection has
   message ``s - 32``. Nobody can lag (ours has ``buffer=64`` > 32), nothing
   queues without bound, and the throughput is the rate at which the whole
   pipeline delivers. Latency here is mostly queueing: about the window divided
   by the throughput (Little's law), so it mirrors the throughput.
2. ``paced``: then more messages at a fixed rate, the same for every stack:
   20 msg/s (20,000 events/s), about half of what the sse-starlette stack (b)
   sustains on the 2-core machine this was written on. This latency is the one
   to compare: what a message waits at a load that (b) handles. A stack that
   cannot sustain the rate shows it in ``achieved_msgs_per_s``.

Delivered events/s = 1,000 x count / (from the send of message 0 to the moment
the last connection has message count-1). Latency = receive time - the send
time embedded in the data (both processes read the same CLOCK_MONOTONIC),
over every event of one connection in ten.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from typing import Any

STACKS = ["ours", "sse-starlette", "fastapi", "raw"]
LABELS = {
    "ours": "(a) ours: Broadcaster.response",
    "candidate": "(a*) ours, patched",
    "sse-starlette": "(b) sse-starlette + encode/broadcaster",
    "fastapi": "(c) FastAPI built-in SSE + encode/broadcaster",
    "raw": "(d) floor: raw ASGI, deque per conn, coalesced writes",
}
CONNS = 1000
WINDOW = 32
PACED_RATE = 20.0  # msg/s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def session(ctx, stack: str, count: int, paced: int, rate: float, timeout: float) -> dict:
    """One server + one client run; the client's JSON result."""
    port, ack_port = _free_port(), _free_port()
    argv, env = ctx.envs.command(stack, "sse_server.py", stack, str(port), str(ack_port), str(timeout + 30))
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if not _wait_port(port, 30):
            return {"error": "server did not start: " + (server.stderr.read() if server.poll() is not None else "")[-300:]}
        params = {
            "port": port, "ack_port": ack_port, "conns": CONNS, "count": count, "window": WINDOW,
            "paced": paced, "rate": rate, "sample": 10, "timeout": timeout,
            "mark": "~\\r\\n\\r\\n" if stack == "sse-starlette" else "~\\n\\n",  # sse-starlette ends lines with CRLF
        }
        argv, env = ctx.envs.command("client", "sse_client.py", json.dumps(params))
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout + 20)
        except subprocess.TimeoutExpired:
            return {"error": "client did not stop"}
        lines = proc.stdout.strip().splitlines()
        if not lines:
            return {"error": f"client exit {proc.returncode}: {proc.stderr[-300:]}"}
        return json.loads(lines[-1])
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _flat(result: dict, phase: str) -> dict:
    """Throughput and latency of one phase, flattened for medians and ratios."""
    data = result.get(phase) or {}
    out = {k: v for k, v in data.items() if isinstance(v, (int, float))}
    server = (result.get("server") or {}).get(phase if phase == "paced" else "throughput") or {}
    if "cpu_share" in server:
        out["server_cpu_share"] = server["cpu_share"]
    return out


def run(ctx) -> dict:
    stacks = ctx.with_candidate(STACKS)
    count = 96 if ctx.quick else 192  # windowed messages: 3x / 6x the window
    reps = ctx.reps(quick=1, full=3)
    paced_seconds = 1.0 if ctx.quick else 3.0
    rate = PACED_RATE
    paced = int(rate * paced_seconds)
    raw: dict[str, list[dict]] = {s: [] for s in stacks}
    for rep in range(reps):
        order = stacks[rep % len(stacks):] + stacks[: rep % len(stacks)]
        for stack in order:
            result = session(ctx, stack, count, paced, rate, timeout=120 if ctx.quick else 300)
            raw[stack].append(result)
            t = result.get("throughput") or {}
            p = result.get("paced") or {}
            ctx.log(
                f"http rep {rep + 1}/{reps} {stack}: "
                + (result.get("error") or "")
                + f" {t.get('events_per_s', 0):,.0f} ev/s p50 {t.get('p50_ms', 0):.1f} ms p99 {t.get('p99_ms', 0):.1f} ms"
                + (f" | paced {p.get('achieved_msgs_per_s', 0):.1f}/{rate} msg/s p50 {p.get('p50_ms', 0):.1f} p99 {p.get('p99_ms', 0):.1f} ms" if p else "")
                + f" | client cpu {t.get('client_cpu_share', 0):.2f}"
            )
    out: dict[str, Any] = {"conns": CONNS, "count": count, "window": WINDOW, "paced_rate_msgs_per_s": rate,
                           "paced_seconds": paced_seconds, "labels": LABELS, "stacks": {}}
    for stack in stacks:
        entry: dict[str, Any] = {"errors": [r["error"] for r in raw[stack] if r.get("error")],
                                 "seq_order_ok": all(r.get("seq_order_ok", False) for r in raw[stack] if "throughput" in r)}
        for phase in ("throughput", "paced"):
            runs = [_flat(r, phase) for r in raw[stack] if r.get(phase)]
            if runs:
                keys = set.intersection(*(set(r) for r in runs))
                entry[phase] = {k: ctx.median([r[k] for r in runs]) for k in sorted(keys)}
                entry[phase]["runs"] = len(runs)
        # Ratios within each repetition (same machine state), then the median.
        for other in ("raw", "sse-starlette"):
            if other not in raw:
                continue
            ratios = ctx.paired_ratios(
                [_flat(r, "throughput") for r in raw[stack]], [_flat(r, "throughput") for r in raw[other]], "events_per_s"
            )
            if ratios:
                entry.setdefault("events_ratio", {})[other] = ctx.median(ratios)
            for phase in ("throughput", "paced"):
                ratios = ctx.paired_ratios(
                    [_flat(r, phase) for r in raw[stack]], [_flat(r, phase) for r in raw[other]], "p99_ms"
                )
                if ratios:
                    entry.setdefault("p99_ratio", {}).setdefault(phase, {})[other] = ctx.median(ratios)
        out["stacks"][stack] = entry
    return out
