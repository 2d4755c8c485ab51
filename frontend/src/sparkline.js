// A tiny canvas sparkline: one or two series over the last N points, autoscaled, no dependency.
export class Sparkline {
  // colors: CSS colours or custom properties ("--series-1") read when drawing, so a chart
  // follows the page's light or dark scheme.
  constructor(canvas, { points = 60, colors = ["--series-1", "--series-2"], min = 0, max = null } = {}) {
    this.canvas = canvas;
    this.points = points;
    this.colors = colors;
    this.min = min;
    this.fixedMax = max;
    this.series = colors.map(() => []);
    const ratio = window.devicePixelRatio || 1;
    this.w = canvas.width;
    this.h = canvas.height;
    canvas.width = this.w * ratio;
    canvas.height = this.h * ratio;
    canvas.style.width = `${this.w}px`;
    canvas.style.height = `${this.h}px`;
    this.ctx = canvas.getContext("2d");
    this.ctx.scale(ratio, ratio);
  }

  push(...values) {
    values.forEach((v, i) => {
      const s = this.series[i];
      s.push(v == null || Number.isNaN(v) ? null : Number(v));
      if (s.length > this.points) s.shift();
    });
    this.draw();
  }

  draw() {
    const { ctx, w, h } = this;
    ctx.clearRect(0, 0, w, h);
    const all = this.series.flat().filter((v) => v != null);
    const max = this.fixedMax ?? Math.max(1e-9, ...all, 0) * 1.15;
    const y = (v) => h - 2 - ((v - this.min) / (max - this.min || 1)) * (h - 4);
    const step = w / (this.points - 1);
    const css = getComputedStyle(this.canvas);
    const color = (c) => (c.startsWith("--") ? css.getPropertyValue(c).trim() || "#2457c5" : c);
    ctx.strokeStyle = color("--chart-grid");
    ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(0, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.stroke();
    this.series.forEach((s, i) => {
      const offset = this.points - s.length;
      ctx.strokeStyle = color(this.colors[i]);
      ctx.fillStyle = color(this.colors[i]) + "22";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let started = false;
      let firstX = 0;
      let lastX = 0;
      s.forEach((v, j) => {
        if (v == null) return;
        const x = (offset + j) * step;
        if (!started) { ctx.moveTo(x, y(v)); started = true; firstX = x; } else ctx.lineTo(x, y(v));
        lastX = x;
      });
      if (!started) return;
      ctx.stroke();
      if (i === 0) {
        ctx.lineTo(lastX, h); ctx.lineTo(firstX, h); ctx.closePath(); ctx.fill();
      }
    });
  }
}

export function formatBytes(n) {
  if (n == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}
