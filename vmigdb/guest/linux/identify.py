"""Identify the running Linux kernel in guest-physical memory: `find_kernel`.

Zero configuration: nothing but guest RAM is needed. `find_kernel` scans RAM for the kernel's
VMCOREINFO text (see `vmigdb.guest.linux.vmcoreinfo`), then checks what it says against memory
before believing it, so a stale note (a previous kernel's) or a wrong offset is an error, never a
silently wrong answer. The direct map's base may need the kernel's own symbols (kallsyms), which
is why this sits above both `kernel` and `kallsyms`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from vmigdb.arch.x86_64.paging import PhysicalMemoryError, ReadPhys, Translation, translate
from vmigdb.guest.base import GuestError
from vmigdb.guest.linux.kallsyms import KallsymsNotFound, SymbolTable, read_kallsyms
from vmigdb.guest.linux.kernel import START_KERNEL_MAP, FaultError, KernelMemory, LinuxKernel
from vmigdb.guest.linux.vmcoreinfo import (
    find_vmcoreinfo_text,
    parse_vmcoreinfo,
    vmcoreinfo_hex,
    vmcoreinfo_number,
    vmcoreinfo_symbol,
)

__all__ = ["KernelNotFound", "find_kernel"]

log = logging.getLogger("vmigdb.guest.linux")

_KERNEL_ALIGN = 2 << 20  # CONFIG_PHYSICAL_ALIGN is a multiple of 2 MiB on x86-64
_PUD_SIZE = 1 << 30  # kernel_randomize_memory() places the direct map on a PUD boundary
# Direct-map bases without CONFIG_RANDOMIZE_MEMORY (Documentation/arch/x86/x86_64/mm.rst).
_PAGE_OFFSET_L4 = 0xFFFF_8880_0000_0000
_PAGE_OFFSET_L5 = 0xFF11_0000_0000_0000
_U64 = (1 << 64) - 1
# struct new_utsname: six char[__NEW_UTS_LEN + 1] fields; release is the third.
_UTS_LEN = 65


class KernelNotFound(GuestError):
    """No running Linux kernel could be identified in guest RAM (the message says why)."""


class _Rejected(Exception):
    """A VMCOREINFO candidate that does not describe the running kernel."""


def _required_hex(info: dict[str, str], key: str) -> int:
    try:
        value = vmcoreinfo_hex(info, key)
    except ValueError:
        raise _Rejected(f"{key} is not hex: {info[key]!r}") from None
    if value is None:
        raise _Rejected(f"no {key}")
    return value


def _number(info: dict[str, str], key: str) -> int | None:
    try:
        return vmcoreinfo_number(info, key)
    except ValueError:
        raise _Rejected(f"{key} is not a number: {info[key]!r}") from None


def _read(read_phys: ReadPhys, pa: int, size: int, what: str) -> bytes:
    try:
        data = read_phys(pa, size)
    except PhysicalMemoryError:
        data = b""
    if len(data) != size:
        raise _Rejected(f"{what} at physical {pa:#x} is outside guest RAM")
    return data


def _check_uts(read_phys: ReadPhys, kernel: LinuxKernel, info: dict[str, str]) -> None:
    """``init_uts_ns.name`` must say "Linux" and carry OSRELEASE: proves phys_base."""
    uts = _required_hex(info, "SYMBOL(init_uts_ns)")
    if not kernel.is_image_address(uts):
        raise _Rejected(f"SYMBOL(init_uts_ns)={uts:#x} is not a kernel-image address")
    name_offset = _number(info, "OFFSET(uts_namespace.name)")
    base = kernel.kernel_image_pa(uts)
    if name_offset is not None:
        starts = [name_offset]
    else:
        # OFFSET(uts_namespace.name) is in VMCOREINFO since v5.4 (commit ca4a9241cc5e); before,
        # struct uts_namespace began with a struct kref (4 bytes, padded to 8 on some configs).
        starts = [0, 4, 8]
    area = _read(read_phys, base, max(starts) + 3 * _UTS_LEN, "init_uts_ns")
    for start in starts:
        sysname = area[start : start + _UTS_LEN].split(b"\0", 1)[0]
        release = area[start + 2 * _UTS_LEN : start + 3 * _UTS_LEN].split(b"\0", 1)[0]
        if sysname == b"Linux" and release == kernel.release.encode():
            return
    sysname = area[starts[0] : starts[0] + _UTS_LEN].split(b"\0", 1)[0]
    raise _Rejected(
        f"init_uts_ns at physical {base:#x} does not hold 'Linux' / {kernel.release!r} "
        f"(found {sysname[:16]!r}): phys_base or the symbol is wrong"
    )


def _walk(read_phys: ReadPhys, kernel: LinuxKernel, va: int) -> int | None:
    t = translate(read_phys, kernel.kernel_cr3, va, kernel.paging_mode)
    return t.pa if isinstance(t, Translation) else None


def _check_page_tables(read_phys: ReadPhys, kernel: LinuxKernel, info: dict[str, str]) -> None:
    """The kernel's own page tables must map the image where `kernel_image_pa` says."""
    for name in ("_stext", "init_uts_ns"):
        va = vmcoreinfo_symbol(info, name)
        if va is None or not kernel.is_image_address(va):
            continue
        got = _walk(read_phys, kernel, va)
        want = kernel.kernel_image_pa(va)
        if got != want:
            where = "unmapped" if got is None else f"{got:#x}"
            raise _Rejected(
                f"page tables at {kernel.kernel_cr3:#x} map {name} ({va:#x}) to {where}, "
                f"not {want:#x}"
            )


