"""Case 4: memory of idle subscriptions (tracemalloc), and what is left after closing.

100,000 subscriptions on 1,000 keys (100 each), held in preallocated lists (so
the lists are not counted), the keys made beforehand. Three levels, each
measured after ``gc.collect()``:

- ``bare``: subscribed, nothing ever sent: the registry's cost.
- ``after_msg``: one message sent to every key and read by every subscription:
  an idle subscription of a live key (ours then holds an empty deque).
- ``with_reader``: plus one task per subscription blocked reading it, as an SSE
  response has (asyncio's own task + coroutine + future are most of it).

Bytes per key: 1,000 subscriptions on 1,000 keys minus 1,000 on one key, over
999. Then everything is closed, the lists emptied and ``gc.collect()`` run:
``residual`` is what stays above the starting baseline, with the three source
lines that hold most of it (tracemalloc snapshot diff); ``residual_own``
leaves out asyncio's task registry (a WeakSet that grew for the reader tasks
and does not shrink, whatever the library).

``ours``: ``Broadcaster().subscribe(key)``; ``encode``: encode/broadcaster's
``Broadcast("memory://").subscribe(key)`` context manager entered (its context
manager object, which the user must keep to leave, is counted with it).
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any


async def _ours():
    from broadcaster import Broadcaster

    b: Any = Broadcaster()

    async def subscribe(key):
        return b.subscribe(key)

    async def send(key, item):
        b.send(key, item)

    def reader(handle):
        return handle.__anext__

    async def close(handle):
        handle.close()

    async def shutdown():
        b.close()

    return subscribe, send, reader, close, shutdown


async def _encode():
    from broadcaster import Broadcast

    bc = Broadcast("memory://")
    await bc.connect()

    async def subscribe(key):
        cm = bc.subscribe(key)
        sub = await cm.__aenter__()
        return (cm, sub)

    async def send(key, item):
        await bc.publish(key, item)

    def reader(handle):
        return handle[1].get

    async def close(handle):
        await handle[0].__aexit__(None, None, None)

    async def shutdown():
        await bc.disconnect()

    return subscribe, send, reader, close, shutdown


IMPLS_SETUP = {"ours": _ours, "candidate": _ours, "encode": _encode}


def _now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _measure(impl: str, subs: int, keys: int) -> dict:
    subscribe, send, reader, close, shutdown = await IMPLS_SETUP[impl]()
    names = [f"key-{i:05d}" for i in range(keys)]
    holder: list[Any] = [None] * subs
    tasks: list[Any] = [None] * subs
    item = "x" * 100
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {}
    # Warm up every code path once (first-use allocations are not per subscription).
    h = await subscribe("warm")
    await send("warm", item)
    await reader(h)()
    await close(h)
    del h

    tracemalloc.start()
    base = _now()
    snap0 = tracemalloc.take_snapshot()

    # Bytes per key.
    small = [None] * keys
    m0 = _now()
    for i in range(keys):
        small[i] = await subscribe(names[i])
    per_key_keys = _now() - m0
    for i in range(keys):
        await close(small[i])
        small[i] = None
    m0 = _now()
    for i in range(keys):
        small[i] = await subscribe("one-key")
    per_key_one = _now() - m0
    for i in range(keys):
        await close(small[i])
        small[i] = None
    out["bytes_per_key"] = (per_key_keys - per_key_one) / (keys - 1)

    # Idle subscriptions.
    m0 = _now()
    for i in range(subs):
        holder[i] = await subscribe(names[i % keys])
    out["bare"] = (_now() - m0) / subs
    for name in names:
        await send(name, item)
    for _ in range(3):
        await asyncio.sleep(0)  # encode/broadcaster's listener task delivers
    for i in range(subs):
        await reader(holder[i])()
    out["after_msg"] = (_now() - m0) / subs

    async def read_one(get):
        try:
            await get()
        except BaseException:  # ended by close(); what it raises does not matter here
            pass

    for i in range(subs):
        tasks[i] = loop.create_task(read_one(reader(holder[i])))
    for _ in range(3):
        await asyncio.sleep(0)
    out["with_reader"] = (_now() - m0) / subs
    out["peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20

    # Close everything: back to the baseline?
    for i in range(subs):
        await close(holder[i])
        holder[i] = None
    await asyncio.gather(*tasks)
    for i in range(subs):
        tasks[i] = None
    for _ in range(3):
        await asyncio.sleep(0)
    out["residual"] = _now() - base
    snap1 = tracemalloc.take_snapshot()
    top = snap1.compare_to(snap0, "lineno")
    # asyncio keeps every task in a WeakSet (asyncio.tasks._scheduled_tasks /
    # _all_tasks) whose table grew for the 100,000 reader tasks and never
    # shrinks: the same for every library, so it is reported apart.
    by_file = snap1.compare_to(snap0, "filename")
    out["residual_asyncio_tasks"] = sum(s.size_diff for s in by_file if s.traceback[0].filename.endswith("_weakrefset.py"))
    out["residual_own"] = out["residual"] - out["residual_asyncio_tasks"]
    out["residual_top"] = [
        f"{s.traceback[0].filename.rsplit('/', 2)[-1]}:{s.traceback[0].lineno} {s.size_diff:+d} B ({s.count_diff:+d} blocks)"
        for s in sorted(top, key=lambda s: -s.size_diff)[:3]
        if s.size_diff > 0
    ]
    tracemalloc.stop()
    await shutdown()
    return out


def measure(impl: str, subs: int, keys: int) -> dict:
    return asyncio.run(_measure(impl, subs, keys))


# -- orchestrator side ------------------------------------------------------------

IMPLS = ["ours", "encode"]
LEVELS = ["bare", "after_msg", "with_reader", "bytes_per_key", "residual", "residual_asyncio_tasks", "residual_own"]


def run(ctx) -> dict:
    impls = ctx.with_candidate(IMPLS)
    params = {"subs": 50_000, "keys": 500} if ctx.quick else {"subs": 100_000, "keys": 1_000}
    raw = ctx.interleave("memory", [("100k", params)], impls, reps=ctx.reps(quick=1, full=2), timeout=600)["100k"]
    out: dict[str, Any] = {**params, "impls": {}}
    for impl in impls:
        runs = [r for r in raw[impl] if "error" not in r]
        entry: dict[str, Any] = {"errors": [r["error"] for r in raw[impl] if "error" in r]}
        for level in LEVELS + ["peak_mib"]:
            values = [r[level] for r in runs]
            if values:
                entry[level] = ctx.median(values)
        if runs:
            entry["residual_top"] = runs[-1]["residual_top"]
        out["impls"][impl] = entry
    return out
