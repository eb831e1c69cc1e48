"""Poll-to-screen latency: from the moment a reading is taken to the moment the page shows it.

The reading's moment is its own CloudEvent ``time`` (the agent stamps a virtual meter's reading as
it is read), learned from ``/api/preview/<device>``, polled a few times per poll interval so that
no reading is missed. The screen's moment comes from Debian's chromium (Playwright), on the real
page under its own CSP: a MutationObserver, installed before the page's script by an init script
(init scripts are not subject to the page's CSP, string evaluation would be), reports every new
text of one value cell through an exposed binding, with ``Date.now()`` taken in the first
animation frame after the change, i.e. when it is painted. Agent and browser share the clock.

Helpers for bench/ui.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's package, as tests/ui/test_browser.py launches it

# Reports each new text of the watched cell with the time of the frame that paints it.
OBSERVER = """
(() => {
  const selector = %s;
  let last = null;
  const check = () => {
    const cell = document.querySelector(selector);
    const text = cell ? cell.textContent : null;
    if (text === null || text === last) return;
    last = text;
    requestAnimationFrame(() => window.benchSeen(text, Date.now()));
  };
  new MutationObserver(check).observe(document, { childList: true, subtree: true, characterData: true });
})();
"""


@dataclass
class Readings:
    """(value, wall time of the reading) of one point, as the agent stamped them."""

    device: str
    point: str
    taken: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def poll(self, port: int, cookie: str, stop: threading.Event, every: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        seen: set[str] = set()
        while not stop.wait(every):
            connection.request("GET", f"/api/preview/{self.device}", headers={"Cookie": cookie})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                self.errors.append(f"/api/preview/{self.device}: {response.status}")
                return
            for item in json.loads(body)["events"]:
                event = item["event"]
                if event is None or event["time"] in seen:
                    continue
                seen.add(event["time"])
                for m in event["data"].get("measurements", []):
                    if m.get("quantity") == self.point:
                        self.taken.append((float(m["value"]), datetime.fromisoformat(event["time"]).timestamp()))
        connection.close()

    def moment_of(self, shown: float, painted: float) -> float | None:
        """When the latest reading the screen's (3-decimal) value matches was taken, before it was painted."""
        matches = [t for v, t in self.taken if abs(v - shown) < 0.0006 and t <= painted]
        return max(matches) if matches else None


@dataclass
class Seen:
    """What the browser measured: reading-to-paint seconds, and the requests made before the first value."""

    latencies: list[float]
    first_requests: list[str]
    to_stream: list[float]  # reading to a plain stream client's receipt, over the same time


def latency(port: int, cookie: tuple[str, str], device: str, point: str, changes: int, timeout: float,
            received: list[tuple[float, float]]) -> Seen:  # fmt: skip
    """Seconds from reading to paint for ``changes`` successive values of one point on the page.

    ``received``: (value, wall time) as a plain stream client got them; those that arrive while
    the browser watches are timed from their reading too, to split the path into stream and screen.
    """
    readings = Readings(device, point)
    began = time.time()
    stop = threading.Event()
    header = f"{cookie[0]}={cookie[1]}"
    poller = threading.Thread(target=readings.poll, args=(port, header, stop, 0.2), daemon=True)
    poller.start()
    painted: list[tuple[str, float]] = []
    problems: list[str] = []
    requests: list[str] = []
    first: list[str] = []
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                context = browser.new_context(viewport={"width": 390, "height": 844})
                context.add_cookies([{"name": cookie[0], "value": cookie[1], "url": base + "/",
                                      "httpOnly": True, "sameSite": "Strict"}])  # fmt: skip
                page = context.new_page()
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("request", lambda r: requests.append(r.url))

                def seen(text: str, at: float) -> None:
                    if not painted:
                        first.extend(requests)
                    painted.append((str(text), float(at) / 1000))

                page.expose_function("benchSeen", seen)
                page.add_init_script(OBSERVER % json.dumps(f"[data-testid='value-{device}-{point}']"))
                page.goto(base + "/")
                deadline = time.monotonic() + timeout
                # The first text is whatever was current at load; each later one is a fresh reading.
                while len(painted) < changes + 1 and time.monotonic() < deadline and not problems:
                    page.wait_for_timeout(250)
                page.wait_for_timeout(500)  # the poller's last look: the last value's reading
            finally:
                browser.close()
    finally:
        stop.set()
        poller.join(10)
    if problems or readings.errors:
        raise RuntimeError(f"the page went wrong while measuring: {(problems + readings.errors)[:3]}")
    if len(painted) < changes + 1:
        raise RuntimeError(f"the page showed {len(painted) - 1} new values of {device} {point} in {timeout:g} s")
    result = []
    for text, at in painted[1:]:
        moment = readings.moment_of(float(text.split()[0]), at)
        if moment is None:
            raise RuntimeError(f"the page showed {text!r}, which no reading of {device} had")
        result.append(at - moment)
    to_stream = []
    for value, at in [r for r in received if began + 1 <= r[1] <= painted[-1][1]]:
        moment = readings.moment_of(value, at)
        if moment is None:
            raise RuntimeError(f"a stream client got {value}, which no reading of {device} had")
        to_stream.append(at - moment)
    return Seen(result, first, to_stream)
