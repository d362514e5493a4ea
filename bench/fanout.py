"""Case 1: in-process fan-out. One key, N subscribers, M messages, every subscriber draining.

Every implementation is driven by the same code: N reader tasks, each awaiting
its subscriber's ``get()`` in a loop (for ours that is ``BroadcastStream.__anext__``,
exactly what ``async for`` calls) and counting what it got on a shared
counter, and one publisher calling the implementation's ``publish(item)`` M
times. Timing runs from the first publish until the reader that completes the
count wakes the publisher; subscribing and starting the readers are outside
it, and so is one warm-up message (ours allocates a subscriber's queue at its
first delivery; the steady state is what is timed). Two drains:

- ``lockstep``: the publisher sends one message and waits until every reader has
  it, so every delivery wakes a sleeping reader (the worst case: one task switch
  per delivery).
- ``burst``: the publisher sends all M back to back, then waits; each reader is
  woken once and drains M items without sleeping (the best case). Ours gets
  ``buffer = max(64, M)`` so nothing is dropped.

Implementations: ``ours`` (``Broadcaster.send``), ``encode``
(encode/broadcaster 0.3.x ``Broadcast("memory://")``: ``await publish``, a
listener task fans out into one ``asyncio.Queue`` per subscriber), ``queue``
(floor c: one ``asyncio.Queue`` per subscriber, a ``for`` loop of
``put_nowait``) and ``deque`` (floor d: a bare ``collections.deque`` and one
waiter future per subscriber, the least any per-subscriber design can do),
and ``ring`` (floor e, not per subscriber: one
shared buffer per key and a cursor per subscriber; a send appends once and
wakes only the readers that sleep, so in a burst only the first message costs
O(N) wake-ups: what the "one shared ring per key" design could reach).

Before timing, ``gc.collect()`` then ``gc.freeze()``: the N subscribers set up
beforehand are not rescanned by collections during the timed part (the same for
every implementation).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

# -- worker side --------------------------------------------------------------


class _Barrier:
    __slots__ = ("left", "n", "fut")

    def __init__(self, n: int) -> None:
        self.left = n
        self.n = n
        self.fut: asyncio.Future[None] | None = None


async def _setup_ours(n: int, buffer: int):
    from broadcaster import Broadcaster

    b: Any = Broadcaster(buffer=buffer)
    streams = [b.subscribe("k") for _ in range(n)]
    send = b.send

    def publish(item: object) -> None:
        send("k", item)

    async def close() -> None:
        for s in streams:
            s.close()

    return [s.__anext__ for s in streams], publish, False, close


async def _setup_encode(n: int, buffer: int):
    from broadcaster import Broadcast

    bc = Broadcast("memory://")
    await bc.connect()
    cms = [bc.subscribe("k") for _ in range(n)]
    subs = [await cm.__aenter__() for cm in cms]

    def publish(item: object) -> Awaitable[None]:
        return bc.publish("k", item)

    async def close() -> None:
        for cm in cms:
            await cm.__aexit__(None, None, None)
        await bc.disconnect()

    return [s.get for s in subs], publish, True, close


async def _setup_queue(n: int, buffer: int):
    queues: list[asyncio.Queue[object]] = [asyncio.Queue() for _ in range(n)]

    def publish(item: object) -> None:
        for q in queues:
            q.put_nowait(item)

    async def close() -> None:
        pass

    return [q.get for q in queues], publish, False, close


class _Slot:
    """Floor (d): what any per-subscriber design needs at least."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[object] = deque()
        self.waiter: asyncio.Future[None] | None = None

    async def get(self) -> object:
        items = self.items
        while not items:
            self.waiter = waiter = asyncio.get_running_loop().create_future()
            await waiter
        return items.popleft()


async def _setup_deque(n: int, buffer: int):
    slots = [_Slot() for _ in range(n)]

    def publish(item: object) -> None:
        for slot in slots:
            slot.items.append(item)
            waiter = slot.waiter
            if waiter is not None:
                slot.waiter = None
                waiter.set_result(None)

    async def close() -> None:
        pass

    return [s.get for s in slots], publish, False, close


class _Ring:
    """Floor (e), not per subscriber: one shared buffer per key, a cursor per
    subscriber. A send appends once and wakes only the readers that sleep."""

    __slots__ = ("items", "base", "cap", "waiters")

    def __init__(self, cap: int) -> None:
        self.items: list[object] = []
        self.base = 0  # the position of items[0]
        self.cap = cap
        self.waiters: list[asyncio.Future[None]] = []

    def publish(self, item: object) -> None:
        items = self.items
        items.append(item)
        if len(items) > 2 * self.cap:  # forget the oldest (these readers never lag that far)
            del items[: self.cap]
            self.base += self.cap
        waiters = self.waiters
        if waiters:
            self.waiters = []
            for waiter in waiters:
                waiter.set_result(None)


