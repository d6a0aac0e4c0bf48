"""A deterministic writer (and a reader, for tests) of the "newc" cpio format the kernel unpacks.

Written here rather than run through the `cpio` tool so that a fresh machine needs one tool fewer
and so that identical inputs give identical bytes: every mtime, uid, gid and inode number is fixed.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_FIELDS = 13  # after the magic: ino mode uid gid nlink mtime filesize devmaj devmin rdevmaj rdevmin
# namesize check, each 8 hex digits
_HEADER_LEN = len(MAGIC) + _FIELDS * 8


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; `name` has no leading slash, `mode` includes the file-type bits."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, entry: CpioEntry, mtime: int) -> bytes:
    name = entry.name.lstrip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, mtime, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad4(_HEADER_LEN + len(name)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: Iterable[CpioEntry], *, mtime: int = 0) -> bytes:
    """Return the archive bytes, members in the given order (parents must come before children)."""
    parts = [_member(ino, entry, mtime) for ino, entry in enumerate(entries, start=1)]
    parts.append(_member(0, CpioEntry(TRAILER, 0), 0))
    return b"".join(parts)


def read_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc archive into entries (trailer excluded); for tests and for inspection."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if archive[pos : pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        f = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(_FIELDS)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name_start = pos + _HEADER_LEN
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(_HEADER_LEN + namesize) % 4)
        data = archive[data_start : data_start + size]
        pos = data_start + size + (-size % 4)
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, data, rdev))
