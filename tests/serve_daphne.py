"""Run ``sse_servers_app`` under daphne from Python, the way the README
recommends when you start daphne yourself: ``Server(signal_handlers=False)``,
and SIGINT/SIGTERM handled on daphne's event loop by closing the broadcaster,
waiting for the SSE responses to write their ends, then ``server.stop()``.
(daphne's own handlers stop the reactor at once, which cancels every running
response: the streams would be cut off without their end.)

    python tests/serve_daphne.py --port 0

Logs ``Listening on TCP address 127.0.0.1:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import sse_servers_app

# daphne.server installs Twisted's asyncio reactor, so it must come before anything
# that imports twisted.internet.reactor (sse_servers_app does not).
from daphne.server import Server  # type: ignore[import-untyped]

sse_servers_app.SIGNAL_HOOK = False  # on_signal below does the shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = Server(
        sse_servers_app.app,
        endpoints=[f"tcp:port={args.port}:interface=127.0.0.1"],
        signal_handlers=False,
    )
    stopping: list[asyncio.Task[None]] = []  # keeps the task alive while it runs

    async def drain_then_stop() -> None:
        try:
            sse_servers_app.b.close()  # on the loop: taking the broadcaster's lock is safe
            await sse_servers_app.inflight.wait()
        finally:
            server.stop()

    def on_signal() -> None:
        if stopping:  # a second signal: stop at once
            server.stop()
            return
        stopping.append(asyncio.get_running_loop().create_task(drain_then_stop()))

    def ready() -> None:
        # Called by Server.run() in the main thread, with the reactor's event
        # loop set as the current one, just before it starts running.
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

    server.ready_callable = ready
    server.run()


if __name__ == "__main__":
    main()
