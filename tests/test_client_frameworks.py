"""``AsgiClient`` against whole applications, in process: Starlette and
FastAPI apps with routing, a lifespan, dependencies and middleware
(Starlette's GZip middleware included), this project's example apps, and the
three ways a test suite runs async code (``asyncio.run``, pytest-asyncio and
anyio's pytest plugin).

What Starlette's ``GZipMiddleware`` does to an event stream: by default it
leaves ``text/event-stream`` alone (the type is in its excluded content
types), so events pass through uncompressed. Told to compress it
(``exclude_content_types=()``), it compresses each body message and flushes
(``Z_SYNC_FLUSH``), so every event still arrives on its own, decodable at
once; the tests check both, event by event.

The frameworks come with the test tools (``pip install --group test``);
without one of them these tests are skipped with the reason, except under
``CI=true``, where a skip fails.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import _support
import pytest

_support.require_modules(("starlette", "fastapi", "pytest_asyncio"), "these tests need {}: pip install --group test")

from fastapi import Depends, FastAPI, Header, HTTPException  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware.gzip import GZipMiddleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import fastapi_app  # noqa: E402
import starlette_app  # noqa: E402

from broadcaster import AsgiClient, Broadcaster, Event, SseEvent, last_event_id  # noqa: E402

ALICE = {"Authorization": "Bearer alice-token"}


# ---------------------------------------------------------------------------
# A Starlette app: the broadcaster lives in the lifespan's state
# ---------------------------------------------------------------------------


class RoomEvents:
    """``GET /rooms/{room}/events``: the room, resumed from Last-Event-ID."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        rooms: Broadcaster[str, Event] = request.state.rooms
        stream = rooms.subscribe(request.path_params["room"], last_event_id(scope))
        await rooms.response(stream)(scope, receive, send)


async def publish(request: Request) -> JSONResponse:
    rooms: Broadcaster[str, Event] = request.state.rooms
    text = (await request.body()).decode()
    return JSONResponse({"delivered": rooms.send(request.path_params["room"], Event(text))})


async def count(request: Request) -> JSONResponse:
    rooms: Broadcaster[str, Event] = request.state.rooms
    return JSONResponse({"subscribers": rooms.subscriber_count(request.path_params["room"])})


