// The VM list: rows updated live from ws/vms/live/ (state, pending action, address), new VMs
// added (on the first page of the newest-first order), destroyed ones removed; the search box
// filters instantly in the page; ticks for the bulk bar; filters saved in this browser.
import { connectLive, el, timeLabel } from "./live.js";
import { formatBytes } from "./sparkline.js";

const table = document.getElementById("vm-list");
const tbody = table.querySelector("tbody");
const empty = tbody.querySelector("tr.empty");
const filters = JSON.parse(table.dataset.filters || "{}");
const seesAll = table.dataset.seesAll === "1";
const bulk = document.getElementById("tick-all") !== null;
const search = document.getElementById("vm-search");

function matches(vm) {
  if (filters.state === "" && vm.state === "destroyed") return false;
  if (filters.state && filters.state !== "all" && vm.state !== filters.state) return false;
  if (filters.template && vm.template !== filters.template) return false;
  if (filters.owner && vm.owner !== filters.owner) return false;
  const q = (search.value || "").trim().toLowerCase();
  return !q || vm.name.toLowerCase().includes(q);
}

function newRow(vm) {
  const cells = [
    ...(bulk ? [el("td", {}, el("input", { type: "checkbox", name: "ids", value: vm.id, class: "tick", "aria-label": `Tick ${vm.name}` }))] : []),
    el("td", {}, el("a", { href: `/vms/${vm.id}/` }, vm.name)),
    ...(seesAll ? [el("td", {}, vm.owner)] : []),
    el("td", {}, el("span", { class: `state state-${vm.state}`, "data-field": "state" }, vm.state), " ",
      el("span", { class: "pending", "data-field": "pending" }, "")),
    el("td", {}, vm.template),
    el("td", { "data-field": "vcpus" }, vm.vcpus),
    el("td", { "data-field": "memory" }, `${vm.memory_mib} MiB`),
    el("td", { "data-field": "cpu", class: "num" }, ""),
    el("td", { "data-field": "used", class: "num" }, ""),
    el("td", { "data-field": "uptime", class: "num" }, ""),
    el("td", { "data-field": "ip" }, vm.ip),
    el("td", { "data-field": "since", class: "muted" }, ""),
    el("td", { class: "row-actions", "data-field": "actions" }),
  ];
  return el("tr", { dataset: { vmId: vm.id, name: vm.name, template: vm.template, owner: vm.owner } }, ...cells);
}

function apply(vm) {
  let row = tbody.querySelector(`tr[data-vm-id="${vm.id}"]`);
  if (!matches(vm)) {
    if (row && vm.state === "destroyed" && filters.state === "") {
      row.classList.add("leaving");
      setTimeout(() => row.remove(), 1500);
    } else if (row) row.hidden = true;
    refreshEmpty();
    return;
  }
  if (!row) {
    if (!filters.takes_new) return; // a sorted or later page: the new VM is a reload away
    row = newRow(vm);
    tbody.prepend(row);
    row.classList.add("flash-row");
  }
  row.hidden = false;
  const state = row.querySelector('[data-field="state"]');
  if (state.textContent !== vm.state) {
    announce(`${vm.name} is ${vm.state}`);
    state.textContent = vm.state;
    state.className = `state state-${vm.state}`;
    row.classList.remove("flash-row"); void row.offsetWidth; row.classList.add("flash-row");
    row.querySelector('[data-field="since"]').replaceChildren(timeLabel(vm.state_changed_at));
  }
  const pending = vm.pending_type ? vm.pending_type.replace(/^vm\.|_requested$/g, "") : "";
  const pct = vm.progress && vm.progress.pct != null && vm.pending_type ? ` ${vm.progress.pct}%` : "";
  row.querySelector('[data-field="pending"]').textContent = pending ? `${pending}${pct}` : "";
  row.querySelector('[data-field="ip"]').textContent = vm.ip || "";
  row.querySelector('[data-field="vcpus"]').textContent = vm.vcpus;
  row.querySelector('[data-field="memory"]').textContent = `${vm.memory_mib} MiB`;
  // A row's start/stop buttons fit the state the server rendered them for: hide them once it
  // moves on (the next render offers what the new state allows).
  const actions = row.querySelector('[data-field="actions"]');
  if (actions) for (const b of actions.querySelectorAll("button")) b.hidden = row.dataset.renderedState !== undefined && row.dataset.renderedState !== vm.state;
  refreshEmpty();
}

// State changes spoken by screen readers (the live region under the list): the newest few,
// not every row's repaint.
const announcer = document.getElementById("vm-announce");
const heard = [];
function announce(text) {
  if (!announcer) return;
  heard.push(text);
  while (heard.length > 3) heard.shift();
  announcer.textContent = heard.join(". ");
}

function refreshEmpty() {
  const visible = [...tbody.querySelectorAll("tr[data-vm-id]")].some((r) => !r.hidden);
  empty.hidden = visible;
}

search.addEventListener("input", () => {
  const q = search.value.trim().toLowerCase();
  for (const row of tbody.querySelectorAll("tr[data-vm-id]")) {
    row.hidden = q !== "" && !row.dataset.name.toLowerCase().includes(q);
  }
  refreshEmpty();
});

