"""The clients reversers use, against the live demo guest: LLDB 16, Ghidra's ghidragdb plugin in
GDB (with a stand-in for Ghidra), the packets and QEMU monitor commands GEF and pwndbg use
(checked against QEMU's own monitor on the same stopped machine), and IDA's and radare2's packet
sequences over TCP.

Ground truth comes from outside vmigdb: the guest's console (kernel symbol addresses it printed,
the ticker's buffer address and contents) and QEMU's own human monitor over a second QMP socket.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.client_sequences import ida_connect, radare2_connect, radare2_read
from tests.e2e.conftest import ROOT, Vm, boot
from tests.e2e.mi import Gdb
from vmigdb.wire.client import RspClient

pytestmark = pytest.mark.e2e

LLDB = shutil.which("lldb-16")


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    qmp_path = tmp_path_factory.mktemp("qmp") / "test-qmp.sock"
    for machine in boot(
        tmp_path_factory,
        guest_image,
        smp=2,
        append="vmigdb.programs=ticker,probe vmigdb.ksyms=jiffies_64",
        extra=("--", "-qmp", f"unix:{qmp_path},server=on,wait=off"),
    ):
        machine.qmp_path = qmp_path
        yield machine


def qemu_monitor(vm: Vm, *commands: str) -> list[str]:
    """QEMU's own human monitor (its current CPU is CPU#0), for comparison."""
    qmp = QEMUMonitorProtocol(str(vm.qmp_path))
    qmp.connect()
    try:
        return [
            qmp.cmd_raw("human-monitor-command", {"command-line": c})["return"] for c in commands
        ]
    finally:
        qmp.close()


def ticker(vm: Vm) -> tuple[int, int]:
    match = re.search(r"ticker pid=(\d+) buf=(0x[0-9a-f]+)", vm.console())
    assert match, vm.console()[-2000:]
    return int(match.group(1)), int(match.group(2), 16)


def ticker_buffer(pid: int) -> bytes:
    """What the ticker keeps in its buffer (vmigdb/images/programs/ticker.c)."""
    return (
        b"TICK" + pid.to_bytes(4, "little") + (~pid & 0xFFFF_FFFF).to_bytes(4, "little") + b"KCIT"
    )


def pid_of(vm: Vm, name: str) -> int:
    return int(re.search(rf"started {name}\S* pid=(\d+)", vm.console()).group(1))


# -- what GEF and pwndbg use ----------------------------------------------------------------------


@pytest.fixture
def stopped(vm: Vm):
    """GDB attached (the machine stopped) with CPU#0 selected, as QEMU's monitor has it."""
    gdb = Gdb(vm.address)
    try:
        gdb.console_cmd("thread 1")
        gdb.value("$rip")  # makes GDB select CPU#0 on the wire (Hg1) for monitor commands
        yield gdb
    finally:
        gdb.cmd("-target-detach")
        gdb.close()


def test_info_mem_and_tlb_equal_qemus_own(vm: Vm, stopped: Gdb) -> None:
    ours_mem = stopped.console_cmd("monitor info mem")
    ours_tlb = stopped.console_cmd("monitor info tlb")
    theirs_mem, theirs_tlb = qemu_monitor(vm, "info mem", "info tlb")
    assert ours_mem.replace("\r", "") == theirs_mem.replace("\r", "")
    assert ours_tlb.replace("\r", "") == theirs_tlb.replace("\r", "")
    assert ours_tlb.count("\n") > 1000 and "urw" in ours_mem  # a user process and the kernel


