// A websocket to the dashboard's live endpoints that reconnects with backoff, and a status dot.
export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

// connectLive(pathFn, onMessage, statusEl): pathFn() is called on every (re)connect so that the
// caller can pass its latest position (?after=) and never miss or repeat an event. onOpen(send)
// runs on every (re)connect: what the page asked of the last socket it asks the new one again.
export function connectLive(pathFn, onMessage, statusEl, onOpen) {
  let socket = null;
  let delay = 500;
  let closed = false;
  // The status is a live region: a screen reader hears "reconnecting…" and "live" again.
  if (statusEl) statusEl.setAttribute("role", "status");
  const status = (text, cls) => {
    if (!statusEl) return;
    statusEl.textContent = text;
    statusEl.className = `live-dot ${cls}`;
  };
  const open = () => {
    socket = new WebSocket(wsUrl(pathFn()));
    socket.addEventListener("open", () => { delay = 500; status("live", "on"); if (onOpen) onOpen(send); });
    socket.addEventListener("message", (ev) => {
      if (typeof ev.data === "string") onMessage(JSON.parse(ev.data));
    });
    socket.addEventListener("close", (ev) => {
      if (closed) return;
      if (ev.code === 4401 || ev.code === 4403) { status("not allowed", "off"); return; }
      status("reconnecting…", "off");
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 10000);
    });
  };
  const send = (obj) => {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(obj));
  };
  open();
  const close = () => { closed = true; socket && socket.close(); };
  // Leaving the page closes the socket at once (a page kept in the back/forward cache would
  // otherwise hold it open).
  window.addEventListener("pagehide", close);
  return { close, send };
}

export function csrfToken() {
  const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  if (m) return decodeURIComponent(m[1]);
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

// A moment as the server writes it (core/templatetags/times.py): <time data-when> in UTC with the
// zone named; static/js/times.js shows it in the browser's zone when the user chose so.
export function timeLabel(iso, precision = "s") {
  if (!iso) return document.createTextNode("");
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return document.createTextNode(String(iso));
  const s = d.toISOString(); // 2026-11-30T13:24:02.123Z
  const text = precision === "t" ? `${s.slice(11, 19)} UTC` : `${s.slice(0, 10)} ${s.slice(11, 19)} UTC`;
  return el("time", { datetime: iso, "data-when": precision }, text);
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}