def _check_kaslr_offset(kernel: LinuxKernel, info: dict[str, str]) -> None:
    """KERNELOFFSET must agree with where the image sits, virtually and physically.

    ``kaslr_offset() = _text - __START_KERNEL`` (arch/x86/include/asm/setup.h) with
    ``__START_KERNEL = __START_KERNEL_map + LOAD_PHYSICAL_ADDR``, and ``_stext == _text`` on
    x86-64 (arch/x86/kernel/vmlinux.lds.S). So ``LOAD_PHYSICAL_ADDR = _stext - __START_KERNEL_map
    - KERNELOFFSET`` must be a positive multiple of CONFIG_PHYSICAL_ALIGN (>= 2 MiB), and no more
    than the physical address the image really has: the decompressor never places the kernel
    below LOAD_PHYSICAL_ADDR (arch/x86/boot/compressed/head_64.S, kaslr.c).
    """
    offset = kernel.kaslr_offset
    if offset % _KERNEL_ALIGN or not 0 <= offset < kernel.image_size:
        raise _Rejected(f"KERNELOFFSET={offset:x} is not a 2 MiB-aligned slide within the image")
    stext = vmcoreinfo_symbol(info, "_stext")
    if stext is None or not kernel.is_image_address(stext):
        raise _Rejected("no kernel-image SYMBOL(_stext) to check KERNELOFFSET against")
    load = stext - START_KERNEL_MAP - offset  # LOAD_PHYSICAL_ADDR, if the offset is right
    loaded = kernel.kernel_image_pa(stext)
    if load <= 0 or load % _KERNEL_ALIGN or load > loaded:
        raise _Rejected(
            f"KERNELOFFSET={offset:x} puts the link-time kernel at physical {load:#x}, "
            f"which does not fit an image loaded at {loaded:#x}"
        )
    if load != 0x100_0000:  # CONFIG_PHYSICAL_START's default, used by every distribution
        log.info("kernel linked for physical %#x (CONFIG_PHYSICAL_START not the default)", load)


def _direct_map_ok(read_phys: ReadPhys, kernel: LinuxKernel, base: int, probes: list[int]) -> bool:
    if base % _PUD_SIZE or not base >> 63:
        return False
    return all(_walk(read_phys, kernel, (base + pa) & _U64) == pa for pa in probes)


def _find_page_offset_base(read_phys: ReadPhys, kernel: LinuxKernel, info: dict[str, str]) -> int:
    """Start of the direct map, each candidate checked against the kernel's page tables.

    1. ``NUMBER(page_offset_base)`` if a kernel ever exports it;
    2. ``SYMBOL(mem_section)``: with SPARSEMEM_EXTREME (every x86-64 distribution kernel) it is
       the value of the ``mem_section`` pointer, a memblock allocation, i.e. a direct-map
       address; walking it gives ``va - pa``, exactly the base;
    3. the kernel variable ``page_offset_base`` read through kallsyms (CONFIG_DYNAMIC_MEMORY_LAYOUT);
    4. the fixed base of kernels without CONFIG_RANDOMIZE_MEMORY.
    """
    probes = [kernel.kernel_cr3, kernel.kernel_image_pa(_required_hex(info, "SYMBOL(init_uts_ns)"))]
    tried: list[str] = []

    exported = _number(info, "NUMBER(page_offset_base)")
    if exported is not None:
        if _direct_map_ok(read_phys, kernel, exported & _U64, probes):
            return exported & _U64
        tried.append(f"NUMBER(page_offset_base)={exported & _U64:#x}")

    mem_section = vmcoreinfo_symbol(info, "mem_section")
    if mem_section is not None and mem_section >> 63 and not kernel.is_image_address(mem_section):
        pa = _walk(read_phys, kernel, mem_section)
        if pa is not None:
            base = (mem_section - pa) & _U64
            if _direct_map_ok(read_phys, kernel, base, probes):
                return base
            tried.append(f"mem_section gave {base:#x}")

    try:
        mem = KernelMemory(read_phys, kernel)
        var = SymbolTable(read_kallsyms(mem, kernel)).lookup("page_offset_base")
        if var is not None:
            base = mem.u64(var.address)
            if _direct_map_ok(read_phys, kernel, base, probes):
                return base
            tried.append(f"kallsyms page_offset_base={base:#x}")
    except (KallsymsNotFound, FaultError) as e:
        tried.append(f"kallsyms: {e}")

    default = _PAGE_OFFSET_L5 if kernel.la57 else _PAGE_OFFSET_L4
    if _direct_map_ok(read_phys, kernel, default, probes):
        return default
    raise _Rejected("cannot find the direct map (page_offset_base): " + "; ".join(tried or ["-"]))


