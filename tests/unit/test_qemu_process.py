"""Unit tests for the QEMU launcher: accelerator choice, RAM layout, command line, pre-flight.

Nothing here boots QEMU (see tests/e2e/test_qemu_launch.py for that).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from vmigdb.arch.x86_64.paging import PhysicalMemoryError
from vmigdb.errors import SetupError
from vmigdb.hv.qemu import accel as accel_mod
from vmigdb.hv.qemu import process as process_mod
from vmigdb.hv.qemu.accel import host_has_hw_virt, resolve_accel
from vmigdb.hv.qemu.memory import FOUR_GIB, PhysicalMemory, pc_below_4g
from vmigdb.hv.qemu.process import QemuConfig, QemuProcess, build_command_line

GIB = 1 << 30
MIB = 1 << 20

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr vmx ssse3 sse4_1 sse4_2
bugs\t\t: spectre_v1
"""
AMD = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr svm lahf_lm\n"
NONE = (
    "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae hypervisor\n"
    "vmx flags\t: vnmi preemption_timer\n"  # a 'vmx flags' line is not the flags line
)


# --- accelerator -------------------------------------------------------------------------------


def test_hw_virt_from_cpuinfo() -> None:
    assert host_has_hw_virt(INTEL)
    assert host_has_hw_virt(AMD)
    assert not host_has_hw_virt(NONE)
    assert not host_has_hw_virt("")
    assert not host_has_hw_virt("flags\t: fpu vmxx svm2\n")


@pytest.fixture
def rw_device(tmp_path: Path) -> str:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return str(dev)


def test_resolve_auto(rw_device: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nokvm")
    assert resolve_accel("auto", cpuinfo_text=INTEL, kvm_device=rw_device) == "kvm"
    assert resolve_accel("auto", cpuinfo_text=AMD, kvm_device=rw_device) == "kvm"
    # A /dev/kvm alone is not proof (paravirtual KVM without vmx/svm cannot run normal guests).
    assert resolve_accel("auto", cpuinfo_text=NONE, kvm_device=rw_device) == "tcg"
    assert resolve_accel("auto", cpuinfo_text=INTEL, kvm_device=missing) == "tcg"


def test_resolve_explicit(rw_device: str, tmp_path: Path) -> None:
    assert resolve_accel("tcg", cpuinfo_text=INTEL, kvm_device=rw_device) == "tcg"
    assert resolve_accel("kvm", cpuinfo_text=INTEL, kvm_device=rw_device) == "kvm"
    with pytest.raises(SetupError, match="--accel tcg"):
        resolve_accel("kvm", cpuinfo_text=NONE, kvm_device=rw_device)
    with pytest.raises(SetupError, match="--accel tcg"):
        resolve_accel("kvm", cpuinfo_text=INTEL, kvm_device=str(tmp_path / "nokvm"))
    with pytest.raises(SetupError, match="auto, tcg or kvm"):
        resolve_accel("hvf")


def test_resolve_on_this_host() -> None:
    # Whatever the host, auto gives an accelerator QEMU knows, and only kvm with vmx/svm.
    got = resolve_accel("auto")
    assert got in ("tcg", "kvm")
    if not host_has_hw_virt():
        assert got == "tcg"
    assert accel_mod.kvm_device_usable("/nonexistent/kvm") is False


# --- RAM layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ram", "below"),
    [
        (128 * MIB, 128 * MIB),
        (512 * MIB, 512 * MIB),
        (3 * GIB, 3 * GIB),  # fits under the traditional 3.5 GiB split
        (3 * GIB + 512 * MIB - 1, 3 * GIB + 512 * MIB - 1),
        (3 * GIB + 512 * MIB, 3 * GIB),  # doesn't fit: split moves to 3 GiB (gigabyte_align)
        (4 * GIB, 3 * GIB),
        (16 * GIB, 3 * GIB),
    ],
)
def test_pc_below_4g(ram: int, below: int) -> None:
    assert pc_below_4g(ram) == below


def _ram_file(tmp_path: Path, size: int) -> Path:
    """A sparse file whose every 4 KiB page starts with its own file offset."""
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4096):
            f.seek(off)
            f.write(off.to_bytes(8, "little"))
    return path


