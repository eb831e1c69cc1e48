// The zone editor: a camera's latest frame, tap to add corners, drag to move them, save through
// the site editor (validated, backed up, reloaded in process). Points are fractions of the frame
// (0..1, 4 decimals), so a zone drawn on any size of the frame fits every size of the stream.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_POINTS = 32;
  const GRAB = 16;  // CSS pixels around a corner that grab it instead of adding one
  const KIND_NAMES = { bay: "parking bay", area: "waiting area" };
  let cameras = [];
  let zones = [];  // {id, kind, polygon: [[x, y], ...] relative}
  let points = [];
  let image = null;
  let dragging = -1;
  let base = "";
  let loadedFor = "";

  function say(text) { $("zones-status").textContent = text || ""; }

  function node(tag, attrs, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    for (const c of children) n.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return n;
  }

  const round4 = (v) => Math.round(Math.min(1, Math.max(0, v)) * 10000) / 10000;

  async function loadCameras() {
    const response = await fetch("/api/zones", { credentials: "same-origin" });
    if (!response.ok) return;
    cameras = (await response.json()).cameras;
    const select = $("zones-camera");
    const chosen = select.value;
    select.replaceChildren(...cameras.map((c) => node("option", { value: c.id }, c.id)));
    if (cameras.some((c) => c.id === chosen)) select.value = chosen;
    $("zones").hidden = cameras.length === 0;
  }

  async function loadFrame() {
    const device = $("zones-camera").value;
    if (!device) return;
    const response = await fetch(`/api/camera/${encodeURIComponent(device)}/frame`, { credentials: "same-origin" });
    if (!response.ok) {
      let message = `refused (${response.status})`;
      try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
      say(message);
      return;
    }
    const width = Number(response.headers.get("x-frame-width"));
    const height = Number(response.headers.get("x-frame-height"));
    image = await createImageBitmap(await response.blob());
    const canvas = $("zones-canvas");
    canvas.width = image.width;
    canvas.height = image.height;
    canvas.hidden = false;
    if (loadedFor !== device) {
      // Older files have pixel zones: shown (and saved) relative to the frame they were drawn on.
      const camera = cameras.find((c) => c.id === device) || { zones: [] };
      zones = camera.zones.map((z) => ({
        id: z.id, kind: z.kind,
        polygon: z.units === "pixels" ? z.polygon.map(([x, y]) => [round4(x / width), round4(y / height)]) : z.polygon,
      }));
      points = [];
      loadedFor = device;
      $("zones-check").replaceChildren();
    }
    say(`Frame of ${device}: ${width} x ${height}. Tap to add corners.`);
    draw();
    list();
  }

  function draw() {
    const canvas = $("zones-canvas");
    if (!image) return;
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    const scale = w / Math.max(1, canvas.getBoundingClientRect().width);
    ctx.drawImage(image, 0, 0);
    ctx.lineWidth = 2 * scale;
    const path = (polygon, close) => {
      ctx.beginPath();
      polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x * w, y * h) : ctx.moveTo(x * w, y * h)));
      if (close) ctx.closePath();
    };
    for (const z of zones) {
      ctx.strokeStyle = z.kind === "bay" ? "#00c853" : "#d500f9";
      path(z.polygon, true);
      ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle;
      ctx.font = `${Math.round(14 * scale)}px sans-serif`;
      ctx.fillText(z.id, z.polygon[0][0] * w + 4 * scale, z.polygon[0][1] * h - 4 * scale);
    }
    if (points.length) {
      ctx.strokeStyle = "#ffd600";
      ctx.fillStyle = "rgba(255, 214, 0, 0.25)";
      path(points, points.length > 2);
      if (points.length > 2) ctx.fill();
      ctx.stroke();
      ctx.fillStyle = "#ffd600";
      for (const [x, y] of points) {
        ctx.beginPath();
        ctx.arc(x * w, y * h, 6 * scale, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    $("zones-count").textContent = `${points.length} of ${MAX_POINTS} corners`;
  }

  function list() {
    $("zones-list").replaceChildren(...zones.map((z, i) => node("li", { "data-testid": `zone-${z.id}` },
      `${z.id} · ${KIND_NAMES[z.kind]} · ${z.polygon.length} corners `,
      button("Edit", () => edit(i)), " ", button("Remove", () => { zones.splice(i, 1); list(); draw(); }))));
  }

  function button(label, action) {
    const b = node("button", { type: "button", class: "small" }, label);
    b.addEventListener("click", action);
    return b;
  }

  function edit(i) {
    const [z] = zones.splice(i, 1);
    points = z.polygon.map((p) => p.slice());
    $("zone-name").value = z.id;
    $("zone-kind").value = z.kind;
    list();
    draw();
  }

  function at(e) {
    const r = $("zones-canvas").getBoundingClientRect();
    return { x: (e.clientX - r.left) / r.width, y: (e.clientY - r.top) / r.height, r };
  }

  function onDown(e) {
    if (!image) return;
    e.preventDefault();
    const p = at(e);
    const near = points.findIndex(([x, y]) => Math.hypot((x - p.x) * p.r.width, (y - p.y) * p.r.height) <= GRAB);
    if (near >= 0) {
      dragging = near;
    } else if (points.length < MAX_POINTS) {
      points.push([round4(p.x), round4(p.y)]);
    } else {
      say(`At most ${MAX_POINTS} corners: drag one, or Undo.`);
    }
    $("zones-canvas").setPointerCapture(e.pointerId);
    draw();
  }

  function onMove(e) {
    if (dragging < 0) return;
    e.preventDefault();
    const p = at(e);
    points[dragging] = [round4(p.x), round4(p.y)];
    draw();
  }

  function addZone() {
    const id = $("zone-name").value.trim();
    if (!id) { say("Name the zone first (its id in the events, e.g. P-07)."); return false; }
    if (points.length < 3) { say("A zone needs at least 3 corners: tap the frame."); return false; }
    zones = zones.filter((z) => z.id !== id);
    zones.push({ id, kind: $("zone-kind").value, polygon: points });
    points = [];
    $("zone-name").value = "";
    list();
    draw();
    return true;
  }

  async function send(apply) {
    const device = $("zones-camera").value;
    if (points.length && !addZone()) return null;
    const body = { zones, apply, base };
    const response = await fetch(`/api/camera/${encodeURIComponent(device)}/zones`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Edge-Agent": "1" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (!response.ok && !data.problems) { say(data.error || `refused (${response.status})`); return null; }
    return data;
  }

  async function check() {
    const data = await send(false);
    if (!data) return;
    base = data.base;
    const out = [];
    for (const p of data.problems) out.push(node("p", { class: "q-bad" }, p));
    for (const w of data.warnings) out.push(node("p", { class: "muted" }, w));
    out.push(node("pre", { "data-testid": "zones-diff" }, data.diff || "no change"));
    if (!data.problems.length && data.diff) out.push(button("Apply zones", apply));
    $("zones-check").replaceChildren(...out);
    say(data.problems.length ? "The site file would not validate: see the problems." : "Check the change, then press Apply zones.");
  }

  async function apply() {
    const data = await send(true);
    if (!data) return;
    $("zones-check").replaceChildren(...data.problems.map((p) => node("p", { class: "q-bad" }, p)));
    if (data.outcome === "applied") {
      say(`Applied (change ${data.change}); the previous file is kept as ${data.backup}.`);
      await loadCameras();
    } else {
      say(`Not applied: ${data.outcome}.`);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const canvas = $("zones-canvas");
    canvas.addEventListener("pointerdown", onDown);
    canvas.addEventListener("pointermove", onMove);
    for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { dragging = -1; });
    $("zones-load").addEventListener("click", loadFrame);
    $("zones-undo").addEventListener("click", () => { points.pop(); draw(); });
    $("zones-clear").addEventListener("click", () => { points = []; draw(); });
    $("zones-add").addEventListener("click", addZone);
    $("zones-save").addEventListener("click", check);
    $("zones-camera").addEventListener("change", () => { loadedFor = ""; });
    window.addEventListener("resize", draw);
    // The dashboard is ready once its first values show (app.js): list the cameras then.
    const dashboard = $("dashboard");
    const opened = () => { if (dashboard.dataset.ready === "1") loadCameras(); };
    new MutationObserver(opened).observe(dashboard, { attributes: true, attributeFilter: ["data-ready"] });
    opened();
  });
})();
