"""Every plugin folder documents itself: a README.md and a sample.yaml, the README embedding the sample.

Telegraf's habit (its all_test.go): a registered plugin without its docs fails the build. Here the
sample is the source of truth for the plugin's keys, so it is also held to what it shows:

- it is a complete site file that loads through the real config model (``edge-agent validate -c
  drivers/<name>/sample.yaml`` accepts it), with the plugin's own section in it: a device of that
  driver, or ``uplink.<name>``;
- ``##`` lines are prose; a line commented with a single ``#`` is a default shown commented out,
  so uncommenting every such line must load to the very same config;
- uncommented, the plugin's section names every key of the plugin's config model.

Drivers register under ``edge_agent.drivers`` (folders under drivers/), uplink plugins under
``edge_agent.uplinks`` (folders under agent/uplinks/); both get the same checks.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from agent.config.model import load_config, parse_config
from agent.errors import ConfigError

DRIVERS, UPLINKS = "edge_agent.drivers", "edge_agent.uplinks"
PLUGINS = [(group, ep) for group in (DRIVERS, UPLINKS) for ep in entry_points(group=group)]
# A single ``#`` then a space: a commented-out default (``##`` never matches: its second ``#`` is no space).
COMMENTED = re.compile(r"^(\s*)# (.*)$", re.MULTILINE)
ROOT = Path(__file__).resolve().parents[1]


def plugin_folder(ep: EntryPoint) -> Path:
    """The folder of the package (or module) an entry point names: ``drivers.modbus:PLUGIN`` -> drivers/modbus."""
    spec = importlib.util.find_spec(ep.module)
    assert spec is not None and spec.origin is not None, f"{ep.name}: module {ep.module} not found"
    return Path(spec.origin).parent


def uncommented(text: str) -> str:
    """The sample with every default shown commented out written in."""
    return COMMENTED.sub(r"\1\2", text)


def own_section(group: str, name: str, data: Any) -> dict[str, Any] | None:
    """The plugin's part of a site file's raw data: its device entry, or its ``uplink.<name>`` section."""
    if not isinstance(data, dict):
        return None
    if group == DRIVERS:
        devices = data.get("devices")
        if not isinstance(devices, list):
            return None
        return next((d for d in devices if isinstance(d, dict) and d.get("driver") == name), None)
    section = (data.get("uplink") or {}).get(name)
    return section if isinstance(section, dict) else None


def layout_problems(folder: Path, group: str, name: str, keys: Iterable[str] = ()) -> list[str]:
    """What the plugin folder lacks or gets wrong, one line each; ``[]`` when it is complete.

    ``keys`` are the keys of the plugin's config model, each of which the sample must show.
    """
    readme, sample = folder / "README.md", folder / "sample.yaml"
    missing = [f"{folder}: no {file.name}" for file in (readme, sample) if not file.is_file()]
    if missing:
        return missing
    text = sample.read_text()
    problems = []
    if f"```yaml\n{text}```\n" not in readme.read_text():
        problems.append(f"{readme}: does not embed sample.yaml verbatim (a ```yaml block holding the whole file)")
    try:
        config = load_config(sample)
    except ConfigError as exc:
        return [*problems, *(f"sample.yaml does not load: {problem}" for problem in exc.problems)]
    written_in = uncommented(text)
    try:
        full = parse_config(written_in, sample)
    except ConfigError as exc:
        lines = (f"sample.yaml with its commented-out lines written in does not load: {p}" for p in exc.problems)
        return [*problems, *lines]
    if full.model_dump() != config.model_dump():
        problems.append(
            "sample.yaml: a line commented out with a single # is not the default it stands for "
            "(write prose and examples after ##)"
        )
    section = own_section(group, name, yaml.safe_load(written_in))
    what = f"a device with driver: {name}" if group == DRIVERS else f"an uplink.{name} section"
    if section is None:
        problems.append(f"sample.yaml lacks {what}")
    else:
        absent = [key for key in keys if key not in section]
        if absent:
            problems.append(f"sample.yaml: {what} without {', '.join(absent)} (show a default commented out)")
    return problems


def _model_keys(plugin: object) -> list[str]:
    model = getattr(plugin, "config_model", None)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def test_every_driver_is_listed() -> None:
    # The parametrized test below checks what is registered: an empty registry would check nothing.
    assert {"virtual", "modbus", "serial", "opcua", "camera"} <= {ep.name for group, ep in PLUGINS if group == DRIVERS}


@pytest.mark.parametrize(("group", "ep"), PLUGINS, ids=[f"{group.split('.')[-1]}:{ep.name}" for group, ep in PLUGINS])
def test_plugin_folder_has_readme_and_a_sample_that_loads(group: str, ep: EntryPoint) -> None:
    folder = plugin_folder(ep)
    assert layout_problems(folder, group, ep.name, _model_keys(ep.load())) == []


def test_driver_folders_are_the_ones_in_this_tree() -> None:
    # The checks read the folders the entry points lead to: they must be this checkout's.
    for group, ep in PLUGINS:
        if group == DRIVERS:
            assert plugin_folder(ep) == ROOT / "drivers" / ep.name


# ---- the checks themselves, on broken copies of a real folder ----


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    copy = tmp_path / "virtual"
    copy.mkdir()
    for name in ("README.md", "sample.yaml"):
        shutil.copy(ROOT / "drivers" / "virtual" / name, copy / name)
    assert layout_problems(copy, DRIVERS, "virtual", _model_keys_of_virtual()) == []
    return copy


def _model_keys_of_virtual() -> list[str]:
    (virtual,) = [ep for group, ep in PLUGINS if group == DRIVERS and ep.name == "virtual"]
    return _model_keys(virtual.load())


def _edit(folder: Path, old: str, new: str) -> None:
    """Change the sample and the README alike, so only the change itself is at fault."""
    for name in ("sample.yaml", "README.md"):
        path = folder / name
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))


def test_a_missing_sample_or_readme_is_reported(folder: Path) -> None:
    (folder / "sample.yaml").unlink()
    assert layout_problems(folder, DRIVERS, "virtual") == [f"{folder}: no sample.yaml"]
    (folder / "README.md").unlink()
    assert layout_problems(folder, DRIVERS, "virtual") == [f"{folder}: no README.md", f"{folder}: no sample.yaml"]


def test_a_readme_that_does_not_embed_the_sample_is_reported(folder: Path) -> None:
    sample = folder / "sample.yaml"
    sample.write_text(sample.read_text().replace("id: meter-1", "id: meter-2"))
    assert layout_problems(folder, DRIVERS, "virtual") == [
        f"{folder / 'README.md'}: does not embed sample.yaml verbatim (a ```yaml block holding the whole file)"
    ]


def test_a_sample_that_does_not_load_is_reported(folder: Path) -> None:
    _edit(folder, "kind: meter", "kind: toaster")
    problems = layout_problems(folder, DRIVERS, "virtual")
    assert len(problems) == 1
    assert problems[0].startswith(f"sample.yaml does not load: {folder / 'sample.yaml'}:")
    assert "devices[0].kind" in problems[0]


def test_a_commented_line_that_is_not_the_default_is_reported(folder: Path) -> None:
    _edit(folder, "# burst: 1 ", "# burst: 5 ")
    assert layout_problems(folder, DRIVERS, "virtual") == [
        "sample.yaml: a line commented out with a single # is not the default it stands for "
        "(write prose and examples after ##)"
    ]
    _edit(folder, "# burst: 5 ", "# burst is how many events a poll makes ")
    problems = layout_problems(folder, DRIVERS, "virtual")
    assert problems and all(p.startswith("sample.yaml with its commented-out lines written in") for p in problems)


def test_a_key_the_sample_leaves_out_is_reported(folder: Path) -> None:
    _edit(folder, "    # seed: null ", "    ## seed: null ")
    assert layout_problems(folder, DRIVERS, "virtual", _model_keys_of_virtual()) == [
        "sample.yaml: a device with driver: virtual without seed (show a default commented out)"
    ]


def test_a_sample_for_another_plugin_is_reported(folder: Path) -> None:
    assert layout_problems(folder, DRIVERS, "modbus") == ["sample.yaml lacks a device with driver: modbus"]
    assert layout_problems(folder, UPLINKS, "mqtt") == ["sample.yaml lacks an uplink.mqtt section"]
