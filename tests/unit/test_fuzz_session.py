"""Property-based fuzzing of the RSP session over the FakeDriver machine.

Every generated packet goes to `Session.handle` (some through `codec.Decoder` first, exactly as the
server feeds it); the actions it returns are carried out the way the server does. Properties:

- `handle` never raises; every reply is bytes: empty, OK, `E` + 2 hex digits, or a data reply of
  the shape its packet calls for, with no raw `$`, `#` or `*` in it;
- no packet makes vmigdb log an internal error (a bug answered `Eff`, wherever it is caught), and
  no reply is `Eff`: a bug is never passed off as a malformed packet;
- only resume, detach and kill packets produce an action;
- guest RAM only changes through the driver, only for an `M`/`X` packet, and only with that
  packet's data (all of it when the reply is OK; GDB allows a partial write with an error reply);
- every breakpoint the hypervisor holds was inserted by a `Z` the session answered OK, and once
  the guest has run the hypervisor holds exactly what GDB asked for;
- the driver contract holds (no negative address, unknown vCPU, double insert...).

Deterministic (derandomize=True, no example database), at least 10,000 packets in total.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.unit.fakes import (
    HUGE_PA,
    HUGE_SIZE,
    HUGE_VA,
    KERNEL_PA,
    KERNEL_VA,
    OUTSIDE_RAM_VA,
    UNMAPPED_VA,
    USER_VA,
    FakeDriver,
    initial_ram,
)
from vmigdb.arch.x86_64.registers import G_PACKET_SIZE, REGISTERS
from vmigdb.debugger.engine import Debugger, RangeStep
from vmigdb.debugger.events import StopReason
from vmigdb.errors import INTERNAL_ERROR
from vmigdb.hv.base import DriverStop
from vmigdb.rsp.errors import INTERNAL
from vmigdb.rsp.session import MAX_MEMORY_READ, Detach, Kill, Outcome, Resume, Session
from vmigdb.wire import codec

FUZZ_RAM = 4 << 20
CPUS = 3
QEMU_72_CRASHERS = (b"D6-c699;b70;7,8", b"z0e3f3a99c", b"c3c3588d8")

ERROR = re.compile(rb"E[0-9a-fA-F]{2}|E\.refused: [^$#]+")  # `E.text`: a refusal GDB prints
HEX = re.compile(rb"(?:[0-9a-f]{2})*")
STOP = re.compile(rb"T[0-9a-f]{2}thread:[0-9a-f]+;(?:[0-9a-f]+:[0-9a-f]+;)*(?:[a-z]+:[0-9a-f]*;)?")
REG_SIZES = {r.bitsize // 8 for r in REGISTERS}

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

PACKETS: Counter[str] = Counter()  # packets handled, per test
MINIMUM = {  # packets each fuzz test must have handled
    "random_bytes": 2000,
    "random_printable": 1500,
    "verbs_with_junk": 3000,
    "conversations": 3000,
    "streams": 1000,
}


# -- the harness ----------------------------------------------------------------------------------

# (prefix, kind) in the order Session tries its handlers: the kind decides the reply's shape.
_KINDS = [
    (b"qSupported", "qSupported"),
    (b"QStartNoAckMode", "ok"),
    (b"qXfer:features:read:", "qXfer"),
    (b"qXfer:threads:read::", "qXfer"),
    (b"qXfer:exec-file:read:", "qXfer"),
    (b"qXfer:libraries-svr4:read:", "qXfer"),
    (b"QCatchSyscalls:", "ok"),
    (b"vFile:", "vFile"),
    (b"qfThreadInfo", "qfThreadInfo"),
    (b"qsThreadInfo", "qsThreadInfo"),
    (b"qThreadExtraInfo,", "hex"),
    (b"qC", "qC"),
    (b"qAttached", "qAttached"),
    (b"qSymbol:", "ok"),
    (b"qRcmd,", "qRcmd"),
    (b"vCont?", "vCont?"),
    (b"vCont;", "resume"),
    (b"vKill", "kill"),
    (b"vMustReplyEmpty", "empty"),
    (b"qqemu.", "qemu"),
    (b"qMemoryRegionInfo:", "region"),
    (b"Qqemu.", "qemu"),
    (b"?", "stop"),
    (b"g", "g"),
    (b"G", "ok"),
    (b"p", "p"),
    (b"P", "ok"),
    (b"m", "m"),
    (b"M", "write"),
    (b"X", "write"),
    (b"Z", "ok"),
    (b"z", "ok"),
    (b"H", "ok"),
    (b"T", "ok"),
    (b"c", "resume"),
    (b"C", "resume"),
    (b"s", "resume"),
    (b"S", "resume"),
    (b"D", "detach"),
    (b"k", "kill"),
]


def kind_of(payload: bytes) -> str:
    for prefix, kind in _KINDS:
        if payload.startswith(prefix):
            return kind
    return "unknown"


def check_data_reply(kind: str, reply: bytes) -> None:
    """A reply that is not empty, OK or an error must have the shape its packet calls for."""
    if kind == "m":
        assert HEX.fullmatch(reply) and 0 < len(reply) <= 2 * MAX_MEMORY_READ
    elif kind == "g":
        assert HEX.fullmatch(reply) and len(reply) == 2 * G_PACKET_SIZE
    elif kind == "p":
        assert HEX.fullmatch(reply) and len(reply) // 2 in REG_SIZES
    elif kind == "hex":
        assert HEX.fullmatch(reply)
    elif kind == "qXfer":
        assert reply[:1] in (b"m", b"l")
    elif kind == "vFile":
        assert re.fullmatch(rb"F(?:-1,[0-9a-f]+|[0-9a-f]+(?:;.*)?)", reply, re.DOTALL), reply
    elif kind == "qfThreadInfo":
        assert reply == b"m" + b",".join(b"%x" % c for c in range(1, CPUS + 1))
    elif kind == "qsThreadInfo":
        assert reply == b"l"
    elif kind == "qC":
        assert re.fullmatch(rb"QC[1-9a-f][0-9a-f]*", reply)
    elif kind == "qAttached":
        assert reply == b"1"
    elif kind == "qSupported":
        assert reply.startswith(b"PacketSize=")
    elif kind == "region":  # LLDB's memory region query (vmigdb.rsp.procfs.region_info)
        assert re.fullmatch(rb"start:[0-9a-f]+;size:[0-9a-f]+;(permissions:rw?x?;)?", reply), reply
    elif kind == "qemu":  # QEMU's own packets, answered as QEMU does (vmigdb.rsp.qemu_packets)
        assert reply in (b"ENABLE=1,NOIRQ=2,NOTIMER=4", b"0x7", b"0", b"1") or reply[:2] == b"E."
    elif kind == "vCont?":
        assert reply == b"vCont;c;C;s;S;t;r"
    elif kind == "stop":
        assert STOP.fullmatch(reply) or reply == b"S05" or re.fullmatch(rb"W[0-9a-f]{2}", reply)
    else:
        raise AssertionError(f"{kind} packets have no data reply: {reply[:80]!r}")


def packet_data(payload: bytes) -> bytes | None:
    """The data an M or X packet carries, or None if it does not decode."""
    _, sep, body = payload.partition(b":")
    if not sep:
        return None
    try:
        return codec.decode_hex(body) if payload[:1] == b"M" else codec.unescape_binary(body)
    except ValueError:
        return None


class InternalErrors(logging.Handler):
    """Collects every internal error vmigdb logs (any logger under "vmigdb") while installed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("vmigdb")

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(INTERNAL_ERROR):
            self.records.append(record)

    def __enter__(self) -> InternalErrors:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)

    def check(self, payload: bytes) -> None:
        if self.records:
            record = self.records[0]
            trace = self.format(record) if record.exc_info else record.getMessage()
            raise AssertionError(f"{payload[:80]!r} made vmigdb log:\n{trace}")


