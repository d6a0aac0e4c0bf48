"""The kernel's own symbol table (kallsyms), decoded from its memory: no System.map, no vmlinux.

scripts/kallsyms.c emits these tables into the kernel's .rodata (x86-64 sizes)::

    kallsyms_offsets[N]       s32 each (CONFIG_KALLSYMS_BASE_RELATIVE, x86-64 default since v4.6)
    kallsyms_relative_base    u64, the lowest non-absolute symbol address (normally _text)
    kallsyms_num_syms         u32 N, padded to 8
    kallsyms_names            N entries: [length][length token bytes]
    kallsyms_markers          u32 offset into kallsyms_names of every 256th entry
    kallsyms_seqs_of_names    3 bytes per symbol, name-sorted order (v6.2, also in some 6.1 builds)
    kallsyms_token_table      256 NUL-terminated strings
    kallsyms_token_index      256 u16 offsets into kallsyms_token_table

Every label is 8-byte aligned. Since v6.4 (commit 404bad70fcf7, "scripts/kallsyms: change the
output order") the address tables come last: num_syms, names, markers, token_table, token_index,
offsets, relative_base, seqs_of_names.

A name decodes by replacing each byte with its token; the first character of the result is the
symbol's type letter (``T``, ``t``, ``D``, ``b``...). Since v6.1 (commit 73bbb94466fd, "kallsyms:
support "big" kernel symbols") a length above 127 takes two bytes, ULEB128. An address is
(kernel/kallsyms.c, ``kallsyms_sym_address()``):

- with CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP until v6.15): ``offset`` if ``offset >= 0``
  (a per-CPU symbol's absolute address), else ``relative_base - 1 - offset``;
- otherwise (v6.15+, commit 01157ddc58dc "kallsyms: Remove KALLSYMS_ABSOLUTE_PERCPU"):
  ``relative_base + (u32)offset``.

Finding the tables: VMCOREINFO exports SYMBOL(kallsyms_names), SYMBOL(kallsyms_num_syms),
SYMBOL(kallsyms_token_table), SYMBOL(kallsyms_token_index), SYMBOL(kallsyms_offsets) and
SYMBOL(kallsyms_relative_base) since v6.0 (commit 5fd8fea935a1, "vmcoreinfo: include kallsyms
symbols"; later kernels may drop the relative base). Without them, the kernel image is scanned:
the token table holds every character used in a name as a one-character token at its own byte
value, so "0\\0" .. "9\\0" appear in a row (the pattern vmlinux-to-elf also starts from); the
index, markers, names and offsets are then found by their layout and checked against each other.

Whatever finds them, the result must decode consistently (markers agree with the names, addresses
sorted) and agree with VMCOREINFO (``_stext``) and memory (``linux_banner`` reads
"Linux version <release>"), or it is rejected.
"""

from __future__ import annotations

import logging
import re
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from operator import le

from vmigdb.guest.base import GuestError, Symbol
from vmigdb.guest.linux.kernel import FaultError, KernelMemory, LinuxKernel

__all__ = [
    "KallsymsNotFound",
    "KallsymsTables",
    "Symbol",
    "SymbolTable",
    "locate_kallsyms",
    "read_kallsyms",
]

log = logging.getLogger("vmigdb.guest.linux")

KSYM_NAME_LEN = 512  # v6.1 commit b8a94bfb3395 raised it from 128
_MAX_ENTRY = 2 + KSYM_NAME_LEN  # bytes one kallsyms_names entry can take
_KERNEL_HALF = 1 << 63
_CACHE_KEY = "kallsyms"
_TYPE_ORDER = "TtDdRrBbAaWwVvGgSsUu"  # to find an anchor symbol whatever its type letter


class KallsymsNotFound(GuestError):
    """The kernel's kallsyms tables could not be found or did not validate (message says why)."""


@dataclass(frozen=True)
class KallsymsTables:
    """Where the kallsyms tables are (kernel virtual addresses) and how they were found.

    :ivar source: ``"vmcoreinfo"`` or ``"scan"``.
    :ivar relative_base: Address of ``kallsyms_relative_base``, or None when unknown (the base
        is then derived from ``_stext``).
    """

    source: str
    num_syms: int
    names: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int | None


