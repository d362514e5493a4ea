"""Graceful shutdown of ``broadcaster.py`` SSE apps under real ASGI servers.

Copy this file next to your app (it needs only the standard library). It
solves one problem: an SSE response never ends by itself, so a server that
"waits for the responses to finish" on SIGTERM waits forever, and a server
that does not wait cuts every stream off without its end of body. The fix is
to call ``Broadcaster.close()`` *when the signal arrives*: every stream then
ends cleanly (each response drains what it was sent and writes its final empty
chunk, or END_STREAM on HTTP/2), and the server's own graceful shutdown
finishes in a fraction of a second. The ASGI ``lifespan.shutdown`` event is no
use for this: every server sends it only after the connections are gone.

What each server needs (``tests/test_servers.py`` checks every row: with 100
open streams, SIGTERM ends each one cleanly and the process is gone in a
fraction of a second, with nothing logged at error level):

=========================  ===================================================
server                     recipe
=========================  ===================================================
uvicorn (CLI)              ``close_on_signals(b, wait=inflight.wait)`` at
                           lifespan startup (``wait`` is optional here)
uvicorn (from Python)      subclass ``uvicorn.Server``, override ``shutdown()``
                           to call ``b.close()`` first (no helper needed)
granian (CLI)              ``close_on_signals(b, wait=inflight.wait)`` at
                           lifespan startup (``wait`` is optional here)
daphne (CLI)               ``close_on_signals(b, wait=inflight.wait)`` at the
                           first request (daphne runs no lifespan); ``wait`` is
                           required: daphne's own handler cancels every
                           running response, cutting the streams off
daphne (from Python)       ``Server(..., signal_handlers=False)``; handle
                           SIGINT/SIGTERM on its loop (``add_signal_handler``
                           in ``ready_callable``): ``b.close()``, ``await
                           inflight.wait()``, then ``server.stop()``
hypercorn (from Python)    ``serve(app, config, shutdown_trigger=
                           shutdown_trigger(b, wait=inflight.wait))``; ``wait``
                           is required for HTTP/2 (else the connection is
                           closed before END_STREAM is sent). Do not use the
                           hypercorn CLI for SSE: on Python 3.12+ it can hang
                           for ever on SIGTERM while a stream is open.
=========================  ===================================================

``inflight`` is an :class:`InFlight` that every SSE response runs through, so
the shutdown can wait until each of them has written its end. One app written
this way (close_on_signals at lifespan startup *and* at the first request; the
second call is a no-op) shuts down cleanly under the uvicorn, granian and
daphne command lines alike.

Never call ``Broadcaster.close()`` inside a signal handler yourself: a Python
signal handler runs between two bytecodes of the main thread, possibly while
that thread holds the broadcaster's (non-reentrant) lock, and would deadlock
on it. The helpers here only hand the close to the event loop
(``loop.call_soon_threadsafe``), which is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from types import FrameType
from typing import Any, Protocol

__all__ = ["InFlight", "close_on_signals", "shutdown_trigger"]

# The conventional ASGI types (the same as broadcaster.py's and starlette.types).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class SupportsClose(Protocol):
    """Anything with a ``close()`` to call at shutdown: a ``Broadcaster``."""

    def close(self) -> None: ...


class InFlight:
    """Counts the responses running through it, so that shutdown can wait
    until each has written its end of body.

    Run every SSE response through it::

        inflight = InFlight()
        ...
        await inflight.run(b.response(b.subscribe(key)), scope, receive, send)

    and pass ``inflight.wait`` as the ``wait`` of :func:`close_on_signals` or
    :func:`shutdown_trigger`. Use one ``InFlight`` per event loop (per server
    worker process, which is what a module-level instance is).
    """

    __slots__ = ("_count", "_idle")

    def __init__(self) -> None:
        self._count = 0
        self._idle: asyncio.Event | None = None

    @property
    def count(self) -> int:
        """How many responses are running now."""
        return self._count

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the ASGI ``app`` for this request, counted."""
        self._count += 1
        try:
            await app(scope, receive, send)
        finally:
            self._count -= 1
            if self._count == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait(self, timeout: float = 2.0, settle: float = 0.05) -> bool:
        """Wait until no response is running, for at most ``timeout`` seconds,
        then ``settle`` seconds more (the server writes what the last response
        sent after it returned). True if every response ended in time.

        After ``Broadcaster.close()`` the broadcaster's responses end at once;
        the timeout only bounds the wait for responses that do not end by
        themselves (anything not fed by a broadcaster).
        """
        idle = True
        if self._count:
            if self._idle is None:
                self._idle = asyncio.Event()
            waiter = asyncio.ensure_future(self._idle.wait())
            done, _ = await asyncio.wait((waiter,), timeout=timeout)
            if not done:
                waiter.cancel()
                idle = False
        if settle > 0:
            await asyncio.sleep(settle)
        return idle


