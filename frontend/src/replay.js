// Replays an asciicast v2 recording in xterm.js with its timing: play, pause, restart, speed.
import { Terminal } from "@xterm/xterm";

const element = document.getElementById("terminal");
const playBtn = document.getElementById("replay-play");
const restartBtn = document.getElementById("replay-restart");
const speedSel = document.getElementById("replay-speed");
const showInput = document.getElementById("replay-input");
const bar = document.getElementById("replay-progress");
const clock = document.getElementById("replay-time");
const inputLog = document.getElementById("replay-input-log");

async function main() {
  const response = await fetch(element.dataset.castUrl);
  const lines = (await response.text()).split("\n").filter(Boolean);
  const header = JSON.parse(lines[0]);
  const frames = lines.slice(1).map((l) => JSON.parse(l));
  const total = frames.length ? frames[frames.length - 1][0] : 0;

  const term = new Terminal({ cols: header.width || 80, rows: header.height || 24, disableStdin: true, scrollback: 5000,
    theme: { background: "#0f172a", foreground: "#e2e8f0" } });
  term.open(element);

  let index = 0;
  let position = 0; // seconds into the recording
  let timer = null;
  let startedAt = 0;

  function render(frame) {
    const [, kind, text] = frame;
    if (kind === "o") term.write(text);
    else if (kind === "i" && showInput.checked) inputLog.textContent += JSON.stringify(text).slice(1, -1);
  }

  function tick() {
    const speed = Number(speedSel.value);
    position = (performance.now() - startedAt) / 1000 * speed;
    while (index < frames.length && frames[index][0] <= position) render(frames[index++]);
    bar.value = total ? Math.min(1000, (position / total) * 1000) : 1000;
    clock.textContent = `${Math.min(position, total).toFixed(1)} / ${total.toFixed(1)} s`;
    if (index >= frames.length) { stop(); playBtn.textContent = "Play"; return; }
    // Sleep until the next frame (capped, so the clock moves during long pauses).
    const wait = ((frames[index][0] - position) / speed) * 1000;
    timer = setTimeout(tick, Math.max(0, Math.min(wait, 250)));
  }

  function play() {
    if (index >= frames.length) restart();
    startedAt = performance.now() - (position * 1000) / Number(speedSel.value);
    playBtn.textContent = "Pause";
    tick();
  }

  function stop() { clearTimeout(timer); timer = null; }

  function restart() {
    stop(); term.reset(); inputLog.textContent = ""; index = 0; position = 0; bar.value = 0;
  }

  playBtn.addEventListener("click", () => { if (timer) { stop(); playBtn.textContent = "Play"; } else play(); });
  restartBtn.addEventListener("click", () => { restart(); play(); });
  speedSel.addEventListener("change", () => { if (timer) { stop(); play(); } });
  window.sandboxReplay = { term, frames, header, done: () => index >= frames.length };
  play();
}

main();
