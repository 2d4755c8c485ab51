// Time labels: the server writes every moment as <time datetime=ISO data-when=precision> in UTC
// with the zone named ("2026-11-30 13:24:02 UTC", core/templatetags/times.py). The header's toggle
// switches every label to the browser's own zone and back, kept in localStorage; each label's
// title gives the other reading. Labels added later (live rows) are formatted as they arrive.
(() => {
  const KEY = "times";
  const stored = () => {
    try {
      return localStorage.getItem(KEY) === "local" ? "local" : "utc";
    } catch (e) {
      return "utc";
    }
  };
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const zoneName = (d) => {
    try {
      const part = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" })
        .formatToParts(d).find((p) => p.type === "timeZoneName");
      return part ? part.value : "local";
    } catch (e) {
      return "local";
    }
  };
  // The fields of ``d`` in UTC or in the browser's zone, as the server's formats write them.
  const format = (d, precision, local) => {
    const f = local
      ? [d.getFullYear(), d.getMonth() + 1, d.getDate(), d.getHours(), d.getMinutes(), d.getSeconds(), d.getMilliseconds()]
      : [d.getUTCFullYear(), d.getUTCMonth() + 1, d.getUTCDate(), d.getUTCHours(), d.getUTCMinutes(), d.getUTCSeconds(), d.getUTCMilliseconds()];
    const date = `${f[0]}-${pad(f[1])}-${pad(f[2])}`;
    const hm = `${pad(f[3])}:${pad(f[4])}`;
    const zone = local ? zoneName(d) : "UTC";
    switch (precision) {
      case "d": return date;
      case "m": return `${date} ${hm} ${zone}`;
      case "t": return `${hm}:${pad(f[5])} ${zone}`;
      case "ms": return `${date} ${hm}:${pad(f[5])}.${pad(f[6], 3)} ${zone}`;
      default: return `${date} ${hm}:${pad(f[5])} ${zone}`;
    }
  };
  const render = (el, mode) => {
    const precision = el.dataset.when || "s";
    if (precision === "d") return; // a date names no moment: the same in every zone
    const d = new Date(el.getAttribute("datetime"));
    if (Number.isNaN(d.getTime())) return;
    el.textContent = format(d, precision, mode === "local");
    el.title = format(d, precision, mode !== "local");
  };
  const renderAll = (root, mode) => {
    for (const el of root.querySelectorAll("time[data-when]")) render(el, mode);
  };
  const label = (button, mode) => {
    // The accessible name starts with the visible text (axe: label-content-name-mismatch).
    button.textContent = mode === "local" ? "Times: local" : "Times: UTC";
    button.setAttribute("aria-label", `${button.textContent}. Show them in ${mode === "local" ? "UTC" : "your zone"}`);
  };
  document.addEventListener("DOMContentLoaded", () => {
    let mode = stored();
    if (mode === "local") renderAll(document, mode);
    new MutationObserver((records) => {
      if (mode !== "local") return; // the server's and the scripts' labels are UTC already
      for (const r of records) for (const n of r.addedNodes) {
        if (n.nodeType !== 1) continue;
        if (n.matches("time[data-when]")) render(n, mode); else renderAll(n, mode);
      }
    }).observe(document.body, { childList: true, subtree: true });
    const button = document.getElementById("times-toggle");
    if (!button) return;
    button.hidden = false;
    label(button, mode);
    button.addEventListener("click", () => {
      mode = mode === "local" ? "utc" : "local";
      try {
        localStorage.setItem(KEY, mode);
      } catch (e) {
        /* not kept: this page still changes */
      }
      renderAll(document, mode);
      label(button, mode);
    });
  });
})();
