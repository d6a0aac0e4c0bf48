"""The only place with sockets: serves GDB clients over TCP or a unix socket with asyncio.

One client holds the session at a time; a second one is told who holds it and closed. Each received
packet goes straight from `data_received` through the codec and the session to `transport.write`, with
no task or queue hop on the way (the per-packet path is what scattered reads and stepping pay for).

While the machine runs, the hypervisor's stop channel is watched with `loop.add_reader`, and 0x03 from
GDB interrupts it. A client that vanishes (or detaches) leaves the machine running, with no breakpoint
left, and the server ready for the next one. A driver without run control (a dump) has no stop
channel and none is watched: its machine stays as it is, and detaching leaves it so.

A monitor command that takes a while (`monitor dump`) is awaited as a task on the loop: the machine
stays stopped, and GDB's packets meanwhile wait as they do while the machine runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopEvent, StopReason
from vmigdb.errors import log_internal_error
from vmigdb.hv.base import DriverError, MachineGone
from vmigdb.rsp.errors import EINVAL, INTERNAL
from vmigdb.rsp.monitor import SaveMachine
from vmigdb.rsp.session import Await, Detach, Kill, Outcome, Resume, Session
from vmigdb.wire import codec

log = logging.getLogger("vmigdb.rsp")

# GDB waits 2 s (its `remote timeout`) for each packet of a monitor command's answer, three
# times, then gives up on it; an empty `O` packet prints nothing and restarts its wait.


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """`host:port` or `unix:/path`."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        if text.startswith("unix:"):
            return cls(path=text[5:])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"listen address must be HOST:PORT or unix:PATH, not {text!r}")
        return cls(host=host.strip("[]") or "127.0.0.1", port=int(port))

    def is_loopback(self) -> bool:
        if self.path is not None:
            return True
        try:
            infos = socket.getaddrinfo(self.host, None)
        except OSError:
            return False
        import ipaddress

        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def bind_listener(address: ListenAddress) -> socket.socket:
    """Bind and listen; raises OSError (e.g. EADDRINUSE) for the caller to explain."""
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(address.path) and stat.S_ISSOCK(os.stat(address.path).st_mode):
            os.unlink(address.path)  # a stale socket from an earlier run; never another file
        old = os.umask(0o077)  # the socket is the guest: owner only
        try:
            sock.bind(address.path)
        finally:
            os.umask(old)
        os.chmod(address.path, 0o600)
    else:
        family = socket.AF_INET6 if address.host and ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(4)
    sock.setblocking(False)
    return sock


