"""The zone editor's routes: a camera's latest frame, its zones, and saving new ones through the site editor.

``GET /api/zones`` lists the cameras and their zones; ``GET /api/camera/{device}/frame`` is the
camera's latest frame as a JPEG of at most 200 KB, one a second per session (never a stream);
``POST /api/camera/{device}/zones`` replaces that camera's zones in the site file's text
(:mod:`agent.ui.zones_text`) and checks (``apply: false``) or applies it through
:class:`agent.ui.siteapply.SiteEditor`, like every other change the page makes.

The frame is the one the camera driver already holds (its ``latest_jpeg``): the device is
never opened a second time. It is not blurred: it goes only to a logged-in session on the
page, never upstream.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.ui.answer import NO_STORE, Allowed, answer, error
from agent.ui.app import COOKIE, json_body
from agent.ui.siteapply import SiteEditor, read_site
from agent.ui.zones_text import ZoneTextError, replace_zones

if TYPE_CHECKING:
    from agent.runtime.agent import Agent

log = logging.getLogger("agent.ui")

MAX_JPEG = 200 * 1000  # bytes of a frame (the 200 KB)
FRAME_INTERVAL = 1.0  # seconds between frames of one session
MAX_BODY = 64 * 1024  # a save: 64 zones of 32 points with 4 decimals fit in well under this
MAX_ZONES = 64
MAX_SEEN = 1024  # (session, camera) pairs remembered for the log-once of a shown frame
POINTS = (3, 32)
KINDS = {"bay": "parking_bays", "area": "waiting_areas"}
KEEP = {"parking_bays": ("min_overlap", "debounce")}  # a redrawn bay keeps its own settings, as written


@runtime_checkable
class FrameSource(Protocol):
    """What the page needs of a camera driver (drivers/camera/driver.py ``CameraDriver``)."""

    def latest_jpeg(self, max_bytes: int) -> tuple[bytes, int, int] | None:
        """(JPEG, frame width, frame height) of the latest frame; None: none yet."""
        ...


def _zones_of(device: Any) -> list[dict[str, Any]]:
    out = []
    for kind, key in KINDS.items():
        for zone in getattr(device, key, []):
            out.append({"id": zone.id, "kind": kind, "units": zone.units, "polygon": [list(p) for p in zone.polygon]})
    return out


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def parse_zones(body: Any) -> dict[str, list[dict[str, Any]]]:
    """The posted zones as ``{parking_bays: [...], waiting_areas: [...]}``, points rounded to 4 decimals.

    Raises ValueError naming the field (``zones[2].polygon``) for anything malformed; the site
    validator checks the rest (unique ids, at least one zone) with file:line.
    """
    zones = body.get("zones") if isinstance(body, dict) else None
    if not isinstance(zones, list) or len(zones) > MAX_ZONES:
        raise ValueError(f"zones: a list of at most {MAX_ZONES} zones is needed")
    out: dict[str, list[dict[str, Any]]] = {key: [] for key in KINDS.values()}
    for n, zone in enumerate(zones):
        where = f"zones[{n}]"
        if not isinstance(zone, dict):
            raise ValueError(f"{where}: an object {{id, kind, polygon}} is needed")
        ident, kind, polygon = zone.get("id"), zone.get("kind"), zone.get("polygon")
        if not isinstance(ident, str) or not 1 <= len(ident.strip()) <= 64:
            raise ValueError(f"{where}.id: a name of 1 to 64 characters is needed")
        if kind not in KINDS:
            raise ValueError(f"{where}.kind: bay or area, not {str(kind)[:20]!r}")
        if not isinstance(polygon, list) or not POINTS[0] <= len(polygon) <= POINTS[1]:
            raise ValueError(f"{where}.polygon: {POINTS[0]} to {POINTS[1]} points are needed")
        points = []
        for point in polygon:
            if not isinstance(point, list) or len(point) != 2 or not all(_fraction(v) for v in point):
                raise ValueError(f"{where}.polygon: every point is [x, y] with x and y between 0 and 1")
            points.append([round(float(point[0]), 4), round(float(point[1]), 4)])
        out[KINDS[kind]].append({"id": ident.strip(), "units": "relative", "polygon": points})
    return out


class _Zones:
    def __init__(self, agent: Agent, allowed: Allowed, editor: SiteEditor) -> None:
        self.agent = agent
        self.allowed = allowed
        self.editor = editor
        self._last_frame: dict[str, float] = {}  # session id -> monotonic time of its last frame
        self._seen: set[tuple[str, str]] = set()  # (session id, camera) already logged

    def _camera(self, device: str) -> Any | None:
        for d in self.agent.config.devices:
            if d.id == device and d.driver == "camera":
                return d
        return None

    async def cameras(self, request: Request) -> Response:
        allowed = self.allowed(request)
        if isinstance(allowed, Response):
            return allowed
        found = [{"id": d.id, "zones": _zones_of(d)} for d in self.agent.config.devices if d.driver == "camera"]
        return answer({"cameras": found})

    def _too_soon(self, request: Request) -> Response | None:
        sid = request.cookies.get(COOKIE, "")
        now = time.monotonic()
        last = self._last_frame.get(sid)
        if last is not None and now - last < FRAME_INTERVAL:
            wait = max(1, math.ceil(FRAME_INTERVAL - (now - last)))
            return error(429, "one frame a second: wait and ask again", {"retry-after": str(wait)})
        self._last_frame = {s: t for s, t in self._last_frame.items() if now - t < FRAME_INTERVAL}
        self._last_frame[sid] = now
        return None

    async def frame(self, request: Request) -> Response:
        allowed = self.allowed(request)
        if isinstance(allowed, Response):
            return allowed
        device = request.path_params["device"]
        if self._camera(device) is None:
            return error(404, f"no camera {device[:64]!r} in the site file")
        refused = self._too_soon(request)
        if refused is not None:
            return refused
        driver = self.agent.devices.driver_of(device)
        if not isinstance(driver, FrameSource):
            return error(503, f"camera {device} is not running (starting, disabled or failed): see its status")
        try:
            got = await asyncio.to_thread(driver.latest_jpeg, MAX_JPEG)
        except ValueError as exc:
            return error(503, f"camera {device}: {exc}")
        if got is None:
            return error(503, f"camera {device} has no frame yet: check its source (see its status)")
        jpeg, width, height = got
        self._viewed(request, device, allowed.user)
        headers = NO_STORE | {"x-frame-width": str(width), "x-frame-height": str(height)}
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    def _viewed(self, request: Request, device: str, user: str) -> None:
        """Log the first frame of a camera each session sees: an unblurred image left the gateway."""
        key = (request.cookies.get(COOKIE, ""), device)
        if key in self._seen:
            return
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen.add(key)
        log.info("ui: camera %s: the latest frame shown to %s (zone editor; not blurred, not stored)", device, user)

    async def save(self, request: Request) -> Response:
        allowed = self.allowed(request)
        if isinstance(allowed, Response):
            return allowed
        device = request.path_params["device"]
        camera = self._camera(device)
        if camera is None:
            return error(404, f"no camera {device[:64]!r} in the site file")
        body = await json_body(request, MAX_BODY)
        if body is None:
            return error(400, f"a JSON object of at most {MAX_BODY // 1024} KiB is needed")
        try:
            zones = parse_zones(body)
        except ValueError as exc:
            return error(400, str(exc))
        path = self.agent.config_path
        if path is None:
            return error(409, "the agent was not started from a site file (-c FILE): there is nothing to edit")
        try:
            text = replace_zones(await asyncio.to_thread(read_site, path), device, zones, KEEP)
        except ZoneTextError as exc:
            return error(409, f"{path}: {exc}")
        if body.get("apply") is not True:
            check = await self.editor.check(text)
            result = {"problems": check.problems, "warnings": check.warnings, "diff": check.diff, "base": check.base}
            return answer(result)
        base = body.get("base")
        applied = await self.editor.apply(text, base if isinstance(base, str) else "", allowed.user)
        status = {"applied": 200, "conflict": 409}.get(applied.outcome, 422)
        backup = str(applied.backup) if applied.backup else None
        done = {"outcome": applied.outcome, "problems": applied.problems, "changes": applied.changes,
                "backup": backup, "change": applied.change}  # fmt: skip
        return answer(done, status)


def zone_routes(agent: Agent, allowed: Allowed, editor: SiteEditor | None = None) -> list[Route]:
    """The zone editor's routes for ``agent``'s page; ``allowed`` is the page's session check."""
    zones = _Zones(agent, allowed, editor or SiteEditor(agent))
    return [
        Route("/api/zones", zones.cameras),
        Route("/api/camera/{device}/frame", zones.frame),
        Route("/api/camera/{device}/zones", zones.save, methods=["POST"]),
    ]
