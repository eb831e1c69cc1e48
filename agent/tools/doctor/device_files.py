"""Device files (serial ports, cameras): present, a character device, read-write for the service user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.config.model import AgentConfigBase
from agent.devices.ports import missing, port_holders
from agent.tools.doctor.access import R, ServiceUser, W, access_fix, denied, describe, group_fix, group_name
from agent.tools.doctor.report import Row

__all__ = ["check_device_file", "check_device_files", "port_holders", "present_devices"]


def check_device_files(config: AgentConfigBase, user: ServiceUser) -> list[Row]:
    """Each device file: present, a character device, readable and writable by the service user."""
    users: dict[str, list[str]] = {}
    for device in config.devices:
        if device.enabled:
            for path in device.device_paths():
                users.setdefault(path, []).append(device.id)
    if not users:
        return [Row("device-file", "-", "ok", "no local device files configured")]
    return [check_device_file(path, ids, user) for path, ids in users.items()]


def check_device_file(path: str, device_ids: list[str], user: ServiceUser) -> Row:
    """One device file (a serial port, /dev/videoN) as the service user meets it."""
    target = f"{path} ({', '.join(device_ids)})"
    p = Path(path)
    if not p.exists():
        kind, present = present_devices(path)
        # A serial port gets the sentence read, scan and the running agent print.
        finding = missing(path) if kind != "camera" else f"{path} is missing"
        finding += f" (a link to {os.readlink(p)})" if p.is_symlink() else ""
        fix = (
            f"plug the adapter in (dmesg shows it), or correct the path in the config; present: {', '.join(present)}"
            if present
            else f"plug the {kind} in (dmesg shows it): none is present"
        )
        return Row("device-file", target, "FAIL", finding, fix)
    st = p.stat()
    if not stat.S_ISCHR(st.st_mode):
        return Row(
            "device-file",
            target,
            "FAIL",
            f"not a device: {describe(st)} (written to while the adapter was missing?)",
            f"rm {p.resolve()} and plug the adapter in; check the path in the config",
        )
    problem = denied(p, user, R | W)
    if problem is None:
        return Row("device-file", target, "ok", f"{describe(st)}, read-write for {user.name}")
    finding = problem.finding
    if problem.path == p.resolve() and group_fix(problem, user) is not None:
        finding += f" (not in group {group_name(st.st_gid)})"
    return Row("device-file", target, "FAIL", finding, access_fix(problem, user))


def present_devices(path: str) -> tuple[str, list[str]]:
    """What kind of device ``path`` is, and the ones of that kind present (to spot a renamed adapter)."""
    if path.startswith(("/dev/video", "/dev/v4l/")):
        kind, patterns = "camera", ["dev/v4l/by-id/*", "dev/video*"]
    else:
        kind, patterns = "USB serial adapter", ["dev/serial/by-id/*", "dev/ttyUSB*", "dev/ttyACM*"]
    for pattern in patterns:
        found = sorted(str(f) for f in Path("/").glob(pattern))
        if found:
            return kind, found
    return kind, []