class _Invalid(Exception):
    """A candidate set of tables that does not decode consistently."""


# ---------------------------------------------------------------------------------------------
# Decoding


_NON_TOKEN = bytes(range(0x21)) + bytes(range(0x7F, 0x100))  # tokens are printable ASCII


def _tokens(raw: bytes, index: tuple[int, ...]) -> list[str]:
    """The 256 tokens of a token table, checked against its index: contiguous, printable."""
    if len(index) != 256 or index[0] != 0:
        raise _Invalid("kallsyms_token_index does not start at 0")
    tokens = []
    for i, start in enumerate(index):
        end = raw.find(b"\0", start)
        if end < 0:
            raise _Invalid(f"kallsyms token {i} runs off the table")
        if i < 255 and index[i + 1] != end + 1:
            raise _Invalid(f"kallsyms_token_index[{i + 1}] does not follow token {i}")
        token = raw[start:end]
        if len(token.translate(None, _NON_TOKEN)) != len(token):
            raise _Invalid(f"kallsyms token {i} is not printable: {token[:16]!r}")
        tokens.append(token.decode("ascii"))
    return tokens


def _decode_names(
    blob: bytes, count: int, tokens: list[str], big: bool = True
) -> tuple[list[str], list[int], int]:
    """Expand *count* entries of kallsyms_names.

    :return: (type letter + name for each entry, offset of every 256th entry, end offset).

    Done in bulk: every byte becomes its token with one ``map``, each length byte is
    overwritten by a newline while walking the lengths, and one join + split yields the names.
    """
    parts = list(map(tokens.__getitem__, blob))
    marks: list[int] = []
    p = 0
    try:
        for group in range(0, count, 256):
            marks.append(p)
            for _ in range(min(256, count - group)):
                n = blob[p]
                if n & 0x80 and big:
                    parts[p] = "\n"
                    parts[p + 1] = ""
                    n = (n & 0x7F) | blob[p + 1] << 7
                    p += 2
                else:
                    parts[p] = "\n"
                    p += 1
                if not n:
                    raise _Invalid(f"kallsyms_names entry at offset {p - 1} has length 0")
                p += n
    except IndexError:
        raise _Invalid("kallsyms_names runs past the data read") from None
    if p > len(blob):
        raise _Invalid("kallsyms_names runs past the data read")
    del parts[p:]
    names = "".join(parts).split("\n")[1:]
    if len(names) != count or not all(names):
        raise _Invalid("kallsyms_names did not decode into one name per symbol")
    return names, marks, p


def _read_markers(mem: KernelMemory, va: int, count: int) -> list[list[int]]:
    """kallsyms_markers read as u32 (``unsigned int``, current kernels) and as u64 arrays
    (``unsigned long``, as older kernels declared it)."""
    out = []
    for width, fmt in ((4, "I"), (8, "Q")):
        try:
            raw = mem.read(va, count * width)
        except FaultError:
            continue
        out.append(list(struct.unpack(f"<{count}{fmt}", raw)))
    return out


def _find(names: list[str], name: str) -> int | None:
    """Index of the first entry called *name*, whatever its type letter."""
    for t in _TYPE_ORDER:
        try:
            return names.index(t + name)
        except ValueError:
            continue
    for i, entry in enumerate(names):
        if entry[1:] == name:
            return i
    return None


def _int32s(raw: bytes) -> array:
    arr = array("i")
    arr.frombytes(raw)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr


def _addresses(offsets: array, base: int, absolute_percpu: bool) -> list[int]:
    if absolute_percpu:
        top = base - 1
        return [o if o >= 0 else top - o for o in offsets]
    return [base + (o & 0xFFFF_FFFF) for o in offsets]


def _is_sorted(values: list[int]) -> bool:
    return all(map(le, values, values[1:]))


