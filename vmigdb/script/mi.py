"""One real GDB under pygdbmi: send an MI command, get its result record or GDB's error.

pygdbmi parses GDB's MI output into dicts; this wrapper adds what a script needs on top: each
command's own result (matched by token, so asynchronous records in between are not mistaken for
it), GDB's `^error` message as a `GdbError`, the console text a CLI command printed, and the
`*stopped` records, queued until the session asks for them.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from pygdbmi.gdbcontroller import GdbController

log = logging.getLogger("vmigdb.script")


class GdbError(Exception):
    """GDB refused a command; the message is GDB's own (e.g. "Cannot access memory at ...")."""


class GdbTimeout(GdbError):
    """GDB did not answer in time."""


class Mi:
    def __init__(self, gdb: str = "gdb") -> None:
        self._ctl = GdbController(command=[gdb, "--nx", "--quiet", "--interpreter=mi3"])
        self._tokens = itertools.count(1)
        self.stops: list[dict[str, Any]] = []  # *stopped payloads not yet taken
        self.running = False

    def command(self, command: str, timeout: float = 30) -> tuple[dict[str, Any], str]:
        """Run one MI command; returns its result payload and the console text printed with it.

        :raises GdbError: with GDB's message on `^error`.
        :raises GdbTimeout: if no result came in `timeout` seconds.
        """
        token = next(self._tokens)
        self._ctl.write(f"{token}{command}", read_response=False)
        deadline = time.monotonic() + timeout
        console: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GdbTimeout(f"GDB gave no answer to {command!r} in {timeout:g} s")
            records = self._ctl.get_gdb_response(
                timeout_sec=min(remaining, 1.0), raise_error_on_timeout=False
            )
            result = None
            for record in records:  # in order: a *stopped after ^running means it stopped
                if record["type"] == "result" and record.get("token") == token:
                    result = record
                    if record["message"] == "running":
                        self.running = True
                self._note(record)
                if record["type"] in ("console", "target") and record["payload"]:
                    console.append(record["payload"])
            if result is not None:
                if result["message"] == "error":
                    payload = result["payload"] or {}
                    raise GdbError(str(payload.get("msg", payload)))
                return result["payload"] or {}, "".join(console)

    def console(self, command: str, timeout: float = 30) -> str:
        """A GDB CLI command; returns what it printed."""
        quoted = command.replace("\\", "\\\\").replace('"', '\\"')
        _, text = self.command(f'-interpreter-exec console "{quoted}"', timeout)
        return text

    def wait_stopped(self, timeout: float | None) -> dict[str, Any] | None:
        """The next `*stopped` record's payload, or None if none came in `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stops:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            for record in self._ctl.get_gdb_response(
                timeout_sec=min(remaining, 1.0), raise_error_on_timeout=False
            ):
                self._note(record)
        return self.stops.pop(0)

    def _note(self, record: dict[str, Any]) -> None:
        if record["type"] == "notify":
            if record["message"] == "stopped":
                self.running = False
                self.stops.append(record["payload"] or {})
            elif record["message"] == "running":
                self.running = True
        elif record["type"] == "log" and record["payload"]:
            log.debug("gdb: %s", str(record["payload"]).rstrip())

    def close(self) -> None:
        try:
            self._ctl.exit()
        except Exception:  # noqa: BLE001 - GDB may already be gone
            log.debug("GDB did not exit cleanly", exc_info=True)
