// Train tab: presets, the run settings, and the memory estimate refreshed as settings change.
import { api } from "../api.js";
import { h, prefs, field } from "../ui.js";
import { memoryPanel } from "../memory.js";

export const PRESETS = {
  quick: { label: "Quick test (tiny model)", model_id: "embeddedtiny", max_steps: 30, epochs: null, lr: 3e-3, lora_r: 16, lora_alpha: 32,
    batch_size: 8, grad_accum: 1, max_seq_length: 256, load_in_4bit: false, packing: false },
  // the 2K presets pack samples: no padding, and one shape for every step (a single captured CUDA graph)
  qlora2k: { label: "QLoRA 2K", max_steps: null, epochs: 1, lr: 2e-4, lora_r: 16, lora_alpha: 16,
    batch_size: 1, grad_accum: 8, max_seq_length: 2048, load_in_4bit: true, packing: true },
  lora16: { label: "LoRA 16-bit", max_steps: null, epochs: 1, lr: 2e-4, lora_r: 16, lora_alpha: 16,
    batch_size: 2, grad_accum: 4, max_seq_length: 2048, load_in_4bit: false, packing: true },
};
const NUMBERS = [
  ["max_steps", "Max steps", "empty = use epochs", 1], ["epochs", "Epochs", "used when max steps is empty", 0.1],
  ["lr", "Learning rate", "peak", "any"], ["lora_r", "LoRA rank r", "", 1], ["lora_alpha", "LoRA alpha", "", 1],
  ["batch_size", "Batch size", "per micro-batch", 1], ["grad_accum", "Grad accumulation", "micro-batches per step", 1],
  ["max_seq_length", "Max sequence length", "tokens", 1], ["seed", "Seed", "", 1], ["save_steps", "Save every N steps", "empty = only at the end", 1],
];

