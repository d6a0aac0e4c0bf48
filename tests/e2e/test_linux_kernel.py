"""Find the real demo guest's kernel and decode its kallsyms from guest RAM alone (KASLR on).

Ground truth is the guest's own /proc/kallsyms: init prints ``vmigdb-guest: ksym NAME ADDR``
(the first core-kernel entry of each name) for the symbols asked for on the command line.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from vmigdb.guest.linux.identify import find_kernel
from vmigdb.guest.linux.kallsyms import SymbolTable, locate_kallsyms, read_kallsyms
from vmigdb.guest.linux.kernel import KernelMemory, LinuxKernel
from vmigdb.hv.qemu.process import QemuConfig, QemuProcess

pytestmark = pytest.mark.e2e

if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("needs qemu-system-x86", allow_module_level=True)

BOOT_TIMEOUT = 120.0
LINKED_TEXT = 0xFFFF_FFFF_8100_0000  # where Debian's kernel is linked (CONFIG_PHYSICAL_START 16M)
EXTRA_KSYMS = [
    "jiffies",
    "init_uts_ns",
    "modules",
    "page_offset_base",
    "init_top_pgt",
    "phys_base",
    "_end",
]


class Guest:
    def __init__(self, proc: QemuProcess, console: Path) -> None:
        self.proc = proc
        text = console.read_text(errors="replace")
        self.release = re.search(r"vmigdb-guest: release (\S+)", text).group(1)  # type: ignore[union-attr]
        self.ksyms = {
            m.group(1): int(m.group(2), 16)
            for m in re.finditer(r"vmigdb-guest: ksym (\S+) ([0-9a-f]+)", text)
        }

    def read_phys(self, pa: int, length: int) -> bytes:
        return self.proc.memory.read(pa, length)

    def ranges(self) -> list[tuple[int, int]]:
        return self.proc.memory.ranges()


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    from vmigdb.images.build import build_guest, demo_append

    image = build_guest()
    console = tmp_path_factory.mktemp("kernel") / "console.log"
    proc = QemuProcess.start(
        QemuConfig(
            kernel=image.kernel,
            initrd=image.initrd,
            memory_mib=512,
            serial=console,
            append=demo_append("vmigdb.ksyms=" + ",".join(EXTRA_KSYMS)),
        )
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while "vmigdb-guest: ready" not in (
            console.read_text(errors="replace") if console.exists() else ""
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"guest did not boot: {proc.last_words()}")
            time.sleep(0.2)
        yield Guest(proc, console)
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def kernel(guest: Guest) -> LinuxKernel:
    t0 = time.perf_counter()
    k = find_kernel(guest.read_phys, guest.ranges())
    print(f"\nfind_kernel: {(time.perf_counter() - t0) * 1000:.0f} ms")
    return k


def first_by_name(symbols) -> dict[str, int]:
    """Like the guest's awk over /proc/kallsyms: the first entry of each name, in table order."""
    out: dict[str, int] = {}
    for s in symbols:
        out.setdefault(s.name, s.address)
    return out


def test_find_kernel_with_kaslr(guest: Guest, kernel: LinuxKernel) -> None:
    assert kernel.release == guest.release
    text = guest.ksyms["_text"]
    assert kernel.kaslr_offset == text - LINKED_TEXT
    assert kernel.kaslr_offset != 0, "KASLR is on in the demo guest"
    assert kernel.kernel_cr3 == kernel.kernel_image_pa(guest.ksyms["init_top_pgt"])
    mem = KernelMemory(guest.read_phys, kernel)
    # The variables themselves, read back through the image mapping.
    assert mem.u64(guest.ksyms["page_offset_base"]) == kernel.page_offset_base
    assert mem.u64(guest.ksyms["phys_base"]) == kernel.phys_base
    # The same banner through the image mapping and through the direct map (page walk).
    banner = guest.ksyms["linux_banner"]
    assert mem.string(banner).startswith(f"Linux version {guest.release} ")
    direct = kernel.page_offset_base + kernel.kernel_image_pa(banner)
    assert mem.read(direct, 64) == mem.read(banner, 64)
    assert mem.translate(direct) == kernel.kernel_image_pa(banner)
    print(
        f"release {kernel.release}, KERNELOFFSET {kernel.kaslr_offset:#x}, "
        f"phys_base {kernel.phys_base:#x}, page_offset_base {kernel.page_offset_base:#x}, "
        f"cr3 {kernel.kernel_cr3:#x}"
    )


def test_kallsyms_from_vmcoreinfo(guest: Guest, kernel: LinuxKernel) -> None:
    mem = KernelMemory(guest.read_phys, kernel)
    t0 = time.perf_counter()
    symbols = read_kallsyms(mem, kernel)
    t1 = time.perf_counter()
    table = SymbolTable(symbols)
    t2 = time.perf_counter()
    print(
        f"\nread_kallsyms: {len(symbols)} symbols in {(t1 - t0) * 1000:.0f} ms "
        f"(SymbolTable {(t2 - t1) * 1000:.0f} ms), via {locate_kallsyms(mem, kernel).source}"
    )
    assert locate_kallsyms(mem, kernel).source == "vmcoreinfo"
    assert len(symbols) > 50_000  # CONFIG_KALLSYMS_ALL: data symbols too
    first = first_by_name(symbols)
    assert {name: first.get(name) for name in guest.ksyms} == guest.ksyms
    for name in ("jiffies", "init_uts_ns", "modules", "page_offset_base"):
        assert table.lookup(name).type in "DdBbRr", name  # type: ignore[union-attr]
    idle = table.address("default_idle")
    sym, off = table.symbolize(idle + 11)  # type: ignore[misc]
    assert (sym.name, off) == ("default_idle", 11)
    assert table.symbolize(guest.ksyms["_end"]) is None
    assert [s.address for s in symbols] == sorted(s.address for s in symbols)


def test_kallsyms_by_scanning_the_image(guest: Guest, kernel: LinuxKernel) -> None:
    """The same table found without VMCOREINFO's kallsyms symbols (kernels before v6.0)."""
    stripped = replace(
        kernel, vmcoreinfo={k: v for k, v in kernel.vmcoreinfo.items() if "kallsyms" not in k}
    )
    mem = KernelMemory(guest.read_phys, stripped)
    t0 = time.perf_counter()
    symbols = read_kallsyms(mem, stripped)
    print(f"\nread_kallsyms by scan: {(time.perf_counter() - t0) * 1000:.0f} ms")
    assert locate_kallsyms(mem, stripped).source == "scan"
    reference = read_kallsyms(KernelMemory(guest.read_phys, kernel), kernel)
    assert symbols == reference
    assert {name: first_by_name(symbols).get(name) for name in guest.ksyms} == guest.ksyms


def test_timing_find_kernel_and_kallsyms(guest: Guest) -> None:
    """What a GDB connection pays: from raw RAM to a symbol table."""
    t0 = time.perf_counter()
    k = find_kernel(guest.read_phys, guest.ranges())
    t1 = time.perf_counter()
    symbols = read_kallsyms(KernelMemory(guest.read_phys, k), k)
    t2 = time.perf_counter()
    print(
        f"\nfind_kernel {(t1 - t0) * 1000:.0f} ms + read_kallsyms {(t2 - t1) * 1000:.0f} ms "
        f"= {(t2 - t0) * 1000:.0f} ms for {len(symbols)} symbols"
    )
    assert t2 - t0 < 5.0  # target well under 1 s; generous for a loaded 2-core host
