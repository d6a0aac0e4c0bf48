"""Waiting awake: poll for a moment before sleeping, for the serving loop and the RSP client.

A debugging session is a chain of short exchanges (GDB's packet, vmigdb's answer, the plugin's
stop), each side waiting on the other for tens of microseconds. On a virtualised host a thread
that blocks lets its CPU go idle, and waking it again costs more than the exchange itself:
measured on the 2-CPU test machines, a stepi's three memory reads took 112 us each right after a
step (a sleeping vmigdb) and 23 us back to back; GDB's `stepi` ran at 1,324 steps/s, and at about
2,300 with vmigdb polling for 300 us before it blocks. The poll yields the CPU between tries, so
GDB or QEMU get it at once when they need it; an idle session costs one short poll per wake-up.
The plugin keeps a held vCPU awake the same way (runctl.c, spin_while_held), and the RSP client
waits for QEMU's gdbstub so (`vmigdb.wire.client`).
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

AWAKE_S = 300e-6  # how long the loop polls before it blocks


def wait_awake(wait: Callable[[float | None], T], timeout: float | None) -> T:
    """`wait(timeout)`, a select-like call returning something falsy on timeout, tried with a
    zero timeout for up to `AWAKE_S` (yielding the CPU between tries) before it blocks."""
    if timeout is not None and timeout <= 0:
        return wait(timeout)
    start = time.monotonic()
    give_up = start + (AWAKE_S if timeout is None else min(AWAKE_S, timeout))
    while True:
        ready = wait(0)
        if ready:
            return ready
        now = time.monotonic()
        if now >= give_up:
            break
        os.sched_yield()
    return wait(None if timeout is None else max(0.0, timeout - (now - start)))


class AwakeSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that polls for `AWAKE_S` before a blocking wait."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        return wait_awake(super().select, timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """asyncio's selector loop over an `AwakeSelector`, for `asyncio.Runner(loop_factory=...)`."""
    return asyncio.SelectorEventLoop(AwakeSelector())