def test_physical_memory_small(tmp_path: Path) -> None:
    size = 64 * MIB
    mem = PhysicalMemory(_ram_file(tmp_path, size), size, pc_below_4g(size))
    try:
        assert mem.ranges() == [(0, size)]
        assert mem.read(0x5000, 8) == (0x5000).to_bytes(8, "little")
        assert mem.read(size - 4096, 8) == (size - 4096).to_bytes(8, "little")
        assert bytes(mem.view(0x2000, 8)) == (0x2000).to_bytes(8, "little")
        assert mem.read(size - 1, 1) == b"\0"
        assert mem.read(size, 0) == b""
        with pytest.raises(PhysicalMemoryError) as e:
            mem.read(size, 1)
        assert e.value.args[0] == size
        with pytest.raises(PhysicalMemoryError):
            mem.read(size - 8, 16)  # crosses off the end
        with pytest.raises(PhysicalMemoryError):
            mem.read(FOUR_GIB, 8)  # no high RAM at all
        with pytest.raises(PhysicalMemoryError):
            mem.read(-8, 8)
    finally:
        mem.close()


def test_physical_memory_split(tmp_path: Path) -> None:
    """A synthetic pc layout: 16 MiB low, 8 MiB high (the file holds low RAM, then high RAM)."""
    low, high = 16 * MIB, 8 * MIB
    path = _ram_file(tmp_path, low + high)
    with PhysicalMemory(path, low + high, low) as mem:
        assert mem.size == low + high and mem.below_4g == low
        assert mem.ranges() == [(0, low), (FOUR_GIB, FOUR_GIB + high)]
        # below 4G: file offset == gpa
        assert mem.read(0x1000, 8) == (0x1000).to_bytes(8, "little")
        # above 4G: file offset == below_4g + (gpa - 4G)
        assert mem.read(FOUR_GIB, 8) == low.to_bytes(8, "little")
        assert mem.read(FOUR_GIB + 0x3000, 8) == (low + 0x3000).to_bytes(8, "little")
        last = FOUR_GIB + high - 4096
        assert mem.read(last, 8) == (low + high - 4096).to_bytes(8, "little")
        assert bytes(mem.view(FOUR_GIB + 0x3000, 8)) == (low + 0x3000).to_bytes(8, "little")
        # the PCI hole and beyond RAM
        for pa in (low, low + 4096, 0xE0000000, FOUR_GIB - 1, FOUR_GIB + high, 1 << 40):
            with pytest.raises(PhysicalMemoryError) as e:
                mem.read(pa, 1)
            assert e.value.args[0] == pa
            with pytest.raises(PhysicalMemoryError):
                mem.view(pa, 1)
        # crossing from RAM into a hole: the error names the first address that is not RAM
        with pytest.raises(PhysicalMemoryError) as e:
            mem.read(low - 8, 16)
        assert e.value.args[0] == low and e.value.address == low
        with pytest.raises(PhysicalMemoryError) as e:
            mem.read(FOUR_GIB + high - 8, 16)
        assert e.value.args[0] == FOUR_GIB + high
        with pytest.raises(PhysicalMemoryError):
            mem.read(FOUR_GIB - 8, 16)  # hole into high RAM
        with pytest.raises(ValueError):
            mem.read(0, -1)


def test_physical_memory_is_live_and_closes(tmp_path: Path) -> None:
    """The mapping is shared: a write through the file (as QEMU's) shows at once."""
    size = 1 * MIB
    path = _ram_file(tmp_path, size)
    fd = os.open(path, os.O_RDWR)
    mem = PhysicalMemory(fd, size, size)
    try:
        os.pwrite(fd, b"guest!", 0x1234)
        assert mem.read(0x1234, 6) == b"guest!"
        view = mem.view(0x1234, 6)
        os.pwrite(fd, b"GUEST!", 0x1234)
        assert bytes(view) == b"GUEST!"
        del view
    finally:
        os.close(fd)
    mem.close()
    mem.close()  # twice is fine
    with pytest.raises(PhysicalMemoryError):
        mem.read(0x1234, 6)


def test_physical_memory_close_with_live_view(tmp_path: Path) -> None:
    size = 1 * MIB
    mem = PhysicalMemory(_ram_file(tmp_path, size), size, size)
    view = mem.view(0, 8)
    mem.close()  # does not raise although a view is still held
    assert bytes(view) == (0).to_bytes(8, "little")


