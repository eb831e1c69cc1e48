"""The service user and what it may open.

The doctor usually runs as root while the agent runs as ``edge-agent``, so access is computed
from each file's mode, owner and group and the service user's groups, never with
``os.access`` (which answers for root).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "edge-agent"
R, W, X = 4, 2, 1  # permission bits, as in each rwx triplet of a mode


@dataclass(frozen=True)
class ServiceUser:
    """The account the agent runs as: what it may open is computed from modes, not os.access."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def lookup(cls, name: str) -> ServiceUser:
        """The user's uid, primary and supplementary groups.

        Raises:
            KeyError: no such user.
        """
        pw = pwd.getpwnam(name)
        return cls(name, pw.pw_uid, pw.pw_gid, frozenset(os.getgrouplist(name, pw.pw_gid)))

    def allowed(self, st: os.stat_result, want: int) -> bool:
        """Whether the mode bits of ``st`` grant ``want`` (R|W|X) to this user (ACLs aside)."""
        if self.uid == 0:
            return True  # root: CAP_DAC_OVERRIDE (search on a directory, read and write on anything)
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want

    @property
    def group_name(self) -> str:
        """Name of the primary group."""
        return group_name(self.gid)


def default_user() -> str:
    """``edge-agent`` if that account exists, else whoever runs the doctor."""
    try:
        pwd.getpwnam(DEFAULT_USER)
    except KeyError:
        return pwd.getpwuid(os.geteuid()).pw_name
    return DEFAULT_USER


def group_name(gid: int) -> str:
    """The group's name, or its number if it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe(st: os.stat_result) -> str:
    """``crw-rw---- root:dialout``."""
    return f"{stat.filemode(st.st_mode)} {_user_name(st.st_uid)}:{group_name(st.st_gid)}"


def _wants(want: int) -> str:
    return " and ".join(w for bit, w in ((R, "read"), (W, "write"), (X, "enter")) if want & bit)


@dataclass(frozen=True)
class Denied:
    """Why a user cannot reach a file: the path that stops it and that path's status."""

    path: Path
    st: os.stat_result
    want: int
    finding: str


def denied(path: Path, user: ServiceUser, want: int) -> Denied | None:
    """What stops ``user`` from ``want`` on ``path`` (which must exist): a folder on the way or the file."""
    real = path.resolve()
    for folder in reversed(real.parents):
        st = folder.stat()
        if not user.allowed(st, X):
            return Denied(folder, st, X, f"{user.name} cannot enter {folder} ({describe(st)})")
    st = real.stat()
    if not user.allowed(st, want):
        return Denied(real, st, want, f"{describe(st)}: {user.name} cannot {_wants(want)} it")
    return None


def group_fix(d: Denied, user: ServiceUser) -> str | None:
    """``usermod -aG <group>`` when the file's group has the access the user lacks."""
    if (d.st.st_mode >> 3) & d.want == d.want and d.st.st_gid not in user.groups and d.st.st_uid != user.uid:
        return (
            f"usermod -aG {group_name(d.st.st_gid)} {user.name}, then restart the agent "
            "(group membership is read when a process starts)"
        )
    return None


def access_fix(d: Denied, user: ServiceUser, *, secret: bool = False, home: str = "") -> str:
    """A command that gives ``user`` the access it lacks (``home``: where such files belong)."""
    if secret and d.want != X:  # its owner alone may read it (validate and run warn about anything wider)
        return f"chown {user.name} {d.path} && chmod 600 {d.path}"
    by_group = group_fix(d, user)
    if by_group is not None:
        return by_group
    if d.want == X:
        where = f" (e.g. {home})" if home else ""
        return f"move it to a folder {user.name} can enter{where}, or chmod o+x {d.path}"
    if stat.S_ISCHR(d.st.st_mode):
        return (
            f'give the device a group with read-write access, e.g. a udev rule GROUP="dialout", MODE="0660" '
            f"in /etc/udev/rules.d/99-edge-agent.rules, then usermod -aG dialout {user.name}"
        )
    if stat.S_ISDIR(d.st.st_mode):
        return f"chown -R {user.name}:{user.group_name} {d.path}"
    if d.want == R:
        return f"chgrp {user.group_name} {d.path} && chmod g+r {d.path}"
    return f"chown {user.name}:{user.group_name} {d.path}"
