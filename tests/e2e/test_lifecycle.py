"""How vmigdb starts, fails and ends: clear errors, nothing left behind, no orphaned QEMU."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Vm, free_port
from tests.e2e.test_gdb_session import ticker_rounds
from vmigdb.hv.qemu import workdir

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def run_vmigdb(*args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "vmigdb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def qemu_of(vm: Vm) -> int:
    kids = [p for p in children(vm.proc.pid) if "qemu" in Path(f"/proc/{p}/comm").read_text()]
    assert len(kids) == 1, kids
    return kids[0]


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("vmigdb-")}


# Who holds the stop when vmigdb dies: QEMU's gdbstub, or vmigdb's plugin (a vCPU blocked in a
# callback inside QEMU, which must not keep QEMU alive).
HOLDERS = {"gdbstub": (), "plugin": ("monitor plugin-breakpoints on",)}


@pytest.mark.parametrize("holder", HOLDERS)
def test_sigkill_of_vmigdb_takes_qemu_down_and_leaves_no_ram_file(
    tmp_path, guest_image, holder
) -> None:
    before = shm_files()
    vm = Vm(tmp_path, guest_image.kernel, guest_image.initrd)
    qemu = qemu_of(vm)
    # GDB stays connected at the hit (it sleeps), so vmigdb dies while the stop is held.
    getpid = vm.ksyms["__x64_sys_getpid"]
    argv = vm.gdb_argv(
        *HOLDERS[holder], f"break *{getpid:#x}", "continue", "echo HELD\\n", "shell sleep 120"
    )
    gdb = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        while "HELD" not in seen:
            line = gdb.stdout.readline()
            assert line, f"GDB ended before the hit: {seen}"
            seen += line
        assert "Breakpoint 1," in seen, seen
        vm.proc.kill()
        vm.proc.wait()
        assert wait_gone(qemu), "QEMU outlived vmigdb"
    finally:
        gdb.kill()
        gdb.wait()
    assert shm_files() <= before
    # Its work directory (QEMU's logs) stays behind, and the next start sweeps it away.
    m = re.search(r"workdir (\S+)", vm.stderr())
    assert m, vm.stderr()
    left = Path(m.group(1))
    assert (left / "qemu.stderr").exists()
    assert left in workdir.sweep_stale(left.parent) and not left.exists()


def test_qemu_dying_ends_the_gdb_session_and_vmigdb_with_its_last_words(tmp_path, guest_image):
    vm = Vm(tmp_path, guest_image.kernel, guest_image.initrd)
    qemu = qemu_of(vm)
    gdb = subprocess.Popen(
        ["gdb", "-nx", "-batch", "-ex", f"target remote {vm.address}", "-ex", "continue"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Kill QEMU only once GDB waits in `continue`: it has connected (the guest halted) and the
    # guest runs again. Two more ticker rounds: one could slip out before the halt. (A fixed
    # sleep was not enough on a loaded machine, where reading the symbol file takes longer.)
    vm.wait_for(lambda: "GDB connected" in vm.stderr(), 60, "GDB to connect")
    start = ticker_rounds(vm)
    vm.wait_for(lambda: ticker_rounds(vm) >= start + 2, 120, "the guest to run again")
    os.kill(qemu, signal.SIGTERM)
    out, _ = gdb.communicate(timeout=60)
    assert re.search(r"exited (normally|with code)", out), out
    assert vm.proc.wait(30) != 0
    assert "QEMU exited" in vm.stderr()
    assert "terminating on signal" in vm.stderr(), vm.stderr()  # QEMU's own words


def test_gdb_kill_powers_the_guest_off_and_vmigdb_exits(tmp_path, guest_image) -> None:
    vm = Vm(tmp_path, guest_image.kernel, guest_image.initrd)
    qemu = qemu_of(vm)
    out = vm.gdb("kill")
    assert "[Inferior 1 (Remote target) killed]" in out, out
    assert wait_gone(qemu)
    assert vm.proc.wait(30) == 0


def test_unix_socket_listener_is_owner_only(tmp_path, guest_image) -> None:
    path = tmp_path / "vmigdb.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmigdb",
            "qemu",
            "--kernel",
            str(guest_image.kernel),
            "--initrd",
            str(guest_image.initrd),
            "--listen",
            f"unix:{path}",
            "--serial",
            str(tmp_path / "console.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert "listening on unix:" in proc.stdout.readline()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        out = subprocess.run(
            ["gdb", "-nx", "-batch", "-ex", f"target remote {path}", "-ex", "info registers rip"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert re.search(r"^rip\s+0x", out, re.M), out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0
    assert not path.exists()


def test_port_taken_is_one_line_with_the_fix(guest_image) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        result = run_vmigdb(
            "qemu", "--kernel", str(guest_image.kernel), "--listen", f"127.0.0.1:{port}"
        )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "already in use" in result.stderr and "--listen" in result.stderr


def test_missing_kernel_and_missing_qemu_are_one_line_errors(tmp_path, guest_image) -> None:
    result = run_vmigdb(
        "qemu", "--kernel", str(tmp_path / "nope"), "--listen", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2
    assert "nope" in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr

    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    result = run_vmigdb(
        "qemu", "--kernel", str(guest_image.kernel), "--listen", f"127.0.0.1:{free_port()}", env=env
    )
    assert result.returncode == 2
    assert "apt-get install qemu-system-x86" in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_non_loopback_listen_needs_allow_remote(guest_image) -> None:
    result = run_vmigdb("qemu", "--kernel", str(guest_image.kernel), "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr
