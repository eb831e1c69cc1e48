"""The zone editor's text edit: one camera's zones replaced, every other byte of the site file kept."""

from __future__ import annotations

import pytest
import yaml

from agent.ui.zones_text import ZoneTextError, render_zone, replace_zones, scalar

SITE = """\
# the north site: keep this comment
gateway: {id: gw-1, site: north}   # and this one
devices:
  - id: cam-a                 # the crossing
    driver: camera
    source: /srv/a.avi
    parking_bays:
      # bays drawn on 2024-05-01
      - {id: P-07, polygon: [[650, 60], [720, 60], [720, 100], [650, 100]], debounce: 2s}
      - id: P-08
        polygon: [[1, 1], [9, 1], [9, 9]]
    # waiting areas next
    waiting_areas:
      - {id: crossing-n, polygon: [[0, 200], [400, 195], [768, 230]]}
    fps: 1                      # after the zones
  - {id: cam-b, driver: camera, source: /srv/b.avi, waiting_areas: [{id: w, polygon: [[0, 0], [5, 0], [5, 5]]}]}
  - id: meter-1   # another device
    driver: virtual
"""

BAY = {"id": "P-09", "units": "relative", "polygon": [[0.1, 0.2], [0.3, 0.2], [0.3, 0.4123]], "debounce": "2s"}
AREA = {"id": "crossing-n", "units": "relative", "polygon": [[0.0, 0.5], [1.0, 0.5], [1.0, 1.0]]}


def devices(text: str) -> dict[str, dict]:  # type: ignore[type-arg]
    return {d["id"]: d for d in yaml.safe_load(text)["devices"]}


def test_only_that_cameras_zones_change() -> None:
    new = replace_zones(SITE, "cam-a", {"parking_bays": [BAY], "waiting_areas": [AREA]})
    got, old = devices(new), devices(SITE)
    assert got["cam-a"]["parking_bays"] == [BAY] and got["cam-a"]["waiting_areas"] == [AREA]
    assert {k: v for k, v in got["cam-a"].items() if k not in ("parking_bays", "waiting_areas")} == {
        k: v for k, v in old["cam-a"].items() if k not in ("parking_bays", "waiting_areas")
    }
    assert got["cam-b"] == old["cam-b"] and got["meter-1"] == old["meter-1"]
    kept = [
        line for line in SITE.splitlines() if "P-0" not in line and "polygon" not in line and "crossing-n" not in line
    ]
    assert [line for line in new.splitlines() if line in kept] == kept  # every other line, in order, as written
    assert (
        "      - {id: P-09, units: relative, polygon: [[0.1, 0.2], [0.3, 0.2], [0.3, 0.4123]], debounce: 2s}\n" in new
    )


def test_empty_lists_missing_keys_and_flow_devices() -> None:
    new = replace_zones(SITE, "cam-a", {"parking_bays": [], "waiting_areas": [AREA]})
    assert devices(new)["cam-a"]["parking_bays"] == [] and "    parking_bays: []\n    # waiting areas next\n" in new
    flow = replace_zones(SITE, "cam-b", {"parking_bays": [BAY], "waiting_areas": [AREA]})
    assert devices(flow)["cam-b"]["parking_bays"] == [BAY] and devices(flow)["cam-b"]["waiting_areas"] == [AREA]
    assert devices(flow)["cam-a"] == devices(SITE)["cam-a"]
    added = replace_zones(SITE, "meter-1", {"parking_bays": [BAY], "waiting_areas": []})
    assert devices(added)["meter-1"] == {"id": "meter-1", "driver": "virtual", "parking_bays": [BAY]}
    assert added.startswith(SITE.rstrip("\n"))  # appended after the device's last key


def test_ids_that_yaml_would_misread_are_quoted() -> None:
    for value in ["no", "007", "1e3", "a: b", "# x", "P 7", "ünïcode", "null", "-x"]:
        assert yaml.safe_load(f"v: {scalar(value)}")["v"] == value
    zone = {"id": "yes", "polygon": [[0.5, 0.25], [1, 0], [0, 1]], "units": "relative"}
    assert yaml.safe_load(render_zone(zone)) == zone


def test_no_such_device_or_a_broken_file_is_a_clear_error() -> None:
    with pytest.raises(ZoneTextError, match="no device with id 'cam-z'"):
        replace_zones(SITE, "cam-z", {"parking_bays": [BAY]})
    with pytest.raises(ZoneTextError, match="does not parse"):
        replace_zones("devices: [\n", "cam-a", {"parking_bays": [BAY]})
    with pytest.raises(ZoneTextError, match="no devices"):
        replace_zones("gateway: {id: g}\n", "cam-a", {"parking_bays": [BAY]})


def test_a_redrawn_zone_keeps_its_other_settings_as_written() -> None:
    redrawn = {"id": "P-07", "units": "relative", "polygon": [[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]}
    fresh = {"id": "P-10", "units": "relative", "polygon": [[0.5, 0.5], [0.6, 0.5], [0.6, 0.6]]}
    keep = {"parking_bays": ("debounce", "min_overlap")}
    new = replace_zones(SITE, "cam-a", {"parking_bays": [redrawn, fresh]}, keep)
    assert "- {id: P-07, units: relative, polygon: [[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]], debounce: 2s}\n" in new
    assert devices(new)["cam-a"]["parking_bays"] == [{**redrawn, "debounce": "2s"}, fresh]
    assert devices(new)["cam-a"]["waiting_areas"] == devices(SITE)["cam-a"]["waiting_areas"]  # not in zones: kept
    plain = replace_zones(SITE, "cam-a", {"parking_bays": [redrawn]})  # nothing asked to be kept
    assert devices(plain)["cam-a"]["parking_bays"] == [redrawn]
