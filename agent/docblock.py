"""Generated blocks inside hand-written docs: the text between two markers, rewritten in place."""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, begin: str, end: str, block: str) -> bool:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the one in
    ``path``; returns whether the file changed."""
    text = path.read_text()
    head, rest = text.split(begin, 1)
    new = head + block + rest.split(end, 1)[1]
    if new != text:
        path.write_text(new)
    return new != text
