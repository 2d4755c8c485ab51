// A VM's page, live: state, progress of long actions, last error, timeline (ws/vms/<id>/live/),
// which actions the state allows, metrics charts at 1 Hz, and the exec box.
import { connectLive, csrfToken, el, timeLabel } from "./live.js";
import { Sparkline, formatBytes } from "./sparkline.js";
import { mountHistory } from "./history.js";

const page = document.getElementById("vm-page");
const vmId = page.dataset.vmId;
let after = Number(page.dataset.after || 0);
let vm = JSON.parse(document.getElementById("vm-data").textContent);
const rules = JSON.parse(document.getElementById("vm-rules").textContent);

const stateEl = document.querySelector('#vm-page [data-field="state"]');
const pendingEl = document.getElementById("vm-pending");
const progress = document.getElementById("vm-progress");
const errorBox = document.getElementById("vm-last-error");
const timeline = document.querySelector("#vm-timeline tbody");

function renderVM() {
  stateEl.textContent = vm.state;
  stateEl.className = `state state-${vm.state}`;
  pendingEl.textContent = vm.pending_type ? pendingName(vm.pending_type) + "…" : "";
  const p = vm.progress || {};
  progress.hidden = !vm.pending_type;
  progress.querySelector("progress").value = p.pct || 0;
  progress.querySelector(".progress-text").textContent = [p.step, p.pct != null ? `${p.pct}%` : "", p.message].filter(Boolean).join(" · ");
  errorBox.hidden = !vm.last_error;
  errorBox.querySelector("span").textContent = vm.last_error || "";
  for (const [field, text] of [["vcpus", vm.vcpus], ["memory", `${vm.memory_mib} MiB`]]) {
    const node = document.querySelector(`#vm-spec [data-field="${field}"]`);
    if (node) node.textContent = text;
  }
  const ip = document.querySelector('#vm-spec [data-field="ip"] code');
  if (ip) ip.textContent = vm.ip || "—";
  const host = document.querySelector('#vm-spec [data-field="host"]');
  if (host) host.textContent = `${vm.host || "—"} / ${vm.hypervisor || "—"}`;
  // Enable what the lifecycle table allows in this state (the page's rules); a verb that does
  // not overtake (all but destroy) waits while a request is in flight.
  // A disabled button says why: its title (a tooltip) and the text aria-describedby points to.
  for (const [i, button] of [...document.querySelectorAll("button[data-verb]")].entries()) {
    const rule = rules[button.dataset.verb];
    if (!rule) continue; // no state rule (a record verb): the server decides
    const busy = vm.pending_type && !rule.overtakes;
    button.disabled = busy || !rule.from.includes(vm.state);
    explain(button, i, !button.disabled ? "" : busy
      ? `Waits for the running ${pendingName(vm.pending_type)} to finish.`
      : `Not possible while the VM is ${vm.state}; possible when it is ${rule.from.join(", ")}.`);
  }
  document.title = `${vm.name} (${vm.state}) · MicroVM Sandbox`;
}

function pendingName(type) {
  return type.replace(/^vm\.|_requested$/g, "");
}

function explain(button, i, reason) {
  if (button.dataset.tip === undefined) button.dataset.tip = button.title || "";
  let why = button.id ? document.getElementById(`${button.id}-why`) : null;
  if (!why) {
    button.id = button.id || `action-${button.dataset.verb}-${i}`;
    why = el("span", { id: `${button.id}-why`, class: "sr-only" });
    button.after(why);
    button.setAttribute("aria-describedby", why.id);
  }
  why.textContent = reason;
  button.title = reason || button.dataset.tip;
}

function describe(e) {
  const d = e.data || {};
  if (e.note) return el("span", d.graceful === false ? { class: "bad" } : {}, e.note); // vms.live.event_note
  if (d.reason) return el("span", { class: "bad" }, d.reason);
  if (d.step) return `${d.step} ${d.pct}% ${d.message || ""}`;
  if (d.argv) return el("code", {}, `${d.argv.join(" ")} → ${d.exit_code}`);
  if (d.recording) return `${d.mode || ""} ${d.recording}`;
  return "";
}

function addEvent(e) {
  if (e.position <= after) return;
  after = e.position;
  const row = el("tr", { dataset: { position: e.position }, class: `ev-${e.type.replace(/[._]/g, "-")} flash-row` },
    el("td", {}, e.position), el("td", {}, timeLabel(e.recorded_at, "t")), el("td", {}, el("code", {}, e.type)),
    el("td", {}, e.actor), el("td", { class: "ev-data" }, describe(e)));
  timeline.prepend(row);
  // Any event that changes a snapshot row (one of the VM's snapshots, or a VM event naming one:
  // requested, taken, failed, restored) redraws the rows from the server's own template.
  if (e.aggregate_type === "snapshot" || (e.data && e.data.snapshot_id)) refreshSnapshots();
}

