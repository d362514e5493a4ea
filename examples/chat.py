"""A multi-room chat over Server-Sent Events: the main demo of ``broadcaster.py``.

Run it from a checkout (the only dependency is uvicorn: ``pip install uvicorn``,
or ``pip install -e '.[examples]'``)::

    python examples/chat.py            # http://127.0.0.1:8000/
    python examples/chat.py --port 0   # any free port; the printed URL says which

and open the printed URL in two browser tabs.

What it demonstrates, in a plain ASGI app (no framework):

* one ``Broadcaster[str, Event]`` keyed by room: ``POST /rooms/{room}/messages``
  sends to the room, ``GET /rooms/{room}/events`` is ``b.response(...)``;
* resuming with ``Last-Event-ID``: every message has an ``id`` (a per-room
  counter) and the last 100 messages of each room are kept, so a browser that
  reconnects gets what it missed, in the race-free order ``subscribe`` -> load
  the missed messages -> ``replay(missed, stream)``;
* presence: each connection announces the room's ``subscriber_count`` when it
  joins and when it leaves, from a small wrapper around its event source (the
  response always closes its source, so the wrapper's ``aclose`` is the place);
* graceful shutdown under uvicorn: Ctrl-C or SIGTERM ends every open stream
  with a clean end of body, so the server exits at once (see ``ChatServer``).

HTTP API (``{room}`` matches ``[a-z0-9_-]{1,32}``, else 400):

* ``GET /``                        the page (inline CSS and JS, no build step)
* ``GET /rooms/{room}/events``     the room as ``text/event-stream``: ``message``
  events (JSON ``{"room", "user", "text"}``, with an ``id``) and ``presence``
  events (JSON ``{"room", "count"}``, no ``id``)
* ``POST /rooms/{room}/messages``  JSON ``{"user": str, "text": str}`` (user 1-32
  characters, text 1-2000, body at most 16 KiB) -> 204; 400 on bad input, 413
  on a larger body
* ``GET /rooms/{room}/stats``      JSON ``{"room", "subscribers", "channels"}``
  (``subscriber_count(room)`` and ``len(broadcaster)``: watch cleanup happen)

Other paths get 404 and other methods 405. Exit status, as with the ``uvicorn``
command: 0 after Ctrl-C; after SIGTERM uvicorn shuts down gracefully and then
re-raises the signal, so the process ends killed by SIGTERM (143 in a shell,
-15 from ``subprocess``).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, Final, Protocol

import uvicorn

# The example imports the repository's own broadcaster.py, so it runs from a
# checkout without installing anything: `python examples/chat.py` puts
# examples/ (not the repository root) on sys.path, hence this line. It goes
# first, so the checkout wins over an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broadcaster import Broadcaster, Event, SseConfig, last_event_id, replay  # noqa: E402

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
HISTORY: Final = 100


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
    """What the chat keeps of a room: the id counter and the recent messages."""

    __slots__ = ("last_id", "history")

    def __init__(self) -> None:
        self.last_id = 0
        self.history: deque[tuple[int, Event]] = deque(maxlen=HISTORY)

    def since(self, after: int) -> list[Event]:
        """The retained messages with an id above ``after``, oldest first."""
        if after > self.last_id:
            # An id from before a server restart (ids start again at 1): the
            # client has seen none of this run's messages.
            after = 0
        return [event for id_, event in self.history if id_ > after]


class Events(Protocol):
    """An async iterator of events that can be closed, as ``replay()`` returns."""

    def __anext__(self) -> Awaitable[Event]: ...
    def aclose(self) -> Awaitable[None]: ...


class Presence:
    """The event source of one connection to a room, announcing presence.

    Made right after subscribing, it announces the room's new subscriber count
    (the client sees its own join); its ``aclose()`` closes the stream and then
    announces the count without it. ``Broadcaster.response`` closes its source
    on every way out (end of stream, client gone, server shutdown, HEAD), so
    this is a reliable "finally". It is an object, not an async generator,
    because a generator's ``finally`` never runs if iteration never started.
    """

    __slots__ = ("_chat", "_room", "_events", "_closed")

    def __init__(self, chat: Chat, room: str, events: Events) -> None:
        self._chat = chat
        self._room = room
        self._events = events
        self._closed = False
        chat.announce(room)

    def __aiter__(self) -> Presence:
        return self

    async def __anext__(self) -> Event:
        return await anext(self._events)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._events.aclose()  # closes the BroadcastStream: it leaves the room now
        self._chat.announce(self._room)


class Chat:
    """The ASGI app: routes by path and method to a handful of handlers."""

    def __init__(self) -> None:
        # keep_alive: a comment every 15 s of silence keeps proxies from
        # closing idle streams; retry: browsers reconnect 2 s after a drop.
        # buffer: a client 64 messages behind is ended (Lagged); its browser
        # reconnects and gets the gap from the history.
        self.broadcaster: Broadcaster[str, Event] = Broadcaster(
            buffer=64, config=SseConfig(keep_alive=15, retry=2000)
        )
        # Rooms live as long as the process; a real app would expire idle ones.
        self.rooms: dict[str, Room] = {}

    def announce(self, room: str) -> None:
        count = self.broadcaster.subscriber_count(room)
        self.broadcaster.send(room, Event.json({"room": room, "count": count}, event="presence"))

    def close(self) -> None:
        """End every open stream (each one drains, then ends cleanly)."""
        self.broadcaster.close()

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
                # uvicorn sends this only after every response has finished,
                # so closing here alone would come too late to end the streams
                # (see ChatServer); here it is a harmless second close.
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
        parts = path.split("/")
        if len(parts) != 4 or parts[:2] != ["", "rooms"] or parts[3] not in ("events", "messages", "stats"):
            raise HttpError(404, "not found")
        room, action = parts[2], parts[3]
        if not ROOM_NAME.fullmatch(room):
            raise HttpError(400, "room names are 1-32 characters of a-z, 0-9, _ and -")
        if action == "events":
            allow(method, "GET", "HEAD")
            await self.events(scope, receive, send, room)
        elif action == "messages":
            allow(method, "POST")
            await self.post(scope, receive, send, room)
        else:
            allow(method, "GET", "HEAD")
            stats = {"room": room, "subscribers": self.broadcaster.subscriber_count(room), "channels": len(self.broadcaster)}
            await respond(scope, send, 200, json.dumps(stats).encode(), b"application/json")

    async def events(self, scope: Scope, receive: Receive, send: Send, room: str) -> None:
        b = self.broadcaster
        if scope["method"] == "HEAD":
            # Headers only: no subscription, so no presence flicker.
            nothing: tuple[Event, ...] = ()
            await b.response(replay(nothing))(scope, receive, send)
            return
        # The race-free order: subscribe first, then load what the client
        # missed, then replay it ahead of the live stream. (Loading first would
        # lose a message sent in between; here nothing can even be sent in
        # between, since there is no await, so nothing arrives twice either.)
        stream = b.subscribe(room)
        missed: list[Event] = []
        after = parse_id(last_event_id(scope))
        if after is not None and room in self.rooms:
            missed = self.rooms[room].since(after)
        events = replay(missed, stream)
        await b.response(Presence(self, room, events))(scope, receive, send)

    async def post(self, scope: Scope, receive: Receive, send: Send, room: str) -> None:
        user, text = parse_message(await read_body(scope, receive))
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = Room()
        state.last_id += 1
        event = Event.json({"room": room, "user": user, "text": text}, event="message", id=str(state.last_id))
        state.history.append((state.last_id, event))
        self.broadcaster.send(room, event)
        await respond(scope, send, 204)


def allow(method: str, *methods: str) -> None:
    if method not in methods:
        raise HttpError(405, "method not allowed", [(b"allow", ", ".join(methods).encode())])


def parse_id(value: str | None) -> int | None:
    """A Last-Event-ID of ours (a decimal message id), or None."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


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


