"""scripts/bench: vmigdb against QEMU's own gdbstub, the same GDB 13 commands on the same guest,
once per guest time mode (both servers get the mode's QEMU arguments).

Modules: `run` (the command line and the order of things), `guest` (booting either server),
`gdbrun` (batch GDB driven by Python scripts, with timeouts), `workloads` (what is measured),
`idle` (the guest's speed while attached), `observe` (ticker console and /proc/PID/smaps parsing),
`clocks` (the guest's own clocks per time mode, through `timemodes`), `stats` (medians, ratios,
targets, tables), `report` (text, markdown and JSON of every mode).
Run it with `scripts/bench [--quick] [--time host,icount] [--only STEPS] [--json FILE]
[--markdown FILE]`.
"""
