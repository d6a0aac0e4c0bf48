"""Serving a saved machine, and saving a live one, as GDB sees both through the session and server.

- What a dump did not save is sent as `xx` (GDB: <unavailable>), never as a made-up 0; the PC is
  the one exception (GDB drops a target whose PC is unavailable).
- `monitor process` works on a machine that never runs (no exit watch is needed, none is set).
- `monitor dump FILE` awaits the hypervisor's save with the machine stopped; what GDB sends
  meanwhile is answered after it, in order; every refusal is one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from tests.unit.fake_dump import DumpDriver
from tests.unit.fakes import KERNEL_VA, FakeDriver
from tests.unit.test_guest_interface import EXIT, ToyOS
from vmigdb.arch.x86_64.registers import REGISTER_INDEX, REGISTER_OFFSETS, RegisterFile
from vmigdb.debugger.engine import Debugger
from vmigdb.errors import VmigdbError
from vmigdb.guest import registry
from vmigdb.guest.base import GuestError, GuestNotFound
from vmigdb.rsp.session import Await, Session
from vmigdb.wire import codec

UNSAVED = ("efer", "cr8", "xmm0", "st0", "mxcsr")


def saved(regs: RegisterFile, unavailable: tuple[str, ...]) -> RegisterFile:
    return dataclasses.replace(regs, unavailable=frozenset(REGISTER_INDEX[n] for n in unavailable))


def monitor(session: Session, line: str):
    return session.handle(b"qRcmd," + codec.encode_hex(line.encode()))


def console(replies: list[bytes]) -> str:
    text = [codec.decode_hex(r[1:]) for r in replies if r.startswith(b"O") and r != b"OK"]
    return b"".join(text).decode()


@pytest.fixture
def dump() -> tuple[DumpDriver, Debugger, Session]:
    driver = DumpDriver(2)
    for cpu in driver.regs:
        driver.regs[cpu] = saved(driver.regs[cpu], UNSAVED)
    dbg = Debugger(driver)
    dbg.halt()
    return driver, dbg, Session(dbg)


# -- registers a dump did not save -----------------------------------------------------------------


def test_unsaved_registers_are_unavailable_to_gdb(dump) -> None:
    driver, _, session = dump
    (g,) = session.handle(b"g").replies
    regs = driver.regs[1]
    for name in ("rax", "rip", "cr3", "efer", "xmm0", "mxcsr", "k_gs_base"):
        regnum = REGISTER_INDEX[name]
        start = 2 * REGISTER_OFFSETS[regnum]
        size = len(regs.raw(regnum))
        field = g[start : start + 2 * size]
        if name in UNSAVED:
            assert field == b"x" * 2 * size, name
        else:
            assert field == codec.encode_hex(regs.raw(regnum)), name
        (p,) = session.handle(b"p%x" % regnum).replies
        assert p == field, name
    assert len(g) == 2 * len(regs.to_g())


def test_an_unknown_pc_is_sent_as_zero_and_not_expedited_registers_are_read(dump) -> None:
    driver, dbg, session = dump
    driver.regs[1] = saved(RegisterFile.from_values({"cr3": 0x1000}), ("rip", "rsp", "rbp"))
    dbg = Debugger(driver)
    dbg.halt()
    session = Session(dbg)
    (stop,) = session.handle(b"?").replies
    assert stop == b"T05thread:1;10:%s;" % (b"00" * 8)  # rbp, rsp unknown: not expedited
    (p,) = session.handle(b"p%x" % REGISTER_INDEX["rip"]).replies
    assert p == b"00" * 8  # GDB 13 cannot do without a PC
    (p,) = session.handle(b"p%x" % REGISTER_INDEX["rsp"]).replies
    assert p == b"xx" * 8


def test_monitor_regs_says_unavailable(dump) -> None:
    _, _, session = dump
    text = console(monitor(session, "regs").replies)
    assert "efer <unavailable>" in text and "cr8 <unavailable>" in text
    assert " fs 0x" in text and "fs_base 0x" in text and "xmm" not in text


def test_a_register_written_is_no_longer_unavailable() -> None:
    regs = saved(RegisterFile.from_values({}), ("efer", "cr8"))
    after = regs.with_value(REGISTER_INDEX["efer"], (0xD01).to_bytes(8, "little"))
    assert after.unavailable == {REGISTER_INDEX["cr8"]} and after["efer"] == 0xD01


# -- a process scope on a machine that never runs -------------------------------------------------


class ToyDump(DumpDriver):
    def physical_ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.ram))]


def test_process_scope_on_a_dump_sets_no_exit_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_KNOWN", (("toy kernel", ToyOS.attach),))
    dbg = Debugger(ToyDump(2))
    dbg.halt()
    session = Session(dbg)
    outcome = monitor(session, "process app")
    assert outcome.replies[-1] == b"OK", console(outcome.replies)
    assert dbg.scope is not None and dbg.scope.cr3 == 0x5000
    assert not dbg.breakpoints.internal_at(EXIT)  # nothing exits in a dump: nothing to watch
    assert monitor(session, "process all").replies[-1] == b"OK"


def test_kernel_page_tables_say_why_per_os(monkeypatch: pytest.MonkeyPatch) -> None:
    def found(read_phys, ranges):
        return 0x1234000, False

    def missing(read_phys, ranges):
        raise GuestError("no VMCOREINFO note in guest RAM")

    monkeypatch.setattr(registry, "_PAGE_TABLES", (("toy kernel", missing), ("other", found)))
    assert registry.kernel_page_tables(lambda pa, n: bytes(n), [(0, 4096)]) == (0x1234000, False)
    monkeypatch.setattr(registry, "_PAGE_TABLES", (("toy kernel", missing),))
    with pytest.raises(GuestNotFound, match="^no toy kernel: no VMCOREINFO note in guest RAM$"):
        registry.kernel_page_tables(lambda pa, n: bytes(n), [(0, 4096)])


# -- monitor dump -----------------------------------------------------------------------------------


def live(save=None, *, host_files: bool = True) -> Session:
    dbg = Debugger(FakeDriver(2))
    dbg.halt()
    return Session(dbg, host_files=host_files, save_machine=save)


def run_later(outcome) -> list[bytes]:
    assert isinstance(outcome.action, Await)
    return asyncio.run(outcome.action.replies)


def test_monitor_dump_awaits_the_save_and_says_what_it_wrote(tmp_path: Path) -> None:
    asked: list[str] = []

    async def save(path: str) -> str:
        asked.append(path)
        return f"wrote {path}"

    target = tmp_path / "guest.elf"
    outcome = monitor(live(save), f"dump {target}")
    assert console(outcome.replies) == f"saving the guest to {target} "
    assert outcome.action.keepalive == b"O2e"  # a progress dot
    replies = run_later(outcome)
    assert asked == [str(target)]
    assert console(replies) == f"\nwrote {target}\n" and replies[-1] == b"OK"


def test_monitor_dump_failures_are_one_line(tmp_path: Path) -> None:
    async def refuse(path: str) -> str:
        raise VmigdbError("QEMU could not dump the guest: no space left")

    replies = run_later(monitor(live(refuse), f"dump {tmp_path}/x"))
    assert console(replies) == "\nQEMU could not dump the guest: no space left\n"
    assert replies[-1] == b"E01"

    async def buggy(path: str) -> str:
        raise KeyError("a bug")

    assert run_later(monitor(live(buggy), f"dump {tmp_path}/x"))[-1] == b"Eff"


async def never(path: str) -> str:
    raise AssertionError("a refused dump must not be started")


@pytest.mark.parametrize(
    ("args", "session", "message"),
    [
        ("", lambda: live(never), "usage: monitor dump FILE"),
        ("a b", lambda: live(never), "usage: monitor dump FILE"),
        ("{tmp}/x", lambda: live(never, host_files=False), "refused while serving a non-loopback"),
        ("{tmp}/x", lambda: live(None), "the fake driver cannot save the machine"),
        ("{tmp}/x", lambda: Session(Debugger(DumpDriver(1))), "already a saved one"),
        ("{tmp}/exists", lambda: live(never), "exists: vmigdb never overwrites a file"),
    ],
)
def test_monitor_dump_refusals(tmp_path: Path, args, session, message) -> None:
    (tmp_path / "exists").write_bytes(b"keep me")
    outcome = monitor(session(), "dump " + args.format(tmp=tmp_path))
    assert outcome.action is None and outcome.replies[-1] == b"E01"
    assert message in console(outcome.replies)
    assert (tmp_path / "exists").read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_the_server_holds_packets_while_the_machine_is_saved(tmp_path: Path) -> None:
    """GDB's packets sent during `monitor dump` are answered after it, in order; a ^C meanwhile
    does not disturb it."""
    from vmigdb.rsp.server import ListenAddress, RspServer, bind_listener

    async def scenario() -> tuple[list[bytes], bool]:
        release = asyncio.Event()
        saving = asyncio.Event()

        async def save(path: str) -> str:
            saving.set()
            await release.wait()
            return f"wrote {path}"

        dbg = Debugger(FakeDriver(2, pipe=True))
        server = RspServer(dbg, save_machine=save)
        await server.start(bind_listener(ListenAddress.parse(f"unix:{tmp_path}/gdb")))
        reader, writer = await asyncio.open_unix_connection(f"{tmp_path}/gdb")
        decoder = codec.Decoder()
        packets: list[bytes] = []

        async def read_for(seconds: float) -> None:
            deadline = asyncio.get_running_loop().time() + seconds
            try:
                while (left := deadline - asyncio.get_running_loop().time()) > 0:
                    decoder.feed(await asyncio.wait_for(reader.read(1 << 16), left))
                    packets.extend(e.data for e in decoder.events() if isinstance(e, codec.Packet))
            except TimeoutError:
                pass

        try:
            command = codec.encode_hex(f"dump {tmp_path}/guest.elf".encode())
            writer.write(codec.encode_packet(b"qRcmd," + command))
            writer.write(b"\x03")  # ^C: nothing to interrupt
            writer.write(codec.encode_packet(b"m%x,4" % KERNEL_VA))
            writer.write(codec.encode_packet(b"qC"))
            await writer.drain()
            await asyncio.wait_for(saving.wait(), 5)
            await read_for(1.4)
            held = packets[1:] == [b"O2e"]  # the note and a dot: the reads wait for the save
            release.set()
            await read_for(0.5)
        finally:
            writer.close()
            await server.close()
        return packets, held

    packets, held = asyncio.run(scenario())
    assert held
    assert [codec.decode_hex(p[1:]) for p in packets[:3]] == [
        f"saving the guest to {tmp_path}/guest.elf ".encode(),
        b".",
        f"\nwrote {tmp_path}/guest.elf\n".encode(),
    ]
    assert packets[3] == b"OK"
    assert len(packets[4]) == 8 and packets[5] == b"QC1"
    assert len(packets) == 6


def test_a_dump_is_analysed_before_gdb_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vmigdb dump` analyses the guest and builds its symbol file before listening: GDB's first
    packets then find both ready; a guest that cannot be analysed is no error there."""
    monkeypatch.setattr(registry, "_KNOWN", (("toy kernel", ToyOS.attach),))
    ToyOS.attached = 0
    dbg = Debugger(ToyDump(1))
    dbg.guest.prepare()
    assert ToyOS.attached == 1
    dbg.halt()
    dbg.client_attached()
    session = Session(dbg)
    (name,) = session.handle(b"qXfer:exec-file:read::0,100").replies
    assert name == b"l/vmigdb/toy-kernel" and ToyOS.attached == 1  # not analysed again
    Debugger(DumpDriver(1)).guest.prepare()  # lists no RAM: nothing to analyse, no error


def test_a_read_past_the_end_of_ram_is_an_error_reply(dump) -> None:
    driver, _, session = dump
    assert monitor(session, "phys on").replies[-1] == b"OK"
    end = len(driver.ram)
    (last,) = session.handle(b"m%x,4" % (end - 4)).replies
    assert last == codec.encode_hex(driver.ram[end - 4 :])
    assert session.handle(b"m%x,4" % end).replies == [b"E0e"]
    (partial,) = session.handle(b"m%x,8" % (end - 4)).replies  # GDB's `m`: what can be read
    assert partial == last


def test_qemu_format_info_registers_leaves_out_what_a_dump_did_not_save(dump) -> None:
    _, _, session = dump
    text = console(monitor(session, "info registers").replies)
    assert "RAX=" in text and "RIP=" in text and "CR3=" in text
    assert "EFER=" not in text  # not saved: left out, as QEMU-format lines never guess
