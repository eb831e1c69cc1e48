// A control edge node on Eclipse Tahu's sparkplug-client 3.2.4, run through the TCK-lite beside
// ours. It publishes what an application using that library would: an NBIRTH with the Rebirth
// metric, one device with aliased metrics, NDATA and DDATA, a rebirth on NCMD, DCMD writes echoed
// in DDATA, a DDEATH and a stop when told on stdin. It prints what it did as JSON lines.
//
// usage: node control_edge.js mqtt://127.0.0.1:PORT GROUP NODE
"use strict";
const sparkplug = require("sparkplug-client");
const readline = require("readline");

const [serverUrl, groupId, edgeNode] = process.argv.slice(2);
const DOUBLE = "Double";
const say = (event, extra) => process.stdout.write(JSON.stringify({ event, ...extra }) + "\n");

const client = sparkplug.newClient({
  serverUrl, groupId, edgeNode, username: "", password: "", clientId: `control-${edgeNode}`,
  publishDeath: true, keepalive: 5, mqttOptions: { reconnectPeriod: 200 },
});

let uptime = 0;
let voltage = 230.0;
let setpoint = 20.0;
let deviceOnline = true;
const now = () => Date.now();

function births() {
  client.publishNodeBirth({
    timestamp: now(),
    metrics: [
      { name: "Node Control/Rebirth", type: "Boolean", value: false, timestamp: now() },
      { name: "uptime", alias: 1, type: DOUBLE, value: uptime, timestamp: now() },
    ],
  });
  if (deviceOnline) {
    client.publishDeviceBirth("d1", {
      timestamp: now(),
      metrics: [
        { name: "voltage", alias: 10, type: DOUBLE, value: voltage, timestamp: now() },
        { name: "setpoint", alias: 11, type: DOUBLE, value: setpoint, timestamp: now() },
      ],
    });
  }
  say("births");
}

client.on("birth", births);
client.on("ncmd", (payload) => {
  const rebirth = (payload.metrics || []).find((m) => m.name === "Node Control/Rebirth" && m.value === true);
  if (rebirth) births();
});
client.on("dcmd", (device, payload) => {
  for (const m of payload.metrics || []) {
    if (device === "d1" && (m.alias === 11 || Number(m.alias) === 11 || m.name === "setpoint")) {
      setpoint = m.value;
      client.publishDeviceData("d1", { timestamp: now(), metrics: [{ alias: 11, value: setpoint, type: DOUBLE, timestamp: now() }] });
      say("written", { setpoint });
    }
  }
});

const tick = setInterval(() => {
  uptime += 0.1;
  voltage += 0.1;
  if (!client.connected) return;
  client.publishNodeData({ timestamp: now(), metrics: [{ alias: 1, value: uptime, type: DOUBLE, timestamp: now() }] });
  if (deviceOnline) {
    client.publishDeviceData("d1", { timestamp: now(), metrics: [{ alias: 10, value: voltage, type: DOUBLE, timestamp: now() }] });
  }
}, 100);

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim() === "ddeath") {
    deviceOnline = false;
    client.publishDeviceDeath("d1", { timestamp: now(), metrics: [] });
    say("ddeath");
  } else if (line.trim() === "stop") {
    clearInterval(tick);
    client.stop();
    say("stopped");
    setTimeout(() => process.exit(0), 200);
  }
});
