"""The page's bus tools over HTTP, in a real agent, against ``simulate modbus`` on a real pseudo-terminal.

The scan finds the simulated SDM630 with its profile, shows progress more than once a second,
stops within a second keeping its hits, refuses a second scan and a port a running device
polls; typed reads give every 32-bit order of the registers read; bad fields get a 400 naming them.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests.conftest import wait_for
from tests.ui.bus_site import UNIT, Bench, running_bench
from tests.ui.site import MISSING_PORT

EVIDENCE = "6 sampled registers plausible; FC 43/14: Eastron SDM630-Modbus V2"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    with running_bench(tmp_path_factory.mktemp("ui-bus")) as running:
        yield running


def _scan_until_over(c: httpx2.Client, limit: float = 20) -> dict[str, Any]:
    def over() -> dict[str, Any] | None:
        view: dict[str, Any] = c.get("/api/scan").json()
        return view if view["state"] not in ("opening", "running") else None

    return wait_for(over, limit, "the scan to end")


def test_ports_name_the_device_polling_each_configured_port_and_need_a_session(bench: Bench) -> None:
    assert httpx2.get(f"{bench.url}/api/ports", timeout=5).status_code == 401
    r = bench.client.get("/api/ports")
    assert r.status_code == 200, r.text
    ports = {p["path"]: p for p in r.json()["ports"]}
    missing = ports[MISSING_PORT]
    assert missing["devices"] == ["meter-2"] and missing["present"] is False
    assert missing["adapter"] == "FTDI missing-adapter"
    assert missing["problem"].startswith(f"serial port {MISSING_PORT} not found; ")
    assert bench.pty not in ports  # meter-3 is disabled: nothing polls its port


def test_a_scan_finds_the_simulated_unit_with_its_profile_and_evidence(bench: Bench) -> None:
    c = bench.client
    r = c.post("/api/scan", json={"port": bench.pty, "baud": 9600, "parity": "N", "units": f"1-5,{UNIT}",
                                  "timeout": 0.5})  # fmt: skip
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "running" and r.json()["total"] == 6
    view = _scan_until_over(c)
    assert view["state"] == "done", view
    assert (view["done"], view["total"], view["setting"], view["error"]) == (6, 6, "9600 8N1", None)
    [hit] = view["found"]
    assert (hit["unit"], hit["baud"], hit["parity"], hit["stopbits"]) == (UNIT, 9600, "N", 1)
    assert (hit["profile"], hit["evidence"], hit["setting"]) == ("eastron-sdm630", EVIDENCE, "9600 8N1")


def test_progress_each_second_a_second_scan_409_and_stop_within_a_second_keeping_hits(bench: Bench) -> None:
    c = bench.client
    r = c.post("/api/scan", json={"port": bench.pty, "units": f"{UNIT}-247", "timeout": 0.3})
    assert r.status_code == 202, r.text
    wait_for(lambda: c.get("/api/scan").json()["found"], 15, "the simulated unit among the hits")

    seen: list[tuple[float, int]] = []
    start = time.monotonic()
    while time.monotonic() - start < 2.5:  # the progress the page polls twice a second
        view = c.get("/api/scan").json()
        seen.append((time.monotonic(), view["done"]))
        time.sleep(0.2)
    changes = [t for (t, done), (_, before) in zip(seen[1:], seen, strict=False) if done != before]
    assert view["state"] == "running" and view["unit"] > UNIT and view["setting"] == "9600 8N1"
    gaps = [b - a for a, b in zip([start, *changes], [*changes, seen[-1][0]], strict=True)]
    assert changes and max(gaps) <= 1.0, seen

    second = c.post("/api/scan", json={"port": bench.pty})
    assert second.status_code == 409 and second.json()["error"].startswith(f"a scan of {bench.pty} is running")
    read = c.post("/api/read", json={"port": bench.pty, "table": "input", "address": 0})
    assert read.status_code == 409 and "a scan is running on it" in read.json()["error"]
    began = time.monotonic()
    status = c.get("/api/status")  # the agent's loop is not held up by the sweep
    assert status.status_code == 200 and time.monotonic() - began < 0.5

    began = time.monotonic()
    stopped = c.post("/api/scan/stop")
    took = time.monotonic() - began
    assert stopped.status_code == 200 and took < 1.0, took
    view = stopped.json()
    assert view["state"] == "stopped" and view["done"] < view["total"]
    assert [(h["unit"], h["profile"]) for h in view["found"]] == [(UNIT, "eastron-sdm630")]
    assert c.get("/api/scan").json()["found"] == view["found"]  # kept after the stop


def test_a_port_a_running_device_polls_is_not_scanned(bench: Bench) -> None:
    r = bench.client.post("/api/scan", json={"port": MISSING_PORT})
    assert r.status_code == 409
    assert r.json()["error"] == (f"{MISSING_PORT} is polled by device meter-2: disable it first (enabled: false in "
                                 "the site file, then apply), then scan")  # fmt: skip


def test_a_setting_the_pty_refuses_ends_the_scan_in_one_line(bench: Bench) -> None:
    r = bench.client.post("/api/scan", json={"port": bench.pty, "baud": 9600, "parity": "E", "units": "1-2"})
    assert r.status_code == 202, r.text
    view = _scan_until_over(bench.client)
    assert view["state"] == "failed" and view["found"] == []
    assert view["error"] == (f"{bench.pty} refuses 9600 8E1 (invalid argument); a pseudo-terminal has no parity "
                             "bit: use parity N on it (the simulator rehearses parity)")  # fmt: skip


def _order(registers: list[int], name: str) -> bytes:
    raw = struct.pack(">HH", *registers)
    return bytes(raw[i] for i in {"ABCD": (0, 1, 2, 3), "CDAB": (2, 3, 0, 1), "BADC": (1, 0, 3, 2),
                                  "DCBA": (3, 2, 1, 0)}[name])  # fmt: skip


def test_typed_read_shows_raw_hex_every_word_order_and_the_modicon_reference(bench: Bench) -> None:
    r = bench.client.post("/api/read", json={"port": bench.pty, "unit": UNIT, "table": "input", "address": 0,
                                             "count": 4, "timeout": 0.5})  # fmt: skip
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["where"], result["setting"], result["table"]) == (bench.pty, "9600 8N1", "input")
    rows = result["registers"]
    assert [(x["pdu"], x["reference"]) for x in rows] == [(0, "30001"), (1, "30002"), (2, "30003"), (3, "30004")]
    assert all(x["hex"] == f"{x['value']:04x}" for x in rows)
    assert [p["pdu"] for p in result["pairs"]] == [0, 2]
    for pair in result["pairs"]:
        registers = [x["value"] for x in rows[pair["pdu"] : pair["pdu"] + 2]]
        orders = pair["orders"]
        assert set(orders) == {"ABCD", "CDAB", "BADC", "DCBA"}
        for name, shown in orders.items():
            data = _order(registers, name)
            assert shown["hex"] == data.hex()
            assert shown["uint32"] == struct.unpack(">I", data)[0]
            assert shown["int32"] == struct.unpack(">i", data)[0]
            value = struct.unpack(">f", data)[0]
            assert shown["float32"] == pytest.approx(value, rel=1e-6) if math.isfinite(value) else str(value)
        assert 200 < orders["ABCD"]["float32"] < 260  # the SDM630's phase voltage: big-endian words and bytes


def test_typed_read_by_device_and_by_modicon_reference(bench: Bench) -> None:
    r = bench.client.post("/api/read", json={"device": "meter-3", "address": "30003", "count": 2})
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["where"], result["unit"], result["table"], result["address"]) == (bench.pty, UNIT, "input", 2)
    assert 200 < result["pairs"][0]["orders"]["ABCD"]["float32"] < 260


def test_read_failures_are_one_line_naming_unit_and_port(bench: Bench) -> None:
    c = bench.client
    r = c.post("/api/read", json={"port": bench.pty, "unit": UNIT, "table": "input", "address": 9000})
    assert r.status_code == 502
    assert r.json()["error"] == f"unit {UNIT} at {bench.pty}: exception 2 (illegal data address)"
    r = c.post("/api/read", json={"port": bench.pty, "unit": 9, "table": "input", "address": 0, "timeout": 0.2})
    assert r.status_code == 502 and r.json()["error"] == f"unit 9 at {bench.pty}: timeout"
    r = c.post("/api/read", json={"port": bench.pty, "unit": UNIT, "parity": "E", "table": "input", "address": 0})
    assert r.status_code == 502
    assert r.json()["error"].startswith(f"unit {UNIT} at {bench.pty}: cannot connect to {bench.pty}: {bench.pty} "
                                        "refuses 9600 8E1 (invalid argument)")  # fmt: skip
    r = c.post("/api/read", json={"device": "meter-2", "table": "input", "address": 0})
    assert r.status_code == 502 and f"serial port {MISSING_PORT} not found" in r.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/scan", {}, "port: "),
        ("/api/scan", {"port": "COM3"}, "port: "),
        ("/api/scan", {"port": "/dev/x", "baud": 1234}, "baud: "),
        ("/api/scan", {"port": "/dev/x", "parity": "X"}, "parity: "),
        ("/api/scan", {"port": "/dev/x", "units": "0-300"}, "units: "),
        ("/api/scan", {"port": "/dev/x", "units": [1, True]}, "units: "),
        ("/api/scan", {"port": "/dev/x", "expect": 0}, "expect: "),
        ("/api/scan", {"port": "/dev/x", "first": "yes"}, "first: "),
        ("/api/scan", {"port": "/dev/x", "stopbits": 3}, "stopbits: "),
        ("/api/scan", {"port": "/dev/x", "timeout": 10}, "timeout: "),
        ("/api/read", {}, "port or device: "),
        ("/api/read", {"port": "/dev/x", "device": "meter-3", "address": 0}, "port or device: "),
        ("/api/read", {"port": "/dev/x", "table": "holdings", "address": 0}, "table: "),
        ("/api/read", {"port": "/dev/x", "table": "input", "address": -1}, "address: "),
        ("/api/read", {"port": "/dev/x", "address": "39999x"}, "address: "),
        ("/api/read", {"port": "/dev/x", "address": "30001", "table": "holding"}, "table: "),
        ("/api/read", {"port": "/dev/x", "table": "input", "address": 0, "count": 126}, "count: "),
        ("/api/read", {"port": "/dev/x", "table": "input", "address": 65535, "count": 2}, "count: "),
        ("/api/read", {"port": "/dev/x", "table": "input", "address": 0, "unit": 300}, "unit: "),
        ("/api/read", {"device": "meter-1", "address": 0, "table": "input"}, "device: "),
        ("/api/read", ["not", "an", "object"], "body: "),
    ],
)
def test_bad_fields_get_400_naming_the_field(bench: Bench, path: str, body: Any, field: str) -> None:
    r = bench.client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(field), r.json()


def test_an_unknown_device_is_404_and_posts_need_the_page_header(bench: Bench) -> None:
    r = bench.client.post("/api/read", json={"device": "no-such-meter", "address": 0, "table": "input"})
    assert r.status_code == 404 and r.json()["error"] == "device: no device 'no-such-meter' in the site file"
    bare = httpx2.post(f"{bench.url}/api/scan", json={"port": bench.pty}, cookies=dict(bench.client.cookies))
    assert bare.status_code == 403


def test_first_ends_the_scan_at_the_first_unit_found(bench: Bench) -> None:
    r = bench.client.post("/api/scan", json={"port": bench.pty, "units": f"{UNIT}-247", "first": True, "timeout": 0.5})
    assert r.status_code == 202, r.text
    view = _scan_until_over(bench.client)
    assert (view["state"], view["done"], [h["unit"] for h in view["found"]]) == ("done", 1, [UNIT])


def test_references_are_one_based_and_read_back_as_the_cli_parses_them() -> None:
    from drivers.modbus.config import parse_modicon
    from drivers.modbus.typed_read import reference, word_orders

    cases = {("input", 0): "30001", ("holding", 9998): "49999", ("holding", 9999): "410000",
             ("coil", 0): "00001", ("discrete", 5): "10006", ("holding", 65535): "465536"}  # fmt: skip
    for (table, address), text in cases.items():
        assert reference(table, address) == text
        assert parse_modicon(text) == (table, address)
    orders = word_orders(0x7FC0, 0x0000)  # a quiet NaN, big-endian: JSON has no NaN, so it is text
    assert orders["ABCD"]["float32"] == "nan" and orders["ABCD"]["uint32"] == 0x7FC00000
    assert orders["BADC"] == {"hex": "c07f0000", "float32": -3.984375, "uint32": 0xC07F0000, "int32": -0x3F810000}
    assert orders["CDAB"]["hex"] == "00007fc0" and orders["DCBA"]["hex"] == "0000c07f"
