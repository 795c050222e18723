// Train tab: presets, the run settings, and the memory estimate refreshed as settings change.
import { api } from "../api.js";
import { h, toast, prefs, field } from "../ui.js";
import { PALETTE } from "../charts.js";

export const PRESETS = {
  quick: { label: "Quick test (tiny model)", model_id: "embeddedtiny", max_steps: 30, epochs: null, lr: 3e-3, lora_r: 16, lora_alpha: 32,
    batch_size: 8, grad_accum: 1, max_seq_length: 256, load_in_4bit: false },
  qlora2k: { label: "QLoRA 2K", max_steps: null, epochs: 1, lr: 2e-4, lora_r: 16, lora_alpha: 16,
    batch_size: 1, grad_accum: 8, max_seq_length: 2048, load_in_4bit: true },
  lora16: { label: "LoRA 16-bit", max_steps: null, epochs: 1, lr: 2e-4, lora_r: 16, lora_alpha: 16,
    batch_size: 2, grad_accum: 4, max_seq_length: 2048, load_in_4bit: false },
};
const NUMBERS = [
  ["max_steps", "Max steps", "empty = use epochs", 1], ["epochs", "Epochs", "used when max steps is empty", 0.1],
  ["lr", "Learning rate", "peak", "any"], ["lora_r", "LoRA rank r", "", 1], ["lora_alpha", "LoRA alpha", "", 1],
  ["batch_size", "Batch size", "per micro-batch", 1], ["grad_accum", "Grad accumulation", "micro-batches per step", 1],
  ["max_seq_length", "Max sequence length", "tokens", 1], ["seed", "Seed", "", 1], ["save_steps", "Save every N steps", "empty = only at the end", 1],
];

/** GiB for real models, MiB for small ones (the tiny model needs a few dozen MiB). */
function fmtGiB(gib) {
  return gib >= 1 ? `${gib.toFixed(2)} GiB` : `${Math.max(gib * 1024, 0.1).toFixed(1)} MiB`;
}