class Harness:
    """One machine (3 vCPUs), one session; `send` checks every property after each packet."""

    def __init__(self, test: str, *, kvm: bool = False) -> None:
        self.test = test
        self.bugs = InternalErrors()
        self.fake = FakeDriver(CPUS, kvm=kvm, ram_size=FUZZ_RAM)
        self.dbg = Debugger(self.fake)
        self.dbg.resume({cpu: "c" for cpu in self.dbg.cpus()})
        self.dbg.halt()
        self.session = Session(self.dbg)
        self.ok_inserted: set[tuple[int, int, int]] = set()
        self.done = False  # detached or killed: the conversation is over

    def send(self, payload: bytes) -> Outcome | None:
        if self.done:
            return None
        PACKETS[self.test] += 1
        fake = self.fake
        writes, bp_calls = len(fake.writes), len(fake.bp_calls)
        violations = len(fake.violations)

        with self.bugs:
            outcome = self.session.handle(payload)  # must not raise
        self.bugs.check(payload)

        kind = kind_of(payload)
        assert isinstance(outcome, Outcome)
        assert isinstance(outcome.replies, list)
        for reply in outcome.replies:
            assert type(reply) is bytes
            assert not set(reply) & set(b"$#*"), reply[:80]
            assert reply != INTERNAL, payload
        replies = outcome.replies
        action = outcome.action
        # Actions only for resume, detach and kill packets.
        if action is not None:
            assert kind in ("resume", "detach", "kill"), (payload, action)
        if isinstance(action, Resume):
            assert replies == []
            assert action.actions and set(action.actions) <= set(self.dbg.cpus())
            assert all(a in ("c", "s") or isinstance(a, RangeStep) for a in action.actions.values())
        elif isinstance(action, Detach | Kill):
            assert replies == [b"OK"]
            assert isinstance(action, Detach) == (kind == "detach")
        else:
            assert action is None
            if kind == "qRcmd" and len(replies) > 1:
                assert all(re.fullmatch(rb"O(?:[0-9a-f]{2})+", r) for r in replies[:-1])
                assert replies[-1] in (b"OK", b"E01")
            else:
                assert len(replies) == 1, (payload, replies)
                (reply,) = replies
                if kind == "unknown":
                    assert reply == b""
                elif reply not in (b"", b"OK") and not ERROR.fullmatch(reply):
                    check_data_reply(kind, reply)
                if kind in ("resume", "detach", "kill"):
                    assert ERROR.fullmatch(reply), (payload, reply)

        ok = replies == [b"OK"]
        # Guest RAM: only M/X write it, with their own data.
        new_writes = fake.writes[writes:]
        if new_writes:
            assert kind == "write", (payload, new_writes)
            data = packet_data(payload)
            assert data is not None
            assert ok or (len(replies) == 1 and ERROR.fullmatch(replies[0])), replies
            for _, chunk in new_writes:
                assert chunk in data
            if ok:
                assert b"".join(chunk for _, chunk in new_writes) == data
        # Breakpoints: the hypervisor holds only what a Z answered OK inserted.
        for call, type_, addr, length in fake.bp_calls[bp_calls:]:
            if call == "insert" and ok and payload[:1] == b"Z":
                self.ok_inserted.add((int(type_), addr, length))
        assert fake.installed <= self.ok_inserted, (payload, fake.installed - self.ok_inserted)
        # The driver contract.
        assert fake.violations[violations:] == [], payload

        if isinstance(action, Resume):
            with self.bugs:
                refused = self.session.run(action)  # as the server carries out a Resume
            self.bugs.check(payload)
            assert refused == [], (payload, refused)
            with self.bugs:
                self._stop(action.actions)
            self.bugs.check(payload)
        elif isinstance(action, Detach):
            self.dbg.detach()
            assert fake.installed == set() and fake.running
            self.done = True
        elif isinstance(action, Kill):
            self.done = True
        return outcome

    def _stop(self, actions: dict[int, object]) -> None:
        """The machine runs as `actions` asked: end the step, or interrupt it as GDB would."""
        stepping = [cpu for cpu, act in sorted(actions.items()) if act != "c"]  # s or a range
        if stepping:
            self.fake.queue_stop(DriverStop(cpu=stepping[0], signal=5))
        wanted = set(self.dbg.breakpoints.desired) | set(self.dbg.breakpoints.internal)
        assert self.fake.installed == wanted  # stale ones are gone
        if not stepping:
            assert self.dbg.poll() is None  # running until GDB interrupts
            self.dbg.interrupt()
        event = self.dbg.poll()
        assert event is not None
        if stepping:
            assert event.reason is StopReason.STEP and event.cpu == stepping[0]
        else:
            assert event.reason is StopReason.INTERRUPT
        reply = self.session.stop_reply(event)
        assert STOP.fullmatch(reply), reply

    def finish(self) -> None:
        """RAM holds exactly the initial image plus the writes the driver was asked for."""
        expected = bytearray(initial_ram(FUZZ_RAM))
        for pa, data in self.fake.writes:
            expected[pa : pa + len(data)] = data
        assert self.fake.ram == expected
        assert self.fake.violations == []


