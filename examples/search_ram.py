"""Search all guest RAM for a byte pattern; say which processes map each hit, and where.

    python examples/search_ram.py --connect 127.0.0.1:1234 /proc/self/status

Guest RAM is dumped to a scratch file at RAM speed (`monitor dump-memory` with `phys on`, so it
must run on vmigdb's host) and searched there; each hit's physical page is then looked up in every
process's page tables (`monitor pages user` under that process's scope) and in the kernel's linear
map of all RAM (page_offset_base).
"""

from __future__ import annotations

import argparse
import mmap
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from vmigdb.script import Process, Session

PAGE = 0x1000


@dataclass
class Hit:
    pa: int
    kernel_va: int | None
    users: list[tuple[Process, int]] = field(default_factory=list)  # (process, virtual address)


def find_physical(session: Session, pattern: bytes, scratch: Path) -> list[int]:
    hits = []
    for start, end in session.physical_ram():
        path = scratch / f"ram-{start:x}.bin"
        session.dump(str(path), start, end - start, physical=True)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram:
            at = ram.find(pattern)
            while at >= 0:
                hits.append(start + at)
                at = ram.find(pattern, at + 1)
        path.unlink()
    return hits


def user_mappings(session: Session) -> dict[int, list[tuple[Process, int]]]:
    """Physical page -> the (process, virtual page) pairs mapping it, from every process."""
    owners: dict[int, list[tuple[Process, int]]] = defaultdict(list)
    try:
        for process in session.processes():
            if process.cr3 is None:
                continue
            session.scope(process)
            for page in session.pages(user=True):
                for offset in range(0, page.size, PAGE):
                    owners[page.pa + offset].append((process, page.va + offset))
    finally:
        session.scope(None)
    return owners


def search(session: Session, pattern: bytes) -> list[Hit]:
    with tempfile.TemporaryDirectory(prefix="vmigdb-search-") as scratch:
        physical = find_physical(session, pattern, Path(scratch))
    owners = user_mappings(session)
    try:
        linear = session.read_u64(session.symbol("page_offset_base"))
    except Exception:  # noqa: BLE001 - a guest without that symbol: no kernel addresses
        linear = None
    hits = []
    for pa in physical:
        page, offset = pa & ~(PAGE - 1), pa & (PAGE - 1)
        users = [(process, va + offset) for process, va in owners.get(page, [])]
        hits.append(Hit(pa, None if linear is None else linear + pa, users))
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", metavar="HOST:PORT", required=True)
    parser.add_argument("pattern", help="text to look for (\\xNN escapes allowed)")
    args = parser.parse_args(argv)
    pattern = args.pattern.encode().decode("unicode_escape").encode("latin-1")
    with Session.connect(args.connect) as session:
        hits = search(session, pattern)
    for hit in hits:
        kernel = f" kernel {hit.kernel_va:#x}" if hit.kernel_va is not None else ""
        users = ", ".join(f"{p.name}[{p.pid}] {va:#x}" for p, va in hit.users) or "no process"
        print(f"{hit.pa:#x}:{kernel}; {users}")
    print(f"{len(hits)} hits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
