"""`vFile:` host I/O over RSP, serving in-memory files only (the symbol ELFs vmigdb synthesizes: the
kernel's and the shared libraries it lists; the /proc files of `vmigdb.rsp.procfs`).

GDB 13 with its default `sysroot target:` asks `qXfer:exec-file:read` for the executable's path, then
opens it with `vFile:open`, reads it with `vFile:pread` and checks its size with `vFile:fstat`. Nothing
on vmigdb's host filesystem is reachable this way: only the names the debugger offers exist; every
other name is ENOENT. A file's contents are made when it is opened and kept until it is closed.

Replies follow GDB's File-I/O conventions: `F<result>` or `F-1,<errno>`; pread's data and fstat's
`struct stat` come after a `;`, escaped as binary. The `struct stat` is GDB's fileio layout, big-endian
(GDB manual, "struct stat").
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from vmigdb.rsp.errors import PacketError
from vmigdb.rsp.parse import hex_data, hex_number
from vmigdb.wire import codec

_STAT = struct.Struct(
    ">IIIIIIIQQQIII"
)  # dev ino mode nlink uid gid rdev size blksize blocks a/m/ctime
_S_IFREG = 0o100000
MAX_OPEN = 16


def _error(code: int) -> bytes:
    return b"F-1,%x" % code


class VFileServer:
    """Open files of one GDB session. `contents(path)` is a file's bytes, or None: no such file."""

    def __init__(self, contents: Callable[[str], bytes | None]) -> None:
        self._contents = contents
        self._open: dict[int, bytes] = {}

    def handle(self, args: bytes) -> bytes:
        """`args` is what follows `vFile:`."""
        op, _, rest = args.partition(b":")
        params = rest.split(b",") if rest else []
        try:
            if op == b"setfs":
                return b"F0"  # one filesystem: the debugger's
            if op == b"open":
                return self._open_file(params)
            if op == b"pread":
                return self._pread(params)
            if op == b"fstat":
                return self._fstat(params)
            if op == b"close":
                if len(params) != 1:
                    raise PacketError("close takes fd")
                found = self._open.pop(hex_number(params[0]), None) is not None
                return b"F0" if found else _error(errno.EBADF)
            if op in (b"pwrite", b"unlink", b"readlink"):
                return _error(errno.EROFS if op != b"readlink" else errno.ENOENT)
        except PacketError:
            return _error(errno.EINVAL)
        return b""  # unknown vFile operation: unsupported

    def _open_file(self, params: list[bytes]) -> bytes:
        if len(params) != 3:
            raise PacketError("open takes pathname,flags,mode")
        path = hex_data(params[0]).decode("utf-8", "replace")
        flags = hex_number(params[1])
        if flags & 0x3:  # O_WRONLY / O_RDWR in GDB's fileio flags
            return _error(errno.EROFS)
        data = self._contents(path)
        if data is None:
            return _error(errno.ENOENT)
        if len(self._open) >= MAX_OPEN:
            return _error(errno.EMFILE)
        fd = next(n for n in range(3, 3 + MAX_OPEN + 1) if n not in self._open)
        self._open[fd] = data
        return b"F%x" % fd

    def _pread(self, params: list[bytes]) -> bytes:
        if len(params) != 3:
            raise PacketError("pread takes fd,count,offset")
        fd, count, offset = (hex_number(p) for p in params)
        data = self._open.get(fd)
        if data is None:
            return _error(errno.EBADF)
        chunk = data[offset : offset + min(count, 0x10000)]
        return b"F%x;" % len(chunk) + codec.escape_binary(chunk)

    def _fstat(self, params: list[bytes]) -> bytes:
        if len(params) != 1:
            raise PacketError("fstat takes fd")
        data = self._open.get(hex_number(params[0]))
        if data is None:
            return _error(errno.EBADF)
        blocks = (len(data) + 511) // 512
        stat = _STAT.pack(0, 1, _S_IFREG | 0o444, 1, 0, 0, 0, len(data), 4096, blocks, 0, 0, 0)
        return b"F%x;" % len(stat) + codec.escape_binary(stat)
