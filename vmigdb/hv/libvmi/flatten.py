"""An ELF dump's memory as a raw image (file offset = guest-physical address), made once.

libvmi's File driver reads raw physical images only, so an ELF dump's PT_LOAD segments are copied
to their guest-physical offsets in a sparse file: all-zero runs (most of an idle guest's RAM) stay
holes, so the copy costs disk only for the guest's used memory, and time mostly for reading the
dump (~2.9 GB/s from the page cache here). One page after the highest RAM address holds a trailer
(`TRAILER_MAGIC` + JSON) naming the dump it was made from and a key (device, inode, size, mtime
and the program headers): the raw image is reused, not remade, while the dump is unchanged.

Where it goes: beside the dump (``DUMP.vmigdb-raw``) when that directory is writable, else in the
cache directory (``$XDG_CACHE_HOME/vmigdb/raw``, else ``~/.cache/vmigdb/raw``, 0700). Always
owner-only (0600): it is guest RAM. A raw image is used only if it is a regular file owned by this
user, not readable by others, of the right size and with the right trailer; it is written under a
temporary name and renamed, so a killed vmigdb never leaves a half-made one under the real name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.hv.libvmi.elfcore import ElfCore, read_elf_core

__all__ = ["TRAILER_MAGIC", "Flattened", "cache_dir", "flatten", "raw_copy", "raw_size"]

log = logging.getLogger("vmigdb.hv.libvmi")

PAGE = 4096
TRAILER_MAGIC = b"vmigdb flattened dump v1\n"
_CHUNK = 1 << 20  # read the dump 1 MiB at a time
_SUB = 64 << 10  # ...and leave holes at 64 KiB granularity
_ZERO = bytes(_CHUNK)
_ZERO_SUB = bytes(_SUB)


@dataclass(frozen=True)
class Flattened:
    """A raw image of a dump's memory, ready for libvmi.

    :ivar path: The raw image.
    :ivar reused: True if it was already there (nothing was written).
    :ivar seconds: Time taken to make (or find) it.
    :ivar written: Bytes of RAM data written (the rest are holes).
    """

    path: Path
    reused: bool
    seconds: float
    written: int


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vmigdb/raw``, else ``~/.cache/vmigdb/raw`` (not created here)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "vmigdb" / "raw"


def raw_size(core: ElfCore) -> int:
    """Size of the raw image: RAM up to its highest address, page-rounded, plus the trailer page."""
    end = max(s.end for s in core.loads)
    return (end + PAGE - 1) // PAGE * PAGE + PAGE


def _key(core: ElfCore, st: os.stat_result) -> str:
    h = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:".encode())
    h.update(core.phdrs)
    return h.hexdigest()[:32]


def _trailer(core: ElfCore, key: str) -> bytes:
    meta = {"key": key, "source": str(core.path.resolve()), "ram": core.ram_ranges()}
    body = TRAILER_MAGIC + json.dumps(meta).encode() + b"\n"
    if len(body) > PAGE:  # thousands of RAM ranges: keep the key, drop the listing
        body = TRAILER_MAGIC + json.dumps({"key": key}).encode() + b"\n"
    return body.ljust(PAGE, b"\0")


def _usable(path: Path, size: int, key: str) -> bool:
    """An existing raw image made for this very dump, private to this user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return False
        if st.st_size != size:
            return False
        tail = os.pread(fd, PAGE, size - PAGE)
    finally:
        os.close(fd)
    if not tail.startswith(TRAILER_MAGIC):
        return False
    try:
        meta = json.loads(tail[len(TRAILER_MAGIC) :].split(b"\n", 1)[0])
    except ValueError:
        return False
    return isinstance(meta, dict) and meta.get("key") == key


def _extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[start, end)`` of file *fd* that hold data (all of it without SEEK_DATA)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # no SEEK_DATA on this filesystem: read it all
                yield pos, end
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _copy(core: ElfCore, src: int, dst: int) -> int:
    """Copy every PT_LOAD to its physical offset, skipping all-zero 64 KiB runs and the dump's
    own holes (QEMU writes every byte, but a copy made with ``cp --sparse`` has holes). Returns
    the bytes written."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    written = 0
    for seg in core.loads:
        for start, end in _extents(src, seg.offset, seg.offset + seg.filesz):
            pos = start
            while pos < end:
                n = min(_CHUNK, end - pos)
                got = os.preadv(src, [view[:n]], pos)
                if got != n:
                    raise OSError(f"short read at {pos} in {core.path}")
                # bytearray == bytes is a memcmp; most of an idle guest's RAM is zero.
                if not (buf == _ZERO if n == _CHUNK else buf[:n] == _ZERO[:n]):
                    pa = seg.paddr + pos - seg.offset
                    for sub in range(0, n, _SUB):
                        part = buf[sub : min(n, sub + _SUB)]
                        if part != _ZERO_SUB[: len(part)]:
                            os.pwrite(dst, part, pa + sub)
                            written += len(part)
                pos += n
    return written


def _write(core: ElfCore, src: int, target: Path, size: int, key: str) -> int:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        written = _copy(core, src, fd)
        os.pwrite(fd, _trailer(core, key), size - PAGE)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return written


def _candidates(core: ElfCore, st: os.stat_result, explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit / f"{st.st_dev:x}-{st.st_ino:x}.raw"]
    beside = core.path.with_name(core.path.name + ".vmigdb-raw")
    return [beside, cache_dir() / f"{st.st_dev:x}-{st.st_ino:x}.raw"]


def flatten(core: ElfCore, fd: int, directory: Path | None = None) -> Flattened:
    """The raw image of *core*'s memory (open at *fd*): found if already made, else made now.

    ``Flattened flatten(ElfCore core, int fd, Path | None directory)``: *directory* forces where it
    goes (default: beside the dump, else the cache directory).

    :raises SetupError: if no location can hold it (the message says how much room it needs).
    """
    start = time.perf_counter()
    st = os.fstat(fd)
    key = _key(core, st)
    size = raw_size(core)
    places = _candidates(core, st, directory)
    for place in places:
        if _usable(place, size, key):
            log.info("reusing %s for %s", place, core.path)
            return Flattened(place, True, time.perf_counter() - start, 0)
    data = sum(s.filesz for s in core.loads)
    errors = []
    for place in places:
        try:
            if place.parent == cache_dir() or place.parent == directory:
                place.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            written = _write(core, fd, place, size, key)
        except OSError as e:
            errors.append(f"{place.parent}: {e.strerror or e}")
            log.info("cannot flatten %s into %s: %s", core.path, place, e)
            continue
        seconds = time.perf_counter() - start
        log.info(
            "flattened %s into %s: %d MiB of data (of %d MiB) in %.2f s",
            core.path,
            place,
            written >> 20,
            data >> 20,
            seconds,
        )
        return Flattened(place, False, seconds, written)
    raise SetupError(
        f"cannot write the raw copy of {core.path} that libvmi reads (needs up to {data >> 20} MiB "
        f"of disk, sparse): {'; '.join(errors)}"
    )


def raw_copy(path: str | os.PathLike[str], directory: Path | None = None) -> Flattened:
    """`flatten` the ELF dump at *path*: done right after a dump is written, the first
    ``vmigdb dump --image`` of it need not make the copy.

    :raises SetupError: (DumpFormatError for a bad dump) with a one-line reason.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        return flatten(read_elf_core(fd, path), fd, directory)
    finally:
        os.close(fd)
