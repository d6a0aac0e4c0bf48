"""Boot a real guest with QemuProcess: private files, QMP, direct RAM reads, no leftovers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmigdb.hv.qemu.memory import FOUR_GIB
from vmigdb.hv.qemu.process import QemuConfig, QemuProcess
from vmigdb.hv.qemu.qmp import Qmp, QmpError

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FALLBACK_KERNEL = Path("/tmp/k/x/boot/vmlinuz-6.1.0-56-cloud-amd64")
FALLBACK_INITRD = Path("/tmp/k/initrd.gz")
BANNER = b"Linux version "
BOOT_TIMEOUT = 60.0  # TCG on a slow host


@pytest.fixture(scope="module")
def guest() -> tuple[Path, Path]:
    """(kernel, initrd): the project's demo guest, else the files in /tmp/k, else skip."""
    try:
        from vmigdb.images.build import build_guest

        image = build_guest()
        return image.kernel, image.initrd
    except Exception as e:  # noqa: BLE001 - any failure: try the fallback
        reason = f"build_guest() failed: {e}"
    if FALLBACK_KERNEL.is_file() and FALLBACK_INITRD.is_file():
        return FALLBACK_KERNEL, FALLBACK_INITRD
    pytest.skip(f"no guest kernel: {reason}; and no {FALLBACK_KERNEL}")


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _find_banner(qp: QemuProcess) -> int | None:
    """Guest-physical address of the kernel's banner ("Linux version 6..."), if in RAM yet."""
    for start, end in qp.memory.ranges():
        data = qp.memory.read(start, end - start)
        i = data.find(BANNER)
        while i >= 0:
            # The decompressed banner is printable; the compressed image has a copy of the
            # prefix followed by compressed bytes.
            tail = data[i : i + 40]
            if all(32 <= c < 127 for c in tail):
                return start + i
            i = data.find(BANNER, i + 1)
    return None


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def _pmemsave(qmp: Qmp, qp: QemuProcess, pa: int, size: int) -> bytes:
    dump = qp.workdir / f"pmem-{pa:x}"
    await qmp.execute("pmemsave", {"val": pa, "size": size, "filename": str(dump)})
    data = dump.read_bytes()
    dump.unlink()
    return data


def test_boot_read_ram_and_clean_up(guest: tuple[Path, Path]) -> None:
    kernel, initrd = guest
    qp = QemuProcess.start(QemuConfig(kernel=kernel, initrd=initrd, smp=2, accel="auto"))
    try:
        assert qp.command_line[0].endswith("qemu-system-x86_64")
        assert qp.accel in ("tcg", "kvm")
        # Whoever can read these owns the guest: owner-only, in a private directory.
        assert _mode(qp.workdir) == 0o700
        assert _mode(qp.ram_path) == 0o600
        assert qp.ram_path.parent == Path("/dev/shm")
        for path in (qp.gdb_socket, qp.qmp_socket):
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert _mode(path) & 0o077 == 0
            assert path.parent == qp.workdir
        for path in qp.workdir.iterdir():
            assert _mode(path) & 0o077 == 0, path

        async def session() -> None:
            qmp = await Qmp.connect(qp.qmp_socket)
            try:
                assert await qmp.status() == "running"
                with pytest.raises(QmpError) as err:
                    await qmp.execute("no-such-command")
                assert err.value.error_class == "CommandNotFound"
                # The RAM file and sockets can go now: QEMU and vmigdb hold them open.
                qp.unlink_paths()
                assert not qp.ram_path.exists() and not qp.qmp_socket.exists()
                deadline = time.monotonic() + BOOT_TIMEOUT
                pa = _find_banner(qp)
                while pa is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    pa = _find_banner(qp)
                assert pa is not None, "no kernel banner in guest RAM: " + qp.last_words()

                await qmp.execute("stop")  # compare a still image: the guest may move the text
                assert await qmp.status() == "paused"
                pa = _find_banner(qp)
                assert pa is not None
                page = pa & ~0xFFF
                ours = qp.memory.read(page, 4096)
                assert bytes(qp.memory.view(page, 4096)) == ours
                assert await _pmemsave(qmp, qp, page, 4096) == ours
                xp = await qmp.hmp(f"xp /2gx {pa:#x}")
                words = [int(w, 16) for w in xp.split(":", 1)[1].split()]
                via_hmp = b"".join(w.to_bytes(8, "little") for w in words)
                assert via_hmp == qp.memory.read(pa, 16)
                assert via_hmp.startswith(BANNER)
                await qmp.execute("cont")
                assert await qmp.status() == "running"
            finally:
                await qmp.close()

        asyncio.run(session())
        assert qp.poll() is None
    finally:
        qp.terminate()
    assert qp.poll() is not None
    assert not _alive(qp.pid)
    assert not qp.workdir.exists()
    assert not qp.ram_path.exists()
    qp.cleanup()  # idempotent
    qp.terminate()


