"""The site file editor over HTTP, in front of a real agent process and a real Mosquitto.

An apply reloads in process: the unchanged virtual meter polls on (its seq continues, no gap,
no second "online"), an added device starts; a refused apply (an invalid text, or a gateway.id
change the running agent refuses) leaves the file byte-identical and the running config as it
was. Backups keep the file's mode, at most 10. "add" proposes a scanned device's text without
writing it, and refuses a bad hit naming the field.
"""

from __future__ import annotations

import itertools
import re
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest

from agent.ui.siteapply import backups, digest
from tests.conftest import AgentProcess, Mosquitto, Subscriber, wait_for
from tests.ui.site import HEADERS, signed_in, start_agent, write_site

PASSWORD = "editor-password-51c3"  # noqa: S105 - the test's own
ADDED = "  - {id: meter-3, driver: virtual, kind: meter, interval: 100ms}\n"
NEAR = "\n    did you mean `eastron-sdm630`?"
BACKUP = re.compile(r"site\.yaml\.\d{8}T\d{6}Z(-\d+)?\.bak")


class Running:
    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        self.folder = folder
        self.config, port = write_site(folder, broker)
        self.config.chmod(0o600)  # it names a password file: its backups must stay as private
        self.subscriber = Subscriber(broker.port)  # before the agent: its first "online" is seen
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{port}"
        self.http = signed_in(self.agent, port, PASSWORD, timeout=20)

    def site(self) -> dict[str, Any]:
        r = self.http.get("/api/site")
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(path, json=body)
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    def apply(self, text: str, base: str | None = None) -> dict[str, Any]:
        return self.post("/api/site/apply", {"text": text, "base": base or self.site()["base"]})

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.http.get("/api/status").json()["devices"]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("ui-site-editor")
    broker = Mosquitto(folder)
    broker.start()
    running = Running(folder, broker)
    try:
        wait_for(lambda: len(running.subscriber.seqs("meter-1")) >= 3, 20, "the virtual meter's first events")
        yield running
    finally:
        running.http.close()
        running.subscriber.close()
        running.agent.kill()
        broker.stop()


