"""A small pygdbmi wrapper for tests that need GDB interactively (^C while running, stop records)."""

from __future__ import annotations

import time

from pygdbmi.gdbcontroller import GdbController


class Gdb:
    def __init__(self, address: str, *, remote_timeout: int | None = None) -> None:
        self.ctl = GdbController(command=["gdb", "-nx", "--quiet", "--interpreter=mi3"])
        self.console: list[str] = []
        self._stops: list[dict] = []  # *stopped records not yet claimed by wait_stopped
        self.cmd("-gdb-set pagination off")
        self.cmd("-gdb-set confirm off")
        self.cmd("-gdb-set mi-async on")  # accept -exec-interrupt while the guest runs
        if remote_timeout is not None:  # GDB's default 2 s, for a guest analysed on connect
            self.cmd(f"-gdb-set remotetimeout {remote_timeout}")
        self.cmd(f"-target-select remote {address}", timeout=60)
        self.ctl.get_gdb_response(timeout_sec=0.5, raise_error_on_timeout=False)
        self._stops.clear()  # the stop GDB reports on connecting is not what tests wait for

    def cmd(self, command: str, timeout: float = 30) -> list[dict]:
        """Send one command and return responses up to its result record; raise on ^error."""
        responses = self.ctl.write(command, timeout_sec=timeout, raise_error_on_timeout=False)
        deadline = time.monotonic() + timeout
        while not any(r["type"] == "result" for r in responses) and time.monotonic() < deadline:
            responses += self.ctl.get_gdb_response(timeout_sec=1, raise_error_on_timeout=False)
        self._note(responses)
        for r in responses:
            if r["type"] == "result" and r["message"] == "error":
                raise RuntimeError(f"{command}: {r['payload']}")
        return responses

    def console_cmd(self, command: str, timeout: float = 30) -> str:
        """A CLI command; returns what GDB printed for it."""
        responses = self.cmd(f'-interpreter-exec console "{command}"', timeout)
        return "".join(r["payload"] for r in responses if r["type"] in ("console", "target"))

    def wait_stopped(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while not self._stops and time.monotonic() < deadline:
            responses = self.ctl.get_gdb_response(timeout_sec=1, raise_error_on_timeout=False)
            self._note(responses)
        if not self._stops:
            raise TimeoutError("GDB reported no stop")
        return self._stops.pop(0)

    def value(self, expression: str) -> int:
        responses = self.cmd(f'-data-evaluate-expression "{expression}"')
        for r in responses:
            if r["type"] == "result" and r["payload"] and "value" in r["payload"]:
                text = r["payload"]["value"].split()[0]
                return int(text, 0)
        raise RuntimeError(f"no value for {expression}")

    def _note(self, responses: list[dict]) -> None:
        # GDB's own console output and the target's (monitor replies, stop messages: `O` packets)
        self.console += [str(r["payload"]) for r in responses if r["type"] in ("console", "target")]
        self._stops += [
            r["payload"] or {}
            for r in responses
            if r["type"] == "notify" and r["message"] == "stopped"
        ]

    def close(self) -> None:
        try:
            self.ctl.exit()
        except Exception:  # noqa: BLE001
            pass
