"""Run ``sse_servers_app`` under uvicorn from Python, the way the README
recommends when you start uvicorn yourself: a ``uvicorn.Server`` subclass whose
``shutdown()`` closes the broadcaster before uvicorn's own shutdown, which then
finds every stream ending (no signal handler of ours, no patching).

    python tests/serve_uvicorn.py --port 0 [--http h11|httptools]

Logs ``Uvicorn running on http://127.0.0.1:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import socket

import sse_servers_app
import uvicorn

sse_servers_app.SIGNAL_HOOK = False  # ClosingServer.shutdown does the shutdown


class ClosingServer(uvicorn.Server):
    """``shutdown()`` is where uvicorn starts shutting down, on its event loop,
    whatever asked it to (SIGINT, SIGTERM, ``should_exit``)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        sse_servers_app.b.close()
        await super().shutdown(sockets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--http", choices=("h11", "httptools"), default="h11")
    args = parser.parse_args()
    config = uvicorn.Config(sse_servers_app.app, host="127.0.0.1", port=args.port, http=args.http)
    ClosingServer(config).run()


if __name__ == "__main__":
    main()
