// The in-browser serial console: xterm.js bound to a websocket carrying the VM's serial bytes.
// Server messages: binary frames are console output; text frames are JSON control messages
// ({"type": "status", ...}). Keystrokes go back as binary frames unless the console is read-only.
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";

export function mountConsole(element, url, { readOnly = false, onStatus = () => {} } = {}) {
  const term = new Terminal({ convertEol: false, cursorBlink: !readOnly, disableStdin: readOnly, scrollback: 5000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(element);
  fit.fit();
  const socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  socket.addEventListener("message", (event) => {
    if (typeof event.data === "string") {
      onStatus(JSON.parse(event.data));
    } else {
      term.write(new Uint8Array(event.data));
    }
  });
  socket.addEventListener("close", () => onStatus({ type: "closed" }));
  const encoder = new TextEncoder();
  if (!readOnly) {
    term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
    });
  }
  window.addEventListener("resize", () => fit.fit());
  return { term, socket, dispose: () => { socket.close(); term.dispose(); } };
}

window.SandboxConsole = { mountConsole };
