"""Guest time in the stealth policy: run-control jobs are only as invisible as the driver's clocks.

Under TCG with `--time host` a breakpoint or a step makes QEMU retranslate guest code, which
RDTSC-timed guest code can see; `--time icount` hides it. The policy, given each driver's declared
capabilities (KVM's included, though KVM cannot run here), must warn once in `default`, refuse
with the reason in `strict`, and `monitor stealth` must say which guest time is in use.
"""

from __future__ import annotations

import pytest

from tests.unit.fakes import KERNEL_VA, FakeDriver
from vmigdb.debugger.engine import Debugger
from vmigdb.debugger.policy import StealthMode, StealthPolicy, StealthRefused
from vmigdb.hv.qemu.driver import kvm_capabilities, tcg_capabilities
from vmigdb.rsp.session import Session
from vmigdb.wire import codec


def stopped(time_mode: str, mode: StealthMode) -> tuple[FakeDriver, Debugger, Session]:
    fake = FakeDriver(1, time_mode=time_mode)
    dbg = Debugger(fake, mode)
    dbg.resume({1: "c"})
    dbg.halt()
    return fake, dbg, Session(dbg)


def monitor(session: Session, command: bytes) -> str:
    replies = session.handle(b"qRcmd," + codec.encode_hex(command)).replies
    return b"".join(codec.decode_hex(r[1:]) for r in replies[:-1]).decode()


def test_declared_guest_time_per_mode() -> None:
    icount, host = tcg_capabilities("icount").guest_time, tcg_capabilities("host").guest_time
    assert (
        icount is not None
        and not icount.guest_visible
        and "retires no guest instruction" in icount.why
    )
    assert host is not None and host.guest_visible and "--time icount" in host.why
    assert ("guest time", host) in tcg_capabilities("host").all()
    kvm = kvm_capabilities()
    assert kvm.guest_time is None  # every KVM stop shows in its TSC: declared, not gated
    assert dict(kvm.all())["kvm-tsc"].guest_visible


@pytest.mark.parametrize(
    "packet", [b"Z0,%x,1" % KERNEL_VA, b"Z1,%x,1" % KERNEL_VA, b"Z2,%x,8" % KERNEL_VA]
)
def test_strict_refuses_breakpoints_under_host_time(packet: bytes) -> None:
    fake, _, session = stopped("host", StealthMode.STRICT)
    reply = session.handle(packet).replies[0]
    assert reply.startswith(b"E.") and b"host-paced guest time" in reply, reply
    assert b"refused by --stealth strict" in reply and b"--time icount" in reply
    assert not fake.installed


def test_strict_refuses_steps_under_host_time() -> None:
    _, dbg, _ = stopped("host", StealthMode.STRICT)
    with pytest.raises(StealthRefused, match="host-paced guest time"):
        dbg.resume({1: "s"})
    assert not dbg.running


def test_default_warns_once_under_host_time_and_says_so() -> None:
    fake, dbg, session = stopped("host", StealthMode.DEFAULT)
    assert session.handle(b"Z0,%x,1" % KERNEL_VA).replies == [b"OK"]
    assert session.handle(b"Z0,%x,1" % (KERNEL_VA + 8)).replies == [b"OK"]
    warning = dbg.policy.take_warnings()
    assert warning is not None and warning.count("warning") == 1
    assert "host-paced guest time" in warning and "--time icount" in warning
    text = monitor(session, b"stealth")
    assert "guest time: host-paced guest time (--time host)" in text
    assert "VISIBLE to the guest, in use" in text.split("guest time:")[1].splitlines()[0]


def test_icount_time_is_invisible_and_in_use_after_a_breakpoint() -> None:
    _, dbg, session = stopped("icount", StealthMode.STRICT)
    assert "instruction-counted guest time" in monitor(session, b"stealth")
    assert session.handle(b"Z0,%x,1" % KERNEL_VA).replies == [b"OK"]
    line = next(
        ln for ln in monitor(session, b"stealth").splitlines() if ln.startswith("  guest time:")
    )
    assert line.endswith("invisible, in use"), line
    assert dbg.policy.take_warnings() is None


def test_memory_reads_and_registers_never_touch_guest_time() -> None:
    policy = StealthPolicy(StealthMode.STRICT, tcg_capabilities("host"))
    caps = tcg_capabilities("host")
    policy.use("registers", caps.registers)
    policy.use("memory read", caps.memory_read)
    assert "guest time" not in policy.in_use


def test_stealth_lists_reads_and_writes_in_use_without_refusing_what_was_asked() -> None:
    _, dbg, session = stopped("icount", StealthMode.STRICT)
    assert session.handle(b"g").replies[0][:1] != b"E"
    assert session.handle(b"m%x,4" % KERNEL_VA).replies[0][:1] != b"E"
    assert session.handle(b"M%x,1:90" % KERNEL_VA).replies == [b"OK"]  # asked for: never refused
    in_use = {
        ln.split(":")[0].strip()
        for ln in monitor(session, b"stealth").splitlines()
        if ln.endswith(", in use")
    }
    assert {"registers", "memory read", "memory write"} <= in_use, in_use
    assert dbg.policy.take_warnings() is None


def test_monitor_stealth_says_what_strict_refused_since_gdb_hides_a_z_error() -> None:
    _, _, session = stopped("host", StealthMode.STRICT)
    for _ in range(2):  # the same refusal twice is listed once
        assert session.handle(b"Z0,%x,1" % KERNEL_VA).replies[0].startswith(b"E.")
    text = monitor(session, b"stealth")
    refused = text.split("refused (newest last):\n")[1].splitlines()
    assert len(refused) == 1, refused
    assert refused[0].startswith("  software breakpoint would need host-paced guest time")
    session.handle(b"Z1,%x,1" % KERNEL_VA)
    text = monitor(session, b"stealth")
    refused = text.split("refused (newest last):\n")[1].splitlines()
    assert [r.split(" would")[0] for r in refused] == [
        "  software breakpoint",
        "  hardware breakpoint",
    ]


def test_only_the_newest_five_refusals_are_kept() -> None:
    policy = StealthPolicy(StealthMode.STRICT, tcg_capabilities("icount"))
    visible = tcg_capabilities("host").guest_time
    assert visible is not None
    for i in range(7):
        with pytest.raises(StealthRefused):
            policy.use(f"job {i}", visible)
    assert [r.split(" would")[0] for r in policy.refusals] == [f"job {i}" for i in range(2, 7)]


def test_the_drivers_warnings_head_monitor_stealth() -> None:
    fake, _, session = stopped("icount", StealthMode.DEFAULT)
    assert "warning:" not in monitor(session, b"stealth")
    fake.warnings = lambda: ["CPU#1 still with paging off: restart with --time host"]  # type: ignore[method-assign]
    lines = monitor(session, b"stealth").splitlines()
    assert lines[1] == "warning: CPU#1 still with paging off: restart with --time host", lines
    assert lines[2] == "stealth: default", lines