def _make_symbols(names: list[str], addresses: list[int]) -> list[Symbol]:
    """Symbols built through the slot descriptors: the same objects ``Symbol(...)`` makes,
    about twice as fast as the frozen dataclass ``__init__`` for ~100,000 of them."""
    new = object.__new__
    set_name = Symbol.name.__set__  # type: ignore[attr-defined]
    set_address = Symbol.address.__set__  # type: ignore[attr-defined]
    set_type = Symbol.type.__set__  # type: ignore[attr-defined]
    out: list[Symbol] = []
    append = out.append
    for entry, address in zip(names, addresses, strict=True):
        sym = new(Symbol)
        set_name(sym, entry[1:])
        set_address(sym, address)
        set_type(sym, entry[0])
        append(sym)
    return out


def _names_blob(mem: KernelMemory, tables: KallsymsTables) -> bytes:
    """kallsyms_names, with whatever follows it, in one read."""
    limit = min(tables.num_syms * _MAX_ENTRY, 64 << 20)
    following = [
        t - tables.names
        for t in (tables.token_table, tables.token_index, tables.offsets)
        if 0 < t - tables.names
    ]
    size = min([limit, *following])
    while True:
        try:
            return mem.read(tables.names, size)
        except FaultError as e:
            if e.address <= tables.names:
                raise _Invalid(f"kallsyms_names at {tables.names:#x} is unreadable") from None
            size = e.address - tables.names


def _decode(mem: KernelMemory, kernel: LinuxKernel, tables: KallsymsTables) -> list[Symbol]:
    """Decode and validate a candidate set of tables. :raises _Invalid: with the reason."""
    count = tables.num_syms
    if not 0 < count < 1 << 24:
        raise _Invalid(f"kallsyms_num_syms is {count}")
    try:
        index = struct.unpack("<256H", mem.read(tables.token_index, 512))
        table_size = tables.token_index - tables.token_table
        if not 0 < table_size <= 0x10000:
            table_size = index[255] + KSYM_NAME_LEN
        tokens = _tokens(mem.read(tables.token_table, table_size), index)
        blob = _names_blob(mem, tables)
        offsets = _int32s(mem.read(tables.offsets, 4 * count))
        base = mem.u64(tables.relative_base) if tables.relative_base is not None else None
    except FaultError as e:
        raise _Invalid(str(e)) from None

    # kallsyms_markers follows kallsyms_names in every layout: it pins the name boundaries,
    # and tells a pre-6.1 one-byte length >= 0x80 from a v6.1+ two-byte one.
    problems = []
    for big in (True, False):
        try:
            names, marks, end = _decode_names(blob, count, tokens, big)
        except _Invalid as e:
            problems.append(str(e))
            continue
        markers_va = (tables.names + end + 7) & ~7
        if marks in _read_markers(mem, markers_va, len(marks)):
            break
        problems.insert(0, f"kallsyms_markers at {markers_va:#x} do not match kallsyms_names")
    else:
        raise _Invalid(problems[0])

    absolute_percpu = min(offsets) < 0
    stext = kernel.symbol("_stext")
    i_stext = _find(names, "_stext")
    if stext is not None and i_stext is not None:
        o = offsets[i_stext]
        derived = stext + 1 + o if absolute_percpu else stext - (o & 0xFFFF_FFFF)
        if base is None:
            base = derived
        elif base != derived:
            got = _addresses(offsets[i_stext : i_stext + 1], base, absolute_percpu)[0]
            raise _Invalid(f"kallsyms puts _stext at {got:#x}, VMCOREINFO at {stext:#x}")
    if base is None:
        raise _Invalid("neither kallsyms_relative_base nor _stext is known")
    addresses = _addresses(offsets, base, absolute_percpu)
    if not _is_sorted(addresses):
        raise _Invalid("kallsyms addresses are not sorted")

    i_banner = _find(names, "linux_banner")
    if i_banner is not None:
        want = f"Linux version {kernel.release} "
        try:
            banner = mem.string(addresses[i_banner], len(want))
        except FaultError as e:
            raise _Invalid(f"linux_banner is unreadable: {e}") from None
        if banner != want:
            raise _Invalid(f"linux_banner reads {banner!r}, not {want!r}")
    return _make_symbols(names, addresses)


# ---------------------------------------------------------------------------------------------
# Finding the tables


