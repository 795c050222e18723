// The Train form's memory panel: the planner's predicted peak and its main terms for the current settings and,
// with a budget, the settings the planner filled in or why nothing fits (POST /api/memory/estimate).
import { api } from "./api.js";
import { h } from "./ui.js";
import { PALETTE } from "./charts.js";

// The form fields the estimate reads: the settings that decide GPU memory (the same names as the run's).
const MEMORY_KEYS = ["model_id", "max_seq_length", "batch_size", "grad_accum", "lora_r", "load_in_4bit",
  "max_memory", "activation_offload", "recompute_norms", "cuda_graphs", "compile_layers", "packing", "mlp_chunk_size", "loss_chunk_size", "optimizer"];

/** GiB for real models, MiB for small ones (the tiny model needs a few dozen MiB). */
export function fmtGiB(gib) {
  return gib >= 1 ? `${gib.toFixed(2)} GiB` : `${Math.max(gib * 1024, 0.1).toFixed(1)} MiB`;
}

const label = (k) => k.replaceAll("_", " ");
const value = (v) => (v === true ? "on" : v === false ? "off" : String(v));

/** The panel element and update(config): re-estimates (debounced; stale answers are dropped). */
export function memoryPanel() {
  const total = h("div", { class: "big-number", id: "mem-total" }, "–");
  const bar = h("div", { class: "membar" });
  const legend = h("div", { class: "legend", id: "mem-terms" });
  const plan = h("div", { id: "mem-plan", style: "margin-top:10px" });
  const note = h("div", { class: "small muted", id: "mem-note" });
  const el = h("div", { class: "panel", id: "memory-panel" }, h("h2", {}, "Memory estimate"), total, bar, legend,
    plan, h("div", { style: "margin-top:8px" }, note));

  function show(r) {
    total.textContent = fmtGiB(r.total_gib);
    const parts = Object.entries(r.breakdown).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]);
    const sum = parts.reduce((a, [, v]) => a + v, 0) || 1;
    bar.replaceChildren(...parts.map(([, v], i) => h("span", { style: `width:${(100 * v) / sum}%;background:${PALETTE[i % PALETTE.length]}` })));
    // The main terms by name; the bar above shows every term.
    legend.replaceChildren(...r.main_terms.flatMap((t, i) => [h("i", { style: `background:${PALETTE[i % PALETTE.length]}` }),
      h("span", {}, label(t.name)), h("span", { class: "mono" }, fmtGiB(t.gib))]));
    const planned = Object.entries(r.planned);
    if (r.message) {
      plan.replaceChildren(h("div", { class: "alert", id: "mem-error" }, r.message));
    } else if (r.budget_gib != null) {
      plan.replaceChildren(h("div", { class: "alert info", id: "mem-fits" },
        `Fits the ${r.budget_gib} GiB budget. `,
        planned.length ? `The planner sets: ${planned.map(([k, v]) => `${label(k)} = ${value(v)}`).join(", ")}.`
          : "Nothing needed changing."));
    } else {
      plan.replaceChildren();
    }
    const notes = r.notes.map((n) => ` ${n[0].toUpperCase()}${n.slice(1)}.`).join("");
    note.textContent = (r.message ? "Smallest plan's peak GPU memory." : "Predicted peak GPU memory for these settings.") + notes;
  }

  let timer = null;
  let seq = 0;
  function update(config) {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const mine = ++seq;
      const body = {};
      for (const k of MEMORY_KEYS) if (config[k] != null) body[k] = config[k];
      note.textContent = "estimating…";
      try {
        const r = await api("/api/memory/estimate", { method: "POST", body });
        if (mine === seq) show(r);
      } catch (e) {
        if (mine !== seq) return;
        total.textContent = "–"; bar.replaceChildren(); legend.replaceChildren();
        plan.replaceChildren(h("div", { class: "alert", id: "mem-error" }, e.message));
        note.textContent = "No estimate for these settings.";
      }
    }, 250);
  }
  return { el, update };
}
