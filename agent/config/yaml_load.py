"""Bounded YAML loading for files an operator (or an attacker) writes: the site file.

PyYAML's safe loader is safe from code execution, not from exhaustion. This module bounds
the three ways a small file becomes a large job:

- **size**: at most :data:`MAX_BYTES` (1 MiB) are read;
- **nesting**: at most :data:`MAX_DEPTH` (64) levels, counted while parsing (a 10,000-deep
  ``[[[...]]]`` stops at level 65 instead of exhausting the recursion limit) and again through
  aliases;
- **aliases**: the document, with every alias counted as the whole value it stands for each
  time it is used, has at most :data:`MAX_NODES` (500,000) values, about what the size cap
  allows without aliases. A "billion laughs" file of a few hundred bytes is refused before
  anything walks its expansion.

It also refuses duplicate keys (PyYAML keeps the last one silently) and supports merge keys
(``<<: *base`` and ``<<: [*a, *b]``): the mapping's own keys win over merged ones, an earlier
merged mapping over a later one. Every error is a :class:`YamlLoadError` with a 1-based line
and a short message that never echoes more than :func:`clip` lets through.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 500_000
ECHO_CHARS = 80  # the most of a value any message repeats

_MERGE_TAG = "tag:yaml.org,2002:merge"
_CYCLE = "an alias refers to a value that contains it (a cycle)"

_WITH_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))


class YamlLoadError(Exception):
    """The text is not YAML, or exceeds a bound; ``line`` is 1-based (None: the whole file)."""

    def __init__(self, message: str, line: int | None = None, *, bound: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.bound = bound  # a limit of this module, not a YAML syntax error


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = ECHO_CHARS
_REPR.maxother = ECHO_CHARS
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6


def clip(value: object, most: int = ECHO_CHARS) -> str:
    """``repr(value)`` of at most ``most`` characters, computed without walking all of a big value."""
    return clip_text(_REPR.repr(value), most)


def clip_text(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters (with ``...``), for messages that embed values."""
    return text if len(text) <= most else text[: most - 3] + "..."


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The file's UTF-8 text, read no further than ``max_bytes`` + 1.

    Raises:
        OSError: it cannot be opened or read.
        YamlLoadError: it is larger than ``max_bytes`` or not UTF-8.
    """
    with path.open("rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise YamlLoadError(
            f"larger than {_size(max_bytes)}: a site file is never this big (is it the right file?)", bound=True
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise YamlLoadError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}", line) from None


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


class _BoundedComposer(Composer):
    """The composer, refusing to nest deeper than ``max_depth`` while it reads."""

    max_depth = MAX_DEPTH
    peek_event: Callable[[], Event]  # the parser's, next in line

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                mark: Any = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {self.max_depth} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Constructor(SafeConstructor):
    """SafeConstructor whose scalar conversions fail with a located YAML error, never a bare one,
    and whose merge keys follow the spec whatever the string interning."""

    def flatten_mapping(self, node: MappingNode) -> None:
        """Fold ``<<`` merges into ``node.value``: later pairs win when the mapping is built, so the
        merged mappings go first, the first of a list last, and the mapping's own keys after all."""
        sources: list[list[tuple[Node, Node]]] = []
        own: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                if key_node.tag == "tag:yaml.org,2002:value":
                    key_node.tag = "tag:yaml.org,2002:str"
                own.append((key_node, value_node))
                continue
            merged = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in merged:
                if not isinstance(source, MappingNode):
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found {source.id}",
                        source.start_mark,
                    )
                self.flatten_mapping(source)
                sources.append(source.value)
        if sources:
            node.value = [pair for source in reversed(sources) for pair in source] + own

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # a scalar PyYAML cannot convert, however it fails
            # !!int abc, !!bool maybe, 2024-13-45 (a date), an int of 5,000 digits...
            kind = node.tag.rsplit(":", 1)[-1]
            raise ConstructorError(
                None,
                None,
                f"not a valid {kind}: {clip_text(str(exc) or type(exc).__name__, ECHO_CHARS)}",
                node.start_mark,
            ) from None


if _WITH_LIBYAML:  # libyaml's parser (several times faster) feeding the bounded composer
    from yaml._yaml import CParser

    class _Loader(_BoundedComposer, CParser, _Constructor, Resolver):
        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _Constructor.__init__(self)
            Resolver.__init__(self)
            _BoundedComposer.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Loader(Reader, Scanner, Parser, _BoundedComposer, _Constructor, Resolver):  # type: ignore[no-redef]
        def __init__(self, text: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)
            _BoundedComposer.__init__(self)
            _Constructor.__init__(self)
            Resolver.__init__(self)


