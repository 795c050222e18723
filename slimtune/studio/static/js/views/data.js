// Data tab: upload (size-capped by the server), one-click sample, preview with detected format and row errors.
import { api, uploadFile } from "../api.js";
import { h, toast, prefs, fmtBytes, fmtTime, errorBox } from "../ui.js";

/** A conversation shows as "role: text" lines; anything else as pretty JSON. */
function previewRow(row) {
  if (row && Array.isArray(row.messages)) {
    return h("div", { class: "preview-row" }, row.messages.map((m) => h("div", {},
      h("b", {}, `${m.role}: `), typeof m.content === "string" ? m.content : JSON.stringify(m.content))));
  }
  return h("div", { class: "preview-row" }, JSON.stringify(row, null, 2));
}

export async function render(root) {
  const info = await api("/api/info");
  const input = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.csv,.tsv,.parquet,.txt", class: "hidden" });
  const bar = h("div", { class: "progress hidden" }, h("div"));
  const status = h("div", { class: "small muted", id: "upload-status" });
  const drop = h("div", { class: "dropzone", id: "dropzone", onclick: () => input.click() },
    h("div", { style: "font-weight:600; color: var(--ink)" }, "Drop a dataset here, or click to choose a file"),
    h("div", { class: "small" }, `JSONL, JSON, CSV, TSV, Parquet or text · up to ${info.max_upload_mb} MiB`));
  const table = h("tbody");
  const preview = h("div", { id: "preview" }, h("div", { class: "muted" }, "Choose a dataset to preview it."));

  async function upload(file) {
    bar.classList.remove("hidden");
    status.textContent = `Uploading ${file.name}…`;
    try {
      const ds = await uploadFile(file, (f) => { bar.firstChild.style.width = `${Math.round(f * 100)}%`; });
      status.textContent = `Uploaded ${ds.name}.`;
      prefs.set("dataset", ds.id);
      await refresh();
      await show(ds.id);
    } catch (e) {
      status.textContent = "";
      preview.replaceChildren(errorBox(e.message));
      toast(e.message, "error", 8000);
    } finally {
      bar.classList.add("hidden");
      bar.firstChild.style.width = "0";
    }
  }
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files[0]) upload(ev.dataTransfer.files[0]);
  });

  const sample = h("button", { id: "add-sample", onclick: async () => {
    try {
      const ds = await api("/api/datasets/sample", { method: "POST" });
      prefs.set("dataset", ds.id);
      toast("Sample dataset added");
      await refresh();
      await show(ds.id);
    } catch (e) { toast(e.message, "error", 7000); }
  } }, "Use the bundled sample dataset");

  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Data"),
      h("p", {}, "Upload a dataset; the Studio detects its format (messages, Alpaca, ShareGPT, text…) and lists rows it cannot use."))),
    h("div", { class: "grid sidebar" },
      h("div", {},
        h("div", { class: "panel" }, drop, input, h("div", { style: "margin-top:10px" }, bar), status,
          h("div", { class: "row", style: "margin-top:12px" }, h("span", { class: "muted small" }, "No data at hand?"), sample)),
        h("div", { class: "panel" }, h("h2", {}, "Datasets"), h("div", { class: "table-wrap" },
          h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Size"), h("th", {}, "Added"), h("th", {}))), table)))),
      h("div", { class: "panel" }, h("h2", {}, "Preview"), preview)),
  );

  async function refresh() {
    const rows = await api("/api/datasets");
    const chosen = prefs.get("dataset");
    table.replaceChildren(...(rows.length ? rows.map((d) => h("tr", { class: d.id === chosen ? "selected" : "", dataset: { dataset: d.id } },
      h("td", {}, h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); prefs.set("dataset", d.id); refresh(); show(d.id); } }, d.name)),
      h("td", {}, fmtBytes(d.size_bytes)), h("td", { class: "small muted" }, fmtTime(d.created_at)),
      h("td", {}, h("button", { class: "danger", onclick: async () => {
        try { await api(`/api/datasets/${d.id}`, { method: "DELETE" }); await refresh(); } catch (e) { toast(e.message, "error"); }
      } }, "Delete")))) : [h("tr", {}, h("td", { colspan: 4, class: "empty" }, "No datasets yet."))]));
  }

  async function show(id) {
    preview.replaceChildren(h("div", { class: "muted" }, "Reading…"));
    try {
      const p = await api(`/api/datasets/${id}/preview?n=5`);
      const skipped = p.skipped.length ? h("div", {},
        h("h3", { style: "margin-top:14px" }, `Skipped rows (${p.n_skipped})`),
        h("table", { id: "skipped-table" }, h("thead", {}, h("tr", {}, h("th", {}, "Where"), h("th", {}, "Why"))),
          h("tbody", {}, p.skipped.slice(0, 50).map((s) => h("tr", {}, h("td", { class: "mono" }, String(s.location)), h("td", {}, s.reason))))))
        : "";
      preview.replaceChildren(
        h("dl", { class: "kv" },
          h("dt", {}, "File"), h("dd", {}, p.dataset.name),
          h("dt", {}, "Detected format"), h("dd", {}, h("span", { class: "badge ready", id: "detected-format" }, p.format)),
          h("dt", {}, "Columns"), h("dd", { class: "mono" }, p.columns.join(", ") || "–"),
          h("dt", {}, "Usable rows"), h("dd", { id: "row-count" }, String(p.n_rows)),
          h("dt", {}, "Skipped rows"), h("dd", {}, p.n_skipped ? h("span", { class: "badge failed" }, String(p.n_skipped)) : "0")),
        h("div", { class: "row", style: "margin: 12px 0" },
          h("button", { class: "primary", onclick: () => { prefs.set("dataset", id); location.hash = "#/train"; } }, "Train on this dataset")),
        skipped,
        h("h3", { style: "margin-top:14px" }, "First rows (normalised)"),
        ...p.preview.map(previewRow),
      );
    } catch (e) {
      preview.replaceChildren(errorBox(e.message));
    }
  }

  await refresh();
  let chosen = prefs.get("dataset");
  if (!chosen || !table.querySelector(`[data-dataset="${chosen}"]`)) {
    const first = table.querySelector("[data-dataset]");
    chosen = first ? first.dataset.dataset : null;
  }
  if (chosen) { prefs.set("dataset", chosen); await refresh(); await show(chosen); }
}
