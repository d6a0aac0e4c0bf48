"""The x86-64 register file: QEMU's gdbstub layout in, GDB's canonical amd64 layout out.

QEMU 7.2's gdbstub orders registers its own way (control registers in the middle, k_gs_base
next to the segment bases) and, while the vCPU is not executing 64-bit code (CS.L=0), sends
nine of them as 4 bytes instead of 8. GDB must see one fixed layout whatever the vCPU mode,
so vmigdb serves the canonical order GDB's own amd64 target descriptions use, followed by a
custom ``org.vmigdb.x86_64.system`` feature, and converts with a few precomputed slice copies.

Everything layout-related is derived from `REGISTERS` (the canonical order) and
`QEMU_REGISTERS` (QEMU's order); `vmigdb.rsp.target_xml` builds the target description from
the same table, so the ``g`` packet and the XML cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "FEATURE_CORE",
    "FEATURE_LINUX",
    "FEATURE_SEGMENTS",
    "FEATURE_SSE",
    "FEATURE_SYSTEM",
    "G_PACKET_SIZE",
    "ORIG_RAX_REGNUM",
    "QEMU_G_SIZE_LONG",
    "QEMU_G_SIZE_SHORT",
    "QEMU_REGISTERS",
    "QEMU_SHORT_REGISTERS",
    "REGISTERS",
    "REGISTER_INDEX",
    "REGISTER_OFFSETS",
    "REGISTER_SIZES",
    "Register",
    "RegisterFile",
    "split_g",
]

FEATURE_CORE = "org.gnu.gdb.i386.core"
FEATURE_SSE = "org.gnu.gdb.i386.sse"
FEATURE_SEGMENTS = "org.gnu.gdb.i386.segments"
FEATURE_SYSTEM = "org.vmigdb.x86_64.system"
# Served only for a Linux guest: GDB's Linux ABI needs this feature (orig_rax) before it knows
# the system-call table. orig_rax is no CPU register but the kernel's saved syscall number, so it
# is not in the g packet: GDB reads it with p (see vmigdb.rsp.target_xml).
FEATURE_LINUX = "org.gnu.gdb.i386.linux"


@dataclass(frozen=True, slots=True)
class Register:
    """One register as GDB sees it (canonical layout).

    :ivar name: GDB's name, e.g. ``"rip"``.
    :ivar bitsize: Size in bits in the ``g`` packet.
    :ivar type: Target-description type id (``"int64"``, ``"i386_eflags"``, ``"vec128"``...).
    :ivar group: Register group (``"float"``, ``"vector"``, ``"system"``) or ``None``.
    :ivar feature: Target-description feature that holds the register.
    :ivar qemu_regnum: The register's number in QEMU's gdbstub (``p``/``P`` packets).
    """

    name: str
    bitsize: int
    type: str
    group: str | None
    feature: str
    qemu_regnum: int


# QEMU 7.2 target/i386 gdbstub order with byte sizes in 64-bit mode: (name, size).
_GPRS_LEGACY = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
_GPRS = _GPRS_LEGACY + tuple(f"r{i}" for i in range(8, 16))
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_CTRL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_FPU_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_STS = tuple(f"st{i}" for i in range(8))
_XMMS = tuple(f"xmm{i}" for i in range(16))

QEMU_REGISTERS: tuple[tuple[str, int], ...] = (
    tuple((n, 8) for n in _GPRS)
    + (("rip", 8), ("eflags", 4))
    + tuple((n, 4) for n in _SEGS)
    + (("fs_base", 8), ("gs_base", 8), ("k_gs_base", 8))
    + tuple((n, 8) for n in _CTRL)
    + tuple((n, 10) for n in _STS)
    + tuple((n, 4) for n in _FPU_CTRL)
    + tuple((n, 16) for n in _XMMS)
    + (("mxcsr", 4),)
)
"""QEMU's gdbstub register order (index = QEMU regnum) as ``(name, bytes in 64-bit mode)``."""

QEMU_SHORT_REGISTERS: frozenset[str] = frozenset(("fs_base", "gs_base", "k_gs_base") + _CTRL)
"""Registers QEMU 7.2 sends and accepts as 4 bytes while the vCPU is not in 64-bit code."""

_QEMU_REGNUM = {name: i for i, (name, _) in enumerate(QEMU_REGISTERS)}


def _reg(name: str, bitsize: int, type_: str, feature: str, group: str | None = None) -> Register:
    return Register(name, bitsize, type_, group, feature, _QEMU_REGNUM[name])


_GPR_TYPES = {"rbp": "data_ptr", "rsp": "data_ptr"}

