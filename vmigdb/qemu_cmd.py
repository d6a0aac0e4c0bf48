"""`vmigdb qemu` and `vmigdb demo`: boot a Linux guest under QEMU and serve it (`vmigdb.serve`)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from vmigdb.hv.qemu.process import DEFAULT_TIME_MODE, TIME_MODE_CHOICES
from vmigdb.serve import ServeCommand, Target

if TYPE_CHECKING:
    from vmigdb.hv.qemu.launch import QemuMachine


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smp", type=int, default=1, help="number of vCPUs")
    parser.add_argument("--memory", type=int, default=512, metavar="MIB", help="guest RAM")
    parser.add_argument("--serial", type=Path, help="file that receives the guest console")
    parser.add_argument("--accel", choices=["auto", "tcg", "kvm"], default="auto")
    parser.add_argument("--append", default="", help="added to the kernel command line")
    parser.add_argument(
        "--time",
        choices=TIME_MODE_CHOICES,
        default=DEFAULT_TIME_MODE,
        help="guest clocks while the guest runs (all stop while GDB holds it stopped). "
        "icount (TCG only): guest time counts instructions, so the debugger leaves no timing "
        "trace; all vCPUs share one host thread, at most 125 M instructions/s (a busy guest ran "
        "6-8x slower here). host: host time; breakpoints and steps make QEMU retranslate code, "
        "which RDTSC can time. auto (default): icount under TCG, else host (with several vCPUs on "
        "QEMU before 10, icount is kept only if the guest brings up every vCPU under it: QEMU "
        "7.2 with icount hangs Debian's 6.1 kernel; else QEMU starts again with host time)",
    )


def _add_qemu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", type=Path, help="boot this kernel (else the first --drive)")
    parser.add_argument("--initrd", type=Path)
    parser.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="FILE[,format=qcow2|raw]",
        help="a disk image (repeatable; also ,if=virtio|ide|scsi and ,readonly=on); without "
        "--kernel the guest boots from the first one with its own bootloader",
    )
    _add_machine_options(parser)
    parser.add_argument("qemu_args", nargs="*", help="after --: extra QEMU arguments")


async def _boot(
    args: argparse.Namespace,
    kernel: Path | None,
    initrd: Path | None,
    extra: tuple[str, ...],
    demo: bool,
    drives: tuple[str, ...] = (),
) -> Target:
    from vmigdb.hv.qemu.drives import Drive
    from vmigdb.hv.qemu.launch import launch_qemu
    from vmigdb.hv.qemu.process import QemuConfig

    config = QemuConfig(
        drives=tuple(Drive.parse(spec) for spec in drives),
        kernel=kernel,
        initrd=initrd,
        append=args.append,
        smp=args.smp,
        memory_mib=args.memory,
        accel=args.accel,
        serial=args.serial,
        extra_args=extra,
        time_mode=args.time,
    )
    machine = await launch_qemu(config)

    def gone() -> str:
        words = machine.process.last_words()
        status = machine.process.poll()
        return f"QEMU exited (status {status})" + (f"; its last words:\n{words}" if words else "")

    async def save_machine(path: str) -> str:
        return await save_dump(machine, path)

    return Target(
        driver=machine.driver,
        close=machine.shutdown,
        run_at_start=True,  # the guest boots running
        console=machine.process.console_log if args.serial is None else None,
        show_console=demo,
        gone=gone,
        save_machine=save_machine,
    )


async def save_dump(machine: QemuMachine, path: str) -> str:
    """`monitor dump FILE`: QEMU writes an ELF dump of the stopped guest into a file vmigdb
    creates (owner-only, never over an existing file); then the raw copy libvmi reads is made
    beside it, so that `vmigdb dump --image FILE` starts at once.

    :raises VmigdbError: (DumpRefused, SetupError) saying why nothing was saved.
    """
    from vmigdb.errors import SetupError
    from vmigdb.hv.libvmi.flatten import raw_copy
    from vmigdb.hv.qemu.dump import dump_guest_memory

    written = await dump_guest_memory(machine.qmp, path)
    vcpus = len(machine.driver.cpus())
    text = (
        f"wrote {written.path} ({written.size >> 20} MiB: all guest RAM and the registers of "
        f"{vcpus} vCPU(s); ELF, owner-only) in {written.seconds:.1f} s; the guest is still stopped"
    )
    try:
        # In a thread: reading the dump back takes seconds and the loop must stay responsive.
        made = await asyncio.to_thread(raw_copy, written.path)
    except SetupError as exc:
        return f"{text}\nno raw copy for libvmi made now ({exc}); vmigdb dump will make it"
    how = "found" if made.reused else f"made in {made.seconds:.1f} s"
    return (
        f"{text}\nraw copy for libvmi: {made.path} ({how})\n"
        f"serve it with: vmigdb dump --image {written.path}"
    )


async def _open_qemu(args: argparse.Namespace) -> Target:
    return await _boot(
        args, args.kernel, args.initrd, tuple(args.qemu_args), demo=False, drives=args.drive
    )


async def _open_demo(args: argparse.Namespace) -> Target:
    from vmigdb.images.build import build_guest, demo_append

    image = build_guest()
    args.append = demo_append(args.append)
    return await _boot(args, image.kernel, image.initrd, (), demo=True)


QEMU = ServeCommand(
    "qemu",
    "boot a kernel or a disk image under QEMU and serve it to GDB",
    _add_qemu_arguments,
    _open_qemu,
)
DEMO = ServeCommand(
    "demo", "build (once) and serve the demo Linux guest", _add_machine_options, _open_demo
)