def _kernel_from_vmcoreinfo(read_phys: ReadPhys, info: dict[str, str]) -> LinuxKernel:
    """A validated `LinuxKernel` for this VMCOREINFO. :raises _Rejected: with the reason."""
    release = info.get("OSRELEASE", "")
    if not release:
        raise _Rejected("no OSRELEASE")
    phys_base = _number(info, "NUMBER(phys_base)")
    if phys_base is None:
        raise _Rejected("no NUMBER(phys_base) (not an x86-64 kernel?)")
    offset = _required_hex(info, "KERNELOFFSET") if "KERNELOFFSET" in info else 0
    la57 = _number(info, "NUMBER(pgtable_l5_enabled)") == 1
    kernel = LinuxKernel(
        release=release,
        kaslr_offset=offset,
        phys_base=phys_base & _U64,
        page_offset_base=0,
        kernel_cr3=0,
        la57=la57,
        vmcoreinfo=info,
    )
    _check_uts(read_phys, kernel, info)
    _check_kaslr_offset(kernel, info)

    pgd = vmcoreinfo_symbol(info, "init_top_pgt") or vmcoreinfo_symbol(info, "swapper_pg_dir")
    if pgd is None:
        raise _Rejected("no SYMBOL(init_top_pgt) or SYMBOL(swapper_pg_dir)")
    if not kernel.is_image_address(pgd) or pgd & 0xFFF:
        raise _Rejected(f"init_top_pgt {pgd:#x} is not a page in the kernel image")
    kernel = replace(kernel, kernel_cr3=kernel.kernel_image_pa(pgd))
    _check_page_tables(read_phys, kernel, info)
    return replace(kernel, page_offset_base=_find_page_offset_base(read_phys, kernel, info))


def find_kernel(read_phys: ReadPhys, ram_ranges: list[tuple[int, int]]) -> LinuxKernel:
    """Identify the running Linux kernel from guest-physical memory alone.

    ``LinuxKernel find_kernel(ReadPhys read_phys, list[(u64 start, u64 end)] ram_ranges)``

    Scans RAM (from both ends inwards) for VMCOREINFO texts and returns the first one that
    checks out against memory: ``KERNELOFFSET`` well-formed, ``init_uts_ns`` read through
    ``phys_base`` holding ``OSRELEASE``, the kernel's own page tables mapping ``_stext`` and
    ``init_uts_ns`` to the same physical addresses, and a direct-map base those page tables
    confirm.

    :param ram_ranges: ``(start, end)`` guest-physical RAM ranges, end exclusive.
    :raises KernelNotFound: if no VMCOREINFO text is in RAM, or none describes the running
        kernel (the message gives the first reason).
    """
    seen: set[bytes] = set()
    reasons: list[str] = []
    for pa, text in find_vmcoreinfo_text(read_phys, ram_ranges):
        if text in seen:
            continue
        seen.add(text)
        info = parse_vmcoreinfo(text)
        try:
            kernel = _kernel_from_vmcoreinfo(read_phys, info)
        except _Rejected as e:
            log.info("VMCOREINFO at physical %#x rejected: %s", pa, e)
            reasons.append(f"VMCOREINFO at physical {pa:#x} rejected: {e}")
            continue
        log.info(
            "Linux %s: KERNELOFFSET %#x, phys_base %#x, page_offset_base %#x (VMCOREINFO at %#x)",
            kernel.release,
            kernel.kaslr_offset,
            kernel.phys_base,
            kernel.page_offset_base,
            pa,
        )
        return kernel
    if not reasons:
        raise KernelNotFound("no VMCOREINFO note in guest RAM")
    more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    raise KernelNotFound(reasons[0] + more)
