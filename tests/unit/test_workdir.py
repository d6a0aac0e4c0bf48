"""Work directories: private, owner recorded, and swept at the next start once their owner died."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vmigdb.hv.qemu import workdir


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(workdir.tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_workdir_is_private_and_records_its_owner(base: Path) -> None:
    d = workdir.make_workdir()
    assert d.parent == base and d.name.startswith("vmigdb-")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "owner").stat().st_mode) == 0o600
    assert not workdir.owner_is_gone(d)  # we are alive
    pid, started = (d / "owner").read_text().split()
    assert int(pid) == os.getpid() and started == workdir.process_start_time(os.getpid())


def test_next_start_sweeps_only_dead_owners_records(base: Path) -> None:
    stale = base / "vmigdb-stale"
    stale.mkdir(mode=0o700)
    (stale / "owner").write_text(f"{dead_pid()} 12345\n")
    (stale / "console.log").write_text("the guest's last words\n")
    reused = base / "vmigdb-reused"  # a live pid, but not the process that made it
    reused.mkdir(mode=0o700)
    (reused / "owner").write_text(f"{os.getpid()} 1\n")
    alive = workdir.make_workdir()
    unknown = base / "vmigdb-no-record"  # not ours to judge: never removed
    unknown.mkdir()
    garbled = base / "vmigdb-garbled"
    garbled.mkdir()
    (garbled / "owner").write_text("not a pid\n")
    other = base / "unrelated"
    other.mkdir()
    (other / "owner").write_text(f"{dead_pid()} 1\n")
    fresh = workdir.make_workdir()
    assert not stale.exists() and not reused.exists()
    assert alive.exists() and fresh.exists() and unknown.exists() and garbled.exists()
    assert other.exists()


def test_start_time_survives_odd_command_names() -> None:
    """A process may name itself anything (PR_SET_NAME), spaces and parentheses included."""
    code = (
        "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'a b) c', 0, 0, 0); "
        "print(flush=True); time.sleep(5)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        assert Path(f"/proc/{child.pid}/comm").read_text() == "a b) c\n"
        started = workdir.process_start_time(child.pid)
        assert started is not None and started.isdigit()
    finally:
        child.kill()
        child.wait()
    assert workdir.process_start_time(child.pid) is None


def test_without_proc_nothing_is_recorded_or_swept(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start time unreadable would make every owner look gone: then judge nothing."""
    stale = base / "vmigdb-stale"
    stale.mkdir(mode=0o700)
    (stale / "owner").write_text(f"{dead_pid()} 12345\n")
    monkeypatch.setattr(workdir, "process_start_time", lambda pid: None)
    d = workdir.make_workdir()
    assert stale.exists() and not (d / "owner").exists()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