def _readings(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    return [e for e in sub.snapshot() if e["device"] == device and e["type"] == "city.meter.reading"]


def _onlines(sub: Subscriber, device: str) -> int:
    return sum(
        1
        for e in sub.snapshot()
        if e["device"] == device and e["type"] == "city.device.status" and e["data"]["status"] == "online"
    )


def test_reading_and_checking_the_file(site: Running) -> None:
    with httpx2.Client(base_url=site.url, headers=HEADERS) as stranger:
        assert stranger.get("/api/site").status_code == 401
        assert stranger.post("/api/site/check", json={"text": ""}).status_code == 401
    shown = site.site()
    text = site.config.read_text()
    assert shown == {"path": str(site.config), "text": text, "base": digest(text), "writable": True}

    bad = text.replace("interval: 200ms", "interval: soon")
    line = 1 + bad.splitlines().index(next(x for x in bad.splitlines() if "soon" in x))
    checked = site.post("/api/site/check", {"text": bad})
    assert checked["problems"] == [f"{site.config}:{line}: devices[0].interval: invalid duration 'soon' "
                                   "(use e.g. 500ms, 1s, 5m)"]  # fmt: skip
    assert "-  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms}" in checked["diff"]
    assert checked["base"] == shown["base"] and len(checked["change"]) == 16

    renamed = text.replace("id: gw-ui", "id: gw-other")
    warned = site.post("/api/site/check", {"text": renamed})
    assert warned["problems"] == [] and any(w.startswith("gateway.id, buffer:") for w in warned["warnings"])
    assert site.config.read_text() == text  # a check writes nothing
    assert not list(site.folder.glob(".site.yaml.*"))  # nor leaves its temporary file


def test_bodies_the_editor_refuses(site: Running) -> None:
    huge = site.http.post("/api/site/check", json={"text": "#" * (1100 * 1024)})
    assert huge.status_code == 413 and "KiB" in huge.json()["error"]
    assert site.http.post("/api/site/check", json={"text": 5}).json() == {
        "error": "text: the site file's text is needed (a string)"
    }
    assert site.http.post("/api/site/check", content=b"[1]").status_code == 400
    short = site.http.post("/api/site/apply", json={"text": "", "base": "abc"})
    assert short.status_code == 400 and short.json()["error"].startswith("base:")
    # The guard's CSRF check covers the editor's posts too.
    assert httpx2.post(f"{site.url}/api/site/apply", json={"text": ""}, cookies=site.http.cookies).status_code == 403


def test_apply_reloads_in_process_unchanged_device_polls_on_added_one_starts(site: Running) -> None:
    before = site.config.read_bytes()
    onlines = _onlines(site.subscriber, "meter-1")
    assert onlines == 1
    seq_before = max(site.subscriber.seqs("meter-1"))
    text = before.decode() + ADDED
    applied = site.apply(text)
    assert applied["outcome"] == "applied", applied
    assert applied["changes"] == ["+meter-3"] and applied["problems"] == []
    assert BACKUP.fullmatch(applied["backup"])
    backup = site.folder / applied["backup"]
    assert backup.read_bytes() == before
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600 and stat.S_IMODE(site.config.stat().st_mode) == 0o600
    assert site.config.read_text() == text

    wait_for(lambda: len(_readings(site.subscriber, "meter-3")) >= 3, 20, "the added device's readings")
    wait_for(lambda: max(site.subscriber.seqs("meter-1")) >= seq_before + 10, 20, "the meter's next readings")
    assert _onlines(site.subscriber, "meter-1") == 1, "the unchanged meter was restarted"
    report = site.subscriber.report("meter-1")
    assert report["lost"] == [] and report["duplicates"] == 0
    times = [datetime.fromisoformat(e["time"]).timestamp() for e in _readings(site.subscriber, "meter-1")]
    gap = max(b - a for a, b in itertools.pairwise(sorted(times)))
    assert gap < 1.0, f"the unchanged meter (every 200 ms) paused {gap:.2f} s"
    assert "meter-3" in site.devices()
    log = site.agent.output()
    assert re.search(rf"ui: site change {applied['change']} by technician: applied \(\+meter-3\)", log), log[-2000:]


def _unchanged_by(site: Running, text: str) -> dict[str, Any]:
    """Apply ``text``; assert it was refused and nothing moved (file bytes, mode, backups, devices)."""
    before, kept = site.config.read_bytes(), backups(site.config)
    seq = max(site.subscriber.seqs("meter-1"))
    refused = site.apply(text)
    assert refused["outcome"] == "refused" and refused["backup"] is None and refused["changes"] == []
    assert site.config.read_bytes() == before
    assert stat.S_IMODE(site.config.stat().st_mode) == 0o600
    assert backups(site.config) == kept
    assert set(site.devices()) == {"meter-1", "meter-2", "meter-3"}
    wait_for(lambda: max(site.subscriber.seqs("meter-1")) >= seq + 5, 20, "the meter to poll on")
    assert site.http.get("/api/status").json()["gateway"] == "gw-ui"
    assert f"ui: site change {refused['change']} by technician: refused" in site.agent.output()
    return refused


def test_an_invalid_text_is_refused_and_changes_nothing(site: Running) -> None:
    text = site.config.read_text().replace("kind: meter, interval: 100ms", "kind: meter, interval: 100ms, bogus: 1")
    refused = _unchanged_by(site, text + "  - {id: meter-4, driver: virtual, kind: meter}\n")
    assert len(refused["problems"]) == 1
    assert re.fullmatch(rf"{re.escape(str(site.config))}:\d+: devices\[2\]\.bogus: .*", refused["problems"][0])


def test_a_gateway_id_change_is_refused_by_the_running_agent_and_the_file_restored(site: Running) -> None:
    text = site.config.read_text().replace("id: gw-ui", "id: gw-renamed") + "# renamed\n"
    refused = _unchanged_by(site, text)
    assert refused["problems"] == ["gateway.id and buffer changes need a restart; nothing was applied"]
    assert "refused by the running agent, file restored" in site.agent.output()


def test_a_change_to_a_file_that_moved_meanwhile_is_a_conflict(site: Running) -> None:
    shown = site.site()
    site.config.write_text(shown["text"] + "# edited on the gateway\n")
    try:
        answer = site.apply(shown["text"] + "# from the page\n", shown["base"])
        assert answer["outcome"] == "conflict" and "reload it" in answer["problems"][0]
        assert site.config.read_text().endswith("# edited on the gateway\n")
    finally:
        site.config.write_text(shown["text"])


def test_backups_keep_the_mode_and_at_most_ten(site: Running) -> None:
    text = site.config.read_text()
    for n in range(12):
        assert site.apply(f"{text}# note {n}\n")["outcome"] == "applied"
    kept = backups(site.config)
    assert len(kept) == 10 and all(BACKUP.fullmatch(p.name) for p in kept)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kept)
    assert kept[-1].read_text() == f"{text}# note 10\n"  # the newest is the file before the last apply
    again = site.apply(site.config.read_text())
    assert again["outcome"] == "applied" and again["backup"] is None  # nothing changed: no backup churn
    assert backups(site.config) == kept


