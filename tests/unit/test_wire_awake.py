"""The serving loop's selector: it polls before it blocks, and still keeps asyncio's contract
(a ready socket at once, an expired timeout with nothing, a wait that ends when data comes)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

from vmigdb.wire import awake
from vmigdb.wire.awake import AwakeSelector, new_event_loop


def _pair_with_selector() -> tuple[socket.socket, socket.socket, AwakeSelector]:
    a, b = socket.socketpair()
    selector = AwakeSelector()
    selector.register(b, selectors.EVENT_READ)
    return a, b, selector


def test_ready_socket_is_returned_at_once() -> None:
    a, b, selector = _pair_with_selector()
    a.send(b"x")
    ready = selector.select(None)
    assert [key.fileobj for key, _ in ready] == [b]


def test_timeout_with_nothing_ready_returns_nothing_in_time() -> None:
    a, b, selector = _pair_with_selector()
    start = time.monotonic()
    assert selector.select(0.05) == []
    took = time.monotonic() - start
    assert 0.05 <= took < 1.0


def test_data_after_the_poll_wakes_the_blocking_wait() -> None:
    a, b, selector = _pair_with_selector()
    later = threading.Timer(awake.AWAKE_S * 10, lambda: a.send(b"x"))
    later.start()
    try:
        ready = selector.select(5.0)
    finally:
        later.cancel()
    assert [key.fileobj for key, _ in ready] == [b]


def test_asyncio_runs_on_it() -> None:
    async def echo_once() -> bytes:
        reader, writer = await asyncio.open_connection(sock=a)
        writer.write(b"ping")
        return await reader.readexactly(4)

    a, b = socket.socketpair()
    threading.Thread(target=lambda: b.send(b.recv(4)), daemon=True).start()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        assert runner.run(echo_once()) == b"ping"
