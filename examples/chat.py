"""A multi-room chat over Server-Sent Events: the main demo of ``broadcaster.py``.

Run it from a checkout (the only dependency is uvicorn: ``pip install uvicorn``,
or ``pip install -e '.[examples]'``)::

    python examples/chat.py            # http://127.0.0.1:8000/
    python examples/chat.py --port 0   # any free port; the printed URL says which
    python examples/chat.py --linger 5 # rooms' resume history outlives their last client 5 s (default 60)

and open the printed URL in two browser tabs.

What it demonstrates, in a plain ASGI app (no framework):

* resume built in: messages go through ``Broadcaster(history=100, linger=60)``,
  which gives each one an id ``<epoch>-<n>``, keeps the last 100 of each room,
  and resumes a reconnecting browser from its ``Last-Event-ID`` with
  ``subscribe(room, last_event_id=last_event_id(scope))``: exactly what it
  missed, then live, no gap and no duplicate. The chat stores no ids and
  replays nothing itself;
* one connection for every room the page follows: ``subscribe_many`` of the
  rooms' messages, merged with their presence (``merge``), so the sidebar
  shows every room's unread count live, and the page keeps working with more
  rooms than a browser's six connections per origin;
* presence on the same connection, but not in the history;
* a fresh page, or one whose id cannot be resumed, loads the room's recent
  messages from ``GET /rooms/{room}/history`` without losing or doubling any
  that arrive meanwhile (see "Loading a room" below);
* admission limits (``--max-streams``, ``--max-rooms``): past one, a stream
  gets ``try_later()``'s answer, a 200 that sets ``retry`` to 10 s and ends
  (an ``EventSource`` gives up for good on any other status), and a message
  to one room too many a 503 with ``Retry-After``;
* graceful shutdown: Ctrl-C or SIGTERM ends every open stream with a clean
  end of body, so the server exits at once: ``messages.close_on_signals()``
  (closing ``messages`` also ends the responses that merge ``presence`` in).

Design
======

Two broadcasters, both keyed by room:

``messages``: ``Broadcaster[str, Event](history=100, linger=60)``
    Every item sent to a room is a chat message. With history, *every* send is
    retained under a new id and replayed to resuming clients, and a room whose
    last client left keeps its history for ``linger`` seconds, so even its only
    client can reconnect and resume (posts to it meanwhile are retained too).

``presence``: ``Broadcaster[str, Event]()``, no history
    The room's connection count, announced when a connection joins and when it
    leaves. Presence is state, not a log: sent to the ``messages`` key it would
    be retained and replayed (a resumed client would get stale counts) and,
    worse, it would push messages out of the history (100 joins and leaves
    would leave nothing to resume from). It has no ids, so it never moves the
    browser's ``lastEventId`` either. Presence streams skip what they lag
    behind on (``LagPolicy.SKIP``): only the latest count matters.

One ``EventSource`` carries every room the page follows, messages and
presence: ``merge(messages.subscribe_many(rooms, last_event_id=...),
presence.subscribe_many(rooms))``. (A connection per room would hit the
browser's limit of 6 HTTP/1.1 connections per origin, across all its tabs, at
the seventh room.) Each message goes out with the stream's id, which names
the position reached in every room; presence goes out without one, so it
never moves the browser's ``lastEventId``. The ``reload`` event (JSON: the
rooms to load) goes first on a first connection (every room) and on a
reconnection that could not resume some rooms (those only: the others resume
exactly). Joining or leaving a room reconnects with the new list and the id
reached so far (``?last_event_id=``): the rooms kept resume, the new one is
loaded.

Loading a room
    Broadcast history is a resume buffer, not the room's state: it holds
    nothing for a room nobody has been in for ``linger`` seconds, and it has no
    read API. What a fresh page shows is app state, kept like a database would
    keep it: ``Room`` keeps the last 100 messages of every room, each with its
    number ``n`` in the room (1, 2, 3, ...; messages posted to an empty room are
    kept too). The page follows the race-free order: connect first (the stream
    is subscribed before its first byte, the ``reload`` event, arrives), then
    fetch ``GET /rooms/{room}/history``, holding back the live messages that
    arrive meanwhile; show the history, then the held-back messages with an
    ``n`` above the last one shown. So it shows nothing twice and misses
    nothing. On a ``reload`` (a fresh connection, or after a gap: the server
    restarted, the room's history expired, or the page missed more than 100
    messages) it does the same again from a cleared log, and says in the room
    that the stream could not resume and the room was reloaded.

HTTP API (``{room}`` matches ``[a-z0-9_-]{1,32}``, else 400):

* ``GET /``                        the page (inline CSS and JS, no build step;
  light and dark, laid out for desktop and phone widths)
* ``GET /events?room=a&room=b``    the rooms (1-50, each once) as
  ``text/event-stream``: first a ``reload`` event (JSON list of the rooms to
  load) for every room on a connection without ``Last-Event-ID`` or the
  ``last_event_id`` query parameter, else for the rooms it could not resume;
  then ``message`` events (JSON ``{"room", "n", "user", "text", "at"}``,
  ``at`` being when the server accepted the message, in Unix milliseconds,
  each with the stream's id: ``a=<epoch>-<seq>,b=<epoch>-<seq>``) and
  ``presence`` events (JSON ``{"room", "count"}``, no id)
* ``GET /rooms/{room}/events``     the same for one room
* ``GET /rooms/{room}/history``    JSON ``{"room", "messages": [...]}``: the last
  100 messages, oldest first, as in the ``message`` events (with their
  original ``at``: the page shows each message's time as sent)
* ``POST /rooms/{room}/messages``  JSON ``{"user": str, "text": str}`` (user 1-32
  characters, text 1-2000, body at most 16 KiB) -> 204; 400 on bad input, 413
  on a larger body
* ``GET /rooms/{room}/stats``      JSON ``{"room", "subscribers", "channels",
  "resumable"}``: the room's connections, the rooms with a connection
  (``len(presence)``), and whether the room's broadcast history is alive
  (``room in messages``: connected, or lingering): watch cleanup happen

Other paths get 404 and other methods 405. Exit status, as with the ``uvicorn``
command: 0 after Ctrl-C; after SIGTERM uvicorn shuts down gracefully and then
re-raises the signal, so the process ends killed by SIGTERM (143 in a shell,
-15 from ``subprocess``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import uvicorn

# The example imports the repository's own broadcaster.py, so it runs from a
# checkout without installing anything: `python examples/chat.py` puts
# examples/ (not the repository root) on sys.path, hence this line. It goes
# first, so the checkout wins over an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event, LimitReached, SseConfig, last_event_id, merge, replay

# The conventional ASGI types (the same as broadcaster's and starlette's).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROOM_NAME: Final = re.compile(r"[a-z0-9_-]{1,32}")
MAX_USER: Final = 32
MAX_TEXT: Final = 2000
# The largest valid message is about 8 KiB as UTF-8 JSON (what the page's
# JSON.stringify sends: at most 4 bytes a character), so 16 KiB is ample.
MAX_BODY: Final = 16 * 1024
# Messages each room's broadcast history keeps for resuming clients.
HISTORY: Final = 100
# Messages GET /rooms/{room}/history returns: what a fresh page shows.
RECENT: Final = 100
# Seconds a room's broadcast history outlives its last connection.
LINGER: Final = 60.0
# Rooms one connection may follow (the page's sidebar).
MAX_ROOMS: Final = 50  # per connection
MAX_STREAMS: Final = 10_000  # open streams (--max-streams)
MAX_KEYS: Final = 10_000  # rooms (--max-rooms): channels with their history, and rooms' state
RETRY_LATER: Final = 10.0  # seconds a refused client is asked to wait

ChatMessage = dict[str, object]


class HttpError(Exception):
    """A request the app refuses: answered with ``status`` and a JSON error."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class ClientGone(Exception):
    """The client disconnected while we were reading its request."""


