"""Catchpoints through the session, over a fake machine and a toy OS that reports its hooks:
GDB's catch syscall (QCatchSyscalls, syscall_entry/syscall_return stops, the caller's registers,
orig_rax, writes into the saved registers), monitor catch exec/module (library stop first, the
stop itself at the next resume without the guest running), what GDB is told about the guest
(GNU/Linux description, the library list); the driver's own catchpoints (a catch stop reaches GDB
with its message, `monitor catch NAME` arms them, detach disarms them) and raw-CR3 scopes (a
scoped breakpoint hands its address space to the driver)."""

from __future__ import annotations

import struct
from collections import deque

import pytest

from tests.unit.fakes import KERNEL_PA, KERNEL_VA, PAGE, PML4_PA, FakeDriver
from tests.unit.test_session import Machine
from vmigdb.arch.x86_64.registers import ORIG_RAX_REGNUM, REGISTER_INDEX
from vmigdb.debugger.driver_catch import DriverCatch
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.events import StopReason
from vmigdb.guest import registry
from vmigdb.guest.base import (
    ExecEvent,
    GuestOS,
    ImageInfo,
    Library,
    Module,
    ModuleLoad,
    Process,
    Symbol,
    SyscallFrame,
)
from vmigdb.hv.base import BreakpointType, CatchKind, DriverError, DriverStop
from vmigdb.rsp.session import Resume, Session
from vmigdb.wire import codec

HANDLER = KERNEL_VA + 0x800  # the kernel's openat handler
DISPATCH = KERNEL_VA + 0x900  # every system call
EXEC = KERNEL_VA + 0xA00
MODINIT = KERNEL_VA + 0xB00
LOADER = 0x7F00_0000_3000  # the dynamic loader's _dl_debug_state, in the process
FRAME = KERNEL_VA + 0x1000  # saved registers, in mapped fake kernel memory
FRAME_PA = KERNEL_PA + 0x1000
# Two address spaces: copies of the fake machine's top-level page table (kernel half included),
# each a pair as with page-table isolation (the user half at +0x1000).
APP_CR3, OTHER_CR3 = 0x8000, 0xA000
USER_RIP, USER_RSP, USER_ENTRY = 0x7F00_0000_1011, 0x7FFF_0000_0F00, 0x7F00_0000_2000
NAMES = ("rdi", "rsi", "rdx", "r10", "rax", "rip", "rsp", "eflags", "cs", "ss", "orig_rax")


