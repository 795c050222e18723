// Runs tab: history of every run, and an overlay of the loss curves of the runs ticked for comparison.
import { api } from "../api.js";
import { h, badge, fmtTime, fmtDuration, fmtNum, toast } from "../ui.js";
import { LineChart, alignRuns, PALETTE } from "../charts.js";

export async function render(root) {
  const tbody = h("tbody");
  const chartHost = h("div", { class: "charts", id: "compare-charts" });
  const compareNote = h("div", { class: "muted small" }, "Tick two or more runs to overlay their loss curves.");
  const selected = new Set();
  let chart = null;
  let runs = [];

  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Runs"), h("p", {}, "Every training run, newest first.")),
      h("a", { class: "button primary", href: "#/train" }, "New run")),
    h("div", { class: "panel" }, h("div", { class: "table-wrap" }, h("table", { id: "runs-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Compare"), h("th", {}, "Name"), h("th", {}, "Status"), h("th", {}, "Model"),
        h("th", {}, "Step"), h("th", {}, "Loss"), h("th", {}, "Started"), h("th", {}, "Duration"))), tbody))),
    h("div", { class: "panel" }, h("h2", {}, "Compare loss curves"), compareNote, chartHost),
  );

  async function drawCompare() {
    if (chart) { chart.destroy(); chart = null; }
    const ids = [...selected];
    compareNote.classList.toggle("hidden", ids.length > 0);
    if (!ids.length) return;
    const picked = ids.map((id) => runs.find((r) => r.id === id)).filter(Boolean);
    const data = await Promise.all(picked.map((r) => api(`/api/runs/${r.id}/metrics`)));
    const curves = data.map((d) => {
      const rows = d.metrics.filter((m) => typeof m.loss === "number").sort((a, b) => a.step - b.step);
      return { steps: rows.map((m) => m.step), values: rows.map((m) => m.loss) };
    });
    chart = new LineChart(chartHost, { title: "Training loss", wide: true, height: 280,
      series: picked.map((r, i) => ({ label: r.name, color: PALETTE[i % PALETTE.length] })) });
    const [xs, ys] = alignRuns(curves);
    chart.setData(xs, ys);
  }

  async function refresh() {
    runs = await api("/api/runs");
    tbody.replaceChildren(...(runs.length ? runs.map((r) => {
      const box = h("input", { type: "checkbox", "aria-label": `compare ${r.name}`, dataset: { compare: r.id } });
      box.checked = selected.has(r.id);
      box.addEventListener("change", () => { if (box.checked) selected.add(r.id); else selected.delete(r.id); drawCompare().catch((e) => toast(e.message, "error")); });
      const steps = r.config.max_steps ? `${r.last_step ?? 0} / ${r.config.max_steps}` : (r.last_step ?? "–");
      return h("tr", { dataset: { run: r.id } },
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/runs/${r.id}` }, r.name), h("div", { class: "small muted mono" }, r.id)),
        h("td", {}, badge(r.status), r.queue_position ? h("span", { class: "small muted" }, ` #${r.queue_position}`) : null),
        h("td", { class: "small" }, r.model_id === "embeddedtiny" ? "tiny (embedded)" : r.model_ref),
        h("td", { class: "mono" }, String(steps)),
        h("td", { class: "mono" }, fmtNum(r.last_loss)),
        h("td", { class: "small muted" }, fmtTime(r.started_at || r.created_at)),
        h("td", { class: "small" }, fmtDuration(r.started_at, r.finished_at)));
    }) : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No runs yet. Start one on the Train tab."))]));
  }

  await refresh();
  const timer = setInterval(() => { if (runs.some((r) => r.status === "running" || r.status === "queued")) refresh().catch(() => {}); }, 3000);
  return () => { clearInterval(timer); if (chart) chart.destroy(); };
}
