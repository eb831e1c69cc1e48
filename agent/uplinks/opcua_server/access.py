"""Access: who may log in, which services each role may call, and what UserAccessLevel tells a session.

No anonymous session unless ``allow_anonymous`` (and then read-only); users from ``users_file``
or ``user``/``password_file`` may write only the points listed in ``writable``. As OPC UA
clients expect: a point not listed has AccessLevel CurrentRead and any write to it is
BadNotWritable; a listed one has AccessLevel CurrentRead|CurrentWrite, and UserAccessLevel says
the same to a user login but CurrentRead to an anonymous session, whose writes get
BadUserAccessDenied. A Write request is answered per node, anonymous or not (``writes.py``).
Nobody gets asyncua's admin role.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

from agent.uplinks.opcua_server.nodes import node_id
from agent.uplinks.opcua_server.trust import CHANNEL

if TYPE_CHECKING:
    from agent.uplinks.opcua_server.trust import ClientTrust

log = logging.getLogger(__name__)


class Users:
    """asyncua user manager: the configured users are role User; anonymous (if offered) is role Anonymous.

    With a trust list, a secure channel's certificate must be trusted (BadCertificateUntrusted):
    asyncua's validator hook runs only when the client names a certificate in CreateSession,
    which it may leave out. A None channel's session is never refused for a certificate.
    """

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.trust: ClientTrust | None = None

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:  # fmt: skip
        from asyncua.common.utils import ServiceError
        from asyncua.crypto.permission_rules import User, UserRole
        from asyncua.ua.status_codes import StatusCodes

        # asyncua passes the channel's client certificate (empty on a None channel) whatever the
        # token, and user certificate tokens are not offered: no user name means an anonymous
        # token, which asyncua only lets through when allow_anonymous put it in the identity tokens.
        del iserver
        channel = CHANNEL.get()
        secure, der = (channel.secure, channel.certificate) if channel is not None else (bool(certificate), certificate)
        if self.trust is not None and secure and not self.trust.check(der):
            log.warning("OPC UA server: session refused: the secure channel's client certificate is not trusted")
            raise ServiceError(StatusCodes.BadCertificateUntrusted)
        if username is None:
            return User(role=UserRole.Anonymous)
        expected = self.users.get(username)
        if expected is not None and hmac.compare_digest(expected.encode(), (password or "").encode()):
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA server: login refused for user %r", username)
        return None


class Rules:
    """Which services each role may call: anonymous reads, browses and subscribes; users may also call methods.

    Both may send Write requests: ``writes.DeviceWrites`` answers each node (an anonymous session
    gets BadUserAccessDenied or BadNotWritable per node, not a refused request). asyncua's default
    ruleset refuses anonymous sessions everything and lets its admin role edit the address space;
    nobody here is admin.
    """

    def __init__(self) -> None:
        from asyncua.crypto.permission_rules import USER_TYPES, UserRole
        from asyncua.ua.object_ids import ObjectIds

        user = {node_id(t) for t in USER_TYPES}
        changing = {node_id(t) for t in (ObjectIds.CallRequest_Encoding_DefaultBinary,
                                          ObjectIds.HistoryUpdateRequest_Encoding_DefaultBinary)}  # fmt: skip
        self._allowed = {UserRole.User: user, UserRole.Anonymous: user - changing}

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        del body
        return action_type_id in self._allowed.get(user.role, set())


# AccessLevel bits that allow a change: CurrentWrite, HistoryWrite, StatusWrite, TimestampWrite (Part 3, 8.57).
WRITE_ACCESS_BITS = 0x02 | 0x08 | 0x20 | 0x40


def session_access_levels(event: Any, _dispatcher: Any) -> None:
    """asyncua's post-read callback: what UserAccessLevel tells the session reading it.

    asyncua keeps one UserAccessLevel per variable; it is what a user login may do (CurrentWrite
    on the ``writable`` points). Sessions without a login never write, so they are shown the
    level without its write bits, as clients grey out what they cannot change.
    """
    from dataclasses import replace

    from asyncua import ua
    from asyncua.crypto.permission_rules import UserRole
    from asyncua.ua.attribute_ids import AttributeIds

    if getattr(event.user, "role", None) in (UserRole.User, UserRole.Admin):
        return
    results: list[ua.DataValue] = event.response_params
    for n, item in enumerate(event.request_params.NodesToRead):
        if item.AttributeId != AttributeIds.UserAccessLevel:
            continue
        found = results[n]
        if found.Value is not None and isinstance(found.Value.Value, int) and found.Value.Value & WRITE_ACCESS_BITS:
            level = found.Value.Value & ~WRITE_ACCESS_BITS
            results[n] = replace(found, Value=ua.Variant(level, found.Value.VariantType))
