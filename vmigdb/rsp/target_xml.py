"""The target description vmigdb serves through ``qXfer:features:read:target.xml``.

Generated from `vmigdb.arch.x86_64.registers.REGISTERS`, the same table that defines the
``g`` packet layout, so the two cannot drift apart. The type definitions are copied from
GDB's own ``gdb/features/i386/64bit-*.xml`` so GDB displays eflags and mxcsr as flags and
xmm registers as unions exactly as with a native amd64 target. Everything is inline: GDB
would otherwise have to fetch ``xi:include`` documents one by one.

For a Linux guest the description also says ``<osabi>GNU/Linux</osabi>`` and carries GDB's
``org.gnu.gdb.i386.linux`` feature (``orig_rax``). GDB 13's amd64 Linux ABI
(``amd64_linux_init_abi``) stops short of everything Linux-specific unless that feature is
there: with it, GDB loads its own x86-64 system-call table (``catch syscall openat`` by name)
and uses SVR4 shared libraries (``qXfer:libraries-svr4:read``). ``orig_rax`` is not in the
``g`` packet (GDB then reads it with ``p``): it is the kernel's saved system-call number at a
system-call stop and -1 elsewhere, what GDB's Linux ABI expects of it (it writes -1 there with
every PC change, to stop the kernel restarting a system call).
"""

from __future__ import annotations

from functools import cache
from xml.sax.saxutils import quoteattr

from vmigdb.arch.x86_64.registers import (
    FEATURE_CORE,
    FEATURE_LINUX,
    FEATURE_SEGMENTS,
    FEATURE_SSE,
    FEATURE_SYSTEM,
    ORIG_RAX_REGNUM,
    REGISTERS,
)

__all__ = ["target_xml", "xfer_slice"]

ARCHITECTURE = "i386:x86-64"
LINUX_OSABI = "GNU/Linux"


def _flags(type_id: str, size: int, fields: tuple[tuple[str, int], ...]) -> str:
    lines = [f'  <flags id="{type_id}" size="{size}">']
    lines += [f'    <field name="{name}" start="{bit}" end="{bit}"/>' for name, bit in fields]
    lines.append("  </flags>")
    return "\n".join(lines) + "\n"


# From GDB's 64bit-core.xml (the nameless bit 1 is GDB's: reserved, always 1).
_EFLAGS = _flags(
    "i386_eflags",
    4,
    (
        ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
        ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
        ("VIP", 20), ("ID", 21),
    ),
)  # fmt: skip

# From GDB's 64bit-sse.xml.
_SSE_TYPES = """\
  <vector id="v8bf16" type="bfloat16" count="8"/>
  <vector id="v8h" type="ieee_half" count="8"/>
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v8_bfloat16" type="v8bf16"/>
    <field name="v8_half" type="v8h"/>
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
""" + _flags(
    "i386_mxcsr",
    4,
    (
        ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
        ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15),
    ),
)  # fmt: skip

# vmigdb's own: architectural bits of the control registers (Intel SDM vol. 3, 2.5).
_SYSTEM_TYPES = (
    _flags(
        "x86_cr0",
        8,
        (
            ("PE", 0), ("MP", 1), ("EM", 2), ("TS", 3), ("ET", 4), ("NE", 5), ("WP", 16),
            ("AM", 18), ("NW", 29), ("CD", 30), ("PG", 31),
        ),
    )
    + _flags(
        "x86_cr4",
        8,
        (
            ("VME", 0), ("PVI", 1), ("TSD", 2), ("DE", 3), ("PSE", 4), ("PAE", 5), ("MCE", 6),
            ("PGE", 7), ("PCE", 8), ("OSFXSR", 9), ("OSXMMEXCPT", 10), ("UMIP", 11),
            ("LA57", 12), ("VMXE", 13), ("SMXE", 14), ("FSGSBASE", 16), ("PCIDE", 17),
            ("OSXSAVE", 18), ("KL", 19), ("SMEP", 20), ("SMAP", 21), ("PKE", 22), ("CET", 23),
            ("PKS", 24),
        ),
    )
    + _flags(
        "x86_efer",
        8,
        (
            ("SCE", 0), ("LME", 8), ("LMA", 10), ("NXE", 11), ("SVME", 12), ("LMSLE", 13),
            ("FFXSR", 14), ("TCE", 15),
        ),
    )
)  # fmt: skip

_FEATURES: tuple[tuple[str, str], ...] = (
    (FEATURE_CORE, _EFLAGS),
    (FEATURE_SSE, _SSE_TYPES),
    (FEATURE_SEGMENTS, ""),
    (FEATURE_SYSTEM, _SYSTEM_TYPES),
)


@cache
def target_xml(linux: bool = False) -> str:
    """The complete target description, canonical register order, no ``xi:include``.

    Registers get an explicit ``regnum`` only where document order would not give them
    their canonical number (never, as generated; kept so a reordering stays correct).
    `linux`: the guest runs Linux (GDB's Linux ABI, with ``orig_rax``; see the module docstring).
    """
    parts = [
        '<?xml version="1.0"?>\n',
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">\n',
        '<target version="1.0">\n',
        f"  <architecture>{ARCHITECTURE}</architecture>\n",
    ]
    if linux:
        parts.append(f"  <osabi>{LINUX_OSABI}</osabi>\n")
    by_feature: dict[str, list[int]] = {}
    for regnum, reg in enumerate(REGISTERS):
        by_feature.setdefault(reg.feature, []).append(regnum)
    if set(by_feature) != {name for name, _ in _FEATURES}:
        raise AssertionError(f"features out of sync: {sorted(by_feature)}")
    expected = 0  # the number GDB assigns to a register without a regnum attribute
    for feature, types in _FEATURES:
        parts.append(f'<feature name="{feature}">\n')
        parts.append(types)
        for regnum in by_feature[feature]:
            reg = REGISTERS[regnum]
            attrs = f'name="{reg.name}" bitsize="{reg.bitsize}" type={quoteattr(reg.type)}'
            if regnum != expected:
                attrs += f' regnum="{regnum}"'
            if reg.group is not None:
                attrs += f" group={quoteattr(reg.group)}"
            parts.append(f"  <reg {attrs}/>\n")
            expected = regnum + 1
        parts.append("</feature>\n")
    if linux:
        parts.append(f'<feature name="{FEATURE_LINUX}">\n')
        parts.append(
            f'  <reg name="orig_rax" bitsize="64" type="int" regnum="{ORIG_RAX_REGNUM}"/>\n'
        )
        parts.append("</feature>\n")
    parts.append("</target>\n")
    return "".join(parts)


def xfer_slice(document: bytes, offset: int, length: int) -> bytes:
    """One ``qXfer:...:read`` reply: ``b"m"`` + chunk when more follows, else ``b"l"`` + chunk.

    ``bytes xfer_slice(bytes document, int offset, int length)``

    An offset at or past the end yields ``b"l"`` (empty last chunk), as the protocol asks.
    The caller escapes the binary chunk for the packet.

    :raises ValueError: if *offset* or *length* is negative.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"bad qXfer window offset={offset} length={length}")
    chunk = document[offset : offset + length]
    if offset + len(chunk) >= len(document):
        return b"l" + chunk
    return b"m" + chunk
