"""The site file: valid, and readable by the service user along with the secrets and TLS files it names."""

from __future__ import annotations

from pathlib import Path

from agent.config.model import AgentConfigBase, config_warnings, load_config
from agent.errors import ConfigError
from agent.tools.doctor.access import R, ServiceUser, access_fix, denied
from agent.tools.doctor.report import Row
from agent.uplinks.mqtt.config import mqtt_settings


def check_config(path: Path) -> tuple[AgentConfigBase | None, list[Row]]:
    """Load and validate the site file; one FAIL row per problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        rows = []
        for problem in exc.problems:
            where, sep, message = problem.partition(": ")
            if not sep:
                where, message = str(path), problem
            rows.append(
                Row("config", where, "FAIL", message, f"correct it, then re-check: edge-agent validate -c {path}")
            )
        return None, rows
    enabled = [d for d in config.devices if d.enabled]
    drivers = ", ".join(sorted({d.driver for d in config.devices})) or "none"
    count = f"{len(config.devices)} devices ({len(enabled)} enabled)"
    finding = f"valid: gateway {config.gateway.id}, {count}, drivers: {drivers}"
    rows = [Row("config", str(path), "ok", finding)]
    for warning in config_warnings(config):
        field, _, text = warning.partition(": ")
        problem, _, fix = text.rpartition("; ")
        rows.append(Row("config", field, "warn", problem or text, fix if problem else None))
    return config, rows


def check_files(path: Path, config: AgentConfigBase, user: ServiceUser) -> list[Row]:
    """The site file, the password file and the TLS files must be readable by the service user."""
    mqtt = mqtt_settings(config)
    files: list[tuple[str, Path | None]] = [
        ("site file", path),
        ("password_file", mqtt.password_file),
        ("tls.ca_file", mqtt.tls.ca_file),
        ("tls.cert_file", mqtt.tls.cert_file),
        ("tls.key_file", mqtt.tls.key_file),
    ]
    rows = []
    for what, file in files:
        if file is None:
            continue
        try:
            problem = denied(file, user, R)
        except OSError as exc:
            rows.append(
                Row("files", str(file), "FAIL", f"{what}: {exc.strerror or exc}", "check the path in the config")
            )
            continue
        if problem is None:
            rows.append(Row("files", str(file), "ok", f"{what} readable by {user.name}"))
        else:
            fix = access_fix(problem, user, secret=what in ("password_file", "tls.key_file"))
            rows.append(Row("files", str(file), "FAIL", f"{what}: {problem.finding}", fix))
    return rows
