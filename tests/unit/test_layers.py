"""The layers point down only (DESIGN.md): read every module's imports, those under TYPE_CHECKING
and inside functions too, and check the seams a new driver or OS relies on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vmigdb"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[module_name(path)] = {n for n in names if n.startswith("vmigdb")}
    return found


IMPORTS = imports()


def importers(of: str, by: str) -> list[str]:
    """Modules under `by` that import anything under `of`."""
    return sorted(
        module
        for module, names in IMPORTS.items()
        if module.startswith(by) and any(n == of or n.startswith(of + ".") for n in names)
    )


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("vmigdb.hv", "vmigdb.rsp"),
        ("vmigdb.hv", "vmigdb.debugger"),
        ("vmigdb.guest", "vmigdb.rsp"),
        ("vmigdb.guest", "vmigdb.debugger"),
        ("vmigdb.guest", "vmigdb.hv"),
        ("vmigdb.wire", "vmigdb.rsp"),
        ("vmigdb.wire", "vmigdb.hv"),
        ("vmigdb.wire", "vmigdb.debugger"),
        ("vmigdb.debugger", "vmigdb.rsp"),
        ("vmigdb.arch", "vmigdb.hv"),
    ],
)
def test_lower_layers_never_import_upper_ones(lower: str, upper: str) -> None:
    assert importers(upper, lower) == []


def test_only_the_registry_knows_the_os_implementations() -> None:
    outside = [
        m
        for m in importers("vmigdb.guest.linux", "vmigdb")
        if not m.startswith("vmigdb.guest.linux") and not m.startswith("vmigdb.images")
    ]
    assert outside == ["vmigdb.guest.registry"]


def test_the_protocol_layer_knows_no_driver() -> None:
    for driver in ("vmigdb.hv.qemu", "vmigdb.hv.xen"):
        assert importers(driver, "vmigdb.rsp") == []
        assert importers(driver, "vmigdb.debugger") == []
        assert importers(driver, "vmigdb.serve") == []


def test_the_xen_driver_has_no_branch_for_its_model() -> None:
    """The model reaches the driver only as a binding (VMIGDB_XEN_BINDING): the driver's code
    never names it."""
    for path in (PACKAGE / "hv" / "xen").rglob("*.py"):
        text = path.read_text()
        assert "xenmodel" not in text and "tests." not in text, path


def test_no_import_circles() -> None:
    graph = {m: {n for n in names if n in IMPORTS} for m, names in IMPORTS.items()}
    # `from vmigdb.x import y` where y is a module counts as importing vmigdb.x.y
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            raise AssertionError(" -> ".join([*stack[stack.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            if target != module and not module.startswith(target + "."):
                visit(target, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_scripts_talk_to_vmigdb_only_through_gdb() -> None:
    """vmigdb.script drives a GDB against a vmigdb server; it never reaches into the server's
    layers, and nothing inside the server depends on it."""
    for inner in ("vmigdb.rsp", "vmigdb.debugger", "vmigdb.hv", "vmigdb.guest", "vmigdb.arch"):
        assert importers(inner, "vmigdb.script") == []
    outside = [m for m in importers("vmigdb.script", "vmigdb") if not m.startswith("vmigdb.script")]
    assert outside == []
