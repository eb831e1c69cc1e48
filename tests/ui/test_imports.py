"""Starlette and uvicorn stay behind ``ui.enabled``: only the page's own modules import them, and the
runtime reaches those only inside the branch that starts the page (tests/ui/test_agent.py checks
the running agent; this checks every module, so a new import elsewhere is caught before it runs)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_import_graph import AGENT, ROOT, imported

WEB = ("starlette", "uvicorn", "httpx", "httpx2")
# The modules that may import them: the app, the server, the answers they share and each page part's routes.
PAGE = {"agent/ui/app.py", "agent/ui/server.py"}
PAGE |= {"agent/ui/site_routes.py", "agent/ui/zones.py", "agent/ui/bus_routes.py"}
PAGE |= {"agent/ui/clock_routes.py", "agent/ui/uplink_routes.py", "agent/ui/answer.py"}
# Light modules of agent/ui the config model and the CLI may import.
LIGHT = {"agent.ui", "agent.ui.config", "agent.ui.netif", "agent.ui.bind", "agent.ui.state", "agent.ui.tls"}


def _top_level(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (statements outside any function)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_page_imports_starlette_and_uvicorn() -> None:
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        web = {m for _, m in imported(path, ROOT) if m.split(".")[0] in WEB}
        if web and where not in PAGE:
            offenders.append(f"{where}: {sorted(web)}")
    assert offenders == []


def test_outside_agent_ui_the_page_is_imported_only_where_it_starts() -> None:
    at_import = []
    for path in sorted(AGENT.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if where.startswith("agent/ui/"):
            continue
        heavy = {m for m in _top_level(path) if m.startswith("agent.ui") and m not in LIGHT}
        if heavy:
            at_import.append(f"{where}: {sorted(heavy)}")
    assert at_import == []
    service = {m for _, m in imported(AGENT / "runtime" / "service.py", ROOT)}
    assert "agent.ui.server" in service  # seen: the checker reads function-level imports too
    assert "agent.ui.server" not in _top_level(AGENT / "runtime" / "service.py")
