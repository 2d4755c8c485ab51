// Usage history charts (GET /api/v1/vms/<id>/usage/, or a user's, group's or host's summed one): one SVG chart per metric group with time
// and value axes, the average as a line and the maximum as a dashed line, gaps where the VM did
// not run; a range picker (1h / 24h / 7d) asks the API again. No dependency.
import { formatBytes } from "./sparkline.js";

const NS = "http://www.w3.org/2000/svg";
const W = 320, H = 150, L = 56, R = 8, T = 8, B = 22; // size and margins (axes inside)
const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400 };
// The series colours are the scheme's (app.css: --series-1, --series-2), light or dark.
const COLORS = ["var(--series-1)", "var(--series-2)"];

// Each chart: its title, the metrics it draws and how a value reads.
const CHARTS = [
  { key: "cpu", title: "VMM CPU (% of one core)", metrics: ["cpu"], fmt: (v) => `${v.toFixed(v < 10 ? 1 : 0)}%` },
  { key: "mem", title: "VMM memory (RSS)", metrics: ["mem"], fmt: formatBytes },
  { key: "disk", title: "Disk read / write", metrics: ["disk_read", "disk_write"], fmt: (v) => `${formatBytes(v)}/s` },
  { key: "net", title: "Network rx / tx", metrics: ["net_rx", "net_tx"], fmt: (v) => `${formatBytes(v)}/s` },
];

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text != null) node.textContent = text;
  return node;
}

// The page's choice of zone (the header's Times toggle, static/js/times.js): UTC unless the user
// chose the browser's zone.
function localTimes() {
  try {
    return localStorage.getItem("times") === "local";
  } catch (e) {
    return false;
  }
}

const pad = (n) => String(n).padStart(2, "0");

// Short enough for four labels under a narrow chart: the day over more than a day, else the time.
function timeLabel(ts, span) {
  const d = new Date(ts * 1000);
  const local = localTimes();
  const [mo, day, h, mi] = local
    ? [d.getMonth() + 1, d.getDate(), d.getHours(), d.getMinutes()]
    : [d.getUTCMonth() + 1, d.getUTCDate(), d.getUTCHours(), d.getUTCMinutes()];
  return span > 86400 ? `${pad(mo)}-${pad(day)}` : `${pad(h)}:${pad(mi)}`;
}

function zoneName() {
  if (!localTimes()) return "UTC";
  try {
    const part = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" })
      .formatToParts(new Date()).find((p) => p.type === "timeZoneName");
    return part ? part.value : "local time";
  } catch (e) {
    return "local time";
  }
}

// One chart: the series of each metric (avg solid, max dashed for a single metric).
export function drawChart(root, spec, body) {
  root.replaceChildren();
  const from = Date.parse(body.from) / 1000, to = Date.parse(body.to) / 1000;
  const span = Math.max(1, to - from);
  const values = body.points.flatMap((p) => spec.metrics.map((m) => p[m]).filter(Boolean).flatMap((v) => spec.metrics.length === 1 ? [v.avg, v.max] : [v.avg]));
  const top = Math.max(1e-9, ...values) * 1.1;
  const x = (t) => L + ((t - from) / span) * (W - L - R);
  const y = (v) => H - B - (v / top) * (H - T - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "history-chart" });
  const when = (t) => new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
  // The text alternative: what the chart shows, in words (its range, and per series the average
  // over the range and the peak), for screen readers and as the tooltip.
  const words = spec.metrics.map((m) => {
    const seen = body.points.map((p) => p[m]).filter(Boolean);
    if (!seen.length) return `${m.replace("_", " ")}: no samples`;
    const avg = seen.reduce((a, v) => a + v.avg, 0) / seen.length;
    const peak = Math.max(...seen.map((v) => v.max));
    return `${m.replace("_", " ")}: average ${spec.fmt(avg)}, peak ${spec.fmt(peak)}`;
  });
  chart.append(svg("title", {}, `${spec.title}, ${when(from)} to ${when(to)}: ${words.join("; ")}`));
  // Axes: three value ticks (none without a value to scale them), four time ticks.
  for (let i = 0; values.length && i <= 2; i += 1) {
    const v = (top / 1.1) * (i / 2);
    chart.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    chart.append(svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end", class: "tick" }, spec.fmt(v)));
  }
  for (let i = 0; i <= 3; i += 1) {
    const t = from + (span * i) / 3;
    chart.append(svg("text", { x: x(t), y: H - 6, "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle", class: "tick" }, timeLabel(t, span)));
  }
  chart.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  chart.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  const lines = spec.metrics.flatMap((m, i) => {
    const out = [{ m, field: "avg", color: COLORS[i], dash: false }];
    if (spec.metrics.length === 1) out.push({ m, field: "max", color: COLORS[1], dash: true });
    return out;
  });
  for (const line of lines) {
    let d = "";
    let prevEnd = null;
    for (const p of body.points) {
      const v = p[line.m];
      if (!v) { prevEnd = null; continue; }
      const mid = p.ts + p.step / 2;
      // A gap longer than a bucket: the VM did not run (or was not sampled) in between.
      d += `${prevEnd != null && p.ts - prevEnd <= p.step ? "L" : "M"}${x(mid).toFixed(1)},${y(v[line.field]).toFixed(1)}`;
      prevEnd = p.ts + p.step;
    }
    if (d) chart.append(svg("path", { d, fill: "none", style: `stroke:${line.color}`, "stroke-width": 1.5, "stroke-dasharray": line.dash ? "3 3" : "none" }));
  }
  if (!body.points.some((p) => spec.metrics.some((m) => p[m]))) {
    chart.append(svg("text", { x: (L + W) / 2, y: H / 2, "text-anchor": "middle", class: "tick" }, "no samples in this range"));
  }
  root.append(chart);
}

export function mountHistory(section, url = section.dataset.usageUrl) {
  const figures = Object.fromEntries(CHARTS.map((c) => [c.key, section.querySelector(`[data-history="${c.key}"]`)]));
  const note = section.querySelector("[data-history-note]");
  const buttons = [...section.querySelectorAll("button[data-range]")];
  let current = "1h";
  let last = null;

  function draw() {
    if (!last) return;
    for (const spec of CHARTS) if (figures[spec.key]) drawChart(figures[spec.key], spec, last);
    const tiers = [...new Set(last.segments.map((s) => s.tier))].join(" + ") || "no data";
    note.textContent = `${last.points.length} points, step ${last.step}s (from ${tiers}), times in ${zoneName()}; solid: average, dashed: maximum`;
  }

  async function load(range) {
    current = range;
    for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.range === range));
    const to = new Date();
    const from = new Date(to.getTime() - RANGES[range] * 1000);
    const q = new URLSearchParams({ from: from.toISOString(), to: to.toISOString(), step: "auto" });
    note.textContent = "loading…";
    try {
      const res = await fetch(`${url}?${q}`, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const body = await res.json();
      if (range !== current) return; // a later pick won
      last = body;
      draw();
    } catch (err) {
      note.textContent = `history unavailable: ${err.message}`;
    }
  }

  for (const b of buttons) b.addEventListener("click", () => load(b.dataset.range));
  // The header's Times toggle: the axes follow it (after its own handler has stored the choice).
  const toggle = document.getElementById("times-toggle");
  if (toggle) toggle.addEventListener("click", () => setTimeout(draw, 0));
  load(current);
  // The last hour moves: refresh it every minute while the page is open.
  setInterval(() => { if (current === "1h" && !document.hidden) load("1h"); }, 60000);
}
