// The single-page app: a hash router over the views, plus the top bar (GPU job, logout).
import { api } from "./api.js";
import { h } from "./ui.js";
import * as models from "./views/models.js";
import * as data from "./views/data.js";
import * as train from "./views/train.js";
import * as runs from "./views/runs.js";
import * as run from "./views/run.js";
import * as chat from "./views/chat.js";
import * as exporter from "./views/export.js";

const VIEWS = { models, data, train, runs, chat, export: exporter };
const root = document.getElementById("view");
let cleanup = null;

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  return { name: parts[0] || "models", args: parts.slice(1) };
}

async function route() {
  if (cleanup) { try { cleanup(); } catch (e) { console.error(e); } cleanup = null; }
  const { name, args } = parseHash();
  const view = name === "runs" && args[0] ? run : VIEWS[name] || models;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === name);
  root.replaceChildren();
  try {
    cleanup = (await view.render(root, args)) || null;
  } catch (e) {
    root.append(h("div", { class: "alert" }, `Could not show this page: ${e.message}`));
  }
}

async function topbar() {
  try {
    const info = await api("/api/info");
    document.getElementById("gpu-status").textContent = info.running ? `GPU: ${info.running}` : "GPU: idle";
    const logout = document.getElementById("logout");
    logout.hidden = !info.auth_required;
  } catch { /* shown by the views */ }
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("/api/auth/logout", { method: "POST" });
  location.href = "/login";
});
window.addEventListener("hashchange", () => { route(); topbar(); });
route();
topbar();
setInterval(topbar, 5000);
