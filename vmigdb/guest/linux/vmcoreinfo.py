"""The kernel's VMCOREINFO note: finding its text in guest-physical RAM and parsing it.

At boot (``crash_save_vmcoreinfo_init()``, a subsys_initcall in kernel/crash_core.c, moved to
kernel/vmcore_info.c in v6.9) every kernel built with CONFIG_VMCORE_INFO (CONFIG_CRASH_CORE before
v6.9; on in every distribution kernel) writes ``KEY=value`` lines into a page it allocates
(``vmcoreinfo_data``) and copies them into an ELF note (``vmcoreinfo_note``, name "VMCOREINFO").
No device is needed: the text simply sits in guest RAM, so a scan for its first line,
``OSRELEASE=``, finds it. Both copies carry the same text; stale copies (a previous kernel's,
before a kexec or a reboot) can also be found, so callers must validate what they parse.

Line formats (include/linux/vmcore_info.h)::

    OSRELEASE=6.1.0-56-cloud-amd64
    SYMBOL(init_uts_ns)=ffffffffa65f9b60     hex, no 0x
    OFFSET(uts_namespace.name)=0             decimal
    SIZE(page)=64  LENGTH(zone.free_area)=11 decimal
    NUMBER(phys_base)=-134217728             decimal, signed ("%ld")
    KERNELOFFSET=23a00000                    hex, no 0x (x86)
"""

from __future__ import annotations

from collections.abc import Iterator

from vmigdb.arch.x86_64.paging import PhysicalMemoryError, ReadPhys

__all__ = [
    "VMCOREINFO_MAX_BYTES",
    "find_vmcoreinfo_text",
    "parse_vmcoreinfo",
    "vmcoreinfo_hex",
    "vmcoreinfo_number",
    "vmcoreinfo_symbol",
]

# VMCOREINFO_BYTES is PAGE_SIZE on every kernel so far; read a little more in case it grows.
VMCOREINFO_MAX_BYTES = 8192
_MARKER = b"OSRELEASE="
_CHUNK = 2 << 20  # scan RAM 2 MiB at a time: bytes.find over large reads is the fast path


def parse_vmcoreinfo(text: str | bytes) -> dict[str, str]:
    """``KEY=value`` lines of a VMCOREINFO text as a dict (stops at the first NUL).

    Lines without ``=`` are ignored; a repeated key keeps its last value (as makedumpfile does).

    >>> parse_vmcoreinfo("OSRELEASE=6.1.0\\nSYMBOL(_stext)=ffffffff81000000\\n")["SYMBOL(_stext)"]
    'ffffffff81000000'
    """
    if isinstance(text, bytes):
        text = text.split(b"\0", 1)[0].decode("ascii", "replace")
    else:
        text = text.split("\0", 1)[0]
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            info[key.strip()] = value.strip()
    return info


def vmcoreinfo_hex(info: dict[str, str], key: str) -> int | None:
    """The hex value of *key* (``SYMBOL(...)``, ``KERNELOFFSET``), or None if absent.

    :raises ValueError: if the value is present but not hex.
    """
    value = info.get(key)
    if value is None:
        return None
    return int(value, 16)


def vmcoreinfo_symbol(info: dict[str, str], name: str) -> int | None:
    """``SYMBOL(name)`` as an int, or None if absent."""
    return vmcoreinfo_hex(info, f"SYMBOL({name})")


def vmcoreinfo_number(info: dict[str, str], key: str) -> int | None:
    """A decimal value: ``NUMBER(name)``, ``OFFSET(a.b)``, ``SIZE(x)``, ``LENGTH(x)``.

    *key* is the whole key, e.g. ``"NUMBER(phys_base)"``. Negative values stay negative.

    :raises ValueError: if the value is present but not decimal.
    """
    value = info.get(key)
    if value is None:
        return None
    return int(value, 10)


def _chunk_order(ram_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """RAM in ``(start, range end)`` chunks, taken alternately from the bottom and the top.

    The page allocator hands out the two VMCOREINFO pages early in boot, and they land near
    either end of RAM (measured on the demo guest: ~19 MiB or ~500 MiB of 512 MiB); scanning
    from both ends inwards finds either in a few chunks instead of a pass over all of RAM.
    """
    chunks = [(pos, end) for start, end in sorted(ram_ranges) for pos in range(start, end, _CHUNK)]
    order = []
    lo, hi = 0, len(chunks) - 1
    while lo <= hi:
        order.append(chunks[lo])
        if hi != lo:
            order.append(chunks[hi])
        lo += 1
        hi -= 1
    return order


def _scan(read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """``(phys_addr, range end)`` of every ``OSRELEASE=`` in RAM, in `_chunk_order`."""
    overlap = len(_MARKER) - 1
    for pos, end in _chunk_order(ram_ranges):
        try:
            data = read_phys(pos, min(_CHUNK + overlap, end - pos))
        except PhysicalMemoryError:
            continue
        i = data.find(_MARKER)
        while 0 <= i < _CHUNK:  # hits in the overlap belong to the next chunk
            yield pos + i, end
            i = data.find(_MARKER, i + 1)


def _read_text(read_phys: ReadPhys, pa: int, end: int) -> bytes:
    length = min(VMCOREINFO_MAX_BYTES, end - pa)
    while length > 0:
        try:
            data = read_phys(pa, length)
        except PhysicalMemoryError:
            length -= 4096
            continue
        return data.split(b"\0", 1)[0]
    return b""


def find_vmcoreinfo_text(
    read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]
) -> Iterator[tuple[int, bytes]]:
    """Every text in RAM that looks like a VMCOREINFO note, as ``(phys_addr, text)``.

    ``Iterator[(u64 pa, bytes text)] find_vmcoreinfo_text(ReadPhys read_phys, ranges)``

    Lazy, and from both ends of RAM inwards (2 MiB at a time), so a caller that stops at the
    first copy that validates reads little of RAM. Texts that cannot be a filled-in note (the
    kernel's own
    ``"OSRELEASE=%s\\n"`` format string, fragments without a second line) are skipped;
    nothing else is checked here.
    """
    for pa, end in _scan(read_phys, ram_ranges):
        text = _read_text(read_phys, pa, end)
        first, sep, rest = text.partition(b"\n")
        if not sep or b"%" in first or b"=" not in rest:
            continue
        yield pa, text
