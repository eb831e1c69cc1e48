"""Hostile site files: every one ends in a clean ``file:line: field: message`` refusal (exit 2)
or is accepted, quickly and in little memory; never a traceback, a hang or a flood of output.

The property test mutates every shipped config (structure, text, alias bombs) and holds each
outcome to those bounds; the CLI tests replay what a hostile tester found, case by case.
"""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.model import CHECK_FAILED, MAX_PROBLEMS, config_model, json_schema, load_config, parse_config
from agent.config.yaml_load import MAX_BYTES, MAX_DEPTH, MAX_NODES, YamlLoadError, load_yaml
from agent.errors import ConfigError
from tests.conftest import wait_for, write_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    [
        ROOT / "config" / "example.yaml",
        *(ROOT / "config" / "examples").glob("*.yaml"),
        ROOT / "systemd" / "site.example.yaml",
        *(ROOT / "drivers").glob("*/sample.yaml"),
        *(ROOT / "agent" / "uplinks").glob("*/sample.yaml"),
    ]
)
CASE_SECONDS = 2.0  # CPU seconds per mutated config, validation included
CASE_WALL_SECONDS = 10.0  # wall seconds: a hang, not a busy machine (four test workers share 2 cores)
CASE_BYTES = 64 * 1024 * 1024  # memory a case may allocate at its peak
OUTPUT_CHARS = 64 * 1024  # everything a refusal may print

HEAD = "gateway: {id: gw-1}\nuplink: {mqtt: {host: 127.0.0.1}}\nbuffer: {path: var/b.db}\n"


def _validate(text: str, path: Path) -> list[str]:
    """parse_config's problems (``[]``: accepted); anything but a ConfigError propagates."""
    try:
        parse_config(text, path)
    except ConfigError as exc:
        return exc.problems
    return []


def _assert_clean(problems: list[str], path: Path) -> None:
    where = re.compile(re.escape(str(path)) + r"(:\d+)?: \S")
    assert len(problems) <= MAX_PROBLEMS + 1
    assert sum(map(len, problems)) <= OUTPUT_CHARS
    for problem in problems:
        assert where.match(problem), problem[:300]
        assert CHECK_FAILED not in problem, problem[:300]  # a validator crashed: fix it, do not catch it


@pytest.fixture
def traced() -> Iterator[None]:
    config_model()  # build the drivers' union once, outside any case's budget
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _bounded(text: str, path: Path) -> list[str]:
    """Validate within the time and memory bounds; the problems."""
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    started, cpu = time.perf_counter(), time.process_time()
    problems = _validate(text, path)
    elapsed, spent = time.perf_counter() - started, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    # CPU time, so other processes on a loaded machine do not count against the bound.
    assert spent < CASE_SECONDS, f"{spent:.2f} s of CPU"
    assert elapsed < CASE_WALL_SECONDS, f"{elapsed:.2f} s"
    assert peak - before < CASE_BYTES, f"{(peak - before) / 2**20:.0f} MiB"
    _assert_clean(problems, path)
    return problems


# ---- the property test ------------------------------------------------------------------------


def _schema_keys() -> list[str]:
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config_model().model_json_schema())
    return sorted(keys)


