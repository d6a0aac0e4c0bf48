"""VMCOREINFO parsing and find_kernel's validation, over a hand-built fake guest RAM.

The fake guest is laid out like a KASLR'd x86-64 kernel: the image linked at 0xffffffff81000000,
slid by KERNELOFFSET, loaded at physical 32 MiB, mapped by its own page tables (2M pages) with a
randomised direct map (one 1G page), and a VMCOREINFO text somewhere in RAM.
"""

from __future__ import annotations

import pytest

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.guest.linux.identify import KernelNotFound, find_kernel
from vmigdb.guest.linux.kernel import (
    START_KERNEL_MAP,
    FaultError,
    KernelMemory,
    LinuxKernel,
)
from vmigdb.guest.linux.vmcoreinfo import (
    find_vmcoreinfo_text,
    parse_vmcoreinfo,
    vmcoreinfo_number,
    vmcoreinfo_symbol,
)

U64 = (1 << 64) - 1
P, RW, PS = 1, 2, 0x80
RAM_SIZE = 64 << 20
OFFSET = 0x2A00_0000
TEXT = 0xFFFF_FFFF_8100_0000 + OFFSET
LOAD_PA = 0x200_0000  # physical address of _text
PHYS_BASE = (LOAD_PA - (TEXT - START_KERNEL_MAP)) & U64  # negative: virtual slide > physical
POB = 0xFFFF_9A4C_0000_0000  # randomised page_offset_base (1 GiB aligned)
RELEASE = "6.1.0-99-test-amd64"
UTS = TEXT + 0x10_0000
PGD = TEXT + 0x20_0000
MEM_SECTION = POB + 0x30_0000  # a "memblock allocation" in the direct map
NOTE_PA = 0x50_0000


def note(
    *,
    release: str = RELEASE,
    offset: int = OFFSET,
    phys_base: int = PHYS_BASE,
    mem_section: int | None = MEM_SECTION,
    extra: str = "",
) -> bytes:
    lines = [
        f"OSRELEASE={release}",
        "BUILD-ID=3b43fad5034874490492495d552c0af6a5fab235",
        "PAGESIZE=4096",
        f"SYMBOL(init_uts_ns)={UTS:x}",
        "OFFSET(uts_namespace.name)=0",
        f"SYMBOL(swapper_pg_dir)={PGD:x}",
        f"SYMBOL(_stext)={TEXT:x}",
    ]
    if mem_section is not None:
        lines.append(f"SYMBOL(mem_section)={mem_section:x}")
    signed = phys_base - (1 << 64) if phys_base >> 63 else phys_base
    lines += [
        f"NUMBER(phys_base)={signed}",
        f"SYMBOL(init_top_pgt)={PGD:x}",
        "NUMBER(pgtable_l5_enabled)=0",
        f"KERNELOFFSET={offset:x}",
        "NUMBER(KERNEL_IMAGE_SIZE)=1073741824",
    ]
    return ("\n".join(lines) + "\n" + extra).encode() + b"\0"


class FakeGuest:
    """64 MiB of guest RAM holding a kernel image, its page tables and a VMCOREINFO text."""

    def __init__(self, *, page_offset_base: int = POB) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.next_table = 0x10_0000
        self.cr3 = self.pa(PGD)
        for va in range(TEXT, TEXT + (8 << 20), 2 << 20):  # the image: 2M pages
            self.map(va, self.pa(va), leaf=2)
        self.map(page_offset_base, 0, leaf=3)  # the direct map: one 1G page covers all RAM
        uts = bytearray(6 * 65)
        uts[0:5] = b"Linux"
        uts[65:67] = b"vm"
        uts[130 : 130 + len(RELEASE)] = RELEASE.encode()
        self.put(self.pa(UTS), bytes(uts))
        self.put(self.pa(TEXT), b"Linux version " + RELEASE.encode() + b" (test)\0")

    @staticmethod
    def pa(va: int) -> int:
        return (va - START_KERNEL_MAP + PHYS_BASE) & U64

    def put(self, pa: int, data: bytes) -> None:
        self.ram[pa : pa + len(data)] = data

    def map(self, va: int, pa: int, *, leaf: int) -> None:
        table = self.cr3
        for level in range(4, leaf, -1):
            slot = table + ((va >> (3 + 9 * level)) & 0x1FF) * 8
            entry = int.from_bytes(self.ram[slot : slot + 8], "little")
            if not entry & P:
                entry = self.next_table | P | RW
                self.next_table += 0x1000
                self.put(slot, entry.to_bytes(8, "little"))
            table = entry & 0x000F_FFFF_FFFF_F000
        slot = table + ((va >> (3 + 9 * leaf)) & 0x1FF) * 8
        self.put(slot, (pa | P | RW | PS).to_bytes(8, "little"))

    def read_phys(self, pa: int, length: int) -> bytes:
        if pa < 0 or pa + length > len(self.ram):
            err = PhysicalMemoryError(pa)
            err.address = max(pa, len(self.ram))  # type: ignore[attr-defined]
            raise err
        return bytes(self.ram[pa : pa + length])

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.ram))]

    def find(self) -> LinuxKernel:
        return find_kernel(self.read_phys, self.ranges())


