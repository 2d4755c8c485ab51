// The VM list: rows updated live from ws/vms/live/ (state, pending action, address), new VMs
// added, destroyed ones removed; the search box filters instantly in the page.
import { connectLive, el } from "./live.js";

const table = document.getElementById("vm-list");
const tbody = table.querySelector("tbody");
const empty = tbody.querySelector("tr.empty");
const filters = JSON.parse(table.dataset.filters || "{}");
const seesAll = table.querySelectorAll("thead th").length === 8;
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
    el("td", {}, el("a", { href: `/vms/${vm.id}/` }, vm.name)),
    ...(seesAll ? [el("td", {}, vm.owner)] : []),
    el("td", {}, el("span", { class: `state state-${vm.state}`, "data-field": "state" }, vm.state), " ",
      el("span", { class: "pending", "data-field": "pending" }, "")),
    el("td", {}, vm.template),
    el("td", { "data-field": "vcpus" }, vm.vcpus),
    el("td", { "data-field": "memory" }, `${vm.memory_mib} MiB`),
    el("td", { "data-field": "ip" }, vm.ip),
    el("td", { "data-field": "since", class: "muted" }, ""),
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
    row = newRow(vm);
    tbody.prepend(row);
    row.classList.add("flash-row");
  }
  row.hidden = false;
  const state = row.querySelector('[data-field="state"]');
  if (state.textContent !== vm.state) {
    state.textContent = vm.state;
    state.className = `state state-${vm.state}`;
    row.classList.remove("flash-row"); void row.offsetWidth; row.classList.add("flash-row");
    row.querySelector('[data-field="since"]').textContent = (vm.state_changed_at || "").replace("T", " ").slice(0, 19);
  }
  const pending = vm.pending_type ? vm.pending_type.replace(/^vm\.|_requested$/g, "") : "";
  const pct = vm.progress && vm.progress.pct != null && vm.pending_type ? ` ${vm.progress.pct}%` : "";
  row.querySelector('[data-field="pending"]').textContent = pending ? `${pending}${pct}` : "";
  row.querySelector('[data-field="ip"]').textContent = vm.ip || "";
  row.querySelector('[data-field="vcpus"]').textContent = vm.vcpus;
  row.querySelector('[data-field="memory"]').textContent = `${vm.memory_mib} MiB`;
  refreshEmpty();
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

connectLive(() => "/ws/vms/live/", (msg) => { if (msg.type === "vm") apply(msg.vm); },
  document.getElementById("live-status"));