KEYS = _schema_keys()
WORDS = [
    "", " ", "-1", "0", "1e400", "nan", "null", "true", "~", "modbus", "serial", "virtual", "opcua", "camera",
    "eastron-sdm630", "generic-di8", "<Q999999999999999f", "<" + "d" * 5000, "<4096s", ">hHH", "(?P<a>" * 40,
    "(?P<x>.)" * 3, "a" * 5000, "../../../etc/passwd", "/dev/zero", "/", "/proc/self/mem", "1MiB", "9999999TiB",
    "5s", "-5s", "1e308s", "AA55", "0x", "zz", "holding", "coil", "float32", "string", "bitfield", "rtu",
    "rtu_over_tcp", "binary", "line", "crc16-modbus", "opc.tcp://127.0.0.1:1", "ns=2;s=x", "i=85",
    "127.0.0.1:99999", "[::1]:9108", "0.0.0.0:1", "meter", "parking", "crosswalk", "voltage", "L1", "gateway",
    "Basic256Sha256", "SignAndEncrypt", "ascii", "utf-16", "\\xff\\u12", "\\", "%s%n", "${HOME}", "é", "\t",
]  # fmt: skip
NUMBERS = st.sampled_from([0, -1, 1, 2, 7, 247, 255, 65535, 65536, 2**31, 2**63, -(2**63), 10**30]) | st.integers(
    -1000, 100_000
)
SCALARS = (
    st.none()
    | st.booleans()
    | NUMBERS
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(WORDS)
    | st.text(max_size=12)
)
KEY = st.sampled_from(KEYS) | st.text(max_size=6)
KEY = st.sampled_from(KEYS) | st.text(max_size=6)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
    max_leaves=6,
)
TOKENS = [
    "&a ", "*a", "<<: *a\n", "<<: ", "[", "]", "{", "}", ": ", "- ", "\t", "!!int ", "!!float ", "!!bool ",
    "!!binary ", "!!set ", "!!omap ", "!!timestamp ", "!!python/object:os.system ", "? ", "|\n", ">-\n", '"',
    "'", "\n", "#", "%YAML 1.1\n", "---\n", "...\n", "\\", "\x00", "\x1b", "\ufeff", "\u2028", ",", "  ",
    "2024-13-45", "9" * 5000, ".inf", "0o777", "0x_", "1_000", "190:20:30", "=",
]  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


@st.composite
def _structural(draw: st.DrawFn, data: Any) -> str:
    """A shipped config with values replaced, removed, added, wrapped or swapped."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:  # an earlier step left nothing to reach into
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(data, path[:-1]), path[-1]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap", "swap", "rename"]))
        if op == "replace":
            parent[key] = draw(VALUES)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(VALUES)
        elif op == "add":
            parent.append(copy.deepcopy(draw(st.sampled_from(parent))) if parent else draw(VALUES))
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"a": parent[key]}, {parent[key]: 1}
                                                if isinstance(parent[key], str) else [[parent[key]]]]))  # fmt: skip
        elif op == "swap":
            parent[key] = copy.deepcopy(_at(data, draw(st.sampled_from(list(_paths(data))))))
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = parent.pop(key)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


@st.composite
def _textual(draw: st.DrawFn, text: str) -> str:
    """A shipped config's text with YAML syntax inserted, spans deleted or repeated."""
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "insert", "delete", "repeat"]))
        if op == "insert":
            text = text[:at] + draw(st.sampled_from(TOKENS) | st.text(max_size=4)) + text[at:]
        else:
            end = draw(st.integers(at, min(len(text), at + 60)))
            text = text[:at] + text[end:] if op == "delete" else text[:end] + text[at:end] * 3 + text[end:]
    return text


@st.composite
def _bomb(draw: st.DrawFn, data: Any) -> str:
    """A value of a shipped config replaced by an alias of an alias ... (a "billion laughs")."""
    width, levels = draw(st.integers(2, 12)), draw(st.integers(1, 9))
    anchors = ["x-l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        anchors.append(f"x-l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    data = copy.deepcopy(data)
    path = draw(st.sampled_from([p for p in _paths(data) if p]))
    _at(data, path[:-1])[path[-1]] = "@@BOMB@@"
    text = yaml.safe_dump(data, sort_keys=False, width=1000).replace("'@@BOMB@@'", f"*l{levels - 1}")
    return "\n".join(anchors) + "\n" + text


def _mutants() -> st.SearchStrategy[tuple[Path, str]]:
    choices = []
    for path in SHIPPED:
        text = path.read_text()
        data = yaml.safe_load(text)
        for strategy in (_structural(data), _structural(data), _textual(text), _bomb(data)):
            choices.append(st.tuples(st.just(path), strategy))
    return st.one_of(choices)


def test_the_shipped_configs_are_all_found() -> None:
    names = {p.name for p in SHIPPED}
    assert {"example.yaml", "modbus-site.yaml", "serial-sensor.yaml", "site.example.yaml"} <= names
    for path in SHIPPED:
        assert _validate(path.read_text(), path) == [], path


@settings(
    max_examples=300,
    deadline=None,  # measured per case below, with the memory
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # tracemalloc on for the whole test: nothing to reset
    ],
)
@given(case=_mutants())
def test_mutated_shipped_configs_end_in_a_clean_error_or_acceptance(traced: None, case: tuple[Path, str]) -> None:
    path, text = case
    _bounded(text, path)