class _Cursor:
    __slots__ = ("ring", "pos")

    def __init__(self, ring: _Ring) -> None:
        self.ring = ring
        self.pos = ring.base + len(ring.items)

    async def get(self) -> object:
        ring = self.ring
        while self.pos >= ring.base + len(ring.items):
            waiter = asyncio.get_running_loop().create_future()
            ring.waiters.append(waiter)
            await waiter
        item = ring.items[self.pos - ring.base]
        self.pos += 1
        return item


async def _setup_ring(n: int, buffer: int):
    ring = _Ring(buffer)
    cursors = [_Cursor(ring) for _ in range(n)]

    async def close() -> None:
        pass

    return [c.get for c in cursors], ring.publish, False, close


SETUPS = {
    "ring": _setup_ring,
    "ours": _setup_ours,
    "candidate": _setup_ours,
    "encode": _setup_encode,
    "queue": _setup_queue,
    "deque": _setup_deque,
}


async def _measure(impl: str, n: int, m: int, modes: list[str]) -> dict:
    gets, publish, is_async, close = await SETUPS[impl](n, max(64, m))
    loop = asyncio.get_running_loop()
    bar = _Barrier(n)

    async def reader(get: Callable[[], Awaitable[object]]) -> None:
        # The same in both drains: count every item; the one that completes
        # what the publisher waits for wakes it.
        while True:
            await get()
            bar.left -= 1
            if bar.left == 0:
                bar.fut.set_result(None)  # type: ignore[union-attr]

    async def lockstep(count: int) -> float:
        t0 = time.perf_counter()
        for i in range(count):
            bar.left = n
            bar.fut = loop.create_future()
            if is_async:
                await publish(i)
            else:
                publish(i)
            await bar.fut
        return time.perf_counter() - t0

    async def burst(count: int) -> float:
        t0 = time.perf_counter()
        bar.left = n * count
        bar.fut = loop.create_future()
        for i in range(count):
            if is_async:
                await publish(i)
            else:
                publish(i)
        await bar.fut
        return time.perf_counter() - t0

    tasks = [loop.create_task(reader(get)) for get in gets]
    for _ in range(3):  # every reader runs until it blocks in get()
        await asyncio.sleep(0)
    await lockstep(1)  # warm-up, untimed
    out: dict[str, Any] = {"n": n, "m": m}
    for mode in modes:
        gc.collect()
        gc.freeze()
        elapsed = await (lockstep if mode == "lockstep" else burst)(m)
        gc.unfreeze()
        out[mode] = elapsed * 1e9 / (n * m)  # ns per delivery
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await close()
    return out


def measure(impl: str, n: int, m: int, modes: list[str]) -> dict:
    return asyncio.run(_measure(impl, n, m, modes))


# -- orchestrator side ------------------------------------------------------------

IMPLS = ["ours", "encode", "queue", "deque", "ring"]
LABELS = {
    "ours": "ours",
    "candidate": "ours (patched)",
    "encode": "encode/broadcaster memory://",
    "queue": "floor (c) asyncio.Queue per sub",
    "deque": "floor (d) deque + waiter future",
    "ring": "floor (e) one shared ring per key",
}
MODES = ["lockstep", "burst"]


def messages(n: int, quick: bool) -> int:
    """M for N subscribers: about 600k deliveries (100k in --quick), 2 (5) to 20,000 messages."""
    if quick:
        return max(2, min(20_000, 100_000 // n))
    return max(5, min(20_000, 600_000 // n))


def run(ctx) -> dict:
    sizes = [1, 100, 10_000, 100_000]
    impls = ctx.with_candidate(IMPLS)
    raw = ctx.interleave(
        "fanout",
        points=[(f"N={n}", {"n": n, "m": messages(n, ctx.quick), "modes": MODES}) for n in sizes],
        impls=impls,
        reps=ctx.reps(quick=2, full=5),
        timeout=300,
        # 100,000 subscribers cost seconds per run in task wake-ups alone.
        point_reps={"N=100000": ctx.reps(quick=1, full=3)},
    )
    summary: dict[str, Any] = {"sizes": sizes, "impls": impls, "points": {}}
    for n in sizes:
        point = summary["points"][str(n)] = {}
        for impl in impls:
            runs = [r for r in raw[f"N={n}"][impl] if "error" not in r]
            errors = [r["error"] for r in raw[f"N={n}"][impl] if "error" in r]
            entry: dict[str, Any] = {"m": messages(n, ctx.quick), "runs": len(runs)}
            if errors:
                entry["errors"] = errors
            for mode in MODES:
                values = [r[mode] for r in runs]
                if values:
                    ns = ctx.median(values)
                    entry[mode] = {"ns": ns, "per_s": 1e9 / ns, "all": values}
            point[impl] = entry
        # Ratios from the same repetition (interleaved runs), then the median.
        for impl in impls:
            for other in ("queue", "deque", "encode"):
                if other not in impls:
                    continue
                for mode in MODES:
                    ratios = ctx.paired_ratios(raw[f"N={n}"][impl], raw[f"N={n}"][other], mode)
                    if ratios:
                        point[impl].setdefault("ratios", {}).setdefault(mode, {})[other] = ctx.median(ratios)
    return summary
