"""QEMU's read-only monitor commands and packets, and the /proc files GDB plugins fetch, served by
vmigdb from its own page walk (over the in-memory fake machine; tests/e2e/test_clients.py holds
the same output against QEMU's own)."""

from __future__ import annotations

import re

import pytest

from tests.unit.fakes import (
    HUGE_VA,
    KERNEL_PA,
    KERNEL_VA,
    LOW_PDPT_PA,
    UNMAPPED_VA,
    USER_VA,
    ram_pattern,
)
from tests.unit.test_session import Machine, machine, rcmd
from vmigdb.debugger.model import ProcessScope
from vmigdb.rsp.session import Detach, Kill
from vmigdb.wire import codec

INFO_MEM = """\
0000000000400000-0000000000401000 0000000000001000 urw
ffffffff81000000-ffffffff81003000 0000000000003000 -rw
ffffffff81003000-ffffffff81004000 0000000000001000 -r-
ffffffff81005000-ffffffff81006000 0000000000001000 -rw
ffffffff81200000-ffffffff81400000 0000000000200000 -rw"""

INFO_TLB = """\
0000000000400000: 0000000000108000 -------UW
ffffffff81000000: 0000000000100000 --------W
ffffffff81001000: 0000000000101000 --------W
ffffffff81002000: 0000000000102000 --------W
ffffffff81003000: 0000000000103000 X--------
ffffffff81005000: 000000007fff0000 --------W
ffffffff81200000: 0000000000200000 --P-----W"""


@pytest.fixture
def m() -> Machine:
    return machine()


def test_info_mem_and_tlb_in_qemus_format(m: Machine) -> None:
    assert m.monitor("info mem") == (INFO_MEM + "\n", b"OK")
    assert m.monitor("info tlb") == (INFO_TLB + "\n", b"OK")


def test_info_mem_follows_the_process_scope(m: Machine) -> None:
    """While a process is scoped, its page tables are listed, not the vCPU's."""
    root = 0x8000  # a PML4 of its own, with only the user half of the fake's tables
    m.fake.write_physical(root, bytes(0x1000))
    entry = LOW_PDPT_PA | 0x7
    m.fake.write_physical(root + ((USER_VA >> 39) & 0x1FF) * 8, entry.to_bytes(8, "little"))
    m.dbg.set_scope(ProcessScope(42, "proc", root))
    assert m.monitor("info mem") == (INFO_MEM.splitlines()[0] + "\n", b"OK")
    m.dbg.set_scope(None)
    assert m.monitor("info mem")[0] == INFO_MEM + "\n"


def test_info_registers_lines_vmigdb_knows(m: Machine) -> None:
    text, last = m.monitor("info registers")
    regs = m.dbg.registers(m.session.current_cpu())
    lines = text.splitlines()
    assert last == b"OK"
    assert lines[0] == " ".join(f"{n}={regs[n.lower()]:016x}" for n in ("RAX", "RBX", "RCX", "RDX"))
    assert lines[2].startswith(f"R8 ={regs['r8']:016x} R9 ={regs['r9']:016x} R10=")
    assert lines[4] == f"RIP={regs['rip']:016x} RFL=00000246 [---Z-P-] CPL=0"
    assert lines[5] == (f"CR0=80050033 CR2={regs['cr2']:016x} CR3={regs['cr3']:016x} CR4=000006b0")
    assert lines[6] == "EFER=0000000000000d01"
    assert not any(line.startswith(("IDT", "GDT", "CS =")) for line in lines)  # not guessed