def _from_vmcoreinfo(mem: KernelMemory, kernel: LinuxKernel) -> KallsymsTables | None:
    sym = kernel.symbol
    names = sym("kallsyms_names")
    num = sym("kallsyms_num_syms")
    table = sym("kallsyms_token_table")
    index = sym("kallsyms_token_index")
    offsets = sym("kallsyms_offsets")
    if None in (names, num, table, index, offsets):
        return None
    try:
        count = mem.u32(num)  # type: ignore[arg-type]
    except FaultError as e:
        raise _Invalid(f"kallsyms_num_syms is unreadable: {e}") from None
    return KallsymsTables(
        "vmcoreinfo",
        count,
        names,  # type: ignore[arg-type]
        table,  # type: ignore[arg-type]
        index,  # type: ignore[arg-type]
        offsets,  # type: ignore[arg-type]
        sym("kallsyms_relative_base"),
    )


_DIGITS = b"".join(bytes((c, 0)) for c in b"0123456789")
_SCAN_CHUNK = 4 << 20
_SCAN_LIMIT = 256 << 20  # the tables sit in .rodata, well inside any real kernel's first 256 MiB
_MARKER_WINDOW = 8 << 20  # room for kallsyms_markers + kallsyms_seqs_of_names (4 bytes/symbol)
# A zero followed by a plausible markers[1] (the size of the first 256 entries: 512..131584).
_MARKERS_START = {
    4: re.compile(rb"\x00{4}(?=.[\x02-\xff][\x00-\x02]\x00|..[\x01\x02]\x00)", re.DOTALL),
    8: re.compile(rb"\x00{8}(?=.[\x02-\xff][\x00-\x02]\x00{5}|..[\x01\x02]\x00{5})", re.DOTALL),
}


def _read_clamped(mem: KernelMemory, va: int, size: int) -> bytes:
    """Up to *size* bytes at *va*: fewer if memory ends first."""
    try:
        return mem.read(va, size)
    except FaultError as e:
        if e.address <= va:
            return b""
        return mem.read(va, e.address - va)


def _image_text(kernel: LinuxKernel) -> int:
    stext = kernel.symbol("_stext")
    if stext is not None:
        return stext & ~0x1F_FFFF
    return 0xFFFF_FFFF_8100_0000 + kernel.kaslr_offset


def _pattern_hits(mem: KernelMemory, start: int, end: int, pattern: bytes) -> Iterator[int]:
    pos = start
    while pos < end:
        data = _read_clamped(mem, pos, min(_SCAN_CHUNK + len(pattern) - 1, end - pos))
        i = data.find(pattern)
        while 0 <= i < _SCAN_CHUNK:
            yield pos + i
            i = data.find(pattern, i + 1)
        if len(data) < _SCAN_CHUNK:
            return
        pos += _SCAN_CHUNK


def _token_table_around(mem: KernelMemory, hit: int, floor: int) -> tuple[int, int] | None:
    """(token_table, token_index) if *hit* is token 0x30 ("0") of a valid token table."""
    lo = max(floor, hit - 0x4000)
    data = _read_clamped(mem, lo, hit + 0x8000 - lo)
    h = hit - lo
    pos = h
    for _ in range(256 - 0x30):
        nul = data.find(b"\0", pos)
        if nul < 0:
            return None
        pos = nul + 1
    for index_va in sorted({lo + pos, (lo + pos + 3) & ~3, (lo + pos + 7) & ~7}):
        raw = data[index_va - lo : index_va - lo + 512]
        if len(raw) < 512:
            continue
        index = struct.unpack("<256H", raw)
        table_off = h - index[0x30]
        if table_off < 0 or table_off + index[255] >= pos:
            continue
        try:
            _tokens(data[table_off:pos], index)
        except _Invalid:
            continue
        if data.find(b"\0", table_off + index[255]) == pos - 1:
            return lo + table_off, index_va
    return None


