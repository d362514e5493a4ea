"""Case 8: keyed streams. What one connection over many keys costs, beside one stream per key.

Two measurements, each for subscribers that are single-key streams
(``subscribe(key)``) and for keyed streams (``subscribe_many(keys)``):

- ``send``: one key with S = 1,000 subscribers; M = 60 sends to it, back to
  back (the buffer, 64, holds them all, so nothing is dropped), timed, then
  every item read, timed apart: ns per delivery for the send, ns per item for
  the read (``__anext__``, what ``async for`` calls). The keyed streams are
  each over K = 10 keys, the key sent to among them, so that each is also a
  member of nine other channels. Ratio keyed / single within each repetition.
- ``memory``: N = 200 clients, each following K keys (K = 10 and 100):
  either one keyed stream each, or K single-key streams each; traced bytes
  per client (tracemalloc, after ``gc.collect()``), the channels included.

Nothing is asserted; run.py reports the ratios.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

S = 1000
M = 60
K_SEND = 10
N_MEMORY = 200


async def _send(shape: str) -> dict:
    from broadcaster import Broadcaster

    b: Any = Broadcaster(buffer=64)
    keys = [f"k{i}" for i in range(K_SEND)]
    if shape == "keyed":
        streams = [b.subscribe_many(keys) for _ in range(S)]
    else:
        streams = [b.subscribe("k0") for _ in range(S)]
    send = b.send
    for _ in range(2):  # warm-up: queues made and drained once
        send("k0", 0)
        for stream in streams:
            await stream.__anext__()
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    for i in range(M):
        send("k0", i)
    sent = time.perf_counter() - t0
    t0 = time.perf_counter()
    for stream in streams:
        anext_ = stream.__anext__
        for _ in range(M):
            await anext_()
    read = time.perf_counter() - t0
    gc.unfreeze()
    for stream in streams:
        stream.close()
    return {"send_ns": sent * 1e9 / (S * M), "read_ns": read * 1e9 / (S * M)}


async def _memory(shape: str, k: int) -> dict:
    from broadcaster import Broadcaster

    b: Any = Broadcaster()
    keys = [f"key-{i}" for i in range(k)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if shape == "keyed":
        held: list[Any] = [b.subscribe_many(keys) for _ in range(N_MEMORY)]
    else:
        held = [[b.subscribe(key) for key in keys] for _ in range(N_MEMORY)]
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held
    return {"bytes_per_client": (after - before) / N_MEMORY}


def measure(impl: str, what: str, shape: str, k: int = 0) -> dict:
    if what == "send":
        return asyncio.run(_send(shape))
    return asyncio.run(_memory(shape, k))


# -- orchestrator side ------------------------------------------------------------

SHAPES = ["single", "keyed"]
MEMORY_KS = [10, 100]


def run(ctx) -> dict:
    impls = ctx.with_candidate(["ours"])
    points = [(f"send {shape}", {"what": "send", "shape": shape}) for shape in SHAPES]
    points += [(f"memory {shape} K={k}", {"what": "memory", "shape": shape, "k": k}) for k in MEMORY_KS for shape in SHAPES]
    raw = ctx.interleave("keyed", points, impls, reps=ctx.reps(quick=2, full=5), timeout=300)
    out: dict[str, Any] = {"S": S, "M": M, "K_send": K_SEND, "N_memory": N_MEMORY, "impls": {}}
    for impl in impls:
        entry: dict[str, Any] = {}
        for label, _ in points:
            runs = [r for r in raw[label][impl] if "error" not in r]
            numbers = [key for key, value in (runs[0] if runs else {}).items() if isinstance(value, (int, float))]
            entry[label] = {key: ctx.median([r[key] for r in runs]) for key in numbers}
            entry[label]["errors"] = [r["error"] for r in raw[label][impl] if "error" in r]
        for key in ("send_ns", "read_ns"):
            ratios = ctx.paired_ratios(raw["send keyed"][impl], raw["send single"][impl], key)
            entry[f"keyed_vs_single_{key}"] = ctx.median(ratios) if ratios else None
        for k in MEMORY_KS:
            ratios = ctx.paired_ratios(
                raw[f"memory keyed K={k}"][impl], raw[f"memory single K={k}"][impl], "bytes_per_client"
            )
            entry[f"keyed_vs_single_memory_K{k}"] = ctx.median(ratios) if ratios else None
        out["impls"][impl] = entry
    return out
