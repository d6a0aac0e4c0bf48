"""Guest-physical memory of a raw image, read through libvmi's File driver.

libvmi (PyPI wheel 3.7.1) is the reader: `LibvmiMemory.read` is ``vmi_read_pa``. vmigdb checks
each read against the RAM ranges first, so a read outside RAM is a `PhysicalMemoryError` (the raw
file reads zeros in holes; libvmi would happily return them).

Speed, measured on this machine (2 shared cores; dumps of the demo guest, flattened): ``read_pa``
serves ~200,000 small reads/s (5 us each: one page-table entry) and 0.3-1.6 GB/s for 64 KiB-8 MiB
reads (the low end under load from other work); an mmap of the same file does ~3,000,000 small
reads/s and 15-40 GB/s. That gap does not reach the user: GDB decodes at most ~20 MB/s of ``m``
replies, vmigdb's page walks are cached per page, and the one bulk job, finding the kernel, reads
only what the raw copy holds data for (`data_ranges`): on a 4 GiB dump, kernel and 87,000 symbols
in 0.7-1.1 s through libvmi. So libvmi serves every read; nothing here bypasses it.

Memory: libvmi caches a bounded number of pages (``memory_cache``, halved when full) and reads the
file with ``read(2)``: reading all 4 GiB of a dump through it peaks at 53 MiB RSS (vmigdb's own
process, Python included).

Workarounds for the 3.7.1 wheel, each where it applies:
- File-mode ``vmi_init`` on a path it cannot open crashes the process (a segfault right after
  "VMI_ERROR: Failed to open file", reproduced here), and the file's base name is parsed as part
  of a ``VMIConfig.STRING`` config: libvmi is given a private one-word symlink to the file vmigdb
  already holds open (`_libvmi_name`).
- ``vmi_init_os`` needs ``ostype = "Linux"`` in the config to take ``pagemode`` and ``kpgd`` at
  all; it then fails to find ``init_task`` (no profile: vmigdb's own guest.linux does the OS part)
  and prints two VMI_ERROR lines, on stdout, but paging is set up. Those lines are dropped.
- The wheel's ``Libvmi`` wrapper leaves ``vmi_destroy`` to the caller (no ``__del__``): `close`
  does it.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.errors import SetupError

__all__ = ["LibvmiMemory", "physical_error"]

log = logging.getLogger("vmigdb.hv.libvmi")

_U64 = (1 << 64) - 1


def physical_error(address: int) -> PhysicalMemoryError:
    """``PhysicalMemoryError(address)`` with ``.address``: the first guest-physical byte not RAM."""
    err = PhysicalMemoryError(f"guest-physical {address:#x} is not RAM in this dump")
    err.address = address  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send fds 1 and 2 to /dev/null meanwhile, for a libvmi call whose failure is expected: the
    wheel's libvmi prints its errors on stdout (buffered, with a stray NUL byte), where vmigdb
    prints what users and scripts read. C's streams are flushed before the fds come back."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = [os.dup(1), os.dup(2)]
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def _libvmi_name(fd: int) -> Iterator[str]:
    """A path naming open file *fd* for libvmi to open: a private symlink to ``/proc/self/fd/N``.

    Two wheel bugs call for it. File-mode ``vmi_init`` on a path it cannot open segfaults, so
    libvmi must open the file vmigdb already holds, which cannot vanish in between. And libvmi
    puts the file's base name in front of a ``VMIConfig.STRING`` config before parsing it, so a
    name that is not one word ("3" from /proc/self/fd/3, "my dump.raw") makes the config a
    syntax error. The link is removed as soon as libvmi has opened it.
    """
    target = f"/proc/self/fd/{fd}"
    if not os.path.exists(target):
        raise SetupError("libvmi's File driver needs /proc (to open the image vmigdb holds)")
    tmp = tempfile.mkdtemp(prefix="vmigdb-libvmi-")
    link = os.path.join(tmp, "vmigdb-raw")
    try:
        os.symlink(target, link)
        yield link
    finally:
        with contextlib.suppress(OSError):
            os.unlink(link)
        os.rmdir(tmp)


class LibvmiMemory:
    """A raw physical image opened with libvmi's File driver (read-only).

    :param path: The raw image (file offset = guest-physical address).
    :param ranges: Guest-physical RAM as sorted, disjoint ``(start, end)``; reads outside raise.
    :raises SetupError: if the file cannot be opened or libvmi refuses it.
    """

    def __init__(self, path: str | os.PathLike[str], ranges: list[tuple[int, int]]) -> None:
        from libvmi import Libvmi, LibvmiError, VMIMode

        self.path = Path(path)
        self._error = LibvmiError
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SetupError(f"cannot open {self.path}: {e.strerror or e}") from None
        self._vmi = None
        self.kernel_cr3: int | None = None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise SetupError(f"{self.path} is not a regular file")
            self.file_size = st.st_size
            if not ranges or ranges[-1][1] > st.st_size:
                raise SetupError(
                    f"{self.path} holds {st.st_size} bytes; RAM up to "
                    f"{ranges[-1][1] if ranges else 0:#x} does not fit in it"
                )
            self._starts = [a for a, _ in ranges]
            self._ranges = list(ranges)
            try:
                with _libvmi_name(self._fd) as name:
                    self._vmi = Libvmi(name, mode=VMIMode.FILE, partial=True)
            except LibvmiError as e:
                raise SetupError(f"libvmi's File driver cannot open {self.path}: {e}") from None
        except BaseException:
            self.close()
            raise
        log.info("libvmi File driver: %s (%d bytes)", self.path, self.file_size)

    def set_kernel_page_tables(self, cr3: int) -> None:
        """Tell libvmi the kernel's page tables (4-level paging), so `translate` works.

        vmigdb's own reads never need it: this is libvmi's ``VMIConfig.STRING`` config, given to
        ``vmi_init_os`` (see the module docstring for why it must say ``ostype = "Linux"``).
        """
        from libvmi import VMIConfig

        if self._vmi is None:
            return
        cr3 &= 0x000F_FFFF_FFFF_F000  # no PCID or flag bits
        config = f'{{ ostype = "Linux"; pagemode = "VMI_PM_IA32E"; kpgd = {cr3:#x}; }}'
        with _quiet():
            self._vmi.init_os(VMIConfig.STRING, config)
        self.kernel_cr3 = cr3

    def ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM as ``(start, end)`` ranges, end exclusive."""
        return list(self._ranges)

    def data_ranges(self) -> list[tuple[int, int]]:
        """The parts of RAM the file holds data for: its holes (``SEEK_HOLE``) read as zeros.

        A flattened dump leaves the guest's all-zero memory as holes, so a scan for something
        non-zero (the kernel's VMCOREINFO text) need only read these: on the 4 GiB demo guest,
        ~170 MiB instead of 4 GiB. Without hole support it is all of RAM.
        """
        if self._fd < 0:
            return []
        extents = []
        pos = 0
        try:
            while pos < self.file_size:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
                end = os.lseek(self._fd, start, os.SEEK_HOLE)
                extents.append((start, end))
                pos = end
        except OSError as e:  # ENXIO: no data past pos; EINVAL: no SEEK_DATA here
            if e.errno != errno.ENXIO:
                return self.ranges()
        out = []
        for a, b in self._ranges:
            for c, d in extents:
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    out.append((lo, hi))
        return out

    def _check(self, pa: int, length: int) -> None:
        if length < 0:
            raise ValueError(f"negative read length {length}")
        i = bisect.bisect_right(self._starts, pa) - 1
        if i < 0 or pa >= self._ranges[i][1]:
            raise physical_error(pa)
        end = self._ranges[i][1]
        if pa + length > end:
            raise physical_error(end)

    def read(self, pa: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``pa``, read by libvmi (``vmi_read_pa``).

        :raises PhysicalMemoryError: if any of it is not RAM (``.address``: the first such byte).
        """
        self._check(pa, length)
        if length == 0:
            return b""
        if self._vmi is None:
            raise physical_error(pa)
        try:
            data, count = self._vmi.read_pa(pa, length)
        except self._error:
            raise physical_error(pa) from None
        if count != length:
            raise physical_error(pa + count)
        return data

    def translate(self, dtb: int, va: int) -> int | None:
        """libvmi's own page walk (``vmi_pagetable_lookup``): *va* under page tables *dtb*.

        Needs `set_kernel_page_tables` first (it sets libvmi's paging mode); None if *va* does not
        translate.
        """
        if self._vmi is None or self.kernel_cr3 is None:
            return None
        try:
            return self._vmi.pagetable_lookup(dtb & _U64, va & _U64)
        except self._error:
            return None

    def close(self) -> None:
        """Release libvmi's instance and the file. Safe to call twice."""
        vmi, self._vmi = self._vmi, None
        if vmi is not None:
            vmi.destroy()
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> LibvmiMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