# ---- add a device from a scan hit ------------------------------------------------------


def _hit(pty: str, **changed: object) -> dict[str, object]:
    return {"port": pty, "unit": 5, "baud": 9600, "parity": "N", "stopbits": 1, "profile": "eastron-sdm630"} | changed


def test_add_proposes_the_device_without_writing(site: Running, pty_port: str) -> None:
    before = site.config.read_bytes()
    proposed = site.post("/api/site/add", {"hit": _hit(pty_port, baud=19200, parity="E", stopbits=2)})
    assert proposed["device"] == "sdm630-5" and proposed["problems"] == []
    added = (
        "  - id: sdm630-5\n    driver: modbus\n    profile: eastron-sdm630\n    unit: 5\n    transport: rtu\n"
        f"    serial: {{port: {pty_port}, baudrate: 19200, parity: E, stopbits: 2}}\n"
    )
    assert added in proposed["text"] and proposed["text"].replace(added, "", 1) == before.decode()
    assert "".join(f"+{line}\n" for line in added.splitlines()) in proposed["diff"]
    assert proposed["base"] == digest(before.decode())
    assert site.config.read_bytes() == before  # only Apply writes

    applied = site.apply(proposed["text"], proposed["base"])
    assert applied["outcome"] == "applied" and applied["changes"] == ["+sdm630-5"]
    wait_for(lambda: "sdm630-5" in site.devices(), 10, "the added Modbus device on the page")
    again = site.post("/api/site/add", {"hit": _hit(pty_port)})
    assert again["device"] == "sdm630-5-2"  # the id is taken: the next free one


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"unit": 0}, "hit.unit: 0 is not one of 1..247"),
        ({"unit": 248}, "hit.unit: 248 is not one of 1..247"),
        ({"unit": "5"}, "hit.unit: a whole number is needed, not str"),
        ({"unit": True}, "hit.unit: a whole number is needed, not bool"),
        ({"baud": 9601}, "hit.baud: 9601 is not one of 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200"),
        ({"parity": "X"}, "hit.parity: N, E or O"),
        ({"stopbits": 3}, "hit.stopbits: 3 is not one of 1, 2"),
        ({"port": None}, "hit.port: the serial port's path is needed, e.g. /dev/serial/by-id/usb-..."),
        ({"port": "ttyUSB0"}, "hit.port: an absolute path under /dev is needed"),
        ({"port": "/dev/ttyUSB0, baudrate: 1"}, "hit.port: only letters, digits and / . _ : + @ - are allowed"),
        ({"port": "/dev/ttyUSB-missing"}, "hit.port: /dev/ttyUSB-missing is not a serial port on this gateway"),
        ({"port": "/etc/hostname"}, "hit.port: /etc/hostname is not a serial port on this gateway"),
        ({"profile": None}, "hit.profile: a profile name is needed"),
        ({"profile": "eastron-sdm63"}, f"hit.profile: no profile 'eastron-sdm63' on this gateway{NEAR}"),
    ],
)
def test_add_refuses_a_bad_hit_naming_the_field(
    site: Running, pty_port: str, changed: dict[str, object], message: str
) -> None:
    r = site.http.post("/api/site/add", json={"hit": _hit(pty_port, **changed)})
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text


def test_add_refuses_a_hit_that_is_not_an_object(site: Running) -> None:
    for body in ({"hit": [1]}, {}):
        r = site.http.post("/api/site/add", json=body)
        assert r.status_code == 400 and r.json()["error"].startswith("hit: an object {port, unit"), r.text