class LinuxToy(GuestOS):
    kind = "Linux"  # what makes the session describe the target as GNU/Linux
    frames: dict[int, dict[str, int]] = {}
    exec_events: deque[ExecEvent] = deque()  # one per hit of the exec hook, in order

    def __init__(self, read_phys) -> None:
        self.read_phys = read_phys

    @classmethod
    def attach(cls, read_phys, ram_ranges) -> LinuxToy:
        return cls(read_phys)

    def fingerprint(self) -> object:
        return 1

    def refresh(self) -> None:
        pass

    def describe(self) -> list[tuple[str, str]]:
        return [("guest", "toy Linux")]

    def lookup_symbol(self, name: str) -> Symbol | None:
        return None

    exec_file_name = "/vmigdb/toy"
    symbol_elf = b"\x7fELF toy"

    def processes(self) -> list[Process]:
        return [Process(7, 1, "app", APP_CR3, "R"), Process(8, 1, "other", OTHER_CR3, "R")]

    def find_process(self, pid: int) -> Process | None:
        return next((p for p in self.processes() if p.pid == pid), None)

    def find_processes(self, name: str) -> list[Process]:
        return [p for p in self.processes() if p.comm == name]

    def current_process(self, regs) -> Process | None:
        return next((p for p in self.processes() if p.cr3 == regs["cr3"] & ~0x1FFF), None)

    def process_exit_hook(self) -> int | None:
        return None

    def modules(self) -> list[Module]:
        return [Module("toydrv", 0xFFFF_FFFF_C000_0000, 0x2000)]

    def libraries(self, pid: int | None) -> list[Library]:
        if pid is None:
            return [Library("toydrv", 0xFFFF_FFFF_C000_0000, (1,))]
        return [Library("/bin/app", 0x5555_0000_0000, (0, 2, 23, 0x5555_0000_0000))]

    def library_elf(self, pid: int | None, library: Library) -> bytes:
        return b"\x7fELF " + library.path.encode()

    def image_info(self, pid: int) -> ImageInfo:
        return ImageInfo("/bin/app", 0x5555_0000_10F0, 0x5555_0000_0000, 0x7F00_0000_0000)

    def syscall_hooks(self, numbers: frozenset[int] | None) -> list[int]:
        return [DISPATCH] if numbers is None else [HANDLER]

    def syscall_frame(self, regs) -> SyscallFrame | None:
        values = self.frames.get(regs["rdi"])
        if values is None:
            return None
        slots = {name: regs["rdi"] + 8 * i for i, name in enumerate(NAMES)}
        return SyscallFrame(values["orig_rax"], dict(values), slots, True, regs["rdi"])

    def loader_hook(self, pid: int) -> int | None:
        return LOADER if pid == 7 else None

    def exec_hook(self) -> int:
        return EXEC

    def exec_event(self, regs) -> ExecEvent | None:
        return self.exec_events.popleft() if self.exec_events else None

    def module_load_hook(self) -> int:
        return MODINIT

    def module_load_event(self, regs) -> ModuleLoad | None:
        return ModuleLoad("toydrv", 0xFFFF_FFFF_C000_0000, 0x2000, 0xFFFF_FFFF_C000_1000)


class ScriptedDriver(FakeDriver):
    """Each stop comes with the registers the vCPU has when it happens."""

    def __init__(self) -> None:
        super().__init__(1)
        self.script: deque[dict[str, int]] = deque()
        for table in (APP_CR3, APP_CR3 + PAGE, OTHER_CR3, OTHER_CR3 + PAGE):
            self.ram[table : table + PAGE] = self.ram[PML4_PA : PML4_PA + PAGE]

    def physical_ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.ram))]

    def at(self, **regs: int) -> None:
        self.script.append(regs)
        self.queue_stop(DriverStop(cpu=1, signal=5))

    def _take(self) -> DriverStop:
        stop = super()._take()
        if stop.catch is None and stop.signal == 5 and self.script:
            for name, value in self.script.popleft().items():
                self.set_reg(1, name, value)
        return stop


@pytest.fixture(autouse=True)
def toy_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_KNOWN", (("toy Linux", LinuxToy.attach),))
    LinuxToy.frames = {}
    LinuxToy.exec_events = deque()


def target_xml(session: Session) -> bytes:
    """Read the target description as GDB does on connecting (before any register)."""
    doc = b""
    while True:
        reply = session.handle(b"qXfer:features:read:target.xml:%x,800" % len(doc)).replies[0]
        doc += codec.unescape_binary(reply[1:])
        if reply[:1] == b"l":
            return doc


def machine() -> tuple[ScriptedDriver, Debugger, Session]:
    fake = ScriptedDriver()
    fake.set_reg(1, "cr3", APP_CR3)
    dbg = Debugger(fake)
    dbg.resume({1: "c"})
    dbg.halt()
    session = Session(dbg)
    target_xml(session)
    return fake, dbg, session


def monitor(session: Session, line: str) -> tuple[str, bytes]:
    replies = session.handle(b"qRcmd," + codec.encode_hex(line.encode())).replies
    return b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode(), replies[-1]


def run(dbg: Debugger, session: Session, payload: bytes = b"vCont;c") -> list[bytes]:
    """Resume as GDB asks, until a stop is reported; the stop's replies."""
    outcome = session.handle(payload)
    if outcome.action is None:
        return outcome.replies  # answered at once: a stop waiting to be told
    assert isinstance(outcome.action, Resume)
    dbg.resume(outcome.action.actions)
    for _ in range(20):
        event = dbg.poll()
        if event is not None:
            return session.stop_replies(event)
    raise AssertionError("no stop")


