// The site file editor: show the file, validate it (file:line problems), show the diff, apply it.
// A scan hit becomes a proposed text here too: the scan part dispatches "edge:add-device" with the
// hit as its detail; the proposal is shown with its diff and waits for Apply. Text only, no markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let base = null;  // digest of the file the textarea's text was made from: Apply is refused if it moved

  function node(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function list(items, testid) {
    const ul = node("ul");
    for (const item of items) {
      const li = node("li", null, item);
      li.setAttribute("data-testid", testid);
      ul.append(li);
    }
    return ul;
  }

  function result(...children) { $("site-result").replaceChildren(...children); }

  function showDiff(diff) {
    const pre = $("site-diff");
    pre.replaceChildren(...diff.split("\n").filter((l) => l).map((line) => {
      const cls = line.startsWith("+") && !line.startsWith("+++") ? "add"
        : line.startsWith("-") && !line.startsWith("---") ? "del" : null;
      return node("span", cls, line + "\n");
    }));
    if (!diff) pre.replaceChildren(node("span", null, "no changes: the text is the file as it is"));
    pre.hidden = false;
  }

  async function call(path, body) {
    const init = body === undefined ? { credentials: "same-origin" } : {
      method: "POST", credentials: "same-origin", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "X-Edge-Agent": "1" },
    };
    const response = await fetch(path, init);
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (!response.ok) result(node("p", "refused", data.error || `refused (${response.status})`));
    return response.ok ? data : null;
  }

  async function load() {
    const data = await call("/api/site");
    if (!data) return;
    $("site-text").value = data.text;
    base = data.base;
    $("site-path").textContent = data.path;
    $("site-writable").textContent = data.writable ? ""
      : "(read-only for the agent: Apply cannot write it; see the page's documentation)";
    $("site-diff").hidden = true;
  }

  function verdict(data) {
    const parts = [];
    if (data.problems.length) {
      parts.push(node("p", "refused", `${data.problems.length} problem(s): nothing was applied`));
      parts.push(list(data.problems, "site-problem"));
    } else {
      parts.push(node("p", "ok", "Valid: the same validator as edge-agent validate found no problem."));
    }
    if (data.warnings.length) {
      parts.push(node("p", null, "Warnings:"));
      parts.push(list(data.warnings, "site-warning"));
    }
    return parts;
  }

  async function validate(withDiff) {
    const data = await call("/api/site/check", { text: $("site-text").value });
    if (!data) return;
    result(...verdict(data));
    if (withDiff) showDiff(data.diff);
  }

  async function apply() {
    if (base === null) { await load(); return; }
    const data = await call("/api/site/apply", { text: $("site-text").value, base });
    if (!data) return;
    if (data.outcome === "applied") {
      const what = data.changes.length ? data.changes.join(", ") : "no device or uplink changed";
      const parts = [node("p", "ok", `Applied (change ${data.change}): ${what}.`)];
      if (data.backup) parts.push(node("p", null, `The previous file is kept as ${data.backup}.`));
      await load();
      result(...parts);
    } else if (data.outcome === "conflict") {
      result(node("p", "refused", "The file changed on the gateway since this page loaded it: " +
        "press Reload the file and make the change again (copy your text first)."));
    } else {
      result(node("p", "refused", "Refused: the running config is unchanged and the file is as it was."),
        list(data.problems, "site-problem"));
    }
  }

  async function addDevice(hit) {
    const data = await call("/api/site/add", { hit });
    if (!data) return;
    $("site-text").value = data.text;
    base = data.base;
    result(node("p", null, `Proposed: ${data.device} added at the end of devices. Check the diff, then press Apply.`),
      ...verdict(data));
    showDiff(data.diff);
    $("site-editor").scrollIntoView({ block: "start" });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("site-validate").addEventListener("click", () => validate(false));
    $("site-show-diff").addEventListener("click", () => validate(true));
    $("site-apply").addEventListener("click", apply);
    $("site-reload").addEventListener("click", () => { result(); load(); });
    // Loaded once the dashboard shows (after login): before that every request would be a 401.
    const dashboard = $("dashboard");
    const watch = () => { if (dashboard.dataset.ready !== "1") base = null; else if (base === null) load(); };
    new MutationObserver(watch).observe(dashboard, { attributes: true, attributeFilter: ["data-ready"] });
    watch();
  });
  window.addEventListener("edge:add-device", (e) => { addDevice(e.detail); });
})();