class RspServer:
    """Serves one Debugger to GDB clients, one at a time."""

    def __init__(
        self,
        debugger: Debugger,
        *,
        local: bool = True,
        save_machine: SaveMachine | None = None,
        single_session: bool = False,
    ) -> None:
        self.debugger = debugger
        self.local = local  # serving loopback or a unix socket only: host-file commands allowed
        self.save_machine = save_machine  # `monitor dump`, when the machine can be saved
        # One GDB session only (an attached VM): when it ends, serving ends, and the machine is
        # left for the owner of the VM to put back as it was found (not resumed here).
        self.single_session = single_session
        self.active: GdbConnection | None = None
        self.finished: asyncio.Future[StopEvent | None] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unix_path: str | None = None
        self._stop_fd: int | None = None  # the driver's stop channel, while watched

    async def start(self, listener: socket.socket) -> None:
        """Serve on a socket made by `bind_listener` (bound early, so a taken port fails fast)."""
        self._loop = asyncio.get_running_loop()
        self.finished = self._loop.create_future()
        factory: Callable[[], GdbConnection] = lambda: GdbConnection(self)  # noqa: E731
        if listener.family == socket.AF_UNIX:
            self._unix_path = listener.getsockname()
            self._server = await self._loop.create_unix_server(factory, sock=listener)
        else:
            self._server = await self._loop.create_server(factory, sock=listener)
        driver = self.debugger.driver
        if driver.capabilities.run_control:
            self._stop_fd = driver.stop_fileno()
        if self._stop_fd is not None:
            self._loop.add_reader(self._stop_fd, self._on_driver_readable)

    def _unwatch(self) -> None:
        if self._loop is not None and self._stop_fd is not None:
            try:
                self._loop.remove_reader(self._stop_fd)
            except (ValueError, OSError):
                pass
        self._stop_fd = None

    async def close(self) -> None:
        self._unwatch()
        if self._server is not None:
            self._server.close()
        if self._unix_path and os.path.exists(self._unix_path):
            os.unlink(self._unix_path)
        active, self.active = self.active, None
        if active is not None:
            active.cancel_pending()
            active.done = True
            active.transport.close()

    def finish(self, event: StopEvent | None) -> None:
        """The machine is gone (or killed): stop serving."""
        self._unwatch()
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(event)

    def _on_driver_readable(self) -> None:
        try:
            event = self.debugger.poll()
        except MachineGone:
            event = StopEvent(StopReason.EXITED, None, exit_code=0)
        except DriverError as exc:
            log.error("hypervisor error while running: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: logged where the fuzz tests look
            log_internal_error(log, "polling the hypervisor for a stop", exc)
            return
        if event is None:
            return
        if self.active is not None:
            self.active.on_stop(event)
        elif event.reason is not StopReason.EXITED:
            # Nobody is attached (a stop we did not ask for): let the guest go on.
            log.info("unattended stop on CPU#%s; resuming", (event.cpu or 1) - 1)
            self.debugger.detach()
        if event.reason is StopReason.EXITED:
            self.finish(event)


class GdbConnection(asyncio.BufferedProtocol):
    """One client's connection. See the module docstring."""

    def __init__(self, server: RspServer) -> None:
        # Received bytes land in one buffer kept for the connection: asyncio's plain Protocol
        # allocates 256 KiB for every read (10 us a packet here, against 1.5 us for 64 KiB).
        self._received = memoryview(bytearray(0x10000))
        self.server = server
        self.debugger = server.debugger
        self.decoder = codec.Decoder()
        self.session: Session | None = None
        self.transport: asyncio.Transport
        self.waiting_for_stop = False
        self.pending: asyncio.Task[list[bytes]] | None = None  # a long monitor command
        self.rejected = False
        self.rejected_reply_sent = False
        self.peer = "?"
        self._queued: list[codec.Event] = []
        self.done = False  # detached or killed: nothing more from this client is served

    # -- asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.server.active is not None:
            self.rejected = True
            log.warning("refusing %s: %s holds the session", self.peer, self.server.active.peer)
            return
        self.server.active = self
        log.info("GDB connected from %s", self.peer)
        try:
            self.debugger.halt()
        except (DriverError, TimeoutError) as exc:
            log.error("could not stop the machine for %s: %s", self.peer, exc)
            transport.close()
            return
        self.debugger.client_attached()
        self.session = Session(
            self.debugger, host_files=self.server.local, save_machine=self.server.save_machine
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._received[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.decoder.feed(data)
        for event in self.decoder.events():
            if self.done:
                return  # what a client sends after D or k is not served: the guest is let go
            if self.pending is not None:
                if isinstance(event, codec.Interrupt):
                    log.info("^C while a monitor command is in progress: it cannot be interrupted")
                else:
                    self._queued.append(event)  # answered once the command is done
                continue
            if self.waiting_for_stop and not isinstance(event, codec.Interrupt):
                self._queued.append(event)  # all-stop: answered once the machine stops
                continue
            self._on_event(event)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server.active is not self:
            return
        self.done = True
        if self.pending is not None:
            log.info("GDB at %s went away during a monitor command; releasing after it", self.peer)
            return  # _on_answer releases the machine
        log.info("GDB at %s went away; releasing the machine", self.peer)
        self.server.active = None
        self._release_machine()

    # -- events -----------------------------------------------------------------------------------

    def _on_event(self, event: codec.Event) -> None:
        if self.rejected:
            if isinstance(event, codec.Packet) and not self.rejected_reply_sent:
                # `E.text` is shown by GDB ("Remote failure reply: E.vmigdb: ..."); an `O` packet
                # would be taken as part of the qSupported answer and only warned about.
                holder = self.server.active.peer if self.server.active else "another client"
                self.transport.write(b"+")
                self._send(
                    f"E.vmigdb: the session is held by GDB at {holder}; one client at a time".encode()
                )
                # Closing at once would reset the connection under the reply before GDB reads it.
                self.rejected_reply_sent = True
                asyncio.get_running_loop().call_later(1.0, self.transport.close)
            return
        if self.session is None:
            return
        if isinstance(event, codec.Packet):
            if not self.session.no_ack:
                self.transport.write(b"+")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("gdb -> %r", event.data[:200])
            self._apply(self.session.handle(event.data))
        elif isinstance(event, codec.Corrupt):
            log.info("corrupt packet from GDB (%s)", event.reason)
            if self.session.no_ack:
                self._send(EINVAL)
            else:
                self.transport.write(b"-")
        elif isinstance(event, codec.Interrupt):
            if self.waiting_for_stop:
                self.debugger.interrupt()
        # Acks and Nacks need nothing: replies are never retransmitted on a reliable stream.

    def _apply(self, outcome: Outcome) -> None:
        for reply in outcome.replies:
            self._send(reply)
        action = outcome.action
        if isinstance(action, Resume):
            refused = self.session.run(action)  # the session maps every failure to its reply
            for reply in refused:
                self._send(reply)
            self.waiting_for_stop = not refused
        elif isinstance(action, Await):
            loop = asyncio.get_running_loop()
            self.pending = loop.create_task(action.replies)
            self.pending.add_done_callback(self._on_answer)
            loop.call_later(1.0, self._keep_alive, self.pending, action.keepalive)
        elif isinstance(action, Detach):
            log.info("GDB at %s detached", self.peer)
            self.done = True
            self.server.active = None
            self._release_machine()
            self.transport.close()
        elif isinstance(action, Kill):
            log.info("GDB at %s killed the machine", self.peer)
            self.done = True
            self.server.active = None
            self.debugger.breakpoints.clear()
            self.debugger.driver.kill()
            self.transport.close()
            self.server.finish(None)

    def on_stop(self, event: StopEvent) -> None:
        if self.session is None:
            return
        if not self.waiting_for_stop and event.reason is not StopReason.EXITED:
            # GDB believes the machine stopped, and now it is: nothing to tell. Resuming here
            # would leave GDB's next packets served while the guest runs.
            log.warning("a stop GDB did not wait for (%s); the guest stays stopped", event.reason)
            return
        self.waiting_for_stop = False
        for reply in self.session.stop_replies(event):
            self._send(reply)
        self._drain()

    def _on_answer(self, task: asyncio.Task[list[bytes]]) -> None:
        """A long monitor command finished: send its replies, then what GDB sent meanwhile."""
        self.pending = None
        if task.cancelled():
            return
        if self.done:  # GDB went away meanwhile
            if self.server.active is self:
                self.server.active = None
                self._release_machine()
            return
        try:
            replies = task.result()
        except Exception as exc:  # noqa: BLE001 - the session maps failures; this is a bug
            log_internal_error(log, "finishing a monitor command", exc)
            replies = [INTERNAL]
        for reply in replies:
            self._send(reply)
        self._drain()

    def _keep_alive(self, task: asyncio.Task[list[bytes]], packet: bytes) -> None:
        """Tell GDB, once a second, that the monitor command still works (see `Await`)."""
        if self.pending is task and not self.done:
            self._send(packet)
            asyncio.get_running_loop().call_later(1.0, self._keep_alive, task, packet)

    def cancel_pending(self) -> None:
        if self.pending is not None:
            self.pending.cancel()

    def _drain(self) -> None:
        """Serve the packets held while the machine ran or a monitor command worked."""
        queued, self._queued = self._queued, []
        for item in queued:
            if self.done:
                return
            if self.waiting_for_stop or self.pending is not None:
                self._queued.append(item)
            else:
                self._on_event(item)

    def _send(self, payload: bytes) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("gdb <- %r", payload[:200])
        self.transport.write(codec.encode_packet(payload))

    def _release_machine(self) -> None:
        """Leave the guest running with no breakpoint of ours; for a single session, take the
        debugger off and end serving: the VM's owner puts it back as it was found."""
        try:
            if self.debugger.running:
                self.debugger.halt()
            self.debugger.detach(run=not self.server.single_session)
        except (DriverError, TimeoutError) as exc:
            log.error("could not release the machine cleanly: %s", exc)
        if self.server.single_session:
            self.server.finish(None)
