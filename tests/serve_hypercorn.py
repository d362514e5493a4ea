"""Run ``sse_servers_app`` under hypercorn the way the README recommends:
``hypercorn.asyncio.serve()`` with ``shutdown_trigger=b.shutdown_trigger``,
which on SIGINT/SIGTERM closes the broadcaster, waits for the SSE responses to
write their ends, and only then lets hypercorn shut down. (The hypercorn
command line is not used: with an SSE stream open it can hang for ever on
SIGTERM on Python 3.12+, and its handler gives the app no chance to end the
streams first.)

    python tests/serve_hypercorn.py --port 0

Serves HTTP/1.1 and h2c (HTTP/2 with prior knowledge) on the same port, and
logs ``Running on http://127.0.0.1:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import cast

os.environ["SSE_SIGNAL_HOOK"] = "0"  # the trigger below does the shutdown

import sse_servers_app
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = "-"
    # hypercorn types ASGI apps with its own TypedDicts; the app's loose types
    # (the usual ones, as in starlette.types) are compatible at run time.
    app = cast(ASGIFramework, sse_servers_app.app)
    asyncio.run(serve(app, config, shutdown_trigger=sse_servers_app.b.shutdown_trigger))


if __name__ == "__main__":
    main()
