"""The Sparkplug B payload messages, built from the pinned ``sparkplug_b.proto`` (see NOTICE.md).

No generated code is committed: on first use ``protoc`` (Debian ``protobuf-compiler``) compiles
the .proto into a descriptor set, kept in a cache folder under the file's SHA-256, and the
``protobuf`` runtime builds the message classes from it. A descriptor set rather than protoc's
Python output, because the runtime refuses generated Python older than itself, while a
descriptor set reads the same on every runtime version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

PROTO = Path(__file__).with_name("sparkplug_b.proto")
PACKAGE = "org.eclipse.tahu.protobuf"
CACHE_ENV = "EDGE_AGENT_CACHE_DIR"


def _cache_dir() -> Path:
    """Where compiled descriptors live: $EDGE_AGENT_CACHE_DIR, $XDG_CACHE_HOME/edge-agent or ~/.cache/edge-agent."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "edge-agent"


def _compile(target: Path) -> None:
    protoc = shutil.which("protoc")
    if protoc is None:
        raise RuntimeError("the Sparkplug uplink needs protoc to build its payload module: install Debian's "
                           "protobuf-compiler (apt-get install protobuf-compiler)")  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written beside the target and renamed: two processes compiling at once never read half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        subprocess.run(  # noqa: S603 - protoc found on PATH, arguments are our own paths
            [protoc, f"--proto_path={PROTO.parent}", f"--descriptor_set_out={tmp}", PROTO.name],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"protoc could not compile {PROTO}: {exc.stderr.decode(errors='replace')}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def descriptor_file() -> Path:
    """The compiled descriptor set of the pinned .proto (compiled now if not cached)."""
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    name = f"sparkplug_b-{digest}.desc"
    target = _cache_dir() / "sparkplug" / name
    if target.is_file():
        return target
    try:
        _compile(target)
    except OSError:
        # A service user without a writable home: compile for this process only.
        target = Path(tempfile.mkdtemp(prefix="edge-agent-sparkplug-")) / name
        _compile(target)
    return target


@cache
def payload_class() -> Any:
    """``org.eclipse.tahu.protobuf.Payload``, the message every Sparkplug B topic carries."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString(descriptor_file().read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


def new_payload() -> Any:
    """An empty Payload message."""
    return payload_class()()
