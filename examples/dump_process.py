"""Dump one guest process's memory map and the pages behind it to a directory.

    python examples/dump_process.py --connect 127.0.0.1:1234 probe OUTDIR

OUTDIR gets `maps` (one line per mapped range of the process's page tables: start-end and
permissions) and one START-END.bin file per range, read through the process's own page tables
(vmigdb's process scope), whatever process the vCPUs are running at the time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmigdb.script import Mapping, Session


def dump(session: Session, which: int | str, outdir: Path) -> list[Mapping]:
    process = session.process(which)
    outdir.mkdir(parents=True, exist_ok=True)
    session.scope(process)
    try:
        mappings = [m for m in session.maps() if m.user]
        with open(outdir / "maps", "w") as out:
            for m in mappings:
                out.write(f"{m.start:016x}-{m.end:016x} r{'w' if m.writable else '-'}\n")
        for m in mappings:
            (outdir / f"{m.start:016x}-{m.end:016x}.bin").write_bytes(session.read(m.start, m.size))
    finally:
        session.scope(None)
    return mappings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", metavar="HOST:PORT", required=True)
    parser.add_argument("process", help="a process name or pid")
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    which = int(args.process) if args.process.isdigit() else args.process
    with Session.connect(args.connect) as session:
        mappings = dump(session, which, args.outdir)
    total = sum(m.size for m in mappings)
    print(f"{len(mappings)} ranges, {total} bytes in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
