"""IDA's and radare2's packet sequences (tests/client_sequences.py) against the session, over the
in-memory fake machine: what they send on connect, to read, step and break, and what they need
back."""

from __future__ import annotations

import pytest

from tests.client_sequences import ida_connect, radare2_connect, radare2_read
from tests.unit.fakes import HUGE_VA, KERNEL_VA, ram_pattern
from tests.unit.test_session import Machine, machine, parse_stop_reply, rcmd
from vmigdb.hv.base import BreakpointType, DriverStop
from vmigdb.rsp.session import Detach
from vmigdb.wire import codec


@pytest.fixture
def m() -> Machine:
    return machine()


def expected(m: Machine, va: int, length: int) -> bytes:
    return bytes(ram_pattern(m.fake.va_to_pa(va) + i) for i in range(length))


def test_radare2_connects_reads_and_detaches(m: Machine) -> None:
    learned = radare2_connect(m.one)
    assert learned["pkt_sz"] == 2048 and learned["tid"] == 1
    assert b"r" in learned["vcont"]
    assert m.one(b"?").startswith(b"T")
    assert len(m.one(b"g")) == 2 * 608
    data = radare2_read(m.one, KERNEL_VA, 0x400 * 2 + 0x123, learned["pkt_sz"])
    assert data == expected(m, KERNEL_VA, 0x400 * 2 + 0x123)
    assert m.one(b"qOffsets") == b""  # gdbr_get_baddr: no base address, nothing breaks
    outcome = m.handle(b"D")
    assert outcome.replies == [b"OK"] and isinstance(outcome.action, Detach)


def test_radare2_breakpoint_continue_step(m: Machine) -> None:
    radare2_connect(m.one)
    rip = m.fake.reg(1, "rip")
    assert m.one(b"Z0,%x,1" % rip) == b"OK"
    event = m.resume(b"vCont;c", DriverStop(cpu=1, signal=5))
    signal, fields = parse_stop_reply(m.session.stop_reply(event))
    # handle_stop_reason: signal 5 is a breakpoint; thread read without multiprocess
    assert signal == 5 and fields["thread"] == b"1" and "swbreak" in fields
    assert int.from_bytes(codec.decode_hex(fields["10"]), "little") == rip
    assert m.one(b"z0,%x,1" % rip) == b"OK"
    event = m.resume(b"vCont;s:1", DriverStop(cpu=1, signal=5))
    assert m.session.stop_reply(event).startswith(b"T05thread:1;")
    assert m.fake.resumes[-1] == {1: "s"}  # only the stepping vCPU moves


@pytest.mark.parametrize(
    ("z", "type_", "key"),
    [(2, BreakpointType.WRITE_WATCH, b"watch"), (3, BreakpointType.READ_WATCH, b"rwatch")],
)
def test_radare2_watchpoints(m: Machine, z: int, type_: BreakpointType, key: bytes) -> None:
    radare2_connect(m.one)
    addr = HUGE_VA + 0x40
    assert m.one(b"Z%d,%x,1" % (z, addr)) == b"OK"
    event = m.resume(b"vCont;c", DriverStop(cpu=1, signal=5, watch=(type_, addr)))
    reply = m.session.stop_reply(event)
    assert reply.endswith(b"%s:%x;" % (key, addr))  # parsed by radare2 when the signal is 5


def test_radare2_monitor_command(m: Machine) -> None:
    radare2_connect(m.one)
    *console, last = m.send(rcmd("info mem"))
    assert last == b"OK" and all(p.startswith(b"O") for p in console)


@pytest.mark.parametrize("bare", [True, False])
def test_ida_connects(m: Machine, bare: bool) -> None:
    learned = ida_connect(m.one, bare_qsupported=bare)
    assert learned["tids"] == [1, 2]
    assert learned["max_read"] == 608


def test_ida_reads_in_g_sized_chunks(m: Machine) -> None:
    max_read = ida_connect(m.one, bare_qsupported=True)["max_read"]
    data = b""
    while len(data) < 0x1000:
        reply = m.one(b"m%x,%x" % (KERNEL_VA + len(data), min(max_read, 0x1000 - len(data))))
        data += codec.decode_hex(reply)
    assert data == expected(m, KERNEL_VA, 0x1000)


def test_ida_software_breakpoint_reports_its_own_address(m: Machine) -> None:
    ida_connect(m.one, bare_qsupported=True)
    rip = m.fake.reg(2, "rip")
    assert m.one(b"Z0,%x,1" % rip) == b"OK"
    assert m.one(b"Hc2") == b"OK"
    event = m.resume(b"c", DriverStop(cpu=2, signal=5))
    _, fields = parse_stop_reply(m.session.stop_reply(event))
    assert fields["thread"] == b"2"
    # "Software breakpoints at EIP+1" unchecked, as for QEMU: rip is the breakpoint itself
    assert int.from_bytes(codec.decode_hex(fields["10"]), "little") == rip
    assert m.one(b"Hg2") == b"OK"
    regs = codec.decode_hex(m.one(b"g"))
    assert int.from_bytes(regs[128:136], "little") == rip  # rip is the 17th 8-byte register


def test_ida_hardware_breakpoint_and_watchpoint(m: Machine) -> None:
    ida_connect(m.one, bare_qsupported=False)
    rip = m.fake.reg(1, "rip")
    assert m.one(b"Z1,%x,1" % rip) == b"OK"
    _, fields = parse_stop_reply(m.session.stop_reply(m.resume(b"c", DriverStop(1, 5))))
    assert "hwbreak" in fields
    m.one(b"z1,%x,1" % rip)
    addr = HUGE_VA + 0x100
    assert m.one(b"Z2,%x,4" % addr) == b"OK"
    event = m.resume(b"c", DriverStop(cpu=1, signal=5, watch=(BreakpointType.WRITE_WATCH, addr)))
    _, fields = parse_stop_reply(m.session.stop_reply(event))
    assert fields["watch"] == b"%x" % addr  # IDA's hardware-breakpoint report


def test_ida_single_step_with_hc(m: Machine) -> None:
    ida_connect(m.one, bare_qsupported=True)
    assert m.one(b"Hc1") == b"OK"
    event = m.resume(b"s", DriverStop(cpu=1, signal=5))
    assert m.session.stop_reply(event).startswith(b"T05thread:1;")
    assert m.fake.resumes[-1][1] == "s"


def test_ida_writes_memory_and_sends_monitor_commands(m: Machine) -> None:
    ida_connect(m.one, bare_qsupported=True)
    assert m.one(b"M%x,4:deadbeef" % HUGE_VA) == b"OK"
    assert m.one(b"m%x,4" % HUGE_VA) == b"deadbeef"
    *console, last = m.send(rcmd("help"))
    text = b"".join(codec.decode_hex(p[1:]) for p in console).decode()
    assert last == b"OK" and "info mem" in text
    outcome = m.handle(b"D")
    assert isinstance(outcome.action, Detach)
