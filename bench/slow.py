"""Case 6: one slow consumer. 1 subscriber that never reads, 999 that do, on one key.

The publisher sends ``sends`` distinct 100-byte messages in batches of 32, and
after each batch waits until the 999 readers have all of it (so the readers
never fall behind; ours keeps its default ``buffer=64``). The stuck subscriber
is never read. Every 5% of the sends (and at the end) it records the process's
RSS and how many items the stuck subscriber holds.

Ours must stay bounded: the stuck stream holds at most ``buffer`` items and
counts the rest as ``lagged``. encode/broadcaster's per-subscriber
``asyncio.Queue`` is unbounded, so it is expected to grow with every send; its
run stops early at ``time_cap`` seconds (ours gets 4x that) or ``mem_cap``
bytes of RSS growth, and the growth per send is reported so it can be
extrapolated.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

BATCH = 32


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _ours(n: int):
    from broadcaster import Broadcaster

    b: Any = Broadcaster()  # buffer=64
    stuck = b.subscribe("k")
    streams = [b.subscribe("k") for _ in range(n - 1)]

    def publish(item):
        b.send("k", item)

    def held() -> dict:
        return {"stuck_queued": stuck.queued, "stuck_lagged": stuck.lagged}

    async def close():
        stuck.close()
        for s in streams:
            s.close()

    return [s.__anext__ for s in streams], publish, False, held, close


async def _encode(n: int):
    from broadcaster import Broadcast

    bc = Broadcast("memory://")
    await bc.connect()
    cms = [bc.subscribe("k") for _ in range(n)]
    subs = [await cm.__aenter__() for cm in cms]
    stuck = subs[0]

    def publish(item):
        return bc.publish("k", item)

    def held() -> dict:
        return {"stuck_queued": stuck._queue.qsize()}

    async def close():
        for cm in cms:
            await cm.__aexit__(None, None, None)
        await bc.disconnect()

    return [s.get for s in subs[1:]], publish, True, held, close


SETUPS = {"ours": _ours, "candidate": _ours, "encode": _encode}


async def _measure(impl: str, subscribers: int, sends: int, time_cap: float, mem_cap: int) -> dict:
    gets, publish, is_async, held, close = await SETUPS[impl](subscribers)
    loop = asyncio.get_running_loop()
    readers = len(gets)
    state = {"left": readers * BATCH, "fut": None}

    async def reader(get):
        while True:
            await get()
            state["left"] -= 1
            if state["left"] == 0:
                state["fut"].set_result(None)

    tasks = [loop.create_task(reader(get)) for get in gets]
    await asyncio.sleep(0)
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    checkpoints = []
    every = max(BATCH, sends // 20 // BATCH * BATCH)
    done = 0
    stopped = None
    while done < sends:
        batch = min(BATCH, sends - done)
        state["left"] = readers * batch
        state["fut"] = loop.create_future()
        for _ in range(batch):
            item = f"{done:08d}" + "x" * 92  # a distinct 100-byte message
            if is_async:
                await publish(item)
            else:
                publish(item)
            done += 1
        await state["fut"]
        if done % every < BATCH or done >= sends:
            growth = _rss() - rss0
            elapsed = time.perf_counter() - t0
            checkpoints.append({"sends": done, "seconds": elapsed, "rss_growth": growth, **held()})
            if elapsed > time_cap:
                stopped = f"time cap {time_cap:.0f} s"
                break
            if growth > mem_cap:
                stopped = f"memory cap {mem_cap / 2**20:.0f} MiB"
                break
    elapsed = time.perf_counter() - t0
    last = checkpoints[-1]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await close()
    return {
        "sends_done": float(done),
        "seconds": elapsed,
        "ns_per_delivery": elapsed * 1e9 / (done * readers),
        "rss_growth": float(last["rss_growth"]),
        "rss_growth_per_send": last["rss_growth"] / done,
        "stuck_queued": float(last["stuck_queued"]),
        "stuck_lagged": float(last.get("stuck_lagged", 0)),
        "stopped": stopped,
        "checkpoints": checkpoints,
    }


def measure(impl: str, subscribers: int, sends: int, time_cap: float, mem_cap: int) -> dict:
    return asyncio.run(_measure(impl, subscribers, sends, time_cap, mem_cap))


# -- orchestrator side ------------------------------------------------------------

IMPLS = ["ours", "encode"]


def run(ctx) -> dict:
    impls = ctx.with_candidate(IMPLS)
    sends = 10_000 if ctx.quick else 100_000
    # encode/broadcaster grows without bound and is the slower: capped. Ours is
    # bounded by design and gets 4x the time, to complete the sends even on a
    # busy machine.
    cap = 5.0 if ctx.quick else 45.0
    out: dict[str, Any] = {"subscribers": 1000, "sends": sends, "time_cap": cap, "mem_cap": 1 << 30, "impls": {}}
    for impl in impls:
        params = {"subscribers": 1000, "sends": sends, "mem_cap": 1 << 30,
                  "time_cap": cap if impl == "encode" else 4 * cap}
        raw = ctx.interleave("slow", [("slow", params)], [impl], reps=1, timeout=params["time_cap"] * 2 + 120)
        out["impls"][impl] = raw["slow"][impl][0]
    return out