@pytest.fixture
def guest() -> FakeGuest:
    g = FakeGuest()
    g.put(NOTE_PA, note())
    return g


# ---- parsing ---------------------------------------------------------------------------


def test_parse_vmcoreinfo_keys_and_values() -> None:
    info = parse_vmcoreinfo(note() + b"OSRELEASE=junk after the NUL\n")
    assert info["OSRELEASE"] == RELEASE
    assert vmcoreinfo_symbol(info, "_stext") == TEXT
    assert vmcoreinfo_symbol(info, "nonexistent") is None
    assert vmcoreinfo_number(info, "NUMBER(phys_base)") == PHYS_BASE - (1 << 64)
    assert vmcoreinfo_number(info, "OFFSET(uts_namespace.name)") == 0
    assert int(info["KERNELOFFSET"], 16) == OFFSET


def test_parse_vmcoreinfo_str_and_odd_lines() -> None:
    info = parse_vmcoreinfo("A=1\nno equals sign\n=orphan\nB = two \nA=3")
    assert info == {"A": "3", "B": "two"}


def test_find_vmcoreinfo_text_skips_format_strings_and_straddles_chunks() -> None:
    g = FakeGuest()
    g.put(0x10_0000, b"CRASHTIME=%lld\n\0OSRELEASE=%s\n\0")  # the kernel's own .rodata strings
    straddling = (2 << 20) - 4  # "OSRELEASE=" crosses the first 2 MiB read
    g.put(straddling, note())
    found = list(find_vmcoreinfo_text(g.read_phys, g.ranges()))
    assert [pa for pa, _ in found] == [straddling]
    assert found[0][1].startswith(b"OSRELEASE=" + RELEASE.encode())
    assert not found[0][1].endswith(b"\0")


def test_find_vmcoreinfo_text_scans_from_both_ends_inwards() -> None:
    g = FakeGuest()
    low, middle, high = 0x10_0000, 30 << 20, RAM_SIZE - 0x2000
    for pa in (low, middle, high):
        g.put(pa, note())
    assert [pa for pa, _ in find_vmcoreinfo_text(g.read_phys, g.ranges())] == [low, high, middle]
    # Across two ranges too: the top of the second range comes second.
    top = [(0, 16 << 20), (48 << 20, RAM_SIZE)]
    assert [pa for pa, _ in find_vmcoreinfo_text(g.read_phys, top)] == [low, high]


def test_find_vmcoreinfo_text_survives_unreadable_ranges(guest: FakeGuest) -> None:
    ranges = [(1 << 40, (1 << 40) + (4 << 20)), *guest.ranges()]
    assert [pa for pa, _ in find_vmcoreinfo_text(guest.read_phys, ranges)] == [NOTE_PA]


# ---- find_kernel ---------------------------------------------------------------------


def test_find_kernel_with_kaslr(guest: FakeGuest) -> None:
    k = guest.find()
    assert k.release == RELEASE
    assert k.kaslr_offset == OFFSET
    assert k.phys_base == PHYS_BASE
    assert k.page_offset_base == POB
    assert k.kernel_cr3 == guest.pa(PGD)
    assert k.la57 is False
    assert k.vmcoreinfo["BUILD-ID"].startswith("3b43")
    # pa = va - __START_KERNEL_map + phys_base
    assert k.kernel_image_pa(TEXT) == LOAD_PA
    assert k.kernel_image_pa(UTS) == LOAD_PA + 0x10_0000
    with pytest.raises(ValueError):
        k.kernel_image_pa(POB)


def test_find_kernel_without_a_note() -> None:
    with pytest.raises(KernelNotFound, match="^no VMCOREINFO note in guest RAM$"):
        FakeGuest().find()


