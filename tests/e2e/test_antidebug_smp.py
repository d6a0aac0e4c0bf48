"""The anti-debugging battery on a 2-vCPU guest under `--time icount`, where vmigdb's TCG plugin
serves run control: the whole-process session of test_antidebug (50 scoped hits, 200 `stepi`
through the probes a debugger most easily betrays, a 10 s hold, reads, detach), every round clean
and not one slow RDTSC sample, on a machine whose other vCPU keeps running kernel work and, from
the session on, a busy process (loop)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import Vm, boot, unpark_loop
from tests.e2e.test_antidebug import (  # noqa: F401 - antidebug is a fixture used by name
    HITS,
    STEP_FROM,
    STEPS_EACH,
    Antidebug,
    antidebug,
    clean_session,
    session_commands,
    summary,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest_image):
    yield from boot(
        tmp_path_factory,
        guest_image,
        smp=2,
        append="vmigdb.programs=ticker,antidebug,loop:park",
        extra=("--time", "icount"),
    )


def test_two_vcpus_whole_process_session_leaves_every_round_clean(
    vm: Vm,
    antidebug: Antidebug,  # noqa: F811 - the fixture imported above
    guest_image,
) -> None:
    unpark_loop(vm, guest_image.programs)  # a busy process beside antidebug from now on
    cmds = session_commands(guest_image.programs / "antidebug", antidebug.pid)
    out, seen = clean_session(vm, *cmds, timeout=600)
    assert "run control: vmigdb's TCG plugin" in out, out[:3000]
    hits = re.findall(r"Breakpoint \d+, (?:0x[0-9a-f]+ in )?(\w+) \(", out)
    hits = ["pushf_flags" if h == "__start_adcode" else h for h in hits]
    assert hits == ["check"] * HITS + list(STEP_FROM), hits
    stops = re.findall(r"^=> 0x[0-9a-f]+", out, re.M)
    assert len(stops) == 1 + HITS + len(STEP_FROM) * (1 + STEPS_EACH), out[-3000:]
    assert [r for r in seen if r.rdtsc_outliers] == [], summary(seen)