// Advanced memory: empty / auto / off = not given, so the trainer's default applies or, with a budget, the planner
// chooses (as with a CLI flag left off). `distributed` is not offered: it only acts under torchrun, and the Studio
// starts one worker process per run.
const MEMORY_NUMBERS = [
  ["mlp_chunk_size", "Tiled MLP chunk (tokens)", "Runs each MLP over chunks: less memory on long sequences, slower. 0 = off, empty = auto."],
  ["loss_chunk_size", "Loss chunk (rows)", "Rows per lm_head + loss chunk: smaller = less memory, a bit slower. Empty = auto."],
];
const SWITCHES = [
  ["activation_offload", "Offload activations to CPU RAM", "Less GPU memory for a small speed cost."],
  ["recompute_norms", "Lean RMSNorms", "Norms keep their 16-bit input instead of an fp32 copy: less memory per layer, same results, faster on GPUs (fused kernels).", true],
  ["compile_layers", "Compile decoder layers", "torch.compile each layer: faster steps after a compile of a minute or two (best with CUDA graphs or packing)."],
  ["packing", "Pack samples into full rows", "Several samples per max-length row, with no attention or loss across them: no padding, and one shape for every step (a single captured CUDA graph)."],
  ["text_only", "Text only (multimodal checkpoint)", "Loads only the language model; the vision/audio towers are never read."],
  ["finetune_multimodal_embedders", "LoRA on the multimodal embedders", "Also adapts the projections from the vision/audio towers into the text model (needs the towers: not with text only)."],
];

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
  for (const [key] of MEMORY_NUMBERS) inputs[key] = h("input", { type: "number", id: `f-${key}`, step: "1", min: "0", placeholder: "auto" });
  const switches = Object.fromEntries(SWITCHES.map(([key, , , on]) => {
    const box = h("input", { type: "checkbox", id: `f-${key}` });
    box.checked = Boolean(on);  // the Python API's default for this switch
    return [key, box];
  }));
  const budget = h("input", { type: "text", id: "f-max_memory", placeholder: "e.g. 8GiB", maxlength: "32" });
  const optimizer = h("select", { id: "f-optimizer" }, h("option", { value: "" }, "auto"),
    h("option", { value: "adamw" }, "adamw"), h("option", { value: "adamw8bit" }, "adamw8bit"));
  // CUDA graphs: auto (not given: the trainer decides, and logs why), on, or off
  const graphs = h("select", { id: "f-cuda_graphs" }, h("option", { value: "" }, "auto"),
    h("option", { value: "true" }, "on"), h("option", { value: "false" }, "off"));
  const memory = memoryPanel();
  const submit = h("button", { class: "primary", type: "submit", id: "start-run" }, "Start training");
  const formError = h("div", { class: "alert hidden" });

  function apply(p) {
    for (const [k, v] of Object.entries(p)) {
      if (k === "label") continue;
      if (k === "model_id") { if ([...modelSel.options].some((o) => o.value === v)) modelSel.value = v; continue; }
      if (k === "load_in_4bit") { fourbit.checked = v; continue; }
      if (switches[k]) { switches[k].checked = Boolean(v); continue; }
      if (inputs[k]) inputs[k].value = v ?? "";
    }
  }
  apply({ ...PRESETS.quick, seed: 3407, save_steps: null });
  preset.value = "quick";
  preset.addEventListener("change", () => { if (preset.value) apply(PRESETS[preset.value]); estimate(); });

  function config() {
    const num = (k) => (inputs[k].value === "" ? null : Number(inputs[k].value));
    const cfg = { model_id: modelSel.value, dataset_id: dataSel.value, name: name.value || null, load_in_4bit: fourbit.checked };
    for (const [k] of [...NUMBERS, ...MEMORY_NUMBERS]) cfg[k] = num(k);
    for (const k of ["lr", "lora_r", "lora_alpha", "batch_size", "grad_accum", "max_seq_length", "seed"]) if (cfg[k] == null) delete cfg[k];
    for (const [k] of SWITCHES) cfg[k] = switches[k].checked;
    cfg.max_memory = budget.value.trim() || null;
    cfg.optimizer = optimizer.value || null;
    cfg.cuda_graphs = graphs.value === "" ? null : graphs.value === "true";
    return cfg;
  }

  const estimate = () => memory.update(config());
  function switchField(key) {
    const [, label, hint] = SWITCHES.find(([k]) => k === key);
    return h("label", { class: "check", style: "margin-top:10px" }, switches[key], h("span", {}, label, " ", h("span", { class: "hint muted small" }, hint)));
  }

  const form = h("form", { id: "train-form" },
    h("div", { class: "form-grid", style: "grid-template-columns: repeat(auto-fill, minmax(220px, 1fr))" },
      field("Preset", preset), field("Base model", modelSel), field("Dataset", dataSel), field("Run name", name)),
    h("h3", { style: "margin-top:18px" }, "Settings"),
    h("div", { class: "form-grid" }, NUMBERS.map(([k, label, hint]) => field(label, inputs[k], hint))),
    h("label", { class: "check", style: "margin-top:14px" }, fourbit, "Load the base model in 4-bit (QLoRA)"),
    h("details", { class: "params", id: "advanced-memory", style: "margin-top:14px" }, h("summary", {}, "Advanced memory"),
      h("div", { class: "form-grid" },
        field("Memory budget", budget, "GPU memory for the run. The planner fills in the settings left on auto (4-bit too, when unticked) so the predicted peak fits; batch size stays as entered."),
        field("Optimizer", optimizer, "adamw8bit: optimizer state in a quarter of the memory. Auto = adamw, or 8-bit if a budget needs it."),
        MEMORY_NUMBERS.map(([k, label, hint]) => field(label, inputs[k], hint))),
      switchField("activation_offload"), switchField("recompute_norms"),
      switchField("compile_layers"), switchField("packing"),
      h("div", { class: "form-grid", style: "margin-top:10px" },
        field("CUDA graphs", graphs, "Replays each step as one captured graph: several times faster at 2K tokens. Auto = on when the run allows it (no activation offload, text, one GPU) and its predicted peak plus a margin (1.5 GiB or 7 %) fits the GPU's free memory. Unpacked batches are padded to a length bucket (one captured step each)."))),
    h("details", { class: "params", id: "multimodal", style: "margin-top:10px" }, h("summary", {}, "Multimodal"),
      switchField("text_only"), switchField("finetune_multimodal_embedders")),
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
      memory.el),
  );
  estimate();
}
