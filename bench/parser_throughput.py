"""SseParser's throughput, side by side with the test suite's reference
parser and httpx-sse's decoder, on the same streams in one run.

    python bench/parser_throughput.py

Three streams of about 16 MiB each: chat (JSON messages with a type and an
id, as this module's keyed responses write them), multi-line (events of 20
data lines) and keep-alive heavy (one comment line between small events).
SseParser is fed 64 KiB chunks (as a socket or ``aiter_bytes()`` gives them)
and 1 KiB chunks; the reference parser (``parse_event_stream`` in
test_broadcaster.py, a plain transcription of the HTML Standard that reads
a whole stream at once, never incrementally) gets the stream in one piece,
its best case; httpx-sse is fed the 64 KiB chunks through an incremental UTF-8
decoder and its line and event decoders, as ``aiter_sse()`` does. Each is
run 3 times, the best time kept; every parser must find the same events.
Prints MB/s (10^6 bytes per second) and each one's ratio to SseParser.
Needs the test tools (pytest, hypothesis: the reference parser's module
imports them) and httpx-sse.
"""

from __future__ import annotations

import codecs
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from httpx_sse._decoders import SSEDecoder, SSELineDecoder  # noqa: E402

from broadcaster import Event, SseParser  # noqa: E402
from test_broadcaster import parse_event_stream  # noqa: E402

SIZE = 16 << 20
RUNS = 3


def stream(frame: Callable[[int], bytes]) -> bytes:
    parts: list[bytes] = []
    size = n = 0
    while size < SIZE:
        parts.append(frame(n))
        size += len(parts[-1])
        n += 1
    return b"".join(parts)


def chat(n: int) -> bytes:
    text = {"room": "general", "n": n, "user": "ann", "text": "héllo, this is message number %d of the day" % n}
    return Event(json.dumps(text), event="message", id=f"general=3f9a0c1b7d2e-{n}").encode()


def multi_line(n: int) -> bytes:
    return Event("\n".join(f"line {i} of event {n}" for i in range(20))).encode()


def keep_alive(n: int) -> bytes:
    return b":\n\n" + Event(str(n)).encode()


def ours(body: bytes, chunk: int) -> int:
    parser = SseParser()
    return sum(len(parser.feed(body[i : i + chunk])) for i in range(0, len(body), chunk))


def reference(body: bytes) -> int:
    return len(parse_event_stream(body).events)


def httpx_sse(body: bytes, chunk: int) -> int:
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines, events = SSELineDecoder(), SSEDecoder()
    count = 0
    for i in range(0, len(body), chunk):
        for line in lines.decode(text.decode(body[i : i + chunk])):
            count += events.decode(line) is not None
    return count


def best(fn: Callable[[], int]) -> tuple[float, int]:
    times, found = [], set()
    for _ in range(RUNS):
        start = time.perf_counter()
        found.add(fn())
        times.append(time.perf_counter() - start)
    assert len(found) == 1, found
    return min(times), found.pop()


def main() -> None:
    print(f"{'stream':<11} {'parser':<34} {'MB/s':>7} {'vs SseParser':>13}")
    for name, frame in (("chat", chat), ("multi-line", multi_line), ("keep-alive", keep_alive)):
        body = stream(frame)
        runs = {
            "SseParser, 64 KiB chunks": lambda: ours(body, 65536),
            "SseParser, 1 KiB chunks": lambda: ours(body, 1024),
            "reference (whole stream at once)": lambda: reference(body),
            "httpx-sse, 64 KiB chunks": lambda: httpx_sse(body, 65536),
        }
        results = {label: best(fn) for label, fn in runs.items()}
        events = {count for _, count in results.values()}
        assert len(events) == 1, f"the parsers disagree on {name}: {results}"
        base = results["SseParser, 64 KiB chunks"][0]
        for label, (seconds, _) in results.items():
            print(f"{name:<11} {label:<34} {len(body) / seconds / 1e6:7.1f} {base / seconds:12.2f}x")
        print(f"{'':<11} ({len(body) / 1e6:.1f} MB, {events.pop()} events)")


if __name__ == "__main__":
    main()
