"""Tasks, page tables, current task and modules of the real demo guest, read from its RAM alone.

The guest boots without vmigdb's server (two vCPUs, KASLR on) running ticker and two spin
copies. Ground truth is its own console: ``started NAME pid=N``, what the programs print about
themselves (the ticker's buffer address and contents), and init's ``task PID PPID COMM`` list
from /proc. The guest is paused through QEMU's gdbstub while memory is read (QEMU stops the VM
when a client connects and resumes it on detach), which also gives each vCPU's registers.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vmigdb.arch.x86_64.paging import Translator
from vmigdb.arch.x86_64.registers import RegisterFile
from vmigdb.guest.linux.guest import LinuxGuest
from vmigdb.guest.linux.modules import module_symbols, modules
from vmigdb.guest.linux.tasks import (
    CR3_PGD_MASK,
    current_task,
    find_task,
    find_tasks,
    for_each_task,
    read_task,
    task_cr3,
    task_pgd,
)
from vmigdb.hv.qemu.channel import QemuChannel
from vmigdb.hv.qemu.gdbstub import GdbstubClient
from vmigdb.hv.qemu.process import QemuConfig, QemuProcess
from vmigdb.wire.codec import decode_hex

pytestmark = pytest.mark.e2e

if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("needs qemu-system-x86", allow_module_level=True)

BOOT_TIMEOUT = 120.0
PROGRAMS = "ticker,spin:1111,spin:2222"


@dataclass
class Truth:
    started: dict[str, int]  # spec -> pid
    ticker_buf: int
    ticker_value: bytes
    tasks: dict[int, tuple[int, str]]  # pid -> (ppid, comm), from the guest's /proc


class Paused:
    """The VM stopped by QEMU's gdbstub for as long as the block runs; vCPU registers on demand."""

    def __init__(self, proc: QemuProcess) -> None:
        self.client = GdbstubClient.connect(proc.gdb_socket)

    def __enter__(self) -> Paused:
        # QEMU stops the VM on connect; 7.2 says so (T02), 10 does not. The channel syncs on a
        # sentinel either way (asking `?` alone races with 7.2's stop: every later reply off by one).
        QemuChannel(self.client).attach()
        return self

    def registers(self) -> list[RegisterFile]:
        cpus: list[int] = []
        reply = self.client.request(b"qfThreadInfo")
        while reply.startswith(b"m"):
            cpus += [int(t.split(b".")[-1], 16) for t in reply[1:].split(b",") if t]
            reply = self.client.request(b"qsThreadInfo")
        out = []
        for cpu in cpus:
            assert self.client.request(b"Hg%x" % cpu) == b"OK"
            out.append(RegisterFile.from_qemu_g(decode_hex(self.client.request(b"g"))))
        return out

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.request(b"D")  # detach: QEMU resumes the VM
        finally:
            self.client.close()


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QemuProcess, Truth]]:
    from vmigdb.images.build import build_guest, demo_append

    image = build_guest()
    console = tmp_path_factory.mktemp("tasks") / "console.log"
    proc = QemuProcess.start(
        QemuConfig(
            kernel=image.kernel,
            initrd=image.initrd,
            memory_mib=512,
            smp=2,
            serial=console,
            append=demo_append("vmigdb.programs=" + PROGRAMS),
        )
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        text = ""
        while "vmigdb-guest: tasks-end" not in text:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"guest did not boot: {proc.last_words()}")
            time.sleep(0.2)
            text = console.read_text(errors="replace") if console.exists() else ""
        started = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"vmigdb-guest: started (\S+) pid=(\d+)", text)
        }
        ticker = re.search(r"ticker pid=\d+ buf=0x([0-9a-f]+) value=([0-9a-f]{32})", text)
        assert ticker is not None, text[-2000:]
        tasks = {
            int(m.group(1)): (int(m.group(2)), m.group(3))
            for m in re.finditer(r"vmigdb-guest: task (\d+) (\d+) (.*)", text)
        }
        truth = Truth(started, int(ticker.group(1), 16), bytes.fromhex(ticker.group(2)), tasks)
        yield proc, truth
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def guest(booted: tuple[QemuProcess, Truth]) -> LinuxGuest:
    proc, _ = booted
    t0 = time.perf_counter()
    g = LinuxGuest.attach(proc.memory.read, proc.memory.ranges())
    t1 = time.perf_counter()
    g.btf  # noqa: B018 - parse BTF now so the timings below are of the walk alone
    print(f"\nattach {(t1 - t0) * 1000:.0f} ms, BTF {(time.perf_counter() - t1) * 1000:.0f} ms")
    return g