def load_yaml(
    text: str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES
) -> tuple[Any, Node | None]:
    """Parse one YAML document within the bounds; (data, its node tree for line numbers).

    The node tree is the one the data was built from, merge keys already folded in (a merged
    key's node points at the line it was written on).

    Raises:
        YamlLoadError: not YAML, a duplicate key, or a bound exceeded.
    """
    if len(text) > max_bytes:
        raise YamlLoadError(
            f"larger than {_size(max_bytes)}: a site file is never this big (is it the right file?)", bound=True
        )
    loader = _Loader(text)
    loader.max_depth = max_depth
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        check_nodes(root, max_depth=max_depth, max_nodes=max_nodes)
        return loader.construct_document(root), root
    except yaml.YAMLError as exc:
        error = _located(exc)
        position = getattr(exc, "position", None)  # a ReaderError (a control character) has no mark
        if error.line is None and isinstance(position, int):
            error.line = text.count("\n", 0, position) + 1
        raise error from None
    except RecursionError:  # pragma: no cover - the depth bounds come first
        raise YamlLoadError(f"nested deeper than {max_depth} levels", bound=True) from None
    finally:
        loader.dispose()


def _located(exc: yaml.YAMLError) -> YamlLoadError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and isinstance(exc, ComposerError) and "duplicate anchor" in context and exc.context_mark:
        problem = f"{context} on line {exc.context_mark.line + 1}, {problem} here"
    elif "nesting depth" in str(problem):  # libyaml's own limit (1000), met while it looks ahead
        problem = f"nested deeper than {MAX_DEPTH} levels"
    line = mark.line + 1 if mark is not None else None
    return YamlLoadError(clip_text(str(problem), 200), line, bound=str(problem).startswith("nested deeper"))


def check_nodes(root: Node, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Refuse a node graph that is cyclic, deeper than ``max_depth`` or larger than ``max_nodes``
    once aliases are expanded, or that has a duplicate key; O(distinct nodes), nothing expanded.

    Raises:
        YamlLoadError: naming the line of the offending value.
    """
    size: dict[int, int] = {}  # of each collection, aliases expanded; a scalar counts 1
    depth: dict[int, int] = {}
    on_path: set[int] = set()  # collections being measured: meeting one again is a cycle
    stack: list[tuple[Node, list[Node] | None]] = [(root, None)]
    while stack:
        node, children = stack.pop()
        key = id(node)
        if children is not None:  # its children are measured: measure it
            on_path.discard(key)
            total, deepest = 1, 0
            for child in children:
                if child.__class__ is ScalarNode:
                    total, deepest = total + 1, deepest or 1
                else:
                    total += size[id(child)]
                    deepest = max(deepest, depth[id(child)])
            if deepest + 1 > max_depth:
                raise YamlLoadError(
                    f"nested deeper than {max_depth} levels (counting what aliases stand for)",
                    node.start_mark.line + 1,
                    bound=True,
                )
            if total > max_nodes:
                raise YamlLoadError(
                    f"this value holds more than {max_nodes:,} values, counting each alias as all of what it "
                    "stands for every time it is used (an alias bomb?)",
                    node.start_mark.line + 1,
                    bound=True,
                )
            size[key], depth[key] = total, deepest + 1
            continue
        if key in size or node.__class__ is ScalarNode:
            continue
        if isinstance(node, MappingNode):
            _check_keys(node)
            children = [n for pair in node.value for n in pair]
        else:
            children = list(node.value)
        on_path.add(key)
        stack.append((node, children))
        for child in children:
            if child.__class__ is not ScalarNode and id(child) not in size:
                if id(child) in on_path:
                    raise YamlLoadError(_CYCLE, child.start_mark.line + 1, bound=True)
                stack.append((child, None))


def _check_keys(node: MappingNode) -> None:
    """Duplicate keys, as written (before merge keys fold other mappings in)."""
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode):
            continue  # a list or mapping as a key: the constructor refuses it (unhashable)
        written = (key_node.tag, key_node.value)
        if written in seen:
            name = "<<" if key_node.tag == _MERGE_TAG else key_node.value
            raise YamlLoadError(f"duplicate key {clip(name)}", key_node.start_mark.line + 1)
        seen.add(written)