def test_xp_and_x(m: Machine) -> None:
    pattern = [ram_pattern(KERNEL_PA + i) for i in range(10)]
    text, _ = m.monitor(f"xp /10xb {KERNEL_PA:#x}")
    assert text.splitlines() == [
        f"{KERNEL_PA:016x}: " + " ".join(f"0x{b:02x}" for b in pattern[:8]),
        f"{KERNEL_PA + 8:016x}: " + " ".join(f"0x{b:02x}" for b in pattern[8:]),
    ]
    text, _ = m.monitor(f"x /2xg {KERNEL_VA:#x}")
    value = int.from_bytes(bytes(pattern[:8]), "little")
    assert text.startswith(f"{KERNEL_VA:016x}: 0x{value:016x} 0x")
    text, _ = m.monitor(f"x /2dw {KERNEL_VA:#x}")
    word = int.from_bytes(bytes(pattern[:4]), "little")
    signed = word - (1 << 32) if word >> 31 else word
    assert re.fullmatch(rf"{KERNEL_VA:016x}: +{signed} +-?\d+\n", text), text
    # QEMU remembers the last size (w here): /3c shows 3 words' worth of bytes, 16 to a line
    text, _ = m.monitor(f"x /3c {KERNEL_VA:#x}")
    assert [line.count("'") for line in text.splitlines()] == [24]
    text, _ = m.monitor(f"x /3cb {KERNEL_VA:#x}")
    assert text.count("'") == 6
    assert m.monitor(f"x /4xb {UNMAPPED_VA:#x}") == (
        f"{UNMAPPED_VA:016x}: Cannot access memory\n",
        b"OK",
    )
    text, _ = m.monitor("x /1xg $rip")
    assert text.startswith(f"{m.dbg.registers(m.session.current_cpu())['rip']:016x}: 0x")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("x /4i 0x1000", "QEMU's disassembler"),
        ("x /4q 0x1000", "invalid char in format"),
        ("xp 0x1000 0x2000", "usage"),
        ("x /1xb $nosuch", "unknown register"),
        ("info pic", "unknown command"),
        ("gpa2hva 0x1000", "kernel-vmmap monitor"),
        ("system_reset", "would change the machine"),
        ("chardev-add file,id=x,path=/tmp/x", "never passes monitor commands to QEMU"),
        ("quit", "would change the machine"),
        ("nosuchcommand", "unknown command"),
    ],
)
def test_refusals_say_why(m: Machine, command: str, message: str) -> None:
    text, last = m.monitor(command)
    assert last == b"E01" and message in text, text
    assert m.fake.count("resume") == 0 and not m.fake.writes


def test_gva2gpa(m: Machine) -> None:
    assert m.monitor(f"gva2gpa {KERNEL_VA + 5:#x}") == (f"gpa: {KERNEL_PA + 5:#x}\n", b"OK")
    assert m.monitor(f"gva2gpa {UNMAPPED_VA:#x}") == ("Unmapped\n", b"OK")


