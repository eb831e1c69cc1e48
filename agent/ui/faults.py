"""A device's failure in words a technician acts on: what is wrong and what to do.

The reasons are the drivers' own (``DeviceRunner.reason``); a reason that already says what
to do is shown as it is.
"""

from __future__ import annotations

import os
import re

_DEVICE_FILE = re.compile(r"(/dev/[^\s:;,'\"]+)")

_RULES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("no such file", "does not exist", "could not open port", "not found"),
        "the serial port does not exist: the adapter is unplugged or the name is wrong",
        "plug the USB adapter in and check the device's port: ls /dev/serial/by-id lists the adapters "
        "the gateway sees; use that stable name in the site file",
    ),
    (
        ("permission denied", "errno 13"),
        "the agent may not open the port",
        "give the service user the port's group (usermod -aG dialout edge-agent, or a udev rule), "
        "then restart the agent; edge-agent doctor names the exact fix",
    ),
    (
        ("busy", "exclusive", "errno 16", "lock"),
        "another program holds the port",
        "stop the other program (a terminal, another agent); edge-agent doctor names it",
    ),
    (
        ("connection refused", "errno 111"),
        "nothing answers at the device's address and port",
        "check the device (or its serial gateway) is powered and on the network, and its host and port; "
        "test with edge-agent read",
    ),
    (
        ("timed out", "timeout", "no response", "did not answer"),
        "the device does not answer",
        "check the wiring (A/B swapped?), the unit id and the line settings (baud, parity); test with edge-agent read",
    ),
    (
        ("unreachable", "no route", "name or service not known"),
        "the device's address cannot be reached",
        "check the address in the site file and the network between the gateway and the device",
    ),
)


def explain(reason: str | None) -> dict[str, str] | None:
    """``{"cause", "fix"}`` for a failure reason; None without one."""
    if not reason:
        return None
    low = reason.lower()
    port = _DEVICE_FILE.search(reason)
    if port is not None and "fix:" not in low:
        found = _port_problem(port.group(1))
        if found is not None:
            return {**found, "detail": reason}
    if "fix:" in low:
        cause, _, fix = reason.partition("fix:")
        return {"cause": cause.strip().rstrip(";,"), "fix": fix.strip(), "detail": reason}
    for needles, cause, fix in _RULES:
        if any(n in low for n in needles):
            return {"cause": cause, "fix": fix, "detail": reason}
    return {"cause": reason, "fix": "run edge-agent doctor on the gateway for a full check", "detail": reason}


def _port_problem(path: str) -> dict[str, str] | None:
    """What is wrong with a device file the reason names, looked at now (None: nothing visible)."""
    if not os.path.exists(path):
        folder = "/dev/serial/by-id"
        seen = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        listed = ", ".join(seen[:5]) if seen else "none: is the adapter plugged in?"
        return {
            "cause": f"the port {path} does not exist",
            "fix": f"plug the USB adapter in, or set the device's port to one the gateway sees (in {folder}: {listed})",
        }
    if not os.access(path, os.R_OK | os.W_OK):
        return {
            "cause": f"the agent may not open {path}",
            "fix": "give the service user the port's group (usermod -aG dialout edge-agent, or a udev rule), "
            "then restart the agent; edge-agent doctor names the exact fix",
        }
    return None