def reg(session: Session, name: str) -> int:
    reply = session.handle(b"p%x" % REGISTER_INDEX[name]).replies[0]
    return int.from_bytes(codec.decode_hex(reply), "little")


def caller(**changes: int) -> dict[str, int]:
    values = {
        "rdi": 0xFFFFFF9C, "rsi": 0x5555_0000_2000, "rdx": 0, "r10": 0, "rax": -38 & (2**64 - 1),
        "rip": USER_RIP, "rsp": USER_RSP, "eflags": 0x246, "cs": 0x33, "ss": 0x2B,
        "orig_rax": 257,
    }  # fmt: skip
    values.update(changes)
    return values


def test_the_target_is_gnu_linux_with_orig_rax() -> None:
    _, _, session = machine()
    doc = target_xml(session)
    assert b"<osabi>GNU/Linux</osabi>" in doc
    assert b'<feature name="org.gnu.gdb.i386.linux">' in doc
    assert b'name="orig_rax" bitsize="64" type="int" regnum="66"' in doc
    assert session.handle(b"p42").replies == [codec.encode_hex(b"\xff" * 8)]  # not in a syscall
    features = session.handle(b"qSupported").replies[0]
    assert b"QCatchSyscalls+" in features and b"qXfer:libraries-svr4:read+" in features


def test_syscall_entry_and_return_in_a_scoped_process() -> None:
    fake, dbg, session = machine()
    LinuxToy.frames[FRAME] = caller()
    assert monitor(session, "process 7")[1] == b"OK"
    assert session.handle(b"QCatchSyscalls:1;101").replies == [b"OK"]
    assert (0, HANDLER, 1) in fake.installed
    # Another process's openat hits the handler: filtered inside vmigdb, the guest goes on.
    fake.at(rip=HANDLER, cr3=OTHER_CR3, rdi=FRAME)
    fake.at(rip=HANDLER + 3, cr3=OTHER_CR3)  # the step off it
    fake.at(rip=HANDLER, cr3=APP_CR3 | 0x1000 | 5, rdi=FRAME, rsi=257)  # PTI bit, PCID 5
    replies = run(dbg, session)
    assert replies[-1].endswith(b"syscall_entry:101;"), replies
    assert b"10:%s;" % codec.encode_hex(USER_RIP.to_bytes(8, "little")) in replies[-1]
    # the run, a step off the filtered hit, the run on: one stop for GDB
    assert fake.resumes[-3:] == [{1: "c"}, {1: "s"}, {1: "c"}]
    # GDB sees the caller's registers: the path at rsi, the number in orig_rax.
    assert reg(session, "rsi") == 0x5555_0000_2000
    assert reg(session, "rip") == USER_RIP and reg(session, "cs") == 0x33
    assert session.handle(b"p42").replies == [codec.encode_hex((257).to_bytes(8, "little"))]
    # A write goes where the kernel saved the register: the system call sees it.
    assert session.handle(b"P4=%s" % codec.encode_hex((0x1234).to_bytes(8, "little"))).replies == [
        b"OK"
    ]
    slot = FRAME_PA + 8 * NAMES.index("rsi")
    assert struct.unpack_from("<Q", fake.ram, slot)[0] == 0x1234 and reg(session, "rsi") == 0x1234
    assert (
        session.handle(b"P12=%s" % codec.encode_hex((0).to_bytes(4, "little"))).replies[0][:2]
        == b"E."
    )  # cs is the saved frame's, fixed
    assert session.handle(b"P42=%s" % codec.encode_hex(b"\xff" * 8)).replies == [b"OK"]
    assert struct.unpack_from("<q", fake.ram, FRAME_PA + 8 * NAMES.index("orig_rax"))[0] == -1
    # GDB turns its catchpoints off and on around each stop: the return awaited stays.
    assert session.handle(b"QCatchSyscalls:0").replies == [b"OK"]
    assert session.handle(b"QCatchSyscalls:1;101").replies == [b"OK"]
    assert (0, USER_RIP, 1) in fake.installed
    fake.at(rip=HANDLER + 3)  # stepping off the entry hook
    fake.at(rip=USER_RIP, cr3=APP_CR3 | 0x1000, rsp=USER_RSP, rax=3)
    replies = run(dbg, session)
    assert replies[-1].endswith(b"syscall_return:101;"), replies
    assert reg(session, "rax") == 3  # the vCPU's own registers, in user mode
    assert session.handle(b"p42").replies == [codec.encode_hex((257).to_bytes(8, "little"))]
    # The return hook is gone once the guest runs again.
    fake.at(rip=0x1234, cr3=APP_CR3)
    run(dbg, session)
    assert (0, USER_RIP, 1) not in fake.installed


