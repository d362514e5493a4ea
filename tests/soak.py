"""Soak test of broadcaster.py: the leak-check cycles of the unit tests, for minutes.

    python tests/soak.py --soak [--minutes N] [--every SECONDS] [--bound-kib K] [--no-tracemalloc]

Not collected by pytest (no ``test_`` prefix): the unit suite runs the same
cycles in seconds (test_broadcaster.py, "Leak checks": 100,000 subscribe
cycles and 10,000 ASGI responses); this runs them for ``--minutes`` (default
10) in one event loop, in rounds of:

- subscribe cycles: subscribe, send, read, then close (``close()``,
  ``async with``, ``aclose()``), drop without closing, lag under each
  ``LagPolicy``, or resume with history (``last_event_id``, one item of
  backlog); plus streams dropped in reference cycles;
- ASGI responses, 100 at a time, torn down by their client's disconnect (at
  once, or after their first event): ``response()`` of streams, of resumed
  history streams (``on_gap``), ``channel()``; and two fault paths: a send()
  failing with ConnectionResetError, and the app's task cancelled while streaming.

After each round it collects garbage and takes a census of the module's
objects (streams, subscribers, channels, history entries, apps, Senders) and
of deques, tasks, futures and pending ``weakref.finalize`` registrations, and
measures traced memory (tracemalloc) and RSS; every ``--every`` seconds it
prints them. The first two rounds are the warm-up: the baseline is taken after
them.

Exit status: 0 if at the end every count is back at its baseline and traced
memory grew by at most ``--bound-kib`` (default 256 KiB: the in-suite bound is
64 KiB for one run; a soak also sees asyncio's and the allocator's high-water
marks settle; a leak of one 16-byte object per cycle would exceed it within
the first minute); 1 on growth (with the top growing lines); 2 on bad usage.
RSS is printed, never judged (the allocator keeps freed arenas).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Coroutine, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The checkout's module, and the unit suite's leak-check cycles, wherever this runs from.
from broadcaster import Broadcaster, Event
from test_broadcaster import (
    ASGI_DISCONNECT,
    LEAK_EVENT,
    LEAK_EVENT_DATA,
    LEAK_GAP,
    LEAK_SCOPE,
    LeakBatch,
    LeakResume,
    leak_census,
    leak_closure,
    leak_cycle_close,
    leak_cycle_drop,
    leak_cycle_lagged,
    leak_cycle_resume,
    leak_delta,
    leak_snapshot,
)

Message = MutableMapping[str, Any]

# Per round. About 1 to 3 s a round with tracemalloc on.
ROUND_CYCLES = {"close": 8_000, "drop": 4_000, "lagged": 4_000, "resume": 4_000}
ROUND_BATCHES = {"response": 4, "resume": 3, "channel": 3, "send_error": 2, "cancel": 2}
BATCH = 100
WARMUP_ROUNDS = 2
# Census counts printed (their first word heads the column).
SHOWN = [
    "BroadcastStream",
    "_Subscriber",
    "_Channel",
    "_Entry",
    "Sender",
    "Task",
    "Future",
    "deque",
    "finalize registrations",
]


# ---------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # noqa: PLC0415  (not on every platform)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def traced(shot: tracemalloc.Snapshot) -> int:
    return sum(stat.size for stat in shot.statistics("filename"))


# ---------------------------------------------------------------------------
# ASGI batches: the unit suite's, plus two fault paths
# ---------------------------------------------------------------------------


class Peer:
    """Disconnects at its first receive() if ``early``, else once sent its first
    event; with ``fail``, its send() of that event raises ConnectionResetError."""

    __slots__ = ("_batch", "_early", "_fail", "_gone")

    def __init__(self, batch: LeakBatch, early: bool, fail: bool) -> None:
        self._batch = batch
        self._early = early
        self._fail = fail
        self._gone: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    async def receive(self) -> Message:
        self._batch.streaming()
        if self._early:
            return ASGI_DISCONNECT
        return await self._gone

    async def send(self, message: Message) -> None:
        body = message["body"] if message["type"] == "http.response.body" else b""
        if LEAK_EVENT_DATA in body:
            if self._fail:
                raise ConnectionResetError("peer reset")
            if not self._gone.done():
                self._gone.set_result(ASGI_DISCONNECT)


async def asgi_batch(kind: str, b: Broadcaster[str, Event], early: bool, state: LeakResume) -> None:
    batch = LeakBatch(BATCH)
    apps: list[Any] = []
    for _ in range(BATCH):
        if kind == "channel":
            apps.append(b.channel(leak_closure))
        elif kind == "resume":
            stream = b.subscribe("k", last_event_id=state.ids[-1] if state.ids else "unknown-1")
            apps.append(b.response(stream, on_gap=LEAK_GAP))
        else:
            apps.append(b.response(b.subscribe("k")))
    peers = [Peer(batch, early and kind != "cancel", kind == "send_error") for _ in range(BATCH)]
    tasks = [
        asyncio.ensure_future(app(LEAK_SCOPE, peer.receive, peer.send)) for app, peer in zip(apps, peers, strict=True)
    ]
    del apps
    await batch.ready
    if kind == "cancel":
        for task in tasks:
            task.cancel()
    elif kind != "channel" and not early:
        observer = b.subscribe("k")
        b.send("k", LEAK_EVENT)
        await anext(observer)
        if observer.last_event_id is not None:
            state.ids.append(observer.last_event_id)
        observer.close()
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            assert kind == "cancel", f"a {kind} response was cancelled"


# ---------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------


class Soak:
    def __init__(self) -> None:
        self.plain: Broadcaster[str, int] = Broadcaster(buffer=4)
        self.small: Broadcaster[str, int] = Broadcaster(buffer=1)
        self.history: Broadcaster[str, int] = Broadcaster(history=8)
        self.sse: Broadcaster[str, Event] = Broadcaster()
        self.sse_history: Broadcaster[str, Event] = Broadcaster(history=8)
        self.cycle_state = LeakResume()
        self.asgi_state = LeakResume()
        self.cycles = 0
        self.responses = 0
        filler = self.sse_history.subscribe("k")  # its history is full from the start
        for _ in range(self.sse_history.history):
            self.sse_history.send("k", LEAK_EVENT)
        filler.close()

    async def round(self) -> None:
        await leak_cycle_close(self.plain, ROUND_CYCLES["close"])
        await leak_cycle_drop(self.plain, ROUND_CYCLES["drop"])
        await leak_cycle_lagged(self.small, ROUND_CYCLES["lagged"])
        await leak_cycle_resume(self.history, ROUND_CYCLES["resume"], self.cycle_state)
        self.cycles += sum(ROUND_CYCLES.values())
        for kind, batches in ROUND_BATCHES.items():
            b = self.sse_history if kind == "resume" else self.sse
            for i in range(batches):
                await asgi_batch(kind, b, i % 2 == 1, self.asgi_state)
        self.responses += sum(ROUND_BATCHES.values()) * BATCH
        assert len(self.sse) == 0 and not self.sse._sources, "a response's subscription or source outlived it"


class Meter:
    """The baseline (after the warm-up) and the latest measure against it."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.base_counts = leak_census()
        self.base_shot = leak_snapshot() if trace else None
        self.base_traced = traced(self.base_shot) if self.base_shot is not None else 0
        self.shot = self.base_shot
        self.growth = 0
        self.left_behind: dict[str, int] = {}  # the last census change seen

    def measure(self) -> tuple[Counter[str], dict[str, int]]:
        counts = leak_census()
        self.shot = leak_snapshot() if self.trace else None
        self.growth = traced(self.shot) - self.base_traced if self.shot is not None else 0
        changed = leak_delta(self.base_counts, counts)
        self.left_behind = changed
        return counts, changed

    def top(self, n: int) -> list[str]:
        if n <= 0 or self.shot is None or self.base_shot is None:
            return []
        return [f"  {stat}" for stat in self.shot.compare_to(self.base_shot, "lineno")[:n]]