class _ChainedHandler:
    """A signal handler that closes on the event loop, then passes the signal
    on to the handler it replaced (at once, or after ``wait``)."""

    def __init__(
        self,
        closables: tuple[SupportsClose, ...],
        loop: asyncio.AbstractEventLoop,
        previous: Callable[[int, FrameType | None], Any],
        wait: Callable[[], Awaitable[object]] | None,
    ) -> None:
        self.closables = closables
        self.loop = loop
        self.previous = previous
        self.wait = wait
        # The task that closes, waits and then passes the signal on; set at the
        # first signal (a second one goes straight to the server), and kept
        # here so that it cannot be garbage-collected while it runs.
        self.task: asyncio.Task[None] | None = None
        self.begun = False

    def _close(self) -> None:
        for closable in self.closables:
            closable.close()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: do nothing here that
        # takes a lock the interrupted code may hold. call_soon_threadsafe only
        # appends to a deque and writes a byte to the loop's self-pipe.
        if self.wait is None or self.begun:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to end
                self.loop.call_soon_threadsafe(self._close)
            self.previous(signum, frame)  # a second Ctrl-C reaches the server at once
            return
        self.begun = True
        try:
            self.loop.call_soon_threadsafe(self._start, signum, frame)
        except RuntimeError:
            self.previous(signum, frame)

    def _start(self, signum: int, frame: FrameType | None) -> None:
        self.task = self.loop.create_task(self._close_wait_pass_on(signum, frame))

    async def _close_wait_pass_on(self, signum: int, frame: FrameType | None) -> None:
        try:
            self._close()
            assert self.wait is not None
            await self.wait()
        finally:
            self.previous(signum, frame)


def close_on_signals(
    *closables: SupportsClose,
    wait: Callable[[], Awaitable[object]] | None = None,
    signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
) -> list[signal.Signals]:
    """Put a handler in front of the server's own handler of each of
    ``signals`` that closes every one of ``closables`` on the event loop, then
    passes the signal on to the server's handler, which then finds every
    stream ending. Returns the signals it chained.

    For servers run from their command line that install Python signal
    handlers: uvicorn, granian and daphne. Call it from a coroutine on the
    server's event loop, in its main thread, after the server installed its
    handlers: at ASGI lifespan startup (uvicorn, granian), or at the first
    request (daphne, which sends no lifespan events). Calling it again for the
    same closables is a no-op, so it is safe to call at both.

    ``wait``: a coroutine function (usually :meth:`InFlight.wait`) awaited
    after the close and before the server's handler runs. Required for daphne
    (its handler cancels every running response, so the streams would be cut
    off before their end); harmless elsewhere. A second signal while it waits
    goes to the server's handler at once (a second Ctrl-C forces the exit).

    A server that handles a signal through asyncio's ``loop.add_signal_handler``
    (hypercorn's command line, uvicorn before 0.29) gets it at once, whatever
    is chained in front: the close still happens, but ``wait`` cannot hold the
    server back. For hypercorn use :func:`shutdown_trigger` instead.

    Signals whose current handler is not a Python callable (``SIG_DFL``,
    ``SIG_IGN``, or one installed in C, like a Rust server's) are left alone:
    then this process does not handle them in Python, and chaining would change
    what they do. Outside the main thread nothing can be chained (Python runs
    signal handlers there only) and nothing is.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    chained: list[signal.Signals] = []
    for sig in signals:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue
        if isinstance(previous, _ChainedHandler) and previous.closables == closables:
            continue  # already chained for these
        signal.signal(sig, _ChainedHandler(closables, loop, previous, wait))
        chained.append(sig)
    return chained


def shutdown_trigger(
    *closables: SupportsClose,
    wait: Callable[[], Awaitable[object]] | None = None,
    signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
) -> Callable[[], Awaitable[None]]:
    """A ``shutdown_trigger`` for ``hypercorn.asyncio.serve``: it returns (so
    hypercorn starts its graceful shutdown) once one of ``signals`` arrived,
    ``closables`` were closed and ``await wait()`` returned::

        await serve(app, config, shutdown_trigger=shutdown_trigger(b, wait=inflight.wait))

    Pass ``wait=inflight.wait``: hypercorn closes its HTTP/2 connections as soon
    as the trigger returns, before the last frames (END_STREAM) of streams
    still ending are written. The signals are handled with
    ``loop.add_signal_handler``, only until the first one arrives; a second one
    then gets its default action (the process ends at once), as a second
    Ctrl-C should.
    """
    wanted = tuple(signals)

    async def trigger() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in wanted:
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in wanted:
                loop.remove_signal_handler(sig)
        for closable in closables:  # on the loop: taking the broadcaster's lock is safe
            closable.close()
        if wait is not None:
            await wait()

    return trigger
