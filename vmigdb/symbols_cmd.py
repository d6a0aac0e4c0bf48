"""`vmigdb symbols`: write the guest kernel's symbol ELF for clients that cannot fetch it themselves
(LLDB, IDA, Ghidra, radare2...).

Two sources: boot a kernel under QEMU and read it (`--kernel`), or ask a running vmigdb over RSP
(`--from HOST:PORT`), the same way GDB does (qXfer:exec-file:read, then vFile).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.wire import codec
from vmigdb.wire.client import PeerGone, RspClient

log = logging.getLogger("vmigdb")


def symbols_from_boot(
    kernel: Path, initrd: Path | None, append: str, timeout: float = 120
) -> bytes:
    """Boot the kernel (KASLR as configured), wait until it can be analysed, build the ELF."""
    from vmigdb.arch.x86_64.paging import PhysicalMemoryError
    from vmigdb.guest import registry
    from vmigdb.guest.base import GuestError
    from vmigdb.hv.qemu.process import QemuConfig, QemuProcess

    process = QemuProcess.start(QemuConfig(kernel=kernel, initrd=initrd, append=append))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                guest = registry.attach(process.memory.read, process.memory.ranges())
                return guest.symbol_elf
            except (GuestError, PhysicalMemoryError) as exc:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SetupError(f"the booted kernel could not be analysed: {exc}") from None
                time.sleep(0.5)
    finally:
        process.terminate()


def _connect(address: str) -> RspClient:
    """A blocking RSP client to a running vmigdb: the project's own (`vmigdb.wire.client`)."""
    try:
        if address.startswith("unix:"):
            return RspClient.connect_unix(address[5:], timeout=60)
        host, _, port = address.rpartition(":")
        return RspClient.connect_tcp(host or "127.0.0.1", int(port), timeout=60)
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot reach a vmigdb server at {address}: {exc}") from None


def symbols_from_server(address: str) -> bytes:
    client = _connect(address)
    try:
        name = client.request(b"qXfer:exec-file:read::0,1000")
        if not name.startswith((b"l", b"m")):
            raise SetupError(f"the server has no symbol file for this guest ({name.decode()})")
        # The name GDB gets has the kernel image alone (modules come as libraries); the same
        # name with "+modules" has every loaded module's symbols too.
        path = codec.unescape_binary(name[1:]) + b"+modules"
        fd = client.request(b"vFile:open:" + codec.encode_hex(path) + b",0,0")
        if not fd.startswith(b"F") or fd.startswith(b"F-"):
            raise SetupError(f"the server would not open {path.decode()}: {fd.decode()}")
        data = bytearray()
        while True:
            reply = client.request(b"vFile:pread:%s,10000,%x" % (fd[1:], len(data)))
            count, _, body = reply[1:].partition(b";")
            if reply.startswith(b"F-"):
                raise SetupError(f"reading {path.decode()} failed: {reply.decode()}")
            if int(count, 16) == 0:
                break
            data += codec.unescape_binary(body)
        client.request(b"vFile:close:" + fd[1:])
        client.request(b"D")  # detach: the guest runs on
        return bytes(data)
    except PeerGone as exc:
        raise SetupError(f"the vmigdb server closed the connection: {exc}") from None
    except TimeoutError:
        raise SetupError(f"the vmigdb server at {address} did not answer in time") from None
    finally:
        client.close()
