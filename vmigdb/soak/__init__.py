"""scripts/soak: a long run of every GDB workload against a 2-vCPU guest, failing on any harm.

Issue 12's proving tool: a debugger must never harm its guest or lose it. Modules: `run` (the
command line and the loop), `plan` (guest facts and the seeded choice of workloads), `session` (one
batch GDB, ^C, timeouts, dump checks), `gdbside` (the workloads, run inside GDB's Python),
`console` and `serverlog` (what the guest and vmigdb print), `report` (figures, text and JSON).
GDB is driven, and the guest booted, with vmigdb.bench's helpers (gdbrun, guest).
Run it with `scripts/soak [--minutes N] [--smp N] [--seed N] [--kernel-package PKG] [--json FILE]`.
"""