export async function render(root) {
  const [models, datasets] = await Promise.all([api("/api/models"), api("/api/datasets")]);
  const inputs = {};
  const modelSel = h("select", { id: "f-model_id" }, models.map((m) => h("option", { value: m.id }, m.name)));
  const dataSel = h("select", { id: "f-dataset_id" }, datasets.map((d) => h("option", { value: d.id }, d.name)));
  modelSel.value = prefs.get("model", "embeddedtiny");
  if (!modelSel.value) modelSel.value = "embeddedtiny";
  if (datasets.length) dataSel.value = prefs.get("dataset", datasets[0].id) || datasets[0].id;
  if (!dataSel.value && datasets.length) dataSel.value = datasets[0].id;
  const name = h("input", { type: "text", id: "f-name", placeholder: "e.g. tiny-first-try" });
  const fourbit = h("input", { type: "checkbox", id: "f-load_in_4bit" });
  const preset = h("select", { id: "preset" }, h("option", { value: "" }, "Custom"),
    Object.entries(PRESETS).map(([k, p]) => h("option", { value: k }, p.label)));
  for (const [key, , , step] of NUMBERS) inputs[key] = h("input", { type: "number", id: `f-${key}`, step: String(step), min: "0" });

  const memTotal = h("div", { class: "big-number", id: "mem-total" }, "–");
  const memBar = h("div", { class: "membar" });
  const memLegend = h("div", { class: "legend" });
  const memNote = h("div", { class: "small muted" });
  const submit = h("button", { class: "primary", type: "submit", id: "start-run" }, "Start training");
  const formError = h("div", { class: "alert hidden" });

  function apply(p) {
    for (const [k, v] of Object.entries(p)) {
      if (k === "label") continue;
      if (k === "model_id") { if ([...modelSel.options].some((o) => o.value === v)) modelSel.value = v; continue; }
      if (k === "load_in_4bit") { fourbit.checked = v; continue; }
      if (inputs[k]) inputs[k].value = v ?? "";
    }
  }
  apply({ ...PRESETS.quick, seed: 3407, save_steps: null });
  preset.value = "quick";
  preset.addEventListener("change", () => { if (preset.value) apply(PRESETS[preset.value]); estimate(); });

  function config() {
    const num = (k) => (inputs[k].value === "" ? null : Number(inputs[k].value));
    const cfg = { model_id: modelSel.value, dataset_id: dataSel.value, name: name.value || null, load_in_4bit: fourbit.checked };
    for (const [k] of NUMBERS) cfg[k] = num(k);
    for (const k of ["lr", "lora_r", "lora_alpha", "batch_size", "grad_accum", "max_seq_length", "seed"]) if (cfg[k] == null) delete cfg[k];
    return cfg;
  }

  let timer = null;
  let seq = 0;
  function estimate() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const mine = ++seq;
      const c = config();
      memNote.textContent = "estimating…";
      try {
        const r = await api("/api/memory/estimate", { method: "POST", body: {
          model_id: c.model_id, max_seq_length: c.max_seq_length || 2048, batch_size: c.batch_size || 1,
          load_in_4bit: c.load_in_4bit, lora_r: c.lora_r || 16 } });
        if (mine !== seq) return;
        memTotal.textContent = fmtGiB(r.total_gib);
        const parts = Object.entries(r.breakdown).filter(([, v]) => v > 0);
        const total = parts.reduce((a, [, v]) => a + v, 0) || 1;
        memBar.replaceChildren(...parts.map(([, v], i) => h("span", { style: `width:${(100 * v) / total}%;background:${PALETTE[i % PALETTE.length]}` })));
        memLegend.replaceChildren(...parts.flatMap(([k, v], i) => [h("i", { style: `background:${PALETTE[i % PALETTE.length]}` }),
          h("span", {}, k.replaceAll("_", " ")), h("span", { class: "mono" }, fmtGiB(v))]));
        memNote.textContent = "Estimated peak GPU memory for these settings.";
      } catch (e) {
        if (mine !== seq) return;
        memTotal.textContent = "–"; memBar.replaceChildren(); memLegend.replaceChildren();
        memNote.textContent = `No estimate: ${e.message}`;
      }
    }, 250);
  }

  const form = h("form", { id: "train-form" },
    h("div", { class: "form-grid", style: "grid-template-columns: repeat(auto-fill, minmax(220px, 1fr))" },
      field("Preset", preset), field("Base model", modelSel), field("Dataset", dataSel), field("Run name", name)),
    h("h3", { style: "margin-top:18px" }, "Settings"),
    h("div", { class: "form-grid" }, NUMBERS.map(([k, label, hint]) => field(label, inputs[k], hint))),
    h("label", { class: "check", style: "margin-top:14px" }, fourbit, "Load the base model in 4-bit (QLoRA)"),
    h("div", { class: "row", style: "margin-top:18px" }, submit, formError));
  form.addEventListener("input", (ev) => { if (ev.target !== preset && ev.target !== name) preset.value = ""; estimate(); });
  form.addEventListener("change", estimate);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    formError.classList.add("hidden");
    if (!dataSel.value) { formError.textContent = "Add a dataset on the Data tab first."; formError.classList.remove("hidden"); return; }
    submit.disabled = true; submit.textContent = "Starting…";
    try {
      const run = await api("/api/runs", { method: "POST", body: config() });
      prefs.set("model", modelSel.value); prefs.set("dataset", dataSel.value);
      location.hash = `#/runs/${run.id}`;
    } catch (e) {
      formError.textContent = e.message; formError.classList.remove("hidden");
    } finally { submit.disabled = false; submit.textContent = "Start training"; }
  });

  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Train"),
      h("p", {}, "Choose a preset, adjust what you need, and start. Runs wait in a queue while another job uses the GPU."))),
    datasets.length ? "" : h("div", { class: "alert warn", style: "margin-bottom:16px" }, "No dataset yet: add one on the Data tab (the bundled sample works)."),
    h("div", { class: "grid sidebar" },
      h("div", { class: "panel" }, form),
      h("div", { class: "panel", id: "memory-panel" }, h("h2", {}, "Memory estimate"), memTotal, memBar, memLegend, h("div", { style: "margin-top:8px" }, memNote))),
  );
  estimate();
}