@pytest.mark.parametrize(
    "offset",
    [
        OFFSET + 0x10_0000,  # not a whole number of 2 MiB steps
        0,  # the image would then be linked above where it was loaded
        OFFSET + (32 << 20),  # link-time kernel at a negative physical address
        1 << 30,  # beyond KERNEL_IMAGE_SIZE
    ],
)
def test_find_kernel_rejects_a_wrong_kerneloffset(offset: int) -> None:
    g = FakeGuest()
    g.put(NOTE_PA, note(offset=offset))
    with pytest.raises(KernelNotFound, match="KERNELOFFSET"):
        g.find()


def test_find_kernel_rejects_a_wrong_phys_base() -> None:
    g = FakeGuest()
    g.put(NOTE_PA, note(phys_base=(PHYS_BASE + (2 << 20)) & U64))
    with pytest.raises(KernelNotFound, match="init_uts_ns"):
        g.find()


def test_find_kernel_rejects_a_release_that_memory_does_not_hold() -> None:
    g = FakeGuest()
    g.put(NOTE_PA, note(release="5.10.0-1-amd64"))
    with pytest.raises(KernelNotFound, match="init_uts_ns"):
        g.find()


def test_find_kernel_skips_a_stale_note(guest: FakeGuest) -> None:
    # A previous kernel's note, lower in RAM, with another slide: found first, rejected.
    stale = note(release="6.1.0-98-test-amd64", phys_base=(PHYS_BASE - (4 << 20)) & U64)
    guest.put(0x1000, stale)
    assert guest.find().release == RELEASE


def test_find_kernel_checks_the_page_tables(guest: FakeGuest) -> None:
    # The image's first 2M page mapped somewhere else: phys_base and the tables disagree.
    guest.map(TEXT, LOAD_PA + (8 << 20), leaf=2)
    with pytest.raises(KernelNotFound, match="page tables"):
        guest.find()


def test_find_kernel_fixed_direct_map_without_mem_section() -> None:
    g = FakeGuest(page_offset_base=0xFFFF_8880_0000_0000)
    g.put(NOTE_PA, note(mem_section=None))
    assert g.find().page_offset_base == 0xFFFF_8880_0000_0000


def test_find_kernel_rejects_an_unconfirmed_direct_map() -> None:
    g = FakeGuest()
    g.put(NOTE_PA, note(mem_section=None))  # randomised map, no way to find it
    with pytest.raises(KernelNotFound, match="direct map"):
        g.find()


# ---- KernelMemory --------------------------------------------------------------------


def test_kernel_memory_reads(guest: FakeGuest) -> None:
    k = guest.find()
    mem = KernelMemory(guest.read_phys, k)
    assert mem.string(TEXT) == f"Linux version {RELEASE} (test)"
    assert mem.string(TEXT, max=5) == "Linux"
    assert mem.read(UTS, 5) == b"Linux"
    assert mem.u8(UTS) == ord("L")
    assert mem.u16(UTS) == int.from_bytes(b"Li", "little")
    assert mem.u32(UTS) == int.from_bytes(b"Linu", "little")
    assert mem.u64(UTS) == int.from_bytes(b"Linux\0\0\0", "little")
    # The same bytes through the direct map (page walk) and through the image mapping.
    assert mem.read(POB + LOAD_PA, 64) == mem.read(TEXT, 64)
    assert mem.translate(POB + 0x1234) == 0x1234
    assert mem.translate(UTS) == LOAD_PA + 0x10_0000
    assert mem.read(UTS, 0) == b""


def test_kernel_memory_faults(guest: FakeGuest) -> None:
    mem = KernelMemory(guest.read_phys, guest.find())
    hole = 0xFFFF_C900_0000_0000  # vmalloc space: nothing mapped
    with pytest.raises(FaultError) as e:
        mem.read(hole + 8, 16)
    assert e.value.address == hole + 8
    with pytest.raises(FaultError):
        mem.translate(hole)
    # The direct map ends with RAM... the 1G page maps past it: the read fails at RAM's end.
    with pytest.raises(FaultError) as e:
        mem.read(POB + RAM_SIZE - 8, 16)
    assert e.value.address == POB + RAM_SIZE
    # A kernel-image address whose physical page is beyond RAM.
    far = TEXT + (64 << 20)
    with pytest.raises(FaultError) as e:
        mem.read(far, 4)
    assert e.value.address == far
    with pytest.raises(ValueError):
        mem.read(TEXT, -1)
