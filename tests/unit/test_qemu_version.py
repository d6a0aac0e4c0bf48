"""QEMU's version from its --version, and the defects vmigdb warns about."""

from __future__ import annotations

import stat
from pathlib import Path

from vmigdb.hv.qemu.version import known_defects, qemu_version


def fake_qemu(tmp_path: Path, text: str) -> str:
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(f"#!/bin/sh\necho '{text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_version_of_debian_builds(tmp_path: Path) -> None:
    debian12 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"
    assert qemu_version(fake_qemu(tmp_path, debian12)) == (7, 2, 22)
    (tmp_path / "b").mkdir()
    backports = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
    assert qemu_version(fake_qemu(tmp_path / "b", backports)) == (10, 0, 2)


def test_an_unreadable_version_is_none(tmp_path: Path) -> None:
    assert qemu_version(fake_qemu(tmp_path, "something else")) is None
    assert qemu_version(str(tmp_path / "missing")) is None


def test_only_qemu_7_2_is_warned_about_its_single_step() -> None:
    (warning,) = known_defects((7, 2, 22))
    assert "QEMU 7.2.22's single-step corrupts a vCPU's RFLAGS" in warning
    assert "QEMU 10" in warning
    assert known_defects((10, 0, 2)) == []
    assert known_defects(None) == []
