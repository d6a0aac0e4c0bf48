"""Evidence for the guest deaths of issue 12: vmigdb's false-hit packet sequence sent straight to
QEMU's gdbstub, with no vmigdb in between.

On every hit of a breakpoint on the loop program's target it reads the hitting vCPU's registers
(`Hg`, `g`), steps that vCPU alone (`vCont;s:N`) and continues all (`vCont;c`), exactly what vmigdb
does for a conditional breakpoint whose condition is false, while `probe` opens a file every 50 ms
on the other vCPU. `--action interrupt` is the control: as many VM stops and continues, by ^C, with
no breakpoint and no step. Prints one summary line; the console is kept in OUTDIR.

    .venv/bin/python -m tests.evidence.qemu_step_flags --minutes 10 [--qemu BINARY] [--action step]

On QEMU 7.2 (Debian 12) the guest died of a double fault with impossible RFLAGS 3 times in 65,164
step-overs; on QEMU 10.0.2 never in 70,659; the control never in 69,244 stops. To rerun on 7.2 once
QEMU 10 is installed: `apt-get download qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3`, `dpkg -x` it
into a directory D, and pass `--qemu D/usr/bin/qemu-system-x86_64 --qemu-data /usr/share/qemu`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from vmigdb.hv.qemu.channel import QemuChannel
from vmigdb.hv.qemu.gdbstub import GdbstubClient
from vmigdb.images.build import build_guest

TARGET = 0x600000  # loop.c's `target`, static and non-PIE: the same address in every run
DEATH = re.compile(r"(?:Oops|BUG|Kernel panic)[^\n]*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--qemu-data", action="append", default=[], help="QEMU -L directory")
    parser.add_argument("--action", choices=("step", "interrupt"), default="step")
    parser.add_argument("--tcg-thread", choices=("multi", "single"), default="multi")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="step-flags-"))
    out.mkdir(parents=True, exist_ok=True)
    guest = build_guest(kernel_package="linux-image-6.12-cloud-amd64")  # the kernel line
    console, sock = out / "console.log", out / "gdb.sock"
    console.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)
    data = [a for d in args.qemu_data for a in ("-L", d)]
    qemu = subprocess.Popen(
        [args.qemu, *data, "-accel", f"tcg,thread={args.tcg_thread}", "-m", "512", "-smp", "2",
         "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
         "-append", "console=ttyS0 vmigdb.programs=loop,probe", "-serial", f"file:{console}",
         "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
         "-chardev", f"socket,id=g0,path={sock},server=on,wait=off", "-gdb", "chardev:g0"],
        stderr=open(out / "qemu.err", "wb"),
    )  # fmt: skip
    try:
        print(run(args, qemu, console, sock), flush=True)
    finally:
        qemu.terminate()
        qemu.wait(10)


def run(args: argparse.Namespace, qemu: subprocess.Popen, console: Path, sock: Path) -> str:
    def text() -> str:
        return console.read_text(errors="replace") if console.exists() else ""

    while not sock.exists():
        if qemu.poll() is not None:
            raise SystemExit(f"QEMU ended: see {console.parent}/qemu.err")
        time.sleep(0.05)
    channel = QemuChannel(GdbstubClient.connect(sock), timeout=30)
    channel.attach()
    channel.request(b"qSupported:swbreak+;hwbreak+;vContSupported+")
    channel.resume(b"vCont;c")
    deadline = time.monotonic() + 400
    while not re.search(r"probe pid=\d+ round=3", text()):
        if time.monotonic() > deadline:
            raise SystemExit("the guest did not boot")
        time.sleep(1)
    channel.interrupt()
    channel.wait_stop(30)
    stops = steps = 0
    start = time.monotonic()
    end = start + args.minutes * 60
    if args.action == "step":
        assert channel.request(b"Z0,%x,1" % TARGET) == b"OK"
    while time.monotonic() < end and not DEATH.search(text()):
        channel.resume(b"vCont;c")
        if args.action == "interrupt":
            time.sleep(0.01)
            channel.interrupt()
        stop = channel.wait_stop(60)
        stops += 1
        if args.action == "step":
            found = re.search(rb"thread:([0-9a-f]+)", stop)
            cpu = int(found.group(1), 16) if found else 1
            assert channel.request(b"Hg%x" % cpu) == b"OK"
            regs = channel.request(b"g")
            rip = int.from_bytes(bytes.fromhex(regs[16 * 16 : 17 * 16].decode()), "little")
            if rip == TARGET:
                channel.resume(b"vCont;s:%x" % cpu)
                channel.wait_stop(60)
                steps += 1
    if args.action == "step":
        channel.request(b"z0,%x,1" % TARGET)
    channel.resume(b"vCont;c")
    time.sleep(3)
    deaths = DEATH.findall(text())
    version = subprocess.run([args.qemu, "--version"], capture_output=True, text=True).stdout
    minutes = (time.monotonic() - start) / 60
    return (
        f"{version.splitlines()[0]}: {args.action} ({args.tcg_thread}-threaded TCG) for "
        f"{minutes:.1f} min: {stops} stops, {steps} step-overs, guest deaths: "
        f"{deaths[0] if deaths else 'none'} (console: {console})"
    )


if __name__ == "__main__":
    main()
