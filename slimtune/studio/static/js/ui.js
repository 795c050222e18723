// Small DOM helpers shared by the views (no framework).

/** h("div", {class: "x", onclick: fn}, child, "text") → element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function toast(message, kind = "info", ms = 4000) {
  const el = h("div", { class: kind }, message);
  document.getElementById("toast").append(el);
  setTimeout(() => el.remove(), ms);
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "–";
}

export function fmtDuration(start, end) {
  if (!start) return "–";
  let s = Math.max(0, Math.round((end || Date.now() / 1000) - start));
  const hh = Math.floor(s / 3600); s %= 3600;
  const mm = Math.floor(s / 60); s %= 60;
  return hh ? `${hh}h ${mm}m` : mm ? `${mm}m ${s}s` : `${s}s`;
}

export function fmtNum(x, digits = 4) {
  if (x == null || Number.isNaN(x)) return "–";
  if (Math.abs(x) !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return Number(x.toFixed(digits)).toString();
}

/** A labelled form field. */
export function field(label, input, hint) {
  return h("label", { class: "field" }, label, input, hint ? h("span", { class: "hint" }, hint) : null);
}

export function errorBox(message) {
  return h("div", { class: "alert" }, message);
}

/** Remembers choices across tabs (e.g. the model picked on the Models tab preselects the Train form). */
export const prefs = {
  get(key, fallback = null) { return sessionStorage.getItem(`slimtune.${key}`) ?? fallback; },
  set(key, value) { sessionStorage.setItem(`slimtune.${key}`, value); },
};