def test_task_list_matches_the_guests_proc(booted, guest: LinuxGuest) -> None:
    proc, truth = booted
    with Paused(proc):
        guest.refresh()
        tl = time.perf_counter()
        find_task(guest, 0)  # derives the layout from BTF, once per guest
        t0 = time.perf_counter()
        tasks = list(for_each_task(guest))
        t1 = time.perf_counter()
        threads = list(for_each_task(guest, threads=True))
        t2 = time.perf_counter()
    print(
        f"\nlayout from BTF {(t0 - tl) * 1000:.1f} ms; for_each_task: {len(tasks)} processes in "
        f"{(t1 - t0) * 1000:.1f} ms (cold page-walk cache), "
        f"{len(threads)} threads in {(t2 - t1) * 1000:.1f} ms"
    )
    by_pid = {t.pid: t for t in tasks}
    assert len(by_pid) == len(tasks), "a pid listed twice"
    assert all(t.is_thread_leader and t.pid == t.tgid for t in tasks)

    init = by_pid[1]
    assert init.comm == "init" and init.ppid == 0 and init.mm != 0
    kthreadd = by_pid[2]
    assert (kthreadd.comm, kthreadd.ppid, kthreadd.mm) == ("kthreadd", 0, 0)
    for spec, pid in truth.started.items():
        task = by_pid[pid]
        assert task.comm == spec.split(":")[0], spec
        assert task.ppid == 1 and task.mm != 0, spec
        assert task.state in "RS", spec
    kernel_threads = [t for t in tasks if t.ppid == 2]
    assert len(kernel_threads) > 10
    assert all(t.mm == 0 for t in kernel_threads)
    assert any(t.state == "I" for t in kernel_threads)  # idle kworkers (TASK_IDLE)

    # The guest's own /proc, a second after boot: every process still there must agree.
    stable = {pid: v for pid, v in truth.tasks.items() if pid in by_pid}
    assert len(stable) >= 0.9 * len(truth.tasks), sorted(set(truth.tasks) - set(by_pid))
    assert {pid: by_pid[pid].ppid for pid in stable} == {pid: v[0] for pid, v in stable.items()}
    for pid, (ppid, comm) in stable.items():
        # /proc shows a kernel thread's full name (v5.17, commit d6986ce24fc0) and a kworker's
        # current workqueue ("kworker/0:0-events"); task->comm is the first 15 characters.
        if ppid == 2 or pid == 2:
            assert comm.startswith(by_pid[pid].comm) and by_pid[pid].comm, (pid, comm)
        else:
            assert by_pid[pid].comm == comm, (pid, comm)
    assert set(truth.started.values()) <= set(stable)
    # Single-threaded guest: threads=True adds nothing but the same tasks in the same order.
    assert [t.pid for t in threads] == [t.pid for t in tasks]
    assert t1 - t0 < 0.5  # target well under 100 ms; generous for a loaded host


def test_timing(booted, guest: LinuxGuest) -> None:
    proc, _ = booted
    with Paused(proc):
        guest.refresh()
        list(for_each_task(guest))
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            n = sum(1 for _ in for_each_task(guest, threads=True))
            runs.append(time.perf_counter() - t0)
    print(f"\nfor_each_task(threads=True): {n} tasks in {min(runs) * 1000:.2f} ms (best of 5)")
    assert min(runs) < 0.1


