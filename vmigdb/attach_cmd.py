"""`vmigdb attach --qmp SOCKET | --libvirt DOMAIN`: serve a running QEMU that vmigdb did not start.

One GDB session per attach: when GDB detaches or goes away, or vmigdb gets SIGINT/SIGTERM, the VM
is given back as it was found (hv/qemu/attach.py) and vmigdb exits. Run it again to attach again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.serve import ServeCommand, Target


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--qmp", type=Path, metavar="SOCKET", help="QEMU's QMP unix socket")
    which.add_argument(
        "--libvirt",
        metavar="DOMAIN",
        help="a libvirt QEMU domain (through libvirt's QEMU monitor pass-through)",
    )
    parser.add_argument(
        "--connect",
        default="qemu:///system",
        metavar="URI",
        help="libvirt connection URI for --libvirt (default qemu:///system)",
    )


async def _open(args: argparse.Namespace) -> Target:
    from vmigdb.hv.qemu.attach import attach
    from vmigdb.hv.qemu.qmp import Qmp, QmpError

    if args.qmp is not None:
        if not args.qmp.is_socket():
            raise SetupError(f"{args.qmp} is not a socket: pass QEMU's -qmp unix:PATH socket")
        try:
            monitor = await Qmp.connect(args.qmp, timeout=5.0)
        except QmpError as exc:
            raise SetupError(
                f"{exc} (QEMU serves one QMP client per socket: is another one connected?)"
            ) from None
        label = f"QMP {args.qmp}"
    else:
        from vmigdb.hv.qemu.libvirt import LibvirtMonitor

        monitor = await LibvirtMonitor.open(args.connect, args.libvirt)
        label = f"libvirt domain {args.libvirt}"
    try:
        attachment = await attach(monitor, label)
    except BaseException:
        await monitor.close()
        raise
    return Target(
        driver=attachment.driver,
        close=attachment.release,
        run_at_start=attachment.found.running,  # QEMU stopped it for our gdbstub: run it again
        single_session=True,
        analyse_first=True,
        gone=lambda: "QEMU went away",
    )


ATTACH = ServeCommand(
    "attach",
    "attach to a running QEMU (QMP socket or libvirt domain) and serve it",
    _add_arguments,
    _open,
)
