"""``broadcaster.py`` in a FastAPI app, with an authorised subscribe per room.

Run it from a checkout::

    pip install '.[examples]'            # uvicorn and fastapi (and starlette)
    python examples/fastapi_app.py       # http://127.0.0.1:8000/docs (the API docs)
    python examples/fastapi_app.py --port 0   # any free port; the printed URL says which

then, from another terminal::

    curl -N -H 'Authorization: Bearer alice-token' http://127.0.0.1:8000/rooms/ops/events
    curl -H 'Authorization: Bearer alice-token' -H 'Content-Type: application/json' \\
        -d '{"text": "deploy done"}' http://127.0.0.1:8000/rooms/ops/messages
    curl http://127.0.0.1:8000/rooms/ops/stats
    curl -i 'http://127.0.0.1:8000/rooms/ops/events?token=bob-token'    # 403: not bob's room

What it demonstrates:

* the authorisation pattern to copy, as FastAPI dependencies: ``room_user``
  runs BEFORE the endpoint body calls ``subscribe()``, so a refused client
  never joins the channel, never appears in ``subscriber_count`` and gets an
  ordinary 401/403 response instead of a stream (an ``EventSource`` does not
  reconnect after one);
* the token comes from ``Authorization: Bearer ...`` or, because a browser's
  ``EventSource`` cannot set headers, from ``?token=...``;
* ``b.response(...)`` (a raw ASGI app) returned from a path operation through
  ``SSEResponse``, a thin ``Response`` adapter: see its docstring for why;
* graceful shutdown: Ctrl-C or SIGTERM ends every open stream with a clean
  end of body: ``rooms.close_on_signals()``, at module level (a lifespan
  does not run under every server: daphne has none), so the server exits at
  once instead of waiting for ever for streams that never end by themselves.

HTTP API: the same as examples/starlette_app.py (tokens ``alice-token``, rooms
general and ops, and ``bob-token``, room general; a missing or unknown token
is 401, a room the token does not grant is 403; errors are FastAPI's JSON
``{"detail": ...}``):

* ``GET /rooms/{room}/events``     the room as ``text/event-stream``:
  ``message`` events, JSON ``{"room", "user", "text"}``; ``HEAD`` too (the
  headers, without subscribing)
* ``POST /rooms/{room}/messages``  JSON ``{"text": str}`` (1-2000 characters)
  -> 200 ``{"delivered": n}``, the subscribers it was sent to; the ``user`` of
  the message is the token's, never the client's say-so
* ``GET /rooms/{room}/stats``      JSON ``{"room", "subscribers", "channels"}``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Final

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

# Import the checkout's broadcaster.py (see examples/chat.py): first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event, replay  # noqa: E402

rooms: Broadcaster[str, Event] = Broadcaster(buffer=64)
rooms.close_on_signals()  # SIGINT/SIGTERM: every stream ends cleanly, then the server stops


class SSEResponse(Response):
    """A ``Response`` that hands the connection to an SSE ASGI app.

    Why an adapter: a FastAPI path operation must return a ``Response`` (or
    data, which FastAPI serialises as JSON); FastAPI then awaits
    ``response(scope, receive, send)``. ``b.response(...)`` is a raw ASGI app,
    so this subclass only delegates ``__call__`` to it. It is the cleanest way
    because the route stays an ordinary path operation: dependencies (the
    authorisation below), path and query validation and the OpenAPI docs all
    work, and the check runs before the endpoint body subscribes. A raw route
    (``app.router.add_route``, or a ``Mount``, as Starlette allows) would skip
    all of that; ``StreamingResponse`` or FastAPI's own ``EventSourceResponse``
    would re-implement, around an async generator, what the broadcaster's app
    already does (keep-alives, disconnect detection, send timeout, closing the
    subscription on every way out).

    FastAPI, when an endpoint returns a ``Response``, sends it as it is: it
    adds no content-length and touches nothing but ``background`` (set when
    the endpoint takes ``BackgroundTasks``), which runs here after the stream
    ends, as Starlette's responses do. ``super().__init__()`` is not called on
    purpose: it would render an empty body and compute a ``content-length:
    0``. Status and headers are the SSE app's (``SseConfig.headers`` adds
    headers); headers set on this object are not sent.
    """

    media_type = "text/event-stream"  # for the OpenAPI docs

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.status_code = 200
        self.background = None
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if self.background is not None:
            await self.background()


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

# auto_error=False: no header is not an error yet, the query may have a token.
bearer = HTTPBearer(auto_error=False)


def current_user(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    token: Annotated[str | None, Query(description="the token, for EventSource (it cannot set headers)")] = None,
) -> User:
    """The user of the bearer token, else of ``?token=``; 401 without a valid one."""
    key = credentials.credentials if credentials is not None else token
    user = USERS.get(key) if key else None
    if user is None:
        raise HTTPException(401, "a valid token is required", headers={"WWW-Authenticate": "Bearer"})
    return user


def room_user(room: str, user: Annotated[User, Depends(current_user)]) -> User:
    """The user, if it may use ``room`` (the path parameter); 403 otherwise."""
    if room not in user.rooms:
        raise HTTPException(403, f"{user.name} may not use this room")
    return user


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Shutdown, which comes only once the responses are gone: close the
    broadcaster, so nothing subscribes any more."""
    try:
        yield
    finally:
        rooms.close()


