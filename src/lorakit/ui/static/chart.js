"use strict";
/*
 * A small canvas line chart for the lorakit playground: several series, axes with "nice" ticks, an optional
 * log-scale y axis, a legend, and redraws on resize and on devicePixelRatio changes.
 *
 *   const chart = new LineChart(canvas, {title: "Loss", yLabel: "loss", logY: true});
 *   chart.setSeries([{name: "r1 train", color: "#2563eb", points: [[1, 2.3], [2, 1.9]], dashed: false}]);
 *
 * The canvas takes its size from CSS (give it a width and a height); the chart only sets its backing store.
 */

const CHART_STYLE = {
  text: "#374151",
  muted: "#6b7280",
  grid: "#e5e7eb",
  axis: "#9ca3af",
  font: "12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
  titleFont: "600 13px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
};

class LineChart {
  constructor(canvas, { title = "", yLabel = "", xLabel = "step", logY = false } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.opts = { title, yLabel, xLabel, logY };
    this.series = [];
    const redraw = () => this.draw();
    if (window.ResizeObserver) new ResizeObserver(redraw).observe(canvas);
    window.addEventListener("resize", redraw); // browser zoom changes devicePixelRatio and fires resize
    this.draw();
  }

  /** Replace all series: [{name, color, points: [[x, y], ...], dashed?, markers?}]. */
  setSeries(series) {
    this.series = series || [];
    this.draw();
  }

  draw() {
    const { canvas, ctx } = this;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return; // hidden (e.g. an inactive tab): the ResizeObserver redraws once shown
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    ctx.font = CHART_STYLE.titleFont;
    ctx.fillStyle = CHART_STYLE.text;
    ctx.textBaseline = "alphabetic";
    ctx.fillText(this.opts.title, 4, 15);

    const series = this.series.map((s) => ({ ...s, points: this.usable(s.points || []) }));
    const legendBottom = this.drawLegend(series, w, 24);
    const plot = { left: 58, right: w - 14, top: legendBottom + 8, bottom: h - 30 };
    if (plot.bottom - plot.top < 20) return;

    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      this.drawFrame(plot);
      ctx.font = CHART_STYLE.font;
      ctx.fillStyle = CHART_STYLE.muted;
      ctx.textAlign = "center";
      ctx.fillText("No data yet", (plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2);
      ctx.textAlign = "left";
      return;
    }
    const scale = this.scales(all, plot);
    this.drawAxes(plot, scale);
    ctx.save();
    ctx.beginPath();
    ctx.rect(plot.left, plot.top - 2, plot.right - plot.left, plot.bottom - plot.top + 4);
    ctx.clip();
    // the first series ends up on top (the app lists its current run first)
    for (const s of [...series].reverse()) this.drawSeries(s, scale);
    ctx.restore();
  }

  /** Finite points only (and positive y on a log axis). */
  usable(points) {
    return points.filter(
      ([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!this.opts.logY || y > 0),
    );
  }

  /** Data ranges -> pixel mappings, plus the ticks of both axes. Sets plot.left so the y tick labels fit. */
  scales(points, plot) {
    const { logY } = this.opts;
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => (logY ? Math.log10(p[1]) : p[1]));
    let [x0, x1] = padRange(Math.min(...xs), Math.max(...xs), 1);
    let [y0, y1] = padRange(Math.min(...ys), Math.max(...ys), logY ? 0.5 : Math.abs(ys[0]) * 0.1 || 1);
    const yCount = Math.max(2, Math.floor((plot.bottom - plot.top) / 40));
    let yTicks;
    if (logY) {
      const span = y1 - y0;
      y0 -= span * 0.05;
      y1 += span * 0.05;
      yTicks = logTicks(y0, y1, yCount);
    } else {
      yTicks = niceTicks(y0, y1, yCount);
      y0 = Math.min(y0, yTicks[0]); // widen to whole ticks so the curve never touches the frame
      y1 = Math.max(y1, yTicks[yTicks.length - 1]);
    }
    this.ctx.font = CHART_STYLE.font;
    const labelWidth = Math.max(...yTicks.map((t) => this.ctx.measureText(formatTick(t)).width));
    plot.left = Math.ceil((this.opts.yLabel ? 24 : 6) + labelWidth + 8);

    const integer = xs.every(Number.isInteger); // steps: no ticks at 2.5
    const xTicks = niceTicks(x0, x1, Math.max(2, Math.floor((plot.right - plot.left) / 80)), integer);
    x0 = Math.min(x0, xTicks[0]);
    x1 = Math.max(x1, xTicks[xTicks.length - 1]);
    const px = (x) => plot.left + ((x - x0) / (x1 - x0)) * (plot.right - plot.left);
    const py = (y) => {
      const v = logY ? Math.log10(y) : y;
      return plot.bottom - ((v - y0) / (y1 - y0)) * (plot.bottom - plot.top);
    };
    return { px, py, xTicks, yTicks };
  }