def test_layout_above_4g(guest: tuple[Path, Path]) -> None:
    """With 4 GiB the pc machine puts 3 GiB low and 1 GiB at 4 GiB: compare with QEMU's view."""
    kernel, initrd = guest
    qp = QemuProcess.start(QemuConfig(kernel=kernel, initrd=initrd, memory_mib=4096, accel="tcg"))
    try:
        assert qp.memory.below_4g == 3 << 30
        assert qp.memory.ranges() == [(0, 3 << 30), (FOUR_GIB, FOUR_GIB + (1 << 30))]

        async def session() -> None:
            qmp = await Qmp.connect(qp.qmp_socket)
            try:
                # Linux puts its struct page array at the top of RAM early in boot.
                top = FOUR_GIB + (1 << 30) - 4096
                deadline = time.monotonic() + BOOT_TIMEOUT
                while qp.memory.read(top, 4096) == bytes(4096) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                await qmp.execute("stop")
                for pa in (top, FOUR_GIB, (3 << 30) - 4096):
                    assert await _pmemsave(qmp, qp, pa, 4096) == qp.memory.read(pa, 4096), hex(pa)
                assert qp.memory.read(top, 4096) != bytes(4096), "nothing written above 4 GiB"
            finally:
                await qmp.quit()

        asyncio.run(session())
        qp._popen.wait(10)  # type: ignore[union-attr] - quit makes QEMU exit by itself
        assert qp.poll() == 0
    finally:
        qp.terminate()
    assert not qp.ram_path.exists() and not qp.workdir.exists()


CHILD = """
import json, sys, time
from pathlib import Path
from vmigdb.hv.qemu.process import QemuConfig, QemuProcess
qp = QemuProcess.start(QemuConfig(kernel=Path(sys.argv[1]), initrd=Path(sys.argv[2]), accel="tcg"))
qp.unlink_paths()
print(json.dumps({"pid": qp.pid, "ram": str(qp.ram_path), "workdir": str(qp.workdir)}), flush=True)
time.sleep(120)
"""


def test_qemu_dies_with_vmigdb(guest: tuple[Path, Path]) -> None:
    """SIGKILL the process that started QEMU: PDEATHSIG takes QEMU down; /dev/shm stays clean."""
    kernel, initrd = guest
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(kernel), str(initrd)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    info: dict[str, object] = {}
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line, "child failed to start QEMU"
        info = json.loads(line)
        qemu_pid = int(info["pid"])
        assert _alive(qemu_pid)
        # QEMU is in its own session, so a terminal's ^C would not reach it.
        assert os.getsid(qemu_pid) == qemu_pid
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        deadline = time.monotonic() + 3.0
        while _alive(qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(qemu_pid), "QEMU outlived the process that started it"
        assert not Path(str(info["ram"])).exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if info:
            # Killed without cleanup: its workdir (logs only, 0700) stays; the test removes it.
            shutil.rmtree(str(info["workdir"]), ignore_errors=True)
