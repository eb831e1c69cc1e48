"use strict";
// A node-opcua client of the gateway's OPC UA server, for tests/test_opcua_interop.py.
//
//   node client.js --endpoint opc.tcp://127.0.0.1:4840 [--policy None|Basic256Sha256] [--mode None|Sign|SignAndEncrypt]
//                  [--user NAME --password PASS] --pki DIR
//
// It connects (a session, anonymous unless --user), then answers one JSON command per stdin line
// with one JSON line on stdout: {"id": N, "ok": true, ...} or {"id": N, "ok": false, "code": "Bad...", "message": ...}.
// Subscriptions add {"event": "change", ...} lines. It exits on {"op": "close"} or at the end of stdin.
// NodeIds may name their namespace by URI ("nsu=urn:edge-agent:gateway;s=Devices.pump-1.flow"), as SCADA
// configurations do. Whatever node-opcua logs goes to stderr: stdout carries JSON only.
const crypto = require("crypto");
const readline = require("readline");

const out = process.stdout.write.bind(process.stdout);
console.log = console.info = console.warn = console.debug = console.error;

const {
    OPCUAClient, OPCUACertificateManager, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds,
    DataType, StatusCodes, ClientSubscription, ClientMonitoredItem, TimestampsToReturn, BrowseDirection, NodeClass,
    resolveNodeId, makeBrowsePath,
} = require("node-opcua");

function parseArgs(argv) {
    const args = {policy: "None", mode: "None"};
    for (let i = 0; i < argv.length; i += 2) {
        args[argv[i].replace(/^--/, "")] = argv[i + 1];
    }
    if (!args.endpoint || !args.pki) {
        throw new Error("usage: client.js --endpoint URL --pki DIR [--policy P --mode M] [--user U --password P]");
    }
    return args;
}

function send(obj) {
    out(JSON.stringify(obj) + "\n");
}

function codeOf(err) {
    const result = err && err.response && err.response.responseHeader && err.response.responseHeader.serviceResult;
    if (result && result.name && result.name !== "Good") {
        return result.name;
    }
    if (err && err.statusCode && err.statusCode.name) {
        return err.statusCode.name;
    }
    const found = /\b(Bad[A-Za-z]+)/.exec(String(err && (err.message || err)));
    return found ? found[1] : "Error";
}

const args = parseArgs(process.argv.slice(2));
let client = null;
let session = null;
let namespaces = [];
const subscriptions = [];

function nodeIdOf(text) {
    const nsu = /^nsu=([^;]+);(.*)$/.exec(text);
    if (!nsu) {
        return resolveNodeId(text);
    }
    const index = namespaces.indexOf(nsu[1]);
    if (index < 0) {
        throw new Error(`namespace ${nsu[1]} not on the server (${namespaces.join(", ")})`);
    }
    return resolveNodeId(`ns=${index};${nsu[2]}`);
}

function plain(value) {
    if (value === null || value === undefined) {
        return null;
    }
    if (value instanceof Date) {
        return value.toISOString();
    }
    if (typeof value === "bigint") {
        return Number(value);
    }
    if (typeof value === "object" && typeof value.toJSON === "function") {
        return value.toJSON();
    }
    return value;
}

function dataValue(dv) {
    const v = dv.value ? dv.value.value : null;
    const int64 = dv.value && (dv.value.dataType === DataType.Int64 || dv.value.dataType === DataType.UInt64);
    return {
        // node-opcua gives Int64/UInt64 as [high, low] 32-bit words
        value: int64 && Array.isArray(v) ? v[0] * 2 ** 32 + v[1] : plain(v),
        dataType: dv.value ? DataType[dv.value.dataType] : null,
        status: dv.statusCode.name,
        sourceTimestamp: dv.sourceTimestamp ? dv.sourceTimestamp.toISOString() : null,
        serverTimestamp: dv.serverTimestamp ? dv.serverTimestamp.toISOString() : null,
    };
}

async function connect() {
    const certificateManager = new OPCUACertificateManager({
        rootFolder: args.pki, automaticallyAcceptUnknownCertificate: true,
    });
    await certificateManager.initialize();
    client = OPCUAClient.create({
        applicationName: "node-opcua interop client",
        applicationUri: "urn:edge-agent-tests:node-opcua-client",
        clientCertificateManager: certificateManager,
        securityPolicy: SecurityPolicy[args.policy],
        securityMode: MessageSecurityMode[args.mode],
        endpointMustExist: false,
        keepSessionAlive: false,
        requestedSessionTimeout: 30000,
        connectionStrategy: {maxRetry: 0, initialDelay: 100, maxDelay: 200},
        transportTimeout: 5000,
        defaultTransactionTimeout: 10000,
    });
    await client.createDefaultCertificate();
    const der = client.getCertificate();
    const thumbprint = crypto.createHash("sha1").update(der).digest("hex").toUpperCase();
    // The certificate node-opcua presents (it sends it in CreateSession even on the None endpoint).
    send({event: "certificate", thumbprint, der: der.toString("base64")});
    await client.connect(args.endpoint);
    const identity = args.user
        ? {type: UserTokenType.UserName, userName: args.user, password: args.password || ""}
        : {type: UserTokenType.Anonymous};
    session = await client.createSession(identity);
    const array = await session.read({nodeId: "i=2255", attributeId: AttributeIds.Value});
    namespaces = array.value.value;
    return {policy: args.policy, mode: args.mode, user: args.user || null};
}