  drawFrame(plot) {
    const { ctx } = this;
    ctx.strokeStyle = CHART_STYLE.axis;
    ctx.lineWidth = 1;
    ctx.setLineDash([]);
    ctx.beginPath();
    ctx.moveTo(plot.left + 0.5, plot.top);
    ctx.lineTo(plot.left + 0.5, plot.bottom + 0.5);
    ctx.lineTo(plot.right, plot.bottom + 0.5);
    ctx.stroke();
  }

  drawAxes(plot, { px, py, xTicks, yTicks }) {
    const { ctx } = this;
    ctx.font = CHART_STYLE.font;
    ctx.lineWidth = 1;
    ctx.setLineDash([]);
    ctx.fillStyle = CHART_STYLE.muted;
    ctx.strokeStyle = CHART_STYLE.grid;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of yTicks) {
      const y = Math.round(py(t)) + 0.5;
      if (y < plot.top - 1 || y > plot.bottom + 1) continue;
      ctx.beginPath();
      ctx.moveTo(plot.left, y);
      ctx.lineTo(plot.right, y);
      ctx.stroke();
      ctx.fillText(formatTick(t), plot.left - 6, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of xTicks) {
      const x = Math.round(px(t)) + 0.5;
      if (x < plot.left - 1 || x > plot.right + 1) continue;
      ctx.fillText(formatTick(t), x, plot.bottom + 6);
    }
    this.drawFrame(plot);

    ctx.textAlign = "right";
    ctx.fillText(this.opts.xLabel, plot.right, plot.bottom + 18);
    if (this.opts.yLabel) {
      ctx.save();
      ctx.translate(12, (plot.top + plot.bottom) / 2);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(this.opts.yLabel + (this.opts.logY ? " (log)" : ""), 0, 0);
      ctx.restore();
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
  }

  drawSeries(s, { px, py }) {
    const { ctx } = this;
    if (!s.points.length) return;
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.75;
    ctx.lineJoin = "round";
    ctx.setLineDash(s.dashed ? [6, 4] : []);
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
    ctx.stroke();
    ctx.setLineDash([]);
    // Dots where a line alone would be hard to read: a lone point, few points, or when asked for.
    if (s.markers || s.points.length < 12) {
      for (const [x, y] of s.points) {
        ctx.beginPath();
        ctx.arc(px(x), py(y), 2.75, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  /** Legend entries laid out in rows from the top right corner down; returns the y below the legend. */
  drawLegend(series, width, top) {
    const { ctx } = this;
    const named = series.filter((s) => s.name);
    if (!named.length) return top;
    ctx.font = CHART_STYLE.font;
    ctx.textBaseline = "middle";
    const rowHeight = 16;
    let x = 60;
    let y = top + rowHeight / 2;
    for (const s of named) {
      const itemWidth = 22 + ctx.measureText(s.name).width + 14;
      if (x + itemWidth > width && x > 60) {
        x = 60;
        y += rowHeight;
      }
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 2;
      ctx.setLineDash(s.dashed ? [4, 3] : []);
      ctx.beginPath();
      ctx.moveTo(x, y);
      ctx.lineTo(x + 18, y);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = CHART_STYLE.text;
      ctx.fillText(s.name, x + 22, y);
      x += itemWidth;
    }
    ctx.textBaseline = "alphabetic";
    return y + rowHeight / 2;
  }
}

/** [lo, hi] widened by `pad` when it is a single value. */
function padRange(lo, hi, pad) {
  return lo === hi ? [lo - pad, hi + pad] : [lo, hi];
}

/** About `count` round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]; whole numbers
 * only when `integer`. */
function niceTicks(lo, hi, count, integer = false) {
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const steps = [1, 2, 2.5, 5, 10].map((m) => m * mag).filter((s) => !integer || (s >= 1 && Number.isInteger(s)));
  const step = steps.find((s) => s >= raw) || (integer ? Math.max(1, 10 * mag) : 10 * mag);
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t <= hi + step * 0.5; t += step) {
    ticks.push(Number(t.toPrecision(12)));
    if (ticks.length > 50) break;
  }
  return ticks;
}

/** Ticks of a log10 axis whose range is [lo, hi] in log10 units: powers of ten, with 2 and 5 between them
 * when only a few decades are shown, or linear ticks when less than one decade is. */
function logTicks(lo, hi, count) {
  if (hi - lo < 1) return niceTicks(10 ** lo, 10 ** hi, count);
  const mults = hi - lo < 2.5 ? [1, 2, 5] : [1];
  const ticks = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of mults) {
      const v = m * 10 ** e;
      if (Math.log10(v) >= lo && Math.log10(v) <= hi) ticks.push(Number(v.toPrecision(12)));
    }
  }
  return ticks;
}

/** Short tick text: "0", "250", "1.5", "2e-4", "1.2e+5". */
function formatTick(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(a.toExponential(1).includes(".0e") ? 0 : 1);
  return String(Number(v.toPrecision(4)));
}

window.LineChart = LineChart;
