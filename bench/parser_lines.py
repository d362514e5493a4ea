"""SseParser on one huge line: the time per MiB must not grow with the line.

    python bench/parser_lines.py

Feeds ``data: <N MiB of x>`` plus a blank line (N = 1, 4, 16) in chunks of
1 KiB and of 64 KiB, and prints the milliseconds per MiB: flat when the work
is linear in the bytes fed (the parser joins a line's pieces once, at its
end, instead of rescanning what it holds). Standalone: not part of run.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import SseParser  # noqa: E402


def main() -> None:
    for mib in (1, 4, 16):
        body = b"data: " + b"x" * (mib << 20) + b"\n\n"
        for chunk in (1024, 65536):
            parser = SseParser()
            start = time.perf_counter()
            events = 0
            for i in range(0, len(body), chunk):
                events += len(parser.feed(body[i : i + chunk]))
            elapsed = time.perf_counter() - start
            print(f"{mib:>2} MiB line, {chunk:>5} B chunks: {elapsed * 1000:7.1f} ms ({elapsed / mib * 1000:5.1f} ms/MiB), {events} event")


if __name__ == "__main__":
    main()