async function browse(cmd) {
    // cmd.path: browse names under Objects, in the gateway's namespace after the first ("Gateway/Devices/pump-1")
    const ns = namespaces.indexOf(cmd.namespace || "urn:edge-agent:gateway");
    const path = "/" + cmd.path.map((name) => `${ns}:${name}`).join("/");
    const translated = await session.translateBrowsePath(makeBrowsePath("i=85", path));
    if (translated.statusCode.name !== "Good") {
        throw new Error(`${path}: ${translated.statusCode.name}`);
    }
    const start = translated.targets[0].targetId;
    const result = await session.browse({
        nodeId: start, browseDirection: BrowseDirection.Forward, referenceTypeId: "HierarchicalReferences",
        includeSubtypes: true, resultMask: 63,
    });
    const children = [];
    for (const ref of result.references || []) {
        const child = {name: ref.browseName.name, nodeId: ref.nodeId.toString(), nodeClass: NodeClass[ref.nodeClass]};
        if (ref.nodeClass === NodeClass.Variable) {
            const dt = await session.read({nodeId: ref.nodeId, attributeId: AttributeIds.DataType});
            child.dataType = DataType[dt.value.value.value] || dt.value.value.toString();
        }
        children.push(child);
    }
    return {nodeId: start.toString(), children};
}

async function properties(nodeId) {
    const result = await session.browse({
        nodeId, browseDirection: BrowseDirection.Forward, referenceTypeId: "HasProperty", includeSubtypes: true,
        resultMask: 63,
    });
    const found = {};
    for (const ref of result.references || []) {
        const dv = await session.read({nodeId: ref.nodeId, attributeId: AttributeIds.Value});
        const v = dv.value ? dv.value.value : null;
        if (ref.browseName.name === "EngineeringUnits" && v) {
            found.EngineeringUnits = {
                namespaceUri: v.namespaceUri, unitId: v.unitId, displayName: v.displayName && v.displayName.text,
                description: v.description && v.description.text, qualifiedNamespace: ref.browseName.namespaceIndex,
            };
        } else {
            found[ref.browseName.name] = plain(v);
        }
    }
    return found;
}

async function read(cmd) {
    const results = [];
    for (const text of cmd.nodes) {
        const nodeId = nodeIdOf(text);
        const [value, accessLevel, userAccessLevel] = await session.read([
            {nodeId, attributeId: AttributeIds.Value},
            {nodeId, attributeId: AttributeIds.AccessLevel},
            {nodeId, attributeId: AttributeIds.UserAccessLevel},
        ]);
        results.push({
            node: text, ...dataValue(value),
            accessLevel: accessLevel.value ? accessLevel.value.value : null,
            userAccessLevel: userAccessLevel.value ? userAccessLevel.value.value : null,
            properties: cmd.properties ? await properties(nodeId) : undefined,
        });
    }
    return {results};
}

async function write(cmd) {
    // One Write request with every item: the answer has one status code per node.
    const nodesToWrite = cmd.items.map((item) => ({
        nodeId: nodeIdOf(item.node), attributeId: AttributeIds.Value,
        value: {value: {dataType: DataType[item.type], value: item.value}},
    }));
    const codes = await session.write(nodesToWrite);
    return {results: codes.map((c) => c.name)};
}

async function subscribe(cmd) {
    const subscription = ClientSubscription.create(session, {
        requestedPublishingInterval: cmd.interval || 100, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 10,
        maxNotificationsPerPublish: 0, publishingEnabled: true, priority: 1,
    });
    subscriptions.push(subscription);
    for (const text of cmd.nodes) {
        const item = ClientMonitoredItem.create(subscription, {nodeId: nodeIdOf(text), attributeId: AttributeIds.Value},
            {samplingInterval: cmd.interval || 100, discardOldest: true, queueSize: 10}, TimestampsToReturn.Both);
        item.on("changed", (dv) => send({event: "change", node: text, ...dataValue(dv)}));
        item.on("err", (message) => send({event: "monitor_error", node: text, message: String(message)}));
    }
    await new Promise((resolve) => subscription.once("started", resolve));
    return {subscriptionId: subscription.subscriptionId};
}

async function close() {
    // Once: the subscriptions, the session, then the channel, as a client leaving politely does.
    const [closing, leaving, ending] = [subscriptions.splice(0), session, client];
    session = client = null;
    for (const s of closing) {
        await s.terminate().catch(() => undefined);
    }
    if (leaving) {
        await leaving.close().catch(() => undefined);
    }
    if (ending) {
        await ending.disconnect().catch(() => undefined);
    }
    return {};
}

const operations = {read, write, subscribe, browse, close};

async function main() {
    try {
        send({id: 0, ok: true, op: "connect", ...(await connect())});
    } catch (err) {
        send({id: 0, ok: false, op: "connect", code: codeOf(err), message: String(err && err.message)});
        await close();
        process.exit(0);
    }
    const lines = readline.createInterface({input: process.stdin});
    for await (const line of lines) {
        if (!line.trim()) {
            continue;
        }
        const cmd = JSON.parse(line);
        try {
            const operation = operations[cmd.op];
            if (!operation) {
                throw new Error(`unknown op ${cmd.op}`);
            }
            send({id: cmd.id, ok: true, op: cmd.op, ...(await operation(cmd))});
        } catch (err) {
            send({id: cmd.id, ok: false, op: cmd.op, code: codeOf(err), message: String(err && err.message)});
        }
        if (cmd.op === "close") {
            break;
        }
    }
    await close();
    process.exit(0);
}

main().catch((err) => {
    console.error(err);
    process.exit(2);
});
