"""``edge-agent doctor``: the technician's health check of a gateway, one row per finding.

It checks what the agent needs, as the agent's own service user would meet it: the site
file, the device files (serial ports), the broker (TCP, TLS, MQTT CONNECT), the clock, the
buffer's disk, model files, and whether every enabled device answers. Each row has a verdict
(ok, warn, FAIL, or skip when a check cannot run), a short finding, and for anything not ok
a concrete fix. The exit status is 1 if any row is FAIL (warnings alone exit 0).

The doctor usually runs as root while the agent runs as ``edge-agent``, so file access is
computed from each file's mode, owner and group and the service user's groups, never with
``os.access`` (which answers for root). It is careful on a live gateway: it connects to the
broker under its own client id (the agent's session is not taken over), opens the buffer
read-only without leaving files behind, and does not read a serial port another process
(usually the running agent) holds open.

One module per area: :mod:`.report` (rows and the table), :mod:`.access` (the service user),
:mod:`.config_checks`, :mod:`.device_files`, :mod:`.broker` and :mod:`.tls`, :mod:`.clock`,
:mod:`.buffer`, :mod:`.models`, :mod:`.devices`, and :mod:`.main` (running them all, the CLI).
"""

from agent.observability.clock import kernel_clock_sync
from agent.tools.doctor.access import (
    DEFAULT_USER,
    Denied,
    R,
    ServiceUser,
    W,
    X,
    access_fix,
    default_user,
    denied,
    describe,
)
from agent.tools.doctor.broker import check_broker, check_mqtt_connect
from agent.tools.doctor.buffer import MIN_FREE_BYTES, check_buffer, check_buffer_file, space_row
from agent.tools.doctor.clock import EARLIEST_YEAR, check_clock, clock_row, clock_sync_status
from agent.tools.doctor.config_checks import check_config, check_files
from agent.tools.doctor.device_files import check_device_file, check_device_files, port_holders, present_devices
from agent.tools.doctor.devices import STOP_TIMEOUT, Probe, check_device, check_devices, read_device, summarize
from agent.tools.doctor.main import DEFAULT_TIMEOUT, doctor_main, run_checks
from agent.tools.doctor.models import check_model_manifest, check_models
from agent.tools.doctor.report import TARGET_WIDTH, Row, Verdict, render, verdict_line
from agent.tools.doctor.tls import CERT_WARN_DAYS, CLIENT_CERT_WAIT, certificate_row, check_tls, tls_context

__all__ = [
    "CERT_WARN_DAYS",
    "CLIENT_CERT_WAIT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_USER",
    "EARLIEST_YEAR",
    "MIN_FREE_BYTES",
    "STOP_TIMEOUT",
    "TARGET_WIDTH",
    "Denied",
    "Probe",
    "R",
    "Row",
    "ServiceUser",
    "Verdict",
    "W",
    "X",
    "access_fix",
    "certificate_row",
    "check_broker",
    "check_buffer",
    "check_buffer_file",
    "check_clock",
    "check_config",
    "check_device",
    "check_device_file",
    "check_device_files",
    "check_devices",
    "check_files",
    "check_model_manifest",
    "check_models",
    "check_mqtt_connect",
    "check_tls",
    "clock_row",
    "clock_sync_status",
    "default_user",
    "denied",
    "describe",
    "doctor_main",
    "kernel_clock_sync",
    "port_holders",
    "present_devices",
    "read_device",
    "render",
    "run_checks",
    "space_row",
    "summarize",
    "tls_context",
    "verdict_line",
]
