"""Case 2: encode once. One 1 KiB JSON event sent to 10,000 subscribers.

What it costs to have the wire bytes for every subscriber of one send:

- ``ours``: ``Event.json(value)`` once (validated and encoded at construction),
  then each of the 10,000 responses takes ``event.encode()``, the same bytes
  object (what ``response()`` writes).
- ``sse-starlette``: the publisher ``json.dumps`` once and shares one
  ``ServerSentEvent`` object (the most favourable use), but
  ``EventSourceResponse`` encodes it for each subscriber
  (``ServerSentEvent.encode()``, as its ``ensure_bytes`` does per event).
- ``fastapi``: FastAPI's built-in SSE; one shared ``fastapi.sse.ServerSentEvent
  (raw_data=...)``, and per subscriber what its route does with each yielded
  item: ``format_sse_event(...)``.

Reported: bytes encoded per send, and time per send (median of the sends).
"""

from __future__ import annotations

import json
import time
from typing import Any


def _value() -> dict[str, Any]:
    """A JSON object whose compact encoding is 1,024 bytes."""
    value: dict[str, Any] = {"type": "update", "room": "general", "seq": 123456, "user": {"id": 42, "name": "alice"},
                             "tags": ["a", "b", "c"], "text": ""}
    size = len(json.dumps(value, separators=(",", ":")))
    value["text"] = "lorem ipsum " * 100
    value["text"] = value["text"][: 1024 - size]
    assert len(json.dumps(value, separators=(",", ":"))) == 1024
    return value


def measure(impl: str, subscribers: int, sends: int) -> dict:
    value = _value()
    rng = range(subscribers)
    if impl in ("ours", "candidate"):
        from broadcaster import Event

        def one() -> int:
            event = Event.json(value)
            for _ in rng:
                frame = event.encode()
            return len(frame)  # encoded once: the other subscribers share it

    elif impl == "sse-starlette":
        from sse_starlette import ServerSentEvent

        def one() -> int:
            shared = ServerSentEvent(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
            return sum(len(shared.encode()) for _ in rng)

    elif impl == "fastapi":
        from fastapi.sse import ServerSentEvent, format_sse_event

        def one() -> int:
            shared = ServerSentEvent(raw_data=json.dumps(value, ensure_ascii=False, separators=(",", ":")))
            total = 0
            for _ in rng:
                total += len(format_sse_event(data_str=shared.raw_data, event=shared.event, id=shared.id,
                                              retry=shared.retry, comment=shared.comment))
            return total

    else:
        raise ValueError(impl)
    one()  # warm-up
    times, encoded = [], 0
    for _ in range(sends):
        t0 = time.perf_counter()
        encoded = one()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"us_per_send": times[len(times) // 2] * 1e6, "bytes_per_send": float(encoded)}


# -- orchestrator side ------------------------------------------------------------

IMPLS = ["ours", "sse-starlette", "fastapi"]


def run(ctx) -> dict:
    impls = ctx.with_candidate(IMPLS)
    params = {"subscribers": 10_000, "sends": 5 if ctx.quick else 15}
    raw = ctx.interleave("encodeonce", [("10k", params)], impls, reps=ctx.reps(quick=2, full=3), timeout=300)["10k"]
    out: dict[str, Any] = {"subscribers": params["subscribers"], "event_bytes": 1024, "impls": {}}
    for impl in impls:
        runs = [r for r in raw[impl] if "error" not in r]
        entry: dict[str, Any] = {"errors": [r["error"] for r in raw[impl] if "error" in r]}
        if runs:
            entry["us_per_send"] = ctx.median([r["us_per_send"] for r in runs])
            entry["bytes_per_send"] = runs[0]["bytes_per_send"]
        ratios = ctx.paired_ratios(raw[impl], raw["ours"], "us_per_send")
        if ratios:
            entry["time_vs_ours"] = ctx.median(ratios)
        out["impls"][impl] = entry
    return out