def test_xp_x_gva2gpa_and_registers_equal_qemus_own(vm: Vm, stopped: Gdb) -> None:
    banner = vm.ksyms["linux_banner"]
    commands = [f"x /24xb {banner:#x}", f"x /4xg {banner:#x}", f"gva2gpa {banner:#x}"]
    ours = [stopped.console_cmd(f"monitor {c}") for c in commands]
    pa = int(re.search(r"gpa: (0x[0-9a-f]+)", ours[2]).group(1), 16)
    ours.append(stopped.console_cmd(f"monitor xp /3c {pa:#x}"))
    ours_regs = stopped.console_cmd("monitor info registers")
    theirs = qemu_monitor(vm, *commands, f"xp /3c {pa:#x}", "info registers")
    for mine, qemus in zip(ours, theirs, strict=False):
        assert mine.replace("\r", "") == qemus.replace("\r", "")
    qemu_lines = theirs[-1].replace("\r", "").splitlines()
    for line in ours_regs.splitlines():
        if line.startswith("RIP="):  # QEMU adds II, A20, SMM and HLT, which vmigdb cannot read
            assert any(q.startswith(line + " ") for q in qemu_lines), (line, qemu_lines[:6])
        else:
            assert line in qemu_lines, (line, qemu_lines)


def test_gef_and_pwndbg_see_a_qemu_system_target(vm: Vm, tmp_path: Path) -> None:
    """Their probes (`maintenance packet`), then GEF's `remote get` of the process files."""
    out = vm.gdb(
        "maintenance packet Qqemu.sstepbits",
        "maintenance packet qOffsets",
        "maintenance packet qSupported",
        *[f"remote get /proc/42000/{f} {tmp_path / f}" for f in ("exe", "maps", "cmdline")],
        "monitor info mem",
        "monitor process probe",
        f"remote get /proc/{pid_of(vm, 'probe')}/maps {tmp_path / 'probe-maps'}",
        "monitor info mem",
        "monitor chardev-add file,id=x,path=/tmp/x",
        "detach",
    )
    assert 'received: "ENABLE=1,NOIRQ=2,NOTIMER=4"' in out
    assert 'received: ""' in out  # qOffsets: system mode
    assert "exec-file" in out  # pwndbg's exec_file_supported
    assert (tmp_path / "exe").read_bytes()[:4] == b"\x7fELF"
    assert (tmp_path / "cmdline").read_bytes() == b""
    maps = [line.split()[:2] for line in (tmp_path / "maps").read_text().splitlines()]
    assert maps and all(perms[0] == "r" for _, perms in maps)
    info_mem = re.findall(r"^([0-9a-f]{16})-([0-9a-f]{16}) [0-9a-f]{16} ([u-])r([w-])$", out, re.M)
    machine_mem, probe_mem = info_mem[: len(info_mem) // 2], info_mem[len(info_mem) // 2 :]
    # /proc maps splits QEMU's ranges where NX changes: the same addresses, covered the same way
    starts = {int(a.split("-")[0], 16) for a, _ in maps}
    ends = {int(a.split("-")[1], 16) for a, _ in maps}
    for start, end, _, _ in machine_mem:
        assert int(start, 16) & ((1 << 64) - 1) in starts and int(end, 16) in ends
    probe_maps = (tmp_path / "probe-maps").read_text().splitlines()
    user_ranges = [(s, e) for s, e, u, _ in probe_mem if u == "u"]
    # the process's own maps: its user ranges, as `info mem` shows them under its scope
    assert probe_maps
    assert {int(line.split("-")[0], 16) for line in probe_maps} >= {
        int(s, 16) for s, _ in user_ranges
    }
    assert {int(line.split()[0].split("-")[1], 16) for line in probe_maps} >= {
        int(e, 16) for _, e in user_ranges
    }
    assert "would change the machine" in out  # pt_gdb's chardev-add is refused, not passed on


# -- LLDB -----------------------------------------------------------------------------------------


def lldb(commands: list[str], timeout: float = 240) -> str:
    argv = [LLDB, "--batch", "-o", "settings set interpreter.stop-command-source-on-error false"]
    for command in commands:
        argv += ["-o", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return result.stdout + result.stderr


@pytest.mark.skipif(LLDB is None, reason="lldb-16 is not installed (scripts/setup installs it)")
def test_lldb_session(vm: Vm, tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux.elf"
    subprocess.run(
        [sys.executable, "-m", "vmigdb", "symbols", "--out", str(elf), "--from", vm.address],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    getpid, banner, jiffies = (
        vm.ksyms[name] for name in ("__x64_sys_getpid", "linux_banner", "jiffies_64")
    )
    pid, buf = ticker(vm)
    out = lldb(
        [
            f"gdb-remote {vm.address}",
            f"target modules add {elf}",
            "target modules load --file vmlinux.elf --slide 0",
            "thread list",
            "thread select 2",
            "register read rip cr3",
            "thread select 1",
            "image lookup -n __x64_sys_getpid",
            f"memory region {getpid:#x}",
            "memory region 0x10",
            f"breakpoint set -a {getpid:#x}",
            "continue",
            "register read rip",
            "thread step-inst",
            "register read rip",
            "breakpoint delete 1",
            f"memory read -f s {banner:#x}",
            "process plugin packet monitor ps",
            f"process plugin packet monitor process {pid}",
            f"memory read -s1 -fx -c16 {buf:#x}",
            "process plugin packet monitor process all",
            f"watchpoint set expression -w write -s 8 -- {jiffies:#x}",
            "continue",
            "watchpoint delete 1",
            "process detach",
        ]
    )
    # Both vCPUs are threads. LLDB numbers threads (and names the process, from qC) after the
    # stop it attached on, and QEMU 10 may halt either vCPU first: no number is assumed.
    assert re.search(r"thread #\d: tid = 0x0001", out), out
    assert re.search(r"thread #\d: tid = 0x0002", out), out
    assert re.search(r"cr3 = 0x[0-9a-f]{16}", out), out
    assert re.search(rf"Address: vmlinux.elf\[{getpid:#018x}\]", out), out
    region = re.search(r"\[(0x[0-9a-f]+)-(0x[0-9a-f]+)\) r-x", out)  # kernel text, from page tables
    assert region and int(region.group(1), 16) <= getpid < int(region.group(2), 16), out
    assert "[0x0000000000000000-0x" in out and ") ---" in out  # the unmapped bottom of memory
    rips = [int(x, 16) for x in re.findall(r"rip = (0x[0-9a-f]+)", out)]
    assert rips[-2:] == [getpid, getpid + 5], out  # the breakpoint, then one nopl of 5 bytes
    assert "stop reason = breakpoint 1.1" in out and "stop reason = instruction step into" in out
    assert re.search(r"frame #0: 0x[0-9a-f]+ vmlinux.elf`\S+", out), out
    release = re.search(r"vmigdb-guest: release (\S+)", vm.console()).group(1)
    assert f'"Linux version {release} ' in out
    assert re.search(rf"^\s+{pid}\s+1 ticker ", out, re.M), out
    row = r"((?:0x[0-9a-f]{2} ?){8})"
    dumped = re.search(rf"0x0*{buf:x}: {row}\n0x[0-9a-f]+: {row}", out)
    assert dumped, out
    raw = bytes(int(b, 16) for b in (dumped.group(1) + " " + dumped.group(2)).split())
    assert raw == ticker_buffer(pid)
    watch = re.search(r"old value: (\w+)\s+new value: (\w+)", out)
    assert watch and int(watch.group(2), 0) > int(watch.group(1), 0), out
    assert "stop reason = watchpoint 1" in out
    assert re.search(r"Process \d+ detached", out), out
    assert "would change" not in vm.stderr() and "kill" not in vm.stderr().lower().replace(
        "lldb sent k", ""
    )


@pytest.mark.skipif(LLDB is None, reason="lldb-16 is not installed (scripts/setup installs it)")
def test_quitting_lldb_leaves_the_guest_running(vm: Vm) -> None:
    """LLDB 16 sends k when it quits after gdb-remote; vmigdb detaches instead of powering off."""
    out = lldb([f"gdb-remote {vm.address}", "register read rip"])
    assert "rip = 0x" in out
    time.sleep(0.5)
    assert vm.proc.poll() is None, vm.stderr()
    assert "LLDB sent k" in vm.stderr()
    start = len(vm.console())
    vm.wait_console(r"ticker pid=\d+ round=\d+", 30, after=start)  # the guest runs on
    assert "rip" in vm.gdb("info registers rip")  # and takes the next client


# -- Ghidra's GDB plugin --------------------------------------------------------------------------


def test_ghidragdb_traces_registers_and_memory(vm: Vm) -> None:
    ghidratrace = pytest.importorskip("ghidratrace")
    from tests.e2e.trace_rmi import FakeGhidra

    site = str(Path(ghidratrace.__file__).resolve().parents[1])
    ghidra = FakeGhidra()
    try:
        out = vm.gdb(
            f"python import sys; sys.path.insert(0, {site!r})",
            "python import ghidragdb",
            f"ghidra trace connect {ghidra.address}",
            "ghidra trace start",
            "ghidra trace tx-start init",
            "ghidra trace put-all",
            "ghidra trace putmem $rsp 64",
            "ghidra trace tx-commit",
            "p/x $rip",
            "p/x $rsp",
            "p/x $cr3",
            "x/2xg $rsp",
            "ghidra trace disconnect",
            "detach",
        )
    finally:
        ghidra.close()
    assert "Connected to vmigdb test stand-in for Ghidra" in out, out
    values = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.M)]
    rip, rsp, cr3 = values
    create = next(ghidra.of_kind("request_create_trace"))
    assert create.language.id == "x86:LE:64:default"
    traced = ghidra.registers()
    assert (traced["rip"], traced["rsp"], traced["cr3"]) == (rip, rsp, cr3)
    words = [int(w, 16) for w in re.findall(r"\t(0x[0-9a-f]+)", out)[-2:]]
    memory = ghidra.memory()
    page = memory[rsp & ~0xFFF]
    offset = rsp & 0xFFF
    assert page[offset : offset + 16] == b"".join(w.to_bytes(8, "little") for w in words)
    assert (rip & ~0xFFF) in memory  # put-all traces the page at $pc too


# -- IDA and radare2, replayed over TCP -----------------------------------------------------------


def rsp(vm: Vm) -> RspClient:
    host, port = vm.address.split(":")
    return RspClient.connect_tcp(host, int(port), timeout=30)


def test_radare2_sequence_on_the_live_guest(vm: Vm) -> None:
    client = rsp(vm)
    try:
        learned = radare2_connect(client.request)
        banner = vm.ksyms["linux_banner"]
        data = radare2_read(client.request, banner, 0x400 + 0x21, learned["pkt_sz"])
        assert data.startswith(b"Linux version ")
        getpid = vm.ksyms["__x64_sys_getpid"]
        assert client.request(b"Z0,%x,1" % getpid) == b"OK"
        stop = client.request(b"vCont;c")
        assert stop.startswith(b"T05") and b"swbreak" in stop
        tid = int(re.search(rb"thread:([0-9a-f]+);", stop).group(1), 16)
        assert client.request(b"Hg%x" % tid) == b"OK"
        assert int.from_bytes(bytes.fromhex(client.request(b"p10").decode()), "little") == getpid
        assert client.request(b"z0,%x,1" % getpid) == b"OK"
        assert client.request(b"vCont;s:%x" % tid).startswith(b"T05")
        rip = int.from_bytes(bytes.fromhex(client.request(b"p10").decode()), "little")
        assert rip == getpid + 5
        assert client.request(b"D") == b"OK"
    finally:
        client.close()


def test_ida_sequence_on_the_live_guest(vm: Vm) -> None:
    client = rsp(vm)
    try:
        learned = ida_connect(client.request, bare_qsupported=True)
        assert learned["tids"] == [1, 2]
        banner = vm.ksyms["linux_banner"]
        data = b""
        while len(data) < 2048:
            size = min(learned["max_read"], 2048 - len(data))
            data += bytes.fromhex(client.request(b"m%x,%x" % (banner + len(data), size)).decode())
        assert data.startswith(b"Linux version ")
        assert client.request(b"D") == b"OK"
    finally:
        client.close()
