"""The site config: every bad file refused with a message naming the file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.model import config_warnings, load_config, parse_config
from agent.contract.units import parse_duration, parse_size
from agent.errors import ConfigError
from agent.uplinks.mqtt.config import MqttConfig

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
gateway: {id: gw-1, site: lab}
uplink:
  mqtt: {host: 127.0.0.1, port: 1883}
buffer: {path: var/b.db, max_bytes: 1MiB}
devices:
  - {id: meter-1, driver: virtual, kind: meter, interval: 500ms}
"""

# (name, yaml text, [substrings the single expected problem must contain])
BAD: list[tuple[str, str, list[str]]] = [
    ("unknown top-level key", GOOD + "devics: []\n", ["devics", "unknown key"]),
    ("typo in mqtt key", GOOD.replace("port: 1883", "prot: 1883"), ["uplink.mqtt.prot", "unknown key"]),
    ("port out of range", GOOD.replace("1883", "70000"), ["uplink.mqtt.port", "65535", "70000"]),
    ("port not a number", GOOD.replace("1883", "abc"), ["uplink.mqtt.port", "integer"]),
    ("bad duration", GOOD.replace("500ms", "fast"), ["devices[0].interval", "invalid duration 'fast'"]),
    ("negative duration", GOOD.replace("500ms", "-1s"), ["devices[0].interval", "invalid duration"]),
    ("zero interval", GOOD.replace("500ms", "0s"), ["devices[0].interval", "greater than 0"]),
    ("bad size", GOOD.replace("1MiB", "lots"), ["buffer.max_bytes", "invalid size 'lots'"]),
    ("buffer too small", GOOD.replace("1MiB", "1KiB"), ["buffer.max_bytes", "greater than or equal"]),
    ("missing gateway", GOOD.replace("gateway: {id: gw-1, site: lab}\n", ""), ["gateway", "required key is missing"]),
    ("bad gateway id", GOOD.replace("gw-1", "GW_1"), ["gateway.id", "lower-case", "'GW_1'"]),
    (
        "duplicate device id",
        GOOD + "  - {id: meter-1, driver: virtual, kind: meter}\n",
        ["devices[1].id", "duplicate device id 'meter-1'"],
    ),
    ("reserved device id", GOOD.replace("id: meter-1", "id: gateway"), ["devices[0].id", "reserved"]),
    (
        "unknown driver",
        GOOD + "  - {id: m2, driver: modbuz}\n",
        ["devices[1].driver", "unknown driver 'modbuz'", "virtual"],
    ),
    ("missing driver", GOOD + "  - {id: m2, kind: meter}\n", ["devices[1].driver", "missing 'driver' key", "virtual"]),
    ("bad enum value", GOOD.replace("kind: meter", "kind: toaster"), ["devices[0].kind", "'toaster'"]),
    (
        "unknown device key",
        GOOD.replace("kind: meter", "kind: meter, colour: red"),
        ["devices[0].colour", "unknown key"],
    ),
    (
        "missing TLS CA file",
        GOOD.replace("port: 1883}", "port: 8883, tls: {ca_file: /nonexistent/ca.pem}}"),
        ["uplink.mqtt.tls.ca_file", "file not found", "/nonexistent/ca.pem"],
    ),
    (
        "cert without key",
        GOOD.replace("port: 1883}", "port: 8883, tls: {cert_file: __FILE__}}"),
        ["uplink.mqtt.tls", "cert_file and key_file go together"],
    ),
    (
        "missing password file",
        GOOD.replace("port: 1883}", "port: 1883, username: u, password_file: nope.txt}"),
        ["uplink.mqtt.password_file", "file not found"],
    ),
    (
        "password in clear to a remote host",
        GOOD.replace(
            "host: 127.0.0.1, port: 1883}",
            "host: broker.example.org, port: 1883, username: u, password_file: __FILE__, tls: {enabled: false}}",
        ),
        ["uplink.mqtt", "clear text", "enable tls"],
    ),
    (
        "wildcard in topic prefix",
        GOOD.replace("port: 1883}", "port: 1883, topic_prefix: 'ioc/#'}"),
        ["uplink.mqtt.topic_prefix", "wildcards"],
    ),
    ("qos out of range", GOOD.replace("port: 1883}", "port: 1883, qos: 3}"), ["uplink.mqtt.qos", "got 3"]),
    (
        "bad priority class",
        GOOD + "priorities: {city.meter.reading: urgent}\n",
        ["priorities.city.meter.reading", "'urgent'"],
    ),
    ("devices not a list", GOOD.split("devices:")[0] + "devices: {id: m}\n", ["devices", "list"]),
    ("duplicate YAML key", GOOD.replace("site: lab", "site: lab, site: other"), ["duplicate key 'site'"]),
    ("not YAML", "gateway: [unclosed\n", ["not valid YAML"]),
    ("unsupported version", "version: 2\n" + GOOD, ["version", "got 2"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused_naming_the_field(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    site = tmp_path / "site.yaml"
    site.write_text(text.replace("__FILE__", str(secret)))
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    problems = caught.value.problems
    assert len(problems) == 1, f"{name}: expected one problem, got {problems}"
    assert problems[0].startswith(f"{site}:"), problems[0]
    for part in expected:
        assert part in problems[0], f"{name}: {part!r} not in {problems[0]!r}"
    assert "s3cret" not in problems[0]


def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "gateway: {id: gw-1}\n"
        "uplink:\n"
        "  mqtt:\n"
        "    port: 0\n"
        "devices:\n"
        "  - {id: a, driver: virtual, kind: meter, interval: soon}\n"
        "  - {id: a, driver: virtual, kind: meter}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    problems = caught.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"{site}:4", f"{site}:6", f"{site}:7"]
    assert "uplink.mqtt.port" in problems[0]
    assert "devices[0].interval" in problems[1]
    assert "devices[1].id: duplicate" in problems[2]


def test_good_config_and_relative_paths(tmp_path: Path) -> None:
    config = parse_config(GOOD, tmp_path / "site.yaml")
    assert config.gateway.id == "gw-1"
    assert config.buffer.path == tmp_path / "var" / "b.db"
    assert config.buffer.max_bytes == 1024 * 1024
    assert config.devices[0].interval == 0.5
    assert config.uplink.mqtt.qos == 1
    assert config.uplink.mqtt.tls.active is False


def test_password_comes_from_file_and_is_not_in_repr(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    text = GOOD.replace("port: 1883}", f"port: 1883, username: gw, password_file: {secret.name}}}")
    config = parse_config(text, tmp_path / "site.yaml")
    assert config.uplink.mqtt.password() == "hunter2"
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("1s", 1.0), ("5m", 300.0), ("2h", 7200.0), (3, 3.0), ("1.5s", 1.5)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("256MiB", 256 * 1024**2), ("1GB", 10**9), ("512KiB", 524288), (1000, 1000), ("10 kb", 10_000)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("sample", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_samples_validate(sample: Path) -> None:
    load_config(sample)


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("500ms", "fast") + "extra: 1\n")
    ok = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(good)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok:")
    ko = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(bad)], capture_output=True, text=True, check=False
    )
    assert ko.returncode == 2
    assert "2 problem(s)" in ko.stderr
    assert "devices[0].interval" in ko.stderr
    assert "extra: unknown key" in ko.stderr
    run = subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(bad)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 2
    assert "refusing to start" in run.stderr


def test_cli_schema_is_json_schema_with_driver_keys() -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    assert schema["additionalProperties"] is False
    assert "gateway" in schema["required"]
    assert "VirtualConfig" in schema["$defs"]
    assert schema["$defs"]["VirtualConfig"]["properties"]["kind"]["enum"] == ["meter", "parking", "crosswalk"]


def test_docs_configuration_md_lists_every_key() -> None:
    from agent.config import reference as config_reference

    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert config_reference.render_markdown() in doc, (
        "docs/configuration.md is stale: run python -m agent.config.reference"
    )


# ---- secure defaults ---------------------------------------------------------------------------


def _mqtt(tmp_path: Path, mqtt: str) -> MqttConfig:
    return parse_config(GOOD.replace("{host: 127.0.0.1, port: 1883}", mqtt), tmp_path / "site.yaml").uplink.mqtt


@pytest.mark.parametrize(
    ("mqtt", "tls", "port"),
    [
        ("{host: broker.example.org}", True, 8883),  # remote: TLS unless told otherwise, on its port
        ("{host: 10.1.2.3, port: 1884}", True, 1884),  # an explicit port is kept
        ("{host: broker.example.org, tls: {enabled: false}}", False, 1883),  # plain only when asked (warned)
        ("{host: 127.0.0.1}", False, 1883),  # loopback: plain
        ("{host: localhost}", False, 1883),
        ("{host: '::1'}", False, 1883),
        ("{}", False, 1883),  # the default broker is 127.0.0.1
        ("{host: localhost, tls: {enabled: true}}", True, 8883),
        ("{host: localhost, tls: {ca_file: __CA__}}", True, 8883),  # a TLS file turns it on, as before
    ],
)
def test_tls_is_the_default_for_any_broker_but_loopback(tmp_path: Path, mqtt: str, tls: bool, port: int) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = _mqtt(tmp_path, mqtt.replace("__CA__", str(ca)))
    assert (config.tls.active, config.port) == (tls, port)


def test_a_password_to_a_remote_broker_goes_over_tls_by_default(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    config = _mqtt(tmp_path, f"{{host: broker.example.org, username: gw, password_file: {secret}}}")
    assert config.tls.active and config.port == 8883


def test_plain_mqtt_to_a_remote_broker_is_a_warning(tmp_path: Path) -> None:
    text = GOOD.replace("{host: 127.0.0.1, port: 1883}", "{host: broker.example.org, tls: {enabled: false}}")
    assert config_warnings(parse_config(text, tmp_path / "site.yaml")) == [
        "uplink.mqtt.tls.enabled: plain MQTT to broker.example.org: events travel unencrypted and unauthenticated; "
        "remove 'enabled: false' (TLS is the default) and use the broker's TLS port (8883)"
    ]
    assert config_warnings(parse_config(text.replace("broker.example.org", "127.0.0.1"), tmp_path / "s.yaml")) == []


def _secrets_site(tmp_path: Path, mode: int) -> Path:
    """A site file naming every kind of secret file, each with permissions ``mode``."""
    files = {name: tmp_path / name for name in ("mqtt-pw", "client.key", "client.crt", "users", "ua-pw", "plc-pw")}
    for file in files.values():
        file.write_text("secret\n")
        file.chmod(mode)
    files["client.crt"].chmod(0o644)  # a certificate is public
    site = tmp_path / "site.yaml"
    site.write_text(
        GOOD.replace(
            "{host: 127.0.0.1, port: 1883}",
            "{host: 127.0.0.1, username: gw, password_file: mqtt-pw,"
            " tls: {cert_file: client.crt, key_file: client.key}}"
            "\n  opcua: {users_file: users, user: op, password_file: ua-pw}",
        )
        + "  - {id: plc, driver: opcua, endpoint: 'opc.tcp://127.0.0.1:4840', username: u, password_file: plc-pw,"
        " points: [{name: flow, node: 'ns=2;s=F', quantity: flow}]}\n"
    )
    return site


def test_secret_files_others_may_read_are_warned_about_as_ssh_does(tmp_path: Path) -> None:
    site = _secrets_site(tmp_path, 0o644)
    assert config_warnings(load_config(site)) == [
        f"{field}: permissions 0644 for '{tmp_path / name}' are too open; chmod 600 {tmp_path / name}"
        for field, name in (
            ("uplink.mqtt.password_file", "mqtt-pw"),
            ("uplink.mqtt.tls.key_file", "client.key"),
            ("uplink.opcua.users_file", "users"),
            ("uplink.opcua.password_file", "ua-pw"),
            ("devices[1].password_file", "plc-pw"),
        )
    ]
    (tmp_path / "users").chmod(0o640)  # group-readable is too open as well
    assert "uplink.opcua.users_file: permissions 0640" in "\n".join(config_warnings(load_config(site)))


def test_secret_files_only_their_owner_may_read_are_fine(tmp_path: Path) -> None:
    assert config_warnings(load_config(_secrets_site(tmp_path, 0o600))) == []
    assert config_warnings(load_config(_secrets_site(tmp_path, 0o400))) == []


def test_cli_validate_prints_warnings_and_exits_0(tmp_path: Path) -> None:
    site = _secrets_site(tmp_path, 0o644)
    done = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(site)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"ok: {site} (gateway gw-1, 2 devices), 5 warning(s):"
    assert lines[1] == f"  warning: uplink.mqtt.password_file: permissions 0644 for '{tmp_path / 'mqtt-pw'}' are too " \
                       f"open; chmod 600 {tmp_path / 'mqtt-pw'}"  # fmt: skip
    assert len(lines) == 7 and lines[-1].startswith(f"next: edge-agent run -c {site}"), lines


def test_a_password_file_is_read_no_further_than_a_password_can_be(tmp_path: Path) -> None:
    big = tmp_path / "not-a-password"
    big.write_bytes(b"x" * 10_000_000)
    with pytest.raises(ConfigError) as caught:
        parse_config(GOOD.replace("port: 1883}", f"port: 1883, username: u, password_file: {big}}}"), tmp_path / "s")
    assert caught.value.problems == [
        f"{tmp_path / 's'}:3: uplink.mqtt.password_file: not a password file (larger than 4096 bytes): {big}"
    ]


# ---- buffer.path and units past their range ------------------------------------------------------


@pytest.mark.parametrize("target", ["site", "directory"])
def test_buffer_path_at_someone_elses_file_is_refused_by_validate(tmp_path: Path, target: str) -> None:
    site = tmp_path / "site.yaml"
    buffer = site if target == "site" else tmp_path
    site.write_text(GOOD.replace("buffer: {path: var/b.db,", f"buffer: {{path: {buffer},"))
    before = site.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(site)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2, out.stdout
    assert f"{site}:4: buffer.path: {buffer} " in out.stderr
    assert ("is not a buffer file" if target == "site" else "is a directory") in out.stderr
    assert site.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (parse_size, "9" * 400 + "TiB", "too large"),
        (parse_size, 2**60, "too large"),
        (parse_duration, 10**400, "too long"),
        (parse_duration, "1" * 30 + "d", "too long"),
        (parse_duration, float("nan"), "not a number"),
    ],
)
def test_sizes_and_durations_past_any_sense_are_refused_clearly(parse: object, value: object, message: str) -> None:
    assert callable(parse)
    with pytest.raises(ValueError, match=message) as info:
        parse(value)
    assert len(str(info.value)) < 160  # the 400 digits are not echoed