class Room:
    """The room's state, as a database would keep it: the message counter and
    the recent messages (what a fresh page loads). Not used for resuming:
    that is the broadcaster's history."""

    __slots__ = ("count", "recent")

    def __init__(self) -> None:
        self.count = 0
        self.recent: deque[ChatMessage] = deque(maxlen=RECENT)


def reload(rooms: Iterable[str], position: str | None) -> Event:
    """Written first when a connection does not resume ``rooms`` exactly: the
    page then (re)loads their recent messages. Its id is the position the
    connection starts from in every room, so that a reconnection before any
    message resumes every room from there."""
    return Event.json(list(rooms), event="reload", id=position)


def as_sent(pair: tuple[str, Event]) -> Event:
    """How the events of a room stream are written: as they were sent (they
    carry their type and their room)."""
    return pair[1]


class Chat:
    """The ASGI app: routes by path and method to a handful of handlers."""

    def __init__(self, linger: float = LINGER, max_streams: int = MAX_STREAMS, max_rooms: int = MAX_KEYS) -> None:
        # keep_alive: a comment every 15 s of silence keeps proxies from
        # closing idle streams; retry: browsers reconnect 2 s after a drop.
        # buffer: a client 64 messages behind is ended (Lagged); its browser
        # reconnects and resumes from the history (100 > 64, so nothing is lost).
        config = SseConfig(keep_alive=15, retry=2000)
        # Admission limits: however many connections and rooms clients ask
        # for, the process holds at most this many streams, and channels
        # with their history; presence follows the same rooms and streams.
        self.messages: Broadcaster[str, Event] = Broadcaster(
            buffer=64, config=config, history=HISTORY, linger=linger, max_streams=max_streams, max_keys=max_rooms
        )
        self.max_rooms = max_rooms
        self.presence: Broadcaster[str, Event] = Broadcaster(buffer=64, config=config)
        # On SIGINT/SIGTERM: close `messages` (every response is one of its
        # own, and closing it ends them, presence merged in or not), then let
        # the server stop.
        self.messages.close_on_signals()
        # Rooms live as long as the process; a real app would expire idle ones.
        self.rooms: dict[str, Room] = {}

    def announce(self, room: str) -> None:
        count = self.presence.subscriber_count(room)
        self.presence.send(room, Event.json({"room": room, "count": count}, event="presence"))

    def close(self) -> None:
        """End every open stream (each one drains, then ends cleanly)."""
        self.messages.close()
        self.presence.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"chat serves HTTP only, not {scope['type']!r}")
        try:
            await self.route(scope, receive, send)
        except HttpError as exc:
            body = json.dumps({"error": exc.message}).encode()
            await respond(scope, send, exc.status, body, b"application/json", exc.headers)
        except ClientGone:
            pass

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Sent only once every response has finished: too late to
                # end the streams, but nothing subscribes from now on.
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/":
            allow(method, "GET", "HEAD")
            await respond(scope, send, 200, PAGE, b"text/html; charset=utf-8")
            return
        if path == "/favicon.ico":
            allow(method, "GET", "HEAD")
            await respond(scope, send, 200, FAVICON, b"image/svg+xml")
            return
        if path == "/events":
            allow(method, "GET", "HEAD")
            await self.events(scope, receive, send, parse_rooms(scope))
            return
        parts = path.split("/")
        if len(parts) != 4 or parts[:2] != ["", "rooms"] or parts[3] not in ("events", "history", "messages", "stats"):
            raise HttpError(404, "not found")
        room, action = parts[2], parts[3]
        if not ROOM_NAME.fullmatch(room):
            raise HttpError(400, "room names are 1-32 characters of a-z, 0-9, _ and -")
        if action == "events":
            allow(method, "GET", "HEAD")
            await self.events(scope, receive, send, [room])
        elif action == "messages":
            allow(method, "POST")
            await self.post(scope, receive, send, room)
        elif action == "history":
            allow(method, "GET", "HEAD")
            state = self.rooms.get(room)
            recent = list(state.recent) if state is not None else []
            body = json.dumps({"room": room, "messages": recent}, ensure_ascii=False).encode()
            await respond(scope, send, 200, body, b"application/json")
        else:
            allow(method, "GET", "HEAD")
            stats = {
                "room": room,
                "subscribers": self.presence.subscriber_count(room),
                "channels": len(self.presence),
                "resumable": room in self.messages,
            }
            await respond(scope, send, 200, json.dumps(stats).encode(), b"application/json")

    async def events(self, scope: Scope, receive: Receive, send: Send, rooms: list[str]) -> None:
        """One connection for all the rooms a page follows: their messages
        (resumed from the client's id) merged with their presence (live only:
        given no id, it would make every room a gap)."""
        if scope["method"] == "HEAD":
            # Headers only: no subscription, so no presence flicker.
            nothing: tuple[Event, ...] = ()
            await self.messages.response(replay(nothing))(scope, receive, send)
            return
        last_id = last_event_id(scope)
        try:
            messages = self.messages.subscribe_many(rooms, last_event_id=last_id)
        except LimitReached as full:
            # A 200 that sets retry and ends: the browser's EventSource comes
            # back later (any other status would make it give up for good).
            logging.getLogger("chat").info("refused a stream for now: %s", full)
            await self.messages.try_later(RETRY_LATER)(scope, receive, send)
            return
        stream = merge(messages, self.presence.subscribe_many(rooms))
        for room in rooms:  # the client sees its own join
            self.announce(room)
        position = stream.last_event_id
        # A first connection loads every room; a reconnection only those it
        # could not resume (response() writes on_gap's event for them first).
        first = [] if last_id is not None else [("", reload(rooms, position))]
        app = self.messages.response(
            replay(first, stream), as_sent, on_gap=functools.partial(reload, position=position)
        )
        try:
            await app(scope, receive, send)
        finally:
            # The response has closed the stream: the counts are without us.
            for room in rooms:
                self.announce(room)

    async def post(self, scope: Scope, receive: Receive, send: Send, room: str) -> None:
        user, text = parse_message(await read_body(scope, receive))
        state = self.rooms.get(room)
        if state is None:
            if len(self.rooms) >= self.max_rooms:  # a client must not make us hold rooms without bound
                await self.messages.try_later(RETRY_LATER, status=503)(scope, receive, send)
                return
            state = self.rooms[room] = Room()
        # Stored and sent with no await in between, so the history and the
        # streams see the messages in the same order (the page relies on it).
        state.count += 1
        # "at": when the server took the message (Unix time in milliseconds),
        # so the history and a resumed stream show when it was really sent.
        at = int(time.time() * 1000)
        message: ChatMessage = {"room": room, "n": state.count, "user": user, "text": text, "at": at}
        state.recent.append(message)
        # The broadcaster retains it (if the room has a channel, live or
        # lingering) under a new id; each stream writes its own id, naming it.
        self.messages.send(room, Event.json(message, event="message"))
        await respond(scope, send, 204)


