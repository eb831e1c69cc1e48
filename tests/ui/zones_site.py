"""A site with the page on and real cameras: one on vtest.avi (looped), one whose file is missing, a meter.

Shared by test_zones.py (HTTP) and test_zones_browser.py (Playwright). The camera runs the real
detector (the built YOLOv3-tiny): the driver refuses to start without its model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import yaml

from tests.conftest import AgentProcess, Mosquitto, free_port, wait_for
from tests.ui.site import HEADERS, signed_in, start_agent

PASSWORD = "zones-password-51ac"  # noqa: S105 - the test's own
LAWN = [[50, 380], [250, 380], [250, 480], [50, 480]]  # vtest.avi pixels: grass, never a vehicle
FRAME = (768, 576)  # vtest.avi


def write_site(folder: Path, broker: Mosquitto, vtest: Path) -> tuple[Path, int]:
    """The site file (with comments the zone editor must keep) and the page's port."""
    port = free_port()
    config = folder / "site.yaml"
    config.write_text(
        "# zones test site: this comment stays\n"
        "gateway: {id: gw-zones, site: lab}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1, reconnect_min: 200ms,"
        " reconnect_max: 1s}\n"
        f"buffer: {{path: {folder / 'var' / 'buffer.db'}}}\n"
        f'ui: {{enabled: true, listen: "127.0.0.1:{port}"}}\n'
        "devices:\n"
        "  - id: cam-1          # the looped test clip\n"
        "    driver: camera\n"
        f"    source: {vtest}\n"
        "    fps: 1\n"
        "    max_interval: 1s\n"
        "    parking_bays:\n"
        f"      - {{id: lawn, polygon: {LAWN}, debounce: 1s}}\n"
        "    report_interval: 1m  # after the zones: stays\n"
        "  - id: cam-dark       # its file is missing: no frame ever\n"
        "    driver: camera\n"
        f"    source: {folder / 'missing.avi'}\n"
        "    reconnect_min: 200ms\n"
        "    reconnect_max: 1s\n"
        f"    waiting_areas: [{{id: kerb, polygon: {LAWN}}}]\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 1s}\n"
    )
    return config, port


class ZoneSite:
    """The running agent and broker; ``client()`` is a logged-in HTTP session."""

    def __init__(self, folder: Path, vtest: Path) -> None:
        self.folder = folder
        self.broker = Mosquitto(folder)
        self.broker.start()
        self.config, self.port = write_site(folder, self.broker, vtest)
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{self.port}"
        signed_in(self.agent, self.port, PASSWORD).close()

    @contextmanager
    def client(self) -> Iterator[httpx2.Client]:
        with httpx2.Client(base_url=self.url, headers=HEADERS, timeout=30) as c:
            assert c.post("/api/login", json={"password": PASSWORD}).status_code == 200
            yield c

    def first_frame(self, client: httpx2.Client, device: str = "cam-1") -> httpx2.Response:
        """The camera's first frame (it starts with its model load, and again after a reload that
        changed its zones): one request a second, as the page allows."""

        def got() -> httpx2.Response | None:
            r = client.get(f"/api/camera/{device}/frame")
            if r.status_code == 200:
                return r
            assert r.status_code in (429, 503), r.text
            time.sleep(1.0)
            return None

        found: httpx2.Response = wait_for(got, 30, f"a frame from {device}")
        return found

    def device(self, device: str) -> dict[str, Any]:
        """A device's entry in the site file as it is now on disk."""
        return {d["id"]: d for d in yaml.safe_load(self.config.read_text())["devices"]}[device]

    def stop(self) -> None:
        self.agent.kill()
        self.broker.stop()
