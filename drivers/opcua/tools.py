"""Technician commands: ``edge-agent browse opcua`` and ``edge-agent simulate opcua``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from pathlib import Path
from typing import Any

SKIPPED = {"i=2253"}  # Objects/Server: thousands of diagnostics nodes nobody wires to a meter
MAX_VALUE = 40  # characters of a value shown in the tree


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="opc.tcp://host:4840[/path]")
    parser.add_argument("--security", default="None", metavar="POLICY[,MODE]",
                        help="None (default), or e.g. Basic256Sha256,SignAndEncrypt or "
                             "Aes128Sha256RsaOaep,Sign")  # fmt: skip
    parser.add_argument("--cert-dir", type=Path,
                        help="the gateway's certificate folder (the device's cert_dir, so the PLC trusts it); "
                             "created if missing")  # fmt: skip
    parser.add_argument("--user", help="user name login")
    parser.add_argument("--password-file", type=Path, help="file holding the password (never on the command line)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")


def _config(args: argparse.Namespace) -> Any:
    """An OpcUaConfig for the connection (one probe point: the server's CurrentTime, on every server)."""
    from drivers.opcua.config import OpcUaConfig

    policy, _, mode = args.security.partition(",")
    raw: dict[str, Any] = {
        "id": "cli", "driver": "opcua", "endpoint": args.endpoint, "timeout": args.timeout,
        "security_policy": policy, "security_mode": mode or ("None" if policy == "None" else "SignAndEncrypt"),
        "cert_dir": str(args.cert_dir) if args.cert_dir else None,
        "username": args.user, "password_file": str(args.password_file) if args.password_file else None,
        "points": [{"name": "probe", "node": "i=2258", "quantity": "counter"}],
    }  # fmt: skip
    return OpcUaConfig.model_validate(raw)


def browse_main(argv: list[str]) -> int:
    """Print the address space under Objects (NodeIds, browse paths, data types, values) to pick points."""
    parser = argparse.ArgumentParser(prog="edge-agent browse opcua", description=browse_main.__doc__)
    _connection_args(parser)
    parser.add_argument("--depth", type=int, default=3, help="levels below the start node (default 3)")
    parser.add_argument("--start", default="i=85", help="NodeId to start from (default i=85, Objects)")
    parser.add_argument("--all", action="store_true", help="include Objects/Server (diagnostics)")
    parser.add_argument("--endpoints", action="store_true", help="list the endpoints the server offers and exit")
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    try:
        config = _config(args)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"error: {err['msg']}", file=sys.stderr)
        return 2
    return asyncio.run(_browse(config, args))


async def _browse(config: Any, args: argparse.Namespace) -> int:
    from agent.errors import DriverStartupError
    from drivers.opcua.driver import load_credentials, quiet_library_logs
    from drivers.opcua.session import Session, SessionError, describe

    quiet_library_logs()
    if args.endpoints:
        return await _endpoints(config, describe)
    try:
        credentials = await load_credentials(config)
    except DriverStartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if credentials.certificate is not None:
        cert = credentials.certificate
        print(f"gateway certificate {cert.cert_path}: SHA-1 thumbprint {cert.thumbprint} "
              f"({cert.application_uri}); trust it on the server", file=sys.stderr)  # fmt: skip
    session = Session(config, credentials)
    try:
        await session.open()
    except SessionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        await _tree(session.client, args.start, args.depth, args.all)
    except Exception as exc:
        print(f"error: {describe(exc, config)}", file=sys.stderr)
        return 1
    finally:
        await session.close()
    return 0


async def _endpoints(config: Any, describe: Any) -> int:
    from asyncua import ua

    from drivers.opcua.uanames import Client

    client = Client(config.endpoint, timeout=config.timeout)
    try:
        endpoints = await client.connect_and_get_server_endpoints()
    except Exception as exc:
        print(f"error: {describe(exc, config)}", file=sys.stderr)
        return 1
    print(f"{'POLICY':<22} {'MODE':<15} LOGINS")
    for ep in endpoints:
        logins = ", ".join(ua.UserTokenType(t.TokenType).name for t in ep.UserIdentityTokens)
        mode = ua.MessageSecurityMode(ep.SecurityMode).name.rstrip("_")  # None_ is asyncua's spelling of None
        print(f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]:<22} {mode:<15} {logins}")
    return 0


async def _tree(client: Any, start: str, depth: int, include_all: bool) -> None:
    """Depth first, one Browse per object and one Read per attribute of its variables."""
    root = client.get_node(start)
    name = (await root.read_browse_name()).to_string()
    print(f"{name}  {root.nodeid.to_string()}")
    await _children(client, root, "0:Objects" if start == "i=85" else name, 1, depth, include_all)