def test_unscoped_syscall_stops_name_the_process() -> None:
    fake, dbg, session = machine()
    LinuxToy.frames[FRAME] = caller()
    assert session.handle(b"QCatchSyscalls:1").replies == [b"OK"]  # every system call
    assert (0, DISPATCH, 1) in fake.installed
    fake.at(rip=DISPATCH, cr3=OTHER_CR3, rdi=FRAME)
    replies = run(dbg, session)
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1])
    assert text == b"vmigdb: system call by process 8 (other)\n"
    assert replies[-1].endswith(b"syscall_entry:101;")


def test_bad_qcatchsyscalls_is_a_parse_error() -> None:
    _, _, session = machine()
    for payload in (b"QCatchSyscalls:2", b"QCatchSyscalls:0;101", b"QCatchSyscalls:1;xyz"):
        assert session.handle(payload).replies == [b"E16"], payload


def test_catch_exec_reports_a_library_stop_then_the_stop_itself() -> None:
    fake, dbg, session = machine()
    text, status = monitor(session, "catch exec app")
    assert status == b"OK" and "the next process that executes 'app'" in text
    assert (0, EXEC, 1) in fake.installed
    # Another program's exec first: not this one, the guest goes on; then app's.
    LinuxToy.exec_events.extend(
        [
            ExecEvent(8, "other", "/bin/other", 0x401000, OTHER_CR3),
            ExecEvent(7, "app", "/bin/app", USER_ENTRY, APP_CR3),
        ]
    )
    fake.at(rip=EXEC)
    fake.at(rip=EXEC + 3)  # stepping off the hook
    fake.at(rip=EXEC)
    fake.at(rip=EXEC + 3)
    fake.at(rip=USER_ENTRY, cr3=APP_CR3 | 0x1000)
    replies = run(dbg, session)
    assert replies == [b"T05thread:1;library:;"]
    assert dbg.scope is not None and dbg.scope.pid == 7
    listing = session.handle(b"qXfer:libraries-svr4:read::0,1000").replies[0]
    assert b'name="/bin/app@0x555500000000"' in listing and b'lmid="0x0"' in listing
    runs = len(fake.resumes)
    replies = run(dbg, session)  # GDB resumes after reading the list: the stop itself, at once
    assert len(fake.resumes) == runs  # the guest did not run
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()
    assert "process 7 (app) executed /bin/app: stopped before its first instruction" in text
    assert "program entry point 0x5555000010f0, loaded at 0x555500000000" in text
    assert replies[-1].startswith(b"T05thread:1;") and b"library" not in replies[-1]
    assert not dbg.exec_catch.armed  # one-shot


def test_catch_module_before_init() -> None:
    fake, dbg, session = machine()
    assert monitor(session, "catch module toydrv")[1] == b"OK"
    fake.at(rip=MODINIT)
    assert run(dbg, session) == [b"T05thread:1;library:;"]
    listing = session.handle(b"qXfer:libraries-svr4:read::0,1000").replies[0]
    assert b'name="/vmigdb/modules/toydrv.ko@0xffffffffc0000000"' in listing
    path = codec.encode_hex(b"/vmigdb/modules/toydrv.ko@0xffffffffc0000000")
    (fd,) = session.handle(b"vFile:open:%s,0,0" % path).replies
    assert fd.startswith(b"F") and not fd.startswith(b"F-")
    replies = run(dbg, session)
    text = b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()
    assert "module toydrv loaded at 0xffffffffc0000000" in text
    assert "its init function, at 0xffffffffc0001000, has not run yet" in text
    assert dbg.module_catch.armed  # stays until turned off
    assert monitor(session, "catch module off") == ("module: off\n", b"OK")
    assert not dbg.module_catch.armed


