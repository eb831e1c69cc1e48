"""Cameras with local ONNX inference: bay occupancy, crosswalk presence; no image leaves unless snapshots are on."""

from __future__ import annotations

from agent.devices.api import Driver, DriverPlugin, ToolMain
from drivers.camera.config import CameraConfig


def _driver() -> type[Driver]:
    from drivers.camera.driver import CameraDriver

    return CameraDriver


def _render(argv: list[str]) -> int:
    # Imported when run: OpenCV and onnxruntime (the vision extra) are not needed to list tools.
    from drivers.camera import tools

    return tools.render_main(argv)


def _tools() -> dict[str, ToolMain]:
    return {"render": _render}


PLUGIN = DriverPlugin(
    name="camera",
    config_model=CameraConfig,
    factory=_driver,
    summary="Camera (RTSP/HTTP/USB/file) with a local ONNX detector: parking bays and crosswalk waiting areas",
    tools=_tools,
)
