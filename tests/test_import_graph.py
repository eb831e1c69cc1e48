"""The core never imports a driver, a concrete uplink, the tools, inference or the IOC's ingestion (issue 14, 17).

Drivers and uplinks reach the core only through their entry points (agent/devices/registry.py,
agent/uplinks/registry.py), so a new one is a folder plus an entry point and no edit here. The
tools (the CLI, the doctor, the demo) sit on top of the core, never under it; inference needs
the vision extra (OpenCV, onnxruntime), which a gateway without cameras does not install.

Every import statement of every core module is read from its syntax tree: at module level, in
functions, under ``if TYPE_CHECKING:``, relative ones resolved, and ``importlib.import_module``
or ``__import__`` of a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "agent"

# The core, relative to agent/: whole folders, and single modules.
CORE_FOLDERS = ("contract", "config", "devices", "store", "runtime", "observability", "protocols", "fleet", "ui")
CORE_MODULES = (
    "__init__.py",
    "errors.py",
    "docblock.py",
    "uplinks/__init__.py",
    "uplinks/api.py",
    "uplinks/registry.py",
)
# What sits outside it: the tools, inference, the IOC's ingestion, and the command line (``python -m agent`` is
# ``edge-agent``). Every folder under agent/uplinks/ is an uplink plugin.
OUTSIDE_FOLDERS = ("tools", "inference", "ingest")
OUTSIDE_MODULES = ("__main__.py",)
UPLINK_SEAM = ("api", "registry")  # the only modules of agent.uplinks the core may import


def forbidden(module: str) -> str | None:
    """Why the core must not import ``module`` (None: it may)."""
    parts = module.split(".")
    if parts[0] == "drivers":
        return "a driver"
    if parts[0] != "agent" or len(parts) < 2:
        return None
    if parts[1] == "tools":
        return "the tools"
    if parts[1] == "inference":
        return "inference (the vision extra)"
    if parts[1] == "ingest":
        return "the IOC's ingestion (the ingest extra)"
    if parts[1] == "uplinks" and len(parts) > 2 and parts[2] not in UPLINK_SEAM:
        return "a concrete uplink"
    return None


def module_name(path: Path, root: Path) -> str:
    """``agent/runtime/agent.py`` -> ``agent.runtime.agent``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every module ``path`` may import, wherever the statement is.

    ``from x import y`` yields ``x`` and ``x.y`` (``y`` may be a submodule: ``from agent.uplinks
    import mqtt``); a relative import is resolved against the module's own package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path, root).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *filter(None, [node.module])])
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def violations(path: Path, root: Path) -> list[str]:
    """One line per forbidden import in ``path``: ``file:line: imports <module> (<why>)``."""
    where = path.relative_to(root)
    found = sorted((line, module, why) for line, module in imported(path, root) if (why := forbidden(module)))
    return [f"{where}:{line}: imports {module} ({why})" for line, module, why in found]


def core_modules(agent: Path = AGENT) -> list[Path]:
    files = [agent / name for name in CORE_MODULES]
    for folder in CORE_FOLDERS:
        files += sorted((agent / folder).rglob("*.py"))
    return files


def test_no_core_module_imports_a_driver_an_uplink_the_tools_or_inference() -> None:
    modules = core_modules()
    assert len(modules) > 30, modules  # the whole core, not a corner of it
    problems = [problem for path in modules for problem in violations(path, ROOT)]
    assert problems == []


def test_the_checker_reads_the_real_imports() -> None:
    # The core does import the seam: if these were not seen, nothing would be.
    seen = {module for _, module in imported(AGENT / "runtime" / "uplinks.py", ROOT)}
    assert {"agent.uplinks.registry", "agent.uplinks.api", "agent.store.feed"} <= seen
    assert forbidden("agent.uplinks.registry") is None
    assert forbidden("agent.uplinks.mqtt.config") == "a concrete uplink"
    assert forbidden("agent.ingest.worker") == "the IOC's ingestion (the ingest extra)"


def test_every_folder_and_module_of_agent_is_core_or_named_outside_it() -> None:
    # A new folder (or a new module beside the seam) must be placed on one side, or it would go unchecked.
    def python_folders(folder: Path) -> set[str]:
        return {p.name for p in folder.iterdir() if p.is_dir() and any(p.rglob("*.py"))}

    assert python_folders(AGENT) == {*CORE_FOLDERS, *OUTSIDE_FOLDERS, "uplinks"}
    assert {p.name for p in AGENT.glob("*.py")} == {*(m for m in CORE_MODULES if "/" not in m), *OUTSIDE_MODULES}
    seam = {f"uplinks/{p.name}" for p in (AGENT / "uplinks").glob("*.py")}
    assert seam == {m for m in CORE_MODULES if m.startswith("uplinks/")}
    # The uplink plugin folders are the outside of the seam: the shipped ones are there.
    assert {"mqtt", "opcua_server"} <= python_folders(AGENT / "uplinks")
    assert all(path.is_file() for path in core_modules())


BAD = '''\
"""A core module that breaks every rule."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import drivers.virtual
from agent.uplinks import api, mqtt
from agent.uplinks.api import UplinkPlugin
from agent import __version__
from ..tools import cli

if TYPE_CHECKING:
    from agent.uplinks.opcua_server.server import OpcUaServerConfig


def later() -> None:
    from drivers import modbus
    import agent.inference
    import importlib

    importlib.import_module("agent.uplinks.mqtt.uplink")
    __import__("drivers.camera")
'''


def test_the_checker_flags_a_bad_module(tmp_path: Path) -> None:
    bad = tmp_path / "agent" / "runtime" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(BAD)
    where = "agent/runtime/bad.py"
    assert violations(bad, tmp_path) == [
        f"{where}:7: imports drivers.virtual (a driver)",
        f"{where}:8: imports agent.uplinks.mqtt (a concrete uplink)",
        f"{where}:11: imports agent.tools (the tools)",
        f"{where}:11: imports agent.tools.cli (the tools)",
        f"{where}:14: imports agent.uplinks.opcua_server.server (a concrete uplink)",
        f"{where}:14: imports agent.uplinks.opcua_server.server.OpcUaServerConfig (a concrete uplink)",
        f"{where}:18: imports drivers (a driver)",
        f"{where}:18: imports drivers.modbus (a driver)",
        f"{where}:19: imports agent.inference (inference (the vision extra))",
        f"{where}:22: imports agent.uplinks.mqtt.uplink (a concrete uplink)",
        f"{where}:23: imports drivers.camera (a driver)",
    ]


def test_the_checker_passes_a_module_that_keeps_to_the_seam(tmp_path: Path) -> None:
    good = tmp_path / "agent" / "store" / "__init__.py"
    good.parent.mkdir(parents=True)
    good.write_text(
        "from agent import __version__\n"
        "from agent.uplinks import api, registry\n"
        "from agent.uplinks.api import UplinkPlugin\n"
        "from . import feed\n"
        "import agent.uplinks\n"
    )
    assert violations(good, tmp_path) == []
    assert (4, "agent.store.feed") in set(imported(good, tmp_path))  # the relative import, resolved
