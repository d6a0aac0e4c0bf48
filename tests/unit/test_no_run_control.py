"""A driver without run control or writes (a memory dump) is first-class: the session advertises
only what it can do, reads work, and every action gets a reply GDB prints, never a hang."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

from tests.unit.fake_dump import DUMP_CAPABILITIES, DumpDriver
from tests.unit.fakes import KERNEL_VA, FakeDriver, ram_pattern
from vmigdb.arch.x86_64.registers import G_PACKET_SIZE
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopReason
from vmigdb.hv.base import BreakpointType, Capabilities, Unsupported
from vmigdb.hv.qemu.driver import tcg_capabilities
from vmigdb.rsp.features import Features
from vmigdb.rsp.session import Detach, Kill, Session
from vmigdb.wire import codec

REFUSED = re.compile(rb"E\.vmigdb: the dump driver cannot [a-z ,()]+")


def features(reply: bytes) -> dict[str, str]:
    out = {}
    for item in reply.decode().split(";"):
        name, sep, value = item.partition("=")
        out[name if sep else name[:-1]] = value if sep else name[-1]
    return out


@pytest.fixture
def dump() -> tuple[DumpDriver, Debugger, Session]:
    driver = DumpDriver(2)
    dbg = Debugger(driver)
    dbg.halt()  # what the server does when GDB connects: no stop happened before
    return driver, dbg, Session(dbg)


def test_qsupported_and_vcont_are_derived_from_the_capabilities(dump) -> None:
    _, _, session = dump
    offered = features(session.handle(b"qSupported:swbreak+;hwbreak+;vContSupported+").replies[0])
    assert offered == {
        "PacketSize": "20000",
        "QStartNoAckMode": "+",
        "qXfer:features:read": "+",
        "qXfer:threads:read": "+",
        "qXfer:exec-file:read": "+",
        "qXfer:libraries-svr4:read": "+",  # a dump's processes have libraries too
    }
    assert session.handle(b"vCont?").replies == [b""]  # vCont is not supported at all
    # Catching system calls needs run control: refused with the reason, never half-served.
    assert session.handle(b"QCatchSyscalls:1;101").replies == [
        b"E.vmigdb: the dump driver cannot catch system calls (it has no run control or "
        b"breakpoints)"
    ]


def test_a_live_driver_still_offers_everything() -> None:
    live = Features.probe("qemu", tcg_capabilities("icount"))
    assert features(live.q_supported()).keys() >= {
        "swbreak",
        "hwbreak",
        "vContSupported",
        "ConditionalBreakpoints",
        "QCatchSyscalls",
    }
    assert live.v_cont() == b"vCont;c;C;s;S;t;r"


def test_run_control_without_single_step_offers_no_step() -> None:
    caps = dataclasses.replace(tcg_capabilities("icount"), single_step=None)
    no_step = Features.probe("x", caps)
    assert no_step.v_cont() == b"vCont;c;C;t"  # GDB then uses c/s, and s is refused
    assert "ConditionalBreakpoints" not in features(no_step.q_supported())  # nothing steps off
    session = Session(Debugger(FakeDriver(1)))
    session.features = no_step  # the probe as such a driver would declare it
    assert session.handle(b"vCont;s:1").replies == [b"E.vmigdb: the x driver cannot single-step"]


def test_capabilities_without_run_control_cannot_claim_breakpoints() -> None:
    with pytest.raises(ValueError, match="needs run control"):
        dataclasses.replace(DUMP_CAPABILITIES, single_step=DUMP_CAPABILITIES.registers)
    assert isinstance(DUMP_CAPABILITIES, Capabilities)


def test_reads_work(dump) -> None:
    driver, _, session = dump
    assert session.handle(b"qfThreadInfo").replies == [b"m1,2"]
    (g,) = session.handle(b"g").replies
    assert len(g) == 2 * G_PACKET_SIZE
    (m,) = session.handle(b"m%x,4" % KERNEL_VA).replies
    assert codec.decode_hex(m) == bytes(ram_pattern(0x10_0000 + i) for i in range(4))
    assert session.handle(b"Hg2").replies == [b"OK"]
    assert session.handle(b"p10").replies == [codec.encode_hex(driver.regs[2].raw(16))]


def test_halt_works_without_an_earlier_stop(dump) -> None:
    driver, dbg, session = dump
    stop = dbg.last_stop
    assert stop is not None and stop.reason is StopReason.SIGNAL and stop.cpu == 1
    assert dbg.halt() is stop and not dbg.running
    (reply,) = session.handle(b"?").replies
    rip = codec.encode_hex(driver.regs[1].raw(16))
    assert reply.startswith(b"T05thread:1;") and b"10:%s;" % rip in reply


@pytest.mark.parametrize(
    "payload",
    [
        b"c",
        b"C05",
        b"s",
        b"S05",
        b"vCont;c",
        b"vCont;s:1;c",
        b"vCont;r1000,2000:1",
        b"Z0,%x,1" % KERNEL_VA,
        b"Z1,%x,1" % KERNEL_VA,
        b"Z2,%x,4" % KERNEL_VA,
        b"Z3,%x,4" % KERNEL_VA,
        b"Z4,%x,4" % KERNEL_VA,
        b"M%x,1:00" % KERNEL_VA,
        b"X%x,1:a" % KERNEL_VA,
        b"P0=" + b"00" * 8,
        b"G" + b"00" * G_PACKET_SIZE,
        b"vCont;c:zz",  # not even parsed: refused first
    ],
)
def test_actions_get_a_reply_gdb_prints(dump, payload: bytes) -> None:
    driver, dbg, session = dump
    before = driver.reads
    outcome = session.handle(payload)
    assert outcome.action is None  # nothing for the server to wait on
    (reply,) = outcome.replies
    assert REFUSED.fullmatch(reply), reply
    assert not dbg.running and dbg.breakpoints.installed == {}
    assert payload[:1] in b"ZP" or driver.reads == before  # refused before anything was read


def test_removing_a_breakpoint_is_harmless(dump) -> None:
    _, _, session = dump
    assert session.handle(b"z0,%x,1" % KERNEL_VA).replies == [b"OK"]


def test_the_debugger_refuses_too(dump) -> None:
    """The second line of defence, for callers other than the session."""
    _, dbg, _ = dump
    with pytest.raises(Unsupported, match="cannot run the guest"):
        dbg.resume({1: "c"})
    with pytest.raises(Unsupported, match="cannot write guest memory"):
        dbg.write_memory(1, KERNEL_VA, b"\0")
    with pytest.raises(Unsupported, match="cannot write registers"):
        dbg.write_register(1, 0, bytes(8))
    with pytest.raises(Unsupported, match="no software breakpoints"):
        dbg.add_breakpoint(BreakpointType.SOFTWARE, KERNEL_VA, 1)


def test_detach_and_kill_leave_the_machine_as_it_is(dump) -> None:
    driver, dbg, session = dump
    assert isinstance(session.handle(b"D").action, Detach)
    dbg.detach()  # does not try to run a machine that cannot run
    assert not dbg.running
    assert isinstance(session.handle(b"vKill;1").action, Kill)
    driver.kill()  # nothing to power off


def test_monitor_commands_still_work(dump) -> None:
    _, _, session = dump
    replies = session.handle(b"qRcmd," + codec.encode_hex(b"info")).replies
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()
    assert replies[-1] == b"OK" and "driver: dump" in text and "state: stopped" in text
    replies = session.handle(b"qRcmd," + codec.encode_hex(b"stealth")).replies
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()
    assert "registers saved in the dump" in text and "single-step" not in text


def test_the_server_serves_it_without_a_stop_channel(tmp_path) -> None:
    """No stop fd is watched; a `c` is answered at once and the connection goes on."""
    from vmigdb.rsp.server import ListenAddress, RspServer, bind_listener

    async def scenario() -> list[bytes]:
        dbg = Debugger(DumpDriver(1))
        server = RspServer(dbg)
        await server.start(bind_listener(ListenAddress.parse(f"unix:{tmp_path}/gdb")))
        reader, writer = await asyncio.open_unix_connection(f"{tmp_path}/gdb")
        decoder = codec.Decoder()
        replies = []
        try:
            for payload in (b"qSupported", b"?", b"c", b"m%x,2" % KERNEL_VA, b"D"):
                writer.write(codec.encode_packet(payload))
                await writer.drain()
                while True:
                    decoder.feed(await asyncio.wait_for(reader.read(1 << 16), 5))
                    packets = [e.data for e in decoder.events() if isinstance(e, codec.Packet)]
                    if packets:
                        replies += packets
                        break
        finally:
            writer.close()
            await server.close()
        return replies

    replies = asyncio.run(scenario())
    assert replies[0].startswith(b"PacketSize=") and b"vContSupported" not in replies[0]
    assert replies[1].startswith(b"T05thread:1;")
    assert REFUSED.fullmatch(replies[2])
    assert len(replies[3]) == 4 and replies[4] == b"OK"
