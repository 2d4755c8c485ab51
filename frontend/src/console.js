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
  const send = (data) => {
    if (readOnly || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(encoder.encode(data));
    return true;
  };
  if (!readOnly) term.onData(send);
  // Ctrl+Shift+C / Ctrl+Shift+V copy and paste (plain Ctrl+C stays an interrupt for the guest).
  term.attachCustomKeyEventHandler((ev) => {
    if (ev.type !== "keydown" || !ev.ctrlKey || !ev.shiftKey) return true;
    if (ev.code === "KeyC") { copySelection(term); return false; }
    if (ev.code === "KeyV" && !readOnly) { pasteInto(send); return false; }
    return true;
  });
  // The terminal follows its box: the window's size, full screen, a pop-out window.
  new ResizeObserver(() => fit.fit()).observe(element);
  // Leaving the page ends the session now (and so its recording), not when the tab is dropped.
  window.addEventListener("pagehide", () => socket.close());
  term.focus();
  return { term, socket, send, fit, dispose: () => { socket.close(); term.dispose(); } };
}

// The send-keys menu: what a serial terminal sends for each key.
const KEYS = {
  "ctrl-c": "\x03", "ctrl-d": "\x04", "ctrl-z": "\x1a", "ctrl-backslash": "\x1c",
  "ctrl-l": "\x0c", esc: "\x1b", tab: "\t", enter: "\r",
};

function note(text) {
  const el = document.getElementById("console-note");
  if (el) el.textContent = text;
}

async function copySelection(term) {
  const text = term.getSelection();
  if (!text) { note("select text in the terminal first"); return; }
  try { await navigator.clipboard.writeText(text); note(`copied ${text.length} characters`); }
  catch { note("the browser refused the clipboard: use Ctrl+C outside the terminal"); }
}

async function pasteInto(send) {
  let text = "";
  try { text = await navigator.clipboard.readText(); }
  catch { note("the browser refused the clipboard: paste with the browser's menu"); return; }
  // A serial line takes Enter as CR; pasted newlines become CRs.
  if (text && send(text.replace(/\r?\n/g, "\r"))) note(`pasted ${text.length} characters`);
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
  const keys = document.getElementById("send-key");
  if (keys) keys.addEventListener("change", async () => {
    if (!keys.value) return;
    const choice = keys.value;
    const label = keys.selectedOptions[0].textContent;
    keys.value = "";
    if (choice === "ctrl-alt-del") {
      if (window.confirm("Reboot the guest? Its programs are stopped and it boots again.")) document.getElementById("ctrl-alt-del").submit();
      return;
    }
    if (choice.startsWith("sysrq-")) {
      const form = document.getElementById("sysrq-form");
      const body = new FormData(form);
      body.set("key", choice.slice(6));
      note(`asking the guest's kernel: ${label}…`);
      try {
        const res = await fetch(form.action, { method: "POST", body, credentials: "same-origin", headers: { Accept: "application/json" } });
        const answer = await res.json();
        note(res.ok ? `${label}: done (audit event #${answer.event_position})` : `${label} refused: ${answer.error || res.status}`);
      } catch (err) {
        note(`${label} failed: ${err}`);
      }
      mounted.term.focus();
      return;
    }
    const data = KEYS[choice];
    if (data === undefined) return;
    if (mounted.send(data)) note(`sent ${label}`);
    mounted.term.focus();
  });
  document.getElementById("paste")?.addEventListener("click", () => pasteInto(mounted.send));
  document.getElementById("copy")?.addEventListener("click", () => copySelection(mounted.term));
  const wrap = document.getElementById("terminal-wrap");
  document.getElementById("fullscreen")?.addEventListener("click", async () => {
    try { await wrap.requestFullscreen(); mounted.term.focus(); }
    catch { note("the browser refused full screen"); }
  });
  document.getElementById("popout")?.addEventListener("click", () => {
    const url = `${location.pathname}?popout=1`;
    const win = window.open(url, `console-${element.dataset.vmId}`, "popup,width=960,height=640");
    if (win) { mounted.dispose(); note("the console is in its own window now"); location.href = document.querySelector("h1 a")?.href || "/"; }
    else note("the browser blocked the pop-out window");
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