# ---- bounds of the parser ----------------------------------------------------------------------


def _laughs(width: int, levels: int, where: str = "qos") -> str:
    """The tester's file: each level an array of ``width`` aliases of the previous one."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * width)}]" for n in range(1, levels)]
    return "\n".join(["gateway: {id: gw-1}", *lines, f"uplink: {{mqtt: {{{where}: *l{levels - 1}}}}}", ""])


def test_alias_expansion_is_counted_not_performed(traced: None) -> None:
    path = Path("/site/bomb.yaml")
    for width, levels in ((9, 9), (10, 10), (20, 12)):  # 9^9 = 387 million values, 10^10, 20^12
        problems = _bounded(_laughs(width, levels), path)
        assert len(problems) == 1, problems
        assert f"holds more than {MAX_NODES:,} values" in problems[0]
        assert problems[0].startswith(f"{path}:")


def test_a_cycle_through_an_alias_is_refused() -> None:
    problems = _validate(HEAD + "priorities: &p {a: *p}\n", Path("/s.yaml"))
    assert problems == ["/s.yaml:4: an alias refers to a value that contains it (a cycle)"]


def test_nesting_is_bounded_while_parsing_and_through_aliases(traced: None) -> None:
    path = Path("/site/deep.yaml")
    for text in (
        HEAD + "priorities: " + "[" * 10_000 + "]" * 10_000 + "\n",
        HEAD + "priorities:\n" + "".join(" " * n + "-\n" for n in range(1, 200)),
        HEAD + "priorities: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    ):
        problems = _bounded(text, path)
        assert len(problems) == 1
        assert f"nested deeper than {MAX_DEPTH} levels" in problems[0], problems
    # 40 levels + an alias of 40 levels: each half is fine, the whole is not
    half = "[" * 40 + "]" * 40
    problems = _validate(HEAD + f"x-a: &a {half}\npriorities: " + "[" * 40 + "*a" + "]" * 40 + "\n", path)
    assert any("counting what aliases stand for" in p for p in problems), problems


def test_size_is_capped_before_parsing(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(HEAD + "# " + "x" * MAX_BYTES + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    assert time.perf_counter() - started < 1
    assert caught.value.problems == [
        f"{site}: larger than 1 MiB: a site file is never this big (is it the right file?)"
    ]


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_bytes(HEAD.encode() + b"devices: []  # caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    offset = len(HEAD.encode()) + len("devices: []  # caf")
    assert caught.value.problems == [f"{site}:4: not UTF-8 text: byte 0xe9 at offset {offset}"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a: !!int abc\n", 1, "not a valid int"),
        ("a: !!bool maybe\n", 1, "not a valid bool"),
        ("a: 2024-13-45\n", 1, "not a valid timestamp: month must be in 1..12"),
        ("a: " + "9" * 5000 + "\n", 1, "not a valid int: Exceeds the limit"),
        ("a: 1\nb: {c: 1, c: 2}\n", 2, "duplicate key 'c'"),
        ("a: &x 1\nb: &x 2\n", 2, "duplicate anchor 'x'"),
        ("? [1]\n: 2\n", 1, "found unhashable key"),
        ("a: !!python/object:os.system x\n", 1, "could not determine a constructor"),
        ("a: {<<: 1}\n", 1, "expected a mapping or list of mappings for merging"),
        ("a: {<<: {b: 1}, <<: {c: 1}}\n", 1, "duplicate key '<<'"),
        ("a: 1\nb: x\x01\n", 2, "control characters are not allowed"),
    ],
)
def test_yaml_problems_are_located_errors(text: str, line: int, message: str) -> None:
    with pytest.raises(YamlLoadError) as caught:
        load_yaml(text)
    assert caught.value.line == line
    assert message in caught.value.message


def test_echoed_values_are_clipped() -> None:
    path = Path("/s.yaml")
    huge = "x" * 200_000
    problems = _validate(HEAD.replace("host: 127.0.0.1", f"host: 127.0.0.1, qos: {huge}") + f"? {huge}\n: 1\n", path)
    assert len(problems) == 2, problems
    assert all(len(p) < 300 for p in problems), [len(p) for p in problems]
    assert "uplink.mqtt.qos: Input should be 0, 1 or 2, got 'xxx" in problems[0]
    assert problems[1].endswith(": unknown key (check the spelling; see `edge-agent schema`)")


def test_many_problems_are_counted_not_listed(traced: None) -> None:
    path = Path("/s.yaml")
    text = HEAD + "".join(f"k{n}: 1\n" for n in range(5000))
    problems = _bounded(text, path)
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1] == f"{path}: ... and {5000 - MAX_PROBLEMS} more problem(s): fix the ones above first"
    assert problems[0] == f"{path}:4: k0: unknown key (check the spelling; see `edge-agent schema`)"


# ---- merge keys --------------------------------------------------------------------------------

MERGED = """\
gateway: {id: gw-1}
buffer: {path: var/b.db}
x-meter: &meter
  driver: virtual
  kind: meter
  interval: 5s