def parse_rooms(scope: Scope) -> list[str]:
    """The rooms of ``GET /events?room=a&room=b``: valid names, each once."""
    rooms = parse_qs(bytes(scope["query_string"]).decode("latin-1")).get("room", [])
    if not 1 <= len(rooms) <= MAX_ROOMS or len(set(rooms)) != len(rooms):
        raise HttpError(400, f"give 1-{MAX_ROOMS} distinct rooms: /events?room=a&room=b")
    if not all(ROOM_NAME.fullmatch(room) for room in rooms):
        raise HttpError(400, "room names are 1-32 characters of a-z, 0-9, _ and -")
    return rooms


def allow(method: str, *methods: str) -> None:
    if method not in methods:
        raise HttpError(405, "method not allowed", [(b"allow", ", ".join(methods).encode())])


async def read_body(scope: Scope, receive: Receive) -> bytes:
    """The request body, refused with 413 past ``MAX_BODY`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise HttpError(413, f"the body is limited to {MAX_BODY} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise HttpError(413, f"the body is limited to {MAX_BODY} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def parse_message(body: bytes) -> tuple[str, str]:
    """``(user, text)`` from a JSON body, or a 400."""
    try:
        value = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        raise HttpError(400, "the body must be JSON") from None
    if not isinstance(value, dict):
        raise HttpError(400, 'the body must be a JSON object {"user": ..., "text": ...}')
    user, text = value.get("user"), value.get("text")
    if not isinstance(user, str) or not isinstance(text, str):
        raise HttpError(400, '"user" and "text" must be strings')
    user = user.strip()
    if not 1 <= len(user) <= MAX_USER:
        raise HttpError(400, f'"user" must be 1-{MAX_USER} characters')
    if not text.strip() or len(text) > MAX_TEXT:
        raise HttpError(400, f'"text" must be 1-{MAX_TEXT} characters, not blank')
    try:
        # JSON can carry lone surrogates ("\ud800"), which are not text.
        user.encode("utf-8")
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(400, "the body must be valid Unicode") from None
    return user, text


async def respond(
    scope: Scope,
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """A complete, non-streaming response (the headers only for HEAD)."""
    head: list[tuple[bytes, bytes]] = []
    if content_type is not None:
        head.append((b"content-type", content_type))
    if status != 204:
        head.append((b"content-length", str(len(body)).encode()))
    head.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Multi-room SSE chat (broadcaster.py demo).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument(
        "--linger",
        type=float,
        default=LINGER,
        help=f"seconds a room's history outlives its last client (default {LINGER:g})",
    )
    parser.add_argument("--max-streams", type=int, default=MAX_STREAMS, help="open streams at most")
    parser.add_argument("--max-rooms", type=int, default=MAX_KEYS, help="rooms at most")
    args = parser.parse_args(argv)
    chat = Chat(linger=args.linger, max_streams=args.max_streams, max_rooms=args.max_rooms)
    # The socket is bound here, so that the URL printed is the one listening
    # (with --port 0, the port the system chose); uvicorn serves on it.
    try:
        sock = socket.create_server(("127.0.0.1", args.port))
    except OSError as exc:
        parser.exit(1, f"chat: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}\n")
    with sock, contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its shutdown
        host, port = sock.getsockname()[:2]
        print(f"chat running on http://{host}:{port}/ - open it in two browser tabs", flush=True)
        uvicorn.Server(uvicorn.Config(chat, log_level="info")).run(sockets=[sock])


# A speech bubble, as SVG (browsers take an SVG icon at any path).
FAVICON: Final = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<path d="M2 2h12v9H7l-3 3v-3H2z" fill="#2a7"/></svg>'
)

PAGE: Final = b"""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>broadcaster.py chat</title>
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
  :root {
    color-scheme: light dark;
    --bg: #fff; --fg: #1d2025; --muted: #667080; --panel: #f5f6f8; --line: #e1e4e8;
    --hover: #eaecef; --active: #dff1e8; --accent: #17784f; --on-accent: #fff;
    --own: #d9f2e5; --other: #eef0f3; --ok: #1f9d55; --danger: #b42318; --danger-bg: #fdecea;
    --warn: #7a4d00; --warn-bg: #fff3d1; --name-light: 38%;
    font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  }
  @media (prefers-color-scheme: dark) {
    :root {
      --bg: #16181c; --fg: #e5e7eb; --muted: #9299a5; --panel: #1c1f24; --line: #2d3138;
      --hover: #262a31; --active: #1b3a2c; --accent: #34b47c; --on-accent: #08170f;
      --own: #1d4232; --other: #262a31; --ok: #34c77b; --danger: #ff8c82; --danger-bg: #3b1d1b;
      --warn: #ffd27a; --warn-bg: #362b12; --name-light: 72%;
    }
  }
  * { box-sizing: border-box; }
  body { margin: 0; height: 100vh; height: 100dvh; background: var(--bg); color: var(--fg); display: grid;
         grid-template: "head head" auto "nav main" minmax(0, 1fr) / 18rem minmax(0, 1fr); }
  button, input { font: inherit; color: inherit; }
  input { min-width: 0; padding: .45rem .7rem; border: 1px solid var(--line); border-radius: .5rem;
          background: var(--bg); }
  input:focus { outline: 2px solid var(--accent); outline-offset: -1px; }
  button { cursor: pointer; }
  .primary { padding: .45rem 1rem; border: 0; border-radius: .5rem; background: var(--accent);
             color: var(--on-accent); font-weight: 600; }
  .secondary { padding: .45rem .8rem; border: 1px solid var(--line); border-radius: .5rem; background: var(--bg); }
  .secondary:hover { background: var(--hover); }

  header { grid-area: head; display: flex; align-items: center; gap: 1rem; padding: .6rem 1rem;
           border-bottom: 1px solid var(--line); }
  header h1 { display: flex; align-items: center; gap: .5rem; margin: 0; font-size: 1rem; white-space: nowrap; }
  header h1 svg { width: 1.3rem; height: 1.3rem; flex: none; color: var(--accent); }
  header h1 span { color: var(--muted); font-weight: 400; }
  #me { display: flex; align-items: center; gap: .5rem; margin-left: auto; color: var(--muted); font-size: .875rem; }
  #user { width: 9rem; color: var(--fg); padding: .3rem .6rem; }
  #status { display: inline-flex; align-items: center; gap: .4rem; padding: .2rem .65rem; white-space: nowrap;
            border: 1px solid var(--line); border-radius: 999px; color: var(--muted); font-size: .8rem; }
  #status::before { content: ""; width: .5rem; height: .5rem; border-radius: 50%; background: #d89b00; }
  #status.ok::before { background: var(--ok); }
  #status.down::before { background: var(--danger); }

  nav { grid-area: nav; display: flex; flex-direction: column; gap: .75rem; min-height: 0; padding: .75rem;
        overflow-y: auto; background: var(--panel); border-right: 1px solid var(--line); }
  nav h2 { margin: .25rem .6rem 0; color: var(--muted); font-size: .75rem; letter-spacing: .06em;
           text-transform: uppercase; }
  #rooms { display: flex; flex-direction: column; gap: 2px; }
  .room { display: flex; align-items: center; min-width: 0; border-radius: .5rem; }
  .room:hover { background: var(--hover); }
  .room.active { background: var(--active); }
  .room .open { flex: 1; display: flex; align-items: center; gap: .5rem; min-width: 0;
                padding: .45rem .3rem .45rem .65rem; border: 0; background: none; text-align: left; }
  .room .name { flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .room.active .name { font-weight: 600; }
  .room .count { flex: none; display: flex; align-items: center; gap: .4rem; white-space: nowrap;
                 color: var(--muted); font-size: .78rem; }
  .room .badge { padding: 0 .45rem; border-radius: 999px; background: var(--accent); color: var(--on-accent);
                 font-weight: 700; line-height: 1.5; }
  .room .badge:empty { display: none; }
  .room .leave { flex: none; width: 1.75rem; height: 1.75rem; margin-right: .25rem; padding: 0; border: 0;
                 border-radius: .375rem; background: none; color: var(--muted); font-size: 1.1rem; line-height: 1; }
  .room .leave:hover { background: var(--hover); color: var(--fg); }
  @media (hover: hover) {
    .room .leave { opacity: 0; }
    .room:hover .leave, .room.active .leave, .room .leave:focus-visible { opacity: 1; }
  }
  #join { display: flex; gap: .4rem; }
  #join input { flex: 1; }
  nav .hint { margin: auto .6rem .25rem; color: var(--muted); font-size: .8rem; }

  main { grid-area: main; display: flex; flex-direction: column; min-width: 0; min-height: 0; }
  #title { display: flex; align-items: baseline; gap: .75rem; min-width: 0; padding: .7rem 1.25rem;
           border-bottom: 1px solid var(--line); }
  #title h2 { margin: 0; overflow: hidden; font-size: 1.05rem; text-overflow: ellipsis; white-space: nowrap; }
  #title span { flex: none; color: var(--muted); font-size: .85rem; }
  #banner { margin: .75rem 1.25rem 0; padding: .5rem .8rem; border-radius: .5rem; background: var(--warn-bg);
            color: var(--warn); font-size: .875rem; }
  #banner.down { background: var(--danger-bg); color: var(--danger); }
  .log { flex: 1; display: flex; flex-direction: column; gap: .5rem; min-height: 0; margin: 0;
         padding: 1rem 1.25rem; overflow-y: auto; list-style: none; }
  .log[hidden] { display: none; }
  .log:empty::before { content: "No messages here yet. Say hello!"; margin: auto; color: var(--muted); }
  .msg { align-self: flex-start; max-width: min(38rem, 80%); padding: .35rem .75rem .4rem;
         border-radius: 1rem 1rem 1rem .3rem; background: var(--other); }
  .msg.own { align-self: flex-end; border-radius: 1rem 1rem .3rem 1rem; background: var(--own); }
  .msg.cont { margin-top: -.3rem; }  /* the same sender again: one group, named once */
  .msg.cont .meta { display: none; }
  .msg .meta { display: flex; gap: .5rem; font-size: .78rem; }
  .msg .user { overflow: hidden; color: hsl(var(--hue) 55% var(--name-light)); font-weight: 700;
               text-overflow: ellipsis; white-space: nowrap; }
  .msg .you { color: var(--accent); font-weight: 700; }
  .msg.own .user, .msg:not(.own) .you { display: none; }
  .msg .time { float: right; margin: .3rem -.15rem -.15rem .75rem; color: var(--muted); font-size: .75rem;
               font-variant-numeric: tabular-nums; }
  .msg .text { white-space: pre-wrap; overflow-wrap: anywhere; }
  .note, .day { align-self: center; max-width: 90%; color: var(--muted); font-size: .8rem; text-align: center; }
  .day { margin-top: .25rem; font-weight: 600; }
  .note.gap { padding: .45rem .8rem; border-radius: .5rem; background: var(--warn-bg); color: var(--warn); }
  #error { margin: 0 1.25rem .5rem; padding: .5rem .8rem; border-radius: .5rem; background: var(--danger-bg);
           color: var(--danger); font-size: .875rem; }
  #error:empty { display: none; }
  #send { display: flex; gap: .5rem; padding: .75rem 1.25rem 1rem; border-top: 1px solid var(--line); }
  #text { flex: 1; }

  @media (max-width: 700px) {
    body { grid-template: "head" auto "nav" auto "main" minmax(0, 1fr) / minmax(0, 1fr); }
    header { gap: .6rem; padding: .5rem .75rem; }
    #status { width: 1.6rem; height: 1.6rem; padding: 0; justify-content: center; font-size: 0; }
    #me > span { display: none; }
    #user { width: 6.5rem; }
    nav { flex-direction: row; align-items: center; gap: .5rem; padding: .5rem .75rem; overflow: visible;
          border-right: 0; border-bottom: 1px solid var(--line); }
    nav h2 { display: none; }
    #rooms { flex: 1; flex-direction: row; gap: .35rem; min-width: 0; overflow-x: auto; scrollbar-width: none; }
    #rooms.more-after { mask-image: linear-gradient(to right, #000 calc(100% - 2rem), transparent); }
    #rooms.more-before { mask-image: linear-gradient(to left, #000 calc(100% - 2rem), transparent); }
    #rooms.more-before.more-after {
      mask-image: linear-gradient(to right, transparent, #000 2rem, #000 calc(100% - 2rem), transparent); }
    .room { flex: none; max-width: 11rem; border: 1px solid var(--line); border-radius: 999px; }
    .room.active { border-color: transparent; }
    .room .open { padding: .25rem .15rem .25rem .7rem; }
    .room .here { display: none; }
    .room .leave { width: 1.5rem; height: 1.5rem; margin-right: .15rem; border-radius: 999px; }
    .room:not(.active) .leave { display: none; }
    .room:not(.active) .open { padding-right: .7rem; }
    #join { flex: none; width: 7.5rem; }
    #join input { padding: .3rem .6rem; font-size: .875rem; }
    #join button, nav .hint { display: none; }  /* the keyboard's Go joins */
    #title { display: none; }
    #banner { margin: .5rem .75rem 0; }
    .log { padding: .75rem; }
    .msg { max-width: 88%; }
    #error { margin: 0 .75rem .5rem; }
    #send { padding: .6rem .75rem .75rem; }
  }
</style>
</head>
<body>
<header>
  <h1><svg viewBox="0 0 16 16" aria-hidden="true"><path d="M2 2h12v9H7l-3 3v-3H2z" fill="currentColor"/></svg>
    broadcaster.py <span>chat</span></h1>
  <span id="status">connecting&hellip;</span>
  <label id="me"><span>You are</span> <input id="user" maxlength="32" autocomplete="nickname"
         aria-label="your name"></label>
</header>
<nav>
  <h2>Rooms</h2>
  <div id="rooms"></div>
  <form id="join">
    <input id="room" placeholder="join a room" maxlength="32" pattern="[A-Za-z0-9_\\-]{1,32}"
           title="1-32 letters, digits, _ and - (in lower case)" aria-label="room to join"
           enterkeyhint="go" required>
    <button class="secondary">join</button>
  </form>
  <p class="hint">Open this page in another tab or browser: messages and presence arrive live, over one
    Server-Sent Events stream.</p>
</nav>
<main>
  <div id="title"><h2 id="title-name"></h2><span id="title-here"></span></div>
  <div id="banner" role="status" hidden></div>
  <div id="logs" style="display: contents"></div>
  <div id="error" role="alert"></div>
  <form id="send">
    <input id="text" maxlength="2000" autocomplete="off" placeholder="message" aria-label="message" required>
    <button class="primary">send</button>
  </form>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const ROOM = /^[a-z0-9_-]{1,32}$/;
const rooms = new Map();  // name -> the room object made in join()
let current = null;
// One EventSource for every room joined, remade when the list changes.
let source = null;
// The id of the last message received: it names how far the page got in
// every room, so a new connection (after a join or a leave) resumes them all.
let lastId = null;
let live = false;
// The connection failed and has not been open since (remaking it for a join
// or a leave is no failure): the page says it is reconnecting.
let dropped = false;
// What the error shown is about ("send", "load", "join"): a reconnection
// clears the errors it made stale.
let errorKind = "";

// The name: kept in localStorage once typed; a guest name lasts as long as the tab.
const user = $("user");
const guest = sessionStorage.getItem("chat.guest") || "guest" + Math.floor(Math.random() * 1000);
sessionStorage.setItem("chat.guest", guest);
user.value = localStorage.getItem("chat.user") || guest;
const me = () => user.value.trim();
user.addEventListener("change", () => {
  localStorage.setItem("chat.user", me());
  for (const li of document.querySelectorAll(".log .msg")) li.classList.toggle("own", li.dataset.user === me());
});

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // textContent: user text is never parsed as HTML
  return node;
}

