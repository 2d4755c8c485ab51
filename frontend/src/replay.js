// Replays an asciicast v2 recording in xterm.js with its timing: play, pause, restart, speed,
// and a seek bar. The terminal keeps the recording's own columns and rows (what the user saw:
// reflowing it to the frame would wrap lines the user never saw wrapped), scaled down until it
// fits the width of its frame. Seeking replays from the start to the chosen time
// at once: the output frames up to it, written in one go.
import { Terminal } from "@xterm/xterm";

const element = document.getElementById("terminal");
const frame = element.parentElement;
const playBtn = document.getElementById("replay-play");
const restartBtn = document.getElementById("replay-restart");
const speedSel = document.getElementById("replay-speed");
const showInput = document.getElementById("replay-input");
const seek = document.getElementById("replay-seek");
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

  // Scaled down (a CSS transform) until the recording's columns fit the frame's width; the
  // space the transform frees below is taken back with a negative margin.
  function fit() {
    const screen = element.querySelector(".xterm-screen");
    if (!screen) return;
    element.style.transform = "";
    element.style.width = "";
    element.style.marginBottom = "";
    const style = getComputedStyle(frame);
    const room = frame.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const scrollbar = 16; // the viewport's vertical scrollbar beside the screen
    const width = screen.getBoundingClientRect().width + scrollbar;
    if (!width || room <= 0 || width <= room) return;
    const scale = room / width;
    const height = element.getBoundingClientRect().height;
    element.style.transformOrigin = "0 0";
    element.style.width = `${width}px`;
    element.style.transform = `scale(${scale})`;
    element.style.marginBottom = `${-height * (1 - scale)}px`;
  }
  fit();
  requestAnimationFrame(fit); // once more after the renderer measured its cells
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(fit, 100); });

  let index = 0;
  let position = 0; // seconds into the recording
  let timer = null;
  let startedAt = 0;
  let seeking = false;

  function inputText(text) { return JSON.stringify(text).slice(1, -1); }

  function render(item) {
    const [, kind, text] = item;
    if (kind === "o") term.write(text);
    else if (kind === "i" && showInput.checked) inputLog.textContent += inputText(text);
  }

  function show() {
    if (!seeking) seek.value = String(total ? Math.round(Math.min(1, position / total) * 1000) : 1000);
    const at = `${Math.min(position, total).toFixed(1)} / ${total.toFixed(1)} s`;
    clock.textContent = at;
    seek.setAttribute("aria-valuetext", at);
  }

  function tick() {
    const speed = Number(speedSel.value);
    position = (performance.now() - startedAt) / 1000 * speed;
    while (index < frames.length && frames[index][0] <= position) render(frames[index++]);
    show();
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
    stop(); term.reset(); inputLog.textContent = ""; index = 0; position = 0; show();
  }

  // Jump to ``seconds``: the screen as it was then, rebuilt from the start in one write.
  function seekTo(seconds) {
    const playing = timer !== null;
    stop();
    term.reset();
    let output = "";
    let typed = "";
    index = 0;
    while (index < frames.length && frames[index][0] <= seconds) {
      const [, kind, text] = frames[index++];
      if (kind === "o") output += text;
      else if (kind === "i") typed += inputText(text);
    }
    inputLog.textContent = showInput.checked ? typed : "";
    position = Math.max(0, Math.min(seconds, total));
    show();
    return new Promise((resolve) => {
      term.write(output, () => {
        if (playing) play();
        resolve();
      });
    });
  }

  playBtn.addEventListener("click", () => { if (timer) { stop(); playBtn.textContent = "Play"; } else play(); });
  restartBtn.addEventListener("click", () => { restart(); play(); });
  speedSel.addEventListener("change", () => { if (timer) { stop(); play(); } });
  seek.addEventListener("input", () => {
    seeking = true;
    seekTo((Number(seek.value) / 1000) * total).finally(() => { seeking = false; });
  });
  seek.disabled = false;

  function screenText() {
    const buffer = term.buffer.active;
    const out = [];
    for (let y = 0; y < buffer.length; y++) out.push(buffer.getLine(y).translateToString(true));
    return out.join("\n").replace(/\n+$/, "");
  }
  window.sandboxReplay = { term, frames, header, total, seekTo, screenText, position: () => position,
    playing: () => timer !== null, done: () => index >= frames.length };
  play();
}

main();
