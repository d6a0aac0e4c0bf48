"""Tests of the demo-guest builder: cpio writer, input hashing, apt parsing, caching, programs.

All run offline in seconds; the one real build (network, QEMU) is opt-in with VMIGDB_SLOW=1.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from vmigdb.errors import SetupError
from vmigdb.images import build, cpio, debian, initramfs, kernel, programs

SAMPLE_SHOW = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Provides: linux-latest-modules-6.1.0-56-cloud-amd64, wireguard-modules (= 1.0.0)
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)

Package: busybox-static
Source: busybox (1:1.35.0-4+deb12u1)
Version: 1:1.35.0-4+deb12u1+b1
Tag: admin::recovery, interface::shell,
 use::login, works-with::file
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
"""


def sample_entries() -> list[cpio.CpioEntry]:
    return [
        cpio.directory("bin"),
        cpio.directory("dev"),
        cpio.regular("bin/hello", b"hello world\n", 0o755),
        cpio.regular("odd", b"12345"),  # sizes not a multiple of 4 exercise the padding
        cpio.regular("empty", b""),
        cpio.symlink("bin/sh", "busybox"),
        cpio.chardev("dev/console", 5, 1),
    ]


# ---- cpio ---------------------------------------------------------------------------------------


def test_cpio_roundtrip() -> None:
    entries = sample_entries()
    archive = cpio.newc_archive(entries)
    assert len(archive) % 4 == 0
    assert cpio.read_newc(archive) == entries


def test_cpio_is_deterministic() -> None:
    assert cpio.newc_archive(sample_entries()) == cpio.newc_archive(sample_entries())
    assert cpio.newc_archive(sample_entries()) != cpio.newc_archive(sample_entries()[:-1])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="host cpio tool not installed")