def _markers_before(
    mem: KernelMemory, table: int, floor: int
) -> Iterator[tuple[int, int, list[int]]]:
    """Candidate kallsyms_markers arrays below the token table, nearest first.

    Yields (address, element width, increasing run of values starting with 0).
    """
    lo = max(floor, table - _MARKER_WINDOW) & ~7
    data = _read_clamped(mem, lo, table - lo)
    for width, pattern in _MARKERS_START.items():
        fmt = "<Q" if width == 8 else "<I"
        for m in reversed(list(pattern.finditer(data))):
            off = m.start()
            if (lo + off) & 7:
                continue
            run = [0]
            pos = off + width
            while pos + width <= len(data):
                (value,) = struct.unpack_from(fmt, data, pos)
                if not run[-1] < value <= run[-1] + 256 * _MAX_ENTRY:
                    break
                run.append(value)
                pos += width
            if len(run) >= 2:
                yield lo + off, width, run


def _walk(data: bytes, p: int, count: int) -> int | None:
    """Offset just past *count* kallsyms_names entries from *p*, or None if they do not fit."""
    try:
        for _ in range(count):
            n = data[p]
            if n & 0x80:
                n = (n & 0x7F) | data[p + 1] << 7
                p += 1
            if not n:
                return None
            p += n + 1
    except IndexError:
        return None
    return p if p <= len(data) else None


def _names_before(mem: KernelMemory, markers: int, run: list[int]) -> tuple[int, int] | None:
    """(kallsyms_names, N) ending right before *markers*; ``kallsyms_num_syms`` precedes names.

    The run may have picked up a value or two past the real markers (from what follows them),
    so the last two shorter runs are tried as well.
    """
    for count in range(len(run), max(1, len(run) - 2) - 1, -1):
        last = run[count - 1]
        lowest = markers - 8 - last - 256 * _MAX_ENTRY
        lo = (lowest - 8) & ~7
        data = _read_clamped(mem, lo, markers - lo)
        if len(data) != markers - lo:
            continue
        for start in range((markers - last - 2) & ~7, lowest - 1, -8):
            off = start - lo
            (n,) = struct.unpack_from("<I", data, off - 8)
            if not (count - 1) * 256 < n <= count * 256:
                continue
            end = _walk(data, off + last, n - (count - 1) * 256)
            if end is not None and markers - 8 < lo + end <= markers:
                return start, n
    return None


def _offsets_plausible(
    mem: KernelMemory, kernel: LinuxKernel, offsets: int, count: int, base: int
) -> bool:
    try:
        values = _int32s(mem.read(offsets, 4 * count))
        relative_base = mem.u64(base)
    except FaultError:
        return False
    if not kernel.is_image_address(relative_base):
        return False
    return _is_sorted(_addresses(values, relative_base, min(values) < 0))


def _from_scan(mem: KernelMemory, kernel: LinuxKernel) -> Iterator[KallsymsTables]:
    """Candidate tables found in the kernel image without any symbol."""
    start = _image_text(kernel)
    end = start + min(_SCAN_LIMIT, kernel.image_size - (start - 0xFFFF_FFFF_8000_0000))
    for hit in _pattern_hits(mem, start, end, _DIGITS):
        found = _token_table_around(mem, hit, start)
        if found is None:
            continue
        table, index = found
        log.debug("kallsyms scan: token table at %#x, index at %#x", table, index)
        for markers, _width, run in _markers_before(mem, table, start):
            names = _names_before(mem, markers, run)
            if names is None:
                continue
            names_va, count = names
            size = (4 * count + 7) & ~7
            after_index = (index + 512 + 7) & ~7
            layouts = (
                (names_va - 16 - size, names_va - 16),  # up to v6.3: offsets, base, num_syms, names
                (after_index, after_index + size),  # v6.4+: ..., token_index, offsets, base
            )
            for offsets, base in layouts:
                if _offsets_plausible(mem, kernel, offsets, count, base):
                    yield KallsymsTables("scan", count, names_va, table, index, offsets, base)


# ---------------------------------------------------------------------------------------------
# Public API


