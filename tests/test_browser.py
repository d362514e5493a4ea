"""Real clients against real servers: headless Chromium and httpx-sse.

Every server is its own process on a free port of 127.0.0.1, stopped (SIGTERM,
then checked for a prompt exit and a clean log) at the end of the module:

* ``examples/chat.py``, driven in Chromium as a user would: two pages exchange
  messages typed into the page's form, see each other's presence, reload, and
  come back from an abrupt network reset (resumed from ``Last-Event-ID``) and
  from a gap (more missed than the history keeps: the page reloads the room,
  and says so); the page fits a desktop window and a phone's width, light and
  dark, and says when it is reconnecting. Screenshots of it go to pytest's
  ``tmp_path``, and to ``$SCREENSHOT_DIR`` too if set, for a human to look at;
* ``tests/sse_app.py``, a small app that sends prepared events to a key on
  request: the browser's ``EventSource`` receives events with multi-line data,
  unicode, empty data, leading spaces, custom names and ids exactly as sent;
  and, with history, a stream cut mid-flow (server-side ``remove()``, a clean
  server-side end, an abrupt TCP reset) while events keep being sent ends up,
  in Chromium and through httpx-sse with a manual reconnect alike, with every
  event exactly once and in order, the reconnection carrying ``Last-Event-ID``.

Chromium is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``),
driven by Playwright for Python (``pip install playwright``; its wheel ships the
driver, and ``playwright install`` is never needed). Without them, or without
httpx-sse, these tests skip with the reason, except under ``CI=true``, where
they fail: CI installs everything they need.

Abrupt resets go through ``Proxy``, a TCP proxy in a thread of the test that
closes both sides of every connection with ``SO_LINGER`` 0 (an RST, not a FIN),
and can refuse new connections for a while. Waits are bounded: Playwright's
``wait_for_function`` with a timeout for the page, socket timeouts for httpx,
and polling with a deadline only for what another process does.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import itertools
import json
import os
import queue
import selectors
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import _support
import pytest
from _support import HOST, OPENER

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "chat.py"
SSE_APP = Path(__file__).resolve().parent / "sse_app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    # No connections of Chromium's own: the network here is closed.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000  # the most any wait in a page may take
TIMEOUT = 10.0  # the same for everything else
IN_CI = os.environ.get("CI") == "true"


def require(missing: str | None) -> None:
    """Skip with the reason what is missing; under CI=true fail instead."""
    if missing is None:
        return
    if IN_CI:
        pytest.fail(f"{missing} (CI=true, where nothing may skip)")
    pytest.skip(missing)


def missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "needs Playwright for Python: pip install playwright (the tests drive Debian's chromium)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"needs Chromium at {CHROMIUM}: apt-get install chromium"
    return None


def missing_httpx_sse() -> str | None:
    if importlib.util.find_spec("httpx") is None or importlib.util.find_spec("httpx_sse") is None:
        return "needs httpx and httpx-sse: pip install httpx httpx-sse"
    return None


# ---------------------------------------------------------------------------
# Servers, requests, the proxy
# ---------------------------------------------------------------------------


class Server(_support.Process):
    """A Python script serving on a free port, as a subprocess: it prints
    ``<banner> http://127.0.0.1:PORT/`` once it listens. After SIGTERM it must
    exit within 5 s, and have logged no error."""

    def __init__(self, script: Path, banner: str) -> None:
        require(None if importlib.util.find_spec("uvicorn") else "the servers need uvicorn: pip install uvicorn")
        super().__init__([sys.executable, str(script), "--port", "0"], ROOT, banner, exit_code=None)
        self.url = f"http://{HOST}:{self.port}"


def call(url: str, method: str = "GET", body: object = None) -> Any:
    """A plain request; the JSON it answers (None for an empty body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with OPENER.open(req, timeout=TIMEOUT) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def wait_until(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll another process's state until ``check()``, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``upstream``, run by one selector thread.

    ``reset()`` closes both sides of every open connection with an RST, as a
    dropped network or a crashed middlebox would; ``refuse(True)`` resets every
    new connection at once until ``refuse(False)``. Both run on the proxy's
    thread (no socket is closed under a thread reading it) and return once done.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._selector = selectors.DefaultSelector()
        self._wake, self._waker = socket.socketpair()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._commands: queue.Queue[tuple[Callable[[], object], threading.Event]] = queue.Queue()
        self._refusing = False
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        """Reset every open connection; there must be at least one."""
        count: list[int] = []
        self._do(lambda: count.append(self._reset_all()))
        assert count[0] > 0, "no connection to reset"

    def refuse(self, refusing: bool) -> None:
        self._do(lambda: setattr(self, "_refusing", refusing))

    def close(self) -> None:
        if self._running:
            self._do(self._stop)
            self._thread.join(timeout=TIMEOUT)

    def _do(self, fn: Callable[[], object]) -> None:
        done = threading.Event()
        self._commands.put((fn, done))
        self._waker.send(b"x")
        assert done.wait(TIMEOUT), "the proxy thread did not answer"

    def _run(self) -> None:
        while self._running:
            for key, _ in self._selector.select():
                sock = cast(socket.socket, key.fileobj)
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake:
                    self._wake.recv(4096)
                    while not self._commands.empty():
                        fn, done = self._commands.get()
                        fn()
                        done.set()
                elif sock in self._peers:  # not closed by an earlier key of this batch
                    self._forward(sock)
        for sock in (self._listener, self._wake, self._waker):
            sock.close()
        self._selector.close()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        if self._refusing:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            client.close()
            return
        try:
            server = socket.create_connection((HOST, self.upstream), timeout=TIMEOUT)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        self._peers[client] = server
        self._peers[server] = client
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(server, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._peers[sock].sendall(data)
                return
        except OSError:
            pass
        self._drop(sock, reset=False)  # one side closed: close the other

    def _drop(self, sock: socket.socket, *, reset: bool) -> None:
        peer = self._peers.pop(sock)
        del self._peers[peer]
        for each in (sock, peer):
            self._selector.unregister(each)
            if reset:
                with contextlib.suppress(OSError):
                    each.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            each.close()

    def _reset_all(self) -> int:
        count = 0
        while self._peers:
            self._drop(next(iter(self._peers)), reset=True)
            count += 1
        return count

    def _stop(self) -> None:
        self._reset_all()
        self._running = False


@pytest.fixture
def proxy() -> Iterator[Callable[[int], Proxy]]:
    """Makes proxies to a port, and closes them at the end of the test."""
    made: list[Proxy] = []

    def make(upstream: int) -> Proxy:
        made.append(Proxy(upstream))
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each.close()


@pytest.fixture(scope="module")
def sse_app() -> Iterator[Server]:
    yield from _support.serve(Server(SSE_APP, "sse_app running on"))


@pytest.fixture(scope="module")
def chat() -> Iterator[Server]:
    yield from _support.serve(Server(CHAT, "chat running on"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require(missing_browser())
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 (installed or not, the module must load)

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Opens pages, each in a browser context of its own (its own cookies,
    storage and connections, as another user's browser; keyword arguments
    go to ``new_context``: ``viewport``, ``color_scheme``), and closes them
    at the end of the test; a JavaScript error in any of them fails the test."""
    contexts = []
    errors: list[str] = []

    def make(**options: Any) -> Page:
        context = browser.new_context(**options)
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    try:
        yield make
    finally:
        for context in contexts:
            context.close()
    assert errors == []


# ---------------------------------------------------------------------------
# a. The chat page
# ---------------------------------------------------------------------------

# The page's state, read through its own globals: `rooms` maps a room name to
# {source, log, count, last, pending, generation, ...} (see chat.py's page).
TEXTS = "(room) => [...rooms.get(room).log.querySelectorAll('li .text')].map((e) => e.textContent)"
# Connected, and the history loaded since the last reload event.
READY = (
    "([room, loads]) => { const r = rooms.get(room);"
    " return r && r.source.readyState === 1 && r.pending === null && r.generation === loads; }"
)


def texts(page: Page, room: str) -> list[str]:
    result: list[str] = page.evaluate(TEXTS, room)
    return result


def wait_texts(page: Page, room: str, expected: list[str]) -> None:
    """Wait until the room's log shows exactly ``expected``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: PLC0415

    same = f"([room, expected]) => JSON.stringify(({TEXTS})(room)) === JSON.stringify(expected)"
    try:
        page.wait_for_function(same, arg=[room, expected])
    except PlaywrightTimeout:
        assert texts(page, room) == expected  # fails, showing the difference
        raise


def join(page: Page, room: str) -> None:
    """Join a room through the page's form and wait until it is loaded."""
    page.fill("#room", room)
    page.click("#join button")
    page.wait_for_function(READY, arg=[room, 1])


def post(chat: Server, room: str, text: str, user: str = "test") -> None:
    assert call(f"{chat.url}/rooms/{room}/messages", "POST", {"user": user, "text": text}) is None


def test_chat_room_names_typed_in_upper_case_join_the_lower_case_room(
    chat: Server, new_page: Callable[[], Page]
) -> None:
    """The form takes "Ops" (the field's pattern allows upper case; a
    pattern that did not would block the submit) and the page joins "ops";
    nothing the page loads answers an error."""
    page = new_page()
    failed: list[str] = []  # (aborted requests are fine: the page replaces its EventSource per room set)
    page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
    page.goto(chat.url)
    join(page, "lobby")  # the page is ready
    page.fill("#room", "Ops")
    page.click("#join button")
    page.wait_for_function(READY, arg=["ops", 1])  # (the form's validation would have blocked "Ops")
    assert not failed, failed


def test_chat_two_pages_exchange_messages_and_see_presence(chat: Server, new_page: Callable[[], Page]) -> None:
    """Two users' pages: a message typed and sent in one appears once in both,
    presence counts follow joins and leaves, and a reloaded page shows the
    room's messages from the history, each once."""
    a, b = new_page(), new_page()
    a.goto(chat.url)
    a.wait_for_function(READY, arg=["general", 1])
    b.goto(chat.url)
    for page in (a, b):
        page.wait_for_function(READY, arg=["general", 1])
        page.wait_for_function(READY, arg=["random", 1])
        page.wait_for_function("rooms.get('general').count === 2 && rooms.get('random').count === 2")
        page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    assert (a.text_content(".room.active .count") or "").endswith("2 here")

    a.fill("#text", "hello from A ✓ <b>not bold</b>")
    a.click("#send button")
    b.wait_for_function(f"({TEXTS})('general').length > 0")
    b.fill("#text", "reply from B")
    b.click("#send button")
    # B's reply was sent after A's message reached B, so once the reply is
    # shown, a second copy of A's message would have been shown before it.
    expected = ["hello from A ✓ <b>not bold</b>", "reply from B"]
    for page in (a, b):
        wait_texts(page, "general", expected)
        assert texts(page, "random") == []
        assert page.input_value("#text") == ""
    assert a.locator(".log b").count() == 0  # user text is never HTML
    users = "[...rooms.get('general').log.querySelectorAll('li .user')].map((e) => e.textContent)"
    assert b.evaluate(users) == [a.input_value("#user"), b.input_value("#user")]

    b.context.close()
    a.wait_for_function("rooms.get('general').count === 1 && rooms.get('random').count === 1")

    a.reload()
    a.wait_for_function(READY, arg=["general", 1])
    post(chat, "general", "after the reload")
    wait_texts(a, "general", [*expected, "after the reload"])


def test_chat_page_follows_more_rooms_than_connections_over_one_event_source(
    chat: Server, new_page: Callable[[], Page]
) -> None:
    """The page joins eight more rooms (ten in all, more than the six HTTP/1.1
    connections a browser opens to one origin): one EventSource carries them
    all, every room gets its messages, each room was loaded once (a join
    reconnects with the id reached so far: the rooms already there resume,
    only the new one is loaded), and the sidebar counts the unread messages
    of the rooms that are not open."""
    page = new_page()
    page.goto(chat.url)
    page.wait_for_function(READY, arg=["general", 1])
    names = [f"many{i}" for i in range(8)]
    for name in names:
        join(page, name)
    for name in names:
        post(chat, name, f"hi {name}")
    for name in names:
        wait_texts(page, name, [f"hi {name}"])
    assert page.evaluate("new URL(source.url).searchParams.getAll('room')") == ["general", "random", *names]
    assert page.evaluate("[...rooms.values()].map((r) => r.generation)") == [1] * 10, "a room was loaded twice"
    unread = page.evaluate("Object.fromEntries([...rooms].map(([name, r]) => [name, r.unread]))")
    assert unread == {"general": 0, "random": 0, **{name: 1 for name in names[:-1]}, names[-1]: 0}
    assert (page.text_content(".room:nth-child(3) .count") or "").startswith("1 new")
    for name in names:
        assert call(f"{chat.url}/rooms/{name}/stats")["subscribers"] == 1


def test_chat_page_resumes_after_a_network_reset(
    chat: Server, new_page: Callable[[], Page], proxy: Callable[[int], Proxy]
) -> None:
    """The page's connection is reset (RST) and messages are posted while it is
    down: the browser reconnects with Last-Event-ID and the server resumes it,
    so every message is shown once, in order, without reloading the room."""
    through = proxy(chat.port)
    page = new_page()
    page.goto(through.url)
    join(page, "resets")
    for n in (1, 2, 3):
        post(chat, "resets", f"m{n}")
    wait_texts(page, "resets", ["m1", "m2", "m3"])

    through.reset()
    for n in (4, 5, 6):
        post(chat, "resets", f"m{n}")
    wait_texts(page, "resets", [f"m{n}" for n in range(1, 7)])
    post(chat, "resets", "m7")
    wait_texts(page, "resets", [f"m{n}" for n in range(1, 8)])
    # Resumed, not reloaded: one load only, and the note of the drop is still
    # in the log (a reload clears it).
    assert page.evaluate("rooms.get('resets').generation") == 1
    assert page.evaluate("rooms.get('resets').log.querySelector('.note').textContent").startswith("Connection lost")


# Replaces the page's fetch() so that a request of the room's history waits
# until the test calls window.held[i]().
HOLD_HISTORY = """(room) => {
  window.held = [];
  const fetch = window.fetch;
  window.fetch = (url, ...rest) => String(url).endsWith("/rooms/" + room + "/history")
    ? new Promise((resolve) => window.held.push(() => resolve(fetch(url, ...rest))))
    : fetch(url, ...rest);
}"""


def test_chat_page_reloads_the_room_after_a_gap(
    chat: Server, new_page: Callable[[], Page], proxy: Callable[[int], Proxy]
) -> None:
    """The page is cut off while 105 messages are posted, more than the 100
    the broadcaster keeps: its Last-Event-ID cannot be resumed, the server
    says reload, and the page shows the room's last 100 messages from the
    history endpoint, then the live ones. Messages that arrive live while the
    history request is held back are in both, and shown once."""
    through = proxy(chat.port)
    page = new_page()
    page.goto(through.url)
    join(page, "gaps")
    post(chat, "gaps", "m1")
    wait_texts(page, "gaps", ["m1"])

    # The page's history requests wait (in the page) until the test lets them go.
    page.evaluate(HOLD_HISTORY, "gaps")
    through.refuse(True)
    through.reset()
    for n in range(2, 107):
        post(chat, "gaps", f"m{n}")
    page.wait_for_function("rooms.get('gaps').source.readyState === 0")  # reconnecting
    through.refuse(False)
    # The reload event came (a second load started) and its history request
    # is held: live messages now wait in `pending`.
    page.wait_for_function("window.held.length === 1 && rooms.get('gaps').pending !== null")
    for n in range(107, 111):
        post(chat, "gaps", f"m{n}")
    page.wait_for_function("rooms.get('gaps').pending.length === 4")
    page.evaluate("window.held[0]()")  # the request goes now: its answer includes the four
    page.wait_for_function(READY, arg=["gaps", 2])
    post(chat, "gaps", "m111")
    # m1 to m110 are numbers 1 to 110: the broadcast history keeps 7 to 106
    # when the page comes back, so the page, which saw 1, cannot resume. The
    # history endpoint gives the last 100, m11 to m110, which include the four
    # held back: each is shown once; then m111 live.
    wait_texts(page, "gaps", [f"m{n}" for n in range(11, 112)])


# ---------------------------------------------------------------------------
# The chat page as a user sees it: widths, color schemes, connection states
# ---------------------------------------------------------------------------

# (width, height, color scheme): a desktop window and a phone.
LOOKS = [(1280, 800, "light"), (1280, 800, "dark"), (390, 844, "light"), (390, 844, "dark")]
# Whether all the text in the element is on one line: the boxes of its
# text overlap vertically (text wrapped onto a second line has a box below
# the first line's).
ONE_LINE = """(element) => {
  const range = document.createRange();
  range.selectNodeContents(element);
  const boxes = [...range.getClientRects()];
  return boxes.length > 0
    && Math.max(...boxes.map((r) => r.top)) < Math.min(...boxes.map((r) => r.bottom));
}"""
# The font sizes under 11 px of the elements showing text (0: hidden on purpose).
SMALL_TEXT = """() => [...document.querySelectorAll("body *")]
  .filter((e) => e.checkVisibility() && [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()))
  .map((e) => [e.tagName + "." + e.className, parseFloat(getComputedStyle(e).fontSize)])
  .filter(([, size]) => size > 0 && size < 11)"""
# Each message shown in a room: [user, own, the time shown, its ISO time, the
# browser's local HH:MM of it, whether the time is visible].
MESSAGES = """(room) => [...rooms.get(room).log.querySelectorAll(".msg")].map((li) => {
  const time = li.querySelector(".time");
  return [li.dataset.user, li.classList.contains("own"), time.textContent, time.dateTime,
          new Date(time.dateTime).toTimeString().slice(0, 5), time.checkVisibility()];
})"""


def png_size(path: Path) -> tuple[int, int]:
    """The width and height of a PNG file, from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def screenshot(page: Page, name: str, tmp_path: Path) -> Path:
    """A PNG of the page's viewport, under ``tmp_path`` and, if the variable
    ``SCREENSHOT_DIR`` is set, a copy there for a human to look at."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    viewport = page.viewport_size
    assert viewport is not None
    assert png_size(path) == (viewport["width"], viewport["height"])
    if os.environ.get("SCREENSHOT_DIR"):
        keep = Path(os.environ["SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        (keep / path.name).write_bytes(path.read_bytes())
    return path


def join_by_keyboard(page: Page, room: str, loads: int = 1) -> None:
    """Join a room as on a phone (where the form has no button): Enter."""
    page.fill("#room", room)
    page.press("#room", "Enter")
    page.wait_for_function(READY, arg=[room, loads])


def send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


@pytest.mark.parametrize(("width", "height", "scheme"), LOOKS, ids=[f"{w}-{s}" for w, _, s in LOOKS])
def test_chat_page_fits_desktop_and_phone_widths_in_light_and_dark(
    width: int, height: int, scheme: str, chat: Server, new_page: Callable[..., Page], tmp_path: Path
) -> None:
    """Two users chat in a room with a long name, at a desktop width and at a
    phone's 390 px, light and dark: nothing is wider than the window, no text
    is smaller than 11 px, each message shows its local time (HH:MM, from the
    server's "at"), one's own messages are marked as such, and the room list's
    unread badge stays on one line while the long name is cut with an ellipsis.
    The screenshot is a PNG of the window's size."""
    started = time.time()
    room = f"{scheme}-{width}-design-review-notes"  # 26-30 characters: too long for the room list
    side = f"side-{width}-{scheme}"
    pages = {}
    for name in ("ann", "bob"):
        page = pages[name] = new_page(viewport={"width": width, "height": height}, color_scheme=scheme)
        page.goto(chat.url)
        page.wait_for_function(READY, arg=["general", 1])
        page.fill("#user", name)
        join_by_keyboard(page, side)
        join_by_keyboard(page, room)
    ann, bob = pages["ann"], pages["bob"]
    post(chat, room, "Morning! Has anyone looked at the deploy logs yet?", user="carol")
    wait_texts(ann, room, ["Morning! Has anyone looked at the deploy logs yet?"])
    send(ann, "Yes, all green: the rollout finished an hour ago.")
    wait_texts(
        bob,
        room,
        ["Morning! Has anyone looked at the deploy logs yet?", "Yes, all green: the rollout finished an hour ago."],
    )
    send(bob, "Great, thanks! " + "A longer message, to see how it wraps on a narrow screen. " * 3)
    for n in (1, 2):
        post(chat, side, f"meanwhile in the side room {n}", user="carol")
    for page in (ann, bob):
        page.wait_for_function(f"rooms.get('{room}').log.querySelectorAll('.msg').length === 3")
        page.wait_for_function(f"rooms.get('{side}').unread === 2")
        page.wait_for_function("document.getElementById('status').textContent === 'connected'")

    shown: list[list[Any]] = ann.evaluate(MESSAGES, room)
    assert [(user, own) for user, own, *_ in shown] == [("carol", False), ("ann", True), ("bob", False)]
    for _, _, clock, iso, local, visible in shown:
        # (JavaScript's toISOString() ends in "Z", which fromisoformat() reads from Python 3.11 on.)
        at = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
        assert started - 1 <= at <= time.time() + 1, iso
        assert clock == local and visible, (clock, local, visible)
    assert ann.locator(".msg.own .you").all_inner_texts() == ["You"]
    assert bob.locator(".msg.own .you").count() == 1

    for page in (ann, bob):
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "horizontal overflow"
        log = f"rooms.get('{room}').log"
        assert page.evaluate(f"{log}.scrollWidth <= {log}.clientWidth"), "the messages scroll sideways"
        assert page.evaluate(SMALL_TEXT) == []
        badge = page.locator(".room", has_text=side).locator(".count")
        assert badge.inner_text().startswith("2 new")
        assert badge.evaluate(ONE_LINE), "the unread badge wraps"
        assert page.locator(".room .badge", has_text="2 new").evaluate("(e) => e.getClientRects().length") == 1
        long_name = page.locator(".room.active .name")
        cut = "(e) => getComputedStyle(e).textOverflow === 'ellipsis' && e.scrollWidth > e.clientWidth"
        assert long_name.evaluate(cut), "the long room name is not cut with an ellipsis"
        assert long_name.evaluate(ONE_LINE)
    assert screenshot(ann, f"chat-{width}-{scheme}", tmp_path).stat().st_size > 0
    assert screenshot(bob, f"chat-{width}-{scheme}-other-user", tmp_path).stat().st_size > 0


def test_chat_page_says_it_is_reconnecting_and_clears_a_stale_send_error_once_back(
    chat: Server, new_page: Callable[..., Page], proxy: Callable[[int], Proxy], tmp_path: Path
) -> None:
    """The connection drops and the server stays unreachable for a while: the
    page shows a "Reconnecting…" note, and a message sent meanwhile fails
    with an error (the text stays in the field). Once the connection is back
    the note goes, and so does the error, which is no longer true; the
    message can then be sent."""
    through = proxy(chat.port)
    page = new_page()
    page.goto(through.url)
    join(page, "comeback")
    assert page.locator("#banner").is_hidden() and page.locator("#error").is_hidden()

    through.refuse(True)
    through.reset()
    page.wait_for_selector("#banner:not([hidden])")
    assert page.inner_text("#banner").startswith("Reconnecting…")
    assert page.text_content("#status") == "reconnecting…"
    send(page, "sent while down")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('Not sent')")
    assert page.locator("#error").is_visible()
    assert page.input_value("#text") == "sent while down"
    screenshot(page, "chat-reconnecting", tmp_path)

    through.refuse(False)
    page.wait_for_selector("#banner", state="hidden")
    page.wait_for_function("document.getElementById('status').textContent === 'connected'")
    assert page.text_content("#error") == "" and page.locator("#error").is_hidden()
    note = page.evaluate("rooms.get('comeback').log.querySelector('.note').textContent")
    assert note.startswith("Connection lost at ") and " back at " in note, note

    page.press("#text", "Enter")
    wait_texts(page, "comeback", ["sent while down"])
    assert page.input_value("#text") == "" and page.text_content("#error") == ""


def test_chat_page_clears_a_send_error_once_a_later_send_succeeds(chat: Server, new_page: Callable[..., Page]) -> None:
    """A message the server refuses (no name) shows why; the next one sent
    with a name clears the error."""
    page = new_page()
    page.goto(chat.url)
    join(page, "noname")
    page.fill("#user", " ")
    send(page, "from nobody")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('Not sent')")
    assert '"user" must be 1-32 characters' in (page.text_content("#error") or "")
    page.fill("#user", "somebody")
    page.press("#text", "Enter")
    wait_texts(page, "noname", ["from nobody"])
    page.wait_for_function("document.getElementById('error').textContent === ''")
    assert page.locator("#error").is_hidden()


def test_chat_page_notes_a_room_it_could_not_resume_and_resets_its_unread_count(
    chat: Server, new_page: Callable[..., Page], proxy: Callable[[int], Proxy], tmp_path: Path
) -> None:
    """A room in the background has an unread message when the page is cut
    off while 105 more are posted (more than the history keeps): the page
    reloads the room, says so in it ("earlier messages could not be
    recovered"), and its "1 new" is gone; the open room, resumed exactly,
    gets no such note. Unread counting goes on from there."""
    through = proxy(chat.port)
    page = new_page()
    page.goto(through.url)
    join(page, "lost")
    page.click(".room:first-child .open")  # #general: #lost is in the background
    post(chat, "lost", "m1")
    page.wait_for_function("rooms.get('lost').unread === 1")
    assert (page.text_content(".room:nth-child(3) .count") or "").startswith("1 new")

    through.refuse(True)
    through.reset()
    for n in range(2, 107):
        post(chat, "lost", f"m{n}")
    page.wait_for_function("rooms.get('lost').source.readyState === 0")
    through.refuse(False)
    page.wait_for_function(READY, arg=["lost", 2])

    gap = "rooms.get(room).log.querySelector('.note.gap')"
    note = page.evaluate(f"(room) => {gap} && {gap}.textContent", "lost")
    assert note == (
        "Reconnected — the stream could not resume here, so the room was reloaded:"
        " messages older than its recent history are not shown."
    )
    assert page.evaluate(f"(room) => {gap}", "general") is None
    assert page.evaluate("rooms.get('lost').unread") == 0
    assert not (page.text_content(".room:nth-child(3) .count") or "").startswith("1 new")
    assert page.locator(".room:nth-child(3) .badge").is_hidden()

    post(chat, "lost", "m107")
    page.wait_for_function("rooms.get('lost').unread === 1")
    page.click(".room:nth-child(3) .open")
    wait_texts(page, "lost", [f"m{n}" for n in range(7, 108)])  # the history's last 100, then m107
    assert page.locator(".note.gap").is_visible()
    # The note is where the page came back: after the history, before m107.
    after = "rooms.get('lost').log.querySelector('.note.gap').nextElementSibling.querySelector('.text').textContent"
    assert page.evaluate(after) == "m107"
    screenshot(page, "chat-gap-note", tmp_path)


# ---------------------------------------------------------------------------
# b. Exactness: what EventSource receives is what was sent
# ---------------------------------------------------------------------------

# (the Event's fields, what the browser dispatches: (type, data, lastEventId)
# or None for a frame that dispatches nothing), in sending order: the last
# event id carries over from one event to the next.
EXACT: list[tuple[dict[str, Any], tuple[str, str, str] | None]] = [
    ({"data": "plain"}, ("message", "plain", "")),
    ({"data": "two\nlines"}, ("message", "two\nlines", "")),
    # Every line break is a data line; the browser joins them with LF.
    ({"data": "crlf\r\nline"}, ("message", "crlf\nline", "")),
    ({"data": "cr\rline"}, ("message", "cr\nline", "")),
    ({"data": "mixed\r\n\r\n\n\rend"}, ("message", "mixed\n\n\n\nend", "")),
    ({"data": "trailing\n"}, ("message", "trailing\n", "")),
    ({"data": "\n"}, ("message", "\n", "")),
    ({"data": "\r\n\r\n"}, ("message", "\n\n", "")),
    ({"data": ""}, ("message", "", "")),
    ({"data": " one leading space"}, ("message", " one leading space", "")),
    ({"data": "  two\n   three"}, ("message", "  two\n   three", "")),
    ({"data": "tab\tand trailing \t "}, ("message", "tab\tand trailing \t ", "")),
    (
        {"data": ": not a comment\ndata: not a field\nid: not an id"},
        ("message", ": not a comment\ndata: not a field\nid: not an id", ""),
    ),
    (
        {"data": "emoji 😀 👍🏽 👨\u200d👩\u200d👧 flags 🇫🇷"},
        ("message", "emoji 😀 👍🏽 👨\u200d👩\u200d👧 flags 🇫🇷", ""),
    ),
    ({"data": "RTL שלום עולם مرحبا \u202eoverride"}, ("message", "RTL שלום עולם مرحبا \u202eoverride", "")),
    # Only CR and LF break lines: U+2028, U+2029, NEL, VT and FF stay inside.
    ({"data": "a\u2028b\u2029c\x85d\x0be\x0cf"}, ("message", "a\u2028b\u2029c\x85d\x0be\x0cf", "")),
    ({"data": "\ufeffBOM inside the stream"}, ("message", "\ufeffBOM inside the stream", "")),
    ({"data": "NUL\x00inside"}, ("message", "NUL\x00inside", "")),
    ({"data": "é" * 50_000}, ("message", "é" * 50_000, "")),
    ({"data": "custom", "event": "chat"}, ("chat", "custom", "")),
    ({"data": "unicode name", "event": "ünïcödé-😀"}, ("ünïcödé-😀", "unicode name", "")),
    ({"data": "spaced name", "event": "with space"}, ("with space", "spaced name", "")),
    ({"data": "empty name", "event": ""}, ("message", "empty name", "")),
    ({"data": "named message", "event": "message"}, ("message", "named message", "")),
    ({"data": "with id", "id": "42"}, ("message", "with id", "42")),
    ({"data": "keeps the id"}, ("message", "keeps the id", "42")),
    ({"data": "unicode id", "id": "é-ü-😀"}, ("message", "unicode id", "é-ü-😀")),
    ({"data": "spaces in id", "id": " a b "}, ("message", "spaces in id", " a b ")),
    ({"id": "set by a frame without data"}, None),
    ({"data": "after it"}, ("message", "after it", "set by a frame without data")),
    ({"data": "reset", "id": ""}, ("message", "reset", "")),
    (
        {"data": "all fields", "event": "chat", "id": "7", "retry": 100, "comment": "c1\nc2"},
        ("chat", "all fields", "7"),
    ),
    ({"comment": "a comment only"}, None),
    ({"event": "named, no data"}, None),
    ({"retry": 100}, None),
    ({"data": "the end", "event": "end"}, ("end", "the end", "7")),
]


def test_event_source_receives_exactly_what_was_sent(sse_app: Server, new_page: Callable[[], Page]) -> None:
    """Events with multi-line data (LF, CRLF, CR), unicode, empty data,
    leading spaces, custom names and ids reach a browser's EventSource exactly
    as sent; frames without data dispatch nothing but still set the last id."""
    expected = [list(dispatched) for _, dispatched in EXACT if dispatched is not None]
    types = sorted({kind for kind, _, _ in expected})
    page = new_page()
    page.goto(
        f"{sse_app.url}/page?" + urllib.parse.urlencode({"src": "/plain/exact/events", "types": json.dumps(types)})
    )
    page.wait_for_function("window.log.some((e) => e[0] === 'open')")

    sent = call(f"{sse_app.url}/plain/exact/send", "POST", [fields for fields, _ in EXACT])
    assert sent == [1] * len(EXACT)
    page.wait_for_function("window.log.some((e) => e[0] === 'event' && e[1] === 'end')")
    log: list[list[Any]] = page.evaluate("window.log")
    assert log[0] == ["open"]
    received = [entry[1:] for entry in log if entry[0] == "event"]
    assert len(received) == len(expected)
    for got, want in zip(received, expected, strict=True):
        assert got == want
    assert ["error", 0] not in log and ["error", 2] not in log  # the stream never dropped


def test_event_source_waits_the_retry_a_shutdown_sent(sse_app: Server, new_page: Callable[[], Page]) -> None:
    """A broadcaster with ``shutdown_retry=(1.5, 1.5)`` is closed while
    Chromium's EventSource reads it: the stream ends with ``retry: 1500``
    (its first chunk had set 100 ms), and the browser waits that long before
    reconnecting; the closed broadcaster answers each reconnection the same
    way, so they come 1.5 s apart."""
    page = new_page()
    page.goto(f"{sse_app.url}/page?" + urllib.parse.urlencode({"src": "/closing/spread/events"}))
    page.wait_for_function("window.log.some((e) => e[0] === 'open')")
    call(f"{sse_app.url}/closing/spread/close", "POST")
    wait_until("two reconnections", lambda: len(stream_requests(sse_app, "spread")) >= 3, 10)
    at = [request["at"] for request in stream_requests(sse_app, "spread")]
    waits = [later - earlier for earlier, later in itertools.pairwise(at[1:3])]
    print(f"EventSource reconnections after a shutdown retry of 1.5 s came {waits} s apart")
    assert all(1.45 <= wait < 2.5 for wait in waits), waits


# ---------------------------------------------------------------------------
# c, d. Resume: a stream cut mid-flow, in Chromium and through httpx-sse
# ---------------------------------------------------------------------------

PUMPED = 150  # events sent, one every 4 ms, while the stream is cut
CUT_AFTER = 30  # events received before the cut
CUTS = ["end", "reset", "remove"]


def cut_stream(how: str, sse_app: Server, through: Proxy, key: str) -> None:
    if how == "end":  # a clean end by the server; the history stays
        assert call(f"{sse_app.url}/history/{key}/end", "POST") == {"ended": 1}
    elif how == "remove":  # a clean end by the server that drops the history
        call(f"{sse_app.url}/history/{key}/remove", "POST")
    else:  # the network drops
        through.reset()


def stream_requests(sse_app: Server, key: str) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = call(f"{sse_app.url}/requests")
    return [r for r in requests if r["key"] == key]


def pumped(sse_app: Server, key: str) -> int:
    """How many events the key's pump has sent so far."""
    return len(call(f"{sse_app.url}/history/{key}/pumped")["sent"])


def pumped_past(sse_app: Server, key: str, count: int) -> bool:
    return pumped(sse_app, key) >= count


def finish(sse_app: Server, key: str) -> list[int]:
    """Wait for the client's second connection and for the pump to finish, then
    send the last event, ``end``; return what each pumped send returned."""
    wait_until("the reconnection", lambda: len(stream_requests(sse_app, key)) >= 2)
    wait_until("the pump", lambda: bool(call(f"{sse_app.url}/history/{key}/pumped")["done"]))
    sent: list[int] = call(f"{sse_app.url}/history/{key}/pumped")["sent"]
    assert len(sent) == PUMPED
    assert call(f"{sse_app.url}/history/{key}/send", "POST", [{"data": "end"}]) == [1]
    return sent


def check_resumed(
    how: str, events: list[tuple[str, str, str]], last_before: str, requests: list[dict[str, Any]], sent: list[int]
) -> None:
    """Every event exactly once and in order, with the broadcaster's ids; the
    reconnection carried the id of the last event received before it.

    ``remove()`` drops the key's history at once, so after it nothing can be
    resumed: the reconnection gets the ``gap`` event and then live events, and
    the events sent between the removal and the reconnection, to a key that
    no longer had a channel, were retained nowhere (their ``send`` returned 0).
    """
    assert [r["last_event_id"] for r in requests] == [None, last_before]
    assert all(kind in ("message", "gap") for kind, _, _ in events)
    epoch = events[0][2].rpartition("-")[0]
    if how != "remove":
        assert requests[1]["resumed"] is True
        # Some were sent while the key had no stream, only its lingering history.
        assert 0 in sent
        assert [data for _, data, _ in events] == [*map(str, range(1, PUMPED + 1)), "end"]
        assert [id for _, _, id in events] == [f"{epoch}-{n}" for n in range(1, PUMPED + 2)]
        return
    assert requests[1]["resumed"] is False
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("gap") == 1
    gap = kinds.index("gap")
    before, after = events[:gap], events[gap + 1 :]
    assert before[-1][2] == last_before
    assert [data for _, data, _ in before] == [str(n) for n in range(1, len(before) + 1)]
    assert [id for _, _, id in before] == [f"{epoch}-{n}" for n in range(1, len(before) + 1)]
    # Delivered: every event whose send reached a subscriber, in order.
    delivered = [str(n) for n in range(1, PUMPED + 1) if sent[n - 1] > 0]
    assert [data for _, data, _ in before + after] == [*delivered, "end"]
    second = after[0][2].rpartition("-")[0]
    assert second != epoch  # a new channel lifetime
    assert [id for _, _, id in after] == [f"{second}-{n}" for n in range(1, len(after) + 1)]


@pytest.mark.parametrize("how", CUTS)
def test_event_source_resumes_a_cut_stream(
    how: str, sse_app: Server, new_page: Callable[[], Page], proxy: Callable[[int], Proxy]
) -> None:
    """Chromium's EventSource, through the proxy, on a key with history: the
    stream is cut after 30 of 150 events sent 4 ms apart. The browser reconnects
    100 ms later (``retry: 100``) with ``Last-Event-ID`` and ends up with every
    event exactly once, in order (after ``remove()``: what remained deliverable,
    after the gap event)."""
    key = f"browser-{how}"
    through = proxy(sse_app.port)
    page = new_page()
    query = urllib.parse.urlencode({"src": f"/history/{key}/events", "types": '["message", "gap"]'})
    page.goto(f"{through.url}/page?{query}")
    page.wait_for_function("window.log.some((e) => e[0] === 'open')")
    call(f"{sse_app.url}/history/{key}/pump?count={PUMPED}&interval=0.004", "POST")
    page.wait_for_function(f"window.log.filter((e) => e[0] === 'event').length >= {CUT_AFTER}")
    cut_stream(how, sse_app, through, key)
    sent = finish(sse_app, key)
    page.wait_for_function("window.log.some((e) => e[0] === 'event' && e[2] === 'end')")

    log: list[list[Any]] = page.evaluate("window.log")
    assert [entry[0] for entry in log if entry[0] != "event"] == ["open", "error", "open"]
    drop = next(i for i, entry in enumerate(log) if entry[0] == "error")
    last_before = next(entry[3] for entry in reversed(log[:drop]) if entry[0] == "event")
    events = [(entry[1], entry[2], entry[3]) for entry in log if entry[0] == "event"]
    check_resumed(how, events, last_before, stream_requests(sse_app, key), sent)


@pytest.mark.parametrize("how", CUTS)
def test_httpx_sse_resumes_a_cut_stream(how: str, sse_app: Server, proxy: Callable[[int], Proxy]) -> None:
    """The same through httpx + httpx-sse, reconnecting by hand with the
    ``Last-Event-ID`` header after the stream ends or fails."""
    require(missing_httpx_sse())
    import httpx  # noqa: PLC0415 (installed or not, the module must load)
    from httpx_sse import connect_sse  # noqa: PLC0415

    key = f"httpx-{how}"
    through = proxy(sse_app.port)
    events: list[tuple[str, str, str]] = []
    last_id: str | None = None
    last_before = ""
    sent: list[int] = []
    connections = 0
    with httpx.Client(base_url=through.url, timeout=TIMEOUT, trust_env=False) as client:
        while not events or events[-1][1] != "end":
            connections += 1
            assert connections <= 2, "a second reconnection"
            headers = {} if last_id is None else {"Last-Event-ID": last_id}
            try:
                with connect_sse(client, "GET", f"/history/{key}/events", headers=headers) as source:
                    assert source.response.status_code == 200
                    if connections == 1:
                        call(f"{sse_app.url}/history/{key}/pump?count={PUMPED}&interval=0.004", "POST")
                    else:
                        sent = finish(sse_app, key)
                    for sse in source.iter_sse():
                        if sse.event == "message" and sse.data == "":
                            continue  # httpx-sse yields the `retry: 100` frame as an empty message
                        events.append((sse.event, sse.data, sse.id))
                        last_id = sse.id or None
                        if len(events) == CUT_AFTER and connections == 1:
                            cut_stream(how, sse_app, through, key)
                        if sse.data == "end":
                            break
            except httpx.TransportError:
                assert how == "reset"
            if connections == 1:
                last_before = events[-1][2]
                # Away for a while, as a browser waits `retry` ms: events go on
                # being sent meanwhile.
                wait_until("10 more events", functools.partial(pumped_past, sse_app, key, pumped(sse_app, key) + 10))
    check_resumed(how, events, last_before, stream_requests(sse_app, key), sent)


# ---------------------------------------------------------------------------
# c. Many keys: six connections per origin, or one multi-key stream
# ---------------------------------------------------------------------------

MANY = 9  # keys a page follows: more than Chromium's 6 HTTP/1.1 connections per origin


def events_of(logs: list[list[list[Any]]]) -> list[list[tuple[str, str, str]]]:
    return [[(e[1], e[2], e[3]) for e in log if e[0] == "event"] for log in logs]


def test_event_sources_stall_from_the_seventh_while_one_multi_key_stream_does_not(
    sse_app: Server, new_page: Callable[[], Page]
) -> None:
    """A page with one EventSource per key over HTTP/1.1: the first six open
    and get their events; the seventh to ninth never open (the browser holds
    at most six connections to the origin), and the server never sees their
    requests. The same page with one multi-key EventSource gets every key's
    event, each typed with its key."""
    keys = [f"wall-{i}-{os.getpid()}" for i in range(MANY)]
    page = new_page()
    query = urllib.parse.urlencode([("src", f"/plain/{key}/events") for key in keys])
    page.goto(f"{sse_app.url}/page?{query}")
    page.wait_for_function("window.logs.filter((log) => log.some((e) => e[0] === 'open')).length === 6")
    for round_ in ("one", "two"):
        for key in keys:
            call(f"{sse_app.url}/plain/{key}/send", "POST", [{"data": f"{key} {round_}"}])
        page.wait_for_function(
            f"window.logs.filter((log) => log.some((e) => e[2] && e[2].endsWith(' {round_}'))).length === 6"
        )
    logs: list[list[list[Any]]] = page.evaluate("window.logs")
    received = [i for i, log in enumerate(logs) if log]
    assert len(received) == 6, logs
    stalled = [i for i in range(MANY) if i not in received]
    assert page.evaluate("window.sources.map((s) => s.readyState)") == [1 if i in received else 0 for i in range(MANY)]
    requested = {r["key"] for r in call(f"{sse_app.url}/requests")}
    assert not any(keys[i] in requested for i in stalled), "a stalled source reached the server"
    assert [events for events in events_of(logs) if events] == [
        [("message", f"{keys[i]} one", ""), ("message", f"{keys[i]} two", "")] for i in received
    ]

    many = new_page()
    src = "/plain/many/events?" + urllib.parse.urlencode([("key", key) for key in keys])
    many.goto(f"{sse_app.url}/page?" + urllib.parse.urlencode({"src": src, "types": json.dumps(keys)}))
    many.wait_for_function("window.log.some((e) => e[0] === 'open')")
    for key in keys:
        call(f"{sse_app.url}/plain/{key}/send", "POST", [{"data": f"{key} three"}])
    many.wait_for_function(f"window.log.filter((e) => e[0] === 'event').length === {MANY}")
    assert events_of([many.evaluate("window.log")])[0] == [(key, f"{key} three", "") for key in keys]


def test_multi_key_event_source_resumes_every_key_after_a_reset(
    sse_app: Server, new_page: Callable[[], Page], proxy: Callable[[int], Proxy]
) -> None:
    """One EventSource over nine keys with history, through the proxy, while
    every key is pumped (40 events each, 5 ms apart): the connection is reset
    mid-flow; the browser reconnects with the stream's Last-Event-ID and gets,
    in every key, every event exactly once and in order, with no gap."""
    keys = [f"many-{i}-{os.getpid()}" for i in range(MANY)]
    count = 40
    through = proxy(sse_app.port)
    page = new_page()
    src = "/history/many/events?" + urllib.parse.urlencode([("key", key) for key in keys])
    page.goto(f"{through.url}/page?" + urllib.parse.urlencode({"src": src, "types": json.dumps([*keys, "gap"])}))
    page.wait_for_function("window.log.some((e) => e[0] === 'open')")
    for key in keys:
        call(f"{sse_app.url}/history/{key}/pump?count={count}&interval=0.005", "POST")
    page.wait_for_function("window.log.filter((e) => e[0] === 'event').length >= 60")
    through.reset()
    for key in keys:
        url = f"{sse_app.url}/history/{key}/pumped"
        wait_until(f"the pump of {key}", functools.partial(lambda url: bool(call(url)["done"]), url))
    page.wait_for_function(f"window.log.filter((e) => e[0] === 'event').length >= {MANY * count}")

    log: list[list[Any]] = page.evaluate("window.log")
    assert [entry[0] for entry in log if entry[0] != "event"] == ["open", "error", "open"]
    events = events_of([log])[0]
    assert len(events) == MANY * count and "gap" not in {kind for kind, _, _ in events}
    for key in keys:
        assert [data for kind, data, _ in events if kind == key] == [str(n) for n in range(1, count + 1)], key
    requests = [r for r in call(f"{sse_app.url}/requests") if r.get("keys") == keys]
    drop = next(i for i, entry in enumerate(log) if entry[0] == "error")
    last_before = next(entry[3] for entry in reversed(log[:drop]) if entry[0] == "event")
    assert [r["last_event_id"] for r in requests] == [None, last_before]
    assert requests[1]["resumed"] is True and requests[1]["gaps"] == []
    assert sorted(urllib.parse.unquote(pair.split("=")[0]) for pair in last_before.split(",")) == sorted(keys)