const pad = (n) => String(n).padStart(2, "0");
const clock = (date) => pad(date.getHours()) + ":" + pad(date.getMinutes());  // local HH:MM
const dayOf = (date) => date.toDateString();
function dayLabel(date) {
  const yesterday = new Date();
  yesterday.setDate(yesterday.getDate() - 1);
  if (dayOf(date) === dayOf(new Date())) return "Today";
  if (dayOf(date) === dayOf(yesterday)) return "Yesterday";
  return date.toLocaleDateString(undefined, { weekday: "long", year: "numeric", month: "long", day: "numeric" });
}
// Each name gets a color of its own (one of ten hues), the same on every page.
const HUES = [0, 25, 45, 140, 170, 195, 215, 255, 285, 320];
function hue(name) {
  let h = 2166136261;  // FNV-1a
  for (const c of name) h = Math.imul(h ^ c.codePointAt(0), 16777619) >>> 0;
  return HUES[h % HUES.length];
}

function showError(text, kind = "") { $("error").textContent = text; errorKind = text ? kind : ""; }
function clearError(...kinds) { if (kinds.includes(errorKind)) showError(""); }

function updateStatus() {
  const state = source ? source.readyState : EventSource.CLOSED;
  const status = $("status");
  const banner = $("banner");
  banner.hidden = true;
  banner.className = "";
  if (state === EventSource.OPEN) {
    status.textContent = "connected"; status.className = "ok";
  } else if (state === EventSource.CONNECTING) {
    status.textContent = dropped ? "reconnecting\\u2026" : "connecting\\u2026"; status.className = "";
    if (dropped) {
      banner.replaceChildren(el("strong", "", "Reconnecting\\u2026"), " The connection to the server was lost;"
        + " messages will catch up as soon as it is back.");
      banner.hidden = false;
    }
  } else {
    status.textContent = rooms.size ? "disconnected" : "no room joined"; status.className = "down";
    if (rooms.size) {
      banner.replaceChildren(el("strong", "", "Disconnected."), " Reload the page to try again.");
      banner.className = "down"; banner.hidden = false;
    }
  }
  status.title = "connection: " + status.textContent;
}

