// The technician page: plain DOM, no framework, no build step, nothing from another host.
// Every value reaches the page as text (textContent), never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEWS = ["setup", "set-password", "login", "dashboard"];
let stream = null;

let view = null;

function show(next) {
  view = next;
  // The dashboard appears with its first live values: the page parts load their data when it
  // shows, so the first value costs 5 requests (3 files, session, stream), whatever the parts.
  for (const v of VIEWS) if (v !== "dashboard" || next !== "dashboard") $(v).hidden = v !== next;
  if (next !== "dashboard") delete $("dashboard").dataset.ready;
  $("logout").hidden = next !== "dashboard";
  if (next === "dashboard") { say("connecting…"); startStream(); } else stopStream();
}

function say(text) { $("message").textContent = text || ""; }

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Edge-Agent": "1" },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  return { ok: response.ok, status: response.status, data };
}

async function refresh() {
  const response = await fetch("/api/session", { credentials: "same-origin" });
  const data = await response.json();
  show({ setup: "setup", set_password: "set-password", login: "login", ok: "dashboard" }[data.state] || "login");
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function shown(value) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") return String(Math.round(value * 1000) / 1000);
  if (typeof value === "object") return Object.entries(value).map(([k, v]) => `${k} ${v}`).join(", ");
  return String(value);
}

function deviceCard(d) {
  const card = el("div", { class: "card", "data-testid": `device-${d.id}` },
    el("h3", {}, el("span", {}, d.id), el("span", { class: `badge ${d.status}`, "data-testid": `status-${d.id}` }, d.status)),
    el("div", { class: "muted" }, d.driver));
  if (d.fault) {
    card.append(el("div", { class: "fault", "data-testid": `fault-${d.id}` },
      el("p", {}, el("strong", {}, "Cause: "), el("span", { "data-testid": `cause-${d.id}` }, d.fault.cause)),
      el("p", {}, el("strong", {}, "Fix: "), el("span", { "data-testid": `fix-${d.id}` }, d.fault.fix)),
      el("p", { class: "muted" }, d.fault.detail)));
  }
  if (d.points.length) {
    const rows = d.points.map((p) => el("tr", {},
      el("td", {}, p.name),
      el("td", { class: "value", "data-testid": `value-${d.id}-${p.name}` }, shown(p.value), p.unit ? ` ${p.unit}` : ""),
      el("td", { class: `quality q-${p.quality}` }, p.quality, p.reason ? ` (${p.reason})` : ""),
      el("td", { class: "age", "data-testid": `age-${d.id}-${p.name}` }, age(p.age_s))));
    card.append(el("table", {}, el("tbody", {}, ...rows)));
  } else if (!d.fault) {
    card.append(el("p", { class: "muted" }, "no reading yet"));
  }
  return card;
}

function devicesChoice(devices) {
  const select = $("preview-device");
  const ids = devices.map((d) => d.id);
  const known = Array.from(select.options).map((o) => o.value);
  if (ids.join("\n") === known.join("\n")) return;  // unchanged: keep the technician's choice
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (ids.includes(chosen)) select.value = chosen;
}

async function showPreview() {
  const device = $("preview-device").value;
  const response = await fetch(`/api/preview/${encodeURIComponent(device)}`, { credentials: "same-origin" });
  const data = await response.json();
  if (!response.ok) { $("preview").replaceChildren(el("p", {}, data.error || `refused (${response.status})`)); return; }
  if (!data.events.length) { $("preview").replaceChildren(el("p", { class: "muted" }, "no reading yet")); return; }
  $("preview").replaceChildren(...data.events.map((e) => el("div", { "data-testid": `preview-${e.type}` },
    el("p", {}, el("strong", {}, e.type), " · ",
      el("span", { class: `verdict ${e.verdict}`, "data-testid": `verdict-${e.type}` }, e.verdict)),
    ...e.problems.map((p) => el("p", { class: "q-bad" }, p)),
    el("pre", {}, JSON.stringify(e.event, null, 2)))));
}

function render(s) {
  if (view === "dashboard" && $("dashboard").hidden) {
    say("");
    $("dashboard").hidden = false;
    // The parts (scan, editor, zones, clock) load their data once the values are on screen.
    requestAnimationFrame(() => setTimeout(() => { if (view === "dashboard") $("dashboard").dataset.ready = "1"; }));
  }
  devicesChoice(s.devices);
  $("title").textContent = `edge-agent ${s.gateway}${s.site ? " · " + s.site : ""}`;
  $("devices").replaceChildren(...s.devices.map(deviceCard));
  $("uplinks").replaceChildren(...s.uplinks.map((u) => el("li", { "data-testid": `uplink-${u.name}` },
    `${u.name}: ${u.connected ? "connected" : "down"}`, u.last_error && !u.connected ? ` (${u.last_error})` : "")));
  $("buffer-events").textContent = s.buffer.events === null ? "-" : String(s.buffer.events);
  $("buffer-oldest").textContent = s.buffer.oldest_age_s === null ? "none waiting" : age(s.buffer.oldest_age_s);
  $("disk-free").textContent = bytes(s.disk.free_bytes);
  $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
}

function startStream() {
  if (stream) return;
  stream = new EventSource("/api/events");
  stream.onmessage = (e) => render(JSON.parse(e.data));
  stream.addEventListener("end", () => { stopStream(); refresh(); });
  stream.onerror = () => { $("live").textContent = "connection lost, retrying…"; };
}

function stopStream() {
  if (stream) { stream.close(); stream = null; }
}

async function setup(token) {
  const r = await post("/api/setup", { token });
  if (r.ok) { say("Token accepted: now set the device password."); show("set-password"); }
  else { say(r.data.error || `refused (${r.status})`); show("setup"); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("setup").addEventListener("submit", (e) => { e.preventDefault(); setup($("token").value.trim()); });
  $("set-password").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await post("/api/password", { password: $("new-password").value });
    if (r.ok) { say("Password saved."); show("dashboard"); } else { say(r.data.error || `refused (${r.status})`); }
  });
  $("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await post("/api/login", { password: $("password").value });
    if (r.ok) { say(""); show("dashboard"); } else { say(r.data.error || `refused (${r.status})`); }
  });
  $("preview-show").addEventListener("click", showPreview);
  $("logout").addEventListener("click", async () => { await post("/api/logout"); say(""); show("login"); });
  const match = /^#setup=([A-Za-z0-9_-]+)$/.exec(window.location.hash);
  if (match) {
    // The token leaves the address bar at once: it is good only once.
    history.replaceState(null, "", window.location.pathname);
    setup(match[1]);
  } else {
    refresh();
  }
});