app = FastAPI(title="broadcaster.py in FastAPI", lifespan=lifespan)


# FastAPI adds no HEAD to a GET route (Starlette does), hence the second
# decorator, kept out of the docs (a GET+HEAD api_route would give both the
# same operation id). `async def` matters: subscribe() binds the stream to the
# running event loop, and a plain `def` endpoint runs in a worker thread.
@app.get(
    "/rooms/{room}/events",
    dependencies=[Depends(room_user)],  # runs first: a refusal never reaches subscribe()
    response_class=SSEResponse,
    # For the OpenAPI docs, which otherwise look for a `status_code` parameter
    # of the response class's __init__ (and fail without one).
    status_code=200,
)
@app.head(
    "/rooms/{room}/events",
    dependencies=[Depends(room_user)],
    response_class=SSEResponse,
    include_in_schema=False,
)
async def room_events(request: Request, room: str) -> SSEResponse:
    """The room as text/event-stream (``message`` events)."""
    if request.method == "HEAD":
        # Headers only: the SSE app never reads its source for HEAD, so
        # there is nothing to subscribe (and no flicker in the count).
        nothing: tuple[Event, ...] = ()
        return SSEResponse(rooms.response(replay(nothing)))
    return SSEResponse(rooms.response(rooms.subscribe(room)))


class Message(BaseModel):
    text: str = Field(min_length=1, max_length=2000, pattern=r"\S")


class Delivered(BaseModel):
    delivered: int


@app.post("/rooms/{room}/messages")
async def post_message(room: str, message: Message, user: Annotated[User, Depends(room_user)]) -> Delivered:
    """Send a message to the room; ``delivered`` is how many subscribers got it."""
    # (pydantic has already refused a lone surrogate, which Event would too.)
    event = Event.json({"room": room, "user": user.name, "text": message.text}, event="message")
    # send() never waits, and is thread-safe: a plain `def` endpoint could call it too.
    return Delivered(delivered=rooms.send(room, event))


class Stats(BaseModel):
    room: str
    subscribers: int
    channels: int


@app.get("/rooms/{room}/stats")
async def stats(room: str) -> Stats:
    """Watch subscriptions come and go (public here)."""
    return Stats(room=room, subscribers=rooms.subscriber_count(room), channels=len(rooms))


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="broadcaster.py in FastAPI, with authorised rooms.")
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
        parser.exit(1, f"fastapi_app: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
    with sock:
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}/"
        print(f"fastapi_app running on {url}docs (the API docs) - try: "
              f"curl -N -H 'Authorization: Bearer alice-token' {url}rooms/general/events", flush=True)
        config = uvicorn.Config(app, log_level="info")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass


if __name__ == "__main__":
    main()
