"""Trace every openat(2) of one guest process, with the path read from guest memory.

    python examples/trace_openat.py probe                          # boots the demo guest
    python examples/trace_openat.py --connect 127.0.0.1:1234 probe # a running vmigdb

The breakpoint sits in the kernel (openat reaches do_sys_openat2(dfd, filename, how)), fires only
in the named process (vmigdb checks its page tables), and the path is read from the process's own
memory at the user pointer in rsi.
"""

from __future__ import annotations

import argparse
import sys

from vmigdb.script import Session


def trace(session: Session, name: str, count: int = 5, timeout: float = 60) -> list[str]:
    process = session.process(name)
    paths: list[str] = []

    def on_openat(stop):
        paths.append(stop.read_string(stop.regs["rsi"]))
        print(f"{stop.process.name}[{stop.process.pid}] openat {paths[-1]}", flush=True)

    session.on_break("do_sys_openat2", on_openat, process=process)
    session.run(until=lambda: len(paths) >= count, timeout=timeout)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("process", help="a process name or pid")
    parser.add_argument("--connect", metavar="HOST:PORT", help="a running vmigdb server")
    parser.add_argument("--count", type=int, default=5, help="stop after this many calls")
    args = parser.parse_args(argv)
    which = int(args.process) if args.process.isdigit() else args.process
    if args.connect:
        session = Session.connect(args.connect)
    else:
        session = Session.start(
            "demo", append="vmigdb.programs=probe", wait_for="vmigdb-guest: ready"
        )
    with session:
        paths = trace(session, which, args.count)
    return 0 if len(paths) >= args.count else 1


if __name__ == "__main__":
    sys.exit(main())
