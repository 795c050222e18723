// Export tab: pick a trained run and a format; the export runs as a background job; download the zip.
import { api } from "../api.js";
import { h, toast, prefs, field, badge, fmtDuration, fmtTime } from "../ui.js";

export async function render(root) {
  const allRuns = await api("/api/runs");
  const runs = allRuns.filter((r) => r.has_adapter);
  const runName = Object.fromEntries(allRuns.map((r) => [r.id, r.name]));
  let formats = [];
  let formatsError = null;
  try { formats = await api("/api/exports/formats"); } catch (e) { formatsError = e.message; }
  const runSel = h("select", { id: "export-run" }, runs.map((r) => h("option", { value: r.id }, `${r.name} (${r.id})`)));
  const wanted = prefs.get("exportRun");
  if (wanted && runs.some((r) => r.id === wanted)) runSel.value = wanted;
  const cards = h("div", { class: "cards", id: "export-formats" }, formats.map((f, i) => h("label", { class: "card" },
    h("div", { class: "row" }, h("input", { type: "radio", name: "format", value: f.name, checked: i === 0 }), h("span", { class: "title" }, f.name)),
    h("div", { class: "small muted" }, f.description || ""))));
  const go = h("button", { class: "primary", id: "start-export" }, "Export");
  const tbody = h("tbody");

  go.addEventListener("click", async () => {
    const fmt = cards.querySelector("input[name=format]:checked");
    if (!fmt || !runSel.value) return;
    go.disabled = true;
    try {
      await api("/api/exports", { method: "POST", body: { run_id: runSel.value, format: fmt.value } });
      await refresh();
    } catch (e) { toast(e.message, "error", 7000); } finally { go.disabled = false; }
  });

  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Export"),
      h("p", {}, "Turn a trained adapter into a file you can ship: the adapter alone, merged weights, or GGUF."))),
    runs.length ? h("div", { class: "panel" },
      field("Run", runSel),
      h("h3", { style: "margin-top:16px" }, "Format"),
      formatsError ? h("div", { class: "alert" }, formatsError) : cards,
      h("div", { class: "row", style: "margin-top:14px" }, go))
      : h("div", { class: "alert warn" }, "No run with an adapter yet: train one first."),
    h("div", { class: "panel" }, h("h2", {}, "Exports"), h("div", { class: "table-wrap" }, h("table", { id: "exports-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Run"), h("th", {}, "Format"), h("th", {}, "Status"), h("th", {}, "Progress"), h("th", {}, "Created"), h("th", {}))), tbody))),
  );

  let rows = [];
  async function refresh() {
    rows = await api("/api/exports");
    tbody.replaceChildren(...(rows.length ? rows.map((x) => {
      const active = x.status === "running" || x.status === "queued";
      const progress = x.status === "running" ? h("div", { class: "progress indeterminate", style: "width:140px" }, h("div"))
        : x.status === "queued" ? h("span", { class: "small muted" }, `waiting (#${x.queue_position ?? "?"})`)
        : h("span", { class: "small muted" }, fmtDuration(x.started_at, x.finished_at));
      return h("tr", { dataset: { export: x.id } },
        h("td", {}, runName[x.run_id] || x.run_id, h("div", { class: "mono small muted" }, x.run_id)), h("td", {}, x.format),
        h("td", {}, badge(x.status), x.error ? h("div", { class: "small", style: "color:var(--bad); white-space:pre-wrap" }, x.error) : null),
        h("td", {}, progress), h("td", { class: "small muted" }, fmtTime(x.created_at)),
        h("td", {}, h("div", { class: "row" },
          x.download_ready ? h("a", { class: "button primary", href: `/api/exports/${x.id}/download`, download: "" }, "Download .zip") : null,
          active ? h("button", { class: "danger", onclick: async () => { await api(`/api/exports/${x.id}/stop`, { method: "POST" }); refresh(); } }, "Stop")
            : h("button", { class: "danger", onclick: async () => { await api(`/api/exports/${x.id}`, { method: "DELETE" }); refresh(); } }, "Delete"))));
    }) : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No exports yet."))]));
  }
  await refresh();
  const timer = setInterval(() => { if (rows.some((x) => x.status === "running" || x.status === "queued")) refresh().catch(() => {}); }, 1500);
  return () => clearInterval(timer);
}
