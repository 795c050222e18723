// Chat tab: the same prompt to the base model and to the fine-tuned adapter, streamed side by side.
import { api, postStream } from "../api.js";
import { h, toast, prefs, field } from "../ui.js";

const DEFAULTS = { max_new_tokens: 128, temperature: 0.7, top_p: 0.95, top_k: 64, min_p: 0, repetition_penalty: 1.0 };

export async function render(root) {
  const runs = (await api("/api/runs")).filter((r) => r.status === "completed" || r.has_adapter);
  const runSel = h("select", { id: "chat-run" }, runs.map((r) => h("option", { value: r.id }, `${r.name} (${r.id})`)));
  const wanted = prefs.get("chatRun");
  if (wanted && runs.some((r) => r.id === wanted)) runSel.value = wanted;
  const params = {};
  for (const [k, v] of Object.entries(DEFAULTS)) params[k] = h("input", { type: "number", step: "any", value: String(v), id: `p-${k}` });
  const system = h("input", { type: "text", id: "chat-system", placeholder: "optional system prompt" });
  const prompt = h("textarea", { id: "chat-input", placeholder: "Ask something… (Enter to send, Shift+Enter for a new line)" });
  const send = h("button", { class: "primary", id: "chat-send" }, "Send");
  const aborter = { current: null };

  const sides = {
    base: { title: "Base model", history: [], log: h("div", { class: "chat-log", id: "chat-base" }) },
    adapter: { title: "Fine-tuned (adapter)", history: [], log: h("div", { class: "chat-log", id: "chat-adapter" }) },
  };
  const pane = (s) => h("div", { class: "chat-pane" }, h("header", {}, s.title), s.log);

  const unload = h("button", { onclick: async () => { await api("/api/chat/unload", { method: "POST" }); toast("Chat models unloaded"); } }, "Unload models");
  const clear = h("button", { onclick: () => { for (const s of Object.values(sides)) { s.history = []; s.log.replaceChildren(); } } }, "Clear");

  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Chat"),
      h("p", {}, "Compare the base model with your fine-tuned adapter on the same prompt."))),
    runs.length ? h("div", { class: "panel" },
      h("div", { class: "form-grid", style: "grid-template-columns: minmax(240px, 2fr) minmax(240px, 3fr) auto auto; align-items:end" },
        field("Run", runSel), field("System prompt", system), clear, unload),
      h("details", { class: "params", style: "margin-top:12px" }, h("summary", {}, "Generation settings"),
        h("div", { class: "form-grid" }, Object.entries(params).map(([k, el]) => field(k.replaceAll("_", " "), el)))))
      : h("div", { class: "alert warn" }, "No finished run yet: train one first, then chat with it here."),
    h("div", { class: "chat-panes", style: "margin-top:16px" }, pane(sides.base), pane(sides.adapter)),
    h("div", { class: "composer" }, prompt, send),
  );

  function bubble(s, role, text) {
    const el = h("div", { class: `msg ${role}` }, text);
    s.log.append(el);
    s.log.scrollTop = s.log.scrollHeight;
    return el;
  }

  async function ask(sideName, text, signal) {
    const s = sides[sideName];
    s.history.push({ role: "user", content: text });
    bubble(s, "user", text);
    const out = bubble(s, "assistant streaming", "");
    const meta = h("span", { class: "meta" }, "waiting…");
    out.append(meta);
    const body = h("span");
    out.prepend(body);
    let reply = "";
    const messages = [...(system.value ? [{ role: "system", content: system.value }] : []), ...s.history];
    const p = Object.fromEntries(Object.entries(params).map(([k, el]) => [k, Number(el.value)]));
    try {
      await postStream("/api/chat/stream", { run_id: runSel.value, side: sideName, messages, params: p }, (event, data) => {
        if (event === "status") meta.textContent = data.text;
        else if (event === "token") { reply += data.text; body.textContent = reply; meta.textContent = "generating…"; s.log.scrollTop = s.log.scrollHeight; }
        else if (event === "done") meta.textContent = data.cancelled ? "stopped" : `${data.pieces ?? ""} pieces · ${data.seconds ?? "?"} s`;
        else if (event === "error") { out.classList.add("error"); body.textContent = data.text; meta.textContent = "error"; }
      }, signal);
    } catch (e) {
      if (e.name !== "AbortError") { out.classList.add("error"); body.textContent = e.message; meta.textContent = "error"; }
    } finally {
      out.classList.remove("streaming");
      s.history.push({ role: "assistant", content: reply });
    }
  }

  async function sendPrompt() {
    const text = prompt.value.trim();
    if (!text || !runSel.value) return;
    prompt.value = "";
    send.disabled = true;
    aborter.current = new AbortController();
    try {
      // Both requests go out at once; the chat worker answers them in order, and each pane streams its own.
      await Promise.all([ask("base", text, aborter.current.signal), ask("adapter", text, aborter.current.signal)]);
    } finally { send.disabled = false; aborter.current = null; }
  }
  send.addEventListener("click", sendPrompt);
  prompt.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); sendPrompt(); } });
  runSel.addEventListener("change", () => { prefs.set("chatRun", runSel.value); clear.click(); });
  return () => { if (aborter.current) aborter.current.abort(); };
}
