"""vmigdb.script and the examples against the live demo guest, started by `Session.start` once
for the module; every test connects its own session to that server, as separate scripts would.

Ground truth: the guest's console (kernel symbol addresses, program pids, the ticker's buffer
address and contents, the spin programs' function address) and the test programs' own ELF files.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT
from vmigdb.images.build import demo_append
from vmigdb.script import GdbError, Session

sys.path.insert(0, str(ROOT / "examples"))
import dump_process  # noqa: E402
import search_ram  # noqa: E402
import trace_openat  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(guest_image):
    session = Session.start(
        "qemu",
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        smp=2,
        memory=256,
        append=demo_append("vmigdb.programs=ticker,probe,spin:1111,spin:2222"),
        wait_for="vmigdb-guest: ready",
    )
    server = session.server
    session.server = None  # the module keeps the server; this first session only checks start()
    try:
        assert session.regs()["rip"] >= 0xFFFF_FFFF_8000_0000 or session.regs()["cs"] & 3 == 3
        session.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s(server):
    with Session.connect(server.address) as session:
        yield session


def console(server) -> str:
    return server.console()


def ksym(server, name: str) -> int:
    return int(re.search(rf"vmigdb-guest: ksym {name} ([0-9a-f]+)", console(server)).group(1), 16)


def started(server, spec: str) -> int:
    return int(re.search(rf"started {re.escape(spec)} pid=(\d+)", console(server)).group(1))


def test_registers_symbols_memory(server, s: Session) -> None:
    assert s.symbol("linux_banner") == ksym(server, "linux_banner")
    release = re.search(r"vmigdb-guest: release (\S+)", console(server)).group(1)
    assert s.read(s.symbol("linux_banner"), 64).startswith(f"Linux version {release}".encode())
    assert s.read_string(s.symbol("linux_banner")).startswith("Linux version ")
    regs0, regs1 = s.regs(0), s.regs(1)
    assert {"rip", "rsp", "cr3", "eflags", "fs_base"} <= regs0.keys()
    assert regs0["eflags"] & 2 and regs1["eflags"] & 2  # bit 1 always reads as one
    assert regs0["rip"] != regs1["rip"] or regs0["rsp"] != regs1["rsp"]
    assert s.evaluate("$rsp + 8") == s.regs()["rsp"] + 8


def test_gdb_errors_are_exceptions_with_gdbs_message(s: Session) -> None:
    with pytest.raises(GdbError, match="Cannot access memory at address 0x10"):
        s.read(0x10, 4)
    with pytest.raises(GdbError, match="A syntax error in expression"):
        s.evaluate("1 +")
    with pytest.raises(GdbError):
        s.symbol("no_such_symbol_anywhere")


def test_processes_and_scoped_memory(server, s: Session) -> None:
    procs = {p.pid: p for p in s.processes()}
    pid, buf = (
        int(x, 0)
        for x in re.search(r"ticker pid=(\d+) buf=(0x[0-9a-f]+)", console(server)).groups()
    )
    ticker = procs[pid]
    assert ticker.name == "ticker" and ticker.ppid == 1 and ticker.cr3
    assert procs[2].name == "kthreadd" and procs[2].cr3 is None
    assert "scope: process" in s.scope(ticker)
    try:
        expected = b"TICK" + pid.to_bytes(4, "little") + (~pid & 0xFFFF_FFFF).to_bytes(4, "little")
        assert s.read(buf, 12) == expected
        maps = s.maps()
        assert any(m.user and m.start <= buf < m.end for m in maps)
        pages = [p for p in s.pages(user=True) if p.va <= buf < p.va + p.size]
        assert len(pages) == 1 and pages[0].writable and pages[0].nx
    finally:
        s.scope(None)


def test_on_break_in_one_process_with_a_condition(server, s: Session) -> None:
    addr = int(
        re.search(r"spin pid=\d+ value=\d+ addr=(0x[0-9a-f]+)", console(server)).group(1), 16
    )
    second = s.process(started(server, "spin:2222"))
    seen = []

    def hit(stop):
        seen.append((stop.process.pid, stop.regs["rdi"], stop.address, stop.cpu))
        return len(seen) >= 3

    bp = s.on_break(addr, hit, process=second, condition="$rdi != 0")
    stop = s.run(timeout=60)
    assert stop.reason == "breakpoint" and bp.hits == 3
    assert [(p, rdi, a) for p, rdi, a, _ in seen] == [(second.pid, 2222, addr)] * 3
    s.remove(bp)
    # both copies share the address: a condition alone picks the other one
    bp = s.on_break(addr, lambda stop: True, condition="$rdi == 1111")
    stop = s.run(timeout=60)
    assert stop.regs["rdi"] == 1111 and stop.process.pid == started(server, "spin:1111")
    s.remove(bp)


def test_run_until_a_location_and_stepi(server, s: Session) -> None:
    getpid = ksym(server, "__x64_sys_getpid")
    stop = s.run(until=getpid, timeout=60)
    assert stop.address == getpid and stop.regs["rip"] == getpid
    (first,) = s.disassemble(getpid, 1)
    step = s.stepi()
    assert step.reason == "step" and step.address == getpid + len(first.bytes)


def test_run_times_out_when_nothing_stops_it(s: Session) -> None:
    stop = s.run(timeout=2)
    assert stop.reason == "timeout" and stop.cpu is not None


def test_disassemble_assemble_patch(server, s: Session) -> None:
    getpid = ksym(server, "__x64_sys_getpid")
    insns = s.disassemble(getpid, 3)
    assert [i.address for i in insns[1:]] == [
        insns[0].address + len(insns[0].bytes),
        insns[1].address + len(insns[1].bytes),
    ]
    original = s.read(getpid + 5, 2)
    # the instruction already there, assembled again: a real write the guest cannot tell apart
    written = s.patch(getpid + 5, f"{insns[1].mnemonic} {insns[1].op_str}")
    assert written == insns[1].bytes == original
    assert s.read(getpid + 5, 2) == original
    stealth = s.monitor("stealth")
    assert re.search(r"memory write: .* VISIBLE to the guest, in use", stealth), stealth


def test_session_detaches_on_exception(server) -> None:
    """An exception out of a callback leaves the machine stopped at the breakpoint: leaving the
    `with` block still detaches, with nothing left behind, and the guest runs on."""
    getpid = ksym(server, "__x64_sys_getpid")

    def fail(stop):
        raise RuntimeError(f"script failed at {stop.address:#x}")

    with pytest.raises(RuntimeError, match=f"script failed at {getpid:#x}"):
        with Session.connect(server.address) as session:
            session.on_break(getpid, fail)
            session.run(timeout=30)
    rounds = len(re.findall(r"ticker pid=\d+ round=", console(server)))
    with Session.connect(server.address) as session:
        info = session.monitor("info")
        assert "breakpoints: 0 requested" in info, info
    deadline = time.monotonic() + 30
    while len(re.findall(r"ticker pid=\d+ round=", console(server))) <= rounds:
        assert time.monotonic() < deadline, "the guest did not run on"
        time.sleep(0.2)


def test_example_trace_openat(server, s: Session, capsys) -> None:
    paths = trace_openat.trace(s, "probe", count=3, timeout=60)
    assert paths == ["/proc/self/status"] * 3
    out = capsys.readouterr().out
    assert out.count(f"probe[{started(server, 'probe')}] openat /proc/self/status") == 3


def test_example_dump_process(server, s: Session, tmp_path: Path, guest_image) -> None:
    mappings = dump_process.dump(s, "probe", tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "maps" in names and len(names) == len(mappings) + 1
    text = next(m for m in mappings if m.start == 0x40_0000)  # the -no-pie program's first page
    image = (tmp_path / f"{text.start:016x}-{text.end:016x}.bin").read_bytes()
    assert len(image) == text.size
    # the program as built (the initramfs holds these files): its first page is its ELF header
    assert image[:0x1000] == (guest_image.programs / "probe").read_bytes()[:0x1000]


def test_example_search_ram(server, s: Session) -> None:
    pid, buf = (
        int(x, 0)
        for x in re.search(r"ticker pid=(\d+) buf=(0x[0-9a-f]+)", console(server)).groups()
    )
    pattern = b"TICK" + pid.to_bytes(4, "little") + (~pid & 0xFFFF_FFFF).to_bytes(4, "little")
    hits = search_ram.search(s, pattern)
    owners = [(p.pid, va) for hit in hits for p, va in hit.users]
    assert (pid, buf) in owners, hits
    hit = next(h for h in hits if (pid, buf) in [(p.pid, va) for p, va in h.users])
    assert s.read(hit.kernel_va, len(pattern)) == pattern  # the kernel's linear map agrees