async def _children(client: Any, node: Any, path: str, indent: int, depth: int, include_all: bool) -> None:
    from asyncua import ua

    [(_, result)] = await client.browse_nodes([node])
    refs = [r for r in result.References
            if r.IsForward and r.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable)]  # fmt: skip
    children = [client.get_node(ua.NodeId(r.NodeId.Identifier, r.NodeId.NamespaceIndex, r.NodeId.NodeIdType))
                for r in refs]  # fmt: skip
    variables = [c for c, r in zip(children, refs, strict=True) if r.NodeClass == ua.NodeClass.Variable]
    described = dict(zip((id(v) for v in variables), await _describe(client, variables), strict=True))
    for child, ref in zip(children, refs, strict=True):
        nid = child.nodeid.to_string()
        if nid in SKIPPED and not include_all:
            continue
        browse_name = ref.BrowseName.to_string()
        child_path = f"{path}/{browse_name}"
        if ref.NodeClass == ua.NodeClass.Variable:
            print(f"{'  ' * indent}{browse_name}  {nid}  {described[id(child)]}   path {child_path}")
        else:
            print(f"{'  ' * indent}{browse_name}  {nid}")
            if depth > 1:
                await _children(client, child, child_path, indent + 1, depth - 1, include_all)


async def _describe(client: Any, variables: list[Any]) -> list[str]:
    """``Double = 12.5`` per variable (or the status code name when the value is not good)."""
    from asyncua import ua

    from drivers.opcua.uanames import AttributeIds, ObjectIdNames

    if not variables:
        return []
    types = await client.read_attributes(variables, AttributeIds.DataType)
    values = await client.read_attributes(variables, AttributeIds.Value)
    out = []
    for dtype, dv in zip(types, values, strict=True):
        type_id = dtype.Value.Value if dtype.Value is not None else None
        type_name = "?"
        if isinstance(type_id, ua.NodeId):
            type_name = (
                ObjectIdNames.get(int(type_id.Identifier), type_id.to_string())
                if type_id.NamespaceIndex == 0
                else type_id.to_string()
            )
        if dv.StatusCode is not None and not dv.StatusCode.is_good():
            shown = dv.StatusCode.name
        else:
            shown = repr(dv.Value.Value if dv.Value is not None else None)
            shown = shown if len(shown) <= MAX_VALUE else shown[: MAX_VALUE - 3] + "..."
        out.append(f"{type_name} = {shown}")
    return out


def simulate_main(argv: list[str]) -> int:
    """Serve a simulated PLC (pumps: flow, pressure, running, energy) with changing values."""
    parser = argparse.ArgumentParser(prog="edge-agent simulate opcua", description=simulate_main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=4840)
    parser.add_argument("--variables", type=int, default=100, help="how many variables (4 per pump)")
    parser.add_argument("--rate", type=float, default=10.0, help="scans per second; every variable changes per scan")
    parser.add_argument("--analog-only", action="store_true", help="Speed (rpm) instead of the Running flag")
    parser.add_argument("--cert-dir", type=Path, help="offer Basic256Sha256 and Aes128Sha256RsaOaep endpoints too, "
                                                      "with a server certificate kept in this folder")  # fmt: skip
    parser.add_argument("--user", help="require this user (with --password-file); default: anonymous")
    parser.add_argument("--password-file", type=Path)
    args = parser.parse_args(argv)
    if (args.user is None) != (args.password_file is None):
        print("error: --user and --password-file go together", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_simulate(args))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"error: port {args.port} is already in use", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        return 0


async def _simulate(args: argparse.Namespace) -> int:
    from drivers.opcua.driver import quiet_library_logs
    from drivers.opcua.simulator import SimulatedPlc

    quiet_library_logs()
    users = {args.user: args.password_file.read_text().splitlines()[0]} if args.user else {}
    plc = SimulatedPlc(args.port, host=args.host, variables=args.variables, rate=args.rate,
                       analog_only=args.analog_only, cert_dir=args.cert_dir, users=users,
                       allow_anonymous=not users)  # fmt: skip
    await plc.start()
    secure = f"; server certificate SHA-1 {plc.thumbprint}" if plc.thumbprint else ""
    print(f"serving {args.variables} variables at {args.rate:g} Hz on {plc.endpoint} "
          f"(e.g. {plc.node_id('Pump1.Flow')}, 0:Objects/2:PLC/2:Pump1/2:Flow){secure}", flush=True)  # fmt: skip
    try:
        await asyncio.Event().wait()
    finally:
        await plc.stop()
    return 0