// The phone layout's room strip scrolls sideways: its edges fade where it has more.
function edges() {
  const strip = $("rooms");
  strip.classList.toggle("more-before", strip.scrollLeft > 1);
  strip.classList.toggle("more-after", strip.scrollLeft + strip.clientWidth < strip.scrollWidth - 1);
}
$("rooms").addEventListener("scroll", edges);
window.addEventListener("resize", edges);

function renderRoom(room) {
  room.row.querySelector(".badge").textContent = room.unread ? room.unread + " new" : "";
  room.row.querySelector(".here").textContent = room.count + " here";
  if (room.name === current) $("title-here").textContent = room.count + " here";
  edges();
}

function add(room, node) {
  const log = room.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(node);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

// Shows a message unless it was shown already: messages carry their number
// in the room, n, and arrive in that order, from the history and live alike.
// "at" is when the server took the message (Unix ms): shown as local time.
function show(name, room, msg, live) {
  if (msg.n <= room.last) return;
  room.last = msg.n;
  const at = typeof msg.at === "number" ? new Date(msg.at) : null;
  if (at) {
    const day = dayOf(at);  // a divider where the day changes (none before today's first message)
    if (day !== room.day && (room.day !== null || day !== dayOf(new Date()))) add(room, el("li", "day", dayLabel(at)));
    room.day = day;
  }
  const li = el("li", "msg");
  li.dataset.n = msg.n;
  li.dataset.user = msg.user;
  li.dataset.at = at ? msg.at : "";
  li.classList.toggle("own", msg.user === me());
  // Grouped with the message before it: the same sender, within 5 minutes.
  const before = room.log.lastElementChild;
  li.classList.toggle("cont", Boolean(at && before && before.matches(".msg") && before.dataset.user === msg.user
    && before.dataset.at && msg.at - before.dataset.at < 5 * 60 * 1000));
  li.style.setProperty("--hue", hue(msg.user));
  const meta = el("div", "meta");
  meta.append(el("span", "user", msg.user), el("span", "you", "You"));
  li.append(meta, el("span", "text", msg.text));
  if (at) {
    const time = el("time", "time", clock(at));
    time.dateTime = at.toISOString();
    time.title = at.toLocaleString();
    li.append(time);
  }
  add(room, li);
  if (live && name !== current) { room.unread += 1; renderRoom(room); }
}

// The server sends "reload" first on every connection that is not an exact
// resume from Last-Event-ID: the first one, and one after a gap (the server
// restarted, or the room's history expired, or it lacks what we missed). The
// stream is already subscribed when it arrives, so loading the history now and
// holding back the live messages until it is shown misses nothing, and
// show() drops what both contain. A reload after a gap says so in the room.
async function load(name, room) {
  const generation = ++room.generation;
  const again = room.loaded;
  room.pending = [];
  for (;;) {
    try {
      const response = await fetch("/rooms/" + name + "/history");
      if (!response.ok) throw new Error(response.status + " " + response.statusText);
      const body = await response.json();
      if (generation !== room.generation) return;  // a newer reload took over
      room.log.replaceChildren();
      room.last = 0;
      room.day = null;
      room.dropNote = null;
      room.unread = 0;  // what was counted is gone, or shown again from the history
      for (const msg of body.messages) show(name, room, msg, false);
      if (again) {
        add(room, el("li", "note gap", "Reconnected \\u2014 the stream could not resume here, so the"
          + " room was reloaded: messages older than its recent history are not shown."));
      }
      const pending = room.pending;
      room.pending = null;
      for (const msg of pending) show(name, room, msg, true);
      room.loaded = true;
      renderRoom(room);
      clearError("load");
      return;
    } catch (err) {
      if (generation !== room.generation) return;
      showError("Could not load #" + name + ": " + err.message, "load");
      await new Promise((resolve) => setTimeout(resolve, 2000));
      if (generation !== room.generation) return;
    }
  }
}

// (Re)connects with the rooms joined: the rooms the page follows already
// resume from lastId; the server lists the others in a reload event.
function connect() {
  if (source) source.close();  // the server sees the disconnect and announces the new counts
  source = null;
  live = false;
  if (!rooms.size) { updateStatus(); return; }
  const query = new URLSearchParams([...rooms.keys()].map((name) => ["room", name]));
  if (lastId) query.set("last_event_id", lastId);
  const es = source = new EventSource("/events?" + query);
  for (const room of rooms.values()) room.source = es;
  es.addEventListener("open", () => {
    live = true;
    if (dropped) {
      dropped = false;
      const back = " \\u00b7 back at " + clock(new Date());
      for (const room of rooms.values()) {
        if (room.dropNote) room.dropNote.textContent = room.dropNote.textContent.replace(/, reconnecting.*/, back);
        room.dropNote = null;
      }
    }
    clearError("send", "load");  // stale now: the server is reachable again
    updateStatus();
  });
  es.addEventListener("error", () => {
    // Fired at the drop and at every failed retry: note the drop once.
    if (live) {
      const note = "Connection lost at " + clock(new Date()) + ", reconnecting\\u2026";
      for (const room of rooms.values()) { room.dropNote = el("li", "note", note); add(room, room.dropNote); }
    }
    live = false;
    dropped = true;
    updateStatus();
  });
  es.addEventListener("reload", (e) => {
    lastId = e.lastEventId;
    for (const name of JSON.parse(e.data)) if (rooms.has(name)) load(name, rooms.get(name));
  });
  es.addEventListener("message", (e) => {
    lastId = e.lastEventId;
    const msg = JSON.parse(e.data);
    const room = rooms.get(msg.room);
    if (!room) return;
    if (room.pending) room.pending.push(msg);
    else show(msg.room, room, msg, true);
  });
  es.addEventListener("presence", (e) => {
    const update = JSON.parse(e.data);
    const room = rooms.get(update.room);
    if (room) { room.count = update.count; renderRoom(room); }
  });
  updateStatus();
}

function join(name, reconnect = true) {
  if (rooms.has(name)) { select(name); return; }
  const row = el("div", "room");
  const open = el("button", "open");
  const count = el("span", "count");
  count.append(el("span", "badge"), el("span", "here"));
  open.append(el("span", "name", "#" + name), count);
  open.title = "#" + name;
  open.addEventListener("click", () => select(name));
  const leave = el("button", "leave", "\\u00d7");
  leave.title = "leave #" + name;
  leave.setAttribute("aria-label", leave.title);
  leave.addEventListener("click", () => part(name));
  row.append(open, leave);
  $("rooms").append(row);
  const log = el("ul", "log");
  log.hidden = true;
  $("logs").append(log);
  // last: n of the last message shown; pending: live messages held back
  // while the history loads (null otherwise); generation: counts loads;
  // loaded: a load completed; day: of the last message shown; dropNote:
  // the note of a drop, until the connection is back; source: the
  // connection, shared by every room.
  const room = {
    name, source, row, log, count: 0, unread: 0, last: 0, pending: null, generation: 0, loaded: false,
    day: null, dropNote: null,
  };
  rooms.set(name, room);
  renderRoom(room);
  select(name);
  if (reconnect) connect();
}

function part(name) {
  const room = rooms.get(name);
  room.generation += 1;  // a load in progress stops
  room.row.remove(); room.log.remove();
  rooms.delete(name);
  if (current === name) select(rooms.size ? rooms.keys().next().value : null);
  edges();
  connect();
}

function select(name) {
  current = name;
  for (const [n, room] of rooms) {
    const active = n === name;
    room.row.classList.toggle("active", active);
    room.log.hidden = !active;
    if (!active) continue;
    room.unread = 0;
    renderRoom(room);
    room.log.scrollTop = room.log.scrollHeight;
    room.row.scrollIntoView({ block: "nearest", inline: "center" });  // (in the phone layout's strip)
  }
  $("title-name").textContent = name ? "#" + name : "No room joined";
  if (!name) $("title-here").textContent = "join one to start chatting";
  $("text").placeholder = name ? "Message #" + name : "Join a room first";
}

$("join").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("room").value.trim().toLowerCase();
  if (!ROOM.test(name)) { showError("Room names are 1-32 characters: a-z, 0-9, _ and -", "join"); return; }
  $("room").value = "";
  showError("");
  join(name);
});

$("send").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("text").value;
  if (!current || !text.trim()) return;
  try {
    const response = await fetch("/rooms/" + current + "/messages", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: me(), text }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || response.status + " " + response.statusText);
    }
    if ($("text").value === text) $("text").value = "";  // (unless typed over meanwhile)
    showError("");
  } catch (err) {
    // fetch() rejects with a TypeError when the server cannot be reached.
    const why = err instanceof TypeError ? "the server cannot be reached (" + err.message + ")" : err.message;
    showError("Not sent: " + why + ". Your message is still in the box.", "send");
  }
});

join("general", false);
join("random", false);
select("general");
connect();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    main()
