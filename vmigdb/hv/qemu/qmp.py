"""A thin asyncio wrapper over ``qemu.qmp.QMPClient`` for QEMU's private QMP socket.

It exists so the rest of vmigdb does not depend on qemu.qmp's exception types or its logging: QMP
failures come out as `QmpError` (a `VmigdbError`), and qemu.qmp's own loggers are kept to
WARNING and above unless the application has configured them itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError

from vmigdb.errors import VmigdbError

log = logging.getLogger("vmigdb.hv.qemu")

# qemu.qmp logs every state transition at DEBUG and some at INFO; keep it quiet unless asked.
_qmp_logger = logging.getLogger("qemu.qmp")
if _qmp_logger.level == logging.NOTSET:
    _qmp_logger.setLevel(logging.WARNING)


class QmpError(VmigdbError):
    """A QMP command failed, or the QMP connection could not be made or was lost."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class


async def _connect_unix(path: Path, timeout: float) -> socket.socket:
    """Connect to a unix socket, retrying until it is there and listening.

    Done by hand (rather than by QMPClient.connect) so the retries while QEMU is still starting do
    not each log an error from qemu.qmp.
    """
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise QmpError(f"cannot connect to QEMU's QMP socket {path}: {e}") from e
            await asyncio.sleep(0.02)
        except BaseException:
            sock.close()
            raise


class Qmp:
    """One QMP session. Use `Qmp.connect`; close it with `close` (or ``async with``)."""

    def __init__(self, client: QMPClient, path: Path) -> None:
        self._client = client
        self.path = path

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> Qmp:
        """Connect and negotiate capabilities; waits up to ``timeout`` for the socket."""
        path = Path(path)
        sock = await _connect_unix(path, timeout)
        client = QMPClient("vmigdb")
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except (QMPError, OSError, TimeoutError) as e:
            sock.close()
            raise QmpError(f"QMP handshake with {path} failed: {e}") from e
        log.debug("QMP connected to %s", path)
        return cls(client, path)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> object:
        """Run a QMP command and return its ``return`` value."""
        try:
            return await self._client.execute(cmd, args)
        except ExecuteError as e:
            raise QmpError(f"QMP {cmd} failed: {e}", e.error_class) from e
        except (ExecInterruptedError, QMPError, OSError, EOFError) as e:
            raise QmpError(f"QMP {cmd}: connection to QEMU lost ({e})") from e

    async def getfd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file descriptor (SCM_RIGHTS), known to QMP as *name* (``getfd``).

        QEMU keeps its own copy; the caller still owns and closes *fd*.
        """
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError, AssertionError) as e:
            raise QmpError(f"cannot pass a file to QEMU: {e}") from e
        await self.execute("getfd", {"fdname": name})

    async def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (e.g. ``xp``, ``info registers``) and return its text."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    async def status(self) -> str:
        """The VM run state: "running", "paused", "debug", "shutdown", ..."""
        out = await self.execute("query-status")
        assert isinstance(out, dict)
        return str(out["status"])

    async def quit(self) -> None:
        """Ask QEMU to exit; QEMU may drop the connection before or after it replies."""
        try:
            await self.execute("quit")
        except QmpError as e:
            if e.error_class is not None:
                raise
        await self.close()

    async def close(self) -> None:
        """Disconnect. Safe to call twice, and after QEMU has gone."""
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError) as e:
            log.debug("QMP disconnect: %s", e)

    async def __aenter__(self) -> Qmp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