def starlette_rooms() -> tuple[Starlette, list[Broadcaster[str, Event]]]:
    """The app, and the broadcasters its lifespan made (one per startup)."""
    made: list[Broadcaster[str, Event]] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        made.append(Broadcaster(history=50))
        yield {"rooms": made[-1]}
        made[-1].close()

    routes = [
        Route("/rooms/{room}/events", RoomEvents(), methods=["GET"]),
        Route("/rooms/{room}", publish, methods=["POST"]),
        Route("/rooms/{room}/count", count, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan), made


@pytest.mark.anyio
async def test_starlette_app_with_a_lifespan_streams_resumes_and_cleans_up() -> None:
    """Through routing and the lifespan's state: a POST reaches the open
    stream, leaving it unsubscribes, a Last-Event-ID resumes exactly, and
    the lifespan's shutdown closes the broadcaster (a subscription after it
    is born closed)."""
    app, made = starlette_rooms()
    async with AsgiClient(app, lifespan=True) as client:
        [rooms] = made
        async with client.stream("GET", "/rooms/a/events") as response:
            assert (response.status, response.headers["content-type"]) == (200, "text/event-stream; charset=utf-8")
            assert (await client.request("GET", "/rooms/a/count")).json()["subscribers"] == 1
            for text in ("one", "two", "three"):
                assert (await client.request("POST", "/rooms/a", body=text.encode())).json() == {"delivered": 1}
            first = await response.event()
            assert first.data == "one"
        assert (await client.request("GET", "/rooms/a/count")).json() == {"subscribers": 0}
        resume = {"Last-Event-ID": first.last_event_id}
        async with client.stream("GET", "/rooms/a/events", headers=resume) as response:
            assert [event.data for event in await response.events(2)] == ["two", "three"]
        assert not rooms.subscribe("a").closed
    assert rooms.subscribe("a").closed, "the lifespan's shutdown did not close the broadcaster"
    assert made == [rooms]


@pytest.mark.anyio
async def test_starlette_streaming_response_of_another_library_is_read_and_left() -> None:
    """An event stream written by hand with StreamingResponse (what other
    SSE libraries do): its events are read one by one, and leaving the
    block ends its generator (Starlette watches for the disconnect)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    finished = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        try:
            while True:
                yield f"data: {await queue.get()}\n\n".encode()
        finally:
            finished.set()

    async def events(request: Request) -> Response:
        return StreamingResponse(frames(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/events", events)])
    async with AsgiClient(app) as client, client.stream("GET", "/events") as response:
        for n in range(3):
            queue.put_nowait(str(n))
            assert await response.event() == SseEvent("message", str(n), "")
    assert finished.is_set()


# ---------------------------------------------------------------------------
# A FastAPI app: a dependency, an HTTP middleware, GZip in front
# ---------------------------------------------------------------------------


def user(authorization: Annotated[str, Header()] = "") -> str:
    """The dependency: alice's token, or 401."""
    if authorization != "Bearer alice-token":
        raise HTTPException(401, "a valid token is required", headers={"WWW-Authenticate": "Bearer"})
    return "alice"


def fastapi_rooms(rooms: Broadcaster[str, Event], **gzip: Any) -> ASGIApp:
    """Rooms behind a bearer-token dependency, an ``@app.middleware("http")``
    that stamps a header, and Starlette's GZipMiddleware (``gzip`` are its
    options)."""
    app = FastAPI()

    @app.middleware("http")
    async def stamp(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["x-served-by"] = "test"
        return response

    @app.get("/rooms/{room}/events", response_class=fastapi_app.SSEResponse, status_code=200)
    async def room_events(room: str, who: Annotated[str, Depends(user)]) -> fastapi_app.SSEResponse:
        return fastapi_app.SSEResponse(rooms.response(rooms.subscribe(room)))

    @app.post("/rooms/{room}")
    async def post(room: str, message: dict[str, str], who: Annotated[str, Depends(user)]) -> dict[str, int]:
        return {"delivered": rooms.send(room, Event.json({"user": who, **message}))}

    app.add_middleware(GZipMiddleware, minimum_size=1, **gzip)
    return app


@pytest.mark.anyio
async def test_fastapi_dependency_refuses_with_a_readable_401() -> None:
    rooms: Broadcaster[str, Event] = Broadcaster()
    async with AsgiClient(fastapi_rooms(rooms)) as client:
        response = await client.request("GET", "/rooms/a/events")
    assert response.status == 401
    assert response.json() == {"detail": "a valid token is required"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert rooms.subscriber_count("a") == 0


@pytest.mark.parametrize(
    ("gzip", "encoding"),
    [({}, None), ({"exclude_content_types": ()}, "gzip")],
    ids=["gzip-leaves-event-streams-alone", "gzip-told-to-compress-them"],
)
@pytest.mark.anyio
async def test_fastapi_events_arrive_one_by_one_through_middleware_and_gzip(
    gzip: dict[str, Any], encoding: str | None
) -> None:
    """Each published message is read before the next is published, through
    the HTTP middleware and GZip in either mode; leaving unsubscribes."""
    rooms: Broadcaster[str, Event] = Broadcaster()
    headers = {**ALICE, "Accept-Encoding": "gzip"}
    async with AsgiClient(fastapi_rooms(rooms, **gzip)) as client:
        async with client.stream("GET", "/rooms/a/events", headers=headers) as response:
            assert response.headers.get("content-encoding") == encoding
            assert response.headers["x-served-by"] == "test"
            for n in range(3):
                posted = await client.request("POST", "/rooms/a", json={"text": str(n)}, headers=ALICE)
                assert posted.json() == {"delivered": 1}
                assert await response.event() == SseEvent("message", f'{{"user":"alice","text":"{n}"}}', "")
                assert rooms.subscriber_count("a") == 1
        assert rooms.subscriber_count("a") == 0
        assert "a" not in rooms


# ---------------------------------------------------------------------------
# The same test under each way of running async tests
# ---------------------------------------------------------------------------


async def publish_and_receive() -> None:
    """The example FastAPI app (examples/fastapi_app.py), in process, with its
    lifespan: 403 for a room the token does not grant, then a message
    published and received, then nothing left subscribed; the lifespan's
    shutdown closes the broadcaster (a subscription after it is born closed).

    That close is for good, as at the end of a server process, so each run
    imports the example afresh: a new module-level broadcaster and app."""
    importlib.reload(fastapi_app)
    async with AsgiClient(fastapi_app.app, lifespan=True) as client:
        bob = await client.request("GET", "/rooms/ops/events", query={"token": "bob-token"})
        assert (bob.status, bob.json()) == (403, {"detail": "bob may not use this room"})
        async with client.stream("GET", "/rooms/ops/events", headers=ALICE) as response:
            posted = await client.request("POST", "/rooms/ops/messages", json={"text": "deploy done"}, headers=ALICE)
            assert posted.json() == {"delivered": 1}
            event = await response.event()
        assert (event.type, event.data) == ("message", '{"room":"ops","user":"alice","text":"deploy done"}')
        stats = await client.request("GET", "/rooms/ops/stats")
        assert stats.json()["subscribers"] == 0
        assert not fastapi_app.rooms.subscribe("ops").closed
    assert fastapi_app.rooms.subscribe("ops").closed, "the lifespan's shutdown did not close the broadcaster"


def test_under_asyncio_run() -> None:
    asyncio.run(publish_and_receive())


@pytest.mark.asyncio
async def test_under_pytest_asyncio() -> None:
    await publish_and_receive()


@pytest.mark.anyio
async def test_under_anyio_pytest_plugin() -> None:
    await publish_and_receive()


@pytest.mark.anyio
async def test_example_starlette_app_in_process() -> None:
    """examples/starlette_app.py: 401 without a token, a stream, a message
    (its JSON body), and HEAD subscribing nobody."""
    async with AsgiClient(starlette_app.app) as client:
        refused = await client.request("GET", "/rooms/general/events")
        assert refused.status == 401
        head = await client.request("HEAD", "/rooms/general/events", headers=ALICE)
        assert (head.status, head.body) == (200, b"")
        async with client.stream("GET", "/rooms/general/events", headers=ALICE) as response:
            posted = await client.request("POST", "/rooms/general/messages", json={"text": "hi"}, headers=ALICE)
            assert posted.json() == {"delivered": 1}
            assert (await response.event()).data == '{"room":"general","user":"alice","text":"hi"}'
        assert starlette_app.rooms.subscriber_count("general") == 0


@pytest.mark.anyio
async def test_fastapi_endpoint_that_never_answers_is_reported_not_waited_for() -> None:
    """A path operation that never returns: no response start within the
    timeout; told the client left, it still does not return (a function
    endpoint does not watch the connection), so it is cancelled, and the
    error says both."""
    app = FastAPI()
    cancelled = asyncio.Event()

    @app.get("/stuck")
    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async with AsgiClient(app, timeout=0.2) as client:
        with pytest.raises(TimeoutError) as raised:
            async with client.stream("GET", "/stuck"):
                pass  # pragma: no cover (never entered)
    assert str(raised.value) == (
        "GET /stuck: the app did not return within 0.2 s of the client's disconnect; cancelled"
    )
    assert str(raised.value.__context__) == "GET /stuck: no response start within 0.2 s"
    assert cancelled.is_set()
