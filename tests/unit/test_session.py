"""The RSP session against byte strings, over a Debugger driving the in-memory FakeDriver."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

from tests.unit.fakes import (
    HUGE_PA,
    HUGE_VA,
    KERNEL_PA,
    KERNEL_VA,
    OUTSIDE_RAM_VA,
    UNMAPPED_VA,
    USER_VA,
    FakeDriver,
    bp_key,
    ram_pattern,
)
from vmigdb.arch.x86_64.registers import (
    G_PACKET_SIZE,
    REGISTER_INDEX,
    REGISTER_OFFSETS,
    REGISTERS,
)
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopEvent, StopReason
from vmigdb.debugger.policy import StealthMode, StealthRefused
from vmigdb.hv.base import BreakpointType, DriverError, DriverStop
from vmigdb.rsp.session import (
    MAX_MEMORY_READ,
    PACKET_SIZE,
    Detach,
    Kill,
    Outcome,
    Resume,
    Session,
)
from vmigdb.rsp.target_xml import target_xml
from vmigdb.wire import codec

SW, HW = BreakpointType.SOFTWARE, BreakpointType.HARDWARE
WW, RW, AW = BreakpointType.WRITE_WATCH, BreakpointType.READ_WATCH, BreakpointType.ACCESS_WATCH
ERROR = re.compile(rb"E[0-9a-fA-F]{2}")
RIP, EFLAGS, CS, CR3 = (REGISTER_INDEX[n] for n in ("rip", "eflags", "cs", "cr3"))


def hexnum(value: int) -> bytes:
    return b"%x" % value


def le(value: int, size: int = 8) -> bytes:
    return codec.encode_hex(value.to_bytes(size, "little"))


def rcmd(command: str) -> bytes:
    return b"qRcmd," + codec.encode_hex(command.encode())


@dataclass
class Machine:
    fake: FakeDriver
    dbg: Debugger
    session: Session

    def handle(self, payload: bytes) -> Outcome:
        return self.session.handle(payload)

    def send(self, payload: bytes) -> list[bytes]:
        outcome = self.session.handle(payload)
        assert outcome.action is None, (payload, outcome)
        return outcome.replies

    def one(self, payload: bytes) -> bytes:
        replies = self.send(payload)
        assert len(replies) == 1, (payload, replies)
        return replies[0]

    def monitor(self, command: str) -> tuple[str, bytes]:
        """Console text and the final reply of `monitor COMMAND`."""
        *console, last = self.send(rcmd(command))
        assert all(p.startswith(b"O") for p in console)
        return b"".join(codec.decode_hex(p[1:]) for p in console).decode(), last

    def resume(self, payload: bytes, *stops: DriverStop) -> StopEvent:
        """Send a resume packet, carry out its action as the server does, return the stop."""
        outcome = self.session.handle(payload)
        assert outcome.replies == [] and isinstance(outcome.action, Resume), outcome
        self.fake.queue_stop(*stops)
        self.dbg.resume(outcome.action.actions)
        for _ in range(10):
            event = self.dbg.poll()
            if event is not None:
                return event
        raise AssertionError("no stop")


def machine(ncpus: int = 2, *, kvm: bool = False) -> Machine:
    fake = FakeDriver(ncpus, kvm=kvm)
    dbg = Debugger(fake)
    dbg.resume({cpu: "c" for cpu in dbg.cpus()})  # the guest boots running, as the CLI has it
    dbg.halt()  # what the server does when GDB connects
    fake.calls.clear()
    fake.resumes.clear()
    return Machine(fake, dbg, Session(dbg))


@pytest.fixture
def m() -> Machine:
    return machine()


@pytest.fixture
def m3() -> Machine:
    return machine(3)


def parse_stop_reply(reply: bytes) -> tuple[int, dict[str, bytes]]:
    match = re.fullmatch(rb"T([0-9a-f]{2})((?:[^;:]+:[^;]*;)*)", reply)
    assert match, reply
    fields: dict[str, bytes] = {}
    for item in match.group(2).split(b";")[:-1]:
        key, _, value = item.partition(b":")
        fields[key.decode()] = value
    return int(match.group(1), 16), fields


# -- simple request/reply tables ------------------------------------------------------------------

EMPTY_FOR_UNKNOWN = [
    b"vMustReplyEmpty",
    b"qTStatus",
    b"qOffsets",
    b"qGetTLSAddr:1,0,0",
    b"QNonStop:1",
    b"QPassSignals:e;10;14",
    b"QThreadEvents:1",
    b"qXfer:auxv:read::0,100",
    b"qXfer:memory-map:read::0,100",
    b"vFile:mkdir:2f74",
    b"vRun;",
    b"vAttach;1",
    b"vCtrlC",
    b"bc",
    b"!",
    b"i",
    b"R00",
    b"A",
    b"t",
    b"",
    b"\x00\xff",
    b"vCont",  # no ';' and no '?'
]


@pytest.mark.parametrize("payload", EMPTY_FOR_UNKNOWN)
def test_unknown_packets_get_the_empty_reply(m: Machine, payload: bytes) -> None:
    assert m.send(payload) == [b""]


REPLIES = [
    (b"qAttached", b"1"),
    (b"qAttached:1", b"1"),
    (b"qSymbol::", b"OK"),
    (b"vCont?", b"vCont;c;C;s;S;t;r"),
    (b"qfThreadInfo", b"m1,2,3"),
    (b"qsThreadInfo", b"l"),
    (b"qC", b"QC1"),
    (b"T1", b"OK"),
    (b"T3", b"OK"),
    (b"Tp1.2", b"OK"),
    (b"T4", b"E03"),
    (b"T0", b"E03"),
    (b"T-1", b"E03"),
    (b"T", b"E16"),
    (b"Tzz", b"E16"),
    (b"qThreadExtraInfo,1", codec.encode_hex(b"CPU#0")),
    (b"qThreadExtraInfo,3", codec.encode_hex(b"CPU#2")),
    (b"qThreadExtraInfo,4", b"E03"),
    (b"qThreadExtraInfo,", b"E16"),
    (b"Hg0", b"OK"),
    (b"Hg1", b"OK"),
    (b"Hg3", b"OK"),
    (b"Hgp1.2", b"OK"),
    (b"Hgp1.0", b"OK"),
    (b"Hc-1", b"OK"),
    (b"Hc0", b"OK"),
    (b"Hc2", b"OK"),
    (b"Hcp1.-1", b"OK"),
    (b"Hg4", b"E03"),
    (b"Hc9", b"E03"),
    (b"Hg-1", b"E16"),
    (b"Hgp1", b"E16"),  # every thread of process 1: no single one
    (b"Hx1", b"E16"),
    (b"H", b"E16"),
    (b"Hg", b"E16"),
    (b"g1", b"E16"),
    (b"p", b"E16"),
    (b"pzz", b"E16"),
    (b"p%x" % len(REGISTERS), b"E16"),
    (b"P10", b"E16"),
    (b"P10=00", b"E16"),
    (b"P10=" + b"00" * 9, b"E16"),
    (b"P10=zz" + b"00" * 7, b"E16"),
    (b"P%x=" % len(REGISTERS) + b"00" * 8, b"E16"),
    (b"G", b"E16"),
    (b"G00", b"E16"),
    (b"G" + b"00" * (G_PACKET_SIZE + 1), b"E16"),
    (b"m", b"E16"),
    (b"m1000", b"E16"),
    (b"mzz,4", b"E16"),
    (b"m1000,", b"E16"),
    (b"m" + b"1" * 17 + b",4", b"E16"),
    (b"M1000,2", b"E16"),
    (b"M1000,2:00", b"E16"),  # length and data disagree
    (b"M1000,1:zz", b"E16"),
    (b"X1000,2:a", b"E16"),
    (b"X1000,1:}", b"E16"),  # lone escape
    (b"Z5,1000,1", b"E16"),
    (b"Z,1000,1", b"E16"),
    (b"Z01,1000,1", b"E16"),
    (b"Z0,1000", b"E16"),
    (b"Z0,1000,0", b"E16"),
    (b"Z0,1000,11", b"E16"),
    (b"Z0,zz,1", b"E16"),
    (b"Z0,1000,1;X3,220102", b"E16"),  # condition bytecode that underflows and has no end
    (b"Z0,1000,1;X3,220527", b"OK"),  # const8 5; end
    (b"Z0,1000,1;cmds:0,X3,220102", b"E16"),
    (b"z0,1000,1;X3,220527", b"E16"),  # z takes no conditions
    (b"z9,1000,1", b"E16"),
    (b"qXfer:features:read:target.xml", b"E16"),
    (b"qXfer:features:read:target.xml:zz,10", b"E16"),
    (b"qXfer:features:read:target.xml:0", b"E16"),
    (b"qXfer:threads:read::", b"E16"),
    (b"qRcmd,zz", b"E16"),
    (b"qRcmd,6", b"E16"),
    (b"c1234", b"E16"),
    (b"s1234", b"E16"),
    (b"C", b"E16"),
    (b"Czz", b"E16"),
    (b"C05;1234", b"E16"),
    (b"S05;1234", b"E16"),
    (b"D1", b"E16"),
    (b"vCont;", b"E16"),
    (b"vCont;t", b"E16"),
    (b"vCont;t:1", b"E16"),
    (b"vCont;x", b"E16"),
    (b"vCont;r1000,2000", b"E16"),  # range stepping is not advertised
    (b"vCont;c:4", b"E16"),
    (b"vCont;c:0", b"E16"),
    (b"vCont;c1", b"E16"),
    (b"vCont;Czz", b"E16"),
    (b"vCont;c;;c", b"E16"),
]


@pytest.mark.parametrize(("payload", "reply"), REPLIES)
def test_replies(m3: Machine, payload: bytes, reply: bytes) -> None:
    assert m3.send(payload) == [reply]


@pytest.mark.parametrize("payload", [p for p, r in REPLIES if ERROR.fullmatch(r)])
def test_errors_change_nothing(m3: Machine, payload: bytes) -> None:
    before = bytes(m3.fake.ram)
    m3.fake.calls.clear()
    assert m3.handle(payload).action is None
    assert bytes(m3.fake.ram) == before
    assert m3.fake.bp_calls == [] and m3.fake.register_writes == [] and m3.fake.resumes == []
    assert not m3.fake.violations


# -- features -------------------------------------------------------------------------------------


def _features(m: Machine, payload: bytes = b"qSupported") -> dict[str, str]:
    reply = m.one(payload).decode()
    out = {}
    for item in reply.split(";"):
        name, sep, value = item.partition("=")
        out[name if sep else name[:-1]] = value if sep else name[-1]
    return out


@pytest.mark.parametrize(
    "payload",
    [
        b"qSupported",
        b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+;fork-events+;vfork-events+;"
        b"exec-events+;vContSupported+;QThreadEvents+;no-resumed+;xmlRegisters=i386",
    ],
)
def test_qsupported(m: Machine, payload: bytes) -> None:
    features = _features(m, payload)
    assert int(features["PacketSize"], 16) >= 0x20000
    assert int(features["PacketSize"], 16) == PACKET_SIZE
    for name in (
        "QStartNoAckMode",
        "qXfer:features:read",
        "qXfer:threads:read",
        "swbreak",
        "hwbreak",
        "vContSupported",
        "ConditionalBreakpoints",
        "qXfer:exec-file:read",
        "QCatchSyscalls",
        "qXfer:libraries-svr4:read",
    ):
        assert features.get(name) == "+", name
    for name in (
        "multiprocess",
        "BreakpointCommands",
        "ConditionalTracepoints",
        "QNonStop",
        "QPassSignals",
        "QProgramSignals",
        "ReverseStep",
        "ReverseContinue",
        "fork-events",
        "vfork-events",
        "exec-events",
        "no-resumed",
        "QThreadEvents",
        "qXfer:memory-map:read",
        "qXfer:auxv:read",
        "qXfer:libraries:read",
        "QDisableRandomization",
        "QAgent",
        "Qbtrace:bts",
        "memory-tagging",
    ):
        assert features.get(name, "-") == "-", name


def test_start_no_ack_mode(m: Machine) -> None:
    assert m.session.no_ack is False
    assert m.send(b"QStartNoAckMode") == [b"OK"]
    assert m.session.no_ack is True


@pytest.mark.parametrize("chunk", [0x7F, 0x400, 0x1000, 0xFFFF])
def test_target_xml_chunks_reassemble(m: Machine, chunk: int) -> None:
    document = target_xml().encode()
    parts = []
    offset = 0
    while True:
        reply = m.one(b"qXfer:features:read:target.xml:%x,%x" % (offset, chunk))
        assert reply[:1] in (b"m", b"l"), reply[:20]
        data = codec.unescape_binary(reply[1:])
        parts.append(data)
        offset += len(data)
        if reply.startswith(b"l"):
            break
        assert len(data) == chunk
    assert b"".join(parts) == document
    assert len(parts) >= -(-len(document) // chunk)
    # past the end: an empty last chunk
    assert m.one(b"qXfer:features:read:target.xml:%x,10" % len(document)) == b"l"
    assert m.one(b"qXfer:features:read:target.xml:%x,10" % (len(document) + 99)) == b"l"


@pytest.mark.parametrize("annex", [b"foo.xml", b"", b"i386-64bit.xml", b"target.xml.bak"])
def test_target_xml_unknown_annex(m: Machine, annex: bytes) -> None:
    assert ERROR.fullmatch(m.one(b"qXfer:features:read:" + annex + b":0,100"))


def test_qxfer_threads(m3: Machine) -> None:
    reply = m3.one(b"qXfer:threads:read::0,fff")
    assert reply.startswith(b"l")
    root = ET.fromstring(codec.unescape_binary(reply[1:]))
    assert root.tag == "threads"
    threads = [(t.get("id"), t.get("core"), t.get("name")) for t in root]
    assert threads == [("1", "0", "CPU#0"), ("2", "1", "CPU#1"), ("3", "2", "CPU#2")]
    # in chunks
    parts, offset = [], 0
    while True:
        reply = m3.one(b"qXfer:threads:read::%x,10" % offset)
        data = codec.unescape_binary(reply[1:])
        parts.append(data)
        offset += len(data)
        if reply.startswith(b"l"):
            break
    assert ET.fromstring(b"".join(parts)).tag == "threads"


# -- threads --------------------------------------------------------------------------------------


def test_stop_reason_query(m: Machine) -> None:
    sig, fields = parse_stop_reply(m.one(b"?"))
    assert sig == 2  # the halt at attach is an interrupt
    assert fields["thread"] == b"1"


def test_stop_reason_before_any_stop() -> None:
    dbg = Debugger(FakeDriver(1, ram_size=4 << 20))
    assert Session(dbg).handle(b"?").replies == [b"S05"]


def test_hg_selects_registers_and_qc(m3: Machine) -> None:
    assert m3.one(b"qC") == b"QC1"
    assert m3.one(b"Hg3") == b"OK"
    assert m3.one(b"qC") == b"QC3"
    assert m3.one(b"p10") == le(m3.fake.reg(3, "rip"))
    assert m3.one(b"Hgp1.2") == b"OK"
    assert m3.one(b"p10") == le(m3.fake.reg(2, "rip"))
    assert m3.one(b"Hg0") == b"OK"  # any: the thread of the last stop
    assert m3.one(b"qC") == b"QC1"
    assert m3.one(b"p10") == le(m3.fake.reg(1, "rip"))
    assert m3.one(b"Hg7") == b"E03"
    assert m3.one(b"qC") == b"QC1"  # unchanged by the refused Hg


def test_stop_resets_hg_to_the_stopping_thread(m3: Machine) -> None:
    m3.send(b"Hg3")
    event = m3.resume(b"c", DriverStop(cpu=2, signal=5))
    m3.session.stop_reply(event)
    assert m3.one(b"qC") == b"QC2"
    assert m3.one(b"p10") == le(m3.fake.reg(2, "rip"))


# -- registers ------------------------------------------------------------------------------------


def test_g_canonical_layout(m: Machine) -> None:
    reply = m.one(b"g")
    assert re.fullmatch(rb"[0-9a-f]*", reply)
    data = codec.decode_hex(reply)
    assert len(data) == G_PACKET_SIZE == 608

    def field(name: str, size: int) -> int:
        off = REGISTER_OFFSETS[REGISTER_INDEX[name]]
        return int.from_bytes(data[off : off + size], "little")

    fake = m.fake
    assert REGISTER_OFFSETS[RIP] == 16 * 8
    assert field("rip", 8) == fake.reg(1, "rip") == KERNEL_VA + 0x100
    assert REGISTER_OFFSETS[EFLAGS] == 16 * 8 + 8
    assert field("eflags", 4) == 0x246
    assert REGISTER_OFFSETS[CS] == REGISTER_OFFSETS[EFLAGS] + 4  # eflags is 32-bit
    assert field("cs", 4) == 0x10
    assert REGISTER_OFFSETS[CS + 1] == REGISTER_OFFSETS[CS] + 4  # cs is 32-bit
    assert field("cr3", 8) == fake.reg(1, "cr3")
    assert REGISTER_OFFSETS[CR3] == G_PACKET_SIZE - 8 * 5  # cr3, cr4, cr8, efer, k_gs_base
    for reg in REGISTERS:
        assert field(reg.name, reg.bitsize // 8) == fake.reg(1, reg.name), reg.name
    assert m.one(b"Hg2") == b"OK"
    data = codec.decode_hex(m.one(b"g"))
    assert field("rip", 8) == fake.reg(2, "rip") == KERNEL_VA + 0x200


def test_g_reads_registers_once_per_stop(m: Machine) -> None:
    m.fake.calls.clear()
    for _ in range(5):
        m.send(b"g")
        m.send(b"p10")
    assert m.fake.count("read_registers") == 0  # cached since the stop (halt) read them


@pytest.mark.parametrize("name", ["rip", "cr3", "rsp", "eflags", "cs", "st0", "xmm15", "efer"])
def test_p_reads_one_register(m: Machine, name: str) -> None:
    regnum = REGISTER_INDEX[name]
    size = REGISTERS[regnum].bitsize // 8
    assert m.one(b"p%x" % regnum) == le(m.fake.reg(1, name), size)


def test_p_rip_and_cr3_values(m: Machine) -> None:
    assert m.one(b"p10") == le(KERNEL_VA + 0x100)
    assert m.one(b"p%x" % CR3) == le(0x1000)


def test_P_write_reaches_the_driver(m: Machine) -> None:
    assert m.one(b"P10=" + le(KERNEL_VA + 0x234)) == b"OK"
    assert m.fake.register_writes == [(1, RIP, (KERNEL_VA + 0x234).to_bytes(8, "little"))]
    assert m.fake.reg(1, "rip") == KERNEL_VA + 0x234
    assert m.one(b"p10") == le(KERNEL_VA + 0x234)  # not stale
    assert m.one(b"P11=" + le(0x202, 4)) == b"OK"  # eflags: 32-bit
    assert m.fake.reg(1, "eflags") == 0x202
    m.send(b"Hg2")
    assert m.one(b"P0=" + le(0x55)) == b"OK"
    assert m.fake.reg(2, "rax") == 0x55 and m.fake.reg(1, "rax") != 0x55


def test_P_cr3_flushes_translations(m: Machine) -> None:
    assert m.one(b"m%x,4" % KERNEL_VA) != b"E0e"
    assert m.one(b"P%x=" % CR3 + le(0x300000)) == b"OK"  # a page of zeroes: nothing mapped
    assert m.one(b"m%x,4" % KERNEL_VA) == b"E0e"


def test_G_round_trip(m: Machine) -> None:
    original = codec.decode_hex(m.one(b"g"))
    data = bytearray(original)
    off = REGISTER_OFFSETS[0]
    data[off : off + 8] = (0x1234).to_bytes(8, "little")
    off = REGISTER_OFFSETS[RIP]
    data[off : off + 8] = (KERNEL_VA + 0x42).to_bytes(8, "little")
    assert m.one(b"G" + codec.encode_hex(bytes(data))) == b"OK"
    assert sorted(regnum for _, regnum, _ in m.fake.register_writes) == [0, RIP]  # only changes
    assert m.fake.reg(1, "rax") == 0x1234
    assert m.fake.reg(1, "rip") == KERNEL_VA + 0x42
    assert codec.decode_hex(m.one(b"g")) == bytes(data)
    # unchanged G: no write at all
    m.fake.register_writes.clear()
    assert m.one(b"G" + codec.encode_hex(bytes(data))) == b"OK"
    assert m.fake.register_writes == []


# -- memory ---------------------------------------------------------------------------------------


def test_m_past_the_top_of_the_address_space_is_a_short_read_not_a_malformed_packet(
    m: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    # GDB 13 sent `mffffffffffffffff,9` in the soak; the top page is unmapped here.
    assert m.one(b"mffffffffffffffff,9") == b"E0e"
    assert "malformed" not in caplog.text
    asked = []
    real = m.dbg.read_memory

    def spy(cpu: int, addr: int, length: int) -> bytes:
        asked.append((addr, length))
        return real(cpu, addr, length)

    m.dbg.read_memory = spy  # type: ignore[method-assign]
    m.one(b"mfffffffffffffffc,10")
    assert asked == [((1 << 64) - 4, 4)]  # only the bytes below the top


def test_m_reads_mapped_kernel_memory(m: Machine) -> None:
    payload = bytes(range(256)) * 2
    m.fake.poke_virtual(KERNEL_VA + 0x800, payload)
    assert codec.decode_hex(m.one(b"m%x,200" % (KERNEL_VA + 0x800))) == payload
    # across a 4K page boundary (physically contiguous here)
    expected = bytes(m.fake.ram[KERNEL_PA + 0xFF0 : KERNEL_PA + 0x1010])
    assert codec.decode_hex(m.one(b"m%x,20" % (KERNEL_VA + 0xFF0))) == expected
    # in the 2M page
    want = bytes(ram_pattern(HUGE_PA + 0x12345 + i) for i in range(16))
    assert codec.decode_hex(m.one(b"m%x,10" % (HUGE_VA + 0x12345))) == want
    # the user page in the lower half
    m.fake.poke_virtual(USER_VA, b"user")
    assert m.one(b"m%x,4" % USER_VA) == codec.encode_hex(b"user")


def test_m_partial_across_mapped_unmapped_boundary(m: Machine) -> None:
    reply = m.one(b"m%x,20" % (UNMAPPED_VA - 8))
    assert codec.decode_hex(reply) == m.fake.peek_virtual(UNMAPPED_VA - 8, 8)


def test_m_partial_when_the_frame_is_outside_ram(m: Machine) -> None:
    assert m.one(b"m%x,10" % OUTSIDE_RAM_VA) == b"E0e"
    # The page before OUTSIDE_RAM_VA is not present either.
    assert m.one(b"m%x,10" % (OUTSIDE_RAM_VA - 4)) == b"E0e"


@pytest.mark.parametrize(
    "addr",
    [UNMAPPED_VA, 0, 0x1000, 0x0000_8000_0000_0000, 0xFFFF_0000_0000_0000, (1 << 64) - 16],
    ids=hex,
)
def test_m_unmapped_is_efault(m: Machine, addr: int) -> None:
    reply = m.one(b"m%x,8" % addr)
    assert ERROR.fullmatch(reply) and reply == b"E0e"


def test_m_zero_length(m: Machine) -> None:
    assert m.one(b"m%x,0" % UNMAPPED_VA) == b""


def test_m_huge_length_is_capped(m: Machine) -> None:
    reply = m.one(b"m%x,fffffff" % HUGE_VA)
    data = codec.decode_hex(reply)
    assert len(data) == MAX_MEMORY_READ
    assert len(reply) + 4 <= PACKET_SIZE  # fits the advertised packet size with framing
    assert data == bytes(m.fake.ram[HUGE_PA : HUGE_PA + MAX_MEMORY_READ])


def test_M_writes_at_the_translated_address(m: Machine) -> None:
    va = KERNEL_VA + 0x1FFE  # crosses into the next page
    assert m.one(b"M%x,4:deadbeef" % va) == b"OK"
    pa = m.fake.va_to_pa(va)
    assert bytes(m.fake.ram[pa : pa + 4]) == bytes.fromhex("deadbeef")
    assert [w[0] for w in m.fake.writes] == [pa, pa + 2]  # one write per page
    assert m.one(b"m%x,4" % va) == b"deadbeef"  # no stale cache


def test_M_to_the_2m_page(m: Machine) -> None:
    assert m.one(b"M%x,3:010203" % (HUGE_VA + 0x1FFFFD)) == b"OK"
    assert bytes(m.fake.ram[HUGE_PA + 0x1FFFFD : HUGE_PA + 0x200000]) == b"\x01\x02\x03"


def test_M_to_unmapped_is_efault(m: Machine) -> None:
    before = bytes(m.fake.ram)
    assert m.one(b"M%x,2:0102" % UNMAPPED_VA) == b"E0e"
    assert bytes(m.fake.ram) == before


def test_X_with_escaped_bytes(m: Machine) -> None:
    data = b"}#$*\x00\xff}}*#"
    escaped = codec.escape_binary(data)
    assert b"#" not in escaped and b"$" not in escaped and b"*" not in escaped
    packet = b"X%x,%x:" % (KERNEL_VA + 0x10, len(data)) + escaped
    # exactly as it arrives: framed, through the decoder
    decoder = codec.Decoder()
    decoder.feed(codec.encode_packet(packet))
    (event,) = decoder.events()
    assert isinstance(event, codec.Packet)
    assert m.one(event.data) == b"OK"
    pa = m.fake.va_to_pa(KERNEL_VA + 0x10)
    assert bytes(m.fake.ram[pa : pa + len(data)]) == data


def test_X_probe_with_length_zero(m: Machine) -> None:
    assert m.one(b"X%x,0:" % KERNEL_VA) == b"OK"
    assert m.one(b"X%x,0:" % UNMAPPED_VA) == b"OK"
    assert m.fake.writes == []


def test_monitor_phys_makes_addresses_physical(m: Machine) -> None:
    text, last = m.monitor("phys on")
    assert last == b"OK" and "on" in text
    assert m.dbg.physical_addresses
    want = bytes(ram_pattern(KERNEL_PA + i) for i in range(16))
    assert codec.decode_hex(m.one(b"m%x,10" % KERNEL_PA)) == want
    assert m.one(b"m%x,10" % KERNEL_VA) == b"E0e"  # no such physical address
    ram = len(m.fake.ram)
    assert codec.decode_hex(m.one(b"m%x,10" % (ram - 4))) == bytes(m.fake.ram[-4:])  # partial
    assert m.one(b"M%x,2:abcd" % (KERNEL_PA + 2)) == b"OK"
    assert m.fake.ram[KERNEL_PA + 2 : KERNEL_PA + 4] == b"\xab\xcd"
    text, last = m.monitor("phys off")
    assert last == b"OK" and "off" in text
    assert codec.decode_hex(m.one(b"m%x,4" % KERNEL_VA))[2:4] == b"\xab\xcd"


# -- monitor --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["help", "", "  "])
def test_monitor_help(m: Machine, command: str) -> None:
    text, last = m.monitor(command)
    assert last == b"OK"
    for name in ("help", "info", "stealth", "vtop", "regs", "phys"):
        assert name in text


def test_monitor_output_is_o_packets(m: Machine) -> None:
    replies = m.send(rcmd("help"))
    assert replies[-1] == b"OK"
    for reply in replies[:-1]:
        assert re.fullmatch(rb"O(?:[0-9a-f]{2})+", reply)


def test_monitor_info(m: Machine) -> None:
    text, last = m.monitor("info")
    assert last == b"OK"
    assert "driver: fake (tcg)" in text
    assert "state: stopped" in text
    assert "current vCPU: CPU#0" in text
    assert "virtual" in text
    m.send(b"Z0,%x,1" % KERNEL_VA)
    m.send(b"z0,%x,1" % KERNEL_VA)
    text, _ = m.monitor("info")
    assert "0 requested, 1 held by the hypervisor" in text


@pytest.mark.parametrize("kvm", [False, True])
def test_monitor_stealth(kvm: bool) -> None:
    mach = machine(kvm=kvm)
    text, last = mach.monitor("stealth")
    assert last == b"OK"
    assert "driver: fake" in text
    for job in ("registers", "memory read", "software breakpoint", "watchpoint", "single-step"):
        assert f"  {job}:" in text
    if kvm:
        assert "4 slots" in text
        step = next(line for line in text.splitlines() if "single-step:" in line)
        assert "VISIBLE to the guest" in step
    else:
        assert "slots" not in text
        step = next(line for line in text.splitlines() if "single-step:" in line)
        assert "invisible" in step


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (KERNEL_VA + 0x123, "-> 0x100123 (4K page, writable, supervisor, exec)"),
        (KERNEL_VA + 0x3008, "-> 0x103008 (4K page, read-only, supervisor, nx)"),
        (HUGE_VA + 0x10, f"-> {HUGE_PA + 0x10:#x} (2M page, writable, supervisor, exec)"),
        (USER_VA + 1, "(4K page, writable, user, exec)"),
        (UNMAPPED_VA, "not mapped (not present at level 1)"),
        (0x0000_8000_0000_0000, "not mapped (non-canonical address"),
    ],
)
def test_monitor_vtop(m: Machine, addr: int, expected: str) -> None:
    text, last = m.monitor(f"vtop {addr:#x}")
    assert last == b"OK"
    assert text.startswith(f"{addr:#x}")
    assert expected in text
    text2, _ = m.monitor(f"vtop {addr}")  # decimal works too
    assert text2 == text


def test_monitor_regs(m: Machine) -> None:
    text, last = m.monitor("regs")
    assert last == b"OK"
    assert re.search(rf"rip 0x{KERNEL_VA + 0x100:016x}", text)
    assert re.search(r"cr3 0x0000000000001000", text)
    m.send(b"Hg2")
    text, _ = m.monitor("regs")
    assert re.search(rf"rip 0x{KERNEL_VA + 0x200:016x}", text)


def test_monitor_phys_query(m: Machine) -> None:
    text, last = m.monitor("phys")
    assert last == b"OK" and text.startswith("phys off")


@pytest.mark.parametrize(
    "command", ["vtop", "vtop 1 2", "vtop zz", "phys maybe", "phys on off", "nonsense", "cmd_help"]
)
def test_monitor_bad_usage(m: Machine, command: str) -> None:
    replies = m.send(rcmd(command))
    assert replies[-1] == b"E01"
    assert len(replies) >= 2 and all(r.startswith(b"O") for r in replies[:-1])
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()
    assert text.strip()


# -- run control ----------------------------------------------------------------------------------


VCONT = [
    (b"vCont;c", {1: "c", 2: "c", 3: "c"}),
    (b"vCont;s:1;c", {1: "s", 2: "c", 3: "c"}),
    (b"vCont;s:1", {1: "s"}),
    (b"vCont;c:2", {2: "c"}),
    (b"vCont;s:3;c:1", {3: "s", 1: "c"}),
    (b"vCont;s:2;s:2;c", {2: "s", 1: "c", 3: "c"}),
    (b"vCont;c:2;s:2", {2: "c"}),  # the leftmost action for a thread applies
    (b"vCont;c:-1", {1: "c", 2: "c", 3: "c"}),
    (b"vCont;s:p1.2;c", {2: "s", 1: "c", 3: "c"}),
    (b"vCont;t:1;c", {2: "c", 3: "c"}),
    (b"vCont;C05", {1: "c", 2: "c", 3: "c"}),
    (b"vCont;S0b:2", {2: "s"}),
    (b"vCont;C02:1;s:2", {1: "c", 2: "s"}),
]


@pytest.mark.parametrize(("payload", "actions"), VCONT)
def test_vcont(m3: Machine, payload: bytes, actions: dict[int, str]) -> None:
    outcome = m3.handle(payload)
    assert outcome.replies == []
    assert outcome.action == Resume(actions)


@pytest.mark.parametrize(
    ("payload", "actions"),
    [
        (b"c", {1: "c", 2: "c", 3: "c"}),
        (b"C05", {1: "c", 2: "c", 3: "c"}),
        (b"C0e", {1: "c", 2: "c", 3: "c"}),
        (b"s", {1: "s"}),
        (b"S05", {1: "s"}),
    ],
)
def test_legacy_resume(m3: Machine, payload: bytes, actions: dict[int, str]) -> None:
    outcome = m3.handle(payload)
    assert outcome.replies == [] and outcome.action == Resume(actions)


def test_legacy_resume_follows_hc_and_hg(m3: Machine) -> None:
    m3.send(b"Hg3")
    assert m3.handle(b"s").action == Resume({3: "s"})
    assert m3.handle(b"c").action == Resume({1: "c", 2: "c", 3: "c"})
    m3.send(b"Hc2")
    assert m3.handle(b"s").action == Resume({2: "s"})
    assert m3.handle(b"c").action == Resume({2: "c"})
    m3.send(b"Hc-1")
    assert m3.handle(b"c").action == Resume({1: "c", 2: "c", 3: "c"})


@pytest.mark.parametrize("payload", [b"c1234", b"s1234", b"cffffffff81000000", b"C05;1234"])
def test_resume_with_an_address_is_refused(m: Machine, payload: bytes) -> None:
    outcome = m.handle(payload)
    assert outcome.action is None
    assert outcome.replies == [b"E16"]


@pytest.mark.parametrize("payload", [b"D", b"D;1"])
def test_detach(m: Machine, payload: bytes) -> None:
    m.send(b"Z0,%x,1" % KERNEL_VA)
    m.send(b"Z2,%x,8" % (HUGE_VA + 0x100))
    m.send(b"Z1,%x,1" % (KERNEL_VA + 8))
    m.send(b"z1,%x,1" % (KERNEL_VA + 8))  # removed lazily: still held
    assert len(m.fake.installed) == 3
    outcome = m.handle(payload)
    assert outcome.replies == [b"OK"] and outcome.action == Detach()
    m.dbg.detach()  # what the server does with Detach
    assert m.fake.installed == set()
    assert m.fake.resumes[-1] == {1: "c", 2: "c"}
    assert m.fake.running and m.dbg.running
    assert not m.fake.violations


@pytest.mark.parametrize("payload", [b"vKill;1", b"vKill", b"k"])
def test_kill(m: Machine, payload: bytes) -> None:
    outcome = m.handle(payload)
    assert outcome.replies == [b"OK"] and outcome.action == Kill()


# -- breakpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "call"),
    [
        (b"Z0,%x,1" % KERNEL_VA, ("insert", SW, KERNEL_VA, 1)),
        (b"Z1,%x,1" % KERNEL_VA, ("insert", HW, KERNEL_VA, 1)),
        (b"Z2,%x,8" % HUGE_VA, ("insert", WW, HUGE_VA, 8)),
        (b"Z3,%x,4" % HUGE_VA, ("insert", RW, HUGE_VA, 4)),
        (b"Z4,%x,2" % HUGE_VA, ("insert", AW, HUGE_VA, 2)),
        (b"Z0,ffffffffffffffff,1", ("insert", SW, (1 << 64) - 1, 1)),
        (b"Z0,%x,1" % UNMAPPED_VA, ("insert", SW, UNMAPPED_VA, 1)),  # not checked against memory
    ],
)
def test_Z_inserts_at_once(m: Machine, payload: bytes, call: tuple) -> None:
    assert m.one(payload) == b"OK"
    assert m.fake.bp_calls == [call]
    assert m.one(payload) == b"OK"  # idempotent
    assert m.fake.bp_calls == [call]


@pytest.mark.parametrize("type_", [0, 1, 2, 3, 4])
def test_z_is_lazy(m: Machine, type_: int) -> None:
    addr = KERNEL_VA + 0x40
    assert m.one(b"Z%d,%x,4" % (type_, addr)) == b"OK"
    assert m.one(b"z%d,%x,4" % (type_, addr)) == b"OK"
    assert m.one(b"z%d,%x,4" % (type_, addr)) == b"OK"  # idempotent
    assert [c[0] for c in m.fake.bp_calls] == ["insert"]
    m.resume(b"c", DriverStop(cpu=1, signal=2))
    assert [c[0] for c in m.fake.bp_calls] == ["insert", "remove"]
    assert m.fake.installed == set()


def test_z_then_same_Z_costs_no_hypervisor_call(m: Machine) -> None:
    packets = [b"Z0,%x,1" % (KERNEL_VA + i) for i in range(3)]
    for p in packets:
        m.send(p)
    assert len(m.fake.bp_calls) == 3
    for _ in range(3):  # GDB at every stop: remove all, then insert all before resuming
        for p in packets:
            assert m.one(b"z" + p[1:]) == b"OK"
        for p in packets:
            assert m.one(p) == b"OK"
        m.resume(b"c", DriverStop(cpu=1, signal=2))
    assert len(m.fake.bp_calls) == 3
    assert m.fake.installed == {bp_key(SW, KERNEL_VA + i, 1) for i in range(3)}


def test_z_of_an_unknown_breakpoint(m: Machine) -> None:
    assert m.one(b"z0,%x,1" % KERNEL_VA) == b"OK"
    m.resume(b"c", DriverStop(cpu=1, signal=2))
    assert m.fake.bp_calls == [] and not m.fake.violations


def test_kvm_fifth_slot_is_refused() -> None:
    """Hardware breakpoints and watchpoints have only the four debug registers."""
    mach = machine(kvm=True)
    for i, t in enumerate((1, 1, 0, 2)):
        assert mach.one(b"Z%d,%x,1" % (t, KERNEL_VA + 8 * i)) == b"OK"
    for t in (1, 2, 3, 4):
        reply = mach.one(b"Z%d,%x,1" % (t, KERNEL_VA + 0x100))
        assert ERROR.fullmatch(reply) and reply == b"E1c"
    assert len(mach.fake.bp_calls) == 4
    assert mach.one(b"Z1,%x,1" % KERNEL_VA) == b"OK"  # one already held is fine


def test_kvm_fifth_software_breakpoint_obeys_the_stealth_policy() -> None:
    """default: a visible 0xCC patch, with a warning at the next stop; strict: refused, saying why."""
    for strict in (False, True):
        fake = FakeDriver(2, kvm=True)
        dbg = Debugger(fake, StealthMode.STRICT if strict else StealthMode.DEFAULT)
        dbg.resume({cpu: "c" for cpu in dbg.cpus()})
        dbg.halt()
        session = Session(dbg)
        for i in range(4):
            assert session.handle(b"Z0,%x,1" % (KERNEL_VA + 8 * i)).replies == [b"OK"]
        reply = session.handle(b"Z0,%x,1" % (KERNEL_VA + 0x100)).replies[0]
        if strict:
            assert reply.startswith(b"E.") and b"refused by --stealth strict" in reply
            assert not fake.patched
        else:
            assert reply == b"OK" and fake.patched
            dbg.resume({1: "c", 2: "c"})
            dbg.interrupt()
            event = dbg.poll()
            assert event is not None and "0xCC written into guest RAM" in (event.message or "")
            replies = session.stop_replies(event)
            assert replies[0].startswith(b"O") and replies[-1].startswith(b"T02")
        text = b"".join(
            codec.decode_hex(r[1:])
            for r in session.handle(b"qRcmd," + codec.encode_hex(b"stealth")).replies[:-1]
        ).decode()
        assert f"stealth: {'strict' if strict else 'default'}" in text
        assert "VISIBLE to the guest" in text and "invisible" in text


def test_kvm_single_step_is_refused_in_strict_mode() -> None:
    fake = FakeDriver(1, kvm=True)
    dbg = Debugger(fake, StealthMode.STRICT)
    dbg.resume({1: "c"})
    dbg.halt()
    with pytest.raises(StealthRefused, match="TF"):
        dbg.resume({1: "s"})
    assert not dbg.running


def test_unsupported_breakpoint_type_is_refused_with_the_reason() -> None:
    """Not the empty reply: for Z0 GDB would fall back to writing 0xCC into guest memory."""
    import dataclasses

    from vmigdb.hv.qemu.driver import tcg_capabilities

    fake = FakeDriver(1, ram_size=4 << 20)
    fake.capabilities = dataclasses.replace(tcg_capabilities("icount"), watchpoint=None)
    dbg = Debugger(fake)
    session = Session(dbg)
    assert session.handle(b"Z2,1000,4").replies == [
        b"E.vmigdb: the fake driver cannot set watchpoints"
    ]
    assert session.handle(b"Z0,1000,1").replies == [b"OK"]


def test_driver_refusal_is_eio(m: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise DriverError("refused")

    monkeypatch.setattr(m.fake, "insert_breakpoint", refuse)
    assert m.one(b"Z0,%x,1" % KERNEL_VA) == b"E05"
    monkeypatch.setattr(m.fake, "write_physical", refuse)
    assert m.one(b"M%x,1:00" % KERNEL_VA) == b"E05"


# -- stop replies ---------------------------------------------------------------------------------


def _expedited(m: Machine, fields: dict[str, bytes], cpu: int) -> None:
    regs = m.fake.regs[cpu]
    numbered = {int(k, 16): v for k, v in fields.items() if re.fullmatch(r"[0-9a-f]+", k)}
    assert set(numbered) == {6, 7, 0x10}  # rbp, rsp, rip
    for regnum, value in numbered.items():
        assert value == codec.encode_hex(regs.raw(regnum))


def test_stop_at_a_software_breakpoint(m: Machine) -> None:
    rip = m.fake.reg(2, "rip")
    assert m.one(b"Z0,%x,1" % rip) == b"OK"
    event = m.resume(b"vCont;c", DriverStop(cpu=2, signal=5))
    assert event.reason is StopReason.SW_BREAK and event.cpu == 2
    reply = m.session.stop_reply(event)
    assert reply.startswith(b"T05thread:2;")
    assert reply.endswith(b"swbreak:;")
    sig, fields = parse_stop_reply(reply)
    assert sig == 5 and fields["thread"] == b"2" and "hwbreak" not in fields
    _expedited(m, fields, 2)
    assert m.one(b"?") == reply
    assert m.one(b"p10") == le(rip)  # registers now default to the stopping vCPU


def test_stop_at_a_hardware_breakpoint(m: Machine) -> None:
    rip = m.fake.reg(1, "rip")
    m.send(b"Z1,%x,1" % rip)
    reply = m.session.stop_reply(m.resume(b"c", DriverStop(cpu=1, signal=5)))
    sig, fields = parse_stop_reply(reply)
    assert sig == 5 and fields["hwbreak"] == b"" and "swbreak" not in fields
    _expedited(m, fields, 1)


def test_stop_with_sw_and_hw_at_the_same_address_says_swbreak(m: Machine) -> None:
    rip = m.fake.reg(1, "rip")
    m.send(b"Z1,%x,1" % rip)
    m.send(b"Z0,%x,1" % rip)
    reply = m.session.stop_reply(m.resume(b"c", DriverStop(cpu=1, signal=5)))
    assert reply.endswith(b"swbreak:;")


def test_stop_after_the_breakpoint_was_removed_is_a_plain_trap(m: Machine) -> None:
    rip = m.fake.reg(1, "rip")
    m.send(b"Z0,%x,1" % rip)
    m.send(b"z0,%x,1" % rip)
    event = m.resume(b"c", DriverStop(cpu=1, signal=5))
    assert event.reason is StopReason.SIGNAL
    _, fields = parse_stop_reply(m.session.stop_reply(event))
    assert "swbreak" not in fields and "hwbreak" not in fields


@pytest.mark.parametrize(("type_", "key"), [(WW, "watch"), (RW, "rwatch"), (AW, "awatch")])
def test_stop_at_a_watchpoint(m: Machine, type_: BreakpointType, key: str) -> None:
    addr = HUGE_VA + 0x88
    assert m.one(b"Z%d,%x,8" % (type_, addr)) == b"OK"
    event = m.resume(b"c", DriverStop(cpu=2, signal=5, watch=(type_, addr)))
    assert event.reason is StopReason.WATCH
    reply = m.session.stop_reply(event)
    sig, fields = parse_stop_reply(reply)
    assert sig == 5 and fields["thread"] == b"2"
    assert fields[key] == b"%x" % addr
    assert reply.endswith(b"%s:%x;" % (key.encode(), addr))
    _expedited(m, fields, 2)


def test_interrupt(m: Machine) -> None:
    outcome = m.handle(b"vCont;c")
    assert isinstance(outcome.action, Resume)
    m.dbg.resume(outcome.action.actions)
    assert m.dbg.poll() is None  # running
    m.dbg.interrupt()  # 0x03 from GDB
    event = m.dbg.poll()
    assert event is not None and event.reason is StopReason.INTERRUPT
    reply = m.session.stop_reply(event)
    assert reply.startswith(b"T02thread:1;")
    assert b"swbreak" not in reply


def test_interrupt_while_stopped_does_nothing(m: Machine) -> None:
    m.dbg.interrupt()
    assert m.fake.interrupts == 1  # only the halt at attach


def test_step_is_a_plain_trap_even_on_a_breakpoint(m: Machine) -> None:
    rip = m.fake.reg(1, "rip")
    m.send(b"Z0,%x,1" % (rip + 3))  # where the step lands
    m.send(b"Z1,%x,1" % (rip + 3))
    event = m.resume(b"vCont;s:1", DriverStop(cpu=1, signal=5))
    assert event.reason is StopReason.STEP
    assert m.fake.reg(1, "rip") == rip + 3
    reply = m.session.stop_reply(event)
    sig, fields = parse_stop_reply(reply)
    assert sig == 5 and fields["thread"] == b"1"
    assert "swbreak" not in fields and "hwbreak" not in fields
    assert fields["10"] == le(rip + 3)


def test_step_only_moves_the_stepped_cpu(m: Machine) -> None:
    rips = {cpu: m.fake.reg(cpu, "rip") for cpu in (1, 2)}
    m.resume(b"vCont;s:2", DriverStop(cpu=2, signal=5))
    assert m.fake.resumes[-1] == {2: "s"}
    assert m.fake.reg(2, "rip") == rips[2] + 3 and m.fake.reg(1, "rip") == rips[1]


def test_continuing_cpu_hits_a_breakpoint_while_another_steps(m: Machine) -> None:
    rip2 = m.fake.reg(2, "rip")
    m.send(b"Z0,%x,1" % rip2)
    event = m.resume(b"vCont;s:1;c", DriverStop(cpu=2, signal=5))
    assert event.reason is StopReason.SW_BREAK and event.cpu == 2


@pytest.mark.parametrize(("code", "reply"), [(0, b"W00"), (3, b"W03"), (0x1FF, b"Wff")])
def test_exit(m: Machine, code: int, reply: bytes) -> None:
    event = m.resume(b"c", DriverStop(cpu=None, signal=0, exited=code))
    assert event.reason is StopReason.EXITED
    assert m.session.stop_reply(event) == reply
    assert m.one(b"?") == reply


def test_stop_from_an_unknown_cpu_is_reported_on_the_first(m: Machine) -> None:
    event = m.resume(b"c", DriverStop(cpu=7, signal=5))
    assert event.cpu == 1


# -- the lost-step quirk --------------------------------------------------------------------------


def _lost_step_setup(m: Machine, code: bytes, *, change: str = "Z", rip: int | None = None) -> int:
    if rip is not None:
        m.send(b"P10=" + le(rip))
    rip = m.fake.reg(1, "rip")
    m.fake.poke_virtual(rip, code)
    if change == "Z":
        m.send(b"Z0,%x,1" % (KERNEL_VA + 0x3000))
    elif change == "z":
        m.send(b"Z0,%x,1" % (KERNEL_VA + 0x3000))
        m.resume(b"c", DriverStop(cpu=1, signal=2))  # the insertion is behind us now
        m.send(b"z0,%x,1" % (KERNEL_VA + 0x3000))  # removal reaches the hypervisor at resume
    elif change == "z+Z":
        m.send(b"Z0,%x,1" % (KERNEL_VA + 0x3000))
        m.resume(b"c", DriverStop(cpu=1, signal=2))
        m.send(b"z0,%x,1" % (KERNEL_VA + 0x3000))
        m.send(b"Z0,%x,1" % (KERNEL_VA + 0x3000))  # costs nothing: no change
    m.fake.resumes.clear()
    m.fake.lost_steps = 1  # QEMU reports the first step without moving the vCPU
    return rip


@pytest.mark.parametrize("change", ["Z", "z", "none", "z+Z"])
def test_lost_step_is_stepped_again(m: Machine, change: str) -> None:
    rip = _lost_step_setup(m, bytes.fromhex("4889c3"), change=change)  # mov rbx, rax
    m.fake.queue_stop(DriverStop(cpu=1, signal=5), DriverStop(cpu=1, signal=5))
    outcome = m.handle(b"vCont;s:1")
    m.dbg.resume(outcome.action.actions)
    assert m.dbg.poll() is None  # the engine stepped again by itself
    assert m.fake.resumes == [{1: "s"}, {1: "s"}]
    event = m.dbg.poll()
    assert event is not None and event.reason is StopReason.STEP
    assert m.fake.reg(1, "rip") == rip + 3
    _, fields = parse_stop_reply(m.session.stop_reply(event))
    assert fields["10"] == le(rip + 3)


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("f3a4", id="rep movsb"),
        pytest.param("f4", id="hlt"),
        pytest.param("0f01c9", id="mwait"),
        pytest.param("ffe0", id="jmp rax"),
        pytest.param(
            "ebfe",
            id="jmp . (kernel half)",
        ),
    ],
)
def test_lost_step_on_an_instruction_that_may_stay_put(m: Machine, code: str) -> None:
    rip = _lost_step_setup(m, bytes.fromhex(code))
    m.fake.queue_stop(DriverStop(cpu=1, signal=5), DriverStop(cpu=1, signal=5))
    event = m.resume(b"vCont;s:1")
    assert m.fake.resumes == [{1: "s"}]
    assert event.reason is StopReason.STEP and m.fake.reg(1, "rip") == rip


def test_lost_step_jmp_to_self_in_the_lower_half(m: Machine) -> None:
    rip = _lost_step_setup(m, bytes.fromhex("ebfe"), rip=USER_VA + 0x10)
    m.fake.queue_stop(DriverStop(cpu=1, signal=5), DriverStop(cpu=1, signal=5))
    event = m.resume(b"vCont;s:1")
    assert m.fake.resumes == [{1: "s"}]
    assert event.reason is StopReason.STEP and m.fake.reg(1, "rip") == rip


def test_lost_step_on_unreadable_code_is_reported(m: Machine) -> None:
    m.send(b"P10=" + le(UNMAPPED_VA))
    _lost_step_setup(m, b"")
    m.fake.queue_stop(DriverStop(cpu=1, signal=5))
    event = m.resume(b"vCont;s:1")
    assert m.fake.resumes == [{1: "s"}] and event.reason is StopReason.STEP


def test_lost_step_retries_are_bounded(m: Machine) -> None:
    rip = _lost_step_setup(m, bytes.fromhex("4889c3"))
    m.fake.lost_steps = 100
    m.fake.queue_stop(*[DriverStop(cpu=1, signal=5)] * 10)
    event = m.resume(b"vCont;s:1")
    assert len(m.fake.resumes) == 4  # the step and three more
    assert event.reason is StopReason.STEP and m.fake.reg(1, "rip") == rip


# -- engine edge cases ----------------------------------------------------------------------------


def test_resume_while_running_is_refused(m: Machine) -> None:
    m.dbg.resume({1: "c"})
    with pytest.raises(DriverError):
        m.dbg.resume({1: "c"})
    assert m.fake.resumes[-1] == {1: "c"} and not m.fake.violations


def test_halt_of_a_stopped_machine_returns_the_last_stop(m: Machine) -> None:
    last = m.dbg.last_stop
    assert m.dbg.halt() is last
    assert m.fake.interrupts == 1


def test_failed_resume_leaves_the_machine_stopped(m: Machine) -> None:
    m.fake.fail_resume = 1
    with pytest.raises(DriverError):
        m.dbg.resume({1: "c", 2: "c"})
    assert not m.dbg.running
    event = m.resume(b"c", DriverStop(cpu=1, signal=2))  # GDB tries again after the E05
    assert event.reason is StopReason.INTERRUPT


def test_stop_fd_from_a_pipe() -> None:
    import select

    fake = FakeDriver(1, ram_size=4 << 20, pipe=True)
    try:
        dbg = Debugger(fake)
        fd = fake.stop_fileno()
        assert fd >= 0
        dbg.resume({1: "c"})
        assert select.select([fd], [], [], 0)[0] == []
        dbg.interrupt()
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert dbg.poll() is not None
        assert select.select([fd], [], [], 0)[0] == []
    finally:
        fake.close()
    assert FakeDriver(1, ram_size=4 << 20).stop_fileno() == -1


# -- known bugs -----------------------------------------------------------------------------------


def test_qcrc_is_not_mistaken_for_qc(m: Machine) -> None:
    reply = m.one(b"qCRC:%x,10" % KERNEL_VA)
    assert reply == b"" or ERROR.fullmatch(reply) or re.fullmatch(rb"C[0-9a-f]+", reply)


@pytest.mark.parametrize(
    ("phys", "payload"),
    [
        (False, b"Z0,-1000,1"),
        (False, b"Z1,-1,1"),
        (False, b"P-1=0000000000000000"),
        (True, b"M-10,1:00"),
        (True, b"m-10,4"),
    ],
)
def test_negative_numbers_never_reach_the_driver(m: Machine, phys: bool, payload: bytes) -> None:
    m.dbg.physical_addresses = phys
    m.fake.calls.clear()
    assert m.send(payload) == [b"E16"]
    assert m.fake.violations == []
    assert m.fake.calls == []


def test_qemu_72_crashers_are_refused(m: Machine) -> None:
    """Packets that crash QEMU 7.2's gdbstub: parsed here, never forwarded, E16."""
    for payload in (b"D6-c699;b70;7,8", b"z0e3f3a99c", b"c3c3588d8"):
        decoder = codec.Decoder()
        decoder.feed(codec.encode_packet(payload))
        (event,) = decoder.events()
        assert isinstance(event, codec.Packet) and event.data == payload
        m.fake.calls.clear()
        outcome = m.handle(event.data)
        assert outcome.replies == [b"E16"] and outcome.action is None
        assert m.fake.calls == []


def test_tcg_strict_allows_everything_it_declares_invisible() -> None:
    fake = FakeDriver(1)
    dbg = Debugger(fake, StealthMode.STRICT)
    dbg.resume({1: "c"})
    dbg.halt()
    session = Session(dbg)
    for i in range(50):
        assert session.handle(b"Z0,%x,1" % (KERNEL_VA + i)).replies == [b"OK"]
    assert session.handle(b"Z2,%x,8" % KERNEL_VA).replies == [b"OK"]
    fake.queue_stop(DriverStop(cpu=1, signal=5))
    dbg.resume({1: "s"})
    event = dbg.poll()
    assert event is not None and event.message is None  # nothing visible, nothing to warn about
