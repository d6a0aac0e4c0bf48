"""Command line: `vmigdb qemu`, `vmigdb demo`, `vmigdb attach`, `vmigdb dump`, `vmigdb xen`,
`vmigdb symbols`, `vmigdb guest build`.

A problem the user must fix (QEMU missing, a kernel path wrong, a port taken) is one line on stderr and
exit status 2. Each serving subcommand is a `vmigdb.serve.ServeCommand` in `SERVE_COMMANDS`: its
arguments and a factory for its machine; the serve loop and the protocol layer are shared.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from vmigdb.attach_cmd import ATTACH
from vmigdb.dump_cmd import DUMP
from vmigdb.errors import SetupError
from vmigdb.qemu_cmd import DEMO, QEMU
from vmigdb.serve import ServeCommand, add_serve_options, serve
from vmigdb.wire.awake import new_event_loop
from vmigdb.xen_cmd import XEN

SERVE_COMMANDS: tuple[ServeCommand, ...] = (QEMU, DEMO, ATTACH, DUMP, XEN)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmigdb",
        description="Serve a whole virtual machine to GDB, from the hypervisor side.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: packet traces")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in SERVE_COMMANDS:
        serving = sub.add_parser(command.name, help=command.help)
        add_serve_options(serving)
        command.add_arguments(serving)

    symbols = sub.add_parser(
        "symbols", help="write the guest kernel's symbol ELF (for LLDB, IDA, Ghidra, radare2)"
    )
    symbols.add_argument("--out", type=Path, required=True, help="ELF file to write")
    source = symbols.add_mutually_exclusive_group(required=True)
    source.add_argument("--kernel", type=Path, help="boot this kernel under QEMU and read it")
    source.add_argument("--from", dest="server", metavar="HOST:PORT", help="a running vmigdb")
    symbols.add_argument("--initrd", type=Path)
    symbols.add_argument("--append", default="", help="added to the kernel command line")

    guest = sub.add_parser("guest", help="the demo guest image")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True)
    guest_sub.add_parser("build", help="fetch the kernel, build the initramfs, print their paths")
    guest_sub.add_parser(
        "build-disk",
        help="build (once) the Debian 12 test disk image (systemd, GRUB; needs root), print its path",
    )
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.INFO
    logging.basicConfig(level=level, format="vmigdb: %(message)s", stream=sys.stderr)
    if not verbosity:
        logging.getLogger("vmigdb.images").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "guest":
            return _guest_build_disk() if args.guest_command == "build-disk" else _guest_build()
        if args.command == "symbols":
            return _symbols(args)
        command = next(c for c in SERVE_COMMANDS if c.name == args.command)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(serve(command, args))
    except SetupError as exc:
        print(f"vmigdb: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _guest_build() -> int:
    from vmigdb.images.build import build_guest

    image = build_guest()
    print(f"kernel: {image.kernel}")
    print(f"initrd: {image.initrd}")
    return 0


def _guest_build_disk() -> int:
    from vmigdb.images.disk import build_disk

    image = build_disk()
    print(f"disk: {image.path}")
    print(f"kernel release: {image.release}")
    print(f"programs: {image.programs}")
    return 0


def _symbols(args: argparse.Namespace) -> int:
    from vmigdb.symbols_cmd import symbols_from_boot, symbols_from_server

    if args.server:
        elf = symbols_from_server(args.server)
    else:
        if not args.kernel.is_file():
            raise SetupError(f"kernel {args.kernel} not found: pass --kernel PATH to a bzImage")
        elf = symbols_from_boot(args.kernel, args.initrd, args.append)
    args.out.write_bytes(elf)
    print(f"symbols: {args.out} ({len(elf)} bytes)")
    return 0
