"""``ui:`` in the site file: loopback by default, never a wildcard, never the public uplink."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.model import parse_config
from agent.errors import ConfigError
from agent.tools.cli import main
from agent.ui import netif
from agent.ui.bind import resolve

SITE = """\
gateway: {id: gw-test}
buffer: {path: var/buffer.db}
ui: UI
devices: []
"""


def _problems(tmp_path: Path, ui: str) -> list[str]:
    try:
        parse_config(SITE.replace("UI", ui), tmp_path / "site.yaml")
    except ConfigError as exc:
        return exc.problems
    return []


def test_off_and_loopback_by_default(tmp_path: Path) -> None:
    config = parse_config(SITE.replace("ui: UI\n", ""), tmp_path / "site.yaml")
    assert config.ui.enabled is False
    bind = resolve(config.ui)
    assert (bind.host, bind.tls, bind.url) == ("127.0.0.1", False, "http://127.0.0.1:9180/")


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ('"0.0.0.0:9180"', "listens on every interface"),
        ('"[::]:9180"', "listens on every interface"),
        ('":9180"', "listens on every interface"),
        ('"*:9180"', "listens on every interface"),
        ('"gateway.local:9180"', "is not an IP address"),
        ('"127.0.0.1"', "expected address:port"),
        ('"127.0.0.1:0"', "expected address:port"),
    ],
)
def test_wildcards_and_names_are_refused_naming_ui_listen(tmp_path: Path, listen: str, says: str) -> None:
    problems = _problems(tmp_path, f"{{enabled: true, listen: {listen}}}")
    assert len(problems) == 1 and "site.yaml:3: ui.listen: " in problems[0] and says in problems[0], problems


def test_a_lan_address_is_https(tmp_path: Path) -> None:
    config = parse_config(SITE.replace("UI", '{enabled: true, listen: "192.0.2.10:8443"}'), tmp_path / "site.yaml")
    bind = resolve(config.ui)
    assert (bind.tls, bind.url) == (True, "https://192.0.2.10:8443/")
    v6 = parse_config(SITE.replace("UI", '{enabled: true, listen: "[fd00::1]:8443"}'), tmp_path / "site.yaml")
    assert resolve(v6.ui).url == "https://[fd00::1]:8443/"


def test_the_interface_carrying_the_default_route_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A routing table (the kernel's /proc/net/route format) whose default route leaves through lo:
    # then lo is "the public uplink", and so are its addresses.
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "lo\t00000000\t0100007F\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth9\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    monkeypatch.setattr(netif, "ROUTE_V4", route)
    monkeypatch.setattr(netif, "ROUTE_V6", tmp_path / "none")
    assert netif.default_route_interfaces() == {"lo"}
    problems = _problems(tmp_path, '{enabled: true, listen: "127.0.0.1:9180"}')
    assert (
        len(problems) == 1
        and "ui.listen: 127.0.0.1 is an address of lo, which carries the default route" in (problems[0])
    )
    problems = _problems(tmp_path, "{enabled: true, interface: lo}")
    assert len(problems) == 1 and "ui.interface: interface lo carries the default route" in problems[0]
    # Off, the page is not checked against the routes: it listens nowhere.
    assert _problems(tmp_path, '{enabled: false, listen: "127.0.0.1:9180"}') == []
    # eth9 has only a LAN route: allowed by validation (its address is found at start).
    assert _problems(tmp_path, "{enabled: true, interface: eth9}") == []


def test_an_interface_serves_on_its_own_address(tmp_path: Path) -> None:
    config = parse_config(SITE.replace("UI", "{enabled: true, interface: lo}"), tmp_path / "site.yaml")
    assert resolve(config.ui).host == "127.0.0.1"


def test_validate_prints_the_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("UI", '{enabled: true, listen: "0.0.0.0:9180"}'))
    assert main(["validate", "-c", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"{site}:3: ui.listen: 0.0.0.0:9180 listens on every interface" in err