class ChatServer(uvicorn.Server):
    """uvicorn's server, ending the chat's streams when it starts shutting down.

    On SIGINT/SIGTERM uvicorn stops listening, asks every connection to close
    once its response is complete, and then waits for the responses, forever
    by default: an SSE response is never complete by itself. The ASGI
    ``lifespan.shutdown`` event comes only after that wait, so it cannot help.
    ``shutdown()`` is where uvicorn starts its shutdown (whatever set
    ``should_exit``), on the event loop: closing the broadcaster there ends
    every stream, each response writes its final empty chunk, the connections
    close and uvicorn exits within a few hundred milliseconds. Overriding this
    public method needs no patching and no watcher task, and unlike
    ``handle_exit`` (a signal handler) it runs as ordinary loop code, where
    taking the broadcaster's lock is safe. (``timeout_graceful_shutdown``
    would instead cancel the responses, cutting the bodies off, with an error
    in the log.)
    """

    def __init__(self, config: uvicorn.Config, chat: Chat) -> None:
        super().__init__(config)
        self.chat = chat

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"chat running on http://{host}:{port}/ - open it in two browser tabs", flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.chat.close()
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Multi-room SSE chat (broadcaster.py demo).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    chat = Chat()
    config = uvicorn.Config(chat, host="127.0.0.1", port=args.port, log_level="info")
    try:
        ChatServer(config, chat).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass


PAGE: Final = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>broadcaster.py chat</title>
<style>
  :root { font: 15px/1.45 system-ui, sans-serif; color-scheme: light dark; --line: #8885; }
  body { margin: 0; height: 100vh; display: grid;
         grid-template: "head head" auto "nav main" 1fr / 15rem 1fr; }
  header { grid-area: head; display: flex; gap: 1.5rem; align-items: center;
           padding: .5rem 1rem; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1rem; margin: 0; }
  #status::before { content: "\\25cf  "; color: #c80; }
  #status.ok::before { color: #2a2; }
  #status.down::before { color: #d33; }
  nav { grid-area: nav; padding: .5rem; border-right: 1px solid var(--line); overflow: auto; }
  .room { display: flex; align-items: center; gap: .25rem; margin-bottom: .25rem; }
  .room .open { flex: 1; display: flex; justify-content: space-between; text-align: left;
                font: inherit; padding: .3rem .5rem; border: 0; border-radius: .3rem;
                background: none; cursor: pointer; }
  .room.active .open { background: var(--line); font-weight: 600; }
  .room .count { opacity: .7; font-size: .85em; }
  .room .unread { color: #d33; font-weight: 600; }
  .room .leave { border: 0; background: none; cursor: pointer; opacity: .5; }
  #join { display: flex; gap: .25rem; margin-top: .75rem; }
  #join input { min-width: 0; flex: 1; }
  main { grid-area: main; display: flex; flex-direction: column; min-height: 0; }
  .log { flex: 1; margin: 0; padding: .5rem 1rem; list-style: none; overflow-y: auto; }
  .log li { padding: .1rem 0; }
  .log .user { font-weight: 600; margin-right: .5em; }
  .log .text { white-space: pre-wrap; overflow-wrap: anywhere; }
  .log .note { opacity: .6; font-style: italic; }
  #send { display: flex; gap: .5rem; padding: .5rem 1rem; border-top: 1px solid var(--line); }
  #text { flex: 1; }
  #error { color: #d33; padding: 0 1rem .5rem; min-height: 1.2em; }
</style>
</head>
<body>
<header>
  <h1>broadcaster.py chat</h1>
  <label>name <input id="user" maxlength="32" size="12"></label>
  <span id="status">connecting</span>
</header>
<nav>
  <div id="rooms"></div>
  <form id="join">
    <input id="room" placeholder="join a room" maxlength="32" pattern="[a-z0-9_\\-]{1,32}"
           title="1-32 of a-z, 0-9, _ and -" required>
    <button>join</button>
  </form>
</nav>
<main>
  <div id="logs" style="display: contents"></div>
  <form id="send">
    <input id="text" maxlength="2000" autocomplete="off" placeholder="message" required>
    <button>send</button>
  </form>
  <div id="error" role="alert"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const ROOM = /^[a-z0-9_-]{1,32}$/;
const rooms = new Map();  // name -> {source, row, log, count, unread, live}
let current = null;

const user = $("user");
user.value = localStorage.getItem("chat.user") || "guest" + Math.floor(Math.random() * 1000);
user.addEventListener("change", () => localStorage.setItem("chat.user", user.value.trim()));

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // textContent: user text is never parsed as HTML
  return node;
}

function updateStatus() {
  const states = [...rooms.values()].map((r) => r.source.readyState);
  const status = $("status");
  if (states.length && states.every((s) => s === EventSource.OPEN)) {
    status.textContent = "connected"; status.className = "ok";
  } else if (states.some((s) => s === EventSource.CONNECTING)) {
    status.textContent = "reconnecting\\u2026"; status.className = "";
  } else {
    status.textContent = states.length ? "disconnected" : "no room joined"; status.className = "down";
  }
}

function renderRoom(room) {
  room.row.querySelector(".count").textContent =
    (room.unread ? room.unread + " new \\u00b7 " : "") + room.count + " here";
  room.row.querySelector(".count").classList.toggle("unread", room.unread > 0);
}

function add(room, node) {
  const log = room.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(node);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function join(name) {
  if (rooms.has(name)) { select(name); return; }
  // "?last_event_id=0" asks for the room's recent history on the first
  // connection. On every reconnection the browser sends a Last-Event-ID
  // header (the id of the last message seen), which the server prefers, and
  // replays only what was missed.
  const source = new EventSource("/rooms/" + name + "/events?last_event_id=0");
  const row = el("div", "room");
  const open = el("button", "open");
  open.append(el("span", "", "#" + name), el("span", "count", ""));
  open.addEventListener("click", () => select(name));
  const leave = el("button", "leave", "\\u00d7");
  leave.title = "leave #" + name;
  leave.addEventListener("click", () => part(name));
  row.append(open, leave);
  $("rooms").append(row);
  const log = el("ul", "log");
  log.hidden = true;
  $("logs").append(log);
  const room = { source, row, log, count: 0, unread: 0, live: false };
  rooms.set(name, room);

  source.addEventListener("open", () => { room.live = true; updateStatus(); });
  source.addEventListener("error", () => {
    // Fired at the drop and at every failed retry: note the drop once.
    if (room.live) add(room, el("li", "note", "connection lost, reconnecting\\u2026"));
    room.live = false;
    updateStatus();
  });
  source.addEventListener("message", (e) => {
    const msg = JSON.parse(e.data);
    const li = el("li");
    li.title = "#" + e.lastEventId;
    li.append(el("span", "user", msg.user + ":"), el("span", "text", msg.text));
    add(room, li);
    if (name !== current) { room.unread += 1; renderRoom(room); }
  });
  source.addEventListener("presence", (e) => {
    room.count = JSON.parse(e.data).count;
    renderRoom(room);
  });
  renderRoom(room);
  select(name);
  updateStatus();
}

function part(name) {
  const room = rooms.get(name);
  room.source.close();  // the server sees the disconnect and announces the new count
  room.row.remove(); room.log.remove();
  rooms.delete(name);
  if (current === name) select(rooms.size ? rooms.keys().next().value : null);
  updateStatus();
}

function select(name) {
  current = name;
  for (const [n, room] of rooms) {
    const active = n === name;
    room.row.classList.toggle("active", active);
    room.log.hidden = !active;
    if (active) { room.unread = 0; renderRoom(room); room.log.scrollTop = room.log.scrollHeight; }
  }
  $("text").placeholder = name ? "message #" + name : "join a room first";
}

function showError(text) { $("error").textContent = text; }

$("join").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("room").value.trim().toLowerCase();
  if (!ROOM.test(name)) { showError("room names are 1-32 of a-z, 0-9, _ and -"); return; }
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
      body: JSON.stringify({ user: user.value.trim(), text }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || response.status + " " + response.statusText);
    }
    $("text").value = "";
    showError("");
  } catch (err) {
    showError("not sent: " + err.message);
  }
});

join("general");
join("random");
select("general");
</script>
</body>
</html>
""".encode()


if __name__ == "__main__":
    main()