def run_packets(test: str, payloads: list[bytes], *, kvm: bool = False) -> Harness:
    harness = Harness(test, kvm=kvm)
    for payload in payloads:
        harness.send(payload)
    harness.finish()
    return harness


def run_stream(test: str, stream: bytes, cuts: list[int], *, kvm: bool = False) -> Harness:
    """Feed `stream` in pieces through a Decoder, as the server does, handling every packet."""
    harness = Harness(test, kvm=kvm)
    decoder = codec.Decoder()
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in zip(points, points[1:], strict=False):
        decoder.feed(stream[start:end])
        for event in decoder.events():
            if isinstance(event, codec.Packet):
                harness.send(event.data)
    harness.finish()
    return harness


def at_least(test: str, body: Callable[[], None]) -> None:
    PACKETS[test] = 0
    body()
    assert PACKETS[test] >= MINIMUM[test], PACKETS


# -- strategies -----------------------------------------------------------------------------------

ADDRESSES = [
    KERNEL_VA,
    KERNEL_VA + 0xFF8,
    KERNEL_VA + 0x2FFE,
    UNMAPPED_VA - 4,
    UNMAPPED_VA,
    OUTSIDE_RAM_VA,
    HUGE_VA,
    HUGE_VA + HUGE_SIZE - 3,
    USER_VA,
    USER_VA + 0xFFE,
    0,
    KERNEL_PA,
    HUGE_PA,
    FUZZ_RAM - 2,
    0x0000_8000_0000_0000,
    0xFFFF_8000_0000_0000,
    (1 << 63) - 1,
    (1 << 64) - 1,
    (1 << 64) - 0x10,
]

