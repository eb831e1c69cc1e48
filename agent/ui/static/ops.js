// The page's "Clock and uplink" section: set the gateway's clock from this device's, check each uplink.
// Served after app.js in one script: it uses app.js's el and post; every value goes in as text.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const CLOCK_EVERY_MS = 30000;
  let clockTimer = null;

  const node = el; // app.js's: the parts are served with it as one script

  const send = post; // app.js's

  function utc(ms) { return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC"); }

  // ---- the clock -------------------------------------------------------------------------
  async function clockCheck() {
    const sent = Date.now();
    let response;
    try { response = await fetch("/api/clock", { credentials: "same-origin" }); } catch (e) { return; }
    const received = Date.now();
    if (!response.ok) { $("clock-offer").hidden = true; return; }
    const d = await response.json();
    // The gateway read its clock about halfway through the round trip.
    const offset = (d.server_time_ms - (sent + received) / 2) / 1000;
    const offer = d.synchronised !== true && Math.abs(offset) > d.threshold_s;
    $("clock-offer").hidden = !offer;
    $("ops").dataset.clock = offer ? "offer" : "none";  // for tests and the curious: the last check's verdict
    if (!offer) return;
    const way = offset < 0 ? "behind" : "ahead of";
    $("clock-text").textContent = `The gateway's clock is ${Math.abs(offset).toFixed(1)} s ${way} this device's `
      + `(gateway ${utc(d.server_time_ms)}, here ${utc(received)}) and not synchronised to network time.`;
    $("clock-set").hidden = !d.can_set;
    $("clock-reason").hidden = d.can_set;
    $("clock-reason").textContent = d.can_set ? "" : d.reason;
  }

  async function clockSet() {
    $("clock-set").disabled = true;
    const r = await send("/api/clock", { browser_time_ms: Date.now() });
    $("clock-set").disabled = false;
    $("clock-result").textContent = r.ok
      ? `Clock set: ${r.data.old} -> ${r.data.new} (${r.data.offset_s > 0 ? "+" : ""}${r.data.offset_s} s).`
      : `Not set: ${r.data.error || `refused (${r.status})`}`;
    await clockCheck();
  }

  // ---- the uplink steps ------------------------------------------------------------------
  function stepItem(uplink, s) {
    const id = `${uplink}-${s.name}`;
    const item = node("li", { "data-testid": `step-${id}` },
      node("div", { class: "step-head" },
        node("strong", {}, s.name),
        node("span", { class: `step-${s.status}`, "data-testid": `step-status-${id}` }, s.status),
        node("span", { class: "muted" }, s.ms === null ? "-" : `${s.ms} ms`)),
      node("div", { class: "muted" }, s.detail));
    if (s.cause) item.append(node("p", {}, node("strong", {}, "Cause: "), node("span", { "data-testid": `step-cause-${id}` }, s.cause)));
    if (s.fix) item.append(node("p", {}, node("strong", {}, "Fix: "), node("span", { "data-testid": `step-fix-${id}` }, s.fix)));
    return item;
  }

  async function uplinkCheck() {
    const button = $("uplink-check");
    button.disabled = true;
    $("uplink-steps").replaceChildren(node("p", { class: "muted" }, "checking… (up to 5 s a step)"));
    const r = await send("/api/uplink/check");
    button.disabled = false;
    if (!r.ok) { $("uplink-steps").replaceChildren(node("p", {}, r.data.error || `refused (${r.status})`)); return; }
    if (!r.data.uplinks.length) { $("uplink-steps").replaceChildren(node("p", {}, r.data.note)); return; }
    $("uplink-steps").replaceChildren(...r.data.uplinks.map((u) => node("div", { "data-testid": `uplink-check-${u.name}` },
      node("h3", {}, `${u.name} · ${u.target}: `,
        node("span", { class: u.ok ? "step-ok" : "step-fail", "data-testid": `uplink-verdict-${u.name}` }, u.ok ? "ok" : "failed")),
      node("ul", { class: "steps" }, ...u.steps.map((s) => stepItem(u.name, s))))));
  }

  // ---- shown with the dashboard ------------------------------------------------------------
  function watch() {
    const visible = $("dashboard").dataset.ready === "1";
    if (visible && clockTimer === null) {
      clockCheck();
      clockTimer = setInterval(clockCheck, CLOCK_EVERY_MS);
    } else if (!visible && clockTimer !== null) {
      clearInterval(clockTimer);
      clockTimer = null;
      $("clock-offer").hidden = true;
      $("clock-result").textContent = "";
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("clock-set").addEventListener("click", clockSet);
    $("uplink-check").addEventListener("click", uplinkCheck);
    new MutationObserver(watch).observe($("dashboard"), { attributes: true, attributeFilter: ["data-ready"] });
    watch();
  });
})();
