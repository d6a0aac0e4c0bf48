"""The channel to QEMU's gdbstub against a model of QEMU 7.2's byte handling: never out of step."""

from __future__ import annotations

import time

import pytest

from tests.unit.qemu_stub_model import QemuStubModel
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.hv.base import DriverError
from vmigdb.hv.qemu.channel import QemuChannel, ResumeRefused, is_stop_reply
from vmigdb.hv.qemu.driver import QemuDriver
from vmigdb.hv.qemu.gdbstub import GdbstubClient


@pytest.fixture
def model():
    stub = QemuStubModel()
    yield stub
    stub.close()


def channel_for(model: QemuStubModel, timeout: float = 2.0) -> QemuChannel:
    return QemuChannel(GdbstubClient(model.ours, timeout=timeout), timeout=timeout)


def wait_until(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stop_replies_are_told_apart_from_answers() -> None:
    for packet in (b"T05thread:01;", b"T02", b"S05", b"W00", b"X09"):
        assert is_stop_reply(packet)
    for packet in (b"OK", b"E22", b"", b"QC01", b"m01", b"l", b"0123ab", b"PacketSize=1000"):
        assert not is_stop_reply(packet)


def test_requests_are_refused_while_qemu_owes_a_stop(model: QemuStubModel) -> None:
    channel = channel_for(model)
    channel.resume(b"vCont;c")
    wait_until(lambda: model.running)
    with pytest.raises(DriverError, match="while the guest runs"):
        channel.request(b"Hg1")
    time.sleep(0.1)
    assert model.running, "a request reached QEMU and stopped the VM"
    assert model.received == [b"vCont;c"]


def test_a_stop_reply_in_place_of_an_answer_resynchronises(model: QemuStubModel) -> None:
    channel = channel_for(model)
    channel.resume(b"vCont;c")
    wait_until(lambda: model.running)
    channel.running = False  # the defect this guards against: vmigdb believes QEMU stopped
    assert channel.request(b"Hg2") == b"OK"  # answered after the resync, not with "T02"
    assert channel.resyncs == 1
    assert not model.running
    # and every later answer is the answer to its own request
    assert channel.request(b"qC").startswith(b"QC")
    assert channel.request(b"Hg1") == b"OK"
    assert channel.request(b"g") == b"00" * 608


def test_an_interrupt_qemu_never_answers_ends_in_a_resync(model: QemuStubModel) -> None:
    channel = channel_for(model)
    channel.resume(b"vCont;c")
    wait_until(lambda: model.running)
    model.silently_stop()  # QEMU stopped and will ignore 0x03: the old dead end
    channel.interrupt()
    stop = channel.wait_stop(0.5)
    assert is_stop_reply(stop)
    assert not channel.running and channel.resyncs == 1
    assert channel.request(b"Hg1") == b"OK"


def test_a_refused_resume_is_reported_not_waited_for(model: QemuStubModel) -> None:
    channel = channel_for(model)
    model.vcont_reply = b"E22"
    channel.resume(b"vCont;s:9")
    wait_until(lambda: model.received)
    time.sleep(0.05)
    with pytest.raises(ResumeRefused):
        channel.poll_stop()
    assert not channel.running
    assert channel.request(b"Hg1") == b"OK"


class _NoMemory:
    size = 0

    def read(self, pa: int, length: int) -> bytes:
        raise AssertionError("not used")


def test_a_single_step_qemu_left_armed_is_absorbed(model: QemuStubModel) -> None:
    """`vCont;s:1;c:2` ends with CPU 2's breakpoint: QEMU disarms only CPU 2, so CPU 1 would stop
    after one instruction of the next `continue`. The driver resumes it again by itself."""
    driver = QemuDriver(channel_for(model), _NoMemory(), "tcg", "host")
    driver._cpus = [1, 2]
    driver.resume({1: "s", 2: "c"})
    wait_until(lambda: model.running)
    model.hit(2)
    wait_until(lambda: (stop := driver.poll_stop()) is not None and remember(stop))
    assert remembered[-1].cpu == 2
    assert model.armed == {1}
    driver.resume({1: "c", 2: "c"})
    # the stale stop is absorbed: polled, resumed again, nothing for the debugger
    wait_until(lambda: driver.poll_stop() is None and model.received.count(b"vCont;c") == 2)
    assert model.running and model.armed == set()
    assert driver.leftover_steps == 1
    model.hit(2)
    wait_until(lambda: (stop := driver.poll_stop()) is not None and remember(stop))
    assert remembered[-1].cpu == 2 and remembered[-1].signal == 5


def test_a_stale_step_is_reported_when_an_interrupt_was_asked(model: QemuStubModel) -> None:
    driver = QemuDriver(channel_for(model), _NoMemory(), "tcg", "host")
    driver._cpus = [1, 2]
    driver.resume({1: "s", 2: "c"})
    wait_until(lambda: model.running)
    model.hit(2)
    wait_until(lambda: driver.poll_stop() is not None)
    driver.resume({1: "c", 2: "c"})
    driver.interrupt()
    stop = driver.wait_stop(2.0)
    assert stop.cpu == 1  # the stop that came first is the interrupt's answer
    assert driver.leftover_steps == 0


remembered: list = []


def remember(stop) -> bool:
    remembered.append(stop)
    return True


@pytest.mark.parametrize("was_running", [True, False])
def test_attaching_to_a_running_or_paused_vm_owes_nothing(
    model: QemuStubModel, was_running
) -> None:
    """QEMU sends a stop reply on connect only if the VM ran (CHR_EVENT_OPENED, vm_stop)."""
    if was_running:
        model.running = True
        model._stop(2, 2)  # what connecting did
    channel = channel_for(model)
    start = time.monotonic()
    stop = channel.attach()
    assert time.monotonic() - start < 1.0  # no timeout waited out, no resync
    assert stop == (b"T02thread:02;" if was_running else b"T05thread:01;")
    assert not channel.running and channel.resyncs == 0
    assert channel.request(b"Hg1") == b"OK"


def test_release_leaves_no_step_armed_and_no_breakpoint_held(model: QemuStubModel) -> None:
    """Giving an attached VM back: CPU 1's single-step, left armed when CPU 2 stopped first, is
    stepped off (else it would stop the VM with nobody attached); the breakpoint is removed; and
    QEMU's detach lets the VM run."""
    import threading

    from vmigdb.hv.base import BreakpointType

    driver = QemuDriver(channel_for(model), _NoMemory(), "tcg", "host")
    driver._cpus = [1, 2]
    driver.insert_breakpoint(BreakpointType.SOFTWARE, 0x1000, 1)
    driver.resume({1: "s", 2: "c"})
    wait_until(lambda: model.running)
    model.hit(2)
    wait_until(lambda: (stop := driver.poll_stop()) is not None and remember(stop))
    assert model.armed == {1}

    def step_lands() -> None:
        wait_until(lambda: model.running)
        model.hit(1)

    helper = threading.Thread(target=step_lands)
    helper.start()
    driver.release(run=True)
    helper.join()
    assert model.armed == set()
    assert b"vCont;s:1" in model.received and b"z0,1000,1" in model.received
    assert model.received[-1] == b"D" and model.running


class _HltAt:
    """Guest RAM holding one hlt, at 0x1000 (paging off: virtual = physical)."""

    def read(self, pa: int, length: int) -> bytes:
        return bytes(0xF4 if pa + i == 0x1000 else 0x90 for i in range(length))


@pytest.mark.parametrize(("time_mode", "cpus"), [("icount", 2), ("icount", 1), ("host", 2)])
def test_a_step_from_hlt_runs_timers_under_icount_on_several_vcpus(
    model: QemuStubModel, time_mode: str, cpus: int
) -> None:
    """icount's one-thread loop stops the VM clock while a NOTIMER step runs: with several vCPUs a
    step of a vCPU sleeping in HLT gets NOIRQ alone (0x3), any other step QEMU's default (0x7),
    which the VM is also left with; `monitor stealth` says so."""
    model.cpus = cpus
    driver = QemuDriver(channel_for(model), _HltAt(), "tcg", time_mode)
    driver.attach()
    rips = {1: 0x1001, 2: 0x2001}  # CPU 1 just past the hlt, CPU 2 elsewhere
    driver.read_registers = lambda cpu: RegisterFile.from_values({"rip": rips[cpu]})
    changed = time_mode == "icount" and cpus > 1
    step = driver.capabilities.single_step
    assert step is not None and ("step from hlt" in step.description) == changed

    def step_and_stop(actions: dict[int, str], cpu: int) -> None:
        driver.resume(actions)
        wait_until(lambda: model.running)
        model.hit(cpu)
        wait_until(lambda: driver.poll_stop() is not None)

    sent = lambda: [p for p in model.received if p.startswith(b"Qqemu.sstep=")]  # noqa: E731
    step_and_stop({1: "s", 2: "c"} if cpus > 1 else {1: "s"}, 1)
    assert sent() == ([b"Qqemu.sstep=3"] if changed else [])
    if cpus > 1:
        step_and_stop({1: "c", 2: "s"}, 2)
    assert sent() == ([b"Qqemu.sstep=3", b"Qqemu.sstep=7"] if changed else [])
    if cpus > 1:
        step_and_stop({1: "s", 2: "c"}, 1)
    driver.release(run=True)
    assert sent() == ([b"Qqemu.sstep=3", b"Qqemu.sstep=7"] * 2 if changed else [])