addresses = st.one_of(
    st.sampled_from(ADDRESSES),
    st.sampled_from(ADDRESSES),
    st.builds(lambda a, d: (a + d) % (1 << 64), st.sampled_from(ADDRESSES), st.integers(-64, 64)),
    st.integers(0, (1 << 64) - 1),
)
mapped = st.one_of(
    st.integers(KERNEL_VA, UNMAPPED_VA - 1),
    st.integers(HUGE_VA, HUGE_VA + HUGE_SIZE - 1),
    st.integers(USER_VA, USER_VA + 0xFFF),
)
memory_addresses = st.one_of(mapped, addresses)
lengths = st.one_of(
    st.integers(0, 0x40), st.integers(0, 0x2000), st.sampled_from([0xFFFF, 1 << 63])
)
hex_numbers = st.one_of(
    addresses.map(lambda n: b"%x" % n),
    st.integers(0, 0x100).map(lambda n: b"%x" % n),
    st.integers(1 << 64, 1 << 80).map(lambda n: b"%x" % n),  # overflowing, 17+ digits
    st.integers(1, 1 << 64).map(lambda n: b"-%x" % n),  # negative
    st.integers(0, 0xFFFF).map(lambda n: b"%X" % n),  # upper case
    st.integers(0, 1 << 64).map(lambda n: b"0" * 20 + b"%x" % n),  # leading zeroes
    st.sampled_from([b"", b"0x10", b"+1", b" 1", b"1_0", b"-0", b"-1", b"ffffffffffffffff"]),
)
separators = st.sampled_from([b",", b":", b";", b"=", b".", b"p", b"p1.", b"-1", b"}", b"*"])
junk = st.one_of(
    st.binary(max_size=12),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(
        str.encode
    ),
)
arguments = st.lists(st.one_of(hex_numbers, separators, junk), max_size=7).map(b"".join)

VERBS = [
    b"m", b"M", b"X", b"g", b"G", b"p", b"P", b"Z0,", b"Z1,", b"Z2,", b"Z3,", b"Z4,", b"Z",
    b"z0,", b"z1,", b"z2,", b"z", b"Hg", b"Hc", b"H", b"T", b"vCont;", b"vCont;c:",
    b"vCont;s:", b"vCont?", b"vCont", b"qRcmd,", b"qXfer:features:read:target.xml:",
    b"qXfer:features:read:", b"qXfer:threads:read::", b"qXfer:", b"qSupported",
    b"qSupported:", b"qThreadExtraInfo,", b"qC", b"qCRC:", b"qfThreadInfo", b"qsThreadInfo",
    b"qAttached", b"qSymbol:", b"QStartNoAckMode", b"vMustReplyEmpty", b"vKill;", b"c", b"s",
    b"C", b"S", b"D", b"D;", b"k", b"?", b"q", b"Q", b"v", b"qXfer:exec-file:read:",
    b"vFile:open:", b"vFile:pread:", b"vFile:fstat:", b"vFile:close:", b"vFile:setfs:",
]  # fmt: skip
verb_packets = st.builds(lambda v, a: v + a, st.sampled_from(VERBS), arguments)

printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def _hexdata(data: bytes) -> bytes:
    return codec.encode_hex(data)


data_blobs = st.binary(max_size=0x30)
regnums = st.one_of(st.integers(0, len(REGISTERS) - 1), st.integers(0, 0x50))
thread_ids = st.sampled_from([b"-1", b"0", b"1", b"2", b"3", b"4", b"p1.1", b"p1.2", b"p1.-1"])
monitor_lines = st.one_of(
    st.sampled_from(
        [
            "help",
            "",
            "info",
            "stealth",
            "regs",
            "phys",
            "phys on",
            "phys off",
            "phys maybe",
            "vtop",
            f"vtop {KERNEL_VA:#x}",
            f"vtop {UNMAPPED_VA}",
            "vtop -1",
            "vtop 0x1" + "0" * 20,
            "vtop zz",
            "nonsense",
            "info extra words",
        ]
    ),  # fmt: skip
    printable,
)
vcont_items = st.builds(
    lambda verb, tid: verb + (b":" + tid if tid else b""),
    st.sampled_from([b"c", b"s", b"t", b"C05", b"S0b", b"C", b"x", b"r1,2"]),
    st.one_of(st.none(), thread_ids),
)


def _m(addr: int, length: int) -> bytes:
    return b"m%x,%x" % (addr, length)


def _M(addr: int, data: bytes, bad_len: int | None) -> bytes:
    return b"M%x,%x:" % (addr, len(data) if bad_len is None else bad_len) + _hexdata(data)


def _X(addr: int, data: bytes, bad_len: int | None) -> bytes:
    length = len(data) if bad_len is None else bad_len
    return b"X%x,%x:" % (addr, length) + codec.escape_binary(data)


def _reg_write(regnum: int, value: bytes) -> bytes:
    return b"P%x=" % regnum + _hexdata(value)


def _sized_value(regnum: int, data: st.DrawFn) -> bytes:
    size = REGISTERS[regnum].bitsize // 8 if regnum < len(REGISTERS) else 8
    return data(st.binary(min_size=size, max_size=size))


@st.composite
def register_writes(draw: st.DrawFn) -> bytes:
    regnum = draw(regnums)
    if draw(st.booleans()):
        value = _sized_value(regnum, draw)
    else:
        value = draw(st.binary(max_size=17))
    return _reg_write(regnum, value)


@st.composite
def g_writes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return b"G" + _hexdata(draw(st.binary(min_size=G_PACKET_SIZE, max_size=G_PACKET_SIZE)))
    return b"G" + _hexdata(draw(st.binary(max_size=G_PACKET_SIZE + 2)))


wellformed = st.one_of(
    st.builds(_m, memory_addresses, lengths),
    st.builds(_M, memory_addresses, data_blobs, st.one_of(st.none(), st.none(), lengths)),
    st.builds(_X, memory_addresses, data_blobs, st.one_of(st.none(), st.none(), lengths)),
    st.builds(
        lambda z, t, a, k: b"%s%d,%x,%x" % (z, t, a, k),
        st.sampled_from([b"Z", b"Z", b"z"]),
        st.integers(0, 5),
        addresses,
        st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(0, 20)),
    ),
    st.just(b"g"),
    g_writes(),
    st.builds(lambda r: b"p%x" % r, regnums),
    register_writes(),
    st.builds(lambda w, t: b"H" + w + t, st.sampled_from([b"g", b"c", b"x"]), thread_ids),
    st.builds(lambda t: b"T" + t, thread_ids),
    st.builds(lambda t: b"qThreadExtraInfo," + t, thread_ids),
    st.lists(vcont_items, min_size=1, max_size=4).map(lambda items: b"vCont;" + b";".join(items)),
    st.builds(lambda line: b"qRcmd," + _hexdata(line.encode()), monitor_lines),
    st.builds(
        lambda annex, off, n: b"qXfer:features:read:%s:%x,%x" % (annex, off, n),
        st.sampled_from([b"target.xml", b"target.xml", b"x.xml"]),
        st.integers(0, 0x3000),
        st.integers(0, 0x2000),
    ),
    st.builds(
        lambda off, n: b"qXfer:threads:read::%x,%x" % (off, n),
        st.integers(0, 0x200),
        st.integers(0, 0x200),
    ),
    st.sampled_from(
        [
            b"c",
            b"s",
            b"C05",
            b"S05",
            b"?",
            b"qC",
            b"qfThreadInfo",
            b"qsThreadInfo",
            b"qSupported",
            b"QStartNoAckMode",
            b"vMustReplyEmpty",
            b"vCont?",
            b"qAttached",
            b"D",
            b"k",
            b"vKill;1",
        ]
    ),  # fmt: skip
)

