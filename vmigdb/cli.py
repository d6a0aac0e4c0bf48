"""Command line: `vmigdb qemu`, `vmigdb demo`, `vmigdb guest build`.

A problem the user must fix (QEMU missing, a kernel path wrong, a port taken) is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import sys
from pathlib import Path

from vmigdb.errors import SetupError
from vmigdb.hv.qemu.process import DEFAULT_TIME_MODE, TIME_MODE_CHOICES

log = logging.getLogger("vmigdb")

DEFAULT_LISTEN = "127.0.0.1:1234"


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT or unix:PATH")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --listen address (a debugger port is root on the guest)",
    )
    parser.add_argument("--smp", type=int, default=1, help="number of vCPUs")
    parser.add_argument("--memory", type=int, default=512, metavar="MIB", help="guest RAM")
    parser.add_argument("--serial", type=Path, help="file that receives the guest console")
    parser.add_argument("--accel", choices=["auto", "tcg", "kvm"], default="auto")
    parser.add_argument("--append", default="", help="added to the kernel command line")
    parser.add_argument(
        "--stealth",
        choices=["default", "strict"],
        default="default",
        help="strict: refuse any mechanism the guest could see (monitor stealth lists them)",
    )
    parser.add_argument(
        "--time",
        choices=TIME_MODE_CHOICES,
        default=DEFAULT_TIME_MODE,
        help="guest clocks while the guest runs (all stop while GDB holds it stopped). "
        "icount (TCG only): guest time counts instructions, so the debugger leaves no timing "
        "trace; all vCPUs share one host thread, at most 125 M instructions/s (a busy guest ran "
        "6-8x slower here). host: host time; breakpoints and steps make QEMU retranslate code, "
        "which RDTSC can time. auto (default): icount under TCG with 1 vCPU, else host",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmigdb",
        description="Serve a whole virtual machine to GDB, from the hypervisor side.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: packet traces")
    sub = parser.add_subparsers(dest="command", required=True)

    qemu = sub.add_parser("qemu", help="boot a kernel under QEMU and serve it to GDB")
    qemu.add_argument("--kernel", type=Path, required=True)
    qemu.add_argument("--initrd", type=Path)
    _add_serve_options(qemu)
    qemu.add_argument("qemu_args", nargs="*", help="after --: extra QEMU arguments")

    demo = sub.add_parser("demo", help="build (once) and serve the demo Linux guest")
    _add_serve_options(demo)

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
            return _guest_build()
        if args.command == "symbols":
            return _symbols(args)
        return asyncio.run(_serve(args))
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


def _bind(listen: str, allow_remote: bool):
    from vmigdb.rsp.server import ListenAddress, bind_listener

    try:
        address = ListenAddress.parse(listen)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    if not address.is_loopback() and not allow_remote:
        raise SetupError(
            f"refusing to listen on non-loopback {address}: anyone who reaches a debugger port "
            "owns the guest; pass --allow-remote if you mean it"
        )
    try:
        return address, bind_listener(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SetupError(
                f"{address} is already in use: pick another with --listen HOST:PORT"
            ) from None
        raise SetupError(f"cannot listen on {address}: {exc.strerror or exc}") from None


async def _tail(path: Path, stop: asyncio.Event) -> None:
    """Copy the guest console to our stdout, so a newcomer sees the guest boot."""
    offset = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            if data:
                offset += len(data)
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def _serve(args: argparse.Namespace) -> int:
    from vmigdb.debugger.engine import Debugger
    from vmigdb.debugger.policy import StealthMode
    from vmigdb.hv.qemu.launch import launch_qemu
    from vmigdb.hv.qemu.process import QemuConfig
    from vmigdb.rsp.server import RspServer

    address, listener = _bind(args.listen, args.allow_remote)
    show_console = False
    if args.command == "demo":
        from vmigdb.images.build import build_guest

        image = build_guest()
        kernel, initrd, extra = image.kernel, image.initrd, ()
        show_console = args.serial is None
    else:
        kernel, initrd, extra = args.kernel, args.initrd, tuple(args.qemu_args)
    config = QemuConfig(
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
    stop_tail = asyncio.Event()
    tail = None
    server = None
    try:
        debugger = Debugger(machine.driver, StealthMode(args.stealth))
        debugger.resume({cpu: "c" for cpu in debugger.cpus()})  # the guest boots running
        server = RspServer(debugger, local=address.is_loopback())
        await server.start(listener)
        if show_console:
            log.info("guest console (also in %s):", machine.process.console_log)
            tail = asyncio.create_task(_tail(machine.process.console_log, stop_tail))
        elif args.serial is None:
            log.info("guest console: %s", machine.process.console_log)
        print(f"listening on {address}", flush=True)

        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted.set)
        assert server.finished is not None
        waiter = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait([server.finished, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if server.finished.done():
            event = server.finished.result()
            if event is not None:  # QEMU went away on its own
                words = machine.process.last_words()
                status = machine.process.poll()
                print(
                    f"vmigdb: QEMU exited (status {status})"
                    + (f"; its last words:\n{words}" if words else ""),
                    file=sys.stderr,
                )
                return 1
            return 0
        log.info("shutting down")
        return 0
    finally:
        stop_tail.set()
        if tail is not None:
            await tail
        if server is not None:
            await server.close()
        await machine.shutdown()