def test_cpio_tool_lists_archive() -> None:
    archive = cpio.newc_archive(sample_entries())
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == [e.name for e in sample_entries()]
    verbose = subprocess.run(
        ["cpio", "-tv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert re.search(r"^lrwxrwxrwx .* bin/sh -> busybox$", verbose, re.MULTILINE)
    assert re.search(r"^crw------- .* 5,\s+1 .* dev/console$", verbose, re.MULTILINE)


# ---- apt output parsing -------------------------------------------------------------------------


def test_parse_show_output() -> None:
    packages = debian.parse_stanzas(SAMPLE_SHOW)
    assert packages["busybox-static"]["Version"] == "1:1.35.0-4+deb12u1+b1"
    assert "use::login" in packages["busybox-static"]["Tag"]
    depends = packages["linux-image-cloud-amd64"]["Depends"]
    assert (
        debian.versioned_dependency(depends, "linux-image-") == "linux-image-6.1.0-56-cloud-amd64"
    )


def test_versioned_dependency_variants() -> None:
    pick = debian.versioned_dependency
    trixie = "linux-image-6.12.38+deb13-cloud-amd64 (= 6.12.38-1)"
    assert pick(trixie, "linux-image-") == "linux-image-6.12.38+deb13-cloud-amd64"
    several = "linux-image-6.1.0-9-cloud-amd64-unsigned | linux-image-6.1.0-9-cloud-amd64, foo"
    assert pick(several, "linux-image-") == "linux-image-6.1.0-9-cloud-amd64"
    assert pick("linux-image-cloud-amd64, initramfs-tools", "linux-image-") is None
    assert pick("", "linux-image-") is None


def test_last_error_skips_root_warning() -> None:
    stderr = (
        "E: Failed to fetch http://example/pool/x.deb 404 Not Found\n"
        "W: Download is performed unsandboxed as root as file 'x' couldn't be accessed\n"
    )
    assert debian.last_error(stderr).startswith("E: Failed to fetch")


def test_version_sorting() -> None:
    names = ["vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.1.0-56-cloud-amd64", "vmlinuz-6.1.0-100-x"]
    assert debian.newest(Path(n) for n in names) == Path("vmlinuz-6.1.0-100-x")
    assert debian.newest([]) is None


# ---- kernel cache -------------------------------------------------------------------------------


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_apt(package: str) -> dict[str, str]:
        raise debian.AptError("network unreachable")

    monkeypatch.setattr(debian, "package_info", no_apt)
    monkeypatch.setattr(debian, "update_lists", lambda log=None: False)


def test_kernel_offline_uses_newest_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    for release in ("6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64"):
        (kernels / f"vmlinuz-{release}").write_bytes(b"k")
    path, release = kernel.fetch_kernel(tmp_path)
    assert release == "6.1.0-56-cloud-amd64"
    assert path == kernels / "vmlinuz-6.1.0-56-cloud-amd64"


def test_kernel_offline_without_cache_is_setup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    with pytest.raises(SetupError, match="apt-get update"):
        kernel.fetch_kernel(tmp_path)


def test_kernel_cached_release_is_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = {"Depends": "linux-image-6.1.0-77-cloud-amd64 (= 6.1.200-1)"}
    monkeypatch.setattr(debian, "package_info", lambda package: info)

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("downloaded a cached kernel")

    monkeypatch.setattr(debian, "download", no_download)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "vmlinuz-6.1.0-77-cloud-amd64").write_bytes(b"k")
    assert kernel.fetch_kernel(tmp_path)[1] == "6.1.0-77-cloud-amd64"


# ---- tools and paths ----------------------------------------------------------------------------


def test_missing_tools_name_their_package() -> None:
    with pytest.raises(SetupError, match="apt-get install gcc libc6-dev"):
        programs.toolchain_id("no-such-gcc-vmigdb")
    with pytest.raises(SetupError, match="apt-get install"):
        debian.require_tool("no-such-tool-vmigdb")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.default_cache_dir() == tmp_path / "vmigdb"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    assert build.default_cache_dir() == Path.home() / ".cache" / "vmigdb"


# ---- input hashing and the initrd ---------------------------------------------------------------


def test_input_hash_tracks_every_input() -> None:
    sources = {p.name: p.source.read_bytes() for p in programs.list_programs()}
    assert {"ticker", "spin"} <= sources.keys()
    base = programs.programs_key(sources, "gcc 12")
    assert base == programs.programs_key(dict(sources), "gcc 12")
    changed = dict(sources, spin=sources["spin"] + b"\n")
    assert programs.programs_key(changed, "gcc 12") != base
    assert programs.programs_key(sources, "gcc 13") != base
    assert programs.programs_key(sources, "gcc 12", ("-O2",)) != base
    key = initramfs.initrd_key(b"busybox", b"init", base)
    assert initramfs.initrd_key(b"busybox", b"init", base) == key
    assert (
        initramfs.initrd_key(b"busybox", b"init", programs.programs_key(changed, "gcc 12")) != key
    )
    assert initramfs.initrd_key(b"busybox2", b"init", base) != key
    assert initramfs.initrd_key(b"busybox", b"init2", base) != key


def test_initrd_contents_and_determinism(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake busybox")
    progs = tmp_path / "progs"
    progs.mkdir()
    (progs / "ticker").write_bytes(b"ticker binary")
    (progs / "spin").write_bytes(b"spin binary")
    first = initramfs.build_initrd(tmp_path / "a", busybox, progs, "key1")
    second = initramfs.build_initrd(tmp_path / "b", busybox, progs, "key1")
    assert first.read_bytes() == second.read_bytes()
    entries = {e.name: e for e in cpio.read_newc(first.read_bytes())}
    for name in (
        "init",
        "bin/busybox",
        "bin/ticker",
        "bin/spin",
        "dev/console",
        "proc",
        "sys",
        "tmp",
    ):
        assert name in entries
    assert entries["init"].data == initramfs.INIT_SCRIPT.read_bytes()
    assert entries["init"].mode == stat.S_IFREG | 0o755
    assert entries["bin/spin"].data == b"spin binary"
    assert entries["dev/console"].rdev == (5, 1)
    # Same inputs: the cached file is reused as is.
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert initramfs.build_initrd(tmp_path / "a", busybox, progs, "key1") == first
    assert first.stat().st_mtime_ns == mtime
    assert initramfs.build_initrd(tmp_path / "a", busybox, progs, "key2") != first


def test_init_script_syntax() -> None:
    sh = shutil.which("busybox") or shutil.which("dash") or shutil.which("sh")
    if sh is None:
        pytest.skip("no shell to check init.sh with")
    argv = [sh, "sh", "-n"] if sh.endswith("busybox") else [sh, "-n"]
    subprocess.run([*argv, str(initramfs.INIT_SCRIPT)], check=True)


# ---- test programs ------------------------------------------------------------------------------


def _have_static_gcc() -> bool:
    try:
        programs.toolchain_id()
    except SetupError:
        return False
    return True


@pytest.mark.skipif(not _have_static_gcc(), reason="gcc or static libc (libc6-dev) missing")
def test_programs_compile_and_cache(tmp_path: Path) -> None:
    out_dir, key = programs.build_programs(tmp_path)
    built = sorted(p.name for p in out_dir.iterdir())
    assert built == sorted(p.name for p in programs.list_programs())
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert programs.build_programs(tmp_path) == (out_dir, key)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes
    spin = (out_dir / "spin").read_bytes()
    assert spin[:4] == b"\x7fELF" and spin[16] == 2  # ET_EXEC: not PIE, fixed addresses
    assert b"vmigdb_spin_target" in spin


# ---- the real thing (opt-in) --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get("VMIGDB_SLOW") != "1", reason="set VMIGDB_SLOW=1")
def test_real_build_boots(tmp_path: Path) -> None:
    image = build.build_guest(tmp_path / "cache")
    assert image.kernel.name == f"vmlinuz-{image.release}"
    assert build.build_guest(tmp_path / "cache") == image
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    log = tmp_path / "serial.log"
    append = "console=ttyS0 vmigdb.programs=ticker,spin:1111,spin:2222"
    argv = [qemu, "-accel", "tcg", "-m", "512", "-smp", "2", "-kernel", str(image.kernel)]
    argv += ["-initrd", str(image.initrd), "-append", append, "-serial", f"file:{log}"]
    argv += ["-display", "none", "-monitor", "none", "-no-reboot"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and not ("round=1 " in text and "value=2222" in text):
            time.sleep(1)
            text = log.read_text(errors="replace") if log.exists() else ""
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"vmigdb-guest: release {image.release}" in text
    assert re.search(r"vmigdb-guest: ksym __x64_sys_getpid ffffffff[0-9a-f]{8}", text)
    assert "vmigdb-guest: ready" in text
    assert re.search(r"ticker pid=\d+ buf=0x[0-9a-f]+ value=5449434b[0-9a-f]{16}4b434954", text)
    addrs = dict(re.findall(r"spin pid=\d+ value=(\d+) addr=(0x[0-9a-f]+)", text))
    assert set(addrs) == {"1111", "2222"} and addrs["1111"] == addrs["2222"]
