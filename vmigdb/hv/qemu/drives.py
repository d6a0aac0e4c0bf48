"""Disk images on QEMU's command line (`vmigdb qemu --drive FILE[,format=qcow2|raw][,if=...]`), and
the node that holds snapshots' VM state.

Each disk is two -blockdev nodes (the file, then its format) and a device, so every node has a
name vmigdb chose: snapshots list the disks by node name (`snapshot-save devices=[...]`). The VM
state node is a qcow2 file in vmigdb's private directory opened as a -blockdev with no device:
the guest sees no disk, and QEMU can write VM state into it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmigdb.errors import SetupError

FORMATS = ("qcow2", "raw")
INTERFACES = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd"}
QCOW2_MAGIC = b"QFI\xfb"
VMSTATE_NODE = "vmigdb-vmstate"


@dataclass(frozen=True)
class Drive:
    path: Path
    format: str
    interface: str = "virtio"
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> Drive:
        """`FILE[,format=qcow2|raw][,if=virtio|ide|scsi][,readonly=on]`; the format is read from
        the file's header when not given. :raises SetupError: with what is wrong."""
        name, *options = spec.split(",")
        path = Path(name)
        if not path.is_file():
            raise SetupError(f"disk image {name} does not exist or is not a file: check the path")
        fmt = iface = None
        readonly = False
        for option in options:
            key, sep, value = option.partition("=")
            if key == "format" and value in FORMATS:
                fmt = value
            elif key == "if" and value in INTERFACES:
                iface = value
            elif key == "readonly" and value in ("on", "off"):
                readonly = value == "on"
            else:
                raise SetupError(
                    f"--drive {spec}: unknown option {option!r} (use FILE[,format=qcow2|raw]"
                    "[,if=virtio|ide|scsi][,readonly=on]; a file name cannot hold a comma)"
                )
        return cls(path, fmt or sniff_format(path), iface or "virtio", readonly)


def sniff_format(path: Path) -> str:
    """qcow2 if the file starts with qcow2's magic, else raw (as QEMU would guess, minus the
    danger: the format is then passed explicitly, so a guest cannot turn a raw disk into qcow2)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def _opt(value: object) -> str:
    return str(value).replace(",", ",,")


def node_name(index: int) -> str:
    return f"disk{index}"


def drive_args(drives: tuple[Drive, ...]) -> list[str]:
    """QEMU arguments for the disks, in order (the first is the one the firmware boots)."""
    args: list[str] = []
    has_scsi = any(d.interface == "scsi" for d in drives)
    if has_scsi:
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, drive in enumerate(drives):
        node = node_name(index)
        ro = ",read-only=on" if drive.readonly else ""
        args += [
            "-blockdev",
            f"driver=file,node-name={node}-file,filename={_opt(drive.path)}{ro}",
            "-blockdev",
            f"driver={drive.format},node-name={node},file={node}-file{ro}",
            "-device",
            f"{INTERFACES[drive.interface]},drive={node},bootindex={index}",
        ]
    return args


def vmstate_args(path: Path) -> list[str]:
    """The VM-state node: qcow2, no device attached, so the guest cannot see it."""
    return [
        "-blockdev",
        f"driver=qcow2,node-name={VMSTATE_NODE},file.driver=file,file.filename={_opt(path)}",
    ]


def create_vmstate_image(path: Path) -> bool:
    """An empty qcow2 for VM state, made by qemu-img; False (snapshots unavailable) without it.
    Its virtual size does not bound the state it holds: QEMU stores VM state past the end of the
    virtual disk."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return False
    res = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", str(path), "1M"],
        capture_output=True,
        text=True,
        check=False,
        umask=0o077,  # the VM's memory will be written into it: owner only, like the RAM file
    )
    return res.returncode == 0