# Mostly well-formed, so the machine gets driven; sometimes broken, so error paths interleave.
conversations = st.lists(
    st.one_of(wellformed, wellformed, wellformed, verb_packets), min_size=1, max_size=12
)


# -- tests ----------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=600)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=8))
def _random_bytes(payloads: list[bytes]) -> None:
    run_packets("random_bytes", payloads)


def test_random_bytes() -> None:
    at_least("random_bytes", _random_bytes)


@settings(FUZZ, max_examples=500)
@given(st.lists(printable.map(str.encode), min_size=1, max_size=8))
def _random_printable(payloads: list[bytes]) -> None:
    run_packets("random_printable", payloads)


def test_random_printable() -> None:
    at_least("random_printable", _random_printable)


@settings(FUZZ, max_examples=900)
@given(st.lists(verb_packets, min_size=1, max_size=8), st.booleans())
@example([*QEMU_72_CRASHERS], False)
@example([b"Z0,-1000,1", b"m-1,4", b"P-1=0000000000000000", b"c"], False)
def _verbs_with_junk(payloads: list[bytes], kvm: bool) -> None:
    run_packets("verbs_with_junk", payloads, kvm=kvm)


def test_verbs_with_junk_arguments() -> None:
    at_least("verbs_with_junk", _verbs_with_junk)


@settings(FUZZ, max_examples=700)
@given(conversations, st.booleans())
def _conversations(payloads: list[bytes], kvm: bool) -> None:
    run_packets("conversations", payloads, kvm=kvm)


def test_conversations() -> None:
    at_least("conversations", _conversations)


stream_chunks = st.one_of(
    wellformed.map(codec.encode_packet),
    verb_packets.map(codec.encode_packet),
    st.sampled_from([b"+", b"-", b"\x03", b"$", b"#", b"#00", b"%", b"$#00"]),
    st.binary(max_size=16),
)


@settings(FUZZ, max_examples=400)
@given(st.lists(stream_chunks, min_size=1, max_size=12), st.lists(st.integers(0, 1 << 16)))
def _streams(chunks: list[bytes], cuts: list[int]) -> None:
    run_stream("streams", b"".join(chunks), cuts)


def test_byte_streams_through_the_decoder() -> None:
    at_least("streams", _streams)


@pytest.mark.parametrize("payload", QEMU_72_CRASHERS)
@pytest.mark.parametrize("kvm", [False, True])
def test_qemu_72_crashers_through_the_decoder(payload: bytes, kvm: bool) -> None:
    """The packets that crash QEMU 7.2's gdbstub: refused here, nothing reaches the driver."""
    harness = Harness("crashers", kvm=kvm)
    harness.fake.calls.clear()
    decoder = codec.Decoder()
    stream = codec.encode_packet(payload)
    for i in range(len(stream)):  # byte by byte, the worst split
        decoder.feed(stream[i : i + 1])
    (event,) = decoder.events()
    assert event == codec.Packet(payload)
    outcome = harness.send(event.data)
    assert outcome is not None
    assert outcome.replies == [b"E16"] and outcome.action is None
    assert harness.fake.calls == []
    harness.finish()


def test_enough_packets_overall() -> None:
    """The fuzz tests add up to at least 10,000 packets (each checks its own minimum)."""
    assert sum(MINIMUM.values()) >= 10_000


def test_the_harness_fails_on_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fuzz tests can fail: a bug anywhere below a packet (here a KeyError in the engine,
    which used to pass for a malformed packet) stops them with its traceback."""
    harness = Harness("bug")

    def broken(*_: object) -> bytes:
        raise KeyError("cr3")

    monkeypatch.setattr(harness.dbg, "read_memory", broken)
    with pytest.raises(AssertionError, match="(?s)internal error.*KeyError"):
        harness.send(b"m%x,4" % KERNEL_VA)
    harness = Harness("bug in a resume")
    monkeypatch.setattr(harness.dbg, "resume", lambda actions: {}["x"])
    with pytest.raises(AssertionError, match="internal error"):
        harness.send(b"c")