REGISTERS: tuple[Register, ...] = (
    tuple(_reg(n, 64, _GPR_TYPES.get(n, "int64"), FEATURE_CORE) for n in _GPRS)
    + (
        _reg("rip", 64, "code_ptr", FEATURE_CORE),
        _reg("eflags", 32, "i386_eflags", FEATURE_CORE),
    )
    + tuple(_reg(n, 32, "int32", FEATURE_CORE) for n in _SEGS)
    + tuple(_reg(n, 80, "i387_ext", FEATURE_CORE) for n in _STS)
    + tuple(_reg(n, 32, "int", FEATURE_CORE, "float") for n in _FPU_CTRL)
    + tuple(_reg(n, 128, "vec128", FEATURE_SSE) for n in _XMMS)
    + (
        _reg("mxcsr", 32, "i386_mxcsr", FEATURE_SSE, "vector"),
        _reg("fs_base", 64, "int", FEATURE_SEGMENTS),
        _reg("gs_base", 64, "int", FEATURE_SEGMENTS),
        _reg("cr0", 64, "x86_cr0", FEATURE_SYSTEM, "system"),
        _reg("cr2", 64, "data_ptr", FEATURE_SYSTEM, "system"),
        _reg("cr3", 64, "uint64", FEATURE_SYSTEM, "system"),
        _reg("cr4", 64, "x86_cr4", FEATURE_SYSTEM, "system"),
        _reg("cr8", 64, "uint64", FEATURE_SYSTEM, "system"),
        _reg("efer", 64, "x86_efer", FEATURE_SYSTEM, "system"),
        _reg("k_gs_base", 64, "int", FEATURE_SYSTEM, "system"),
    )
)
"""Every register GDB sees, in canonical order (index = our regnum)."""

REGISTER_INDEX: dict[str, int] = {r.name: i for i, r in enumerate(REGISTERS)}
"""Register name -> canonical regnum."""

ORIG_RAX_REGNUM: int = len(REGISTERS)
"""GDB's number for ``orig_rax`` in the Linux target description: after every CPU register."""

