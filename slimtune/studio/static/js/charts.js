// Live line charts on uPlot (vendored in /static/vendor/uplot, loaded as the global `uPlot`).
import { h, fmtNum } from "./ui.js";

// Steps are integers: tick only at whole, round intervals.
const STEP_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];

export const PALETTE = ["#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#db2777", "#65a30d"];

/** One chart: a title with the latest value, and a uPlot instance that follows its box's width. */
export class LineChart {
  constructor(parent, { title, series, height = 200, wide = false, logY = false }) {
    this.series = series;
    this.value = h("b");
    this.nodata = h("div", { class: "nodata" }, "no data yet");
    this.box = h("div", { class: `chart-box${wide ? " wide" : ""}` },
      h("div", { class: "chart-title" }, h("span", {}, title), this.value), this.nodata);
    parent.append(this.box);
    this.height = height;
    const opts = {
      width: Math.max(200, this.box.clientWidth - 24), height,
      scales: { x: { time: false }, y: logY ? { distr: 3 } : {} },
      series: [{ label: "step" }, ...series.map((s, i) => ({
        label: s.label, stroke: s.color || PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
        // Without an explicit `show`, uPlot draws points only while the data is sparse (e.g. one step so far).
        points: s.points ? { show: true, size: 5 } : { size: 5 }, dash: s.dash,
        value: (u, v) => fmtNum(v),
      }))],
      axes: [{ stroke: "#6b7385", grid: { stroke: "#eef0f4" }, incrs: STEP_INCRS },
             { stroke: "#6b7385", grid: { stroke: "#eef0f4" }, size: 60, values: (u, vals) => vals.map((v) => fmtNum(v, 6)) }],
      legend: { show: series.length > 1 },
      cursor: { drag: { x: true, y: false } },
    };
    this.plot = new uPlot(opts, [[], ...series.map(() => [])], this.box);
    this.resizer = new ResizeObserver(() => {
      const w = Math.max(200, this.box.clientWidth - 24);
      if (Math.abs(w - this.plot.width) > 2) this.plot.setSize({ width: w, height: this.height });
    });
    this.resizer.observe(this.box);
  }

  /** xs: step numbers; ys: one array per series (null where a series has no value). */
  setData(xs, ys) {
    this.plot.setData([xs, ...ys]);
    const has = ys.some((arr) => arr.some((v) => v != null));
    this.nodata.classList.toggle("hidden", has);
    const first = ys[0] || [];
    for (let i = first.length - 1; i >= 0; i--) {
      if (first[i] != null) { this.value.textContent = fmtNum(first[i]); break; }
    }
  }

  destroy() {
    this.resizer.disconnect();
    this.plot.destroy();
    this.box.remove();
  }
}

/** Metric records of one run, de-duplicated by step (a resumed run may repeat steps). */
export class MetricStore {
  constructor() { this.byStep = new Map(); }
  add(records) {
    for (const r of records) if (typeof r.step === "number") this.byStep.set(r.step, { ...this.byStep.get(r.step), ...r });
  }
  get size() { return this.byStep.size; }
  last() {
    let best = null;
    for (const r of this.byStep.values()) if (!best || r.step > best.step) best = r;
    return best;
  }
  /** [steps, ...one array per key], sorted by step; non-numbers become null. */
  columns(keys) {
    const rows = [...this.byStep.values()].sort((a, b) => a.step - b.step);
    return [rows.map((r) => r.step), ...keys.map((k) => rows.map((r) => (typeof r[k] === "number" && Number.isFinite(r[k]) ? r[k] : null)))];
  }
}

/** Align several runs' (steps, values) on the union of their steps, for an overlay chart. */
export function alignRuns(curves) {
  const steps = [...new Set(curves.flatMap((c) => c.steps))].sort((a, b) => a - b);
  const ys = curves.map((c) => {
    const m = new Map(c.steps.map((s, i) => [s, c.values[i]]));
    return steps.map((s) => (m.has(s) ? m.get(s) : null));
  });
  return [steps, ys];
}

/** Coalesce redraws into one per animation frame, however many events arrive. */
export function frameThrottle(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; fn(); });
  };
}