def test_ram_lists_guest_ram(m: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    text, last = m.monitor("ram")
    assert last == b"E01" and "cannot list guest RAM" in text  # the fake does not say
    monkeypatch.setattr(m.fake, "physical_ranges", lambda: [(0, 0x100_0000), (1 << 32, 5 << 30)])
    text, last = m.monitor("ram")
    assert last == b"OK"
    assert text.splitlines() == [
        "0x0000000000000000-0x0000000001000000 (16 MiB)",
        "0x0000000100000000-0x0000000140000000 (1024 MiB)",
    ]


def test_help_lists_the_qemu_commands(m: Machine) -> None:
    text, _ = m.monitor("help")
    for command in ("info mem", "info tlb", "info registers", "xp /FMT", "gva2gpa", "ram"):
        assert command in text


# -- QEMU's own packets: how GEF and pwndbg recognise a QEMU system target ------------------------


@pytest.mark.parametrize("payload", [b"Qqemu.sstepbits", b"qqemu.sstepbits"])
def test_sstepbits_as_qemu_answers(m: Machine, payload: bytes) -> None:
    assert m.one(payload) == b"ENABLE=1,NOIRQ=2,NOTIMER=4"


def test_sstep_flags_are_fixed(m: Machine) -> None:
    assert m.one(b"qqemu.sstep") == b"0x7"
    assert m.one(b"Qqemu.sstep=7") == b"OK"
    refused = m.one(b"Qqemu.sstep=1")
    assert refused.startswith(b"E.") and b"interrupts and timers masked" in refused


def test_phy_mem_mode_is_monitor_phys(m: Machine) -> None:
    assert m.one(b"qqemu.PhyMemMode") == b"0"
    assert m.one(b"Qqemu.PhyMemMode:1") == b"OK"
    assert m.dbg.physical_addresses
    assert m.one(b"qqemu.PhyMemMode") == b"1"
    data = codec.decode_hex(m.one(b"m%x,4" % KERNEL_PA))
    assert list(data) == [ram_pattern(KERNEL_PA + i) for i in range(4)]
    assert m.one(b"Qqemu.PhyMemMode:0") == b"OK" and not m.dbg.physical_addresses
    assert m.one(b"Qqemu.PhyMemMode:2") == b"E16"


def test_qoffsets_stays_empty(m: Machine) -> None:
    """GEF and pwndbg tell QEMU's system mode (empty) from user mode (Text=...) by this."""
    assert m.one(b"qOffsets") == b""


# -- /proc over vFile -----------------------------------------------------------------------------


def vfile_read(m: Machine, path: str) -> bytes | None:
    opened = m.one(b"vFile:open:" + codec.encode_hex(path.encode()) + b",0,0")
    if opened.startswith(b"F-1"):
        return None
    fd = opened[1:]
    data = b""
    while True:
        reply = m.one(b"vFile:pread:%s,1000,%x" % (fd, len(data)))
        count, _, body = reply[1:].partition(b";")
        chunk = codec.unescape_binary(body)
        if not chunk:
            break
        data += chunk
    assert m.one(b"vFile:close:" + fd) == b"F0"
    return data


def test_proc_maps_of_gdbs_pid_is_the_debugged_address_space(m: Machine) -> None:
    text = vfile_read(m, "/proc/42000/maps")
    assert text is not None
    assert text.decode().splitlines() == [
        "00400000-00401000 rwxp 00000000 00:00 0 ",
        "ffffffff81000000-ffffffff81003000 rwxp 00000000 00:00 0 ",
        "ffffffff81003000-ffffffff81004000 r--p 00000000 00:00 0 ",
        "ffffffff81005000-ffffffff81006000 rwxp 00000000 00:00 0 ",
        f"{HUGE_VA:x}-{HUGE_VA + 0x200000:x} rwxp 00000000 00:00 0 ",
    ]
    assert vfile_read(m, "/proc/42000/cmdline") == b""
    assert vfile_read(m, "/proc/42000/environ") == b""


def test_proc_files_that_need_the_guest_os_are_enoent_without_one(m: Machine) -> None:
    """The fake machine runs no OS vmigdb understands: no kernel ELF, no guest pids."""
    assert vfile_read(m, "/proc/42000/exe") is None
    assert vfile_read(m, "/proc/1/maps") is None
    assert vfile_read(m, "/proc/42000/status") is None
    assert vfile_read(m, "/etc/passwd") is None


def test_gef_remote_setup_sequence(m: Machine) -> None:
    """What GEF's `target remote` hook does (gef.py, GefRemoteSessionManager): recognise QEMU,
    then copy the process's files with `remote get` (vFile open/pread/close)."""
    assert b"ENABLE=" in m.one(b"Qqemu.sstepbits")
    assert m.one(b"qOffsets") == b""
    for name in ("maps", "environ", "cmdline"):
        assert vfile_read(m, f"/proc/42000/{name}") is not None


# -- LLDB quits with k ----------------------------------------------------------------------------


def test_lldbs_kill_on_quit_detaches(m: Machine) -> None:
    assert m.one(b"qHostInfo") == b""  # unanswered: LLDB reads registers from target.xml
    outcome = m.handle(b"k")
    assert outcome.replies == [b"OK"] and isinstance(outcome.action, Detach)


def test_gdbs_kill_still_kills() -> None:
    outcome = machine().handle(b"k")
    assert isinstance(outcome.action, Kill)


def test_monitor_rcmd_is_not_forwarded(m: Machine) -> None:
    m.send(rcmd("info mem"))
    assert not [c for c in m.fake.calls if "rcmd" in str(c).lower()]


def test_pages_lists_every_page_with_its_frame_and_size(m: Machine) -> None:
    text, last = m.monitor("pages")
    assert last == b"OK"
    assert text.splitlines() == [
        "0x0000000000400000 0x108000 0x1000 urwx",
        "0xffffffff81000000 0x100000 0x1000 -rwx",
        "0xffffffff81001000 0x101000 0x1000 -rwx",
        "0xffffffff81002000 0x102000 0x1000 -rwx",
        "0xffffffff81003000 0x103000 0x1000 -r--",
        "0xffffffff81005000 0x7fff0000 0x1000 -rwx",
        "0xffffffff81200000 0x200000 0x200000 -rwx",
    ]
    assert m.monitor("pages user") == ("0x0000000000400000 0x108000 0x1000 urwx\n", b"OK")
    assert m.monitor("pages all")[1] == b"E01"


@pytest.mark.parametrize(
    ("addr", "reply"),
    [
        (USER_VA + 5, b"start:400000;size:1000;permissions:rwx;"),
        (KERNEL_VA + 0x3008, b"start:ffffffff81003000;size:1000;permissions:r;"),
        (KERNEL_VA + 0x1000, b"start:ffffffff81000000;size:3000;permissions:rwx;"),
        (0x10, b"start:0;size:400000;"),  # the gap before the first mapping
        (UNMAPPED_VA, b"start:ffffffff81004000;size:1000;"),
        (HUGE_VA + 0x300000, b"start:ffffffff81400000;size:7ec00000;"),  # up to the top
    ],
)
def test_lldb_memory_region_info(m: Machine, addr: int, reply: bytes) -> None:
    assert m.one(b"qMemoryRegionInfo:%x" % addr) == reply
