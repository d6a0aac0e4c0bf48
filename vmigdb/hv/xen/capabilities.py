"""What the Xen driver does to the guest, mechanism by mechanism, and whether the guest could tell."""

from __future__ import annotations

from vmigdb.hv.base import Capabilities, Mechanism

SPLIT_VIEW = Mechanism(
    "xen-altp2m-split-view",
    "altp2m split view: 0xCC in a shadow copy of the page that only execution sees (DRAKVUF's "
    "scheme); the guest's reads and writes of the page trap and are served from the original page "
    "for one MTF step, a write re-copies the shadow",
    False,
    None,
    "the guest's reads of its code see the original bytes and its own int3s reach its handler "
    "exactly once; the shadow frames are extra guest-physical frames above the guest's RAM, which "
    "only a guest probing physical addresses outside its memory map could find",
)

CAPABILITIES = Capabilities(
    registers=Mechanism(
        "xen-vcpu-context",
        "vCPU state through libvmi (Xen's HVM context of the paused vCPU)",
        False,
        why="read from the hypervisor while the domain is paused; nothing runs in the guest "
        "(FPU/SSE registers are not read: libvmi's register API has none, GDB sees zeros)",
    ),
    memory_read=Mechanism(
        "xen-foreign-map",
        "guest-physical reads through libvmi (foreign mappings of the host p2m) + vmigdb's page walk",
        False,
        why="no guest code runs; reads see the original pages, never a shadow",
    ),
    memory_write=Mechanism(
        "xen-foreign-write",
        "guest-physical writes through libvmi (shadows of the page re-copied)",
        True,
        why="the guest sees the bytes you write, as asked; nothing else changes",
    ),
    sw_breakpoint=SPLIT_VIEW,
    hw_breakpoint=SPLIT_VIEW,
    watchpoint=Mechanism(
        "xen-ept-watch",
        "EPT permissions on the watched page (reads trap with writes: Xen cannot trap reads "
        "alone); the access is served from the clean view for one MTF step, then reported",
        False,
        why="no debug register and no guest page-table change; other accesses to the page are "
        "served the same way and not reported",
    ),
    single_step=Mechanism(
        "xen-mtf",
        "Monitor Trap Flag (VT-x), one vCPU at a time",
        False,
        why="RFLAGS.TF is never touched and no #DB reaches the guest",
    ),
    run_control=True,
    register_write=True,
    extra=(
        Mechanism(
            "xen-int3-intercept",
            "int3 intercepted through the exception bitmap (libvmi IntEvent)",
            False,
            why="vmigdb's int3s are consumed; the guest's own are reinjected, its handler runs once",
        ),
        Mechanism(
            "xen-cr3-intercept",
            "CR3-write intercept: a vCPU entering a scoped address space switches to that "
            "space's view, so scoped breakpoints are live only there",
            False,
            why="CR3 writes complete as the guest asked; only their timing changes",
        ),
        Mechanism(
            "xen-msr-intercept",
            "MSR-write intercept of LSTAR, CSTAR and the SYSENTER MSRs (monitor catch msr-write)",
            False,
            why="the write completes as the guest asked; only its timing changes",
        ),
        Mechanism(
            "xen-exec-written",
            "written-then-executed pages by EPT W^X on the guest's pages (monitor catch "
            "exec-written): a page written loses execute, a page executed loses write",
            False,
            why="each page traps once per write/execute alternation; only timing changes",
        ),
        # Declared, not gated: every stop shows in the TSC, whatever the mechanism.
        Mechanism(
            "xen-tsc",
            "the guest's TSC while vmigdb holds the domain paused",
            True,
            why="Xen keeps the guest's TSC counting while the domain is paused, and every trapped "
            "access adds a VM exit's latency",
        ),
    ),
)
