"""The test disk image: Debian 12 with systemd, Debian's cloud kernel and GRUB, booted from the disk.

What an analyst's VM looks like, built from Debian's packages alone: `mmdebstrap` makes the root
filesystem (systemd, udev, dbus, the cloud kernel and its initramfs), `mke2fs -d` turns it into an
ext4 filesystem at 1 MiB into a raw disk with one MBR partition, and GRUB goes into the MBR and
the gap after it, so QEMU boots the disk with its own firmware and bootloader (no -kernel). The
result is kept as qcow2 (internal snapshots need it) under the cache dir, named by a hash of the
recipe (packages, files, test programs): it is rebuilt only when the recipe changes.

The image carries two test programs started from the disk (disk_programs/): `runner`, a
systemd service, and `sample`, which runner starts on request (see their sources). Root has no
password; the serial console (ttyS0) gets a login prompt.

Building needs root (mmdebstrap's root mode, which this machine has) and ~2 GiB of free disk;
it takes a few minutes, most of it downloading and unpacking packages.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.images import debian, programs
from vmigdb.images.build import default_cache_dir

LOG = logging.getLogger("vmigdb.images")

RECIPE_VERSION = 1  # bump when the build steps change what comes out
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "procps",
)
# Documentation and translations are of no use in a test guest.
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")
DISK_MIB = 2048
PART_START = 2048  # sectors: the partition starts at 1 MiB; GRUB's core image sits before it
SECTOR = 512
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "configfile", "echo", "test")
PROGRAM_DIR = Path(__file__).parent / "disk_programs"
PROGRAMS_INSTALLED = "/usr/local/bin"
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "grub-mkimage": "grub-common grub-pc-bin",
    "qemu-img": "qemu-utils",
}
RUNNER_UNIT = """\
[Unit]
Description=vmigdb test program: runner (starts sample on request)

[Service]
ExecStart=/usr/local/bin/runner
StandardOutput=journal+console
Restart=always

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class DiskImage:
    """A built test disk: the qcow2 to boot (never written to: boot an overlay of it)."""

    path: Path
    release: str  # the guest kernel's `uname -r`
    programs: Path  # host copies of the image's test programs, with symbols
    root_uuid: str


def _require_tools() -> None:
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} not found: install it with 'apt-get install {package}'")
    for name in ("boot.img", "diskboot.img", "biosdisk.mod"):
        if not (GRUB_DIR / name).is_file():
            raise SetupError(
                f"{GRUB_DIR / name} missing: install it with 'apt-get install grub-pc-bin'"
            )
    if os.geteuid() != 0:
        raise SetupError(
            "building the test disk image needs root (mmdebstrap --mode=root makes device nodes "
            "and files owned by other users): run `vmigdb guest build-disk` as root"
        )


def _overlay_files(root_uuid: str) -> dict[str, str]:
    """Text files put into the root filesystem, by path."""
    cmdline = f"root=UUID={root_uuid} ro console=ttyS0"
    return {
        "etc/hostname": "vmigdb-disk\n",
        "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 vmigdb-disk\n",
        "etc/fstab": f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n",
        "boot/grub/grub.cfg": (
            "set timeout=0\nset default=0\n"
            "menuentry 'Debian 12 (vmigdb test disk)' {\n"
            f"  linux /vmlinuz {cmdline}\n  initrd /initrd.img\n}}\n"
        ),
        "etc/systemd/system/vmigdb-runner.service": RUNNER_UNIT,
    }


def _links() -> dict[str, str]:
    """Symlinks put into the root filesystem (enabled units; timers a test guest must not run)."""
    return {
        "etc/systemd/system/multi-user.target.wants/vmigdb-runner.service": (
            "/etc/systemd/system/vmigdb-runner.service"
        ),
        "etc/systemd/system/apt-daily.timer": "/dev/null",
        "etc/systemd/system/apt-daily-upgrade.timer": "/dev/null",
    }


def recipe_key(programs_key: str) -> str:
    """A hash of everything the image is made of (not of the archive's state on the day)."""
    h = hashlib.sha256(b"vmigdb-disk\0")
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "packages": PACKAGES,
        "excludes": DPKG_EXCLUDES,
        "size": DISK_MIB,
        "grub": GRUB_MODULES,
        "files": _overlay_files("UUID"),
        "links": _links(),
        "programs": programs_key,
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


def _host_sources() -> list[str]:
    """The host's apt sources, so the image comes from the mirror this machine is set up for."""
    found = [p for p in (Path("/etc/apt/sources.list"),) if p.is_file() and p.stat().st_size]
    listed = Path("/etc/apt/sources.list.d")
    if listed.is_dir():
        found += sorted(p for p in listed.iterdir() if p.suffix in (".list", ".sources"))
    return [str(p) for p in found]


def _write_overlay(root: Path, root_uuid: str, program_dir: Path, names: list[str]) -> None:
    for rel, text in _overlay_files(root_uuid).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, target in _links().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    bin_dir = root / PROGRAMS_INSTALLED.lstrip("/")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(program_dir / name, bin_dir / name)
        (bin_dir / name).chmod(0o755)


def _mmdebstrap(target: Path, overlay: Path, log: logging.Logger) -> None:
    sources = _host_sources()
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(PACKAGES)}",
        *[f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES],
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        f"--customize-hook=sync-in {overlay} /",
        '--customize-hook=chroot "$1" passwd -d root',
        SUITE,
        str(target),
        *sources,
    ]
    log.info("mmdebstrap: building the root filesystem (a few minutes)")
    res = debian.run(argv, timeout=1800)
    if res.returncode != 0:
        raise SetupError(f"mmdebstrap failed: {debian.last_error(res.stderr)}")


