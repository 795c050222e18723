// Models tab: the embedded tiny model, local folders and hub ids; pick one for training.
import { api } from "../api.js";
import { h, toast, prefs, field, badge } from "../ui.js";

const KIND = { tiny: "embedded", local: "local folder", hub: "hub id" };

export async function render(root) {
  const list = h("div", { class: "cards", id: "model-cards" });
  const kind = h("select", { id: "model-kind" }, h("option", { value: "local" }, "Local folder"), h("option", { value: "hub" }, "Hub id"));
  const ref = h("input", { type: "text", id: "model-ref", placeholder: "/path/to/gemma-4-E2B-it  or  google/gemma-4-e2b-it" });
  const name = h("input", { type: "text", id: "model-name", placeholder: "optional display name" });
  const form = h("form", { class: "form-grid", style: "grid-template-columns: 160px 1fr 220px auto; align-items: end" },
    field("Kind", kind), field("Path or hub id", ref), field("Name", name),
    h("button", { class: "primary", type: "submit" }, "Add model"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("/api/models", { method: "POST", body: { kind: kind.value, ref: ref.value, name: name.value || null } });
      ref.value = ""; name.value = "";
      toast("Model added");
      await refresh();
    } catch (e) { toast(e.message, "error", 7000); }
  });

  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Models"),
      h("p", {}, "Pick the base model to fine-tune. The embedded tiny model trains in minutes on a CPU and is ideal for a first try."))),
    h("div", { class: "panel" }, list),
    h("div", { class: "panel" }, h("h2", {}, "Add a model"),
      h("p", { class: "muted small" }, "A local folder must contain a config.json (a Hugging Face checkpoint). A hub id is downloaded by the trainer when a run starts."),
      form),
  );

  async function refresh() {
    const models = await api("/api/models");
    const chosen = prefs.get("model", "embeddedtiny");
    list.replaceChildren(...models.map((m) => card(m, m.id === chosen)));
  }

  function card(m, selected) {
    const actions = h("div", { class: "row" });
    const use = h("button", { class: selected ? "primary" : "", onclick: () => { prefs.set("model", m.id); location.hash = "#/train"; } },
      selected ? "Selected · go to Train" : "Use for training");
    actions.append(use);
    if (m.kind === "tiny" && !m.ready) {
      actions.append(h("button", { onclick: async (ev) => {
        ev.target.disabled = true; ev.target.textContent = "Building…";
        try { await api(`/api/models/${m.id}/prepare`, { method: "POST" }); toast("Tiny model ready"); }
        catch (e) { toast(e.message, "error", 8000); }
        await refresh();
      } }, "Build now"));
    }
    if (m.kind !== "tiny") {
      actions.append(h("button", { class: "danger", onclick: async () => {
        await api(`/api/models/${m.id}`, { method: "DELETE" }); await refresh();
      } }, "Remove"));
    }
    return h("div", { class: `card${selected ? " selected" : ""}`, dataset: { model: m.id } },
      h("div", { class: "row between" }, h("span", { class: "title" }, m.name), h("span", { class: "badge" }, KIND[m.kind])),
      h("div", { class: "ref" }, m.ref),
      m.kind === "tiny" ? h("div", {}, m.ready ? badge("ready") : h("span", { class: "muted small" }, "Built automatically on first use (a few seconds).")) : null,
      actions);
  }

  await refresh();
}