// --- snapshots -------------------------------------------------------------------------------------
const snapshotTable = document.getElementById("vm-snapshots");
let snapshotsBusy = null;
let snapshotsAgain = false;
let snapshotsStale = false;
snapshotTable.addEventListener("focusout", () => {
  if (snapshotsStale) { snapshotsStale = false; refreshSnapshots(); }
});
async function loadSnapshots() {
  try {
    const response = await fetch(snapshotTable.dataset.rowsUrl, { headers: { Accept: "application/json" } });
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok || !type.includes("application/json")) throw new Error(`HTTP ${response.status}`);
    const html = (await response.json()).rows;
    // Typing in a row's form (a clone's name) is not thrown away: the rows are redrawn when the
    // field loses focus.
    if (snapshotTable.contains(document.activeElement) && document.activeElement.tagName === "INPUT") {
      snapshotsStale = true;
      return;
    }
    snapshotTable.tBodies[0].innerHTML = html;
    document.getElementById("snapshots-changed").hidden = true;
  } catch (err) {
    document.getElementById("snapshots-changed").hidden = false;
  }
}
function refreshSnapshots() {
  // One fetch at a time; events arriving meanwhile fetch once more after it.
  if (snapshotsBusy) { snapshotsAgain = true; return; }
  snapshotsBusy = loadSnapshots().finally(() => {
    snapshotsBusy = null;
    if (snapshotsAgain) { snapshotsAgain = false; refreshSnapshots(); }
  });
}

// --- metrics ------------------------------------------------------------------------------------
const charts = {};
for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
  const name = canvas.dataset.chart;
  charts[name] = new Sparkline(canvas, name === "cpu_percent" ? { colors: ["--series-1"] } : name === "rss_bytes" ? { colors: ["--series-3"] } : {});
}
const metric = (name) => document.querySelector(`[data-metric="${name}"]`);
const rate = (v) => (v == null ? "—" : `${formatBytes(v)}/s`);

function onMetrics(s) {
  charts.cpu_percent.push(s.cpu_percent);
  charts.rss_bytes.push(s.rss_bytes);
  charts.disk_bps.push(s.disk_read_bps, s.disk_write_bps);
  charts.net_bps.push(s.net_rx_bps, s.net_tx_bps);
  metric("cpu_percent").textContent = s.cpu_percent == null ? "—" : `${s.cpu_percent.toFixed(1)} %`;
  metric("rss_bytes").textContent = formatBytes(s.rss_bytes);
  metric("disk_bps").textContent = `${rate(s.disk_read_bps)} / ${rate(s.disk_write_bps)}`;
  metric("net_bps").textContent = `${rate(s.net_rx_bps)} / ${rate(s.net_tx_bps)}`;
  const health = document.querySelector("#vm-health span");
  const h = s.health;
  if (h) {
    const mem = h.memory_kib || {};
    health.textContent = `up ${Math.round(h.uptime_s)} s · load ${h.load.map((x) => x.toFixed(2)).join(" ")} · ` +
      `${h.processes.total} processes · ${formatBytes((mem.available || 0) * 1024)} of ${formatBytes((mem.total || 0) * 1024)} available` +
      ` · agent ${h.agent_version} (${s.health_age_s} s ago)`;
  } else if (s.state !== "running") {
    health.textContent = `the VM is ${s.state}`;
  }
  document.getElementById("metrics-note").textContent = s.notes.length ? s.notes.join("; ") : "1 Hz";
}

// --- live ----------------------------------------------------------------------------------------
renderVM();
connectLive(
  () => `/ws/vms/${vmId}/live/?after=${after}`,
  (msg) => {
    if (msg.type === "event") addEvent(msg.event);
    if ((msg.type === "event" || msg.type === "vm") && msg.vm && msg.vm.version >= vm.version) {
      vm = msg.vm;
      renderVM();
    }
    if (msg.type === "metrics") onMetrics(msg.sample);
  },
  document.getElementById("live-status"),
);

// --- exec ----------------------------------------------------------------------------------------
// What an answer that is not the exec view's JSON means (a login page after the session ended, a
// proxy's or Django's HTML error page): said in words, never a JSON parse error.
async function readAnswer(response) {
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("application/json")) {
    try {
      return await response.json();
    } catch (err) {
      return { error: `the server's answer (HTTP ${response.status}) was cut off` };
    }
  }
  if (response.redirected && new URL(response.url).pathname.startsWith("/accounts/login")) {
    return { error: "Your session has ended: sign in again (reload the page) and run the command again.", failed: true };
  }
  const reason = response.status === 403 ? "refused (reload the page: its form token may be stale)" : response.statusText || "failed";
  return { error: `The server answered HTTP ${response.status}: ${reason}. Nothing is known of the command's output.`, failed: true };
}

const execForm = document.getElementById("exec-form");
if (execForm) {
  const out = document.getElementById("exec-out");
  execForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = execForm.querySelector("button");
    button.disabled = true;
    out.hidden = false;
    out.className = "exec-out";
    out.textContent = "running…";
    try {
      const response = await fetch(execForm.action, {
        method: "POST", body: new FormData(execForm), headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
      });
      const body = await readAnswer(response);
      if (!response.ok || body.failed) {
        out.className = "exec-out failed";
        out.textContent = typeof body.error === "string" ? body.error : JSON.stringify(body.error);
      } else {
        out.textContent = "";
        out.append(el("span", { class: "muted" }, `exit ${body.exit_code}${body.timed_out ? " (timed out)" : ""} in ${body.duration_s} s\n`));
        out.append(body.stdout);
        if (body.stderr) out.append(el("span", { class: "bad" }, body.stderr));
      }
    } catch (err) {
      out.className = "exec-out failed";
      out.textContent = `The command could not be sent: ${err.message || err}`;
    } finally {
      button.disabled = false;
      renderVM();
    }
  });
}

// --- usage history (SVG charts with a range picker) ---------------------------------------------
const historySection = document.getElementById("vm-history");
if (historySection) mountHistory(historySection);