def test_find_task_and_find_tasks(booted, guest: LinuxGuest) -> None:
    proc, truth = booted
    with Paused(proc):
        guest.refresh()
        ticker = find_task(guest, truth.started["ticker"])
        assert ticker is not None and ticker.comm == "ticker"
        assert find_task(guest, truth.started["spin:2222"]).comm == "spin"  # type: ignore[union-attr]
        assert find_task(guest, 999_999) is None
        swapper = find_task(guest, 0)
        assert swapper is not None and swapper.comm == "swapper/0" and swapper.mm == 0
        spins = find_tasks(guest, "spin")
        assert sorted(t.pid for t in spins) == sorted(
            [truth.started["spin:1111"], truth.started["spin:2222"]]
        )
        assert read_task(guest, ticker.address) == ticker
        assert task_pgd(guest, find_task(guest, 2)) is None  # type: ignore[arg-type]
        assert task_cr3(guest, find_task(guest, 2)) is None  # type: ignore[arg-type]


def test_process_memory_through_its_own_page_tables(booted, guest: LinuxGuest) -> None:
    proc, truth = booted
    with Paused(proc):
        guest.refresh()
        ticker = find_task(guest, truth.started["ticker"])
        spin1 = find_task(guest, truth.started["spin:1111"])
        spin2 = find_task(guest, truth.started["spin:2222"])
        assert ticker and spin1 and spin2
        cr3s = [task_cr3(guest, t) for t in (ticker, spin1, spin2)]
        pgd = task_pgd(guest, ticker)
        data = Translator(proc.memory.read).read_virtual(
            cr3s[0],  # type: ignore[arg-type]
            truth.ticker_buf,
            16,
            guest.kernel.paging_mode,
        )
    print(f"\ncr3 ticker {cr3s[0]:#x} spins {cr3s[1]:#x} {cr3s[2]:#x}, pgd {pgd:#x}")
    assert len(set(cr3s)) == 3
    assert all(c is not None and c & 0xFFF == 0 for c in cr3s)
    assert pgd is not None and pgd - guest.kernel.page_offset_base == cr3s[0]
    assert data == truth.ticker_value


def test_current_task_of_each_vcpu(booted, guest: LinuxGuest) -> None:
    """Pause repeatedly until vCPUs were caught both in user mode (current task from
    KERNEL_GS_BASE; its page tables must be in CR3) and in kernel mode (from GS_BASE)."""
    proc, _ = booted
    seen: dict[str, set[str]] = {"user": set(), "kernel": set()}
    for _ in range(50):
        with Paused(proc) as paused:
            guest.refresh()
            pids = {t.pid for t in for_each_task(guest, threads=True)}
            for regs in paused.registers():
                cs, cr3 = regs["cs"], regs["cr3"]
                task = current_task(guest, regs["gs_base"], regs["k_gs_base"], cs)
                assert task is not None, f"cs={cs:#x} gs={regs['gs_base']:#x}"
                if cs & 3 == 3:
                    assert task.mm and task.pid in pids
                    assert cr3 & CR3_PGD_MASK == task_cr3(guest, task), task
                    seen["user"].add(task.comm)
                elif task.pid == 0:
                    assert re.fullmatch(r"swapper/\d+", task.comm), task
                    seen["kernel"].add(task.comm)
                else:
                    assert task.pid in pids, task
                    seen["kernel"].add(task.comm)
        if seen["user"] and seen["kernel"]:
            break
        time.sleep(0.05)
    print(f"\ncurrent tasks seen: {seen}")
    assert seen["user"] <= {"ticker", "spin", "init", "sleep", "sh"}
    assert seen["user"] and seen["kernel"]


def test_modules_is_a_list(booted, guest: LinuxGuest) -> None:
    proc, _ = booted
    with Paused(proc):
        guest.refresh()
        t0 = time.perf_counter()
        mods = modules(guest)
        elapsed = time.perf_counter() - t0
        symbols = [module_symbols(guest, m) for m in mods]
    print(f"\nmodules: {len(mods)} in {elapsed * 1000:.2f} ms: {[m.name for m in mods]}")
    assert isinstance(mods, list)
    for m, syms in zip(mods, symbols, strict=True):
        assert m.name and m.base >> 63 and m.size > 0
        assert all(isinstance(name, str) for name, _, _ in syms)
