"""scripts/bench: vmigdb against QEMU's own gdbstub, the same GDB 13 commands on the same guest.

Modules: `run` (the command line and the order of things), `guest` (booting either server),
`gdbrun` (batch GDB driven by Python scripts, with timeouts), `workloads` (what is measured),
`idle` (the guest's speed while attached), `observe` (ticker console and /proc/PID/smaps parsing),
`stats` (medians, ratios, targets, table, JSON, markdown).
Run it with `scripts/bench [--quick] [--json FILE] [--markdown FILE]`.
"""
