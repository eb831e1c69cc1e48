"""What an installed bundle means to the agent's config: its sections, its profiles, and the start-up reconcile.

A bundle's ``config.json`` is ``{"sections": {...}}``, as a desired document's; a text value starting
with ``{bundle}/`` names a file of the bundle (``model: "{bundle}/models/yolo.yaml"``) and becomes
the path of that version's own folder, so a new model is a changed setting and its device restarts
on the reload. Profiles are looked up in ``<bundles>/current/profiles`` before any other folder:
the switch of ``current`` is what makes them take effect, through the reload's validation.

Order of a commit (agent/fleet/bundles/runner.py): the bundle store's commit, then the remote
config's ``applied.json``. ``kill -9`` between the two leaves the config apply pending with the
bundle committed: :func:`prepare` finishes it at the next start, so config and files never differ. A
bundle installed with no agent running (``edge-agent bundle apply``'s offline install) has its
config made the applied one the same way, at the next start.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError
from agent.fleet.bundles.store import BundleStore, bundles_dir
from agent.fleet.desired.document import digest_of, sections_hash
from agent.fleet.desired.state import Applied, DesiredState

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
PLACEHOLDER = "{bundle}/"
PROFILES_ENV = "EDGE_AGENT_PROFILES"  # drivers/modbus/profiles.py reads it at each lookup


def use_profiles(root: Path) -> None:
    """Put ``<root>/current/profiles`` first in this process's profile search (once)."""
    folder = str(root / "current" / "profiles")
    present = [p for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    if folder not in present:
        os.environ[PROFILES_ENV] = os.pathsep.join([folder, *present])


def sections_of(folder: Path) -> dict[str, Any] | None:
    """The config sections an installed (or staged) bundle carries; None if it has no config.

    Raises:
        BundleError(malformed): ``config.json`` is not ``{"sections": {...}}``.
    """
    try:
        doc = json.loads((folder / CONFIG_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError("malformed", [f"{CONFIG_NAME}: not readable JSON ({exc})"]) from None
    sections = doc.get("sections") if isinstance(doc, dict) else None
    if not isinstance(sections, dict) or set(doc) != {"sections"}:
        raise BundleError("malformed", [f'{CONFIG_NAME}: must be {{"sections": {{...}}}}'])
    resolved: dict[str, Any] = _resolve(sections, str(folder.resolve()))
    return resolved


def _resolve(value: Any, folder: str) -> Any:
    if isinstance(value, str) and value.startswith(PLACEHOLDER):
        return f"{folder}/{value[len(PLACEHOLDER) :]}"
    if isinstance(value, dict):
        return {k: _resolve(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, folder) for v in value]
    return value


def applied_of(folder: Path, version: int, running: dict[str, Any]) -> Applied:
    """The remote config a bundle makes: its sections (or, without config.json, ``running``'s)."""
    envelope = (folder / MANIFEST_NAME).read_bytes()
    sections = sections_of(folder)
    sections = running if sections is None else sections
    return Applied(version, sections_hash(sections), sections, digest_of(envelope), envelope)


def prepare(buffer_path: Path, state: DesiredState) -> None:
    """At start, before the effective config is loaded: profiles from the bundle, an uncommitted apply
    rolled back, a committed bundle whose config was not yet saved as applied saved now."""
    root = bundles_dir(buffer_path.parent)
    use_profiles(root)
    if not root.is_dir():
        return
    store = BundleStore(root)
    try:
        store.recover()
        pending = state.pending()
        running = store.current()
        if running is None or store.state().pending is not None:
            return
        previous = state.applied()
        if pending is None:
            # Installed offline (`edge-agent bundle apply` with no agent running): its config runs from now.
            if previous is not None and previous.version >= running[0]:
                return
        elif digest_of((running[1] / MANIFEST_NAME).read_bytes()) != pending.get("digest"):
            return
        applied = applied_of(running[1], running[0], previous.sections if previous else {})
    except (BundleError, OSError) as exc:
        log.error("the bundle store %s could not be recovered at start: %s", root, exc)
        return
    state.save_applied(applied)
    state.clear_pending()
    log.warning("bundle version %d is committed: its config is the applied one from now", running[0])
