// Thin wrappers over the Studio's JSON API and its server-sent event streams.

export class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function errorFrom(r) {
  let detail = `HTTP ${r.status}`;
  try {
    const body = await r.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) detail = body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n");
  } catch { /* not JSON */ }
  if (r.status === 401) location.href = "/login";
  return new ApiError(r.status, detail);
}

/** Call the API; JSON in, JSON out. Throws ApiError with the server's message. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (!r.ok) throw await errorFrom(r);
  if (r.status === 204) return null;
  return r.json();
}

/** Upload a file as the raw request body, reporting progress (fetch cannot report upload progress). */
export function uploadFile(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/datasets/upload?filename=${encodeURIComponent(file.name)}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* empty */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, (body && body.detail) || `HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new ApiError(0, "The upload was interrupted (the server may have refused it)."));
    xhr.send(file);
  });
}

/** Follow a GET event stream; handlers maps event names to callbacks receiving parsed JSON. */
export function subscribe(path, handlers) {
  const es = new EventSource(path);
  for (const [name, fn] of Object.entries(handlers)) {
    es.addEventListener(name, (ev) => fn(JSON.parse(ev.data)));
  }
  return es;
}

/** POST a JSON body and read the answer as server-sent events (EventSource cannot POST). */
export async function postStream(path, body, onEvent, signal) {
  const r = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!r.ok) throw await errorFrom(r);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}
