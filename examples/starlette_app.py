"""``broadcaster.py`` in a Starlette app, with an authorised subscribe per room.

Run it from a checkout::

    pip install '.[examples]'              # uvicorn and starlette (and fastapi)
    python examples/starlette_app.py       # http://127.0.0.1:8000/rooms/general/stats
    python examples/starlette_app.py --port 0   # any free port; the printed URL says which

then, from another terminal::

    curl -N -H 'Authorization: Bearer alice-token' http://127.0.0.1:8000/rooms/ops/events
    curl -H 'Authorization: Bearer alice-token' -d '{"text": "deploy done"}' \\
        http://127.0.0.1:8000/rooms/ops/messages
    curl http://127.0.0.1:8000/rooms/ops/stats
    curl -i 'http://127.0.0.1:8000/rooms/ops/events?token=bob-token'    # 403: not bob's room

What it demonstrates:

* the authorisation pattern to copy: the check runs BEFORE ``subscribe()``, so
  a refused client never joins the channel, never appears in
  ``subscriber_count`` and gets an ordinary 401/403 response instead of a
  stream (an ``EventSource`` does not reconnect after one);
* the token comes from ``Authorization: Bearer ...`` or, because a browser's
  ``EventSource`` cannot set headers, from ``?token=...``;
* ``b.response(...)`` (a raw ASGI app) served by a Starlette route with no
  adapter: see ``RoomEvents`` for why this is the cleanest way in Starlette;
* graceful shutdown: Ctrl-C or SIGTERM ends every open stream with a clean
  end of body: ``rooms.close_on_signals()``, at module level (a lifespan
  does not run under every server: daphne has none), so the server exits at
  once instead of waiting for ever for streams that never end by themselves.

HTTP API (the tokens are ``alice-token``, rooms general and ops, and
``bob-token``, room general; a missing or unknown token is 401, a room the
token does not grant is 403):

* ``GET /rooms/{room}/events``     the room as ``text/event-stream``:
  ``message`` events, JSON ``{"room", "user", "text"}``; ``HEAD`` too (the
  headers, without subscribing)
* ``POST /rooms/{room}/messages``  JSON ``{"text": str}`` (1-2000 characters)
  -> 200 ``{"delivered": n}``, the subscribers it was sent to; the ``user`` of
  the message is the token's, never the client's say-so
* ``GET /rooms/{room}/stats``      JSON ``{"room", "subscribers", "channels"}``
  (``subscriber_count(room)`` and ``len(broadcaster)``; public here)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

# Import the checkout's broadcaster.py (see examples/chat.py): first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event, replay  # noqa: E402

MAX_TEXT: Final = 2000
MAX_BODY: Final = 16 * 1024

rooms: Broadcaster[str, Event] = Broadcaster(buffer=64)
rooms.close_on_signals()  # SIGINT/SIGTERM: every stream ends cleanly, then the server stops


# ---------------------------------------------------------------------------
# Authorisation: who may use which room
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    rooms: frozenset[str]


# A real app verifies a signed token or looks up a session here. A token in
# the query string ends up in access logs and browser history: give browsers a
# short-lived one for their EventSource (or use a cookie, which EventSource
# sends to its own origin).
USERS: Final = {
    "alice-token": User("alice", frozenset({"general", "ops"})),
    "bob-token": User("bob", frozenset({"general"})),
}


def authorise(request: Request, room: str) -> User:
    """The request's user, if it may use ``room``; else an HTTPException (401
    without a valid token, 403 for a room the token does not grant)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else request.query_params.get("token")
    user = USERS.get(token) if token else None
    if user is None:
        raise HTTPException(401, "a valid token is required", headers={"WWW-Authenticate": "Bearer"})
    if room not in user.rooms:
        raise HTTPException(403, f"{user.name} may not use this room")
    return user


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


class RoomEvents:
    """``GET``/``HEAD /rooms/{room}/events``: authorise, then subscribe and stream.

    Why a class: Starlette's ``Route`` wraps a plain function as a
    request -> Response endpoint, but calls anything else as a raw ASGI app
    with ``(scope, receive, send)``, after matching the path (``path_params``)
    and the method (405 otherwise). ``b.response(...)`` is a raw ASGI app, so
    this endpoint checks the token first and then hands the connection over,
    with no adapter class and no Response object that would pretend to own
    the status and headers the SSE app sends. Raising ``HTTPException`` works
    as in any endpoint: Starlette's exception middleware turns it into the
    401/403, since nothing has been sent yet. (A ``Mount`` would work too, but
    hides the route's path and methods from the router; a function endpoint
    would need a Response adapter, as in fastapi_app.py.)
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        room: str = request.path_params["room"]
        authorise(request, room)  # before subscribe(): a refused client never joins
        if request.method == "HEAD":
            # Headers only: the SSE app never reads its source for HEAD, so
            # there is nothing to subscribe (and no flicker in the count).
            nothing: tuple[Event, ...] = ()
            await rooms.response(replay(nothing))(scope, receive, send)
            return
        await rooms.response(rooms.subscribe(room))(scope, receive, send)


async def post_message(request: Request) -> JSONResponse:
    """``POST /rooms/{room}/messages``: JSON ``{"text": str}`` -> ``{"delivered": n}``."""
    room: str = request.path_params["room"]
    user = authorise(request, room)
    body = await read_json(request)
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise HTTPException(400, f'the body must be {{"text": "1-{MAX_TEXT} characters"}}')
    try:
        event = Event.json({"room": room, "user": user.name, "text": text}, event="message")
    except ValueError:  # a lone surrogate ("\ud800" in the JSON) is not text
        raise HTTPException(400, "the text must be valid Unicode") from None
    # send() never waits and returns how many subscribers it addressed.
    return JSONResponse({"delivered": rooms.send(room, event)})


async def stats(request: Request) -> JSONResponse:
    """``GET /rooms/{room}/stats``: watch subscriptions come and go."""
    room: str = request.path_params["room"]
    return JSONResponse({"room": room, "subscribers": rooms.subscriber_count(room), "channels": len(rooms)})


async def read_json(request: Request) -> object:
    """The request body as JSON: 413 past ``MAX_BODY`` bytes, 400 if not JSON."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"the body is limited to {MAX_BODY} bytes")
    try:
        value: object = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        raise HTTPException(400, "the body must be JSON") from None
    return value


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Shutdown, which comes only once the responses are gone: close the
    broadcaster, so nothing subscribes any more."""
    try:
        yield
    finally:
        rooms.close()


app = Starlette(
    routes=[
        Route("/rooms/{room}/events", RoomEvents(), methods=["GET"]),  # GET implies HEAD
        Route("/rooms/{room}/messages", post_message, methods=["POST"]),
        Route("/rooms/{room}/stats", stats, methods=["GET"]),
    ],
    lifespan=lifespan,
)


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="broadcaster.py in Starlette, with authorised rooms.")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    # broadcaster.py logs through `logging` (logger "broadcaster"): show its
    # INFO and above next to uvicorn's lines.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # The socket is bound here, so that the URL printed is the one listening
    # (with --port 0, the port the system chose); uvicorn serves on it.
    try:
        sock = socket.create_server(("127.0.0.1", args.port))
    except OSError as exc:
        parser.exit(1, f"starlette_app: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
    with sock:
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}/"
        print(f"starlette_app running on {url}rooms/general/stats - try: "
              f"curl -N -H 'Authorization: Bearer alice-token' {url}rooms/general/events", flush=True)
        config = uvicorn.Config(app, log_level="info")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass


if __name__ == "__main__":
    main()