def test_physical_memory_bad_layout(tmp_path: Path) -> None:
    path = _ram_file(tmp_path, MIB)
    with pytest.raises(ValueError):
        PhysicalMemory(path, MIB, 2 * MIB)
    with pytest.raises(ValueError):
        PhysicalMemory(path, 0, 0)


# --- command line ------------------------------------------------------------------------------


def _cmd(config: QemuConfig, accel: str = "tcg") -> list[str]:
    return build_command_line(
        config,
        accel,
        Path("/dev/shm/vmigdb-abc"),
        Path("/run/user/1000/vmigdb-x/gdb.sock"),
        Path("/run/user/1000/vmigdb-x/qmp.sock"),
        Path("/run/user/1000/vmigdb-x/console.log"),
    )


def test_command_line_tcg() -> None:
    cfg = QemuConfig(
        kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.gz"), smp=2, time_mode="host"
    )
    assert _cmd(cfg) == [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", "512",
        "-smp", "2",
        "-object",
        "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/vmigdb-abc,share=on",
        "-machine", "pc,memory-backend=ram0",
        "-kernel", "/k/vmlinuz",
        "-initrd", "/k/initrd.gz",
        "-append", "console=ttyS0",
        "-serial", "file:/run/user/1000/vmigdb-x/console.log",
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-chardev", "socket,id=g0,path=/run/user/1000/vmigdb-x/gdb.sock,server=on,wait=off",
        "-gdb", "chardev:g0",
        "-qmp", "unix:/run/user/1000/vmigdb-x/qmp.sock,server=on,wait=off",
        "-rtc", "clock=vm",
    ]  # fmt: skip


def test_command_line_kvm_and_options() -> None:
    cfg = QemuConfig(
        kernel=Path("/k/vmlinuz"),
        append="quiet nokaslr",
        memory_mib=4096,
        serial=Path("/tmp/serial.txt"),
        extra_args=("-S",),
        binary="/opt/qemu/bin/qemu-system-x86_64",
    )
    cmd = _cmd(cfg, "kvm")
    assert cmd[:5] == ["/opt/qemu/bin/qemu-system-x86_64", "-accel", "kvm", "-cpu", "host"]
    assert "-initrd" not in cmd
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 quiet nokaslr"
    assert cmd[cmd.index("-serial") + 1] == "file:/tmp/serial.txt"
    assert "size=4096M" in cmd[cmd.index("-object") + 1]
    assert cmd[-1] == "-S"
    # nothing the guest could see is added for debugging's sake
    for visible in ("-device", "-fw_cfg", "vmcoreinfo", "-cpu max"):
        assert visible not in " ".join(_cmd(cfg, "tcg"))
    assert "-cpu" not in _cmd(cfg, "tcg")


def test_command_line_escapes_commas() -> None:
    cfg = QemuConfig(kernel=Path("/k/vmlinuz"))
    cmd = build_command_line(
        cfg, "tcg", Path("/a,b/ram"), Path("/a,b/gdb"), Path("/a,b/qmp"), Path("/a,b/log")
    )
    assert "mem-path=/a,,b/ram,share=on" in cmd[cmd.index("-object") + 1]
    assert cmd[cmd.index("-chardev") + 1] == "socket,id=g0,path=/a,,b/gdb,server=on,wait=off"
    assert cmd[cmd.index("-qmp") + 1] == "unix:/a,,b/qmp,server=on,wait=off"


