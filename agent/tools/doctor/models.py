"""Model files: every manifest a device references names a file whose sha256 matches."""

from __future__ import annotations

import re
from pathlib import Path

from agent.config.model import AgentConfigBase
from agent.tools.doctor.report import Row, human_size


def check_models(config: AgentConfigBase, base: Path) -> list[Row]:
    """Every model manifest a device references: the file's sha256 matches."""
    manifests: list[Path] = []
    for device in config.devices:
        for manifest in device.model_manifests():
            p = Path(manifest).expanduser()
            manifests.append(p if p.is_absolute() else base / p)
    if not manifests:
        return [Row("models", "-", "ok", "no models configured")]
    return [check_model_manifest(m) for m in dict.fromkeys(manifests)]


def check_model_manifest(path: Path) -> Row:
    """A manifest (JSON or YAML: ``file``, ``sha256``; ``file`` relative to the manifest's folder)."""
    import yaml

    target = str(path)
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return Row(
            "models", target, "FAIL", f"cannot read the manifest: {exc}", "check the manifest's path and content"
        )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("file"), str) or "sha256" not in manifest:
        return Row("models", target, "FAIL", "manifest needs `file` and `sha256`", "rewrite the manifest")
    expected = manifest["sha256"]
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", expected.strip()):
        return Row(
            "models",
            target,
            "FAIL",
            f"sha256 is not 64 hex digits: {expected!r}",
            "write the sha256 as a quoted string (YAML reads some unquoted digests as numbers)",
        )
    expected = expected.strip().lower()
    model = Path(manifest["file"])
    model = model if model.is_absolute() else path.parent / model
    # Imported here: agent.inference loads OpenCV and onnxruntime (the vision extra), which
    # only a gateway with models has, and which take a second to import.
    from agent.inference.manifest import sha256_file

    try:
        actual = sha256_file(model)
    except OSError as exc:
        return Row(
            "models",
            target,
            "FAIL",
            f"model file {model}: {exc.strerror or exc}",
            "copy the model file next to its manifest",
        )
    if actual != expected:
        return Row(
            "models",
            target,
            "FAIL",
            f"{model.name}: sha256 {actual[:12]}... does not match the manifest's "
            f"{expected[:12]}... (damaged or replaced)",
            "copy the model file again from its release",
        )
    return Row("models", target, "ok", f"{model.name}: sha256 matches ({human_size(model.stat().st_size)})")