// --- Live columns: CPU, memory used, uptime of the running and paused VMs on this page ---------
const LIVE = new Set(["running", "paused"]);
let watched = "";
function liveIds() {
  return [...tbody.querySelectorAll("tr[data-vm-id]")]
    .filter((r) => LIVE.has(r.querySelector('[data-field="state"]')?.textContent.trim()))
    .map((r) => r.dataset.vmId).sort();
}
function watch(send, force = false) {
  const ids = liveIds();
  const key = ids.join(",");
  if (!force && key === watched) return;
  watched = key;
  send({ type: "watch", vms: ids });
}
function formatUptime(s) {
  if (s == null) return "";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return m ? `${m}m ${s % 60}s` : `${s}s`;
}
function showMetrics(samples) {
  for (const [id, m] of Object.entries(samples)) {
    const row = tbody.querySelector(`tr[data-vm-id="${id}"]`);
    if (!row) continue;
    const live = LIVE.has(m.state);
    const set = (field, text, title) => {
      const cell = row.querySelector(`[data-field="${field}"]`);
      if (!cell) return;
      cell.textContent = live ? text : "";
      if (title) cell.title = title; else cell.removeAttribute("title");
    };
    set("cpu", m.cpu_percent == null ? "" : `${m.cpu_percent.toFixed(0)}%`);
    if (m.memory_used_bytes != null) set("used", formatBytes(m.memory_used_bytes), "used inside the guest (its agent)");
    else if (m.rss_bytes != null) set("used", formatBytes(m.rss_bytes), "the VMM's resident memory (no guest figure yet)");
    else set("used", "");
    set("uptime", formatUptime(m.uptime_s));
  }
}
function clearMetrics(row) {
  for (const f of ["cpu", "used", "uptime"]) {
    const cell = row.querySelector(`[data-field="${f}"]`);
    if (cell) cell.textContent = "";
  }
}

let sendLive = () => {};
connectLive(() => "/ws/vms/live/", (msg) => {
  if (msg.type === "vm") {
    apply(msg.vm);
    const row = tbody.querySelector(`tr[data-vm-id="${msg.vm.id}"]`);
    if (row && !LIVE.has(msg.vm.state)) clearMetrics(row);
    watch(sendLive);
  } else if (msg.type === "metrics") showMetrics(msg.samples);
}, document.getElementById("live-status"), (send) => { sendLive = send; watch(send, true); });

for (const row of tbody.querySelectorAll("tr[data-vm-id]")) {
  const badge = row.querySelector('[data-field="state"]');
  if (badge) row.dataset.renderedState = badge.textContent.trim();
}

// --- Ticks for the bulk bar --------------------------------------------------------------------
const tickAll = document.getElementById("tick-all");
const count = document.getElementById("bulk-count");
const review = document.getElementById("bulk-review");
function ticked() { return [...tbody.querySelectorAll("input.tick:checked")]; }
function refreshTicks() {
  if (!count) return;
  const n = ticked().length;
  count.textContent = n ? `${n} ticked` : "none ticked";
  if (review) review.disabled = n === 0;
}
tbody.addEventListener("change", (ev) => { if (ev.target.classList.contains("tick")) refreshTicks(); });
if (tickAll) tickAll.addEventListener("change", () => {
  for (const box of tbody.querySelectorAll("tr:not([hidden]) input.tick")) box.checked = tickAll.checked;
  refreshTicks();
});
refreshTicks();

// --- Saved filters (this browser's) -----------------------------------------------------------
const KEY = "sandbox.vmFilters";
const savedNav = document.getElementById("saved-filters");
function loadSaved() {
  try { return JSON.parse(localStorage.getItem(KEY) || "{}"); } catch { return {}; }
}
function renderSaved() {
  const saved = loadSaved();
  savedNav.replaceChildren();
  const names = Object.keys(saved).sort();
  savedNav.hidden = names.length === 0;
  if (names.length) savedNav.append(el("span", { class: "muted small" }, "Saved filters: "));
  for (const name of names) {
    const link = el("a", { href: `?${saved[name]}`, class: "saved-filter" }, name);
    const drop = el("button", { type: "button", class: "link small", "aria-label": `Forget the filter ${name}` }, "×");
    drop.addEventListener("click", () => { const s = loadSaved(); delete s[name]; localStorage.setItem(KEY, JSON.stringify(s)); renderSaved(); });
    savedNav.append(el("span", { class: "saved" }, link, drop), " ");
  }
}
const saveButton = document.getElementById("save-filter");
if (saveButton && savedNav) {
  saveButton.addEventListener("click", () => {
    const query = new URLSearchParams(new FormData(document.getElementById("vm-filters")));
    for (const [k, v] of [...query.entries()]) if (!v) query.delete(k);
    const name = (window.prompt("A name for this filter:", query.get("q") || query.get("state") || "my VMs") || "").trim().slice(0, 40);
    if (!name) return;
    const s = loadSaved(); s[name] = query.toString(); localStorage.setItem(KEY, JSON.stringify(s));
    renderSaved();
  });
  renderSaved();
}