def _partition_table(total_sectors: int) -> bytes:
    """An MBR partition table (offset 0x1b8 to 0x200) with one bootable Linux partition."""
    entry = struct.pack(
        "<B3sB3sII",
        0x80,
        b"\xfe\xff\xff",
        0x83,
        b"\xfe\xff\xff",
        PART_START,
        total_sectors - PART_START,
    )
    return b"VMIG" + b"\0\0" + entry + bytes(48) + b"\x55\xaa"


def _install_grub(disk: Path, work: Path) -> None:
    """GRUB for BIOS, written straight into the image file.

    grub-install wants a block device (a loop device, which needs privileges containers often
    lack); what it writes for an MBR disk is simple: boot.img in the MBR code area, and core.img
    (grub-mkimage's output: diskboot.img, then the compressed kernel and modules) from sector 1.
    boot.img's default kernel sector (1) and diskboot.img's default blocklist start (sector 2)
    already describe that layout; both are checked rather than assumed.
    """
    core = work / "core.img"
    res = debian.run(
        [
            "grub-mkimage",
            "-O",
            "i386-pc",
            "-o",
            str(core),
            "-p",
            "(hd0,msdos1)/boot/grub",
            *GRUB_MODULES,
        ],
        timeout=120,
    )
    if res.returncode != 0:
        raise SetupError(f"grub-mkimage failed: {debian.last_error(res.stderr)}")
    core_img = core.read_bytes()
    boot_img = (GRUB_DIR / "boot.img").read_bytes()
    if struct.unpack_from("<Q", boot_img, 0x5C)[0] != 1:
        raise SetupError("GRUB's boot.img does not load its core from sector 1: unknown GRUB")
    if struct.unpack_from("<Q", core_img, 0x1F4)[0] != 2:
        raise SetupError("GRUB's core.img does not continue at sector 2: unknown GRUB")
    if len(core_img) > (PART_START - 1) * SECTOR:
        raise SetupError(f"GRUB's core image ({len(core_img)} bytes) does not fit before 1 MiB")
    mbr = bytearray(boot_img[:0x1B8])
    mbr[0x66:0x68] = b"\x90\x90"  # as grub-bios-setup does for a hard disk: trust the BIOS's drive
    with open(disk, "r+b") as f:
        f.seek(0)
        f.write(bytes(mbr))
        f.seek(SECTOR)
        f.write(core_img)


def _make_disk(rootfs: Path, raw: Path, root_uuid: str, work: Path) -> None:
    size = DISK_MIB << 20
    with open(raw, "wb") as f:
        f.truncate(size)
        f.seek(0x1B8)
        f.write(_partition_table(size // SECTOR))
    fs_kib = (size - PART_START * SECTOR) // 1024
    res = debian.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "vmigdb-root",
            "-U",
            root_uuid,
            "-E",
            f"offset={PART_START * SECTOR}",
            "-d",
            str(rootfs),
            str(raw),
            f"{fs_kib}k",
        ],
        timeout=900,
    )
    if res.returncode != 0:
        raise SetupError(f"mke2fs failed: {debian.last_error(res.stderr)}")
    _install_grub(raw, work)


def _kernel_release(rootfs: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels or not any((rootfs / "boot").glob("initrd.img-*")):
        raise SetupError("the image has no kernel or no initramfs in /boot: mmdebstrap went wrong")
    return kernels[-1].name.removeprefix("vmlinuz-")


def build_disk(cache_dir: Path | None = None, *, log: logging.Logger = LOG) -> DiskImage:
    """Build the test disk image unless the cache holds one made from the same recipe."""
    cache_dir = (cache_dir or default_cache_dir()).expanduser()
    disk_dir = cache_dir / "disk"
    disk_dir.mkdir(parents=True, exist_ok=True)
    program_dir, programs_key = programs.build_programs(
        cache_dir, programs.list_programs(PROGRAM_DIR), log=log
    )
    key = recipe_key(programs_key)[:16]
    image = disk_dir / f"debian12-{key}.qcow2"
    meta = disk_dir / f"debian12-{key}.json"
    with open(disk_dir / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if image.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            log.info("test disk: cached %s", image)
            return DiskImage(image, info["release"], program_dir, info["root_uuid"])
        _require_tools()
        start = time.monotonic()
        root_uuid = str(uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32]))
        work = Path(tempfile.mkdtemp(dir=disk_dir, prefix=".build-"))
        try:
            overlay = work / "overlay"
            names = [p.name for p in programs.list_programs(PROGRAM_DIR)]
            _write_overlay(overlay, root_uuid, program_dir, names)
            rootfs = work / "rootfs"
            _mmdebstrap(rootfs, overlay, log)
            release = _kernel_release(rootfs)
            raw = work / "disk.raw"
            _make_disk(rootfs, raw, root_uuid, work)
            shutil.rmtree(rootfs)
            tmp_image = work / "disk.qcow2"
            res = debian.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_image)],
                timeout=900,
            )
            if res.returncode != 0:
                raise SetupError(f"qemu-img convert failed: {debian.last_error(res.stderr)}")
            tmp_image.chmod(0o444)  # boot overlays of it, never the image itself
            os.replace(tmp_image, image)
            meta.write_text(json.dumps({"release": release, "root_uuid": root_uuid}) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in disk_dir.glob("debian12-*"):
            if not old.name.startswith(f"debian12-{key}"):
                old.unlink(missing_ok=True)  # an image from an older recipe
        log.info(
            "test disk built in %.0f s: %s (kernel %s)", time.monotonic() - start, image, release
        )
        return DiskImage(image, release, program_dir, root_uuid)
