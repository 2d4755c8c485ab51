// The task log (the Tasks page and the home page's "Running now" panel): rows the server
// rendered, then each task as ws/tasks/live/ pushes it, matched against the page's filters.
import { connectLive, el, timeLabel } from "./live.js";

const MAX_ROWS = 200; // the live page keeps the newest; older ones are a page away

function matches(task, filters) {
  if (!filters) return false;
  if (filters.vm && task.vm.id !== filters.vm) return false;
  if (filters.user && task.actor !== filters.user) return false;
  if (filters.verb && task.verb !== filters.verb) return false;
  // A state filter keeps rows that have left the state (they say so) but takes no new ones.
  if (filters.state && task.state !== filters.state) return "update-only";
  return true;
}

function statusCell(task) {
  const cell = el("td", { dataset: { field: "state" } }, el("span", { class: `state task-${task.state}` }, task.state));
  if (task.state === "pending" && task.pct != null) {
    const label = `${task.verb} of ${task.vm.name}: ${task.pct}%`;
    cell.append(" ", el("progress", { max: "100", value: String(task.pct), "aria-label": label }, `${task.pct}%`));
    cell.append(" ", el("span", { class: "small" }, `${task.pct}% ${task.step || ""}`));
  }
  if (task.error) cell.append(el("div", { class: "errors small" }, task.error.slice(0, 160)));
  return cell;
}

function row(task, showOwner) {
  const vm = el("td", {}, el("a", { href: `/vms/${task.vm.id}/` }, task.vm.name));
  if (showOwner && task.vm.owner) vm.append(" ", el("span", { class: "muted small" }, `(${task.vm.owner})`));
  const duration = task.duration_s != null
    ? el("td", { dataset: { field: "duration" } }, `${task.duration_s.toFixed(2)} s`)
    : el("td", { dataset: { field: "duration" } }, el("span", { class: "muted" }, "running"));
  return el("tr", { dataset: { task: task.id, version: String(task.version), position: String(task.position) } },
    el("td", {}, timeLabel(task.requested_at)),
    vm,
    el("td", {}, el("code", {}, task.verb)),
    el("td", {}, task.actor, " ", el("span", { class: "muted small" }, task.channel)),
    statusCell(task),
    duration,
  );
}

function follow(table, filters, { showOwner = true, runningOnly = false } = {}) {
  const body = table.tBodies[0];
  const status = document.getElementById("live-status");
  connectLive(() => "/ws/tasks/live/", (msg) => {
    if (msg.type !== "task") return;
    const task = msg.task;
    const existing = body.querySelector(`tr[data-task="${task.id}"]`);
    if (existing && Number(existing.dataset.version) >= task.version) return;
    if (runningOnly && task.state !== "pending") {
      if (existing) existing.replaceWith(row(task, showOwner)); // shows how it ended, once
      return;
    }
    const fit = matches(task, filters);
    if (existing) { existing.replaceWith(row(task, showOwner)); return; }
    if (fit !== true) return;
    body.querySelector("tr.empty")?.remove();
    // Newest request first: a task's row goes above every older request's.
    const older = [...body.rows].find((r) => r.dataset.task && Number(r.dataset.position) < task.position);
    const fresh = row(task, showOwner);
    if (older) body.insertBefore(fresh, older); else body.prepend(fresh);
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  }, status);
}

const filtersEl = document.getElementById("task-filters");
const table = document.getElementById("tasks");
if (table && filtersEl) {
  const filters = JSON.parse(filtersEl.textContent);
  if (filters) follow(table, filters);
}
const panel = document.getElementById("home-tasks");
if (panel) follow(panel, {}, { showOwner: true, runningOnly: true });