x-fast: &fast {interval: 500ms, offline_after: 5}
devices:
  - {<<: *meter, id: m1}
  - <<: *meter
    id: m2
    interval: 2s
  - {<<: [*fast, *meter], id: m3}
"""


def test_merge_keys_and_x_keys_hold_shared_settings(tmp_path: Path) -> None:
    assert "^x-" in json_schema()["patternProperties"]  # editors accept them too
    config = parse_config(MERGED, tmp_path / "site.yaml")
    assert [(d.id, d.driver, d.interval, d.offline_after) for d in config.devices] == [
        ("m1", "virtual", 5.0, 3),
        ("m2", "virtual", 2.0, 3),  # the mapping's own key wins
        ("m3", "virtual", 0.5, 5),  # the first merged mapping wins over the next
    ]


def test_a_problem_in_merged_or_own_keys_names_the_line_it_was_written_on(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    problems = _validate(MERGED.replace("kind: meter", "kind: toaster").replace("2s", "soon"), site)
    assert [p.split(": ")[:2] for p in problems] == [
        [f"{site}:5", "devices[0].kind"],
        [f"{site}:5", "devices[1].kind"],
        [f"{site}:5", "devices[2].kind"],
        [f"{site}:12", "devices[1].interval"],
    ]


# ---- the CLI, as the tester ran it -----------------------------------------------------------


def _cli(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    return done, time.perf_counter() - started


def test_cli_validate_refuses_an_alias_bomb_quickly_and_briefly(tmp_path: Path) -> None:
    _cli("--version")  # warm the interpreter's caches so that the timing below is the validation's
    baseline = _cli("validate", "-c", str(tmp_path / "missing.yaml"))[1]
    for name, text in (
        ("qos", _laughs(9, 9)),  # the tester's 431-byte file, near enough
        ("deeper", _laughs(10, 10)),  # the one that hung
        ("partial", _laughs(9, 6, "priorities")),  # 9^6 = 531,441 values: past the bound, not by much
    ):
        site = tmp_path / f"{name}.yaml"
        site.write_text(text)
        done, seconds = _cli("validate", "-c", str(site))
        assert done.returncode == 2, done.stderr[-2000:]
        assert seconds - baseline < 1.5, f"{name}: {seconds:.1f} s (baseline {baseline:.1f} s)"
        assert len(done.stdout) + len(done.stderr) < 1000, f"{name}: {len(done.stderr)} characters"
        assert f"{site}:" in done.stderr
        assert "holds more than" in done.stderr
        assert "Traceback" not in done.stderr


def test_cli_validate_under_the_alias_bound_is_quick_and_brief(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(_laughs(20, 4))  # 20^4 = 160,000 values reach the qos check: refused for what it is
    done, _ = _cli("validate", "-c", str(site))
    assert done.returncode == 2
    assert len(done.stderr) < 2000, len(done.stderr)
    assert re.search(
        rf"{re.escape(str(site))}:\d+: uplink\.mqtt\.qos: Input should be 0, 1 or 2, got \[\[", done.stderr
    )


def test_cli_validate_refuses_deep_nesting(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(HEAD + "priorities: " + "[" * 10_000 + "]" * 10_000 + "\n")
    done, _ = _cli("validate", "-c", str(site))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{site}:4: nested deeper than {MAX_DEPTH} levels" in done.stderr


DEVICE = "devices:\n  - {id: m1, driver: virtual, kind: meter}\n"
MODBUS = "devices:\n  - {id: m1, driver: modbus, host: 10.0.0.1, profile: eastron-sdm630}\n"
SERIAL = (
    "devices:\n  - {id: s1, driver: serial, port: /dev/ttyS0, framing: {kind: binary, sync: AA55, layout: '<BB',"
    " checksum: none}, fields: [{name: 0, quantity: temperature}]}\n"
)


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        ("driver as a list", DEVICE.replace("driver: virtual", "driver: [virtual]"), "devices[0].driver"),
        ("driver as a mapping", DEVICE.replace("driver: virtual", "driver: {virtual: 1}"), "devices[0].driver"),
        ("id as a list", DEVICE.replace("id: m1", "id: [m1]"), "devices[0].id"),
        ("id as a mapping", DEVICE.replace("id: m1", "id: {m: 1}"), "devices[0].id"),
        ("points: true with a profile", MODBUS.replace("}\n", ", points: true}\n"), "devices[0].points"),
        (
            "point name as a mapping",
            MODBUS.replace("}\n", ", points: [{name: {a: 1}, deadband: 1}]}\n"),
            "devices[0].points",
        ),
        ("exclude as a number", MODBUS.replace("}\n", ", exclude: 5}\n"), "devices[0].exclude"),
        ("exclude of lists", MODBUS.replace("}\n", ", exclude: [[a]]}\n"), "devices[0].exclude[0]"),
        ("profile as a list", MODBUS.replace("eastron-sdm630", "[eastron-sdm630]"), "devices[0].profile"),
        ("huge serial layout", SERIAL.replace("<BB", "<Q999999999999999f"), "devices[0].framing.layout"),
        ("big serial layout", SERIAL.replace("<BB", "<99999999B"), "devices[0].framing.layout"),
    ],
)
def test_cli_validate_names_file_line_and_field_for_what_crashed_it(
    tmp_path: Path, name: str, text: str, field: str
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(HEAD + text)
    done, _ = _cli("validate", "-c", str(site))
    assert done.returncode == 2, f"{name}: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr
    assert re.search(rf"^  {re.escape(str(site))}:5: {re.escape(field)}: ", done.stderr, re.M), done.stderr


def test_a_running_agent_refuses_a_bomb_on_reload_and_keeps_running(tmp_path: Path, agent_factory: Any) -> None:
    site = write_config(tmp_path / "site.yaml", port=1, devices=DEVICE.removeprefix("devices:\n"))
    agent = agent_factory(site)
    wait_for(lambda: "device m1 online" in agent.output(), 20, "the agent running")
    site.write_text(_laughs(10, 10))
    started = time.monotonic()
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in agent.output(), 10, "the refused reload")
    assert time.monotonic() - started < 5
    assert len(agent.output()) < 20_000
    assert "holds more than" in agent.output()
    assert agent.proc is not None and agent.proc.poll() is None
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