def _load(mem: KernelMemory, kernel: LinuxKernel) -> tuple[KallsymsTables, list[Symbol]]:
    cached = mem.cache.get(_CACHE_KEY)
    if cached is not None and cached[0] is kernel:
        return cached[1], cached[2]
    problems: list[str] = []

    def candidates() -> Iterator[KallsymsTables]:
        try:
            tables = _from_vmcoreinfo(mem, kernel)
        except _Invalid as e:
            problems.append(f"VMCOREINFO: {e}")
            tables = None
        if tables is not None:
            yield tables
        yield from _from_scan(mem, kernel)

    for tables in candidates():
        try:
            symbols = _decode(mem, kernel, tables)
        except _Invalid as e:
            log.info(
                "kallsyms candidate (%s, names at %#x) rejected: %s", tables.source, tables.names, e
            )
            problems.append(f"{tables.source} tables at {tables.names:#x}: {e}")
            continue
        log.info(
            "kallsyms: %d symbols, tables found by %s (names at %#x)",
            len(symbols),
            tables.source,
            tables.names,
        )
        mem.cache[_CACHE_KEY] = (kernel, tables, symbols)
        return tables, symbols
    if not problems:
        raise KallsymsNotFound("no kallsyms tables in VMCOREINFO or in the kernel image")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise KallsymsNotFound(problems[0] + more)


def locate_kallsyms(mem: KernelMemory, kernel: LinuxKernel) -> KallsymsTables:
    """Where the kallsyms tables are, once they have decoded and validated.

    VMCOREINFO's ``SYMBOL(kallsyms_*)`` first, then a scan of the kernel image.

    :raises KallsymsNotFound: if neither gives tables that validate.
    """
    return _load(mem, kernel)[0]


def read_kallsyms(mem: KernelMemory, kernel: LinuxKernel) -> list[Symbol]:
    """Every symbol of the core kernel (all of them with CONFIG_KALLSYMS_ALL), sorted by address.

    ``list[Symbol] read_kallsyms(KernelMemory mem, LinuxKernel kernel)``

    Decoded once per *mem* and *kernel* (kept in ``mem.cache``); a new list each call.
    Module symbols are not included. Per-CPU symbols (type ``A``) come first, with their
    per-CPU offsets as addresses, as in ``/proc/kallsyms``.

    :raises KallsymsNotFound: if the tables cannot be found or do not validate.
    """
    return list(_load(mem, kernel)[1])


class SymbolTable:
    """Name and address lookups over a list of `Symbol` (e.g. from `read_kallsyms`)."""

    def __init__(self, symbols: list[Symbol]) -> None:
        ordered = list(symbols)
        if not _is_sorted([s.address for s in ordered]):
            ordered.sort(key=lambda s: s.address)  # stable: keeps kallsyms' alias order
        self._symbols = ordered
        self._addresses = [s.address for s in ordered]
        # First symbol of each name wins, then globals (upper-case type) override locals.
        by_name = {s.name: s for s in reversed(ordered)}
        by_name.update({s.name: s for s in reversed(ordered) if s.type.isupper()})
        self._by_name = by_name
        # symbolize() covers kernel addresses only, from the first one up to _end.
        self._first = bisect_left(self._addresses, _KERNEL_HALF)
        end = by_name.get("_end")
        if end is not None and end.address >= _KERNEL_HALF:
            self._end = end.address
        elif self._first < len(ordered):
            self._end = self._addresses[-1] + 1
        else:
            self._end = 0

    def lookup(self, name: str) -> Symbol | None:
        """The symbol called *name* (a global one if there is one, else the first), or None."""
        return self._by_name.get(name)

    def address(self, name: str) -> int:
        """Address of *name*. :raises KeyError: with the name, if there is no such symbol."""
        sym = self._by_name.get(name)
        if sym is None:
            raise KeyError(name)
        return sym.address

    def symbolize(self, address: int) -> tuple[Symbol, int] | None:
        """The symbol containing *address* and the offset into it, like the kernel's
        ``kallsyms_lookup()``: the nearest symbol at or below it (the first of several aliases).

        :return: None outside ``[first kernel symbol, _end)``.
        """
        if self._first >= len(self._symbols) or not self._addresses[self._first] <= address:
            return None
        if address >= self._end:
            return None
        i = bisect_right(self._addresses, address) - 1
        i = bisect_left(self._addresses, self._addresses[i], self._first, i + 1)
        sym = self._symbols[i]
        return sym, address - sym.address

    def __len__(self) -> int:
        return len(self._symbols)

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self._symbols)