def test_command_line_time_modes() -> None:
    """host adds nothing; icount adds -icount after -rtc, before the user's args; auto (the
    default) is icount under TCG, with several vCPUs on a QEMU before 10 too (on trial)."""
    kernel = Path("/k/vmlinuz")
    host = _cmd(QemuConfig(kernel=kernel, extra_args=("-S",), time_mode="host"))
    assert "-icount" not in host
    assert host[-3:] == ["-rtc", "clock=vm", "-S"]  # the RTC follows the VM clock in every mode
    icount = _cmd(QemuConfig(kernel=kernel, extra_args=("-S",), time_mode="icount"))
    assert icount[-5:] == [
        "-rtc", "clock=vm",
        "-icount", f"shift={process_mod.ICOUNT_SHIFT},sleep=on,align=on",
        "-S",
    ]  # fmt: skip
    assert icount[: len(host) - 1] == host[:-1]
    assert _cmd(QemuConfig(kernel=kernel, extra_args=("-S",))) == icount
    smp2 = QemuConfig(kernel=kernel, extra_args=("-S",), smp=2)
    assert _cmd(smp2) == _cmd(dataclasses.replace(smp2, time_mode="icount"))
    smp2_on_10 = build_command_line(
        smp2, "tcg", Path("/r"), Path("/g"), Path("/q"), Path("/c"), version=(10, 0, 2)
    )
    assert smp2_on_10 == build_command_line(
        dataclasses.replace(smp2, time_mode="icount"),
        "tcg",
        *map(Path, "/r /g /q /c".split()),
        version=(10, 0, 2),
    )  # QEMU 10 boots 2 vCPUs under icount: auto chooses it there
    # nothing the guest could see: no device, no CPU model change
    for visible in ("-device", "-fw_cfg", "-cpu"):
        assert visible not in icount


Q72, Q10 = (7, 2, 22), (10, 0, 2)


@pytest.mark.parametrize(
    ("mode", "accel", "smp", "version", "resolved", "why"),
    [
        ("auto", "tcg", 1, Q72, "icount", "TCG with 1 vCPU"),
        ("auto", "tcg", 1, Q10, "icount", "TCG with 1 vCPU"),
        ("auto", "tcg", 2, Q72, "icount", "on trial (trial.py): QEMU 7.2.22 with icount hangs"),
        ("auto", "tcg", 4, None, "icount", "on trial (trial.py): QEMU ? with icount hangs"),
        ("auto", "tcg", 2, Q10, "icount", "QEMU 10.0.2 counts 2 vCPUs' instructions"),
        ("auto", "tcg", 4, (11, 0, 0), "icount", "counts 4 vCPUs' instructions"),
        ("auto", "kvm", 1, Q10, "host", "kvm cannot count instructions"),
        ("auto", "kvm", 2, Q10, "host", "kvm cannot count instructions"),
        ("auto", "kvm", 2, Q72, "host", "kvm cannot count instructions"),
        ("host", "tcg", 1, Q10, "host", "as asked"),
        ("host", "tcg", 2, Q10, "host", "as asked"),
        ("icount", "tcg", 2, Q72, "icount", "as asked"),
        ("icount", "tcg", 2, Q10, "icount", "as asked"),
    ],
)
def test_resolve_time_mode(
    mode: str, accel: str, smp: int, version, resolved: str, why: str
) -> None:
    assert process_mod.DEFAULT_TIME_MODE == "auto"
    got, reason = process_mod.resolve_time_mode(mode, accel, smp, version)
    assert got == resolved and why in reason, reason


@pytest.mark.parametrize(
    ("mode", "accel", "smp", "version", "trial"),
    [
        ("auto", "tcg", 2, Q72, True),
        ("auto", "tcg", 2, None, True),
        ("auto", "tcg", 1, Q72, False),
        ("auto", "tcg", 2, Q10, False),
        ("auto", "kvm", 2, Q72, False),
        ("icount", "tcg", 2, Q72, False),
        ("host", "tcg", 2, Q72, False),
    ],
)
def test_icount_is_on_trial_only_where_auto_picks_it_on_an_old_qemu_with_several_vcpus(
    mode: str, accel: str, smp: int, version, trial: bool
) -> None:
    assert process_mod.icount_on_trial(mode, accel, smp, version) is trial


def test_time_mode_errors() -> None:
    with pytest.raises(SetupError, match="icount needs TCG.*--accel tcg"):
        _cmd(QemuConfig(kernel=Path("/k/vmlinuz"), time_mode="icount"), "kvm")
    with pytest.raises(SetupError, match="unknown time mode 'wall'.*auto, host, icount"):
        _cmd(QemuConfig(kernel=Path("/k/vmlinuz"), time_mode="wall"))


