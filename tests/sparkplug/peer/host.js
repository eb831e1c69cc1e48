// An independent Sparkplug B 3.0 host application on Eclipse Tahu's codec (sparkplug-payload 1.0.3)
// and the mqtt client from npm. It publishes its STATE (online/offline with timestamps, the offline
// one also as its Will), decodes all spBv1.0 traffic with Tahu's decoder, resolves aliases from the
// BIRTHs, and sends Rebirth and DCMD writes when told on stdin. It prints what it saw as JSON lines.
//
// usage: node host.js mqtt://127.0.0.1:PORT HOST_ID
// stdin: {"cmd":"rebirth","group":G,"node":N} | {"cmd":"write","group":G,"node":N,"device":D,"metric":M,"value":V}
//        | {"cmd":"offline"} | {"cmd":"online"}
"use strict";
const mqtt = require("mqtt");
const readline = require("readline");
const sparkplug = require("sparkplug-payload").get("spBv1.0");
// Tahu's decoder reads a value only through the metric's datatype, which DATA may omit (the spec
// advises it to): the raw message lets the host read the field the BIRTH's datatype names.
const Raw = require("sparkplug-payload/lib/sparkplugPayloadProto").org.eclipse.tahu.protobuf.Payload;

const [url, hostId] = process.argv.slice(2);
const stateTopic = `spBv1.0/STATE/${hostId}`;
const FIELD = {
  Int8: "intValue", Int16: "intValue", Int32: "intValue", UInt8: "intValue", UInt16: "intValue",
  UInt32: "longValue", Int64: "longValue", UInt64: "longValue", DateTime: "longValue",
  Float: "floatValue", Double: "doubleValue", Boolean: "booleanValue", String: "stringValue", Text: "stringValue",
};

const say = (event, extra) => process.stdout.write(JSON.stringify({ event, ...extra }) + "\n");
const num = (v) => (v === undefined || v === null ? v : typeof v === "object" && "low" in v ? Number(v.toString()) : v);

// (group/node/device) -> { alias -> {name, type} }; births replace, deaths keep (DATA may not come after a death)
const births = new Map();
let client = null;

function stateBody(online) {
  return JSON.stringify({ online, timestamp: Date.now() });
}

function connect() {
  client = mqtt.connect(url, {
    clientId: `interop-host-${hostId}`, clean: true, keepalive: 5, reconnectPeriod: 200, protocolVersion: 4,
    will: { topic: stateTopic, payload: stateBody(false), qos: 1, retain: true },
  });
  client.on("connect", () => {
    client.subscribe("spBv1.0/#", { qos: 1 }, () => {
      // STATE online after the subscription, so no BIRTH answering it is missed
      const body = stateBody(true);
      client.publish(stateTopic, body, { qos: 1, retain: true }, () => say("state", JSON.parse(body)));
    });
  });
  client.on("message", onMessage);
  client.on("error", (e) => say("error", { message: String(e) }));
}

function onMessage(topic, buf) {
  const parts = topic.split("/");
  if (parts[1] === "STATE") return;
  const [, group, kind, node, device] = parts;
  const key = `${group}/${node}/${device || ""}`;
  let payload;
  try {
    payload = sparkplug.decodePayload(buf);
  } catch (e) {
    say("undecodable", { topic, message: String(e) });
    return;
  }
  const raw = Raw.decode(buf);
  if (kind === "NBIRTH" || kind === "DBIRTH") {
    const map = new Map();
    for (const m of payload.metrics || []) {
      if (m.alias !== undefined) map.set(num(m.alias), { name: m.name, type: m.type });
    }
    if (kind === "NBIRTH") {
      for (const k of [...births.keys()]) if (k.startsWith(`${group}/${node}/`)) births.delete(k);
    }
    births.set(key, map);
  }
  const known = births.get(key) || new Map();
  const metrics = (payload.metrics || []).map((m, i) => {
    const alias = num(m.alias);
    const born = alias !== undefined ? known.get(alias) : undefined;
    const type = m.type || (born && born.type);
    let value = m.value;
    if ((value === undefined || value === null) && !m.isNull && type && FIELD[type]) value = raw.metrics[i][FIELD[type]];
    return {
      name: m.name || (born && born.name) || null, alias: alias === undefined ? null : alias, type: type || null,
      value: m.isNull ? null : num(value), timestamp: num(m.timestamp), historical: Boolean(m.isHistorical),
    };
  });
  say("message", { kind, group, node, device: device || null, seq: num(payload.seq), timestamp: num(payload.timestamp), metrics });
}

function command(kind, group, node, device, metrics) {
  const topic = `spBv1.0/${group}/${kind}/${node}` + (device ? `/${device}` : "");
  client.publish(topic, Buffer.from(sparkplug.encodePayload({ timestamp: Date.now(), metrics })), { qos: 0 });
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const c = JSON.parse(line);
  if (c.cmd === "rebirth") {
    command("NCMD", c.group, c.node, null, [{ name: "Node Control/Rebirth", type: "Boolean", value: true }]);
    say("sent", { cmd: "rebirth" });
  } else if (c.cmd === "write") {
    const map = births.get(`${c.group}/${c.node}/${c.device}`) || new Map();
    const hit = [...map.entries()].find(([, v]) => v.name === c.metric);
    if (!hit) return say("error", { message: `no alias for ${c.device}/${c.metric} in its DBIRTH` });
    const [alias, { type }] = hit;
    command("DCMD", c.group, c.node, c.device, [{ alias, type, value: c.value }]);
    say("sent", { cmd: "write", alias, type });
  } else if (c.cmd === "offline") {
    const body = stateBody(false);
    client.publish(stateTopic, body, { qos: 1, retain: true }, () => {
      say("state", JSON.parse(body));
      client.end(false, {}, () => say("disconnected", {}));
    });
  } else if (c.cmd === "online") {
    connect();
  }
});

connect();
