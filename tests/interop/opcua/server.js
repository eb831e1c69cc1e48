"use strict";
// A node-opcua server standing in for a PLC, for the `opcua` driver in tests/test_opcua_interop.py.
//
//   node server.js --port N --pki DIR [--user NAME --password PASS]
//
// It serves Objects/PLC (its own namespace, ns=1) with
//   PLC.Flow      Double, an AnalogItem with EURange 0..200 and EngineeringUnits m3/h (UN/CEFACT MQH)
//   PLC.Pressure  Double, its status code set by the test (Good, Uncertain..., Bad...)
//   PLC.Energy    Double, a counter
//   PLC.Running   Boolean
// offering None, and Basic256Sha256 Sign / SignAndEncrypt (client certificates accepted as presented);
// anonymous logins unless --user. Once listening it prints {"event": "listening", ...}; then it answers one
// JSON command per stdin line, {"id": N, "op": "set", "node": "Pressure", "value": 3.5, "status": "BadSensorFailure",
// "sourceTimestamp": ISO} -> {"id": N, "ok": true}; {"op": "close"} or the end of stdin stops it.
const readline = require("readline");

const out = process.stdout.write.bind(process.stdout);
console.log = console.info = console.warn = console.debug = console.error;

const {
    OPCUAServer, OPCUACertificateManager, DataType, StatusCodes, Variant, DataValue, MessageSecurityMode,
    SecurityPolicy, makeEUInformation,
} = require("node-opcua");

function parseArgs(argv) {
    const args = {};
    for (let i = 0; i < argv.length; i += 2) {
        args[argv[i].replace(/^--/, "")] = argv[i + 1];
    }
    if (!args.port || !args.pki) {
        throw new Error("usage: server.js --port N --pki DIR [--user U --password P]");
    }
    return args;
}

function send(obj) {
    out(JSON.stringify(obj) + "\n");
}

const args = parseArgs(process.argv.slice(2));

async function main() {
    const serverCertificateManager = new OPCUACertificateManager({
        rootFolder: `${args.pki}/server`, automaticallyAcceptUnknownCertificate: true,
    });
    const userCertificateManager = new OPCUACertificateManager({
        rootFolder: `${args.pki}/user`, automaticallyAcceptUnknownCertificate: true,
    });
    const server = new OPCUAServer({
        port: Number(args.port),
        hostname: "127.0.0.1",
        alternateHostname: ["127.0.0.1"],
        resourcePath: "",
        serverCertificateManager,
        userCertificateManager,
        serverInfo: {applicationUri: "urn:edge-agent-tests:node-opcua-plc", applicationName: {text: "node-opcua PLC"}},
        buildInfo: {productName: "node-opcua PLC"},
        securityPolicies: [SecurityPolicy.None, SecurityPolicy.Basic256Sha256],
        securityModes: [MessageSecurityMode.None, MessageSecurityMode.Sign, MessageSecurityMode.SignAndEncrypt],
        allowAnonymous: !args.user,
        userManager: {isValidUser: (name, password) => name === args.user && password === args.password},
    });
    await server.initialize();
    const namespace = server.engine.addressSpace.getOwnNamespace();
    const plc = namespace.addObject({
        organizedBy: server.engine.addressSpace.rootFolder.objects, browseName: "PLC", nodeId: "s=PLC",
    });
    const variables = {
        Flow: namespace.addAnalogDataItem({
            componentOf: plc, browseName: "Flow", nodeId: "s=PLC.Flow", dataType: "Double",
            engineeringUnitsRange: {low: 0, high: 200},
            engineeringUnits: makeEUInformation("MQH", "m³/h", "cubic metre per hour"),
            minimumSamplingInterval: 50,
            value: {dataType: DataType.Double, value: 40.0},
        }),
        Pressure: namespace.addVariable({
            componentOf: plc, browseName: "Pressure", nodeId: "s=PLC.Pressure", dataType: "Double",
            minimumSamplingInterval: 50,
        }),
        Energy: namespace.addVariable({
            componentOf: plc, browseName: "Energy", nodeId: "s=PLC.Energy", dataType: "Double",
            minimumSamplingInterval: 50,
        }),
        Running: namespace.addVariable({
            componentOf: plc, browseName: "Running", nodeId: "s=PLC.Running", dataType: "Boolean",
            minimumSamplingInterval: 50,
        }),
    };
    const types = {Flow: DataType.Double, Pressure: DataType.Double, Energy: DataType.Double, Running: DataType.Boolean};
    const initial = {Flow: 40.0, Pressure: 2.5, Energy: 1000.0, Running: true};
    for (const [name, value] of Object.entries(initial)) {
        variables[name].setValueFromSource(new Variant({dataType: types[name], value}), StatusCodes.Good, new Date());
    }
    await server.start();
    send({
        event: "listening", endpoint: server.getEndpointUrl(), namespaceUri: namespace.namespaceUri,
        namespaceIndex: namespace.index,
    });

    const lines = readline.createInterface({input: process.stdin});
    for await (const line of lines) {
        if (!line.trim()) {
            continue;
        }
        const cmd = JSON.parse(line);
        try {
            if (cmd.op === "set") {
                const variable = variables[cmd.node];
                if (!variable) {
                    throw new Error(`no variable ${cmd.node}`);
                }
                const status = StatusCodes[cmd.status || "Good"];
                if (!status) {
                    throw new Error(`no status code ${cmd.status}`);
                }
                const when = cmd.sourceTimestamp ? new Date(cmd.sourceTimestamp) : new Date();
                const value = cmd.value === null || cmd.value === undefined
                    ? new Variant({dataType: DataType.Null})
                    : new Variant({dataType: types[cmd.node], value: cmd.value});
                variable.setValueFromSource(value, status, when);
            } else if (cmd.op !== "close") {
                throw new Error(`unknown op ${cmd.op}`);
            }
            send({id: cmd.id, ok: true, op: cmd.op});
        } catch (err) {
            send({id: cmd.id, ok: false, op: cmd.op, message: String(err && err.message)});
        }
        if (cmd.op === "close") {
            break;
        }
    }
    await server.shutdown(0);
    process.exit(0);
}

main().catch((err) => {
    console.error(err);
    process.exit(2);
});