# --- pre-flight --------------------------------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"not really a kernel")
    return k


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Point the RAM file and the workdir at empty directories, to see what is left behind."""
    shm, run = tmp_path / "shm", tmp_path / "run"
    shm.mkdir()
    run.mkdir()
    monkeypatch.setattr(process_mod, "SHM_DIR", shm)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return shm, run


def test_missing_qemu_binary(kernel: Path) -> None:
    with pytest.raises(SetupError, match="apt-get install qemu-system-x86") as e:
        QemuProcess.start(QemuConfig(kernel=kernel, binary="/nonexistent/qemu"))
    assert "\n" not in str(e.value)


def test_missing_kernel_and_initrd(tmp_path: Path, kernel: Path) -> None:
    with pytest.raises(SetupError, match="kernel .*nokernel"):
        QemuProcess.start(QemuConfig(kernel=tmp_path / "nokernel", binary="/bin/true"))
    with pytest.raises(SetupError, match="initrd .*noinitrd"):
        QemuProcess.start(
            QemuConfig(kernel=kernel, initrd=tmp_path / "noinitrd", binary="/bin/true")
        )


@pytest.mark.parametrize(
    ("field", "value"), [("smp", 0), ("smp", 1000), ("memory_mib", 1), ("memory_mib", 1 << 30)]
)
def test_out_of_range(kernel: Path, field: str, value: int) -> None:
    cfg = QemuConfig(kernel=kernel, binary="/bin/true", accel="tcg", **{field: value})
    with pytest.raises(SetupError, match="out of range"):
        QemuProcess.start(cfg)


def test_unknown_time_mode_is_a_preflight_error(kernel: Path) -> None:
    cfg = QemuConfig(kernel=kernel, binary="/bin/true", accel="tcg", time_mode="wall")
    with pytest.raises(SetupError, match="unknown time mode"):
        QemuProcess.start(cfg)


@pytest.mark.parametrize(
    ("time_mode", "accel", "resolved"),
    [("icount", "auto", "tcg"), ("host", "auto", "auto"), ("icount", "tcg", "tcg")],
)
def test_icount_makes_auto_pick_tcg(
    kernel: Path,
    private_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    time_mode: str,
    accel: str,
    resolved: str,
) -> None:
    """icount is TCG's: with --accel auto it never asks for KVM, even where KVM would work."""
    asked: list[str] = []
    monkeypatch.setattr(process_mod, "resolve_accel", lambda a: asked.append(a) or "tcg")
    cfg = QemuConfig(kernel=kernel, binary="/bin/true", accel=accel, time_mode=time_mode)
    with pytest.raises(SetupError, match="exited at startup"):
        QemuProcess.start(cfg)
    assert asked == [resolved]