def test_monitor_catch_usage_errors() -> None:
    _, _, session = machine()
    for line, says in (
        ("catch panic maybe", "usage: monitor catch panic on|off"),
        ("catch exec", "usage: monitor catch exec NAME|off"),
        ("catch module a b", "usage: monitor catch module [NAME]|off"),
        ("catch nothing", "no catchpoint 'nothing'"),
    ):
        text, status = monitor(session, line)
        assert status == b"E01" and says in text, (line, text)
    text, status = monitor(session, "info")
    assert status == b"OK" and "scope: the whole machine" in text and "catchpoints:" in text


def test_orig_rax_only_with_the_linux_description() -> None:
    class NotLinux(LinuxToy):
        kind = "Toy"

    registry_known = registry._KNOWN
    registry._KNOWN = (("toy", NotLinux.attach),)  # type: ignore[assignment]
    try:
        _, _, session = machine()
        doc = target_xml(session)
        assert b"osabi" not in doc and b"orig_rax" not in doc
        assert session.handle(b"p%x" % ORIG_RAX_REGNUM).replies == [b"E16"]
    finally:
        registry._KNOWN = registry_known  # type: ignore[assignment]


def test_a_scoped_process_loading_a_library_is_a_library_stop_alone() -> None:
    fake, dbg, session = machine()
    assert monitor(session, "process 8")[1] == b"OK"  # no loader: nothing to watch
    fake.at(rip=0x1234, cr3=OTHER_CR3)
    session.handle(b"qXfer:libraries-svr4:read::0,1000")
    run(dbg, session)
    assert not any(key[1] == LOADER for key in fake.installed)
    assert monitor(session, "process 7")[1] == b"OK"
    fake.at(rip=0x1234, cr3=APP_CR3)
    assert run(dbg, session) == [b"T05thread:1;library:;"]  # the scope changed since GDB read
    session.handle(b"qXfer:libraries-svr4:read::0,1000")
    assert b"3412000000000000" in run(dbg, session)[-1]  # the stop itself, at GDB's resume
    fake.at(rip=LOADER, cr3=APP_CR3 | 0x1000)  # the loader says its list changed
    runs = len(fake.resumes)
    assert run(dbg, session) == [b"T05thread:1;library:;"]
    assert (0, LOADER, 1) in fake.installed
    text, _ = monitor(session, "catch libraries")
    assert "GDB learns of each library process 7 loads" in text
    # GDB reads the list and resumes: the guest really runs on (stepping off the hook first).
    session.handle(b"qXfer:libraries-svr4:read::0,1000")
    fake.at(rip=LOADER + 3)
    fake.at(rip=0x5678, cr3=APP_CR3)
    replies = run(dbg, session)
    assert len(fake.resumes) == runs + 3 and replies[-1].startswith(b"T05thread:1;")


class CatchingDriver(FakeDriver):
    """The fake machine, plus two catchpoints of its own."""

    def __init__(self, ncpus: int = 2) -> None:
        super().__init__(ncpus)
        self.armed: dict[str, int | None] = {}
        self.scopes: list[int | None] = []

    def catchpoints(self) -> tuple[CatchKind, ...]:
        return (
            CatchKind("msr-write", "stop on MSR writes"),
            CatchKind("exec-written", "stop on written code", scoped=True),
        )

    def set_catch(self, name: str, on: bool, scope_cr3: int | None = None) -> str:
        if name == "exec-written" and scope_cr3 == 0xBAD000:
            raise DriverError("that address space has no page tables")
        if on:
            self.armed[name] = scope_cr3
            return f"on ({scope_cr3})"
        self.armed.pop(name, None)
        return "off"

    def insert_breakpoint(self, type, addr, length, mechanism=None, scope_cr3=None) -> None:
        self.scopes.append(scope_cr3)
        super().insert_breakpoint(type, addr, length, mechanism)


