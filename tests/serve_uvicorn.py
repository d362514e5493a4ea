"""Run ``sse_servers_app`` under uvicorn from Python: plain ``uvicorn.run()``,
no ``Server`` subclass; the app's ``b.close_on_signals()`` makes SIGINT and
SIGTERM end every stream, as under the command line.

    python tests/serve_uvicorn.py --port 0 [--http h11|httptools]

Logs ``Uvicorn running on http://127.0.0.1:PORT`` once listening.
"""

from __future__ import annotations

import argparse

import sse_servers_app
import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--http", choices=("h11", "httptools"), default="h11")
    args = parser.parse_args()
    uvicorn.run(sse_servers_app.app, host="127.0.0.1", port=args.port, http=args.http)


if __name__ == "__main__":
    main()
