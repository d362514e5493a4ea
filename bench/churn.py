"""Case 5: churn. Subscribe/close cycles: how many per second, and does memory grow?

Two shapes, each ``cycles`` times:

- ``fresh``: a cycle subscribes to key ``i % 1000``, which has no other
  subscriber, and closes at once: the key's channel is made and dropped every
  cycle.
- ``busy``: every cycle joins and leaves one key that 1,000 idle subscribers
  hold open (a popular room with clients coming and going).

Ours: ``s = b.subscribe(key); s.close()``. encode/broadcaster: ``async with
bc.subscribe(key): pass``. The timed pass runs without tracemalloc (RSS before
and after is recorded). Then, under tracemalloc, two passes of ``cycles // 10``:
the growth from the end of the first to the end of the second (after
``gc.collect()``) must be none. (Comparing against a point before the first
traced pass would count dict tables that were resized during it, whose old
tables were allocated before tracing began, as growth.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import tracemalloc
from typing import Any


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _ours(shape: str):
    from broadcaster import Broadcaster

    b: Any = Broadcaster()
    keep = [b.subscribe("busy") for _ in range(1000)] if shape == "busy" else []

    async def cycles(keys: list[str]) -> None:
        subscribe = b.subscribe
        for key in keys:
            subscribe(key).close()

    return cycles, keep


async def _encode(shape: str):
    from broadcaster import Broadcast

    bc = Broadcast("memory://")
    await bc.connect()
    keep = []
    if shape == "busy":
        for _ in range(1000):
            cm = bc.subscribe("busy")
            keep.append((cm, await cm.__aenter__()))

    async def cycles(keys: list[str]) -> None:
        subscribe = bc.subscribe
        for key in keys:
            async with subscribe(key):
                pass

    return cycles, keep


SETUPS = {"ours": _ours, "candidate": _ours, "encode": _encode}


async def _measure(impl: str, cycles: int, shape: str) -> dict:
    run, keep = await SETUPS[impl](shape)
    keys = ["busy"] * cycles if shape == "busy" else [f"key-{i % 1000:04d}" for i in range(cycles)]
    await run(keys[:1000])  # warm-up
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    await run(keys)
    elapsed = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss()
    tm_keys = keys[: max(1000, cycles // 10)]
    # Traced from before a first pass, so that tables resized during it (dicts
    # do not shrink) are counted at both ends; growth is then pass 2 vs pass 1.
    tracemalloc.start()
    await run(tm_keys)
    gc.collect()
    m0 = tracemalloc.get_traced_memory()[0]
    await run(tm_keys)
    gc.collect()
    m1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "ops_per_s": cycles / elapsed,
        "us_per_cycle": elapsed * 1e6 / cycles,
        "rss_growth": float(rss1 - rss0),
        "traced_growth": float(m1 - m0),
        "traced_cycles": len(tm_keys),
    }


def measure(impl: str, cycles: int, shape: str) -> dict:
    return asyncio.run(_measure(impl, cycles, shape))


# -- orchestrator side ------------------------------------------------------------

IMPLS = ["ours", "encode"]
SHAPES = ["fresh", "busy"]


def run(ctx) -> dict:
    impls = ctx.with_candidate(IMPLS)
    cycles = 100_000 if ctx.quick else 1_000_000
    raw = ctx.interleave(
        "churn", [(shape, {"cycles": cycles, "shape": shape}) for shape in SHAPES], impls,
        reps=ctx.reps(quick=1, full=2), timeout=600,
    )
    out: dict[str, Any] = {"cycles": cycles, "shapes": {}}
    for shape in SHAPES:
        out["shapes"][shape] = {}
        for impl in impls:
            runs = [r for r in raw[shape][impl] if "error" not in r]
            entry: dict[str, Any] = {"errors": [r["error"] for r in raw[shape][impl] if "error" in r]}
            for k in ("ops_per_s", "us_per_cycle", "rss_growth", "traced_growth"):
                if runs:
                    entry[k] = ctx.median([r[k] for r in runs])
            if runs:
                entry["traced_cycles"] = runs[0]["traced_cycles"]
            ratios = ctx.paired_ratios(raw[shape][impl], raw[shape]["ours"], "ops_per_s")
            if ratios:
                entry["ops_vs_ours"] = ctx.median(ratios)
            out["shapes"][shape][impl] = entry
    return out
