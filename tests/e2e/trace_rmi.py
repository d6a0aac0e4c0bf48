"""A stand-in for Ghidra's TraceRmi server, so ghidragdb's trace can be checked without Ghidra.

Ghidra's debugger runs GDB with the `ghidragdb` plugin, which connects to Ghidra over TraceRmi
(length-delimited protobuf messages, `ghidratrace.trace_rmi_pb2`) and records what GDB sees:
registers, memory, threads. This server answers every request the way Ghidra's would in shape
(each `request_X` gets its `reply_X`; new objects get ids, `put_bytes` reports what it wrote) and
keeps every request, so a test can check the registers and bytes the plugin traced.

It needs `ghidratrace` importable (it comes with ghidragdb).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

# Requests whose reply field is not simply the request's name with "reply_".
_REPLY_FOR = {
    "request_create_root_object": "reply_create_object",
    "request_get_values_intersecting": "reply_get_values",
}


class FakeGhidra:
    def __init__(self) -> None:
        from ghidratrace import trace_rmi_pb2

        self._pb = trace_rmi_pb2
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self.port = self._listener.getsockname()[1]
        self.requests: list[tuple[str, Any]] = []
        self._next_object = 1
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        from ghidratrace.util import recv_delimited, send_delimited

        conn, _ = self._listener.accept()
        with conn:
            while True:
                try:
                    root = recv_delimited(conn, self._pb.RootMessage(), 0)
                except Exception:  # noqa: BLE001 - the plugin hung up
                    return
                kind = root.WhichOneof("msg")
                if kind is None:
                    return
                request = getattr(root, kind)
                self.requests.append((kind, request))
                if not kind.startswith("request_"):
                    continue  # replies to Ghidra's own calls (none are made here)
                reply = self._pb.RootMessage()
                name = _REPLY_FOR.get(kind, "reply_" + kind.removeprefix("request_"))
                body = getattr(reply, name)
                body.SetInParent()
                if kind == "request_negotiate":
                    body.description = "vmigdb test stand-in for Ghidra"
                elif kind in ("request_create_object", "request_create_root_object"):
                    body.object.id = self._next_object
                    self._next_object += 1
                elif kind == "request_put_bytes":
                    body.written = len(request.data)
                elif kind == "request_snapshot":
                    body.snap.snap = request.snap.snap if request.HasField("snap") else 0
                send_delimited(conn, reply)

    def of_kind(self, kind: str) -> Iterator[Any]:
        return (request for name, request in list(self.requests) if name == kind)

    def registers(self) -> dict[str, int]:
        """Every register value the plugin put, by name (the last value wins)."""
        values: dict[str, int] = {}
        for request in self.of_kind("request_put_register_value"):
            for value in request.values:
                values[value.name.lower()] = int.from_bytes(value.value, "big")
        return values

    def memory(self) -> dict[int, bytes]:
        """Every block of memory the plugin put, by start offset."""
        return {request.start.offset: request.data for request in self.of_kind("request_put_bytes")}

    def close(self) -> None:
        self._listener.close()
