// The bus tools: pick a port, scan it (progress and hits as found, Stop), add a hit, typed reads.
// Plain DOM; every value from the gateway is set as text, never as markup.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const POLL_MS = 500; // the progress line updates twice a second
  let polling = null;
  let loaded = false;

  const node = el; // app.js's: the parts are served with it as one script

  async function call(method, path, body) {
    const options = { method, credentials: "same-origin", headers: { "X-Edge-Agent": "1" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    return { ok: response.ok, status: response.status, data };
  }

  function tell(id, text) { byId(id).textContent = text || ""; }

  // ---- ports -------------------------------------------------------------------------------
  async function loadPorts() {
    const { ok, data } = await call("GET", "/api/ports");
    if (!ok) return;
    const list = byId("port-list");
    const info = byId("port-info");
    list.replaceChildren();
    info.replaceChildren();
    for (const p of data.ports) {
      list.append(node("option", { value: p.path }, p.adapter || p.path));
      let note = p.adapter ? ` (${p.adapter})` : "";
      if (p.devices.length) note += `: polled by ${p.devices.join(", ")}`;
      if (p.scanning) note += ": being scanned";
      if (p.problem) note += `: ${p.problem}`;
      info.append(node("li", {}, node("code", {}, p.path), note));
    }
    if (!data.ports.length) info.append(node("li", {}, "no serial adapter found in /dev/serial/by-id"));
    if (!byId("scan-port").value && data.ports.length) {
      const free = data.ports.find((p) => p.present && !p.devices.length && !p.problem);
      if (free) byId("scan-port").value = free.path;
    }
  }

  async function loadDevices() {
    const { ok, data } = await call("GET", "/api/status");
    if (!ok) return;
    const select = byId("read-device");
    select.replaceChildren(node("option", { value: "" }, "the port below"));
    for (const d of data.devices || []) {
      if (d.driver === "modbus") select.append(node("option", { value: d.id }, d.id));
    }
  }

  // ---- scan --------------------------------------------------------------------------------
  function settingOf(form) {
    const body = { port: byId(`${form}-port`).value.trim() };
    const baud = byId(`${form}-baud`).value;
    const parity = byId(`${form}-parity`).value;
    if (baud) body.baud = Number(baud);
    if (parity) body.parity = parity;
    return body;
  }

  function hitRow(hit, port) {
    const row = node("li", { class: "hit", "data-testid": `hit-${hit.unit}` },
      node("div", {}, node("strong", {}, `Unit ${hit.unit}`), ` · ${hit.setting} · `,
        node("span", { "data-testid": `hit-profile-${hit.unit}` }, hit.profile || "no known profile")),
      node("div", { class: "muted" }, `${hit.verdict}; ${hit.evidence}`));
    if (hit.profile) {
      const add = node("button", { type: "button", "data-testid": `add-${hit.unit}` }, "Add to site");
      add.addEventListener("click", () => {
        window.dispatchEvent(new CustomEvent("edge:add-device", { detail: {
          port, unit: hit.unit, baud: hit.baud, parity: hit.parity, stopbits: hit.stopbits, profile: hit.profile,
        } }));
      });
      row.append(add);
    }
    return row;
  }

  function showScan(view) {
    const running = view.state === "running" || view.state === "opening";
    byId("scan-start").disabled = running;
    byId("scan-stop").disabled = !running;
    if (view.state === "idle") { tell("scan-progress", ""); return; }
    const where = `${view.port} ${view.setting}`;
    const counts = `${view.done}/${view.total} probes, ${view.found.length} found, ${view.elapsed_s} s`;
    let line = running ? `Scanning ${where}: unit ${view.unit}, ${counts}` : `Scan ${view.state}: ${counts}`;
    if (view.garbled) line += `, ${view.garbled} garbled (wrong baud or parity?)`;
    tell("scan-progress", line);
    tell("scan-note", [view.note, view.error].filter(Boolean).join(" "));
    const hits = byId("scan-hits");
    hits.hidden = !view.found.length;
    hits.replaceChildren(...view.found.map((h) => hitRow(h, view.port)));
    if (!running && !view.found.length && !view.error && view.state !== "idle") {
      tell("scan-note", view.garbled ? "Nothing answered cleanly: check baud rate, parity and the A/B wiring."
        : "Nothing answered: check power, wiring (A/B) and termination.");
    }
  }

  async function poll() {
    const { ok, data } = await call("GET", "/api/scan");
    if (!ok) { stopPolling(); return; }
    showScan(data);
    if (data.state !== "running" && data.state !== "opening") stopPolling();
  }

  function startPolling() {
    if (polling === null) polling = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (polling !== null) clearInterval(polling);
    polling = null;
  }

  async function startScan(event) {
    event.preventDefault();
    const body = settingOf("scan");
    body.units = byId("scan-units").value.trim() || "1-247";
    if (byId("scan-first").checked) body.first = true;
    const wait = byId("scan-timeout").value.trim();
    if (wait) body.timeout = Number(wait);
    tell("scan-note", "");
    const { ok, data } = await call("POST", "/api/scan", body);
    if (!ok) { tell("scan-note", data.error || "the scan did not start"); return; }
    showScan(data);
    startPolling();
  }

  async function stopScan() {
    const { data } = await call("POST", "/api/scan/stop", {});
    stopPolling();
    if (data.state) showScan(data);
    loadPorts();
  }

  // ---- typed read --------------------------------------------------------------------------
  function cell(text, attrs) { return node("td", attrs || {}, text); }

  function real(v) { // seven significant digits, as a float32 holds; huge or tiny ones with an exponent
    if (typeof v !== "number") return String(v);
    const size = Math.abs(v);
    if (v !== 0 && (size >= 1e7 || size < 1e-4)) return v.toExponential(4);
    return String(Number(v.toPrecision(7)));
  }

  function readTable(result) {
    const out = [];
    const caption = `Unit ${result.unit} at ${result.where}${result.setting ? ` (${result.setting})` : ""}, ${result.table}`;
    const bits = result.pairs.length === 0 && result.registers.length && result.registers[0].hex === undefined;
    const head = node("tr", {}, node("th", {}, "PDU"), node("th", {}, "Reference"),
      ...(bits ? [node("th", {}, "Value")] : [node("th", {}, "Hex"), node("th", {}, "Decimal")]));
    const rows = result.registers.map((r) => node("tr", { "data-testid": `reg-${r.pdu}` },
      cell(String(r.pdu)), cell(r.reference),
      ...(bits ? [cell(String(r.value))] : [cell(r.hex, { class: "mono" }), cell(String(r.value))])));
    out.push(node("table", { "data-testid": "read-registers" }, node("caption", {}, caption),
      node("thead", {}, head), node("tbody", {}, ...rows)));
    for (const pair of result.pairs) {
      const orders = Object.entries(pair.orders).map(([name, o]) => node("tr", { "data-testid": `order-${pair.pdu}-${name}` },
        cell(name), cell(o.hex, { class: "mono" }), cell(real(o.float32)), cell(String(o.uint32)), cell(String(o.int32))));
      out.push(node("table", { class: "orders", "data-testid": `pair-${pair.pdu}` },
        node("caption", {}, `32-bit at PDU ${pair.pdu} (${pair.reference})`),
        node("thead", {}, node("tr", {}, ...["Order", "Bytes", "float32", "uint32", "int32"].map((h) => node("th", {}, h)))),
        node("tbody", {}, ...orders)));
    }
    return out;
  }

  async function read(event) {
    event.preventDefault();
    const device = byId("read-device").value;
    const body = device ? { device } : settingOf("read");
    const unit = byId("read-unit").value.trim();
    if (unit) body.unit = Number(unit);
    const address = byId("read-address").value.trim();
    body.address = /^\d+$/.test(address) && byId("read-table").value ? Number(address) : address;
    if (byId("read-table").value) body.table = byId("read-table").value;
    body.count = Number(byId("read-count").value || "2");
    tell("read-note", "reading…");
    const { ok, data } = await call("POST", "/api/read", body);
    if (!ok) { tell("read-note", data.error || "the read failed"); byId("read-result").replaceChildren(); return; }
    tell("read-note", "");
    byId("read-result").replaceChildren(...readTable(data));
  }

  function whenShown() {
    if (loaded) return;
    loaded = true;
    loadPorts();
    loadDevices();
    poll(); // a scan started earlier (another tab, a reload) shows where it is
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!byId("bus")) return;
    byId("scan-form").addEventListener("submit", startScan);
    byId("scan-stop").addEventListener("click", stopScan);
    byId("ports-refresh").addEventListener("click", loadPorts);
    byId("read-form").addEventListener("submit", read);
    byId("read-device").addEventListener("change", () => {
      byId("read-port-fields").hidden = Boolean(byId("read-device").value);
    });
    const dashboard = byId("dashboard");
    const check = () => { if (dashboard.dataset.ready === "1") whenShown(); else { loaded = false; stopPolling(); } };
    new MutationObserver(check).observe(dashboard, { attributes: true, attributeFilter: ["data-ready"] });
    check();
  });
})();
