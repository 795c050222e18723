// Run view: status and actions, live charts (loss, eval loss, lr, grad norm, tokens/s, memory) and logs.
import { api, subscribe } from "../api.js";
import { h, badge, fmtDuration, fmtNum, toast, prefs, errorBox } from "../ui.js";
import { LineChart, MetricStore, frameThrottle } from "../charts.js";

const MAX_LOG_LINES = 3000;

export async function render(root, [runId]) {
  let run = await api(`/api/runs/${runId}`);
  const store = new MetricStore();
  const head = h("div", { class: "page-head" });
  const stats = h("div", { class: "stat-strip" });
  const errorHost = h("div");
  const charts = h("div", { class: "charts", id: "run-charts" });
  const logs = h("pre", { class: "logs", id: "run-logs" });
  const config = h("dl", { class: "kv" });
  root.append(head, errorHost, stats, charts,
    h("div", { class: "grid sidebar", style: "margin-top:16px" },
      h("div", { class: "panel" }, h("h2", {}, "Logs"), logs),
      h("div", { class: "panel" }, h("h2", {}, "Settings"), config)));

  const c = {
    loss: new LineChart(charts, { title: "Loss", wide: true, height: 260,
      series: [{ label: "train loss" }, { label: "eval loss", color: "#e11d48", points: true }] }),
    lr: new LineChart(charts, { title: "Learning rate", series: [{ label: "lr", color: "#059669" }] }),
    grad: new LineChart(charts, { title: "Grad norm", series: [{ label: "grad norm", color: "#d97706" }] }),
    tps: new LineChart(charts, { title: "Tokens / s", series: [{ label: "tokens/s", color: "#0891b2" }] }),
    mem: new LineChart(charts, { title: "GPU memory (GiB)", series: [{ label: "GiB", color: "#7c3aed" }] }),
  };
  const redraw = frameThrottle(() => {
    const [x, loss, evalLoss, lr, grad, tps, mem] = store.columns(["loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mem_gib"]);
    c.loss.setData(x, [loss, evalLoss]);
    c.lr.setData(x, [lr]);
    c.grad.setData(x, [grad]);
    c.tps.setData(x, [tps]);
    c.mem.setData(x, [mem]);
    drawStats();
  });

  function drawHead() {
    const act = (label, fn, cls = "") => h("button", { class: cls, onclick: async (ev) => {
      ev.target.disabled = true;
      try { await fn(); } catch (e) { toast(e.message, "error", 7000); } finally { ev.target.disabled = false; }
    } }, label);
    const active = run.status === "running" || run.status === "queued";
    head.replaceChildren(
      h("div", {}, h("div", { class: "small" }, h("a", { href: "#/runs" }, "← Runs")),
        h("h1", {}, run.name, " ", h("span", { id: "run-status" }, badge(run.status))),
        h("p", { class: "mono small" }, `${run.id} · ${run.model_id === "embeddedtiny" ? "embedded tiny model" : run.model_ref}`)),
      h("div", { class: "row" },
        active ? act("Stop", async () => { run = await api(`/api/runs/${run.id}/stop`, { method: "POST" }); drawHead(); }, "danger") : null,
        ["stopped", "failed", "interrupted"].includes(run.status)
          ? act("Resume", async () => { run = await api(`/api/runs/${run.id}/resume`, { method: "POST" }); drawHead(); connect(); }) : null,
        run.has_adapter ? h("a", { class: "button", id: "download-adapter", href: `/api/runs/${run.id}/adapter.zip`, download: "" }, "Download adapter") : null,
        run.has_adapter ? h("button", { onclick: () => { prefs.set("chatRun", run.id); location.hash = "#/chat"; } }, "Chat") : null,
        run.has_adapter ? h("button", { onclick: () => { prefs.set("exportRun", run.id); location.hash = "#/export"; } }, "Export") : null,
        !active ? act("Delete", async () => {
          if (!confirm(`Delete run ${run.name} and its files?`)) return;
          await api(`/api/runs/${run.id}`, { method: "DELETE" }); location.hash = "#/runs";
        }, "danger") : null));
    errorHost.replaceChildren(run.error ? h("div", { style: "margin-bottom:16px" }, errorBox(run.error)) : "");
    config.replaceChildren(...Object.entries(run.config).flatMap(([k, v]) => [h("dt", {}, k), h("dd", { class: "mono" }, v == null ? "–" : String(v))]));
    drawStats();
  }

  function drawStats() {
    const last = store.last() || {};
    const total = run.config.max_steps;
    const stat = (label, value, id) => h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, value));
    stats.replaceChildren(
      stat("Step", total ? `${last.step ?? 0} / ${total}` : String(last.step ?? 0), "stat-step"),
      stat("Loss", fmtNum(last.loss), "stat-loss"),
      stat("Learning rate", fmtNum(last.lr), "stat-lr"),
      stat("Tokens / s", fmtNum(last.tokens_per_s, 1), "stat-tps"),
      stat("Elapsed", fmtDuration(run.started_at, run.finished_at), "stat-elapsed"));
  }

  function appendLogs(lines) {
    if (!lines.length) return;
    const atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 40;
    logs.append(document.createTextNode(lines.join("\n") + "\n"));
    if (logs.textContent.length > 400000) {
      logs.textContent = logs.textContent.split("\n").slice(-MAX_LOG_LINES).join("\n");
    }
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  }

  let es = null;
  function connect() {
    if (es) es.close();
    logs.textContent = "";
    es = subscribe(`/api/runs/${run.id}/events`, {
      metrics: (records) => { store.add(records); redraw(); },
      log: appendLogs,
      status: (r) => { run = r; drawHead(); },
      end: () => { es.close(); es = null; },
    });
  }

  drawHead();
  redraw();
  connect();
  const ticker = setInterval(drawStats, 1000);
  return () => { if (es) es.close(); clearInterval(ticker); Object.values(c).forEach((x) => x.destroy()); };
}
