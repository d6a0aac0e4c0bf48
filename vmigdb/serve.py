"""Serving one machine to GDB: the loop every serving subcommand shares, whatever the driver.

A subcommand (`vmigdb qemu`, `vmigdb demo`; a dump or Xen one the same way) is a `ServeCommand`: its
own arguments and a factory that opens its machine (boots QEMU, opens a dump...) and hands back a
`Target`, the driver plus what the loop needs of what stands behind it. The loop binds the listening
socket first (a taken port fails before anything boots), builds the debugger and the server, says
`listening on ADDR`, and waits for the end: the machine going away, GDB's `kill`, or a signal. The
protocol layer never learns which driver it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.hv.base import Driver

log = logging.getLogger("vmigdb")

DEFAULT_LISTEN = "127.0.0.1:1234"


@dataclass
class Target:
    """An opened machine, as a subcommand's factory hands it to the serve loop."""

    driver: Driver
    close: Callable[[], Awaitable[None]]  # end the hypervisor side, remove what it left
    run_at_start: bool = False  # a booted guest runs until GDB attaches; a dump never runs
    console: Path | None = None  # the guest console's log, named on stderr
    show_console: bool = False  # ... and copied to stdout as it grows (the demo)
    # What to say (stderr, exit status 1) when the machine ends by itself, e.g. QEMU's last words.
    gone: Callable[[], str] = lambda: "the machine went away"
    # `monitor dump FILE`: save the whole stopped machine to a new file, for `vmigdb dump`
    # (see `vmigdb.rsp.monitor.SaveMachine`); None where the hypervisor cannot.
    save_machine: Callable[[str], Awaitable[str]] | None = None
    # Serve one GDB session, then end (an attached VM, which `close` puts back as it was found).
    single_session: bool = False
    # Analyse the guest OS before listening (a dump, or a guest that is up already, e.g. an attached
    # VM), so GDB's first requests (the symbol file first) are answered at once rather than after
    # seconds of analysis.
    analyse_first: bool = False


@dataclass(frozen=True)
class ServeCommand:
    """A subcommand that serves a machine: `vmigdb NAME [its arguments] [serve options]`."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    open: Callable[[argparse.Namespace], Awaitable[Target]]


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The options every serving subcommand has."""
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT or unix:PATH")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --listen address (a debugger port is root on the guest)",
    )
    parser.add_argument(
        "--stealth",
        choices=["default", "strict"],
        default="default",
        help="strict: refuse any mechanism the guest could see (monitor stealth lists them)",
    )


def _bind(listen: str, allow_remote: bool):
    from vmigdb.rsp.server import ListenAddress, bind_listener

    try:
        address = ListenAddress.parse(listen)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    if not address.is_loopback() and not allow_remote:
        raise SetupError(
            f"refusing to listen on non-loopback {address}: anyone who reaches a debugger port "
            "owns the guest; pass --allow-remote if you mean it"
        )
    try:
        return address, bind_listener(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SetupError(
                f"{address} is already in use: pick another with --listen HOST:PORT"
            ) from None
        raise SetupError(f"cannot listen on {address}: {exc.strerror or exc}") from None


def _unbind(listener: socket.socket) -> None:
    """Give the listening socket back (the machine could not be opened)."""
    path = listener.getsockname() if listener.family == socket.AF_UNIX else None
    listener.close()
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _tail(path: Path, stop: asyncio.Event) -> None:
    """Copy the guest console to our stdout, so a newcomer sees the guest boot."""
    offset = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            if data:
                offset += len(data)
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def serve(command: ServeCommand, args: argparse.Namespace) -> int:
    """Open `command`'s machine and serve it until it ends; the exit status."""
    from vmigdb.debugger.engine import Debugger
    from vmigdb.debugger.policy import StealthMode
    from vmigdb.rsp.server import RspServer

    address, listener = _bind(args.listen, args.allow_remote)
    try:
        target = await command.open(args)
    except BaseException:
        _unbind(listener)
        raise
    stop_tail = asyncio.Event()
    tail = None
    server = None
    try:
        debugger = Debugger(target.driver, StealthMode(args.stealth))
        if target.analyse_first:
            debugger.guest.prepare()
        if target.run_at_start:
            debugger.resume({cpu: "c" for cpu in debugger.cpus()})
        server = RspServer(
            debugger,
            local=address.is_loopback(),
            save_machine=target.save_machine,
            single_session=target.single_session,
        )
        await server.start(listener)
        if target.console is not None and target.show_console:
            log.info("guest console (also in %s):", target.console)
            tail = asyncio.create_task(_tail(target.console, stop_tail))
        elif target.console is not None:
            log.info("guest console: %s", target.console)
        print(f"listening on {address}", flush=True)

        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted.set)
        assert server.finished is not None
        waiter = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait([server.finished, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if server.finished.done():
            if server.finished.result() is not None:  # the machine went away on its own
                print(f"vmigdb: {target.gone()}", file=sys.stderr)
                return 1
            return 0
        log.info("shutting down")
        return 0
    finally:
        stop_tail.set()
        if tail is not None:
            await tail
        if server is not None:
            await server.close()
        await target.close()