HEADER = (
    f"{'round':>5} {'min':>6} {'cycles':>9} {'responses':>9} {'traced KiB':>10} {'growth KiB':>10} {'RSS MiB':>8} "
    + " ".join(f"{name.split()[0]:>10}" for name in SHOWN)
)


async def soak(minutes: float, every: float, bound: int, trace: bool, top: int = 0) -> int:
    if trace:
        tracemalloc.start()
    run = Soak()
    baseline_tasks = asyncio.all_tasks()
    began = time.monotonic()
    for _ in range(WARMUP_ROUNDS):
        await run.round()
    await asyncio.sleep(0)  # the loop drops the handle that resumed this task
    meter = Meter(trace)
    print(f"baseline after {WARMUP_ROUNDS} warm-up rounds: {dict(meter.base_counts)}", flush=True)
    print(HEADER, flush=True)
    rounds, printed, deadline = WARMUP_ROUNDS, 0.0, began + minutes * 60
    while True:
        await run.round()
        rounds += 1
        now = time.monotonic()
        if now - printed < every and now < deadline:
            continue
        printed = now
        await asyncio.sleep(0)
        counts, changed = meter.measure()
        row = f"{rounds:>5} {(now - began) / 60:>6.2f} {run.cycles:>9} {run.responses:>9} "
        row += f"{(meter.base_traced + meter.growth) / 1024:>10.1f} {meter.growth / 1024:>10.1f} {rss_mib():>8.1f} "
        row += " ".join(f"{counts[name]:>10}" for name in SHOWN)
        print(row + (f"  CHANGED {changed}" if changed else ""), flush=True)
        if now >= deadline:
            break
    if asyncio.all_tasks() != baseline_tasks:
        print(f"FAIL: tasks left running: {asyncio.all_tasks() - baseline_tasks}")
        return 1
    if meter.left_behind:
        print(f"FAIL: objects left behind at the end: {meter.left_behind}")
        return 1
    if meter.growth > bound:
        print(f"FAIL: traced memory grew by {meter.growth} B > {bound} B since the warm-up; top lines:")
        print("\n".join(meter.top(max(top, 10))))
        return 1
    memory = f"traced memory growth {meter.growth} B (bound {bound} B)" if trace else "tracemalloc off"
    print(
        f"OK: {run.cycles} subscribe cycles and {run.responses} ASGI responses in {rounds} rounds; "
        f"counts back at baseline; {memory}"
    )
    for line in meter.top(top):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--soak", action="store_true", help="run the soak (required: it takes minutes)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between reports (default 10)")
    parser.add_argument("--bound-kib", type=float, default=256.0, help="traced memory growth allowed (default 256)")
    parser.add_argument("--no-tracemalloc", action="store_true", help="count objects only (faster)")
    parser.add_argument("--top", type=int, default=0, help="print the N lines that grew most, even on success")
    args = parser.parse_args(argv)
    if not args.soak:
        parser.print_usage(sys.stderr)
        print("soak.py: pass --soak to run the soak (it runs for --minutes, default 10)", file=sys.stderr)
        return 2
    if args.minutes <= 0 or args.every <= 0 or args.bound_kib < 0:
        parser.error("--minutes and --every must be > 0, --bound-kib >= 0")
    coroutine: Coroutine[Any, Any, int] = soak(
        args.minutes, args.every, int(args.bound_kib * 1024), not args.no_tracemalloc, args.top
    )
    return asyncio.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
