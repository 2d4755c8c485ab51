// The in-browser serial console: xterm.js bound to ws/vms/<id>/console/. Binary frames are
// terminal bytes both ways; text frames are JSON status from the server (session, link). A
// read-only session (viewers, auditors) never sends keystrokes; the server drops them anyway.
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { wsUrl } from "./live.js";

export function mountConsole(element, path, { readOnly = false, onStatus = () => {} } = {}) {
  const term = new Terminal({
    convertEol: false, cursorBlink: !readOnly, disableStdin: readOnly, scrollback: 5000,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', monospace", fontSize: 14,
    theme: { background: "#0f172a", foreground: "#e2e8f0" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(element);
  fit.fit();
  const socket = new WebSocket(wsUrl(`${path}?cols=${term.cols}&rows=${term.rows}`));
  socket.binaryType = "arraybuffer";
  socket.addEventListener("message", (event) => {
    if (typeof event.data === "string") onStatus(JSON.parse(event.data));
    else term.write(new Uint8Array(event.data));
  });
  socket.addEventListener("close", (event) => onStatus({ type: "closed", code: event.code }));
  const encoder = new TextEncoder();
  if (!readOnly) {
    term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
    });
  }
  window.addEventListener("resize", () => fit.fit());
  // Leaving the page ends the session now (and so its recording), not when the tab is dropped.
  window.addEventListener("pagehide", () => socket.close());
  term.focus();
  return { term, socket, dispose: () => { socket.close(); term.dispose(); } };
}

// The console page: #terminal carries the VM id and the mode the server granted.
const element = document.getElementById("terminal");
if (element && element.dataset.vmId) {
  const statusEl = document.getElementById("console-status");
  const setStatus = (text, cls) => { statusEl.textContent = text; statusEl.className = `live-dot ${cls}`; };
  const readOnly = element.dataset.mode !== "write";
  const mounted = mountConsole(element, `/ws/vms/${element.dataset.vmId}/console/`, {
    readOnly,
    onStatus: (s) => {
      if (s.type === "session") setStatus(`session ${s.session}`, "on");
      else if (s.type === "link") setStatus(s.connected ? "connected to ttyS0" : `serial link down${s.reason ? `: ${s.reason}` : ""}`, s.connected ? "on" : "off");
      else if (s.type === "closed") setStatus(s.code === 4403 ? "not allowed" : `closed (${s.code})`, "off");
    },
  });
  // For tests and the curious: the terminal's text, without scraping the renderer.
  window.sandboxConsole = {
    ...mounted,
    text: () => {
      const buf = mounted.term.buffer.active;
      const lines = [];
      for (let i = 0; i < buf.length; i += 1) lines.push(buf.getLine(i)?.translateToString(true) ?? "");
      return lines.join("\n");
    },
  };
}

window.SandboxConsole = { mountConsole };