_SIZES: tuple[int, ...] = tuple(r.bitsize // 8 for r in REGISTERS)
REGISTER_SIZES = _SIZES
"""Bytes of each canonical register."""


def _offsets(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, pos = [], 0
    for size in sizes:
        out.append(pos)
        pos += size
    return tuple(out)


REGISTER_OFFSETS: tuple[int, ...] = _offsets(_SIZES)
"""Byte offset of each canonical register in our ``g`` payload."""

G_PACKET_SIZE: int = sum(_SIZES)
"""Bytes of our canonical (binary) ``g`` payload."""

_QEMU_SIZES_LONG = tuple(size for _, size in QEMU_REGISTERS)
_QEMU_SIZES_SHORT = tuple(4 if n in QEMU_SHORT_REGISTERS else s for n, s in QEMU_REGISTERS)
QEMU_G_SIZE_LONG: int = sum(_QEMU_SIZES_LONG)
"""Bytes of QEMU's ``g`` payload while the vCPU runs 64-bit code (608)."""
QEMU_G_SIZE_SHORT: int = sum(_QEMU_SIZES_SHORT)
"""Bytes of QEMU's ``g`` payload while the vCPU does not run 64-bit code (572)."""

# Canonical regnums whose QEMU register shrinks to 4 bytes outside 64-bit code.
_SHORT_REGNUMS = frozenset(REGISTER_INDEX[n] for n in QEMU_SHORT_REGISTERS)


def _copy_plan(qemu_sizes: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """Runs ``(src_start, src_end, dst_start)`` moving a QEMU payload into canonical order.

    Registers adjacent in both layouts merge into one run, so a conversion is a handful of
    slice assignments. A register narrower in QEMU's payload (short mode) copies its bytes
    into the low end of its zeroed canonical slot (zero extension, little-endian) and ends
    its run, since the destination is wider than the source there.
    """
    qemu_offsets = _offsets(qemu_sizes)
    pieces = sorted(
        (qemu_offsets[r.qemu_regnum], qemu_sizes[r.qemu_regnum], REGISTER_OFFSETS[i], _SIZES[i])
        for i, r in enumerate(REGISTERS)
    )
    runs: list[list[int]] = []
    can_extend = False
    for src, size, dst, dst_size in pieces:
        if can_extend and runs[-1][1] == src and runs[-1][2] + runs[-1][1] - runs[-1][0] == dst:
            runs[-1][1] = src + size
        else:
            runs.append([src, src + size, dst])
        can_extend = size == dst_size
    return tuple((a, b, c) for a, b, c in runs)


_PLAN_LONG = _copy_plan(_QEMU_SIZES_LONG)
_PLAN_SHORT = _copy_plan(_QEMU_SIZES_SHORT)


@dataclass(frozen=True, slots=True)
class RegisterFile:
    """One vCPU's registers at one stop, in canonical layout.

    Immutable so it can be cached and shared; `with_value` returns an updated copy.

    :ivar data: The canonical ``g`` payload (`G_PACKET_SIZE` bytes, binary).
    :ivar long_mode: Whether QEMU reported the vCPU in 64-bit code (it then takes 8-byte
        values for every register in `P` writes; otherwise 4 for `QEMU_SHORT_REGISTERS`).
    :ivar unavailable: Register numbers whose value is not known (a dump that did not save
        them): they read 0 here, and GDB is told they are unavailable.
    :raises ValueError: if *data* is not `G_PACKET_SIZE` bytes.
    """

    data: bytes
    long_mode: bool = True
    unavailable: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if len(self.data) != G_PACKET_SIZE:
            raise ValueError(
                f"canonical g payload must be {G_PACKET_SIZE} bytes, got {len(self.data)}"
            )

    @classmethod
    def from_qemu_g(cls, payload: bytes) -> RegisterFile:
        """Convert QEMU's (hex-decoded) ``g`` reply to canonical layout.

        ``RegisterFile.from_qemu_g(bytes payload)``

        The vCPU mode is inferred from the length: 608 bytes in 64-bit code, 572 otherwise
        (nine registers 4 bytes wide, zero-extended here).

        :raises ValueError: if the length is neither.
        """
        n = len(payload)
        if n == QEMU_G_SIZE_LONG:
            plan, long_mode = _PLAN_LONG, True
        elif n == QEMU_G_SIZE_SHORT:
            plan, long_mode = _PLAN_SHORT, False
        else:
            raise ValueError(
                f"QEMU g payload must be {QEMU_G_SIZE_LONG} or {QEMU_G_SIZE_SHORT} bytes, got {n}"
            )
        buf = bytearray(G_PACKET_SIZE)
        for src, end, dst in plan:
            buf[dst : dst + end - src] = payload[src:end]
        return cls(bytes(buf), long_mode)

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, int],
        long_mode: bool = True,
        unavailable: Iterable[str] = (),
    ) -> RegisterFile:
        """A register file from register name -> unsigned value; registers not named are 0.

        For sources that give registers by name rather than as a QEMU ``g`` payload (a dump's
        notes, a registers file) or one by one (libvmi). A value is kept to its register's width.
        *unavailable* names the registers whose value is not known.

        :raises KeyError: for a name that is no register.
        """
        buf = bytearray(G_PACKET_SIZE)
        for name, value in values.items():
            regnum = REGISTER_INDEX[name]
            size = _SIZES[regnum]
            off = REGISTER_OFFSETS[regnum]
            buf[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        missing = frozenset(REGISTER_INDEX[name] for name in unavailable)
        return cls(bytes(buf), long_mode, missing)

    def values(self) -> dict[str, int]:
        """Every register by name, as unsigned integers (canonical order)."""
        return {r.name: self[r.name] for r in REGISTERS}

    def to_g(self) -> bytes:
        """The canonical binary ``g`` payload."""
        return self.data

    def raw(self, regnum: int) -> bytes:
        """Bytes of canonical register *regnum* (little-endian).

        :raises IndexError: if *regnum* is out of range.
        """
        if regnum < 0:
            raise IndexError(f"no register number {regnum}")
        off = REGISTER_OFFSETS[regnum]
        return self.data[off : off + _SIZES[regnum]]

    def __getitem__(self, name: str) -> int:
        """Unsigned integer value of register *name*, e.g. ``regs["cr3"]``.

        :raises KeyError: if there is no such register.
        """
        return int.from_bytes(self.raw(REGISTER_INDEX[name]), "little")

    def qemu_write(self, regnum: int, value: bytes) -> tuple[int, bytes]:
        """Translate a ``P`` write of canonical *regnum* into QEMU's terms.

        ``(int qemu_regnum, bytes value) qemu_write(int regnum, bytes value)``

        Outside 64-bit code QEMU takes 4 bytes for `QEMU_SHORT_REGISTERS`, so the value is
        truncated to its low 4 bytes there.

        :raises ValueError: if *regnum* is out of range or *value* is not the register's size.
        """
        _check(regnum, value)
        if not self.long_mode and regnum in _SHORT_REGNUMS:
            value = value[:4]
        return REGISTERS[regnum].qemu_regnum, bytes(value)

    def with_value(self, regnum: int, value: bytes) -> RegisterFile:
        """A copy with register *regnum* replaced by *value* (cache update after a write).

        :raises ValueError: if *regnum* is out of range or *value* is not the register's size.
        """
        _check(regnum, value)
        off = REGISTER_OFFSETS[regnum]
        data = self.data[:off] + bytes(value) + self.data[off + len(value) :]
        return RegisterFile(data, self.long_mode, self.unavailable - {regnum})


def _check(regnum: int, value: bytes) -> None:
    if not 0 <= regnum < len(REGISTERS):
        raise ValueError(f"no register number {regnum}")
    if len(value) != _SIZES[regnum]:
        raise ValueError(
            f"register {REGISTERS[regnum].name} takes {_SIZES[regnum]} bytes, got {len(value)}"
        )


def split_g(payload: bytes) -> list[bytes]:
    """Split a canonical ``g``/``G`` payload into one ``bytes`` per register, canonical order.

    :raises ValueError: if *payload* is not `G_PACKET_SIZE` bytes.
    """
    if len(payload) != G_PACKET_SIZE:
        raise ValueError(f"canonical g payload must be {G_PACKET_SIZE} bytes, got {len(payload)}")
    payload = bytes(payload)
    return [payload[off : off + size] for off, size in zip(REGISTER_OFFSETS, _SIZES, strict=True)]