def catching() -> Machine:
    """A session over the catching driver, attached as the server attaches."""
    driver = CatchingDriver()
    dbg = Debugger(driver)
    dbg.resume({cpu: "c" for cpu in dbg.cpus()})
    dbg.halt()
    return Machine(driver, dbg, Session(dbg))


def test_a_catch_stop_reaches_gdb_with_its_message_and_is_never_filtered() -> None:
    m = catching()
    message = "vmigdb: CPU#1 wrote MSR LSTAR (0xc0000082): 0x1 -> 0x2"
    event = m.resume(b"vCont;c", DriverStop(cpu=2, signal=5, catch="msr-write", message=message))
    assert event.reason is StopReason.CATCH and event.cpu == 2 and event.message == message
    replies = m.session.stop_replies(event)
    assert codec.decode_hex(replies[0][1:]).decode() == message + "\n"
    assert replies[-1].startswith(b"T05thread:2;")


def test_monitor_catch_lists_arms_and_disarms_the_drivers_catchpoints() -> None:
    m = catching()
    text, reply = m.monitor("catch")
    assert (
        reply == b"OK" and "msr-write: off" in text and "exec-written [PID|cr3=ADDR]: off" in text
    )
    text, reply = m.monitor("catch msr-write")
    assert reply == b"OK" and text.strip() == "msr-write: on (None)"
    text, reply = m.monitor("catch exec-written cr3=0x2000")
    assert reply == b"OK" and m.fake.armed == {"msr-write": None, "exec-written": 0x2000}
    text, reply = m.monitor("catch msr-write cr3=0x2000")
    assert reply == b"E01" and "takes no process" in text
    text, reply = m.monitor("catch exec-written cr3=0xbad000")
    assert reply == b"E01" and "no page tables" in text
    text, reply = m.monitor("catch nonsense")
    assert reply == b"E01" and "no catchpoint 'nonsense'" in text and "msr-write" in text
    text, reply = m.monitor("catch msr-write off")
    assert reply == b"OK" and m.fake.armed == {"exec-written": 0x2000}
    m.dbg.detach()
    assert m.fake.armed == {}
    assert not any(c.armed for c in m.dbg.catchpoints.kinds() if isinstance(c, DriverCatch))


def test_a_driver_without_catchpoints_says_so() -> None:
    _, _, session = machine()
    text, reply = monitor(session, "catch msr-write")
    assert reply == b"E01" and "no catchpoint 'msr-write'; there are: panic, syscall" in text


def test_a_scope_by_page_tables_reaches_the_driver_with_each_breakpoint() -> None:
    m = catching()
    text, reply = m.monitor("process cr3=0x2000")
    assert reply == b"OK" and "page tables at 0x2000" in text
    assert m.one(b"Z0,ffffffff81000000,1") == b"OK"
    m.monitor("process all")
    assert m.one(b"Z0,ffffffff81000010,1") == b"OK"
    assert m.fake.scopes == [0x2000, None]
    assert (
        m.dbg.breakpoints.desired[(int(BreakpointType.SOFTWARE), 0xFFFFFFFF81000000, 1)].scope_cr3
        == 0x2000
    )


def test_leaving_a_process_scope_says_gdb_still_lists_its_libraries() -> None:
    _, _, session = machine()
    text, status = monitor(session, "process all")
    assert (
        status == b"OK"
        and text == "scope: the whole machine; new breakpoints fire in every process\n"
    )
    assert monitor(session, "process 7")[1] == b"OK"
    text, status = monitor(session, "process kernel")
    assert status == b"OK" and text.startswith("scope: the kernel;"), text
    assert "GDB still lists app's libraries until the next stop: 'sharedlibrary' drops" in text