def test_icount_with_several_vcpus_warns_before_qemu_10(
    kernel: Path,
    private_dirs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/bin/true tells no version: --time icount with 2 vCPUs warns (QEMU 7.2 hangs 6.1), auto
    puts icount on trial, silently. On QEMU 10 icount with 2 vCPUs starts with no warning, and
    auto picks it too."""
    cfg = QemuConfig(kernel=kernel, binary="/bin/true", accel="tcg", smp=2, time_mode="icount")
    with caplog.at_level("WARNING", logger="vmigdb.hv.qemu"):
        with pytest.raises(SetupError, match="exited at startup"):
            QemuProcess.start(cfg)
    assert "hangs Debian's 6.1 kernel" in caplog.text and "--smp 1" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="vmigdb.hv.qemu"):
        with pytest.raises(SetupError, match="exited at startup"):
            QemuProcess.start(QemuConfig(kernel=kernel, binary="/bin/true", accel="tcg", smp=2))
    assert "guest time: icount (auto: on trial" in caplog.text and "WARNING" not in caplog.text
    monkeypatch.setattr(process_mod, "qemu_version", lambda binary: (10, 0, 2))
    for time_mode in ("icount", "auto"):
        caplog.clear()
        with caplog.at_level("INFO", logger="vmigdb.hv.qemu"):
            with pytest.raises(SetupError, match="exited at startup"):
                QemuProcess.start(dataclasses.replace(cfg, time_mode=time_mode))
        assert "guest time: icount" in caplog.text, caplog.text
        assert "hangs" not in caplog.text and "WARNING" not in caplog.text


def test_qemu_that_exits_at_once(kernel: Path, private_dirs: tuple[Path, Path]) -> None:
    """A 'QEMU' that exits during startup gives a SetupError; nothing is left behind."""
    with pytest.raises(SetupError, match=r"exited at startup \(status 0\)"):
        QemuProcess.start(QemuConfig(kernel=kernel, binary="/bin/true", accel="tcg"))
    for d in private_dirs:
        assert list(d.iterdir()) == []


def test_qemu_error_message_surfaces(
    kernel: Path, tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: something broke' >&2\nexit 1\n")
    fake.chmod(0o700)
    with pytest.raises(SetupError, match="something broke"):
        QemuProcess.start(QemuConfig(kernel=kernel, binary=str(fake), accel="tcg"))
    for d in private_dirs:
        assert list(d.iterdir()) == []


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    """A stand-in 'QEMU': binds both sockets and maps the RAM file as QEMU does, then waits."""
    fake = tmp_path / "fake-qemu"
    # Do what QEMU does at startup (bind both sockets, map the RAM file), then wait.
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import mmap, socket, sys, time\n"
        "a = sys.argv\n"
        "r = a[a.index('-object') + 1].split('mem-path=')[1].split(',')[0]\n"
        "g = a[a.index('-chardev') + 1].split('path=')[1].split(',')[0]\n"
        "q = a[a.index('-qmp') + 1][5:].split(',')[0]\n"
        "s1 = socket.socket(socket.AF_UNIX); s1.bind(g); s1.listen()\n"
        "s2 = socket.socket(socket.AF_UNIX); s2.bind(q); s2.listen()\n"
        "time.sleep(0.3)\n"  # start() must wait for the RAM file too, not just the sockets
        "f = open(r, 'r+b'); m = mmap.mmap(f.fileno(), 0)\n"
        "time.sleep(60)\n"
    )
    fake.chmod(0o700)
    return fake


def test_ram_file_and_workdir_are_private(
    kernel: Path, fake_qemu: Path, private_dirs: tuple[Path, Path]
) -> None:
    """Check modes with a stand-in QEMU, then that cleanup removes everything."""
    shm, run = private_dirs
    qp = QemuProcess.start(QemuConfig(kernel=kernel, binary=str(fake_qemu), accel="tcg"))
    try:
        assert qp.ram_path.parent == shm and qp.workdir.parent == run
        assert stat.S_IMODE(os.stat(qp.ram_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(qp.workdir).st_mode) == 0o700
        for sock in (qp.gdb_socket, qp.qmp_socket):  # created under umask 077
            assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
        assert os.path.getsize(qp.ram_path) == 512 * MIB
        assert qp.memory.read(0, 16) == bytes(16)
        assert qp.poll() is None and qp.pid > 0
        qp.unlink_paths()
        qp.unlink_paths()
        assert list(shm.iterdir()) == []
        assert not qp.gdb_socket.exists() and not qp.qmp_socket.exists()
        assert qp.memory.read(0, 16) == bytes(16)  # the mapping outlives the path
    finally:
        qp.terminate(timeout=2)
    assert qp.poll() is not None
    qp.cleanup()  # idempotent
    for d in private_dirs:
        assert list(d.iterdir()) == []


def test_started_from_a_worker_thread_survives_it(
    kernel: Path, fake_qemu: Path, private_dirs: tuple[Path, Path]
) -> None:
    """PDEATHSIG follows the forking thread: a retired worker thread must not take QEMU down."""
    cfg = QemuConfig(kernel=kernel, binary=str(fake_qemu), accel="tcg")
    started: list[QemuProcess] = []
    worker = threading.Thread(target=lambda: started.append(QemuProcess.start(cfg)))
    worker.start()
    worker.join()
    (qp,) = started
    try:
        time.sleep(0.3)
        assert qp.poll() is None
    finally:
        qp.terminate(timeout=2)


def test_last_words_keep_the_line_that_says_why_above_a_register_dump(tmp_path) -> None:
    process = object.__new__(QemuProcess)
    process.stderr_log = tmp_path / "qemu.stderr"
    dump = [f"XMM{i:02d}=0000000000000000 0000000000000000" for i in range(30)]
    process.stderr_log.write_text("\n".join(["warning: x", "qemu: fatal: bad icount", *dump]) + "\n")
    words = process.last_words()
    assert words.splitlines()[:2] == ["qemu: fatal: bad icount", "..."]
    assert words.splitlines()[2:] == dump[-20:]
    process.stderr_log.write_text("one\ntwo\n")
    assert process.last_words() == "one\ntwo"
